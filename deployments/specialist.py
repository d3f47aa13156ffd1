"""Specialist: one loaded base model serving one or more specialists (adapter and system prompt each)."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments import metrics
from deployments.config import SpecialistConfig
from deployments.engines.base import Engine, EngineInputError, GenerationRequest, SamplingParams
from deployments.logging_setup import configure_logging, set_request_id

logger = logging.getLogger(__name__)


def error_result(kind: str, message: str) -> dict[str, Any]:
    """Errors cross process boundaries as data, not exceptions: kind is 'invalid_request' or 'engine'."""
    return {"error": {"kind": kind, "message": message}}


def resolve_engine_class(engine_cls: str | type | None, config: SpecialistConfig) -> type:
    """An injected engine class (or "module:Class"), else the one `backend` selects."""
    if engine_cls is None:
        from deployments.engines.select import select_engine_class

        return select_engine_class(config)
    if isinstance(engine_cls, str):
        module, _, name = engine_cls.partition(":")
        return getattr(importlib.import_module(module), name)
    return engine_cls


class SpecialistGroup:
    """Translates payloads into engine requests for the specialists that share one base model."""

    def __init__(self, members: list[SpecialistConfig], engine_cls: str | type | None = None) -> None:
        if not members:
            raise ValueError("a specialist group needs at least one member")
        self.members = {m.name: m for m in members}
        base = members[0].engine_config()
        # The group loads the union of its members' adapters on one copy of the base.
        adapters: dict[str, str] = {}
        for m in members:
            adapters.update(m.adapters)
        base = base.model_copy(update={"adapters": adapters})
        cls = resolve_engine_class(engine_cls, members[0])
        self.engine: Engine = cls(base)
        logger.info("specialist group %s ready with %s", sorted(self.members), cls.__name__)

    def to_request(self, payload: dict[str, Any]) -> GenerationRequest:
        """Payload (JSON-able dict) -> engine request with the specialist's defaults and system prompt."""
        name = payload.get("specialist")
        spec = self.members.get(name)  # type: ignore[arg-type]
        if spec is None:
            raise EngineInputError(f"specialist {name!r} is not served here ({sorted(self.members)})")
        g = spec.generation
        max_new = payload.get("max_tokens") or g.max_new_tokens
        if max_new > g.max_new_tokens_limit:
            raise EngineInputError(f"max_tokens={max_new} exceeds this specialist's limit {g.max_new_tokens_limit}")
        params = SamplingParams(
            temperature=g.temperature if payload.get("temperature") is None else payload["temperature"],
            top_p=g.top_p if payload.get("top_p") is None else payload["top_p"],
            max_new_tokens=max_new,
            stop=tuple(payload.get("stop") or ()),
            seed=payload.get("seed"),
            logprobs=payload.get("logprobs"),
            response_format=payload.get("response_format"),
        )
        messages = payload.get("messages")
        if messages is not None:
            msgs = [dict(m) for m in messages]
            if spec.system_prompt and not any(m["role"] == "system" for m in msgs):
                msgs.insert(0, {"role": "system", "content": spec.system_prompt})
            images: tuple = ()
            if payload.get("images"):
                if not spec.accepts_images:
                    raise EngineInputError(f"specialist {name!r} does not accept images (modalities {spec.modalities})")
                from deployments.images import decode_payload_images  # Pillow only where images arrive

                # The ingress sent validated encoded bytes (smaller through Ray than pixels); decode them here
                # under the same limits.
                images = decode_payload_images(payload["images"], payload.get("image_limits"))
            return GenerationRequest(messages=tuple(msgs), params=params, adapter=spec.adapter, images=images)
        return GenerationRequest(prompt=payload.get("prompt"), params=params, adapter=spec.adapter)

    def prepare(self, payload: dict[str, Any]) -> GenerationRequest | dict[str, Any]:
        """The engine request, or an error result when the payload is a client mistake."""
        try:
            request = self.to_request(payload)
            # Tokenise (and process images) now, once: a too-long prompt must not fail a whole batch later.
            prepare = getattr(self.engine, "prepare", None)
            return prepare(request) if prepare is not None else request
        except (EngineInputError, ValueError) as err:
            return error_result("invalid_request", str(err))

    async def _prepare(self, payload: dict[str, Any]) -> GenerationRequest | dict[str, Any]:
        # Decoding images and running the image processor take milliseconds to a second: off the event loop.
        return await asyncio.to_thread(self.prepare, payload) if payload.get("images") else self.prepare(payload)

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Straight into the engine: its scheduler batches concurrent requests at every decoding step."""
        prepared = await self._prepare(payload)
        if isinstance(prepared, dict):
            return prepared
        try:
            return (await self.engine.generate(prepared)).__dict__
        except EngineInputError as err:
            return error_result("invalid_request", str(err))

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        prepared = await self._prepare(payload)
        if isinstance(prepared, dict):
            yield prepared
            return
        try:
            async for delta in self.engine.stream(prepared):
                yield delta.__dict__
        except EngineInputError as err:
            yield error_result("invalid_request", str(err))

    def check_health(self) -> None:
        self.engine.check_health()

    def engine_stats(self) -> dict[str, Any]:
        """The engine's step statistics (batch sizes, aborted rows), where the engine keeps them."""
        stats = getattr(self.engine, "engine_stats", None)
        return stats() if stats is not None else {}

    def close(self) -> None:
        self.engine.close()


@serve.deployment(name="specialist", ray_actor_options={"num_cpus": 1})
class SpecialistDeployment:
    """Ray Serve replica of a SpecialistGroup.

    No @serve.batch: every request goes straight into the engine, whose own scheduler (vLLM's, or
    the HF engine's iteration-level one) batches all in-flight requests at each decoding step.
    A cancelled call (timeout, client gone) cancels the engine request, which frees its slot.
    """

    def __init__(self, members: list[dict[str, Any]], engine_cls: str | type | None = None) -> None:
        configure_logging()
        metrics.enable()
        configs = [SpecialistConfig.model_validate(m) for m in members]
        self.group = SpecialistGroup(configs, engine_cls)

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        set_request_id(payload.get("request_id"))  # this request's task only: log lines carry the id
        logger.info("generate for %s", payload.get("specialist"))
        return await self.group.generate(payload)

    def engine_stats(self) -> dict[str, Any]:
        return self.group.engine_stats()

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        set_request_id(payload.get("request_id"))
        logger.info("stream for %s", payload.get("specialist"))
        async for item in self.group.stream(payload):
            yield item

    async def gpu_ids(self) -> list[str]:
        """The accelerator ids Ray gave this replica (logical on CPU test clusters)."""
        import ray

        return [str(g) for g in ray.get_gpu_ids()]

    def check_health(self) -> None:
        self.group.check_health()
