"""Merger: fuses several specialists' answers into one with the Synthesizer (batched, streamable)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from deployments.config import MergerConfig
from deployments.engines.base import resolve_device, resolve_dtype
from fusion.synthesizer import Answer, SynthesisRequest, Synthesizer

logger = logging.getLogger(__name__)


def to_synthesis_request(payload: dict[str, Any]) -> SynthesisRequest:
    answers = [Answer(a["domain"], a["text"], float(a.get("weight", 1.0))) for a in payload["answers"]]
    return SynthesisRequest(payload["query"], answers)


class MergerService:
    """Holds the synthesizer; blocking work runs on one worker thread, off the event loop."""

    def __init__(self, config: MergerConfig) -> None:
        self.config = config
        device = resolve_device(config.device)
        self.synth = Synthesizer.from_pretrained(
            config.model,
            merger_path=config.merger_weights,
            device=device,
            dtype=resolve_dtype(config.dtype, device),
            max_answer_tokens=config.max_answer_tokens,
            depth_layers=config.depth_layers,
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
        loop = asyncio.get_running_loop()
        out: list[dict[str, Any] | None] = [None] * len(payloads)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(payloads):
            groups.setdefault(tuple(sorted(self._kwargs(p).items())), []).append(i)
        for key, idx in groups.items():
            reqs = [to_synthesis_request(payloads[i]) for i in idx]
            texts = await loop.run_in_executor(self._executor, lambda r=reqs, k=key: self.synth.generate(r, **dict(k)))
            for i, text in zip(idx, texts, strict=True):
                out[i] = {"text": text, "completion_tokens": self._count(text)}
        return [o for o in out if o is not None]

    async def synthesize(self, payload: dict[str, Any]) -> dict[str, Any]:
        return (await self.synthesize_many([payload]))[0]

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Text deltas as the T5 decoder writes them; the last item carries the token count."""
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
        try:
            while (t := await queue.get()) is not None:
                tokens.append(t)
                text = self.synth.tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
                if len(text) > emitted:
                    yield {"text": text[emitted:]}
                    emitted = len(text)
            final = await future
            if len(final) > emitted:
                yield {"text": final[emitted:]}
            yield {"text": "", "completion_tokens": self._count(final), "finish_reason": "stop"}
        finally:
            cancelled.set()


@serve.deployment(name="merger", ray_actor_options={"num_cpus": 1})
class MergerDeployment:
    """Ray Serve replica of the MergerService with dynamic batching over synthesis requests."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = MergerConfig.model_validate(config)
        self.service = MergerService(cfg)
        self._batched.set_max_batch_size(cfg.deployment.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.deployment.batch_wait_timeout_s)

    async def synthesize(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._batched(payload)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self.service.synthesize_many(payloads)

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in self.service.stream(payload):
            yield item

    def check_health(self) -> None:
        if self.service.synth is None:
            raise RuntimeError("synthesizer is not loaded")
