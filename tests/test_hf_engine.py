"""The Hugging Face engine on the tiny zoo: loading, batching, NF4, LoRA, streaming and limits."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from deployments.config import EngineConfig
from deployments.engines.base import (
    Engine,
    EngineInputError,
    GenerationRequest,
    SamplingParams,
    StreamDelta,
    safe_stream_prefix,
    truncate_at_stop,
)
from deployments.engines.hf import PLAIN_CHAT_TEMPLATE, HFEngine, stream_interval

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def chat(text: str, params: SamplingParams = GREEDY, adapter: str | None = None) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},), params=params, adapter=adapter)


@pytest.fixture(scope="module")
def engine(zoo: Path) -> Iterator[HFEngine]:
    adapters = {"a": str(zoo / "adapters" / "lora-a"), "b": str(zoo / "adapters" / "lora-b")}
    e = HFEngine(EngineConfig(model=str(zoo / "general"), adapters=adapters, max_prompt_tokens=200))
    yield e
    e.close()


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


def deliveries(engine: HFEngine, req: GenerationRequest, n: int = 1) -> list[list]:
    """What the engine hands each of n streams of req, item by item (its sink, no consumer-side merging).
    All n are queued before the engine's next step (scheduling needs this lock): one prefill, side by side."""
    got: list[list] = [[] for _ in range(n)]
    done = [threading.Event() for _ in range(n)]

    def sink_for(i: int) -> Callable[[StreamDelta | BaseException], None]:
        def sink(item: StreamDelta | BaseException) -> None:
            got[i].append(item)
            if isinstance(item, BaseException) or item.finish_reason is not None:
                done[i].set()

        return sink

    with engine._cond:
        for i in range(n):
            engine.submit(req, sink_for(i))
    assert all(d.wait(120) for d in done)
    return got


def test_stream_interval_merges_tokens_after_the_first(engine: HFEngine) -> None:
    """stream_interval_s: the first delta at once, later tokens merged per interval; same text as generate."""
    req = chat("fever and cough", SamplingParams(temperature=0.0, max_new_tokens=24))

    async def go() -> list:
        return [d async for d in engine.stream(req)]

    every = deliveries(engine, req)[0]  # the engine's deliveries without an interval: one per token with text
    saved = engine.config
    engine.config = saved.model_copy(update={"stream_interval_s": 1.0})  # longer than the whole answer takes
    try:
        merged = asyncio.run(go())
    finally:
        engine.config = saved
    assert len(every) > 3  # without an interval an idle consumer sees about one token per delta
    assert 2 <= len(merged) <= 3  # the first token, then the rest (two if the answer outlasts one interval)
    assert merged[0].text == every[0].text
    assert "".join(d.text for d in merged) == "".join(d.text for d in every) == engine.generate_sync(req).text
    assert merged[-1].completion_tokens == every[-1].completion_tokens


def test_delta_budget_is_shared_by_the_replica_s_streams(engine: HFEngine) -> None:
    """stream_deltas_per_s: with n rows streaming, each gets at most one delta per n / budget seconds (the first
    at once), paced on the engine thread; the text is generate's. A step clock (1/64 s a step) makes it exact."""
    req = chat("fever and cough", SamplingParams(temperature=0.0, max_new_tokens=40))
    expected = engine.generate_sync(req)
    d0 = engine.engine_stats()["deltas"]
    unpaced = deliveries(engine, req)[0]
    assert engine.engine_stats()["deltas"] - d0 == len(unpaced)  # the counter counts deliveries
    saved, clock, ticks = engine.config, engine._clock, itertools.count()
    engine._clock = lambda: next(ticks) / 64  # read once per decoding step (binary fractions: exact sums)
    engine.config = saved.model_copy(update={"stream_deltas_per_s": 64.0})
    try:
        alone = deliveries(engine, req)  # 1 stream: 1/64 s = one step between deltas
        four = deliveries(engine, req, 4)  # 4 streams: 4/64 s = four steps between deltas
    finally:
        engine.config, engine._clock = saved, clock
    n = expected.completion_tokens
    assert n >= 24  # long enough for the pacing to show
    for deltas in alone + four:
        assert "".join(d.text for d in deltas) == expected.text
        assert deltas[0].text == unpaced[0].text  # the first delta is not held back
        assert deltas[-1].completion_tokens == n and deltas[-1].finish_reason == expected.finish_reason
    assert len(alone[0]) == len(unpaced) >= n - 8  # alone: every step's text at once, as without a budget
    assert all(len(deltas) <= n / 4 + 2 for deltas in four)  # one per four steps (+ the first and the last)

    async def consumed() -> str:  # the async side joins the same text
        return "".join([d.text async for d in engine.stream(req)])

    engine.config = saved.model_copy(update={"stream_deltas_per_s": 64.0})
    try:
        assert asyncio.run(consumed()) == expected.text
    finally:
        engine.config = saved


