"""ASGI middleware for the ingress: request id in and out (and on every log line), metrics, access log, admission."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from typing import Any

from deployments import metrics
from deployments.logging_setup import new_request_id, request_id_var, valid_request_id
from deployments.protocol import error_body

logger = logging.getLogger(__name__)

HEADER = b"x-request-id"
# Which bound refused a 503 "overloaded": "ingress" (this replica's total), "specialist" (this replica's share
# of one specialist deployment), "queue" (Ray's queue behind the deployment handle, the backstop).
REFUSED_BY = "x-refused-by"


class RetryAfter:
    """The Retry-After value of one refusal: whole seconds drawn in [ceil(r), ceil(r x (1 + spread))].

    Real clients (openai-python) wait exactly Retry-After, so refusals answered in the same second come
    back in the same second, as a herd; a spread per refusal thins the herd on the server side. spread 0
    (the default) gives ceil(r) every time. The generator is seeded so tests can check the draw.
    """

    def __init__(self, spread: float = 0.0, seed: int | None = None) -> None:
        self.configure(spread, seed)

    def configure(self, spread: float, seed: int | None = None) -> None:
        self.spread, self.rng = spread, random.Random(seed)

    def range(self, retry_after_s: float | None) -> tuple[int, int]:
        """The whole seconds a refusal's Retry-After is drawn in (the HAProxy front draws in the same range)."""
        low = max(1, math.ceil(retry_after_s or 1.0))  # whole seconds, rounded up (RFC 9110), never 0
        return low, max(low, math.ceil((retry_after_s or 1.0) * (1 + self.spread)))

    def seconds(self, retry_after_s: float | None) -> int:
        low, high = self.range(retry_after_s)
        return low if high == low else self.rng.randint(low, high)


retry_after = RetryAfter()  # this process's draw; the ingress configures it from server.retry_after_spread


class RequestContextMiddleware:
    """Binds X-Request-Id (the client's, or a new one) to the request, counts every response by status.

    Behind Ray Serve's HTTP proxy the header is always present: the proxy keeps the client's value or
    makes one, and echoes it on the response itself, so we add the response header only when we made
    the id here (the app served without the proxy). An id that is too long or has characters unsafe in
    a log line or header is a 400, not silently replaced: the client would otherwise lose track of it.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(HEADER)
        rid = given.decode("latin-1") if given is not None else new_request_id()
        endpoint = metrics.endpoint_label(scope.get("path", ""))
        if not valid_request_id(rid):
            body = error_body(
                "X-Request-Id must be 1-128 characters from A-Z a-z 0-9 . _ : -", "invalid_request_error", None
            )
            await _send_json(send, 400, body)
            metrics.request(endpoint, "none", 400)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["t0"] = time.perf_counter()
        token = request_id_var.set(rid)
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers") or [])
                if given is None:
                    headers.append((HEADER, rid.encode()))
                    message = {**message, "headers": headers}
                model = state.get("model_label", "none")
                metrics.request(endpoint, model, status)
                if status == 503 and any(k.lower() == b"retry-after" for k, _ in headers):
                    metrics.backpressure(endpoint)
                logger.debug(  # Serve's access log has the same line at INFO, without the model
                    "%s %s -> %d in %.1f ms (model=%s)",
                    scope.get("method"),
                    scope.get("path"),
                    status,
                    (time.perf_counter() - state["t0"]) * 1000,
                    model,
                )
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def overloaded_body(bound: int) -> dict[str, Any]:
    """The OpenAI-shaped body of a refusal at a total bound (the ingress's, and the HAProxy front's)."""
    return error_body(
        f"the service is at capacity ({bound} requests in flight); retry later", "service_unavailable", "overloaded"
    )


class Admission:
    """The ingress replica's bound on completions in flight; `configure` sets it when the replica starts."""

    # Only these do model work; /health, /v1/models, /v1/route stay answerable under any load.
    PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

    def __init__(self) -> None:
        self.bound: int | None = None  # None: no bound (the app served without a config)
        self.retry_after_s = 1.0
        self.inflight = 0
        self.admitted = 0
        self.refused = 0

    def configure(self, bound: int, retry_after_s: float) -> None:
        self.bound, self.retry_after_s = bound, retry_after_s

    def stats(self) -> dict[str, int | None]:
        return {"inflight": self.inflight, "bound": self.bound, "admitted": self.admitted, "refused": self.refused}


