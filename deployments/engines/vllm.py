"""vLLM engine (AsyncLLM, continuous batching, multi-LoRA) behind the same protocol as the HF engine.

The translation from our config and sampling parameters to vLLM's is kept in pure functions
(`engine_args_kwargs`, `sampling_kwargs`, `LoRARegistry`) that are unit-tested on CPU; the engine
itself needs CUDA and is checked by scripts/gpu_smoke.py on a GPU node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import types
import uuid
from collections.abc import AsyncIterator, Sequence
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
        self.engine = self.api.AsyncLLM.from_engine_args(args)
        # Same tokenizer and chat template handling as the HF engine, so both render prompts identically.
        self.tokenizer = load_tokenizer(config)
        max_len = config.engine_kwargs.get("max_model_len") or getattr(self.tokenizer, "model_max_length", 0)
        self.context_length = int(max_len) if max_len and max_len < 1 << 24 else config.max_prompt_tokens + 1
        self.max_prompt_tokens = min(config.max_prompt_tokens, self.context_length - 1)
        logger.info("vLLM engine for %s ready (adapters=%s)", config.model, sorted(self.loras.ids))

    def render(self, request: GenerationRequest) -> list[int]:
        from deployments.engines.hf import render_prompt

        return render_prompt(self.tokenizer, request, self.max_prompt_tokens)

    def _submit(self, request: GenerationRequest, stream: bool) -> tuple[str, Any, list[int]]:
        ids = self.render(request)
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
        gen = self.engine.generate(self.api.TokensPrompt(prompt_token_ids=ids), sampling, request_id, lora_request=lora)
        return request_id, gen, ids

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
        return GenerationResult(c.text, len(ids), len(c.token_ids), finish_reason(c.finish_reason), lps)

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
                        prompt_tokens=len(ids),
                        completion_tokens=produced,
                    )
        finally:
            if not done:  # the client disconnected (or we were cancelled): free the sequence's KV cache
                await self.engine.abort(request_id)

    def check_health(self) -> None:
        if getattr(self.engine, "errored", False):
            raise RuntimeError("vLLM engine is dead")

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
