"""Adapter training (LoRA and QLoRA), loading trained adapters, and one base shared by specialists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deployments.config import EngineConfig, SpecialistConfig, parse_graph_config
from deployments.engines.base import GenerationRequest, SamplingParams
from deployments.engines.hf import HFEngine
from deployments.models.adapters import (
    AdapterDataError,
    AdapterTrainConfig,
    TargetModuleError,
    read_chat_jsonl,
    resolve_target_modules,
    train_adapter,
)
from deployments.specialist import SpecialistGroup

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)


def ask(text: str, adapter: str | None = None) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},), params=GREEDY, adapter=adapter)


def test_lora_training_lowers_loss_and_changes_output(zoo: Path, trained_adapter) -> None:
    path, report = trained_adapter
    losses = [h["val_loss"] for h in report["history"]]
    assert losses[-1] < 0.5 * losses[0]
    assert report["adapted_modules"] == 14  # 7 Linear kinds x 2 layers, every one reported
    assert (path / "adapter_model.safetensors").is_file()
    engine = HFEngine(EngineConfig(model=str(zoo / "general"), adapters={"rf": str(path)}))
    base = engine.generate_sync(ask("how do I treat symptom 3?")).text
    tuned = engine.generate_sync(ask("how do I treat symptom 3?", "rf")).text
    assert tuned != base
    assert tuned.startswith("rest")  # it learned the reply


def test_qlora_on_4bit_base_trains_and_saves(zoo: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    data = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "yes"}] for i in range(24)]
    report = train_adapter(
        str(zoo / "medical"),
        data,
        tmp_path / "q",
        AdapterTrainConfig(epochs=2, lr=5e-3, batch_size=4, quantization="nf4"),
        progress=False,
    )
    assert report["history"][-1]["val_loss"] < report["history"][0]["val_loss"]
    assert (tmp_path / "q" / "adapter_config.json").is_file()
    engine = HFEngine(EngineConfig(model=str(zoo / "medical"), quantization="nf4", adapters={"q": str(tmp_path / "q")}))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in engine.model.modules())
    assert engine.generate_sync(ask("q1", "q")).completion_tokens >= 1


def test_target_modules_are_found_not_assumed() -> None:
    from transformers import Phi3Config, Phi3ForCausalLM

    # Phi-3 fuses q, k and v into qkv_proj: asking for q_proj must fail loudly, not adapt nothing.
    tiny = Phi3ForCausalLM(
        Phi3Config(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            pad_token_id=0,
        )
    )
    assert resolve_target_modules(tiny, None) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    with pytest.raises(TargetModuleError, match=r"\['q_proj', 'v_proj'\] match no Linear layer.*qkv_proj"):
        resolve_target_modules(tiny, ["q_proj", "v_proj"])
    assert resolve_target_modules(tiny, ["qkv_proj"]) == ["qkv_proj"]


def test_two_specialists_share_one_base(zoo: Path, trained_adapter) -> None:
    path, _ = trained_adapter
    common = {"model": str(zoo / "general"), "group": "general", "adapters": {"rf": str(path)}}
    members = [SpecialistConfig(name="general", **common), SpecialistConfig(name="nurse", adapter="rf", **common)]
    group = SpecialistGroup(members)
    model = group.engine.model
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert base_params == sum(p.numel() for p in HFEngine(EngineConfig(model=str(zoo / "general"))).model.parameters())
    import asyncio

    payload = {
        "messages": [{"role": "user", "content": "how do I treat symptom 3?"}],
        "temperature": 0,
        "max_tokens": 6,
    }
    a = asyncio.run(group.generate({**payload, "specialist": "general"}))
    b = asyncio.run(group.generate({**payload, "specialist": "nurse"}))
    assert a["text"] != b["text"] and b["text"].startswith("rest")
    graph = parse_graph_config(
        {
            "specialists": [m.model_dump() for m in members],
            "router": {"fallback": "general"},
            "merger": {"model": "/m/t5"},
        }
    )
    assert list(graph.groups()) == ["general"]  # one deployment for both


def test_bad_adapter_data_names_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(
        json.dumps({"prompt": "a", "response": "b"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "x"}]})
        + "\n"
    )
    with pytest.raises(AdapterDataError, match=r"d.jsonl:2: 'messages' must be"):
        read_chat_jsonl(p)
    p.write_text("{}\n")
    with pytest.raises(AdapterDataError, match=r":1: expected"):
        read_chat_jsonl(p)


def test_cli_reports_bad_target(zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from deployments.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(SystemExit, match=r"qkv_proj.*match no Linear layer"):
        main(
            [
                "adapter",
                "train",
                "--base",
                str(zoo / "general"),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o"),
                "--target-modules",
                "qkv_proj",
            ]
        )