def test_stream_interval_and_priority_fields() -> None:
    assert stream_interval(0.02, None, 8) == 0.02  # no budget: the fixed interval
    assert stream_interval(0.02, 100, 1) == 0.02  # the budget never shortens it
    assert stream_interval(0.02, 100, 8) == pytest.approx(0.08)
    assert stream_interval(0.0, 100, 0) == 0.0
    assert stream_interval(0.02, 100, 1000) == 1.0  # capped: a stream never looks stalled for the budget
    with pytest.raises(ValidationError, match="stream_deltas_per_s"):
        EngineConfig(model="m", stream_deltas_per_s=0)
    with pytest.raises(ValidationError, match="decode_thread_priority"):
        EngineConfig(model="m", decode_thread_priority="low")


def _policy(tid: int) -> int:
    """A thread's scheduling policy, field 41 of /proc/self/task/TID/stat."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[38])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread scheduling policy is Linux's")
def test_decode_thread_runs_under_sched_idle_when_asked(zoo: Path, engine: HFEngine) -> None:
    idle = HFEngine(EngineConfig(model=str(zoo / "medical"), decode_thread_priority="idle"))
    try:
        r = idle.generate_sync(chat("hi", SamplingParams(temperature=0.0, max_new_tokens=3)))
        assert r.completion_tokens >= 1
        stats = idle.engine_stats()
        tid = stats["decode_thread_id"]
        assert tid != threading.get_native_id()
        assert _policy(tid) == os.SCHED_IDLE and os.sched_getscheduler(tid) == os.SCHED_IDLE
        assert stats["decode_thread_priority"] == "idle"
        assert _policy(threading.get_native_id()) == os.SCHED_OTHER  # only that thread, not the process
        assert _policy(engine.engine_stats()["decode_thread_id"]) == os.SCHED_OTHER  # the default: unchanged
    finally:
        idle.close()


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


# ---- continuous batching: scheduler, mixed batches, seeds, cancellation, logprobs, hooks ---------------


def test_scheduler_admits_by_slots_and_prefill_budget_and_drops_cancelled() -> None:
    from deployments.engines.scheduler import Scheduler, Sequence

    s = Scheduler(max_num_seqs=3, max_prefill_tokens=100)
    a, b, c, d = (Sequence(prompt_len=n, max_new=5) for n in (40, 40, 10, 10))
    for x in (a, b, c, d):
        s.add(x)
    p1 = s.schedule()
    assert p1.prefill == [a, b] and p1.decode == []  # a third 40-wide row would cost 120 > 100 tokens
    p2 = s.schedule()
    assert p2.prefill == [c] and p2.decode == [a, b]  # one slot left: c joins, d waits
    b.cancel()
    p3 = s.schedule()
    assert p3.aborted == [b] and p3.decode == [a, c] and p3.prefill == [d] and b.finished
    s.finish(a)
    assert s.schedule().decode == [c, d] and not s.waiting
    assert s.drain() == [c, d] and not s.has_work


def test_rows_join_mid_flight_and_match_each_alone(engine: HFEngine) -> None:
    """A long greedy row runs; rows with other lengths, adapters, stop strings and sampling join later."""
    long_req = chat("tell me everything about fevers", SamplingParams(temperature=0.0, max_new_tokens=40))
    joiners = [
        chat("hi", SamplingParams(temperature=0.0, max_new_tokens=3), "a"),
        chat("what is the capital of france and why", SamplingParams(temperature=0.0, max_new_tokens=17)),
        chat("fever", SamplingParams(temperature=1.0, max_new_tokens=9, seed=5), "b"),
        GenerationRequest(prompt="def f(x):", params=SamplingParams(temperature=0.0, max_new_tokens=25)),
    ]
    alone = [engine.generate_sync(r) for r in [long_req, *joiners]]
    before = engine.engine_stats()

    async def mixed():
        stream = engine.stream(long_req)
        first = await stream.__anext__()  # the long row is decoding: the others join a running batch
        rest = asyncio.gather(*(engine.generate(r) for r in joiners))
        tail = [d async for d in stream]
        return [first, *tail], await rest

    deltas, together = asyncio.run(mixed())
    assert "".join(d.text for d in deltas) == alone[0].text
    assert [r.text for r in together] == [r.text for r in alone[1:]]
    assert [r.completion_tokens for r in together] == [r.completion_tokens for r in alone[1:]]
    after = engine.engine_stats()
    assert after["max_batch"] >= 3 and after["steps"] > before["steps"]
    # Each row kept its own budget while sharing steps: the 3-token row left long before the 40-token one.
    assert together[0].completion_tokens <= 3


def test_greedy_rows_equal_hf_generate(engine: HFEngine) -> None:
    prompts = ["the patient has a fever", "def", "a much longer prompt about hypertension and its causes"]
    ours = engine.generate_batch_sync([GenerationRequest(prompt=p, params=GREEDY) for p in prompts])
    for p, r in zip(prompts, ours, strict=True):
        ids = engine.render(GenerationRequest(prompt=p))
        with engine.model.disable_adapter():
            ref = engine.model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=sorted(engine.stop_ids),
                pad_token_id=engine.tokenizer.pad_token_id,
            )
        assert r.text == engine.tokenizer.decode(ref[0, len(ids) :], skip_special_tokens=True)


def test_seed_reproducible_inside_a_mixed_batch(engine: HFEngine) -> None:
    seeded = chat("tell me a story", SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=1234))
    rng = torch.get_rng_state()
    alone = engine.generate_sync(seeded).text
    others = [
        chat("noise", SamplingParams(temperature=1.0, max_new_tokens=20)),
        chat("more noise", SamplingParams(temperature=0.0, max_new_tokens=20), "a"),
        chat("tell me a story", SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=99)),
    ]

    async def mixed():
        runs = [asyncio.ensure_future(engine.generate(r)) for r in others]
        await asyncio.sleep(0.02)  # the seeded row joins a batch that is already decoding
        return await engine.generate(seeded), await asyncio.gather(*runs)

    together, rest = asyncio.run(mixed())
    assert together.text == alone
    assert rest[2].text != alone  # a different seed really samples differently
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG was never reseeded nor advanced


def test_cancelled_stream_leaves_the_batch_within_one_step(engine: HFEngine) -> None:
    before = engine.engine_stats()

    async def go() -> None:
        stream = engine.stream(chat("go on and on", SamplingParams(temperature=0.0, max_new_tokens=400)))
        n = 0
        async for d in stream:
            n += bool(d.text)
            if n == 2:
                break
        await stream.aclose()

    asyncio.run(go())
    deadline = time.monotonic() + 10
    while engine.engine_stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    after = engine.engine_stats()
    assert after["running"] == 0 and after["waiting"] == 0
    assert after["aborted"] == before["aborted"] + 1
    assert after["max_steps_after_cancel"] <= 1
    assert after["tokens"] - before["tokens"] < 400


def test_logprobs_match_a_reference_forward(engine: HFEngine) -> None:
    req = GenerationRequest(
        prompt="fever and cough", params=SamplingParams(temperature=0.0, max_new_tokens=6, logprobs=3)
    )
    r = engine.generate_sync(req)
    assert r.logprobs is not None and len(r.logprobs) == r.completion_tokens
    ids = engine.render(req)
    gen = [e["id"] for e in r.logprobs]
    with engine.model.disable_adapter():
        logits = engine.model(input_ids=torch.tensor([ids + gen])).logits[0].float()
    ref = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)  # (T, V): the distribution each token came from
    for t, e in enumerate(r.logprobs):
        assert e["logprob"] == pytest.approx(float(ref[t, e["id"]]), abs=1e-4)
        assert [a["id"] for a in e["top_logprobs"]] == ref[t].topk(3).indices.tolist()
        assert e["id"] == int(ref[t].argmax())  # greedy picked the top token
    assert engine.generate_sync(chat("fever")).logprobs is None


def test_logits_processor_hook_steers_each_row(engine: HFEngine) -> None:
    seen: list[list[int]] = []

    class Force:
        def __init__(self, token: int) -> None:
            self.token = token

        def process(self, token_ids_so_far: list[int], logits: torch.Tensor) -> torch.Tensor:
            seen.append(list(token_ids_so_far))
            out = torch.full_like(logits, float("-inf"))
            out[self.token] = 0.0
            return out

    forced = engine.tokenizer.convert_tokens_to_ids("a")
    p = SamplingParams(temperature=0.0, max_new_tokens=4, logprobs=0)
    hooked = GenerationRequest(prompt="hello", params=p, logits_processor=Force(forced))
    plain = GenerationRequest(prompt="hello", params=p)
    r_hooked, r_plain = engine.generate_batch_sync([hooked, plain])
    assert [e["id"] for e in r_hooked.logprobs] == [forced] * 4
    assert [e["id"] for e in r_plain.logprobs] != [forced] * 4  # the hook steered only its own row
    assert seen == [[], [forced], [forced] * 2, [forced] * 3]


def test_every_generation_config_eos_id_stops(zoo: Path, tmp_path: Path) -> None:
    """A checkpoint may list several stop ids in generation_config; every one of them ends the answer."""
    import json
    import shutil

    model = tmp_path / "two-eos"
    shutil.copytree(zoo / "general", model)
    e = HFEngine(EngineConfig(model=str(model)))
    req = GenerationRequest(prompt="hello", params=SamplingParams(temperature=0.0, max_new_tokens=12, logprobs=0))
    free = [x["id"] for x in e.generate_sync(req).logprobs]
    e.close()
    cfg_path = model / "generation_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token_id"] = [cfg["eos_token_id"], free[2]]  # the third token it generates becomes a stop id
    cfg_path.write_text(json.dumps(cfg))
    e2 = HFEngine(EngineConfig(model=str(model)))
    assert e2.stop_ids == {e2.tokenizer.eos_token_id, free[2]}
    r = e2.generate_sync(req)
    e2.close()
    assert [x["id"] for x in r.logprobs] == free[: free.index(free[2]) + 1]
    assert r.finish_reason == "stop" and r.completion_tokens <= 3


def test_incremental_detokenizer_equals_full_decode(engine: HFEngine) -> None:
    from deployments.engines.detok import IncrementalDetokenizer

    tok = engine.tokenizer
    ids = tok("héllo wörld, 日本語 fever\ntabs\tand ünïcödé")["input_ids"] + list(range(3, 200, 7))

    class Slow:  # no fast backend: exercises the windowed fallback
        def decode(self, xs, skip_special_tokens=True):
            return tok.decode(xs, skip_special_tokens=skip_special_tokens)

    for t in (tok, Slow()):
        d = IncrementalDetokenizer(t)
        assert "".join(d.step(i) for i in ids) == tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
