"""Fault-injection engines for tests and chaos drills: one that raises, one that hangs, one that stalls mid-stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from deployments.config import EngineConfig
from deployments.engines.base import GenerationRequest, GenerationResult, StreamDelta


class ExplodingEngine:
    """Every generation raises, as a crashed CUDA context or a corrupt checkpoint would."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        raise RuntimeError("injected fault: engine exploded")

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        raise RuntimeError("injected fault: engine exploded")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        raise RuntimeError("injected fault: engine exploded")
        yield StreamDelta(text="")  # pragma: no cover - makes this an async generator

    def check_health(self) -> None:
        pass

    def close(self) -> None:
        pass


class HangingEngine(ExplodingEngine):
    """Every generation sleeps far past any sane timeout, as a wedged replica would."""

    hang_s = 3600.0

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.requests = 0  # requests that reached this engine: a test can tell what was refused before it

    def engine_stats(self) -> dict[str, int]:
        return {"requests": self.requests}

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.requests += len(requests)
        await asyncio.sleep(self.hang_s)
        return [GenerationResult("", 0, 0, "length") for _ in requests]

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return (await self.generate_batch([request]))[0]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        self.requests += 1
        await asyncio.sleep(self.hang_s)
        yield StreamDelta(text="", finish_reason="length")


class StallingEngine(HangingEngine):
    """Streams a few tokens, then goes silent, as a replica wedged mid-answer would."""

    tokens_before_stall = 2

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        self.requests += 1
        for i in range(self.tokens_before_stall):
            yield StreamDelta(text=f" tok{i}")
        await asyncio.sleep(self.hang_s)
        yield StreamDelta(text="", finish_reason="length")
