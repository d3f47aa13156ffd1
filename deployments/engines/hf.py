"""Hugging Face transformers engine: continuous batching over a causal LM (optional NF4 weights, peft LoRA per row)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
)

from deployments import metrics
from deployments.config import EngineConfig
from deployments.engines.base import (
    EngineInputError,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    StreamDelta,
    content_text,
    resolve_device,
    resolve_dtype,
)
from deployments.engines.detok import TextAssembler
from deployments.engines.sampling import RowSampler, next_tokens
from deployments.engines.scheduler import Scheduler
from deployments.engines.scheduler import Sequence as Seq

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


def load_processor(config: EngineConfig) -> Any:
    """An image-text-to-text model's processor (image processor + tokenizer + chat template with image
    placeholders); the config's chat_template overrides the checkpoint's."""
    processor = AutoProcessor.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    if config.chat_template is not None:
        processor.chat_template = config.chat_template
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"the processor of {config.model} has no chat template: set chat_template in the config")
    return processor


def load_tokenizer(config: EngineConfig, tok: PreTrainedTokenizerBase | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer padded on the left (decoder-only batches) with a chat template always present."""
    if tok is None:
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


def _image_parts(messages: Sequence[dict[str, Any]]) -> int:
    return sum(
        1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p.get("type") == "image"
    )


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    request: GenerationRequest,
    max_prompt_tokens: int,
    processor: Any = None,
    *,
    unexpanded_image_parts: bool = False,
) -> list[int]:
    """Prompt token ids, shared by every engine (see render_prompt_and_images)."""
    return render_prompt_and_images(
        tokenizer, request, max_prompt_tokens, processor, unexpanded_image_parts=unexpanded_image_parts
    )[0]


