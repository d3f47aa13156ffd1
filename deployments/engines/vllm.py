"""vLLM engine (AsyncLLM, continuous batching, multi-LoRA) behind the same protocol as the HF engine.

The translation from our config and sampling parameters to vLLM's is kept in pure functions
(`engine_args_kwargs`, `sampling_kwargs`, `LoRARegistry`, `image_limit`, `find_image_placeholder`,
`vllm_prompt`) that are unit-tested on CPU; the engine itself needs CUDA and is checked by
scripts/gpu_smoke.py on a GPU node.

Images (vision-language models) go to vLLM as `multi_modal_data={"image": [PIL images]}` on the same
`TokensPrompt` as text (vllm/inputs/data.py: TokensPrompt has prompt_token_ids, multi_modal_data,
mm_processor_kwargs). With a *token* prompt vLLM runs the HF processor on the images only and then
expands each image's placeholder in our token ids itself (vllm/multimodal/processing: for a
`list[int]` prompt `_apply_hf_processor_main` returns is_update_applied=False, then
`_apply_prompt_updates` replaces the model's target, e.g. one `<|image_pad|>` for Qwen2.5-VL or one
`<image>` for LLaVA, by the image's feature tokens). So our ids must hold the *unexpanded* placeholder
exactly as the model's chat template renders a `{"type": "image"}` part, once per image; fewer fails
inside vLLM ("Failed to apply prompt replacement"), more are silently left in the prompt as plain
tokens. `vllm_prompt` checks the count before vLLM sees the request, so a mismatch is a 400.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import types
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.config import EngineConfig
from deployments.engines.base import (
    EngineInputError,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamDelta,
    token_logprob,
)

logger = logging.getLogger(__name__)

# Our names -> vLLM's: bitsandbytes NF4 is vLLM's in-flight "bitsandbytes" quantization.
_QUANTIZATION = {"none": None, "nf4": "bitsandbytes"}
_DTYPE = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def adapter_rank(path: str) -> int | None:
    """LoRA rank r from a peft adapter_config.json (None when unreadable, e.g. a hub id)."""
    cfg = Path(path).expanduser() / "adapter_config.json"
    try:
        return int(json.loads(cfg.read_text())["r"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        return None


def engine_args_kwargs(config: EngineConfig) -> dict[str, Any]:
    """Keyword arguments for vllm.engine.arg_utils.AsyncEngineArgs; explicit engine_kwargs win."""
    if config.quantization not in _QUANTIZATION:
        raise EngineInputError(f"quantization {config.quantization!r} is not supported by the vllm backend")
    kw: dict[str, Any] = {
        "model": config.model,
        "tokenizer": config.model,
        "dtype": _DTYPE[config.dtype],
        "trust_remote_code": config.trust_remote_code,
        "max_num_seqs": config.max_num_seqs,
    }
    quant = _QUANTIZATION[config.quantization]
    if quant is not None:
        kw["quantization"] = quant
    if config.adapters:
        ranks = [r for r in (adapter_rank(p) for p in config.adapters.values()) if r is not None]
        kw["enable_lora"] = True
        kw["max_loras"] = len(config.adapters)
        # vLLM sizes its LoRA buffers by max_lora_rank; it accepts powers of two (8, 16, 32, ...).
        need = max(ranks, default=16)
        kw["max_lora_rank"] = next(r for r in (8, 16, 32, 64, 128, 256, 512) if r >= need)
    kw.update(config.engine_kwargs)
    return kw


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for vllm.SamplingParams (the engine adds output_kind: DELTA when streaming)."""
    return {
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop),
        "seed": params.seed,
        "temperature": params.temperature,
        "top_p": 1.0 if params.greedy else params.top_p,
        "skip_special_tokens": True,
        "logprobs": params.logprobs,  # vLLM returns the sampled token's logprob plus this many top ones
    }


def structured_outputs_kwargs(params: SamplingParams) -> dict[str, Any] | None:
    """Keyword arguments for vllm.sampling_params.StructuredOutputsParams, or None when unconstrained."""
    if params.response_format is None:
        return None
    from deployments.engines.structured import vllm_structured_outputs  # xgrammar comes with vLLM

    return vllm_structured_outputs(json.loads(params.response_format))


# vLLM's per-modality default when limit_mm_per_prompt leaves a modality out
# (vllm/config/multimodal.py, MultiModalConfig.get_limit_per_prompt).
VLLM_DEFAULT_MM_LIMIT = 999