class AdmissionMiddleware:
    """Refuses a completion with 503 + Retry-After before any parsing or routing when the bound is full.

    A refusal here costs microseconds of this replica's loop; past this point a request would be parsed,
    validated and routed before a specialist's queue refused it. The counter is released in `finally`,
    so a finished, failed, streamed, timed-out or disconnected (cancelled) request always gives its slot back.
    """

    def __init__(self, app: Any, admission: Admission) -> None:
        self.app, self.admission = app, admission

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        a = self.admission
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix: match the route, not the prefix
            path = path[len(root) :]
        if scope["type"] != "http" or a.bound is None or path not in Admission.PATHS:
            await self.app(scope, receive, send)
            return
        if a.inflight >= a.bound:
            a.refused += 1
            body = overloaded_body(a.bound)
            retry = str(retry_after.seconds(a.retry_after_s)).encode()
            await _send_json(send, 503, body, [(b"retry-after", retry), (REFUSED_BY.encode(), b"ingress")])
            return
        a.inflight += 1
        a.admitted += 1
        try:
            await self.app(scope, receive, send)
        finally:
            a.inflight -= 1


class SpecialistAdmission:
    """This ingress replica's requests in flight to each specialist deployment, against its share of what
    that deployment can hold; checked before any handle call.

    Without it a request to a full specialist is refused by Ray's queue bound behind the deployment handle,
    on the handle's router thread, where it waits behind the scheduling of every queued request (docs/engines.md,
    round 3: p99 0.5-0.8 s). Here the refusal costs a dict lookup. Ray's bound stays as the backstop.
    """

    def __init__(self, capacity: dict[str, int] | None = None, retry_after_s: dict[str, float] | None = None) -> None:
        self.capacity = dict(capacity or {})  # deployment -> slots; a deployment not named here is not bounded
        self.retry_after_s = dict(retry_after_s or {})
        self.inflight = dict.fromkeys(self.capacity, 0)
        self.admitted = dict.fromkeys(self.capacity, 0)
        self.refused = dict.fromkeys(self.capacity, 0)
        self.queue_refused = dict.fromkeys(self.capacity, 0)  # Ray's backstop refused what this let through
        # (our in-flight count, Ray's num_queued_requests) at the last queue refusals: why the backstop fired
        self.queue_refusals: list[tuple[int, int]] = []

    def acquire(self, deployment: str) -> bool:
        """Take a slot; False (and counted as refused) when the deployment's share is full."""
        cap = self.capacity.get(deployment)
        if cap is None:
            return True
        if self.inflight[deployment] >= cap:
            self.refused[deployment] += 1
            return False
        self.inflight[deployment] += 1
        self.admitted[deployment] += 1
        return True

    def release(self, deployment: str) -> None:
        if deployment in self.capacity:
            self.inflight[deployment] -= 1

    def queue_refusal(self, deployment: str, num_queued: int | None) -> None:
        if deployment in self.capacity:
            self.queue_refused[deployment] += 1
            self.queue_refusals = [*self.queue_refusals[-63:], (self.inflight[deployment], num_queued or -1)]

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            d: {
                "inflight": self.inflight[d],
                "capacity": self.capacity[d],
                "admitted": self.admitted[d],
                "refused": self.refused[d],
                "queue_refused": self.queue_refused[d],
            }
            for d in self.capacity
        }


async def _send_json(send: Any, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})
