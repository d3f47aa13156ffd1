"""Router ingress: the OpenAI-compatible HTTP API in front of the council (FastAPI on Ray Serve)."""

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import SecretStr, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import memory, metrics
from deployments.config import GraphConfig
from deployments.council import Council, CouncilError, Overloaded, StreamEvent
from deployments.images import ImageError, limits_payload, load_images
from deployments.logging_setup import configure_logging
from deployments.middleware import (
    REFUSED_BY,
    Admission,
    AdmissionMiddleware,
    RequestContextMiddleware,
    SpecialistAdmission,
    retry_after,
)
from deployments.protocol import (
    SEED_MAX,
    BodyError,
    ChatCompletionRequest,
    CompletionRequest,
    RouteRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    now,
    parse_json_body,
)
from router.model import RouterInputError

logger = logging.getLogger(__name__)


# A replica that died (SIGKILL, OOM, node loss) under a request: nothing of the answer reached the
# client yet, so the request goes again; Serve routes it to another replica or the restarted one.
# The back-off spans ~20 s: until Serve's controller notices the death, the handle may still pick the
# dead replica and fail at once. The council's per-specialist timeout bounds it all for fan-outs.
REPLICA_GONE = (RayActorError, ReplicaUnavailableError)
RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 2.0, 4.0, 4.0, 8.0)


class HandleSpecialists:
    """SpecialistClient over Serve handles: specialist name -> its group's deployment.

    Generation is idempotent, so a request whose replica died is retried (a stream only until its
    first item: after that the client has text and the council ends it in-band). The number of
    retries rides back on the result as "retries".
    """

    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        group_of: dict[str, str],
        admission: SpecialistAdmission | None = None,
    ) -> None:
        self.handles, self.group_of = handles, group_of
        self.admission = admission or SpecialistAdmission()

    @contextlib.contextmanager
    def _slot(self, group: str) -> Iterator[None]:
        """A slot of the group's share for the request's whole life, or Overloaded at once (the handle is
        never called). Answered, failed, timed out, cancelled or closed by the consumer: the slot comes back."""
        if not self.admission.acquire(group):
            cap = self.admission.capacity[group]
            raise Overloaded(
                f"specialist deployment {group!r} is at capacity ({cap} requests in flight from this ingress replica)",
                self.admission.retry_after_s.get(group),
                refused_by="specialist",
            )
        try:
            yield
        finally:
            self.admission.release(group)

    def _backpressure(self, group: str, err: BackPressureError) -> Overloaded:
        num_queued = err.args[0] if err.args and isinstance(err.args[0], int) else None
        self.admission.queue_refusal(group, num_queued)
        return Overloaded(err.message, err.retry_after_s, refused_by="queue")

    async def generate(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        group = self.group_of[name]
        with self._slot(group):
            for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
                try:
                    result = await self.handles[group].generate.remote(payload)
                    return {**result, "retries": attempt} if attempt else result
                except BackPressureError as err:  # this caller's queue for that deployment is full
                    raise self._backpressure(group, err) from None
                except REPLICA_GONE as err:
                    if delay is None:
                        raise
                    logger.warning("specialist %s replica gone (%s); retry %d", name, type(err).__name__, attempt + 1)
                    await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def stream(self, name: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        group = self.group_of[name]
        with self._slot(group):  # one generator: no extra hop per streamed item for the slot
            for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
                started = False
                response = self.handles[group].options(stream=True).stream.remote(payload)
                finished = False
                try:
                    async for item in response:
                        if not started and attempt:
                            item = {**item, "retries": attempt}
                        started = True
                        yield item
                    finished = True
                    return
                except BackPressureError as err:
                    raise self._backpressure(group, err) from None
                except REPLICA_GONE as err:
                    finished = True  # that replica is gone: nothing to cancel
                    if started or delay is None:
                        raise
                    logger.warning("specialist %s replica gone (%s); retry %d", name, type(err).__name__, attempt + 1)
                    await asyncio.sleep(delay)
                finally:
                    if not finished:  # consumer gone or timed out: cancel the replica's generator (frees its slot)
                        response.cancel()


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
    retry_after_s: float | None = None,
    refused_by: str | None = None,
) -> JSONResponse:
    # Error text may quote client input; escape what UTF-8 cannot carry rather than fail with a 500.
    body = error_body(message.encode("utf-8", "backslashreplace").decode(), type_, code, param)
    if routing is not None:
        body["routing"] = routing
    # Retry-After takes whole seconds (RFC 9110), rounded up so a client never retries too early (and spread
    # when server.retry_after_spread says so).
    headers = {"Retry-After": str(retry_after.seconds(retry_after_s))} if retry_after_s is not None else None
    if refused_by is not None and headers is not None:
        headers[REFUSED_BY] = refused_by
    return JSONResponse(body, status_code=status, headers=headers)


def _clean_loc(loc: tuple[Any, ...]) -> list[str]:
    """A pydantic error location as a client's path: no union branch names, no repeated part-type tags
    (messages.0.content.list[...].1.image_url.image_url.url -> messages.0.content.1.image_url.url)."""
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and "[" in p)]
    out = []
    for i, p in enumerate(parts):
        tag = i and isinstance(parts[i - 1], int) and i + 1 < len(parts) and parts[i + 1] == p
        if not tag:
            out.append(str(p))
    return out


