"""vLLM backend on CPU: the pure mappings, backend selection, and the engine over a protocol-true fake.

vLLM needs CUDA, so the fake below implements exactly the AsyncLLM surface the engine calls
(from_engine_args, generate(prompt, sampling_params, request_id, lora_request=...), abort, shutdown)
and records what it was given. It also processes multimodal token prompts the way vLLM does for a
LLaVA-architecture model (the one multimodal processor it implements) and raises what vLLM raises.
The real engine is checked by scripts/gpu_smoke.py on a GPU.
"""

from __future__ import annotations

import asyncio
import enum
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypedDict

import pytest
from PIL import Image

from deployments.config import EngineConfig
from deployments.engines.base import EngineInputError, GenerationRequest, SamplingParams
from deployments.engines.hf import HFEngine
from deployments.engines.select import BackendUnavailableError, choose_backend, model_architectures
from deployments.engines.vllm import (
    VLLM_DEFAULT_MM_LIMIT,
    ImagePlaceholder,
    LoRARegistry,
    VLLMEngine,
    engine_args_kwargs,
    find_image_placeholder,
    finish_reason,
    image_limit,
    sampling_kwargs,
    vllm_prompt,
)

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
    limit_mm_per_prompt: dict[str, Any] = field(default_factory=dict)  # {"image": 4} or {"image": {"count": 4}}
    mm_processor_kwargs: dict[str, Any] | None = None


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
    prompt_token_ids: list[int] | None = None  # as vLLM processed them: image placeholders expanded


class FakeTokensPrompt(TypedDict, total=False):  # vllm.inputs.data.TokensPrompt (the fields we may send)
    prompt_token_ids: list[int]
    multi_modal_data: dict[str, Any]
    mm_processor_kwargs: dict[str, Any]


# Architectures whose multimodal processing the fake implements (vLLM's registry knows many more).
FAKE_MM_ARCHS = {"LlavaForConditionalGeneration"}


class FakeEngineGenerateError(Exception):  # vllm.v1.engine.exceptions.EngineGenerateError
    pass


