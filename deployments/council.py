"""The council: route a prompt, fan out to specialists with timeouts, merge; shared by Serve and the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from deployments import metrics
from deployments.config import GraphConfig
from deployments.engines.base import content_text
from deployments.protocol import Routing, Usage
from router.model import TinyAda, shipped_router_path
from router.policy import RoutingDecision, RoutingPolicy

logger = logging.getLogger(__name__)


class CouncilError(Exception):
    """Carries an HTTP status and an OpenAI error type; the ingress turns it into an error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        routing: Routing | None = None,
        retry_after_s: float | None = None,
        refused_by: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.routing = status, message, type_, code, routing
        self.retry_after_s = retry_after_s  # sent as Retry-After with a 503 for a full queue
        self.refused_by = refused_by  # which bound refused an overload 503 (sent as X-Refused-By)


class Overloaded(Exception):
    """A specialist is full: the ingress's per-specialist bound ("specialist") or Ray's queue ("queue")."""

    def __init__(self, message: str, retry_after_s: float | None = None, refused_by: str = "queue") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.refused_by = refused_by


class StreamTimeout(Exception):
    """A stream produced no first item, or no next item, within its limit."""


async def timed_stream(items: AsyncIterator[Any], first_s: float, next_s: float) -> AsyncIterator[Any]:
    """Relay items, raising StreamTimeout when the first takes over first_s or any later one over next_s.

    On a timeout (or when the consumer leaves) the source is closed, which cancels the remote stream,
    so a stalled specialist stops using its model at its next decoding step.
    """
    it = items.__aiter__()
    limit, what = first_s, "first token"
    try:
        while True:
            try:
                item = await asyncio.wait_for(it.__anext__(), limit)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise StreamTimeout(f"no {what} within {limit:g}s") from None
            yield item
            limit, what = next_s, "token (stalled)"
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):  # closing a dead stream must not hide why we stopped
                await aclose()


