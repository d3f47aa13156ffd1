"""Every Prometheus metric Consilium exports, defined in one place (ray.serve.metrics; Ray adds a `ray_` prefix).

Label values are bounded by construction: endpoint (a fixed route list), model (`auto` or a configured
specialist), status (an HTTP code), domain (the router's domains), specialist (configured names), reason
(a fixed list). Never a request id, prompt or user. Ray Serve adds `deployment`, `replica` and
`application` to each series by itself.

Recording is a no-op until `enable()` runs: the Serve deployments call it in their constructors, so the
same council code used by the in-process pipeline (no Ray) records nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Routes the ingress serves; any other path is counted as "other" so a scanner cannot grow the label set.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/route", "/v1/models", "/health", "/")
FAILURE_REASONS = ("error", "timeout", "dead_replica", "overloaded")

# Milliseconds. The router costs well under a millisecond; a generation takes tens of ms to a minute.
ROUTER_MS = [0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25]
REQUEST_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
TOKEN_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2500]


@dataclass
class _Metrics:
    """The metric objects; created once per process by enable()."""

    requests: Any
    routing_domain: Any
    routing_specialist: Any
    fallbacks: Any
    pins: Any
    merges: Any
    specialist_failures: Any
    backpressure: Any
    generated_tokens: Any
    router_latency: Any
    specialist_latency: Any
    ttft: Any
    inter_token: Any
    engine_running: Any
    engine_waiting: Any


_metrics: _Metrics | None = None
_lock = threading.Lock()


def enable() -> None:
    """Create the metric objects (idempotent). Call inside a Ray worker: a Serve replica's constructor."""
    global _metrics
    with _lock:
        if _metrics is not None:
            return
        from ray.serve.metrics import Counter, Gauge, Histogram

        _metrics = _Metrics(
            requests=Counter(
                "consilium_requests_total",
                description="HTTP requests answered by the ingress, by endpoint, model and status code.",
                tag_keys=("endpoint", "model", "status"),
            ),
            routing_domain=Counter(
                "consilium_routing_domain_total",
                description="Routed (model=auto) requests by the router's top-scoring domain.",
                tag_keys=("domain",),
            ),
            routing_specialist=Counter(
                "consilium_routing_specialist_total",
                description="Specialists chosen for requests (routed or pinned); a fan-out counts each one.",
                tag_keys=("specialist",),
            ),
            fallbacks=Counter(
                "consilium_routing_fallbacks_total",
                description="Routed requests where no domain passed its threshold: the fallback specialist answered.",
                tag_keys=("specialist",),
            ),
            pins=Counter(
                "consilium_routing_pins_total",
                description="Requests that named a specialist (model=<name>) and bypassed the router.",
                tag_keys=("specialist",),
            ),
            merges=Counter(
                "consilium_merges_total",
                description="Merges of several answers: status ok, or failed (the best single answer was served).",
                tag_keys=("status",),
            ),
            specialist_failures=Counter(
                "consilium_specialist_failures_total",
                description="Specialist calls that failed, by reason: error, timeout, dead_replica, overloaded.",
                tag_keys=("specialist", "reason"),
            ),
            backpressure=Counter(
                "consilium_backpressure_rejections_total",
                description="Requests answered 503 with Retry-After because a queue was full.",
                tag_keys=("endpoint",),
            ),
            generated_tokens=Counter(
                "consilium_generated_tokens_total",
                description="Tokens generated, by specialist (the merger's synthesis counts as 'merger').",
                tag_keys=("specialist",),
            ),
            router_latency=Histogram(
                "consilium_router_latency_ms",
                description="Time to score a prompt with tiny ada and apply the policy, in ms.",
                boundaries=ROUTER_MS,
            ),
            specialist_latency=Histogram(
                "consilium_specialist_latency_ms",
                description="Wall time of one specialist call as the council sees it (non-streamed), in ms.",
                boundaries=REQUEST_MS,
                tag_keys=("specialist",),
            ),
            ttft=Histogram(
                "consilium_time_to_first_token_ms",
                description="Streamed requests: time from arrival at the ingress to the first text chunk, in ms.",
                boundaries=REQUEST_MS,
                tag_keys=("model",),
            ),
            inter_token=Histogram(
                "consilium_inter_token_latency_ms",
                description="Streamed requests: time between successive text chunks, in ms.",
                boundaries=TOKEN_MS,
                tag_keys=("model",),
            ),
            engine_running=Gauge(
                "consilium_engine_running_requests",
                description="Requests in the HF engine's running batch (per replica).",
            ),
            engine_waiting=Gauge(
                "consilium_engine_waiting_requests",
                description="Requests waiting for the HF engine (per replica).",
            ),
        )