class FakeAsyncLLM:
    """Emits max_tokens words "w<lora id>_<i>" one step at a time, honouring output_kind."""

    instances: ClassVar[list[FakeAsyncLLM]] = []
    # Newer AsyncLLM.generate re-raises only VLLMClientError as it is and wraps other errors of
    # add_request as `raise EngineGenerateError() from e`; older ones re-raised every ValueError.
    wrap_errors = False

    def __init__(self, args: FakeAsyncEngineArgs) -> None:
        self.args, self.calls, self.aborted = args.__dict__, [], []
        self.inflight = self.max_inflight = 0
        cfg_file = Path(args.model) / "config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.multimodal = bool(set(cfg.get("architectures") or []) & FAKE_MM_ARCHS)
        if self.multimodal:  # LLaVA: one <image> token becomes (image_size // patch_size)^2 feature tokens
            vision = cfg["vision_config"]
            self.image_token = cfg["image_token_index"]
            self.image_features = (vision["image_size"] // vision["patch_size"]) ** 2
        FakeAsyncLLM.instances.append(self)

    def process(self, prompt: dict[str, Any]) -> list[int]:
        """vLLM's input processing of a TokensPrompt: the prompt ids it will run, or its error."""
        ids = list(prompt["prompt_token_ids"])
        mm = prompt.get("multi_modal_data")
        if not mm:
            return ids
        if not self.multimodal:  # vllm/multimodal/registry.py, MultiModalRegistry.create_processor
            raise ValueError(f"{self.args['model']} is not a multimodal model")
        images = mm.get("image", [])
        images = images if isinstance(images, list) else [images]
        limit = self.args["limit_mm_per_prompt"].get("image", VLLM_DEFAULT_MM_LIMIT)
        limit = limit["count"] if isinstance(limit, dict) else limit
        if len(images) > limit:  # processing/context.py, validate_num_items (LLaVA supports any number)
            raise ValueError(f"At most {limit} image(s) may be provided in one prompt.")
        out, k = [], 0
        for t in ids:  # processing/processor.py, _apply_matches: the first n targets, the rest left as they are
            if t == self.image_token and k < len(images):
                out += [t] * self.image_features
                k += 1
            else:
                out.append(t)
        if k < len(images):  # processing/processor.py, _apply_prompt_updates
            raise AssertionError(f"Failed to apply prompt replacement for mm_items['image'][{k}]")
        return out

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
        try:
            prompt_ids = self.process(prompt)  # raised at the first iteration, as AsyncLLM.add_request does
        except Exception as e:
            if self.wrap_errors:
                raise FakeEngineGenerateError() from e
            raise
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
                    yield RequestOutput(request_id, [c], last, prompt_ids)
                elif last:
                    lps = None if k is None else [self._logprobs(j, k)[0] for j in range(len(words))]
                    c = Completion("".join(words), list(range(len(words))), "length", lps)
                    yield RequestOutput(request_id, [c], True, prompt_ids)
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
    TokensPrompt=FakeTokensPrompt,
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
        assert vengine.engine.inflight == 0  # vLLM's output generator is closed at once, not when collected

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


# ---- images: the multimodal mapping ---------------------------------------------------------------

LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_VL_TEMPLATE = (  # Qwen2-VL's shape: each image part is <|vision_start|><|image_pad|><|vision_end|>
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(specials: list[str]):
    """A real byte-level BPE tokenizer trained here in milliseconds, with the given special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=base + specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(["USER: what is in this picture? ASSISTANT: a cat on a mat. Describe it."] * 8, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", additional_special_tokens=specials
    )


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaVA checkpoint directory without weights: config, tokenizer and processor, all real and saved.

    The vLLM engine never loads HF weights (vLLM does), so this is everything it reads.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = tmp_path_factory.mktemp("vlm")
    tok = tiny_tokenizer(["<image>"])
    images = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        chat_template=LLAVA_TEMPLATE,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    text = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    vision = CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids("<image>"))
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.save_pretrained(out)
    return out


def image_chat(text: str, n_images: int, n_parts: int | None = None, n: int = 3) -> GenerationRequest:
    parts = [{"type": "image"}] * (n_images if n_parts is None else n_parts) + [{"type": "text", "text": text}]
    images = tuple(Image.new("RGB", (20 + i, 30), (i * 40, 0, 0)) for i in range(n_images))
    return GenerationRequest(
        messages=({"role": "user", "content": parts},),
        params=SamplingParams(temperature=0, max_new_tokens=n),
        images=images,
    )


def test_image_limit_follows_vllms_format() -> None:
    assert image_limit({}) == VLLM_DEFAULT_MM_LIMIT == 999  # vLLM's default per modality
    assert image_limit({"limit_mm_per_prompt": {"image": 2}}) == 2
    assert image_limit({"limit_mm_per_prompt": {"image": {"count": 3, "width": 64, "height": 64}}}) == 3
    assert image_limit({"limit_mm_per_prompt": {"video": 1}}) == 999
    assert image_limit({"limit_mm_per_prompt": {"image": 0}}) == 0
    for bad, shown in [({"image": -1}, "-1"), ({"image": "2"}, "'2'"), ([2], r"\[2\]"), ({"image": True}, "True")]:
        with pytest.raises(EngineInputError, match=rf"limit_mm_per_prompt.*{shown}"):
            image_limit({"limit_mm_per_prompt": bad})


def test_placeholder_is_what_the_template_renders_for_an_image_part(zoo: Path) -> None:
    from deployments.engines.hf import render_prompt

    def probe(tok, image_token: str | None = None) -> ImagePlaceholder | None:
        special = set(tok.all_special_ids)
        image_id = tok.convert_tokens_to_ids(image_token) if image_token else None
        return find_image_placeholder(
            lambda m: render_prompt(tok, GenerationRequest(messages=m), 10_000, unexpanded_image_parts=True),
            special,
            image_id,
        )

    llava = tiny_tokenizer(["<image>"])
    llava.chat_template = LLAVA_TEMPLATE
    assert probe(llava, "<image>") == ImagePlaceholder((llava.convert_tokens_to_ids("<image>"),), ())

    qwen = tiny_tokenizer(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    qwen.chat_template = QWEN_VL_TEMPLATE
    ids = tuple(sorted(qwen.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")))
    assert probe(qwen, "<|image_pad|>") == ImagePlaceholder(ids, ())
    # A processor image token the template never renders (Gemma 3's soft token) is reserved: never in a prompt.
    gemma_like = probe(qwen, "<|im_end|>")
    assert gemma_like is not None and gemma_like.reserved_ids == (qwen.convert_tokens_to_ids("<|im_end|>"),)

    from transformers import AutoTokenizer

    text_only = AutoTokenizer.from_pretrained(str(zoo / "general"))  # its template prints a content list as text
    assert probe(text_only) is None
    text_only.chat_template = "{{ messages[0]['content'] + 1 }}"  # a template that cannot take content lists
    assert probe(text_only) is None


def test_vllm_prompt_maps_images_and_checks_counts() -> None:
    ph = ImagePlaceholder((7, 8), reserved_ids=(9,))
    a, b = Image.new("RGB", (4, 4)), Image.new("RGB", (5, 5))
    assert vllm_prompt([1, 2], (), None, 999) == {"prompt_token_ids": [1, 2]}  # text: no multi_modal_data key
    assert vllm_prompt([1, 7, 8, 7, 8], (), ph, 0) == {"prompt_token_ids": [1, 7, 8, 7, 8]}
    out = vllm_prompt([1, 7, 8, 3, 7, 8], (a, b), ph, 2)
    assert out == {"prompt_token_ids": [1, 7, 8, 3, 7, 8], "multi_modal_data": {"image": [a, b]}}
    assert out["multi_modal_data"]["image"][0] is a  # the very images, in order
    with pytest.raises(EngineInputError, match=r"does not (take|accept) images"):
        vllm_prompt([1, 2], (a,), None, 999)
    with pytest.raises(EngineInputError, match="2 images in one request; this model accepts at most 1"):
        vllm_prompt([1, 7, 8, 7, 8], (a, b), ph, 1)
    with pytest.raises(EngineInputError, match="holds 1 image placeholders for 2 images"):
        vllm_prompt([1, 7, 8, 3], (a, b), ph, 2)
    with pytest.raises(EngineInputError, match="holds 2 image placeholders for 1 images"):
        vllm_prompt([7, 8, 7, 8], (a,), ph, 2)
    with pytest.raises(EngineInputError, match="holds 2 image placeholders"):  # half a placeholder typed in
        vllm_prompt([7, 8, 7], (a,), ph, 2)
    with pytest.raises(EngineInputError, match="must not contain the model's image placeholder tokens"):
        vllm_prompt([7, 8, 9], (a,), ph, 2)


def test_image_request_reaches_vllm_as_multi_modal_data(vlm: Path) -> None:
    from transformers import AutoProcessor

    engine = VLLMEngine(EngineConfig(model=str(vlm), engine_kwargs={"limit_mm_per_prompt": {"image": 2}}), FAKE_API)
    assert engine.engine.args["limit_mm_per_prompt"] == {"image": 2}  # passed through to AsyncEngineArgs
    req = image_chat("what is in this picture?", 2)
    r = asyncio.run(engine.generate(req))
    prompt, _, _ = engine.engine.calls[-1]
    assert prompt["multi_modal_data"]["image"] == list(req.images)
    assert all(x is y for x, y in zip(prompt["multi_modal_data"]["image"], req.images, strict=True))
    # The token ids are the processor's chat template, tokenized without expanding the placeholders.
    processor = AutoProcessor.from_pretrained(str(vlm))
    text = processor.apply_chat_template(list(req.messages), add_generation_prompt=True, tokenize=False)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt["prompt_token_ids"] == ids and ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 2
    # vLLM expands each <image> into (16 // 8)^2 = 4 feature tokens, and the usage reports that count.
    assert r.prompt_tokens == len(ids) + 2 * (4 - 1) and r.text == " w0_0 w0_1 w0_2"

    async def go():
        return [d async for d in engine.stream(req)]

    deltas = asyncio.run(go())
    assert "".join(d.text for d in deltas) == r.text and deltas[-1].prompt_tokens == r.prompt_tokens
    plain = asyncio.run(engine.generate(chat("hello")))  # a text request to the same model: no image data
    assert "multi_modal_data" not in engine.engine.calls[-1][0] and plain.completion_tokens == 4


def test_image_errors_are_client_errors(vlm: Path, zoo: Path) -> None:
    engine = VLLMEngine(EngineConfig(model=str(vlm), engine_kwargs={"limit_mm_per_prompt": {"image": 2}}), FAKE_API)
    cases = [
        (image_chat("x", 3), "3 images in one request; this model accepts at most 2"),
        (image_chat("is <image> here?", 1), "holds 2 image placeholders for 1 images"),  # typed placeholder
        (image_chat("x", 2, n_parts=1), "holds 1 image placeholders for 2 images"),
        (GenerationRequest(prompt="x", images=(Image.new("RGB", (4, 4)),)), "need chat messages"),
    ]
    for req, msg in cases:
        with pytest.raises(EngineInputError, match=msg):
            asyncio.run(engine.generate(req))
    assert engine.engine.calls == []  # none of them reached vLLM
    text_only = VLLMEngine(EngineConfig(model=str(zoo / "general")), FAKE_API)
    assert text_only.placeholder is None
    with pytest.raises(EngineInputError, match=r"does not (take|accept) images"):
        asyncio.run(text_only.generate(image_chat("x", 1)))


def test_vllm_side_input_errors_become_client_errors(vlm: Path) -> None:
    """Defence in depth: a ValueError vLLM raises while adding a request is a 400, as in vLLM's own server."""
    engine = VLLMEngine(EngineConfig(model=str(vlm)), FAKE_API)
    engine.engine.multimodal = False  # vLLM built the model text-only (e.g. a different architecture)

    async def streamed():
        return [d async for d in engine.stream(image_chat("x", 1))]

    for wrap in (False, True):  # re-raised as it is, or wrapped in EngineGenerateError (newer vLLM)
        engine.engine.wrap_errors = wrap
        with pytest.raises(EngineInputError, match=r"vLLM rejected the request: .* is not a multimodal model"):
            asyncio.run(engine.generate(image_chat("x", 1)))
        with pytest.raises(EngineInputError, match="is not a multimodal model"):
            asyncio.run(streamed())
    # Anything else stays a server error: our own count check switched off, vLLM's assertion reaches us.
    engine.engine.multimodal, engine.placeholder = True, ImagePlaceholder(())
    with pytest.raises(FakeEngineGenerateError) as err:
        asyncio.run(engine.generate(image_chat("x", 1, n_parts=0)))
    assert isinstance(err.value.__cause__, AssertionError)


def test_image_limit_on_a_text_model_is_a_startup_error(zoo: Path) -> None:
    cfg = EngineConfig(model=str(zoo / "general"), engine_kwargs={"limit_mm_per_prompt": {"image": 2}})
    started = len(FakeAsyncLLM.instances)
    with pytest.raises(EngineInputError, match="renders no image placeholder"):
        VLLMEngine(cfg, FAKE_API)
    assert len(FakeAsyncLLM.instances) == started  # failed before loading the model into vLLM
    cfg = EngineConfig(model=str(zoo / "general"), engine_kwargs={"limit_mm_per_prompt": {"image": 0}})
    assert VLLMEngine(cfg, FAKE_API).image_limit == 0  # "no images" is a fine thing to say


def test_fake_processes_multimodal_prompts_like_vllm(vlm: Path, zoo: Path) -> None:
    """The fake's own contract, so the engine tests above mean something: vLLM's checks and expansion."""
    img = Image.new("RGB", (4, 4))
    llava = FakeAsyncLLM(FakeAsyncEngineArgs(model=str(vlm), limit_mm_per_prompt={"image": {"count": 1}}))
    tok = llava.image_token
    assert llava.process({"prompt_token_ids": [5, tok, 6]}) == [5, tok, 6]  # no image data: nothing expanded
    assert llava.process({"prompt_token_ids": [5, tok, 6], "multi_modal_data": {"image": img}}) == [5] + [tok] * 4 + [6]
    # More placeholders than images: vLLM fills the first and leaves the rest as plain tokens.
    assert llava.process({"prompt_token_ids": [tok, tok], "multi_modal_data": {"image": [img]}}) == [tok] * 5
    with pytest.raises(ValueError, match=r"At most 1 image\(s\) may be provided in one prompt"):
        llava.process({"prompt_token_ids": [tok, tok], "multi_modal_data": {"image": [img, img]}})
    with pytest.raises(AssertionError, match=r"Failed to apply prompt replacement for mm_items\['image'\]\[0\]"):
        llava.process({"prompt_token_ids": [5, 6], "multi_modal_data": {"image": [img]}})
    text = FakeAsyncLLM(FakeAsyncEngineArgs(model=str(zoo / "general")))
    with pytest.raises(ValueError, match="general is not a multimodal model"):
        text.process({"prompt_token_ids": [5], "multi_modal_data": {"image": [img]}})
    with pytest.raises(TypeError, match="limit_mm_per_promt"):  # a typo is rejected, as AsyncEngineArgs does
        FakeAsyncEngineArgs(model="m", limit_mm_per_promt={"image": 1})