def _validation_message(err: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    errors = err.errors()
    # Content may be a string or a list of parts: the error deepest in the body names what is wrong
    # (an image part's bad field), not "content: should be a valid string".
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if len(errors) > 1 else errors[0]
    loc = _clean_loc(tuple(first.get("loc", ())))
    # param names the top-level field (what a client set); the message carries the full path.
    path = ".".join(loc)
    return (f"{path}: {first['msg']}" if path else first["msg"]), (loc[0] if loc else None)


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its $defs substituted in place (OpenAPI resolves $ref from the document root)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _body_doc(model: type) -> dict[str, Any]:
    # Routes read the raw body (size limit, depth limit, strict JSON) before pydantic sees it; this
    # puts the request schema in /openapi.json anyway, for clients and for schemathesis.
    schema = _inline_refs(model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# /docs and /openapi.json are served by the ingress itself, behind the API key when auth is on.
app = FastAPI(
    title="Consilium",
    description="A council of specialist language models, OpenAI-compatible.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    redirect_slashes=False,  # "/v1/models/" is a 404 like any unknown path, not a 307 to follow
)
admission = Admission()  # this replica's completions in flight; its bound is set from the config in __init__
app.add_middleware(AdmissionMiddleware, admission=admission)  # inner: refusals still get an id and metrics
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
        memory.configure()  # glibc heap trimmer (RSS follows live memory); CONSILIUM_TRACEMALLOC=1 to diagnose
        self.config = GraphConfig.model_validate(config)
        group_of = {s.name: g for g, members in self.config.groups().items() for s in members}
        retry_of = {g: members[0].deployment.retry_after_s for g, members in self.config.groups().items()}
        self.specialist_admission = SpecialistAdmission(self.config.specialist_capacity(), retry_of)
        self.council = Council(
            self.config, HandleSpecialists(specialists, group_of, self.specialist_admission), HandleMerger(merger)
        )
        self.token_limit = min(s.generation.max_new_tokens_limit for s in self.config.specialists)
        self._api_key: SecretStr | None = self.config.server.read_api_key()
        # Optional OpenAI features every engine provides: HF and vLLM both report logprobs and both
        # constrain output to a response_format (xgrammar masks in the HF engine; vLLM's structured outputs).
        self.supported: frozenset[str] = frozenset({"logprobs", "response_format"})
        admission.configure(self.config.ingress_bound(), self.config.server.deployment.retry_after_s)
        retry_after.configure(self.config.server.retry_after_spread)

    def admission_stats(self) -> dict[str, Any]:
        """Completions in flight on this replica, its bound, how many were admitted and refused; the same
        per specialist deployment under "specialists" (with the refusals of Ray's queue behind it), and the
        (in flight, Ray's num_queued_requests) pairs of the last queue refusals."""
        return {
            **admission.stats(),
            "specialists": self.specialist_admission.stats(),
            "queue_refusals": list(self.specialist_admission.queue_refusals),
        }

    # ---- request plumbing ----------------------------------------------------------------------------

    def _auth(self, request: Request) -> JSONResponse | None:
        if self._api_key is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        expected = self._api_key.get_secret_value().encode()
        # Compare in constant time whatever the scheme, so the timing says nothing about the key.
        good = hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected)
        if not (good and scheme.lower() == "bearer"):
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
        ctype = request.headers.get("content-type")
        if ctype is not None:
            media = ctype.split(";")[0].strip().lower()
            if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
                return error_response(
                    415,
                    f"Content-Type {ctype[:80]!r} is not supported; send application/json",
                    code="unsupported_media_type",
                )
        try:
            raw = await self._read_limited(request)
            data = parse_json_body(raw)
        except BodyError as err:
            code = "request_too_large" if err.status == 413 else None
            return error_response(err.status, str(err), code=code, param=err.param)
        try:
            req = schema.model_validate(data)
        except ValidationError as err:
            message, param = _validation_message(err)
            return error_response(400, message, param=param)
        request.state.model_label = metrics.model_label(getattr(req, "model", None), self.council.names)
        refused = req.refused_field(self.supported) if hasattr(req, "refused_field") else None
        if refused is not None:
            return error_response(400, refused[1], param=refused[0], code="unsupported_parameter")
        return req

    async def _read_limited(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the limit, whether declared or sent chunked."""
        limit = self.config.server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise BodyError(f"Content-Length {declared[:40]!r} is not a byte count")
            if int(declared) > limit:
                raise BodyError(f"request body is {declared} bytes; the limit is {limit}", status=413)
        buf = bytearray()
        async for part in request.stream():
            buf += part
            if len(buf) > limit:  # a chunked body has no Content-Length: stop reading here, not at the end
                raise BodyError(f"request body is over {limit} bytes; the limit is {limit}", status=413)
        return bytes(buf)

    def _payload(self, req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any] | JSONResponse:
        cap = req.token_cap()
        if cap is not None and cap > self.token_limit:
            name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            return error_response(400, f"{name}={cap} exceeds the limit of {self.token_limit}", param=name)
        payload: dict[str, Any] = {
            "model": req.model,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_tokens": cap,
            "stop": req.stop,
            "seed": req.seed,
            "logprobs": req.logprobs_k(),
        }
        if req.response_format is not None and req.response_format.constrained:
            # JSON text: the engines compile it against their own tokenizer (HF: xgrammar; vLLM: its backend).
            payload["response_format"] = json.dumps(req.response_format.model_dump(mode="json", by_alias=True))
        if isinstance(req, ChatCompletionRequest):
            try:
                # Text stays a string; a message with images becomes HF chat-template parts ({"type": "image"}
                # placeholders), whose pixels travel in payload["images"] once validated (_with_images).
                messages = [{"role": m.role, "content": m.engine_content()} for m in req.messages]
            except ValueError as err:
                return error_response(400, str(err), param="messages")
            if len(messages) > self.config.server.max_messages:
                return error_response(
                    400, f"{len(messages)} messages; the limit is {self.config.server.max_messages}", param="messages"
                )
            if not any(m.text().strip() or m.image_urls() for m in req.messages if m.role == "user"):
                return error_response(400, "messages need at least one non-empty user message", param="messages")
            payload["messages"] = messages
            size = sum(len(m.text()) for m in req.messages)
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

    async def _with_images(self, payload: dict[str, Any], urls: list[str]) -> dict[str, Any] | JSONResponse:
        """Refuse what cannot be served before any image is touched (count, modality), then fetch and
        validate every image; the payload carries the validated encoded bytes to the specialist."""
        limits = self.config.server.images
        if len(urls) > limits.max_images:
            return error_response(
                400,
                f"{len(urls)} images in one request; the limit is {limits.max_images}",
                "invalid_request_error",
                "too_many_images",
                "messages",
            )
        try:
            self.council.check_images(payload["model"], len(urls))
        except CouncilError as err:
            return self._council_error(err, param="model" if payload["model"] != "auto" else "messages")
        try:
            loaded = await load_images(urls, limits)
        except ImageError as err:
            return error_response(400, err.message, code=err.code, param="messages")
        # Counts and sizes only: image bytes never reach a log line or a metric.
        logger.info("images: %s", ", ".join(f"{i.format} {i.width}x{i.height} {i.nbytes}B" for _, i in loaded))
        return {**payload, "images": [b for b, _ in loaded], "image_limits": limits_payload(limits)}

    @staticmethod
    def _council_error(err: CouncilError, param: str | None = None) -> JSONResponse:
        return error_response(
            err.status,
            err.message,
            err.type,
            err.code,
            param=param,
            routing=err.routing.model_dump() if err.routing else None,
            retry_after_s=err.retry_after_s,
            refused_by=err.refused_by,
        )

    async def _complete(self, request: Request, schema: type, chat: bool) -> Any:
        req = await self._body(request, schema)
        if isinstance(req, JSONResponse):
            return req
        payload = self._payload(req)
        if isinstance(payload, JSONResponse):
            return payload
        if chat and (urls := req.image_urls()):
            payload = await self._with_images(payload, urls)
            if isinstance(payload, JSONResponse):
                return payload
        payload["request_id"] = rid = request.state.request_id  # every specialist and the merger get it
        deadline = time.monotonic() + self.config.server.request_timeout_s
        try:
            if req.stream:
                return await self._streaming(payload, chat, req, deadline, request.state.t0)
            # The whole request, fan-out and merge included, ends by the deadline; cancelling it cancels
            # the specialists' calls, which drops their rows from the engines at the next step.
            if req.n == 1:
                answers = [self.council.answer(payload)]
            else:
                # n choices are n independent council answers; a seed stays reproducible per choice.
                seeds = [None if req.seed is None else (req.seed + i) % (SEED_MAX + 1) for i in range(req.n)]
                answers = [self.council.answer({**payload, "seed": sd}) for sd in seeds]
            results = await asyncio.wait_for(asyncio.gather(*answers), self.config.server.request_timeout_s)
        except asyncio.TimeoutError:
            return self._deadline_error()
        except CouncilError as err:
            return self._council_error(err)
        except RouterInputError as err:
            return error_response(400, str(err))
        model = payload["model"]
        completion = sum(r.completion_tokens for r in results)
        usage = {
            "prompt_tokens": results[0].prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": results[0].prompt_tokens + completion,
        }
        choices = []
        for i, result in enumerate(results):
            if chat:
                choice = {
                    "index": i,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                    "logprobs": chat_logprobs(result.logprobs),
                }
            else:
                choice = {
                    "index": i,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "logprobs": completion_logprobs(result.logprobs),
                }
            choices.append(choice)
        body = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": now(),
            "model": model,
            "choices": choices,
            "usage": usage,
            "routing": results[0].routing.model_dump(),
        }
        if len(results) > 1:
            body["routings"] = [r.routing.model_dump() for r in results]
        return body

    def _deadline_error(self) -> JSONResponse:
        limit = self.config.server.request_timeout_s
        return error_response(
            504, f"the request did not finish within {limit:g}s", type_="timeout_error", code="request_timeout"
        )

    async def _streaming(self, payload: dict[str, Any], chat: bool, req: Any, deadline: float, t0: float) -> Any:
        events = self.council.stream(payload)
        # Pull the first event before answering, so routing and specialist errors still get a status code.
        try:
            first = await asyncio.wait_for(events.__anext__(), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return error_response(503, "no answer was produced", type_="service_unavailable")
        except asyncio.TimeoutError:
            await events.aclose()
            return self._deadline_error()
        cid, created, model = payload["request_id"], now(), payload["model"]
        label = metrics.model_label(model, self.council.names)
        last = t0
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def frame(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body)}\n\n"

        def chunk(ev: StreamEvent, role: bool = False) -> str:
            prefix = ""
            if ev.error is not None:
                # finish_reason has no "error" in OpenAI's API: an error event (the openai client raises it
                # as APIError) says the answer is incomplete and why; a final chunk with a valid
                # finish_reason still follows for clients that read the raw events.
                err_body = error_body(ev.error, "server_error", code="stream_interrupted")
                err_body["routing"] = ev.routing.model_dump() if ev.routing else None
                prefix = frame(err_body)
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ev.text} if role else {"content": ev.text}
                if ev.done:
                    delta = {}
                choice = {
                    "index": 0,
                    "delta": delta,
                    "finish_reason": ev.finish_reason if ev.done else None,
                    "logprobs": chat_logprobs(ev.logprobs),
                }
                obj = "chat.completion.chunk"
            else:
                choice = {
                    "index": 0,
                    "text": ev.text,
                    "finish_reason": ev.finish_reason if ev.done else None,
                    "logprobs": completion_logprobs(ev.logprobs, offset[0]),
                }
                offset[0] += len(ev.text)
                obj = "text_completion"
            body: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice]}
            if include_usage:
                body["usage"] = None  # OpenAI: null on every chunk but the extra last one
            if ev.done:
                body["routing"] = ev.routing.model_dump() if ev.routing else None
            out = frame(body)
            if ev.done and include_usage:
                usage = {
                    "prompt_tokens": ev.prompt_tokens,
                    "completion_tokens": ev.completion_tokens,
                    "total_tokens": ev.prompt_tokens + ev.completion_tokens,
                }
                out += frame({**body, "choices": [], "usage": usage})
            return prefix + out

        offset = [0]  # completions' text_offset counts characters across chunks

        def error_event(message: str, type_: str, code: str | None) -> str:
            return frame(error_body(message, type_, code))

        def timed(ev: StreamEvent) -> None:
            # Time to first token, then the gap between text chunks (about one token each).
            nonlocal last
            if ev.text:
                t = time.perf_counter()
                (metrics.first_token if last == t0 else metrics.inter_token)(label, (t - last) * 1000)
                last = t

        async def sse() -> AsyncIterator[str]:
            ev = first
            timed(first)
            yield chunk(first, role=True)
            try:
                while not ev.done:
                    ev = await asyncio.wait_for(events.__anext__(), max(0.0, deadline - time.monotonic()))
                    timed(ev)
                    yield chunk(ev)
            except StopAsyncIteration:
                pass
            except asyncio.TimeoutError:  # the request's deadline: stop generating, end with "length"
                limit = self.config.server.request_timeout_s
                yield error_event(f"the request did not finish within {limit:g}s", "timeout_error", "request_timeout")
                yield chunk(StreamEvent(done=True, finish_reason="length"))
            except Exception as err:  # headers are sent: report in-band, then end the stream cleanly
                logger.warning("stream failed: %r", err)
                yield error_event(f"the answer was interrupted: {err}"[:500], "server_error", "stream_interrupted")
                yield chunk(StreamEvent(done=True, finish_reason="length"))
            finally:
                await events.aclose()  # client gone or done: cancel whatever still runs upstream
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def memory_report(self, top: int = 15, trim: bool = False) -> dict[str, Any]:
        """Memory diagnostics (deployments.memory): through a DeploymentHandle only, never an HTTP route."""
        return memory.report(top, trim)

    # ---- routes --------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", openapi_extra=_body_doc(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> Any:
        return await self._complete(request, ChatCompletionRequest, chat=True)

    @app.post("/v1/completions", openapi_extra=_body_doc(CompletionRequest))
    async def completions(self, request: Request) -> Any:
        return await self._complete(request, CompletionRequest, chat=False)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Any:
        denied = self._auth(request)
        return denied if denied is not None else app.openapi()

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Any:
        denied = self._auth(request)
        if denied is not None:
            return denied
        html: HTMLResponse = get_swagger_ui_html(openapi_url="openapi.json", title="Consilium API")
        return html

    @app.post("/v1/route", openapi_extra=_body_doc(RouteRequest))
    async def route(self, request: Request) -> Any:
        req = await self._body(request, RouteRequest)
        if isinstance(req, JSONResponse):
            return req
        images = 0
        if req.messages:
            users = [m.text() for m in req.messages if m.role == "user"]
            text = users[-1] if users else ""
            images = sum(len(m.image_urls()) for m in req.messages)  # counted only: routing needs no pixels
        else:
            text = req.prompt or ""
        try:
            decision = self.council.decide(req.model, text, images=images)
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
