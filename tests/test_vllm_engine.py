"""vLLM backend on CPU: the pure mappings, backend selection, and the engine over a protocol-true fake.

vLLM needs CUDA, so the fake below implements exactly the AsyncLLM surface the engine calls
(from_engine_args, generate(prompt, sampling_params, request_id, lora_request=...), abort, shutdown)
and records what it was given. The real engine is checked by scripts/gpu_smoke.py on a GPU.
"""

from __future__ import annotations

import asyncio
import enum
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from deployments.config import EngineConfig
from deployments.engines.base import EngineInputError, GenerationRequest, SamplingParams
from deployments.engines.hf import HFEngine
from deployments.engines.select import BackendUnavailableError, choose_backend, model_architectures
from deployments.engines.vllm import LoRARegistry, VLLMEngine, engine_args_kwargs, finish_reason, sampling_kwargs

# ---- pure mappings --------------------------------------------------------------------------------


def test_engine_args_mapping(zoo: Path) -> None:
    adapters = {"b": str(zoo / "adapters" / "lora-b"), "a": str(zoo / "adapters" / "lora-a")}
    cfg = EngineConfig(
        model="org/model",
        quantization="nf4",
        dtype="bfloat16",
        adapters=adapters,
        engine_kwargs={"max_model_len": 4096, "gpu_memory_utilization": 0.8, "max_loras": 4},
    )
    kw = engine_args_kwargs(cfg)
    assert kw["model"] == "org/model" and kw["dtype"] == "bfloat16"
    assert kw["quantization"] == "bitsandbytes"
    assert kw["trust_remote_code"] is False
    assert kw["enable_lora"] is True
    assert kw["max_lora_rank"] == 8  # zoo adapters have r=4; vLLM takes powers of two >= 8
    assert kw["max_loras"] == 4  # explicit engine_kwargs win over derived values
    assert kw["max_model_len"] == 4096 and kw["gpu_memory_utilization"] == 0.8
    plain = engine_args_kwargs(EngineConfig(model="m"))
    assert "enable_lora" not in plain and "quantization" not in plain and "max_model_len" not in plain
    with pytest.raises(EngineInputError, match="int8"):
        engine_args_kwargs(EngineConfig(model="m", quantization="int8"))


def test_sampling_mapping() -> None:
    greedy = sampling_kwargs(SamplingParams(temperature=0.0, top_p=0.5, max_new_tokens=7, stop=("\n",), seed=3))
    assert greedy == {
        "max_tokens": 7,
        "stop": ["\n"],
        "seed": 3,
        "temperature": 0.0,
        "top_p": 1.0,
        "skip_special_tokens": True,
        "logprobs": None,
    }
    sampled = sampling_kwargs(SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=5))
    assert sampled["temperature"] == 0.8 and sampled["top_p"] == 0.9 and sampled["seed"] is None


def test_lora_ids_are_stable_and_checked() -> None:
    a = LoRARegistry({"zeta": "/z", "alpha": "/a", "mid": "/m"})
    b = LoRARegistry({"mid": "/m", "alpha": "/a", "zeta": "/z"})
    assert a.ids == b.ids == {"alpha": 1, "mid": 2, "zeta": 3}
    assert a.request_kwargs("mid") == {"lora_name": "mid", "lora_int_id": 2, "lora_path": "/m"}
    assert a.request_kwargs(None) is None
    with pytest.raises(EngineInputError, match="unknown adapter 'x'"):
        a.request_kwargs("x")


def test_finish_reason_mapping() -> None:
    assert finish_reason("length") == "length"
    assert finish_reason("stop") == finish_reason("abort") == finish_reason(None) == "stop"


# ---- backend selection ----------------------------------------------------------------------------

ARCHS = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}


@pytest.mark.parametrize(
    ("requested", "quant", "archs", "gpu", "model_archs", "expected", "why"),
    [
        ("auto", "none", ARCHS, True, ["LlamaForCausalLM"], "vllm", "supports"),
        ("auto", "none", None, True, ["LlamaForCausalLM"], "hf", "not installed"),
        ("auto", "none", ARCHS, False, ["LlamaForCausalLM"], "hf", "no CUDA GPU"),
        ("auto", "none", ARCHS, True, ["T5ForConditionalGeneration"], "hf", "does not support"),
        ("auto", "int8", ARCHS, True, ["LlamaForCausalLM"], "hf", "int8"),
        ("auto", "nf4", ARCHS, True, [], "vllm", "supports"),
        ("hf", "none", ARCHS, True, ["LlamaForCausalLM"], "hf", "backend: hf"),
        ("vllm", "none", ARCHS, True, ["LlamaForCausalLM"], "vllm", "backend: vllm"),
    ],
)
def test_choose_backend(requested, quant, archs, gpu, model_archs, expected, why) -> None:
    backend, reason = choose_backend(requested, quant, archs, gpu, model_archs)
    assert backend == expected
    assert why in reason


def test_forced_vllm_where_it_cannot_run_is_a_clear_startup_error() -> None:
    with pytest.raises(BackendUnavailableError, match="vllm is not installed; no CUDA GPU is present"):
        choose_backend("vllm", "none", None, False, ["LlamaForCausalLM"])