def render_prompt_and_images(
    tokenizer: PreTrainedTokenizerBase,
    request: GenerationRequest,
    max_prompt_tokens: int,
    processor: Any = None,
    *,
    unexpanded_image_parts: bool = False,
) -> tuple[list[int], dict[str, torch.Tensor] | None]:
    """Prompt token ids (chat template for messages, raw text for completions) and the model's image inputs.

    With a processor (HF image-text-to-text models), messages render through its chat template as
    content parts, each image placeholder expands to the model's image tokens, and the processor's
    pixel inputs come back with the ids (None without images). With `unexpanded_image_parts` (vLLM,
    which expands placeholders itself), content parts go through the tokenizer's template as they are,
    so each image part leaves one unexpanded placeholder; the caller checks the counts.
    """
    if request.prompt_ids is not None:
        return list(request.prompt_ids), request.image_inputs
    image_inputs = None
    if request.messages is not None and processor is not None:
        ids, image_inputs = _render_multimodal(processor, tokenizer, request)
    elif request.messages is not None:
        messages = list(request.messages)
        if not unexpanded_image_parts:
            if request.images or _image_parts(messages):
                raise EngineInputError("this model does not accept images (its modalities are [text])")
            # Content parts with text only (the engine contract allows them) are plain text to a text model.
            messages = [{**m, "content": content_text(m["content"])} for m in messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        if request.images:
            raise EngineInputError("images come with chat messages, not with a completion prompt")
        ids = tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
    if len(ids) == 0:
        raise EngineInputError("the prompt is empty after tokenization")
    if len(ids) > max_prompt_tokens:
        raise EngineInputError(f"the prompt is {len(ids)} tokens; this model accepts at most {max_prompt_tokens}")
    return ids, image_inputs


def _render_multimodal(
    processor: Any, tokenizer: PreTrainedTokenizerBase, request: GenerationRequest
) -> tuple[list[int], dict[str, torch.Tensor] | None]:
    assert request.messages is not None
    n_parts = _image_parts(request.messages)
    if n_parts != len(request.images):
        raise EngineInputError(f"{n_parts} image placeholder(s) in the messages but {len(request.images)} image(s)")
    # A placeholder typed as text would pair an image with the wrong tokens (or leave a count mismatch that
    # fails the forward of the whole prefill): the text may not contain the processor's image tokens.
    specials = [t for t in (getattr(processor, "image_token", None), getattr(processor, "video_token", None)) if t]
    for m in request.messages:
        text = content_text(m["content"])
        hit = next((t for t in specials if t in text), None)
        if hit is not None:
            raise EngineInputError(f"message text may not contain the model's image placeholder {hit!r}")
    # Every template of an image-text-to-text model reads content as a list of parts.
    messages = [
        {**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]}
        for m in request.messages
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not request.images:
        return tokenizer(text, add_special_tokens=False)["input_ids"], None
    try:
        out = processor(text=[text], images=list(request.images), add_special_tokens=False, return_tensors="pt")
    except (ValueError, TypeError) as err:
        raise EngineInputError(f"the images could not be prepared for this model: {str(err)[:200]}") from None
    # One processor call gives both: the expanded ids, and the pixel inputs (pixel_values, and image_sizes
    # etc. where the model has them) that the prefill needs; the tokenizer's own outputs are not image inputs.
    text_keys = set(tokenizer.model_input_names)
    images = {k: v for k, v in out.items() if k not in text_keys and isinstance(v, torch.Tensor)}
    return out["input_ids"][0].tolist(), images


def load_causal_lm(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The base model (an image-text-to-text model when the config accepts images), quantized if asked,
    with every configured adapter attached (inactive)."""
    quant = quantization_config(config.quantization, dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": config.trust_remote_code,
        "use_safetensors": True,
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device)}
    auto = AutoModelForImageTextToText if config.accepts_images else AutoModelForCausalLM
    model = auto.from_pretrained(config.model, **kwargs)
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


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every id that ends an answer: the checkpoint's generation_config (often several) and the tokenizer's eos."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


MAX_BUDGET_INTERVAL_S = 1.0  # the budget never spaces deltas further apart (stall timeouts are seconds)


def stream_interval(base_s: float, deltas_per_s: float | None, streaming_rows: int) -> float:
    """Seconds between two deltas of one stream: at least `base_s`, and with a replica budget of
    `deltas_per_s` shared by `streaming_rows` streams, at least streaming_rows / deltas_per_s (at most
    MAX_BUDGET_INTERVAL_S), so the replica's total delta rate stays bounded however many streams it runs."""
    if not deltas_per_s or streaming_rows <= 0:
        return base_s
    return max(base_s, min(streaming_rows / deltas_per_s, MAX_BUDGET_INTERVAL_S))


def set_thread_priority(priority: str) -> str:
    """Put the calling thread under `priority` ('idle': Linux SCHED_IDLE; 'normal': unchanged) and return
    the policy read back ('idle', 'normal', or 'normal' where the system does not have SCHED_IDLE).

    Linux keeps the policy per thread and threads started from this one (torch's OpenMP workers for
    its parallel regions) inherit it; the rest of the process keeps its own.
    """
    idle = getattr(os, "SCHED_IDLE", None)
    if priority == "idle" and idle is not None:
        try:
            os.sched_setscheduler(0, idle, os.sched_param(0))  # 0: the calling thread
        except OSError as err:  # a sandbox that forbids it: decoding still runs, at normal priority
            logger.warning("could not put the decoding thread under SCHED_IDLE: %s", err)
    if idle is not None and os.sched_getscheduler(0) == idle:
        return "idle"
    return "normal"


Sink = Callable[[StreamDelta | BaseException], None]


@dataclass(eq=False)
class _Row:
    """What the runner keeps per request: its prompt, sampler, text assembly and where results go."""

    request: GenerationRequest
    prompt_ids: list[int]
    sink: Sink
    sampler: RowSampler
    text: TextAssembler
    streamed: bool = True  # False: one delivery at the end (no event-loop wake-up per token)
    image_inputs: dict[str, torch.Tensor] | None = None  # pixel_values (and friends) for the prefill only
    pending_text: str = ""
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)
    next_delta_at: float = 0.0  # streams: monotonic time before which new text is held back (0: the first at once)


class _Batch:
    """The running rows' KV cache, left-padded to one width: rows join by padding, leave by indexing."""

    def __init__(self, seqs: list[Seq], cache: Any, mask: torch.Tensor, pos: torch.Tensor, last: torch.Tensor):
        self.seqs = seqs  # row order of every tensor below
        self.cache = cache  # DynamicCache, layers of (B, H, T, D)
        self.mask = mask  # (B, T) 1 for real tokens, 0 for left padding
        self.pos = pos  # (B,) position id of the next token fed
        self.last = last  # (B,) the next token to feed (sampled last step)

    def _layers(self) -> list[Any]:
        layers = getattr(self.cache, "layers", None)
        if layers is None or any(not hasattr(layer, "keys") for layer in layers):
            raise RuntimeError(f"unsupported KV cache {type(self.cache).__name__}: need per-layer keys/values")
        return layers

    def keep(self, rows: list[int]) -> None:
        """Keep these rows (in this order), then drop left columns that are padding in every row."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.seqs = [self.seqs[i] for i in rows]
        self.mask, self.pos, self.last = self.mask[idx], self.pos[idx], self.last[idx]
        used = self.mask.any(dim=0).nonzero()
        cut = int(used[0]) if len(used) else self.mask.shape[1]
        self.mask = self.mask[:, cut:]
        for layer in self._layers():
            if layer.keys is not None and layer.keys.numel():
                layer.keys, layer.values = layer.keys[idx, :, cut:], layer.values[idx, :, cut:]

    def extend(self, other: _Batch) -> None:
        """Append other's rows, left-padding whichever side is shorter in time."""
        t = max(self.mask.shape[1], other.mask.shape[1])

        def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = t - x.shape[dim]
            if missing == 0:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        for mine, theirs in zip(self._layers(), other._layers(), strict=True):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
        self.seqs += other.seqs
        self.pos = torch.cat([self.pos, other.pos])
        self.last = torch.cat([self.last, other.last])


@dataclass
class EngineStats:
    """Counters of the decoding loop; tests and benches read them to see batching and cancellation."""

    steps: int = 0  # decoding steps (each runs a prefill and/or a decode forward)
    forwards: int = 0
    tokens: int = 0
    prefilled_rows: int = 0
    max_batch: int = 0  # most rows in one decode forward
    batch_sizes: Counter = field(default_factory=Counter)  # decode rows per step -> how many steps
    finished: int = 0
    aborted: int = 0  # rows dropped because their request was cancelled
    max_steps_after_cancel: int = 0  # forwards a cancelled row still took part in (0 or 1 by design)
    errors: int = 0
    busy_s: float = 0.0  # wall time spent inside steps (idle waiting excluded)
    deltas: int = 0  # stream deltas handed to consumers (each one a wake-up of the caller's loop and a hop out)
    decode_thread_id: int | None = None  # the decoding thread's native id (Linux TID), set when it starts
    decode_thread_priority: str | None = None  # its scheduling policy as read back: "idle" or "normal"

    def snapshot(self, running: int, waiting: int) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "batch_sizes"}
        d["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        return {**d, "running": running, "waiting": waiting}


class HFEngine:
    """Engine protocol over a transformers causal LM with iteration-level (continuous) batching.

    One background thread per engine drives decoding steps; a `Scheduler` decides who runs each
    step, rows join and leave at token boundaries, and every row keeps its own sampling, stop
    strings, adapter (peft `adapter_names`) and token budget. Results go back through callbacks
    that the async side turns into asyncio queues.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        t0 = time.perf_counter()
        # Image-text-to-text models: the processor renders chat with image placeholders and turns images
        # into pixel_values; its tokenizer is the engine's tokenizer.
        self.processor = load_processor(config) if config.accepts_images else None
        self.tokenizer = load_tokenizer(config, self.processor.tokenizer if self.processor is not None else None)
        self.model = load_causal_lm(config, self.device, self.dtype)
        self.adapters = frozenset(config.adapters)
        model_ctx = getattr(self.model.config.get_text_config(), "max_position_embeddings", None) or 1 << 30
        self.context_length = int(model_ctx)
        self.max_prompt_tokens = min(config.max_prompt_tokens, self.context_length - 1)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.scheduler = Scheduler(config.max_num_seqs, max(config.max_prompt_tokens, 4096))
        self.stats = EngineStats()
        self._batch: _Batch | None = None
        self._structured: Any = None  # the StructuredCompiler, built on the first constrained request
        self._load = (-1, -1)  # (running, waiting) last reported to the gauges
        self._delta_interval = config.stream_interval_s  # this step's interval between two deltas of a stream
        self._now = 0.0  # monotonic time of this step's emission
        self._clock: Callable[[], float] = time.monotonic  # paces stream deltas (tests give it a step clock)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="hf-engine", daemon=True)
        self._thread.start()
        logger.info(
            "loaded %s on %s (%s, quantization=%s, adapters=%s, modalities=%s, stop ids=%s) in %.1fs",
            config.model,
            self.device,
            self.dtype,
            config.quantization,
            sorted(self.adapters),
            config.modalities,
            sorted(self.stop_ids),
            time.perf_counter() - t0,
        )

    # ---- requests in --------------------------------------------------------------------------------

    def render(self, request: GenerationRequest) -> list[int]:
        """Token ids of the prompt: chat template for messages, raw text for completions."""
        return list(self.prepare(request).prompt_ids or ())

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """The request rendered once: its prompt ids and, with images, the model's pixel inputs (the image
        processor runs here, once, where the caller chose to run it: the specialist does it off its loop)."""
        if request.prompt_ids is not None and (request.image_inputs is not None or not request.images):
            return request
        # prompt_ids without the images' pixel inputs: render from the messages again, images included.
        ids, image_inputs = render_prompt_and_images(
            self.tokenizer, dataclasses.replace(request, prompt_ids=None), self.max_prompt_tokens, self.processor
        )
        return dataclasses.replace(request, prompt_ids=tuple(ids), image_inputs=image_inputs)

    def _max_new(self, prompt_len: int, params: SamplingParams) -> int:
        # Clip to the context window rather than fail: the answer can still end with "length".
        return max(1, min(params.max_new_tokens, self.context_length - prompt_len))

    def _structured_processor(self, response_format: str) -> Any:
        """A fresh grammar mask for one row (xgrammar caches the compiled schema across requests)."""
        from deployments.engines.structured import StructuredCompiler, StructuredOutputError

        if self._structured is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._structured = StructuredCompiler(
                self.tokenizer, vocab_size=vocab, stop_token_ids=sorted(self.stop_ids)
            )
        try:
            return self._structured.processor(json.loads(response_format))
        except StructuredOutputError as err:
            raise EngineInputError(str(err)) from None

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            raise EngineInputError(f"unknown adapter {adapter!r}; this model has {sorted(self.adapters)}")

    def submit(self, request: GenerationRequest, sink: Sink, streamed: bool = True) -> Seq:
        """Queue a request; `sink` receives StreamDeltas (the last has finish_reason) or one exception.

        With streamed=False the sink gets only the final delta, holding the whole answer. Called from
        any thread; the sink is called on the engine thread and must not block.
        """
        self._check_adapter(request.adapter)
        request = self.prepare(request)
        ids = list(request.prompt_ids or ())
        if self._closed:
            raise RuntimeError("engine is closed")
        processor = request.logits_processor
        if processor is None and request.params.response_format is not None:
            processor = self._structured_processor(request.params.response_format)
        row = _Row(
            request=request,
            prompt_ids=ids,
            sink=sink,
            sampler=RowSampler.create(request.params, self.device, processor),
            text=TextAssembler(self.tokenizer, request.params.stop),
            streamed=streamed,
            image_inputs=request.image_inputs,
        )
        seq = Seq(prompt_len=len(ids), max_new=self._max_new(len(ids), request.params), payload=row)
        with self._cond:
            self.scheduler.add(seq)
            self._cond.notify()
        return seq

    def engine_stats(self) -> dict[str, Any]:
        with self._cond:
            return self.stats.snapshot(len(self.scheduler.running), len(self.scheduler.waiting))

    # ---- the decoding loop (engine thread) ----------------------------------------------------------

    def _loop(self) -> None:
        # On a CPU box the decoding thread competes with the replica's event loop (which moves stream chunks
        # and answers calls), the router and Serve's proxy: under SCHED_IDLE it yields to them at once and
        # decodes on what they leave. On a GPU this thread mostly waits on the device.
        self.stats.decode_thread_id = threading.get_native_id()
        self.stats.decode_thread_priority = set_thread_priority(self.config.decode_thread_priority)
        while True:
            with self._cond:
                while not self._closed and not self.scheduler.has_work:
                    self._cond.wait()
                if self._closed:
                    return
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as err:  # a failed forward fails the rows in it, never the loop
                logger.exception("decoding step failed")
                self.stats.errors += 1
                self._fail_running(err)
            self.stats.busy_s += time.perf_counter() - t0

    def _fail_running(self, err: BaseException) -> None:
        with self._cond:
            seqs = list(self.scheduler.running)
        self._batch = None
        self._fail(seqs, err)

    def _fail(self, seqs: list[Seq], err: BaseException) -> None:
        with self._cond:
            for s in seqs:
                self.scheduler.finish(s)
        for s in seqs:
            s.payload.sink(err)

    def _adapter_kwargs(self, seqs: list[Seq]) -> dict[str, Any]:
        if not self.adapters:
            return {}
        # peft picks each row's adapter itself, so no global "active adapter" state is touched.
        return {"adapter_names": [s.payload.request.adapter or BASE_ADAPTER for s in seqs]}

    def _step(self) -> None:
        with self._cond:
            plan = self.scheduler.schedule()
        self.stats.steps += 1
        batch = self._batch
        if plan.aborted:
            self.stats.aborted += len(plan.aborted)
            for s in plan.aborted:
                self.stats.max_steps_after_cancel = max(self.stats.max_steps_after_cancel, s.steps_after_cancel)
            if batch is not None:
                gone = set(plan.aborted)
                batch.keep([i for i, s in enumerate(batch.seqs) if s not in gone])
        results: list[tuple[Seq, int, dict | None]] = []
        if batch is not None and batch.seqs:
            results += self._decode(batch)
        if plan.prefill:
            try:
                joined, sampled = self._prefill(plan.prefill)
            except Exception as err:  # a prompt that breaks the forward fails its own rows, not the running batch
                logger.exception("prefill of %d row(s) failed", len(plan.prefill))
                self.stats.errors += 1
                self._fail(plan.prefill, err)
            else:
                results += sampled
                if batch is None or not batch.seqs:
                    self._batch = batch = joined
                else:
                    batch.extend(joined)
        # Streams share one budget of deltas per second on this replica: the more rows stream, the longer
        # each one's interval (the first delta of a row still goes at once).
        streaming = sum(1 for s, _, _ in results if s.payload.streamed)
        self._delta_interval = stream_interval(
            self.config.stream_interval_s, self.config.stream_deltas_per_s, streaming
        )
        self._now = self._clock()
        done = {s for s, t, lp in results if self._emit(s, t, lp)}
        if done and batch is not None:
            with self._cond:
                for s in done:
                    self.scheduler.finish(s)
            batch.keep([i for i, s in enumerate(batch.seqs) if s not in done])
            self.stats.finished += len(done)
        with self._cond:
            running, waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        if (running, waiting) != self._load:  # a gauge update costs ~0.1 ms of this thread: only on change
            self._load = (running, waiting)
            metrics.engine_load(running, waiting)  # the batch-size and queue gauges (a no-op outside Serve)

    def _forward(self, seqs: list[Seq], **kw: Any) -> Any:
        for s in seqs:
            if s.cancelled:
                s.steps_after_cancel += 1
        self.stats.forwards += 1
        return self.model(use_cache=True, **kw, **self._adapter_kwargs(seqs))

    def _sample(self, seqs: list[Seq], logits: torch.Tensor) -> list[tuple[Seq, int, dict | None]]:
        tokens, logprobs = next_tokens(logits, [s.payload.sampler for s in seqs], self._token_text)
        self.stats.tokens += len(tokens)
        return list(zip(seqs, tokens, logprobs, strict=True))

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _decode(self, batch: _Batch) -> list[tuple[Seq, int, dict | None]]:
        """One token for every running row, from the cache."""
        n = len(batch.seqs)
        self.stats.max_batch = max(self.stats.max_batch, n)
        self.stats.batch_sizes[n] += 1
        mask = torch.cat([batch.mask, batch.mask.new_ones(n, 1)], dim=1)  # (B, T+1)
        out = self._forward(
            batch.seqs,
            input_ids=batch.last[:, None],
            attention_mask=mask,
            position_ids=batch.pos[:, None],
            past_key_values=batch.cache,
        )
        batch.mask, batch.cache = mask, out.past_key_values
        batch.pos = batch.pos + 1
        sampled = self._sample(batch.seqs, out.logits[:, -1])
        batch.last = torch.tensor([t for _, t, _ in sampled], device=self.device)
        return sampled

    def _prefill(self, seqs: list[Seq]) -> tuple[_Batch, list[tuple[Seq, int, dict | None]]]:
        """Run the joiners' prompts (left-padded together) and sample their first tokens."""
        prompts = [s.payload.prompt_ids for s in seqs]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count from 0 whatever their padding
        out = self._forward(
            seqs, input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, **self._batch_images(seqs)
        )
        self.stats.prefilled_rows += len(seqs)
        sampled = self._sample(seqs, out.logits[:, -1])
        last = torch.tensor([t for _, t, _ in sampled], device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        return _Batch(list(seqs), out.past_key_values, mask, lengths, last), sampled

    def _batch_images(self, seqs: list[Seq]) -> dict[str, torch.Tensor]:
        """The image inputs of the rows that have images, concatenated in row order: the model fills its
        image-token positions across the flattened batch in that order, so text-only rows need none."""
        rows = [s.payload.image_inputs for s in seqs if s.payload.image_inputs]
        if not rows:
            return {}
        out = {}
        for key in rows[0]:
            x = torch.cat([r[key] for r in rows]).to(self.device)
            out[key] = x.to(self.dtype) if x.is_floating_point() else x
        for s in seqs:
            s.payload.image_inputs = None  # the prefill is their only use: free the pixels now
        return out

    def _emit(self, seq: Seq, token: int, logprob: dict | None) -> bool:
        """Hand one row's new token to its request; True when the row is finished."""
        row: _Row = seq.payload
        if seq.cancelled:
            return False  # nobody reads it: the scheduler drops it (counted as aborted) before the next forward
        seq.generated += 1
        if logprob is not None:
            row.pending_logprobs.append(logprob)
        finish = None
        if token in self.stop_ids:
            finish, text = "stop", row.text.flush()
        else:
            text = row.text.add(token)
            if row.text.hit_stop:
                finish = "stop"
            elif seq.generated >= seq.max_new:
                finish, text = "length", text + row.text.flush()
        if finish is None and (not text or not row.streamed or self._now < row.next_delta_at):
            # Held back: a partial character or possible stop string, a non-streamed row (one delivery at
            # the end), or a stream whose next delta is not due yet. Holding it here, on this thread, means
            # one wake-up of the caller's loop per delta instead of one per token.
            row.pending_text += text
            return False
        text, row.pending_text = row.pending_text + text, ""
        lps, row.pending_logprobs = (row.pending_logprobs or None), []
        if finish is None:
            row.next_delta_at = self._now + self._delta_interval
            self.stats.deltas += 1
            self._deliver(seq, StreamDelta(text=text, logprobs=lps))
            return False
        self.stats.deltas += row.streamed
        return self._deliver(
            seq,
            StreamDelta(
                text=text,
                finish_reason=finish,
                prompt_tokens=len(row.prompt_ids),
                completion_tokens=seq.generated,
                logprobs=lps,
            ),
        )

    @staticmethod
    def _deliver(seq: Seq, item: StreamDelta) -> bool:
        """Pass an item to the request; a receiver that is gone (closed event loop) cancels the row,
        which the scheduler then drops as aborted."""
        try:
            seq.payload.sink(item)
            return True
        except Exception:  # the asyncio loop of a vanished caller: nobody reads this row any more
            seq.cancel()
            return False

    # ---- async protocol ---------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Yield text deltas as tokens arrive; they concatenate to what `generate` returns.

        Leaving the loop early (client gone, timeout, cancellation) drops the row at the next step.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[StreamDelta | BaseException] = asyncio.Queue()
        # The engine thread paces deltas (stream_interval_s, stream_deltas_per_s): it calls the sink once per
        # delta, not once per token, so this loop wakes up only when there is something to send.
        seq = self.submit(request, lambda item: loop.call_soon_threadsafe(q.put_nowait, item))
        try:
            while True:
                items = [await q.get()]
                # A consumer that fell behind gets what piled up as one delta: fewer, larger chunks
                # through Serve and HTTP under load, while an idle one still sees every token at once.
                while not q.empty():
                    items.append(q.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                yield merge_deltas(items)
                if items[-1].finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                seq.cancel()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """The whole answer, delivered once when the row finishes; cancelling drops the row."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def deliver(item: StreamDelta | BaseException) -> None:
            def settle() -> None:
                if future.done():
                    return
                if isinstance(item, BaseException):
                    future.set_exception(item)
                else:
                    future.set_result(item)

            loop.call_soon_threadsafe(settle)

        seq = self.submit(request, deliver, streamed=False)
        try:
            return collect([await future])
        finally:
            if not seq.finished:
                seq.cancel()

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    # ---- blocking API (CLI, pipeline, tests) -------------------------------------------------------

    def generate_batch_sync(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Submit every request at once (they share the running batch) and wait for all of them."""
        queues: list[queue.Queue] = [queue.Queue() for _ in requests]
        seqs = [self.submit(r, q.put, streamed=False) for r, q in zip(requests, queues, strict=True)]
        results = []
        try:
            for q in queues:
                deltas = []
                while True:
                    item = q.get()
                    if isinstance(item, BaseException):
                        raise item
                    deltas.append(item)
                    if item.finish_reason is not None:
                        break
                results.append(collect(deltas))
        finally:
            for s in seqs:
                if not s.finished:
                    s.cancel()
        return results

    def generate_sync(self, request: GenerationRequest) -> GenerationResult:
        return self.generate_batch_sync([request])[0]

    def check_health(self) -> None:
        if self.model is None or not self._thread.is_alive():
            raise RuntimeError("model is not loaded or the decoding thread is dead")

    def close(self) -> None:
        """Stop the decoding thread, fail what is queued, free the model; safe to call twice."""
        if getattr(self, "model", None) is None:
            return
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        with self._cond:
            left = self.scheduler.drain()
        for s in left:
            s.payload.sink(RuntimeError("engine closed"))
        self._batch = None
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def merge_deltas(items: Sequence[StreamDelta]) -> StreamDelta:
    """Consecutive deltas of one answer as one (the last one's finish and counts)."""
    if len(items) == 1:
        return items[0]
    last = items[-1]
    logprobs = [lp for d in items for lp in (d.logprobs or [])]
    return StreamDelta(
        text="".join(d.text for d in items),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        logprobs=logprobs or None,
    )


def collect(deltas: Sequence[StreamDelta]) -> GenerationResult:
    """A whole result from a finished stream of deltas."""
    whole = merge_deltas(deltas)
    return GenerationResult(
        text=whole.text,
        prompt_tokens=whole.prompt_tokens,
        completion_tokens=whole.completion_tokens,
        finish_reason=whole.finish_reason or "stop",
        logprobs=whole.logprobs or None,
    )