def image_limit(engine_kwargs: dict[str, Any]) -> int:
    """Images one prompt may carry under engine_kwargs' limit_mm_per_prompt (vLLM's own format).

    vLLM takes `{"image": 4}` or `{"image": {"count": 4, "width": ..., "height": ...}}`
    (EngineArgs.limit_mm_per_prompt -> MultiModalConfig.limit_per_prompt); unset means 999.
    """
    raw = engine_kwargs.get("limit_mm_per_prompt")
    if raw is None:
        return VLLM_DEFAULT_MM_LIMIT
    if not isinstance(raw, dict):
        raise EngineInputError(f"engine_kwargs.limit_mm_per_prompt must be a mapping like {{image: 4}}, got {raw!r}")
    value = raw.get("image", VLLM_DEFAULT_MM_LIMIT)
    count = value.get("count", VLLM_DEFAULT_MM_LIMIT) if isinstance(value, dict) else value
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise EngineInputError(f"engine_kwargs.limit_mm_per_prompt.image must be a count >= 0, got {value!r}")
    return count


@dataclass(frozen=True)
class ImagePlaceholder:
    """The token ids the chat template renders for one `{"type": "image"}` part, and ids never allowed."""

    token_ids: tuple[int, ...]  # special tokens appearing exactly once per image (Qwen: vision_start, pad, end)
    reserved_ids: tuple[int, ...] = ()  # the processor's image token where the template does not render it


# A one-image and a no-image user turn that differ only by the image part: what the template adds for
# the part is the placeholder.
_PROBE_TEXT = {"type": "text", "text": "Describe it."}
_PROBE_WITH = ({"role": "user", "content": [{"type": "image"}, _PROBE_TEXT]},)
_PROBE_WITHOUT = ({"role": "user", "content": [_PROBE_TEXT]},)


def find_image_placeholder(
    render: Callable[[tuple[dict[str, Any], ...]], list[int]],
    special_ids: set[int],
    image_token_id: int | None = None,
) -> ImagePlaceholder | None:
    """Probe a chat template: the special tokens one image part adds, or None (the model takes no images).

    Only special tokens count: they tokenize atomically and do not merge with the text around them,
    so their number in a prompt is the number of rendered image parts.
    """
    try:
        extra = Counter(render(_PROBE_WITH)) - Counter(render(_PROBE_WITHOUT))
    except Exception:  # a text-only template may reject content lists outright: no image support
        return None
    ids = tuple(sorted(t for t, n in extra.items() if n == 1 and t in special_ids))
    if not ids:
        return None
    reserved = () if image_token_id is None or image_token_id in ids else (image_token_id,)
    return ImagePlaceholder(ids, reserved)


def vllm_prompt(
    ids: list[int], images: Sequence[Any], placeholder: ImagePlaceholder | None, limit: int
) -> dict[str, Any]:
    """Keyword arguments for vllm.inputs.TokensPrompt: the token ids, plus the images when there are any.

    Checks what vLLM would otherwise reject late or get wrong, as client errors: images for a model
    that takes none, more images than limit_mm_per_prompt, and placeholder counts that do not match
    the images (e.g. placeholder text such as "<image>" typed into a message, which the tokenizer
    turns into the placeholder token).
    """
    if not images:
        return {"prompt_token_ids": ids}
    n = len(images)
    if placeholder is None:
        raise EngineInputError("this model does not take images (its chat template renders no image placeholder)")
    if n > limit:
        raise EngineInputError(f"{n} images in one request; this model accepts at most {limit} (limit_mm_per_prompt)")
    for tid in placeholder.token_ids:
        found = ids.count(tid)
        if found != n:
            raise EngineInputError(
                f"the prompt holds {found} image placeholders for {n} images: every image needs exactly one "
                "image content part, and message text must not contain the model's image placeholder tokens"
            )
    if any(tid in ids for tid in placeholder.reserved_ids):
        raise EngineInputError("message text must not contain the model's image placeholder tokens")
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": list(images)}}


def logprob_entries(token_ids: Sequence[int], logprobs: Sequence[dict] | None, k: int | None) -> list[dict] | None:
    """vLLM's SampleLogprobs (per token: {token_id: Logprob(logprob, rank, decoded_token)}) -> ours."""
    if logprobs is None or k is None:
        return None
    out = []
    for tid, options in zip(token_ids, logprobs, strict=False):
        chosen = options[tid]
        ranked = sorted(
            ((i, lp) for i, lp in options.items() if lp.rank is not None and lp.rank <= k), key=lambda x: x[1].rank
        )
        top = [
            {
                "token": lp.decoded_token or "",
                "id": i,
                "logprob": lp.logprob,
                "bytes": list((lp.decoded_token or "").encode("utf-8")),
            }
            for i, lp in ranked
        ]
        out.append(token_logprob(chosen.decoded_token or "", tid, chosen.logprob, top))
    return out