def test_auto_picks_hf_here(zoo: Path) -> None:
    from deployments.engines.select import select_engine_class

    assert model_architectures(str(zoo / "code")) == ["LlamaForCausalLM"]
    assert select_engine_class(EngineConfig(model=str(zoo / "code"))) is HFEngine
    with pytest.raises(BackendUnavailableError):
        select_engine_class(EngineConfig(model=str(zoo / "code"), backend="vllm"))


# ---- the engine over a protocol-true fake ---------------------------------------------------------


class RequestOutputKind(enum.IntEnum):  # vllm.sampling_params.RequestOutputKind
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class FakeSamplingParams:
    output_kind: RequestOutputKind
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    skip_special_tokens: bool = True
    logprobs: int | None = None
    structured_outputs: FakeStructuredOutputsParams | None = None


@dataclass
class FakeStructuredOutputsParams:  # vllm.sampling_params.StructuredOutputsParams (the fields we use)
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


@dataclass
class FakeAsyncEngineArgs:
    """A subset of vllm.engine.arg_utils.AsyncEngineArgs, a dataclass, so an unknown name is a TypeError
    exactly as with vLLM. Field names are vLLM's (EngineArgs in vllm/engine/arg_utils.py)."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    quantization: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_logprobs: int = 20
    enforce_eager: bool = False
    tensor_parallel_size: int = 1


@dataclass
class FakeLogprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, FakeLogprob]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[Completion]
    finished: bool


class FakeAsyncLLM:
    """Emits max_tokens words "w<lora id>_<i>" one step at a time, honouring output_kind."""

    instances: ClassVar[list[FakeAsyncLLM]] = []

    def __init__(self, args: FakeAsyncEngineArgs) -> None:
        self.args, self.calls, self.aborted = args.__dict__, [], []
        self.inflight = self.max_inflight = 0
        FakeAsyncLLM.instances.append(self)

    @classmethod
    def from_engine_args(cls, args: FakeAsyncEngineArgs) -> FakeAsyncLLM:
        return cls(args)

    @staticmethod
    def _logprobs(i: int, k: int | None) -> list[dict[int, FakeLogprob]] | None:
        # Token i gets logprob -i/10; its alternatives rank behind it, as vLLM reports sampled + top-k.
        if k is None:
            return None
        options = {i: FakeLogprob(-i / 10, 1, f" w_{i}")}
        options.update({1000 + j: FakeLogprob(-i / 10 - 1 - j, 2 + j, f"alt{j}") for j in range(k)})
        return [options]

    async def generate(self, prompt, sampling_params, request_id, lora_request=None):
        self.calls.append((prompt, sampling_params, lora_request))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            lid = lora_request.lora_int_id if lora_request else 0
            words = [f" w{lid}_{i}" for i in range(sampling_params.max_tokens)]
            k = sampling_params.logprobs
            for i in range(len(words)):
                await asyncio.sleep(0.001)
                last = i == len(words) - 1
                if sampling_params.output_kind == RequestOutputKind.DELTA:
                    c = Completion(words[i], [i], "length" if last else None, self._logprobs(i, k))
                    yield RequestOutput(request_id, [c], last)
                elif last:
                    lps = None if k is None else [self._logprobs(j, k)[0] for j in range(len(words))]
                    c = Completion("".join(words), list(range(len(words))), "length", lps)
                    yield RequestOutput(request_id, [c], True)
        finally:
            self.inflight -= 1

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        pass


FAKE_API = types.SimpleNamespace(
    AsyncLLM=FakeAsyncLLM,
    AsyncEngineArgs=FakeAsyncEngineArgs,
    SamplingParams=FakeSamplingParams,
    LoRARequest=FakeLoRARequest,
    TokensPrompt=lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids},
    RequestOutputKind=RequestOutputKind,
    StructuredOutputsParams=FakeStructuredOutputsParams,
)


@pytest.fixture()
def vengine(zoo: Path) -> VLLMEngine:
    adapters = {"a": str(zoo / "adapters" / "lora-a"), "b": str(zoo / "adapters" / "lora-b")}
    return VLLMEngine(EngineConfig(model=str(zoo / "general"), adapters=adapters, max_prompt_tokens=100), FAKE_API)


def chat(text: str, adapter: str | None = None, n: int = 4) -> GenerationRequest:
    return GenerationRequest(
        messages=({"role": "user", "content": text},),
        params=SamplingParams(temperature=0, max_new_tokens=n),
        adapter=adapter,
    )


def test_generate_maps_request_onto_vllm(vengine: VLLMEngine, zoo: Path) -> None:
    r = asyncio.run(vengine.generate(chat("hello", adapter="b")))
    assert r.text == " w2_0 w2_1 w2_2 w2_3" and r.completion_tokens == 4 and r.finish_reason == "length"
    prompt, sp, lora = vengine.engine.calls[-1]
    hf_ids = HFEngine(EngineConfig(model=str(zoo / "general"))).render(chat("hello"))
    assert prompt["prompt_token_ids"] == hf_ids == vengine.render(chat("hello"))  # same chat template path
    assert r.prompt_tokens == len(hf_ids)
    assert sp.output_kind == RequestOutputKind.FINAL_ONLY and sp.temperature == 0 and sp.max_tokens == 4
    assert lora == FakeLoRARequest("b", 2, str(zoo / "adapters" / "lora-b"))
    assert vengine.engine.args["enable_lora"] is True


def test_batch_and_base_model(vengine: VLLMEngine) -> None:
    out = asyncio.run(vengine.generate_batch([chat("x"), chat("y", "a", n=2)]))
    assert [o.text for o in out] == [" w0_0 w0_1 w0_2 w0_3", " w1_0 w1_1"]


def test_stream_deltas_concatenate_and_count(vengine: VLLMEngine) -> None:
    async def go():
        return [d async for d in vengine.stream(chat("hi", "a", n=5))]

    deltas = asyncio.run(go())
    assert "".join(d.text for d in deltas) == asyncio.run(vengine.generate(chat("hi", "a", n=5))).text
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 5
    assert vengine.engine.calls[0][1].output_kind == RequestOutputKind.DELTA
    assert vengine.engine.aborted == []


def test_client_disconnect_aborts_the_request(vengine: VLLMEngine) -> None:
    async def go() -> None:
        stream = vengine.stream(chat("hi", n=50))
        async for _ in stream:
            break  # the client went away after one token
        await stream.aclose()

    asyncio.run(go())
    assert len(vengine.engine.aborted) == 1


def test_errors_are_client_errors(vengine: VLLMEngine) -> None:
    with pytest.raises(EngineInputError, match="unknown adapter"):
        asyncio.run(vengine.generate(chat("hi", adapter="zzz")))
    with pytest.raises(EngineInputError, match="accepts at most 100"):
        asyncio.run(vengine.generate(chat("fever " * 300)))


def test_unknown_engine_kwargs_are_rejected_like_vllm(zoo: Path) -> None:
    cfg = EngineConfig(model=str(zoo / "general"), engine_kwargs={"max_num_seq": 4})  # typo of max_num_seqs
    with pytest.raises(EngineInputError, match=r"max_num_seq.*unexpected keyword argument 'max_num_seq'"):
        VLLMEngine(cfg, FAKE_API)
    ok = VLLMEngine(EngineConfig(model=str(zoo / "general"), max_num_seqs=48), FAKE_API)
    assert ok.engine.args["max_num_seqs"] == 48


def test_logprobs_map_from_vllm(vengine: VLLMEngine) -> None:
    req = GenerationRequest(prompt="hi", params=SamplingParams(temperature=0, max_new_tokens=3, logprobs=2))
    r = asyncio.run(vengine.generate(req))
    assert vengine.engine.calls[-1][1].logprobs == 2
    assert [e["logprob"] for e in r.logprobs] == [0.0, -0.1, -0.2]
    # top_logprobs are the k best by rank, the sampled token (rank 1 here) included, as OpenAI reports them
    assert [t["token"] for t in r.logprobs[1]["top_logprobs"]] == [" w_1", "alt0"]

    async def go():
        return [d async for d in vengine.stream(req)]

    streamed = [e for d in asyncio.run(go()) for e in (d.logprobs or [])]
    assert streamed == r.logprobs
    plain = asyncio.run(vengine.generate(chat("x", n=2)))
    assert plain.logprobs is None


def test_specialist_sends_every_request_straight_into_vllm(zoo: Path) -> None:
    """No @serve.batch in front: 32 concurrent calls are all inside AsyncLLM at once (not 8 at a time)."""
    from deployments.config import SpecialistConfig
    from deployments.specialist import SpecialistDeployment, SpecialistGroup

    class FakeVLLM(VLLMEngine):
        def __init__(self, config: EngineConfig) -> None:
            super().__init__(config, FAKE_API)

    group = SpecialistGroup([SpecialistConfig(name="gen", model=str(zoo / "general"))], FakeVLLM)
    payload = {"specialist": "gen", "prompt": "hi", "max_tokens": 20, "temperature": 0}

    async def go():
        return await asyncio.gather(*(group.generate(payload) for _ in range(32)))

    out = asyncio.run(go())
    assert all(o["completion_tokens"] == 20 for o in out)
    assert group.engine.engine.max_inflight == 32
    # The deployment has no batching wrapper left: its generate is the group's, one request at a time.
    assert not any(
        hasattr(getattr(SpecialistDeployment, n, None), "set_max_batch_size") for n in dir(SpecialistDeployment)
    )


def test_response_format_maps_onto_structured_outputs(vengine: VLLMEngine) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    rf = json.dumps({"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    req = GenerationRequest(prompt="x", params=SamplingParams(temperature=0, max_new_tokens=2, response_format=rf))
    asyncio.run(vengine.generate(req))
    assert vengine.engine.calls[-1][1].structured_outputs == FakeStructuredOutputsParams(json=schema)
    asyncio.run(vengine.generate(chat("plain")))
    assert vengine.engine.calls[-1][1].structured_outputs is None  # unconstrained requests stay so