def enabled() -> bool:
    return _metrics is not None


def endpoint_label(path: str) -> str:
    """A bounded endpoint label: the route itself for known routes (any mount prefix removed), else 'other'."""
    for route in ENDPOINTS:
        if route != "/" and path.endswith(route):
            return route
    return "/" if path.endswith("/") or path == "" else "other"


def model_label(model: Any, known: Iterable[str]) -> str:
    """`auto` or a configured specialist; anything a client made up is 'unknown'."""
    return model if isinstance(model, str) and (model == "auto" or model in known) else "unknown"


# ---- recording (each a no-op until enable()) ----------------------------------------------------------


def request(endpoint: str, model: str, status: int) -> None:
    if _metrics is not None:
        _metrics.requests.inc(tags={"endpoint": endpoint, "model": model, "status": str(status)})


def backpressure(endpoint: str) -> None:
    if _metrics is not None:
        _metrics.backpressure.inc(tags={"endpoint": endpoint})


def routing_latency(ms: float) -> None:
    if _metrics is not None:
        _metrics.router_latency.observe(ms)


def decision(specialists: list[str], scores: dict[str, float], fell_back: bool, pinned: bool) -> None:
    """One routing decision that is about to be served."""
    if _metrics is None:
        return
    if pinned:
        _metrics.pins.inc(tags={"specialist": specialists[0]})
    elif scores:
        _metrics.routing_domain.inc(tags={"domain": max(scores, key=scores.__getitem__)})
    if fell_back:
        _metrics.fallbacks.inc(tags={"specialist": specialists[0]})
    for name in specialists:
        _metrics.routing_specialist.inc(tags={"specialist": name})


def specialist_call(name: str, ms: float, tokens: int) -> None:
    """A specialist answered: its latency and the tokens it generated."""
    if _metrics is None:
        return
    _metrics.specialist_latency.observe(ms, tags={"specialist": name})
    generated(name, tokens)


def generated(name: str, tokens: int) -> None:
    if _metrics is not None and tokens > 0:
        _metrics.generated_tokens.inc(tokens, tags={"specialist": name})


def specialist_failure(name: str, reason: str) -> None:
    if _metrics is not None:
        _metrics.specialist_failures.inc(
            tags={"specialist": name, "reason": reason if reason in FAILURE_REASONS else "error"}
        )


def merge(ok: bool) -> None:
    if _metrics is not None:
        _metrics.merges.inc(tags={"status": "ok" if ok else "failed"})


def first_token(model: str, ms: float) -> None:
    if _metrics is not None:
        _metrics.ttft.observe(ms, tags={"model": model})


def inter_token(model: str, ms: float) -> None:
    if _metrics is not None:
        _metrics.inter_token.observe(ms, tags={"model": model})


def engine_load(running: int, waiting: int) -> None:
    """The hook an engine (scheduler) calls whenever its running batch or waiting queue changes."""
    if _metrics is not None:
        _metrics.engine_running.set(running)
        _metrics.engine_waiting.set(waiting)


def failure_reason(err: BaseException) -> str:
    """Map an exception from a specialist call onto a bounded reason label."""
    import asyncio

    if isinstance(err, asyncio.TimeoutError | TimeoutError):
        return "timeout"
    names = {type(err).__name__, type(getattr(err, "cause", None) or err).__name__}
    if names & {"ActorDiedError", "ActorUnavailableError", "RayActorError", "ActorUnschedulableError"}:
        return "dead_replica"
    if "BackPressureError" in names:
        return "overloaded"
    return "error"
