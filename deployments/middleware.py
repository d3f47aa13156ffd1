"""ASGI middleware for the ingress: the request id in and out (and on every log line), request metrics, access log."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from deployments import metrics
from deployments.logging_setup import new_request_id, request_id_var, valid_request_id
from deployments.protocol import error_body

logger = logging.getLogger(__name__)

HEADER = b"x-request-id"


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


async def _send_json(send: Any, status: int, body: dict) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": raw})
