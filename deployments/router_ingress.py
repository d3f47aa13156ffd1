"""Router ingress: the OpenAI-compatible HTTP API in front of the council (FastAPI on Ray Serve)."""

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import metrics
from deployments.config import GraphConfig
from deployments.council import Council, CouncilError, StreamEvent
from deployments.logging_setup import configure_logging
from deployments.middleware import RequestContextMiddleware
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RouteRequest,
    error_body,
    now,
)
from router.model import RouterInputError

logger = logging.getLogger(__name__)


class HandleSpecialists:
    """SpecialistClient over Serve handles: specialist name -> its group's deployment."""

    def __init__(self, handles: dict[str, DeploymentHandle], group_of: dict[str, str]) -> None:
        self.handles, self.group_of = handles, group_of

    async def generate(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.handles[self.group_of[name]].generate.remote(payload)

    async def stream(self, name: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in self.handles[self.group_of[name]].options(stream=True).stream.remote(payload):
            yield item


class HandleMerger:
    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def synthesize(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.handle.synthesize.remote(payload)

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in self.handle.options(stream=True).stream.remote(payload):
            yield item


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    routing: dict | None = None,
) -> JSONResponse:
    body = error_body(message, type_, code, param)
    if routing is not None:
        body["routing"] = routing
    return JSONResponse(body, status_code=status)


def _validation_message(err: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first['msg']}" if param else first["msg"]), param


app = FastAPI(title="Consilium", description="A council of specialist language models, OpenAI-compatible.")
app.add_middleware(RequestContextMiddleware)  # X-Request-Id in/out, request metrics, access log


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    # Unknown paths and wrong methods get the OpenAI error shape too, not FastAPI's {"detail": ...}.
    return error_response(
        err.status_code,
        f"{request.method} {request.url.path}: {err.detail}",
        code="not_found" if err.status_code == 404 else None,
    )


@app.exception_handler(RequestValidationError)
async def _on_validation(request: Request, err: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(err)
    return error_response(400, message, param=param)


@serve.deployment(name="router", ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class RouterIngress:
    """Validates, routes with tiny ada, dispatches to specialists and the merger, formats OpenAI responses."""

    def __init__(
        self, config: dict[str, Any], specialists: dict[str, DeploymentHandle], merger: DeploymentHandle
    ) -> None:
        configure_logging()
        metrics.enable()
        self.config = GraphConfig.model_validate(config)
        group_of = {s.name: g for g, members in self.config.groups().items() for s in members}
        self.council = Council(self.config, HandleSpecialists(specialists, group_of), HandleMerger(merger))
        self.token_limit = min(s.generation.max_new_tokens_limit for s in self.config.specialists)

    # ---- request plumbing ----------------------------------------------------------------------------

    def _auth(self, request: Request) -> JSONResponse | None:
        key = self.config.server.api_key
        if key is None:
            return None
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return error_response(
                401,
                "missing or invalid API key (Authorization: Bearer ...)",
                type_="authentication_error",
                code="invalid_api_key",
            )
        return None

    async def _body(self, request: Request, schema: type) -> Any:
        """Parse and validate the JSON body; a JSONResponse on any client mistake."""
        denied = self._auth(request)
        if denied is not None:
            return denied
        limit = self.config.server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return error_response(
                413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large"
            )
        raw = await request.body()
        if len(raw) > limit:
            return error_response(
                413, f"request body is {len(raw)} bytes; the limit is {limit}", code="request_too_large"
            )
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return error_response(400, f"request body is not valid JSON: {err}")
        if not isinstance(data, dict):
            return error_response(400, f"request body must be a JSON object, got {type(data).__name__}")
        try:
            parsed = schema.model_validate(data)
        except ValidationError as err:
            message, param = _validation_message(err)
            return error_response(400, message, param=param)
        request.state.model_label = metrics.model_label(getattr(parsed, "model", None), self.council.names)
        return parsed

    def _payload(self, req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any] | JSONResponse:
        cap = req.token_cap()
        if cap is not None and cap > self.token_limit:
            return error_response(400, f"max_tokens={cap} exceeds the limit of {self.token_limit}", param="max_tokens")
        payload: dict[str, Any] = {
            "model": req.model,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_tokens": cap,
            "stop": req.stop,
            "seed": req.seed,
        }
        if isinstance(req, ChatCompletionRequest):
            try:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            except ValueError as err:
                return error_response(400, str(err), param="messages")
            if len(messages) > self.config.server.max_messages:
                return error_response(
                    400, f"{len(messages)} messages; the limit is {self.config.server.max_messages}", param="messages"
                )
            if not any(m["content"].strip() for m in messages if m["role"] == "user"):
                return error_response(400, "messages need at least one non-empty user message", param="messages")
            payload["messages"] = messages
            size = sum(len(m["content"]) for m in messages)
        else:
            if not req.prompt.strip():
                return error_response(400, "prompt is empty", param="prompt")
            payload["prompt"] = req.prompt
            size = len(req.prompt)
        if size > self.config.server.max_prompt_chars:
            return error_response(
                400,
                f"prompt is {size} characters; the limit is {self.config.server.max_prompt_chars}",
                param="messages" if "messages" in payload else "prompt",
            )
        return payload

    @staticmethod
    def _council_error(err: CouncilError) -> JSONResponse:
        return error_response(
            err.status, err.message, err.type, err.code, routing=err.routing.model_dump() if err.routing else None
        )

    async def _complete(self, request: Request, schema: type, chat: bool) -> Any:
        req = await self._body(request, schema)
        if isinstance(req, JSONResponse):
            return req
        payload = self._payload(req)
        if isinstance(payload, JSONResponse):
            return payload
        payload["request_id"] = rid = request.state.request_id  # every specialist and the merger get it
        try:
            if req.stream:
                return await self._streaming(payload, chat, req, request.state.t0)
            result = await self.council.answer(payload)
        except CouncilError as err:
            return self._council_error(err)
        except RouterInputError as err:
            return error_response(400, str(err))
        model = payload["model"]
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
            obj = "text_completion"
        return {
            "id": rid,
            "object": obj,
            "created": now(),
            "model": model,
            "choices": [choice],
            "usage": usage,
            "routing": result.routing.model_dump(),
        }

    async def _streaming(self, payload: dict[str, Any], chat: bool, req: Any, t0: float) -> Any:
        events = self.council.stream(payload)
        # Pull the first event before answering, so routing and specialist errors still get a status code.
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            return error_response(503, "no answer was produced", type_="service_unavailable")
        cid, created, model = payload["request_id"], now(), payload["model"]
        label = metrics.model_label(model, self.council.names)
        last = t0
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(ev: StreamEvent, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ev.text} if role else {"content": ev.text}
                if ev.done:
                    delta = {}
                choice = {"index": 0, "delta": delta, "finish_reason": ev.finish_reason if ev.done else None}
                obj = "chat.completion.chunk"
            else:
                choice = {
                    "index": 0,
                    "text": ev.text,
                    "finish_reason": ev.finish_reason if ev.done else None,
                    "logprobs": None,
                }
                obj = "text_completion"
            body: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice]}
            if ev.done:
                body["routing"] = ev.routing.model_dump() if ev.routing else None
                if include_usage:
                    body["usage"] = {
                        "prompt_tokens": ev.prompt_tokens,
                        "completion_tokens": ev.completion_tokens,
                        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
                    }
            return f"data: {json.dumps(body)}\n\n"

        def timed(ev: StreamEvent) -> None:
            # Time to first token, then the gap between text chunks (about one token each).
            nonlocal last
            if ev.text:
                t = time.perf_counter()
                (metrics.first_token if last == t0 else metrics.inter_token)(label, (t - last) * 1000)
                last = t

        async def sse() -> AsyncIterator[str]:
            timed(first)
            yield chunk(first, role=True)
            if not first.done:
                try:
                    async for ev in events:
                        timed(ev)
                        yield chunk(ev)
                except Exception as err:  # headers are sent: report in-band, then end the stream cleanly
                    logger.warning("stream failed: %r", err)
                    yield f"data: {json.dumps(error_body(str(err), 'server_error'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    # ---- routes --------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._complete(request, ChatCompletionRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._complete(request, CompletionRequest, chat=False)

    @app.post("/v1/route")
    async def route(self, request: Request) -> Any:
        req = await self._body(request, RouteRequest)
        if isinstance(req, JSONResponse):
            return req
        if req.messages:
            users = [m.text() for m in req.messages if m.role == "user"]
            text = users[-1] if users else ""
        else:
            text = req.prompt or ""
        try:
            decision = self.council.decide(req.model, text)
        except CouncilError as err:
            return self._council_error(err)
        except RouterInputError as err:
            return error_response(400, str(err))
        return {"object": "routing", "routing": Council._routing(decision).model_dump()}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Any:
        denied = self._auth(request)
        if denied is not None:
            return denied
        names = ["auto", *self.council.names]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "consilium"} for n in names],
        }

    @app.get("/", include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        from deployments.web import playground_html

        return HTMLResponse(playground_html())

    @app.get("/health")
    async def health(self) -> Any:
        return {"status": "ok", "specialists": self.council.names}