class SpecialistClient(Protocol):
    async def generate(self, name: str, payload: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, name: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...


class MergerClient(Protocol):
    async def synthesize(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...


@dataclass
class CouncilAnswer:
    text: str
    routing: Routing
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    logprobs: list[dict[str, Any]] | None = None  # a single specialist's tokens; None for a merged answer


@dataclass
class StreamEvent:
    """A text delta; the last event has done=True with usage, finish reason and the final routing."""

    text: str = ""
    done: bool = False
    routing: Routing | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why a stream ended early (then finish_reason is "length", never "error")
    logprobs: list[dict[str, Any]] | None = None  # for the tokens of this delta, when asked for


def load_router(config: GraphConfig) -> tuple[TinyAda, RoutingPolicy]:
    """The router artifact and the policy the config describes; domains must map onto specialists."""
    model = TinyAda.load(config.router.model or shipped_router_path())
    thresholds = {**model.config.thresholds, **config.router.thresholds}
    policy = RoutingPolicy(
        thresholds=thresholds,
        fallback=config.router.fallback,
        top_k=config.router.top_k,
        domain_to_specialist=config.router.domain_to_specialist,
    )
    names = {s.name for s in config.specialists}
    missing = sorted(d for d in model.domains if policy.specialist_for(d) not in names)
    if missing:
        raise ValueError(
            f"router domains {missing} map to no configured specialist; add them to "
            f"router.domain_to_specialist or configure specialists with those names ({sorted(names)})"
        )
    return model, policy


def describe_failure(err: BaseException) -> str:
    """One line for clients: the original exception behind Ray's wrapper, without its traceback."""
    cause = getattr(err, "cause", None) or err  # RayTaskError keeps the replica's exception as .cause
    if isinstance(cause, asyncio.TimeoutError):
        return "timeout"
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}"[:300]


def _usage(answers: dict[str, dict]) -> tuple[int, int]:
    """Prompt and completion tokens summed over the specialists that answered."""
    return (sum(a["prompt_tokens"] for a in answers.values()), sum(a["completion_tokens"] for a in answers.values()))


def _record_specialist_usage(routing: Routing, answers: dict[str, dict]) -> None:
    # Behind a merge the client sees the merger's tokens only; what each specialist spent is reported here.
    for n, a in answers.items():
        routing.specialist_usage[n] = Usage(
            prompt_tokens=a["prompt_tokens"],
            completion_tokens=a["completion_tokens"],
            total_tokens=a["prompt_tokens"] + a["completion_tokens"],
        )


def routing_text(payload: dict[str, Any]) -> str:
    """What the router reads: the last user message of a chat, or the completion prompt."""
    if payload.get("messages"):
        users = [content_text(m["content"]) for m in payload["messages"] if m["role"] == "user"]
        return users[-1] if users else content_text(payload["messages"][-1]["content"])
    return payload.get("prompt") or ""


# What a text-only specialist reads where the user's image was: it should know there was one it cannot see,
# and answer from its domain knowledge rather than describe a picture it never saw.
IMAGE_OMITTED = "[an image is attached here, which you cannot see]"


def without_images(payload: dict[str, Any]) -> dict[str, Any]:
    """The request as a text-only specialist gets it: image bytes dropped, each image part a short note."""
    if not payload.get("images"):
        return payload

    def text(content: str | list[dict[str, Any]]) -> str:
        if isinstance(content, str):
            return content
        return " ".join(p["text"] if p.get("type") == "text" else IMAGE_OMITTED for p in content).strip()

    out = {k: v for k, v in payload.items() if k not in ("images", "image_limits")}
    out["messages"] = [{**m, "content": text(m["content"])} for m in payload["messages"]]
    return out


@dataclass
class CouncilDecision(RoutingDecision):
    """A routing decision that may also have been made by modality (the request carried images)."""

    modality: str = "text"
    reason: str | None = None


class Council:
    """Routing, parallel fan-out with per-specialist timeouts, graceful degradation, merging."""

    def __init__(
        self,
        config: GraphConfig,
        specialists: SpecialistClient,
        merger: MergerClient,
        router: TinyAda | None = None,
        policy: RoutingPolicy | None = None,
    ) -> None:
        self.config = config
        self.specialists = specialists
        self.merger = merger
        if router is None or policy is None:
            router, policy = load_router(config)
        self.router, self.policy = router, policy
        self.names = [s.name for s in config.specialists]

    def decide(self, model: str, text: str, images: int = 0) -> RoutingDecision:
        """The specialists for a request: pinned, by modality when it carries images, else by the text router."""
        if model != "auto":
            self._known(model)
            if images:
                self.check_images(model, images)
                return CouncilDecision(
                    [model], pinned=True, modality="image", reason=f"{images} image(s); pinned to {model!r}"
                )
            return self.policy.pin(model)
        if not text.strip() and not images:
            raise CouncilError(400, "the prompt is empty: nothing to route")
        t0 = time.perf_counter()
        decision = self.policy.decide(self.router.score(text)) if text.strip() else RoutingDecision([], fell_back=True)
        metrics.routing_latency((time.perf_counter() - t0) * 1000)
        return self._by_modality(decision, images) if images else decision

    def _known(self, model: str) -> None:
        if model != "auto" and model not in self.names:
            raise CouncilError(
                404, f"model {model!r} does not exist; use 'auto' or one of {self.names}", code="model_not_found"
            )

    def image_specialists(self) -> list[str]:
        return [s.name for s in self.config.specialists if s.accepts_images]

    def check_images(self, model: str, images: int) -> None:
        """Refuse (400) a request with images that no specialist here can see, before any image is decoded."""
        self._known(model)
        capable = self.image_specialists()
        if model != "auto" and model not in capable:
            spec = self.config.specialist(model)
            hint = f"use model 'auto' or one of {capable}" if capable else "no specialist here accepts images"
            raise CouncilError(
                400,
                f"model {model!r} does not accept images (modalities {spec.modalities}); {hint}",
                code="images_not_supported",
            )
        if not capable:
            raise CouncilError(
                400,
                f"this request has {images} image(s), but no vision specialist is configured: no specialist of "
                f"this service declares modalities [text, image] (specialists: {self.names}). Send text only, "
                "or serve a vision-language model (see docs/vision.md).",
                code="images_not_supported",
            )

    def _by_modality(self, text_decision: RoutingDecision, images: int) -> CouncilDecision:
        """Images go to the image-capable specialists whatever the text says. A text-only domain specialist
        joins (answering from the text alone; the merger combines the answers) only when its domain scores
        at least router.image_domain_threshold on the text: a confident domain question ("could this X-ray
        show pneumonia?") gains from domain knowledge without the image. Never the fallback specialist:
        a general model that cannot see the image has nothing to add to "what is in this picture?"."""
        self.check_images("auto", images)
        scores = text_decision.scores
        # Several image-capable specialists: the one the text router likes best first, then config order.
        capable = sorted(self.image_specialists(), key=lambda n: -(self._score_of(scores, n) or 0.0))
        chosen = capable[: self.policy.top_k]
        threshold = self.config.router.image_domain_threshold
        joined = []
        if threshold is not None and not text_decision.fell_back:
            for name in text_decision.specialists:  # highest score first, each already over its own threshold
                score = self._score_of(scores, name) or 0.0
                joins = name not in chosen and name != self.config.router.fallback and score >= threshold
                if joins and len(chosen) < self.policy.top_k:
                    chosen.append(name)
                    joined.append(f"{name!r} (text score {score:.2f} >= image_domain_threshold {threshold:g})")
        reason = f"{images} image(s): sent to the image-capable specialist(s) {capable[: self.policy.top_k]}"
        if joined:
            reason += "; also answering from the text alone: " + ", ".join(joined) + "; the merger combines them"
        return CouncilDecision(chosen, scores=scores, modality="image", reason=reason)

    def _score_of(self, scores: dict[str, float], name: str) -> float | None:
        mine = [s for d, s in scores.items() if self.policy.specialist_for(d) == name]
        return max(mine) if mine else None

    def _decide_and_count(self, payload: dict[str, Any]) -> RoutingDecision:
        """decide() for a request that will be served: counted in the routing metrics and logged."""
        images = len(payload.get("images") or ())
        decision = self.decide(payload.get("model", "auto"), routing_text(payload), images=images)
        if payload.get("response_format") and len(decision.specialists) > 1:
            # A merged answer is free text: output constrained to a format comes from the best specialist alone.
            decision = dataclasses.replace(decision, specialists=decision.specialists[:1])
        metrics.decision(decision.specialists, decision.scores, decision.fell_back, decision.pinned)
        logger.info(
            "route model=%s -> %s%s%s",
            payload.get("model", "auto"),
            decision.specialists,
            " (pinned)" if decision.pinned else " (fallback)" if decision.fell_back else "",
            f" images={images}" if images else "",
        )
        return decision

    def _score(self, routing: Routing, name: str) -> float | None:
        """A specialist's routing score: scores are keyed by router domain, which
        router.domain_to_specialist may map onto a specialist of another name (best domain wins)."""
        return self._score_of(routing.scores, name)

    def _best(self, routing: Routing, answers: dict[str, dict]) -> str:
        # With images, an answer from a specialist that saw them beats one written from the text alone.
        def rank(n: str) -> tuple[bool, float]:
            saw = routing.modality == "image" and self.config.specialist(n).accepts_images
            return saw, self._score(routing, n) or 0.0

        return max(answers, key=rank)

    @staticmethod
    def _routing(decision: RoutingDecision) -> Routing:
        return Routing(
            scores=decision.scores,
            specialists=list(decision.specialists),
            fell_back=decision.fell_back,
            pinned=decision.pinned,
            modality=getattr(decision, "modality", "text"),
            reason=getattr(decision, "reason", None),
        )

    def _payload_for(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        """What one specialist receives: its name, and the images only if it can see them."""
        if payload.get("images") and not self.config.specialist(name).accepts_images:
            payload = without_images(payload)
        return {**payload, "specialist": name}

    async def _collect_stream(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A whole answer read from the specialist's stream, under its first-token and stall timeouts."""
        spec = self.config.specialist(name)
        parts: list[str] = []
        async for item in timed_stream(
            self.specialists.stream(name, payload), spec.ttft_timeout_s, spec.stall_timeout_s
        ):
            if "error" in item:
                return item
            parts.append(item.get("text", ""))
            if item.get("finish_reason"):
                return {**item, "text": "".join(parts)}
        return {"error": {"kind": "engine", "message": "the stream ended without a finish reason"}}

    async def _call(
        self, name: str, payload: dict[str, Any], timings: dict[str, float], streamed: bool = False
    ) -> dict[str, Any]:
        timeout = self.config.specialist(name).timeout_s
        t0 = time.perf_counter()
        sent = self._payload_for(name, payload)
        try:
            # When the client streams, read the specialists' streams too: a stalled one is caught by its
            # stall timeout (seconds) instead of waiting out the whole timeout_s.
            call = self._collect_stream(name, sent) if streamed else self.specialists.generate(name, sent)
            res = await asyncio.wait_for(call, timeout)
        except asyncio.TimeoutError:
            metrics.specialist_failure(name, "timeout")
            return {"error": {"kind": "timeout", "message": f"no answer within {timeout:g}s"}}
        except StreamTimeout as err:
            metrics.specialist_failure(name, "timeout")
            return {"error": {"kind": "timeout", "message": str(err)}}
        except Overloaded as err:
            metrics.specialist_failure(name, "overloaded")
            return {
                "error": {
                    "kind": "overloaded",
                    "message": str(err),
                    "retry_after_s": err.retry_after_s,
                    "refused_by": err.refused_by,
                }
            }
        except Exception as err:  # a dead replica, a crashed engine: degrade, never fail the request
            logger.warning("specialist %s failed: %r", name, err)
            metrics.specialist_failure(name, metrics.failure_reason(err))
            return {"error": {"kind": "engine", "message": describe_failure(err)}}
        finally:
            timings[name] = round((time.perf_counter() - t0) * 1000, 2)
        if "error" not in res:
            metrics.specialist_call(name, timings[name], res.get("completion_tokens", 0))
        elif res["error"]["kind"] != "invalid_request":  # a client mistake is not a specialist failure
            metrics.specialist_failure(name, "error")
        return res

    async def fan_out(
        self, decision: RoutingDecision, payload: dict[str, Any], streamed: bool = False
    ) -> tuple[dict[str, dict], Routing]:
        """Call every chosen specialist in parallel; split answers from failures."""
        routing = self._routing(decision)
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(self._call(n, payload, routing.timings_ms, streamed) for n in decision.specialists)
        )
        routing.timings_ms["fan_out"] = round((time.perf_counter() - t0) * 1000, 2)
        answers: dict[str, dict] = {}
        client_errors = []
        for name, res in zip(decision.specialists, results, strict=True):
            if "error" in res:
                routing.failed[name] = f"{res['error']['kind']}: {res['error']['message']}"
                if res["error"]["kind"] == "invalid_request":
                    client_errors.append(res["error"]["message"])
            else:
                answers[name] = res
            if res.get("retries"):
                routing.retried[name] = res["retries"]
        routing.used = list(answers)
        if not answers:
            if client_errors and len(client_errors) == len(results):
                raise CouncilError(400, client_errors[0], routing=routing)
            full = [r["error"] for r in results if r["error"]["kind"] == "overloaded"]
            if full:  # at least one queue was full: tell the client when to come back
                raise CouncilError(
                    503,
                    f"the service is overloaded: {routing.failed}",
                    type_="service_unavailable",
                    code="overloaded",
                    routing=routing,
                    retry_after_s=max(e.get("retry_after_s") or 1.0 for e in full),
                    refused_by=",".join(sorted({e.get("refused_by") or "queue" for e in full})),
                )
            raise CouncilError(
                503,
                f"every chosen specialist failed: {routing.failed}",
                type_="service_unavailable",
                code="specialists_unavailable",
                routing=routing,
            )
        return answers, routing

    def _merge_payload(self, payload: dict[str, Any], answers: dict[str, dict], routing: Routing) -> dict[str, Any]:
        return {
            "query": routing_text(payload),
            "answers": [
                {"domain": n, "text": a["text"], "weight": self._score(routing, n) or 1.0} for n, a in answers.items()
            ],
            "max_tokens": payload.get("max_tokens"),
            "request_id": payload.get("request_id"),
        }

    async def answer(self, payload: dict[str, Any]) -> CouncilAnswer:
        decision = self._decide_and_count(payload)
        answers, routing = await self.fan_out(decision, payload)
        prompt_tokens, spec_tokens = _usage(answers)
        if len(answers) == 1:
            (only,) = answers.values()
            return CouncilAnswer(
                only["text"], routing, prompt_tokens, spec_tokens, only["finish_reason"], only.get("logprobs")
            )
        _record_specialist_usage(routing, answers)
        merged = await self._merge(self._merge_payload(payload, answers, routing), routing, answers)
        routing.merged = "merger" not in routing.failed
        routing.synthesis = merged.get("synthesis") if routing.merged else None
        metrics.merge(routing.merged)
        metrics.generated("merger", merged["completion_tokens"])
        if routing.merged:
            routing.answers = {n: a["text"] for n, a in answers.items()}
        return CouncilAnswer(
            merged["text"], routing, prompt_tokens, merged["completion_tokens"], merged.get("finish_reason", "stop")
        )

    async def _merge(self, merge_payload: dict[str, Any], routing: Routing, answers: dict[str, dict]) -> dict:
        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(self.merger.synthesize(merge_payload), self.config.merger.timeout_s)
        except Exception as err:
            # Without a merger the best single answer still serves the user.
            logger.warning("merger failed: %r", err)
            routing.failed["merger"] = describe_failure(err)
            best = self._best(routing, answers)
            return {k: answers[best][k] for k in ("text", "completion_tokens", "finish_reason")}
        finally:
            routing.timings_ms["merge"] = round((time.perf_counter() - t0) * 1000, 2)

    async def _stream_one(self, decision: RoutingDecision, payload: dict[str, Any]) -> AsyncIterator[StreamEvent]:
        """Relay one specialist's stream; a failure before any text is a status code, after it an in-band end."""
        name = decision.specialists[0]
        spec = self.config.specialist(name)
        routing = self._routing(decision)
        sent = False
        retry_after: float | None = None
        refused_by: str | None = None
        source = self.specialists.stream(name, self._payload_for(name, payload))
        t0 = time.perf_counter()
        try:
            async for item in timed_stream(source, spec.ttft_timeout_s, spec.stall_timeout_s):
                if item.get("retries"):
                    routing.retried[name] = item["retries"]
                if "error" in item:
                    kind, message = item["error"]["kind"], item["error"]["message"]
                    break
                if item.get("finish_reason"):
                    routing.used = [name]
                    routing.timings_ms[name] = round((time.perf_counter() - t0) * 1000, 2)  # whole stream
                    metrics.generated(name, item.get("completion_tokens", 0))
                    if item.get("text") or item.get("logprobs"):
                        yield StreamEvent(text=item["text"], logprobs=item.get("logprobs"))
                    yield StreamEvent(
                        done=True,
                        routing=routing,
                        prompt_tokens=item["prompt_tokens"],
                        completion_tokens=item["completion_tokens"],
                        finish_reason=item["finish_reason"],
                    )
                    return
                sent = sent or bool(item["text"])
                yield StreamEvent(text=item["text"], logprobs=item.get("logprobs"))
            else:
                kind, message = "engine", "the stream ended without a finish reason"
        except StreamTimeout as err:
            kind, message = "timeout", str(err)
            metrics.specialist_failure(name, "timeout")
        except Overloaded as err:
            kind, message, retry_after, refused_by = "overloaded", str(err), err.retry_after_s or 1.0, err.refused_by
            metrics.specialist_failure(name, "overloaded")
        except Exception as err:  # a dead replica: degrade to a clear error, never a 500
            logger.warning("specialist %s stream failed: %r", name, err)
            kind, message = "engine", describe_failure(err)
            metrics.specialist_failure(name, metrics.failure_reason(err))
        else:
            if kind != "invalid_request":
                metrics.specialist_failure(name, "error")
        routing.failed[name] = f"{kind}: {message}"
        if not sent:
            if kind == "invalid_request":
                raise CouncilError(400, message, routing=routing)
            raise CouncilError(
                503,
                f"specialist {name!r} failed: {message}",
                type_="service_unavailable",
                code="overloaded" if kind == "overloaded" else "specialists_unavailable",
                routing=routing,
                retry_after_s=retry_after,
                refused_by=refused_by,
            )
        # Part of the answer is out: end it with a valid finish reason and say why in-band.
        yield StreamEvent(
            done=True, routing=routing, finish_reason="length", error=f"specialist {name!r} failed: {kind}: {message}"
        )

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[StreamEvent]:
        """One specialist: its tokens straight through. Several: fan out, then stream the merger."""
        decision = self._decide_and_count(payload)
        if len(decision.specialists) == 1:
            async for event in self._stream_one(decision, payload):
                yield event
            return
        answers, routing = await self.fan_out(decision, payload, streamed=True)
        prompt_tokens, spec_tokens = _usage(answers)
        if len(answers) == 1:
            (only,) = answers.values()
            yield StreamEvent(text=only["text"])
            yield StreamEvent(
                done=True,
                routing=routing,
                prompt_tokens=prompt_tokens,
                completion_tokens=spec_tokens,
                finish_reason=only["finish_reason"],
            )
            return
        routing.merged = True
        _record_specialist_usage(routing, answers)
        sent = False
        t0 = time.perf_counter()
        try:
            async for item in self.merger.stream(self._merge_payload(payload, answers, routing)):
                if "completion_tokens" in item:
                    routing.timings_ms["merge"] = round((time.perf_counter() - t0) * 1000, 2)
                    routing.synthesis = item.get("synthesis")
                    metrics.merge(True)
                    metrics.generated("merger", item["completion_tokens"])
                    routing.answers = {n: a["text"] for n, a in answers.items()}
                    yield StreamEvent(
                        done=True,
                        routing=routing,
                        prompt_tokens=prompt_tokens,
                        completion_tokens=item["completion_tokens"],
                        finish_reason=item.get("finish_reason", "stop"),
                    )
                    return
                sent = sent or bool(item["text"])
                yield StreamEvent(text=item["text"])
        except Exception as err:  # as in answer(): without a merger the best single answer still serves
            logger.warning("merger stream failed: %r", err)
            routing.failed["merger"] = describe_failure(err)
        routing.merged = False
        routing.failed.setdefault("merger", "engine: the merger's stream ended without a finish")
        metrics.merge(False)
        if sent:  # part of a merged answer is out: end it, and say why
            yield StreamEvent(
                done=True, routing=routing, finish_reason="length", error=f"merger failed: {routing.failed['merger']}"
            )
            return
        best = self._best(routing, answers)
        yield StreamEvent(text=answers[best]["text"])
        yield StreamEvent(
            done=True,
            routing=routing,
            prompt_tokens=prompt_tokens,
            completion_tokens=answers[best]["completion_tokens"],
            finish_reason=answers[best]["finish_reason"],
        )
