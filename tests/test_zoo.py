"""The zoo is deterministic, saved as safetensors and loads through the real `from_pretrained` path."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from deployments.models.zoo import build_zoo


def test_zoo_layout_and_formats(zoo: Path) -> None:
    for name, arch in [("medical", "qwen2"), ("code", "llama"), ("general", "qwen2")]:
        d = zoo / name
        assert (d / "model.safetensors").is_file()
        assert not list(d.glob("*.bin"))
        cfg = AutoConfig.from_pretrained(d)
        assert cfg.model_type == arch
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.chat_template and "<|im_start|>" in tok.chat_template
        n = sum(t.numel() for t in load_file(d / "model.safetensors").values())
        assert 50_000 < n < 1_000_000
    assert AutoConfig.from_pretrained(zoo / "t5").model_type == "t5"
    assert (zoo / "adapters" / "lora-a" / "adapter_model.safetensors").is_file()


def test_zoo_is_deterministic(zoo: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_zoo(again, seed=0, specialists={"medical": "qwen2"})
    a = load_file(zoo / "medical" / "model.safetensors")
    b = load_file(again / "medical" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert (zoo / "medical" / "tokenizer.json").read_text() == (again / "medical" / "tokenizer.json").read_text()
    v1, v2 = load_file(zoo / "vision" / "model.safetensors"), load_file(again / "vision" / "model.safetensors")
    assert v1.keys() == v2.keys() and all((v1[k] == v2[k]).all() for k in v1)
    for f in ("processor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (zoo / "vision" / f).read_text() == (again / "vision" / f).read_text()
