"""Issue #12's point fixes, each checked in-process (no Serve): parsing, weights by domain, usage, length, keys, T5."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from deployments.config import ConfigError, ServerConfig, parse_graph_config
from deployments.protocol import BodyError, ChatCompletionRequest, Routing, parse_json_body

TWO_DOMAIN = "Write a Python script that parses patient records and flags patients with diabetes."
MSG = [{"role": "user", "content": "hi"}]


# ---- request parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
        (b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "deeper"),
        (b'{"temperature": NaN}', "NaN"),
        (b'{"temperature": 1e999}', "out of range"),
    ],
)
def test_hostile_bodies_are_body_errors(raw: bytes, needle: str) -> None:
    with pytest.raises(BodyError, match=needle) as info:
        parse_json_body(raw)
    assert info.value.status == 400


def test_strict_types_and_bounded_seed() -> None:
    from pydantic import ValidationError

    for bad in ({"stream": "yes"}, {"seed": 2**70}, {"max_tokens": "8"}, {"temperature": True}, {"tools_": 1}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"messages": MSG, **bad})
    ok = ChatCompletionRequest.model_validate({"messages": MSG, "seed": 2**63 - 1, "temperature": 1})
    assert ok.seed == 2**63 - 1 and ok.temperature == 1.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("logprobs", True),
        ("response_format", {"type": "json_object"}),
        ("top_logprobs", 2),
        ("logit_bias", {"5": 1}),
        ("presence_penalty", 0.2),
    ],
)
def test_unsupported_fields_are_refused_by_name(field: str, value: object) -> None:
    req = ChatCompletionRequest.model_validate({"messages": MSG, field: value})
    assert req.refused_field()[0] == field
    if field in ("logprobs", "response_format"):  # optional features: on where the engines provide them
        assert req.refused_field(frozenset({field})) is None
    if field == "top_logprobs":  # meaningless without logprobs: true, even where logprobs are supported
        assert req.refused_field(frozenset({"logprobs"}))[0] == "top_logprobs"


# ---- council: scores by domain, usage, length ------------------------------------------------------------


def graph(zoo: Path, names: dict[str, str] | None = None) -> dict:
    """Three zoo specialists; `names` renames them (domain -> specialist name) via router.domain_to_specialist."""
    names = names or {}
    return {
        "specialists": [
            {
                "name": names.get(d, d),
                "model": str(zoo / d),
                "generation": {"temperature": 0.0, "max_new_tokens": 6},
            }
            for d in ("medical", "code", "general")
        ],
        "router": {"fallback": names.get("general", "general"), "top_k": 2, "domain_to_specialist": names},
        "merger": {"model": str(zoo / "t5"), "max_new_tokens": 5},
    }


def test_merge_weights_and_fallback_use_domain_scores(zoo: Path) -> None:
    from deployments.council import Council

    names = {"medical": "doctor", "code": "coder", "general": "chat"}
    council = Council(parse_graph_config(graph(zoo, names)), specialists=None, merger=None)  # type: ignore[arg-type]
    routing = Routing(scores={"medical": 0.9, "code": 0.3, "general": 0.1})
    answers = {n: {"text": n, "completion_tokens": 1, "finish_reason": "stop"} for n in ("coder", "doctor")}
    weights = {a["domain"]: a["weight"] for a in council._merge_payload({"prompt": "x"}, answers, routing)["answers"]}
    assert weights == {"doctor": 0.9, "coder": 0.3}  # was 1.0 and 1.0: the scores were looked up by name
    assert council._best(routing, answers) == "doctor"  # was "coder", the first one


def test_merged_usage_counts_what_the_client_saw_and_length(zoo: Path) -> None:
    from deployments.pipeline import MultiSpecializedLanguageModelPipeline

    pipe = MultiSpecializedLanguageModelPipeline(graph(zoo))
    try:
        payload = {"model": "auto", "prompt": TWO_DOMAIN, "max_tokens": 5, "temperature": 0.0}
        ans = asyncio.run(pipe.council.answer(payload))
        assert ans.routing.merged, ans.routing
        # The merger's 5 tokens (its cap), not the specialists' tokens added on top.
        assert ans.completion_tokens == 5
        spent = ans.routing.specialist_usage
        assert set(spent) == set(ans.routing.used) and all(u.completion_tokens >= 1 for u in spent.values())
        # The random-weight T5 never writes EOS: it stops at its cap, which the client must be told.
        assert ans.finish_reason == "length"

        async def streamed() -> list:
            return [ev async for ev in pipe.council.stream(payload)]

        events = asyncio.run(streamed())
        assert events[-1].done and events[-1].routing.merged
        assert events[-1].finish_reason == "length" and events[-1].error is None
        assert events[-1].completion_tokens == 5  # the streamed ids, counted exactly
    finally:
        pipe.clear_resources()


# ---- the API key --------------------------------------------------------------------------------------


def test_api_key_never_plain_in_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="api_key_env"):
        ServerConfig.model_validate({"api_key": "a-plain-key-123"})
    monkeypatch.setenv("CONSILIUM_TEST_KEY", "env-key-12345")
    cfg = ServerConfig.model_validate({"api_key_env": "CONSILIUM_TEST_KEY"})
    key = cfg.read_api_key()
    assert key is not None and key.get_secret_value() == "env-key-12345"
    assert "env-key-12345" not in repr(key) + str(key) + json.dumps(cfg.model_dump())
    (tmp_path / "k").write_text("file-key-12345\n")
    assert ServerConfig(api_key_file=str(tmp_path / "k")).read_api_key().get_secret_value() == "file-key-12345"
    with pytest.raises(ConfigError, match="CONSILIUM_NOT_SET"):
        ServerConfig(api_key_env="CONSILIUM_NOT_SET").read_api_key()
    with pytest.raises(ConfigError, match="api_key_file"):
        ServerConfig(api_key_file=str(tmp_path / "missing")).read_api_key()
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="shorter"):
        ServerConfig(api_key_file=str(tmp_path / "short")).read_api_key()
    assert ServerConfig().read_api_key() is None


# ---- fusion train --mode full: the merger service loads the trained T5 ------------------------------------


def test_merger_service_loads_the_t5_that_fusion_train_saved(zoo: Path, tmp_path: Path) -> None:
    from deployments.cli import main
    from deployments.config import MergerConfig
    from deployments.merger import MergerService

    rows = [
        {"query": f"q{i}", "answers": [{"domain": "a", "text": f"x {i}"}, {"domain": "b", "text": "y"}], "target": "x"}
        for i in range(4)
    ]
    data = tmp_path / "f.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "merger"
    args = ["fusion", "train", "--model", str(zoo / "t5"), "--data", str(data), "--out", str(out)]
    assert main([*args, "--mode", "full", "--epochs", "1", "--lr", "1e-2", "--batch-size", "4"]) == 0
    from transformers import T5ForConditionalGeneration

    saved = T5ForConditionalGeneration.from_pretrained(out / "t5").state_dict()
    base = T5ForConditionalGeneration.from_pretrained(zoo / "t5").state_dict()
    assert any(not torch.equal(saved[k], base[k]) for k in saved)  # training changed the decoder
    service = MergerService(MergerConfig(model=str(zoo / "t5"), merger_weights=str(out), max_new_tokens=2))
    served = service.synth.t5.state_dict()
    assert all(torch.equal(served[k], saved[k]) for k in saved)  # the service serves the trained T5