class LoRARegistry:
    """Adapter name -> stable integer id (1-based, by sorted name) so every replica agrees."""

    def __init__(self, adapters: dict[str, str]) -> None:
        self.paths = dict(adapters)
        self.ids = {name: i for i, name in enumerate(sorted(adapters), start=1)}

    def request_kwargs(self, name: str | None) -> dict[str, Any] | None:
        """Keyword arguments for vllm.lora.request.LoRARequest, or None for the base model."""
        if name is None:
            return None
        if name not in self.ids:
            raise EngineInputError(f"unknown adapter {name!r}; this model has {sorted(self.ids)}")
        return {"lora_name": name, "lora_int_id": self.ids[name], "lora_path": self.paths[name]}


def finish_reason(vllm_reason: str | None) -> str:
    # vLLM says "stop" (EOS or a stop string), "length", or "abort"; an aborted request ended early.
    return "length" if vllm_reason == "length" else "stop"


def prompt_length(output: Any, ids: list[int]) -> int:
    """Prompt tokens as vLLM counted them: with images, its RequestOutput.prompt_token_ids are expanded."""
    expanded = getattr(output, "prompt_token_ids", None)
    return len(expanded) if expanded else len(ids)


async def _input_errors(gen: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """vLLM validates a request's inputs when it is added, i.e. before the first output, and raises
    ValueError (VLLMValidationError is one) for what the client got wrong, as its own OpenAI server
    answers with 400; those become EngineInputError. Depending on the version, AsyncLLM.generate
    re-raises such a ValueError as it is or wraps it (`raise EngineGenerateError() from e`), so the
    cause is looked at too. Errors after the first output are not the input's."""
    started = False
    try:
        async for out in gen:
            started = True
            yield out
    except Exception as err:
        cause = err if isinstance(err, ValueError) else err.__cause__
        if started or not isinstance(cause, ValueError) or isinstance(cause, EngineInputError):
            raise
        raise EngineInputError(f"vLLM rejected the request: {cause}") from None
    finally:
        close = getattr(gen, "aclose", None)
        if close is not None:  # closing vLLM's generator aborts a request still running (GeneratorExit)
            await close()


def real_vllm_api() -> types.SimpleNamespace:
    """The vLLM names this engine uses, imported lazily (vLLM needs CUDA)."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.v1.engine.async_llm import AsyncLLM

    return types.SimpleNamespace(
        AsyncLLM=AsyncLLM,
        AsyncEngineArgs=AsyncEngineArgs,
        SamplingParams=VSamplingParams,
        LoRARequest=LoRARequest,
        TokensPrompt=TokensPrompt,
        RequestOutputKind=RequestOutputKind,
        StructuredOutputsParams=StructuredOutputsParams,
    )


class VLLMEngine:
    """Engine protocol over vLLM's AsyncLLM: vLLM batches continuously, so batches are just concurrency."""

    def __init__(self, config: EngineConfig, api: types.SimpleNamespace | None = None) -> None:
        from deployments.engines.hf import load_tokenizer

        self.config = config
        self.api = api or real_vllm_api()
        self.loras = LoRARegistry(config.adapters)
        kwargs = engine_args_kwargs(config)
        try:
            args = self.api.AsyncEngineArgs(**kwargs)
        except TypeError as err:  # vLLM's AsyncEngineArgs is a dataclass: an unknown name is a TypeError
            raise EngineInputError(
                f"engine_kwargs {sorted(config.engine_kwargs)}: vLLM's AsyncEngineArgs rejected them: {err}"
            ) from None
        # Same tokenizer and chat template handling as the HF engine, so both render prompts identically.
        self.tokenizer = load_tokenizer(config)
        self.image_limit = image_limit(config.engine_kwargs)
        self.placeholder = self._image_placeholder(config)
        if self.placeholder is None and "limit_mm_per_prompt" in config.engine_kwargs and self.image_limit > 0:
            raise EngineInputError(
                f"engine_kwargs.limit_mm_per_prompt allows images, but the chat template of {config.model} "
                "renders no image placeholder: is it a vision-language model?"
            )
        # Last: loading the model onto the GPU is the slow part, and every check above fails before it.
        self.engine = self.api.AsyncLLM.from_engine_args(args)
        max_len = config.engine_kwargs.get("max_model_len") or getattr(self.tokenizer, "model_max_length", 0)
        self.context_length = int(max_len) if max_len and max_len < 1 << 24 else config.max_prompt_tokens + 1
        self.max_prompt_tokens = min(config.max_prompt_tokens, self.context_length - 1)
        logger.info("vLLM engine for %s ready (adapters=%s)", config.model, sorted(self.loras.ids))

    def _image_placeholder(self, config: EngineConfig) -> ImagePlaceholder | None:
        """A vision-language model's placeholder, found by probing its processor's chat template."""
        from transformers import AutoProcessor

        from deployments.engines.hf import render_prompt

        try:  # a text-only checkpoint gives back its tokenizer here (or nothing loadable): no images
            processor = AutoProcessor.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.info("no processor for %s (%r): text only", config.model, err)
            return None
        image_token = getattr(processor, "image_token", None)
        if image_token is None or getattr(processor, "tokenizer", None) is None:
            return None
        # The template that renders image parts is the processor's (chat_template.jinja of a VLM); an
        # explicit chat_template in config still wins, as for text models.
        if config.chat_template is None and getattr(processor, "chat_template", None):
            self.tokenizer.chat_template = processor.chat_template
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        placeholder = find_image_placeholder(
            lambda msgs: render_prompt(
                self.tokenizer, GenerationRequest(messages=msgs), 1 << 30, unexpanded_image_parts=True
            ),
            special,
            image_token_id if isinstance(image_token_id, int) else None,
        )
        logger.info("%s takes images: placeholder ids %s", config.model, placeholder)
        return placeholder

    def render(self, request: GenerationRequest) -> list[int]:
        from deployments.engines.hf import render_prompt

        if request.images and request.messages is None:
            raise EngineInputError("images need chat messages with image content parts, not a raw prompt")
        # A vision-language model keeps its image parts as unexpanded placeholders (vLLM expands them);
        # a text-only one flattens text parts and refuses images like the HF engine.
        return render_prompt(
            self.tokenizer, request, self.max_prompt_tokens, unexpanded_image_parts=self.placeholder is not None
        )

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """The request with its prompt ids rendered once (vLLM processes the images itself)."""
        if request.prompt_ids is not None:
            return request
        return dataclasses.replace(request, prompt_ids=tuple(self.render(request)))

    def _submit(self, request: GenerationRequest, stream: bool) -> tuple[str, Any, list[int]]:
        ids = self.render(request)
        prompt = vllm_prompt(ids, request.images, self.placeholder, self.image_limit)
        kw = sampling_kwargs(request.params)
        kw["max_tokens"] = max(1, min(kw["max_tokens"], self.context_length - len(ids)))
        kind = self.api.RequestOutputKind.DELTA if stream else self.api.RequestOutputKind.FINAL_ONLY
        structured = structured_outputs_kwargs(request.params)
        if structured is not None:
            kw["structured_outputs"] = self.api.StructuredOutputsParams(**structured)
        sampling = self.api.SamplingParams(output_kind=kind, **kw)
        lora_kw = self.loras.request_kwargs(request.adapter)
        lora = self.api.LoRARequest(**lora_kw) if lora_kw else None
        request_id = uuid.uuid4().hex
        gen = self.engine.generate(self.api.TokensPrompt(**prompt), sampling, request_id, lora_request=lora)
        return request_id, _input_errors(gen), ids

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        request_id, gen, ids = self._submit(request, stream=False)
        final = None
        try:
            async for out in gen:
                final = out
        except asyncio.CancelledError:
            await self.engine.abort(request_id)
            raise
        if final is None:
            raise RuntimeError(f"vLLM returned no output for request {request_id}")
        c = final.outputs[0]
        lps = logprob_entries(c.token_ids, getattr(c, "logprobs", None), request.params.logprobs)
        n_prompt = prompt_length(final, ids)
        return GenerationResult(c.text, n_prompt, len(c.token_ids), finish_reason(c.finish_reason), lps)

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        request_id, gen, ids = self._submit(request, stream=True)
        produced = 0
        done = False
        try:
            async for out in gen:
                c = out.outputs[0]
                produced += len(c.token_ids)
                lps = logprob_entries(c.token_ids, getattr(c, "logprobs", None), request.params.logprobs)
                if c.text or lps:
                    yield StreamDelta(text=c.text, logprobs=lps)
                    lps = None  # sent with the text; the final delta carries only what is left
                if out.finished:
                    done = True
                    yield StreamDelta(
                        text="",
                        logprobs=lps,
                        finish_reason=finish_reason(c.finish_reason),
                        prompt_tokens=prompt_length(out, ids),
                        completion_tokens=produced,
                    )
        finally:
            if not done:  # the client disconnected (or we were cancelled): free the sequence's KV cache
                await self.engine.abort(request_id)
            await gen.aclose()  # and close vLLM's output generator now, not whenever it is collected

    def check_health(self) -> None:
        if getattr(self.engine, "errored", False):
            raise RuntimeError("vLLM engine is dead")

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
