"""Merger: fuses several specialists' answers into one, by fusion (T5 Synthesizer) or aggregate (causal LM)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve

from deployments import metrics
from deployments.config import EngineConfig, MergerConfig
from deployments.engines.base import GenerationRequest, SamplingParams, resolve_device, resolve_dtype
from deployments.engines.detok import IncrementalDetokenizer
from deployments.logging_setup import configure_logging, set_request_id
from fusion.synthesizer import Answer, SynthesisRequest, Synthesizer

logger = logging.getLogger(__name__)

# Mixture-of-Agents' aggregate-and-synthesize prompt (Wang et al., 2024), cut down for a small model: a
# 135M model follows one user message that ends in the instruction better than a long system prompt.
AGGREGATE_PROMPT = (
    "Write one answer that covers every part of the question: use answer A for its part, then answer B for its part."
)
CHARS_PER_TOKEN = 4  # budget answers in characters: the prompt is built before any engine tokenises it


def aggregate_messages(payload: dict[str, Any], instruction: str, max_answer_chars: int) -> tuple[dict[str, str], ...]:
    """The chat an aggregator sees: the question, the lettered expert answers, then the instruction."""
    parts = [f'Here are {len(payload["answers"])} answers to the question "{payload["query"]}"', ""]
    for i, a in enumerate(payload["answers"]):
        text = a["text"].strip()
        if len(text) > max_answer_chars:
            text = text[:max_answer_chars].rsplit(" ", 1)[0] + " ..."
        parts.append(f"Answer {chr(ord('A') + i % 26)} ({a['domain']}):\n{text}\n")
    parts.append(instruction)
    return ({"role": "user", "content": "\n".join(parts)},)


class AggregateSynthesis:
    """Aggregate mode: a causal LM writes the merged answer, through the engine protocol (generate/stream).

    It loads its own copy of the model in the merger replica: a merge then never queues behind
    specialist requests, and the merger scales on its own (see docs/embedded.md for the measured cost).
    """

    def __init__(self, config: MergerConfig) -> None:
        from deployments.engines.select import select_engine_class

        self.config = config
        engine_config = EngineConfig(model=config.model, device=config.device, dtype=config.dtype)
        self.engine = select_engine_class(engine_config)(engine_config)
        self.instruction = config.aggregate_prompt or AGGREGATE_PROMPT

    def request(self, payload: dict[str, Any]) -> GenerationRequest:
        cap = min(payload.get("max_tokens") or self.config.max_new_tokens, self.config.max_new_tokens)
        params = SamplingParams(temperature=self.config.temperature, top_p=self.config.top_p, max_new_tokens=cap)
        messages = aggregate_messages(payload, self.instruction, self.config.max_answer_tokens * CHARS_PER_TOKEN)
        return GenerationRequest(messages=messages, params=params)

    async def synthesize_many(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = await self.engine.generate_batch([self.request(p) for p in payloads])
        return [{"text": r.text, "completion_tokens": r.completion_tokens, "synthesis": "aggregate"} for r in results]

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for delta in self.engine.stream(self.request(payload)):
            if delta.finish_reason is None:
                if delta.text:
                    yield {"text": delta.text}
                continue
            if delta.text:
                yield {"text": delta.text}
            yield {
                "text": "",
                "completion_tokens": delta.completion_tokens,
                "finish_reason": delta.finish_reason,
                "synthesis": "aggregate",
            }

    def check_health(self) -> None:
        self.engine.check_health()


def to_synthesis_request(payload: dict[str, Any]) -> SynthesisRequest:
    answers = [Answer(a["domain"], a["text"], float(a.get("weight", 1.0))) for a in payload["answers"]]
    return SynthesisRequest(payload["query"], answers)


def trained_t5(config: MergerConfig) -> str | None:
    """The T5 that `consilium fusion train --mode lora|full` saved beside the merger weights, if any."""
    if config.merger_weights is None:
        return None
    t5 = Path(config.merger_weights).expanduser() / "t5"
    return str(t5) if (t5 / "config.json").is_file() else None


class MergerService:
    """Holds the synthesizer; blocking work runs on one worker thread, off the event loop."""

    def __init__(self, config: MergerConfig) -> None:
        self.config = config
        self.aggregate: AggregateSynthesis | None = None
        if config.synthesis == "aggregate":
            self.aggregate = AggregateSynthesis(config)
            self.synth = None
            return
        device = resolve_device(config.device)
        self.synth = Synthesizer.from_pretrained(
            trained_t5(config) or config.model,
            merger_path=config.merger_weights,
            device=device,
            dtype=resolve_dtype(config.dtype, device),
            max_answer_tokens=config.max_answer_tokens,
            depth_layers=config.depth_layers,
            sliding_window=config.sliding_window,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merger")

    def _kwargs(self, payload: dict[str, Any]) -> dict[str, Any]:
        cap = payload.get("max_tokens") or self.config.max_new_tokens
        return {
            "max_new_tokens": min(cap, self.config.max_new_tokens),
            "temperature": self.config.temperature,
            "top_p": self.config.top_p,
        }

    def _count(self, text: str) -> int:
        return len(self.synth.tokenizer(text, add_special_tokens=False).input_ids)

    async def synthesize_many(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One batch per distinct token cap (the decoder takes one max_new_tokens per call)."""
        if self.aggregate is not None:
            return await self.aggregate.synthesize_many(payloads)
        loop = asyncio.get_running_loop()
        out: list[dict[str, Any] | None] = [None] * len(payloads)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(payloads):
            groups.setdefault(tuple(sorted(self._kwargs(p).items())), []).append(i)
        for key, idx in groups.items():
            reqs = [to_synthesis_request(payloads[i]) for i in idx]
            texts = await loop.run_in_executor(self._executor, lambda r=reqs, k=key: self.synth.generate(r, **dict(k)))
            cap = dict(key)["max_new_tokens"]
            for i, text in zip(idx, texts, strict=True):
                # The decoder's ids are not returned here: re-encoding the text estimates their count
                # (the decoder cannot have written more than its cap).
                n = min(self._count(text), cap)
                finish = "length" if n >= cap - 1 else "stop"
                out[i] = {"text": text, "completion_tokens": n, "finish_reason": finish, "synthesis": "fusion"}
        return [o for o in out if o is not None]

    async def synthesize(self, payload: dict[str, Any]) -> dict[str, Any]:
        return (await self.synthesize_many([payload]))[0]

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Text deltas as the model writes them; the last item carries the token count."""
        if self.aggregate is not None:
            async for item in self.aggregate.stream(payload):
                yield item
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        request = to_synthesis_request(payload)
        kwargs = self._kwargs(payload)
        tokens: list[int] = []
        emitted = 0
        cancelled = threading.Event()

        def on_token(t: int) -> None:
            if not cancelled.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, t)

        def run() -> str:
            try:
                return self.synth.generate_stream(request, on_token, **kwargs)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        future = loop.run_in_executor(self._executor, run)
        # O(1) per token (the shared incremental detokenizer), not a re-decode of the whole answer.
        detok = IncrementalDetokenizer(self.synth.tokenizer)
        try:
            while (t := await queue.get()) is not None:
                tokens.append(t)
                piece = detok.step(t)
                if piece:
                    yield {"text": piece}
                    emitted += len(piece)
            final = await future
            if len(final) > emitted:
                yield {"text": final[emitted:]}
            # The streamed ids are exact: count them (an ending EOS is not part of the answer).
            ended = bool(tokens) and tokens[-1] == self.synth.tokenizer.eos_token_id
            n = len(tokens) - ended
            yield {
                "text": "",
                "completion_tokens": n,
                "finish_reason": "length" if not ended and n >= kwargs["max_new_tokens"] else "stop",
                "synthesis": "fusion",
            }
        finally:
            cancelled.set()


@serve.deployment(name="merger", ray_actor_options={"num_cpus": 1})
class MergerDeployment:
    """Ray Serve replica of the MergerService with dynamic batching over synthesis requests."""

    def __init__(self, config: dict[str, Any]) -> None:
        configure_logging()
        metrics.enable()
        cfg = MergerConfig.model_validate(config)
        self.service = MergerService(cfg)
        self._batched.set_max_batch_size(cfg.deployment.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.deployment.batch_wait_timeout_s)

    async def synthesize(self, payload: dict[str, Any]) -> dict[str, Any]:
        set_request_id(payload.get("request_id"))  # this request's task only: log lines carry the id
        logger.info("merging %d answers", len(payload["answers"]))
        return await self._batched(payload)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self.service.synthesize_many(payloads)

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        set_request_id(payload.get("request_id"))
        logger.info("merging %d answers (streamed)", len(payload["answers"]))
        async for item in self.service.stream(payload):
            yield item

    def check_health(self) -> None:
        if self.service.aggregate is not None:
            self.service.aggregate.check_health()
        elif self.service.synth is None:
            raise RuntimeError("synthesizer is not loaded")
