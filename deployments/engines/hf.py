"""Hugging Face transformers engine: causal LM with optional NF4 4-bit weights and peft LoRA adapters."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from deployments import metrics
from deployments.config import EngineConfig
from deployments.engines.base import (
    EngineInputError,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamDelta,
    resolve_device,
    resolve_dtype,
    safe_stream_prefix,
    truncate_at_stop,
)
from fusion.synthesizer import TokenSink

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch

# Used when a tokenizer ships no chat template: readable by any LM, ends where the answer begins.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def quantization_config(kind: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """bitsandbytes settings: NF4 with double quantization (QLoRA's recipe), or LLM.int8()."""
    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(config: EngineConfig) -> PreTrainedTokenizerBase:
    """Tokenizer padded on the left (decoder-only batches) with a chat template always present."""
    tok = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if config.chat_template is not None:
        tok.chat_template = config.chat_template
    elif not getattr(tok, "chat_template", None):
        logger.info("tokenizer of %s has no chat template; using the plain fallback", config.model)
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def render_prompt(tokenizer: PreTrainedTokenizerBase, request: GenerationRequest, max_prompt_tokens: int) -> list[int]:
    """Prompt token ids, shared by every engine: chat template for messages, raw text for completions."""
    if request.prompt_ids is not None:
        return list(request.prompt_ids)
    if request.messages is not None:
        text = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
    if len(ids) == 0:
        raise EngineInputError("the prompt is empty after tokenization")
    if len(ids) > max_prompt_tokens:
        raise EngineInputError(f"the prompt is {len(ids)} tokens; this model accepts at most {max_prompt_tokens}")
    return ids


def load_causal_lm(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The base model, quantized if asked, with every configured adapter attached (inactive)."""
    quant = quantization_config(config.quantization, dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": config.trust_remote_code,
        "use_safetensors": True,
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(config.model, **kwargs)
    if quant is None:
        model.to(device)
    if config.adapters:
        from peft import PeftModel  # imported lazily: only adapter users pay for it

        names = list(config.adapters)
        model = PeftModel.from_pretrained(model, config.adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(config.adapters[name], adapter_name=name)
    model.eval()
    return model


class _Cancelled(StoppingCriteria):
    """Stops generation when the client went away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class HFEngine:
    """Engine protocol over transformers `generate`; one generation at a time per model, batched."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(config)
        self.model = load_causal_lm(config, self.device, self.dtype)
        self.adapters = frozenset(config.adapters)
        model_ctx = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self.context_length = int(model_ctx)
        self.max_prompt_tokens = min(config.max_prompt_tokens, self.context_length - 1)
        # One generate at a time per model: throughput comes from batching, not threads.
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        self.load = metrics.EngineLoad()  # running batch / waiting queue gauges (no-op outside Serve)
        logger.info(
            "loaded %s on %s (%s, quantization=%s, adapters=%s) in %.1fs",
            config.model,
            self.device,
            self.dtype,
            config.quantization,
            sorted(self.adapters),
            time.perf_counter() - t0,
        )

    # ---- prompt rendering -------------------------------------------------------------------------

    def render(self, request: GenerationRequest) -> list[int]:
        """Token ids of the prompt: chat template for messages, raw text for completions."""
        return render_prompt(self.tokenizer, request, self.max_prompt_tokens)

    def _max_new(self, prompt_len: int, params: SamplingParams) -> int:
        # Clip to the context window rather than fail: the answer can still end with "length".
        return max(1, min(params.max_new_tokens, self.context_length - prompt_len))

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            raise EngineInputError(f"unknown adapter {adapter!r}; this model has {sorted(self.adapters)}")

    def _generate_kwargs(
        self, params: SamplingParams, max_new: int, adapters: Sequence[str | None] = ()
    ) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if params.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=None)
        if params.stop:
            kw.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if self.adapters:
            # peft picks each row's adapter itself, so no global "active adapter" state is touched.
            kw["adapter_names"] = [a or BASE_ADAPTER for a in adapters]
        return kw

    # ---- blocking core ----------------------------------------------------------------------------

    def _finish(self, new_ids: list[int], prompt_len: int, max_new: int, params: SamplingParams) -> GenerationResult:
        """Cut at the first EOS/pad and at the first stop string; count what was generated."""
        stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        end = next((i for i, t in enumerate(new_ids) if t in stop_ids), None)
        kept = new_ids if end is None else new_ids[: end + 1]
        text, hit_stop = truncate_at_stop(self.tokenizer.decode(kept, skip_special_tokens=True), params.stop)
        finish = "stop" if (end is not None or hit_stop or len(kept) < max_new) else "length"
        return GenerationResult(text=text, prompt_tokens=prompt_len, completion_tokens=len(kept), finish_reason=finish)

    def generate_batch_sync(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate many requests: one left-padded batch per sampling setting, adapters mixed within it."""
        rendered = []
        for r in requests:
            self._check_adapter(r.adapter)
            rendered.append(self.render(r))
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            p = r.params
            # A seeded sampled request runs alone so its output never depends on its batch mates.
            solo = i if (p.seed is not None and not p.greedy) else None
            # peft runs rows with different adapters in one forward (adapter_names), so with adapters
            # loaded, requests of every adapter share a batch; LoRA deltas are applied per row.
            key = (p.greedy, p.temperature, p.top_p, p.stop, p.seed, solo)
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            params = requests[idx[0]].params
            ids = [rendered[i] for i in idx]
            max_news = [self._max_new(len(x), requests[i].params) for x, i in zip(ids, idx, strict=True)]
            batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(self.device)
            width = batch["input_ids"].shape[1]
            kwargs = self._generate_kwargs(params, max(max_news), [requests[i].adapter for i in idx])
            with self._lock, torch.inference_mode():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                out = self.model.generate(**batch, **kwargs)
            for row, i in enumerate(idx):
                # Per-row cap: greedy and causal, so a shorter cap is exactly a prefix of the longer run.
                new_ids = out[row, width:].tolist()[: max_news[row]]
                results[i] = self._finish(new_ids, len(ids[row]), max_news[row], requests[i].params)
        return [r for r in results if r is not None]

    def generate_sync(self, request: GenerationRequest) -> GenerationResult:
        return self.generate_batch_sync([request])[0]

    def _stream_worker(
        self,
        request: GenerationRequest,
        ids: list[int],
        on_token: Callable[[int], None],
        cancel: threading.Event,
    ) -> int:
        max_new = self._max_new(len(ids), request.params)
        kw = self._generate_kwargs(request.params, max_new, [request.adapter])
        kw["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        kw["streamer"] = TokenSink(on_token)
        input_ids = torch.tensor([ids], device=self.device)
        with self._lock, torch.inference_mode():
            if request.params.seed is not None:
                torch.manual_seed(request.params.seed)
            self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw)
        return max_new

    # ---- async protocol ---------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return (await self.generate_batch([request]))[0]

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        loop = asyncio.get_running_loop()
        n = len(requests)
        self.load.change(waiting=n)

        def run() -> list[GenerationResult]:
            self.load.change(running=n, waiting=-n)
            try:
                return self.generate_batch_sync(list(requests))
            finally:
                self.load.change(running=-n)

        return await loop.run_in_executor(self._executor, run)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Yield text deltas as tokens arrive; they concatenate to what `generate` returns."""
        self._check_adapter(request.adapter)
        ids = self.render(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        cancel = threading.Event()
        stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}

        def on_token(t: int) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, t)

        def run() -> int:
            self.load.change(running=1, waiting=-1)
            try:
                return self._stream_worker(request, ids, on_token, cancel)
            finally:
                self.load.change(running=-1)
                loop.call_soon_threadsafe(queue.put_nowait, None)

        self.load.change(waiting=1)
        future = loop.run_in_executor(self._executor, run)
        tokens: list[int] = []
        emitted = 0
        finished_by_stop = False
        try:
            while True:
                t = await queue.get()
                if t is None:
                    break
                if finished_by_stop:
                    continue
                tokens.append(t)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                text, hit = truncate_at_stop(text, request.params.stop)
                if hit or t in stop_ids:
                    finished_by_stop = True
                    cancel.set()
                    if len(text) > emitted:
                        yield StreamDelta(text=text[emitted:])
                        emitted = len(text)
                    continue
                # Hold back a partial UTF-8 character and anything that may become a stop string.
                safe = safe_stream_prefix(text.rstrip("\ufffd"), request.params.stop)
                if safe > emitted:
                    yield StreamDelta(text=text[emitted:safe])
                    emitted = safe
            max_new = await future
            final = self._finish(tokens, len(ids), max_new, request.params)
            if len(final.text) > emitted:
                yield StreamDelta(text=final.text[emitted:])
            yield StreamDelta(
                text="",
                finish_reason=final.finish_reason,
                prompt_tokens=final.prompt_tokens,
                completion_tokens=final.completion_tokens,
            )
        finally:
            cancel.set()  # the consumer left (or we are done): let the worker stop early

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model is not loaded")

    def close(self) -> None:
        """Free the model and its memory; safe to call twice."""
        if getattr(self, "model", None) is None:
            return
        self.model = None
        self._executor.shutdown(wait=False)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
