"""The Hugging Face engine on the tiny zoo: loading, batching, NF4, LoRA, streaming and limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from deployments.config import EngineConfig
from deployments.engines.base import (
    Engine,
    EngineInputError,
    GenerationRequest,
    SamplingParams,
    safe_stream_prefix,
    truncate_at_stop,
)
from deployments.engines.hf import PLAIN_CHAT_TEMPLATE, HFEngine

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def chat(text: str, params: SamplingParams = GREEDY, adapter: str | None = None) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},), params=params, adapter=adapter)


@pytest.fixture(scope="module")
def engine(zoo: Path) -> HFEngine:
    adapters = {"a": str(zoo / "adapters" / "lora-a"), "b": str(zoo / "adapters" / "lora-b")}
    return HFEngine(EngineConfig(model=str(zoo / "general"), adapters=adapters, max_prompt_tokens=200))


@pytest.mark.parametrize("name", ["medical", "code", "general"])
def test_zoo_models_load_and_generate(zoo: Path, name: str) -> None:
    e = HFEngine(EngineConfig(model=str(zoo / name)))
    assert isinstance(e, Engine)
    r = e.generate_sync(chat("hello there", SamplingParams(temperature=0.0, max_new_tokens=8)))
    assert r.completion_tokens >= 1
    assert r.prompt_tokens == len(e.render(chat("hello there")))
    assert r.finish_reason in ("stop", "length")


def test_returns_only_new_tokens(engine: HFEngine) -> None:
    prompt = "the patient has a fever"
    r = engine.generate_sync(GenerationRequest(prompt=prompt, params=GREEDY))
    ids = engine.render(GenerationRequest(prompt=prompt, params=GREEDY))
    with engine.model.disable_adapter():
        full = engine.model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
    expected = engine.tokenizer.decode(full[0, len(ids) :], skip_special_tokens=True)
    assert r.text == expected
    assert not r.text.startswith(prompt)


def test_sampling_is_reproducible_with_seed(engine: HFEngine) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=1234)
    a = engine.generate_sync(chat("tell me a story", p)).text
    b = engine.generate_sync(chat("tell me a story", p)).text
    c = engine.generate_sync(chat("tell me a story", SamplingParams(temperature=1.0, max_new_tokens=16, seed=99))).text
    assert a == b
    assert a != c


def test_batch_equals_each_alone(engine: HFEngine) -> None:
    prompts = ["hi", "what is the capital of france and why is it famous", "fever", "def f(x): return x"]
    batch = engine.generate_batch_sync([chat(p) for p in prompts])
    alone = [engine.generate_sync(chat(p)) for p in prompts]
    assert [r.text for r in batch] == [r.text for r in alone]
    assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in alone]
    assert len({r.prompt_tokens for r in batch}) > 1  # really different lengths, so padding was exercised


def test_mixed_batch_groups_adapters_and_lengths(engine: HFEngine) -> None:
    reqs = [
        chat("hi", adapter="a"),
        chat("hi"),
        chat("hi", SamplingParams(temperature=0.0, max_new_tokens=3), "b"),
    ]
    batch = engine.generate_batch_sync(reqs)
    assert [r.text for r in batch] == [engine.generate_sync(r).text for r in reqs]
    assert batch[2].completion_tokens <= 3


def test_lora_adapters_change_output(engine: HFEngine) -> None:
    base = engine.generate_sync(chat("hello")).text
    a = engine.generate_sync(chat("hello", adapter="a")).text
    b = engine.generate_sync(chat("hello", adapter="b")).text
    assert len({base, a, b}) == 3
    assert engine.generate_sync(chat("hello")).text == base  # disabling the adapter really restores the base


def test_unknown_adapter_is_a_client_error(engine: HFEngine) -> None:
    with pytest.raises(EngineInputError, match="unknown adapter 'cardio'"):
        engine.generate_sync(chat("hi", adapter="cardio"))


def test_nf4_really_quantizes(zoo: Path) -> None:
    import bitsandbytes as bnb

    full = HFEngine(EngineConfig(model=str(zoo / "medical")))
    q = HFEngine(EngineConfig(model=str(zoo / "medical"), quantization="nf4"))
    linear4 = [m for m in q.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert linear4[0].weight.quant_state.quant_type == "nf4"
    assert q.model.get_memory_footprint() < 0.7 * full.model.get_memory_footprint()
    r = q.generate_sync(chat("hello"))
    assert r.completion_tokens >= 1 and isinstance(r.text, str)


def test_stream_concatenates_to_generate(engine: HFEngine) -> None:
    async def go(req: GenerationRequest) -> tuple[str, str, object]:
        deltas = [d async for d in engine.stream(req)]
        return "".join(d.text for d in deltas), (await engine.generate(req)).text, deltas[-1]

    for req in [
        chat("fever and cough"),
        chat("hi", adapter="b"),
        GenerationRequest(prompt="def", params=GREEDY),
    ]:
        streamed, whole, last = asyncio.run(go(req))
        assert streamed == whole
        assert last.finish_reason is not None and last.completion_tokens >= 1


def test_stop_strings_cut_both_paths(engine: HFEngine) -> None:
    full = engine.generate_sync(chat("fever", SamplingParams(temperature=0.0, max_new_tokens=30))).text
    stop = full[3:5]
    p = SamplingParams(temperature=0.0, max_new_tokens=30, stop=(stop,))
    r = engine.generate_sync(chat("fever", p))
    assert r.text == full[: full.find(stop)]
    assert r.finish_reason == "stop"

    async def streamed() -> str:
        return "".join([d.text async for d in engine.stream(chat("fever", p))])

    assert asyncio.run(streamed()) == r.text


def test_too_long_prompt_is_clear_error(engine: HFEngine) -> None:
    with pytest.raises(EngineInputError, match=r"prompt is \d+ tokens; this model accepts at most 200"):
        engine.generate_sync(chat("fever " * 500))


def test_plain_template_fallback(zoo: Path) -> None:
    e = HFEngine(EngineConfig(model=str(zoo / "code"), chat_template=PLAIN_CHAT_TEMPLATE))
    text = e.tokenizer.decode(e.render(chat("hello")))
    assert text.endswith("Assistant:") and "User: hello" in text


def test_bad_sampling_params() -> None:
    with pytest.raises(EngineInputError, match="temperature"):
        SamplingParams(temperature=3)
    with pytest.raises(EngineInputError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(EngineInputError, match="exactly one"):
        GenerationRequest()


def test_stop_helpers() -> None:
    assert truncate_at_stop("abc STOP def", ["STOP"]) == ("abc ", True)
    assert truncate_at_stop("abc", ["x"]) == ("abc", False)
    assert safe_stream_prefix("hello ST", ["STOP"]) == len("hello ")
    assert safe_stream_prefix("hello", ["STOP"]) == 5
