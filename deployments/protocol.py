"""OpenAI-compatible request and response schemas, body parsing limits, and the error body every 4xx/5xx carries."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Deeper JSON than this is refused before it is parsed: json.loads and pydantic recurse, and a
# 5,000-deep array in any field used to end in a RecursionError (500). Real requests nest < 10 deep;
# a json_schema in response_format rarely goes past 20.
MAX_JSON_DEPTH = 64
# Seeds go to torch.manual_seed and vLLM as a 64-bit integer: anything outside overflows there.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_N = 8  # choices per request: each one is a full council answer, so keep the fan-out bounded


class BodyError(ValueError):
    """A request body that cannot be parsed: carries the HTTP status and the parameter at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests deeper than limit, found without parsing (strings stripped first)."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = 0
    for b in brackets:
        depth += 1 if b in (0x5B, 0x7B) else -1
        if depth > limit:
            return True
    return False


def _no_constants(name: str) -> Any:
    raise BodyError(f"request body is not valid JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise BodyError(f"request body is not valid JSON: number {text[:40]} is out of range")
    return x


def _first_lone_surrogate(data: Any) -> str | None:
    """The path of the first string (or key) holding a lone UTF-16 surrogate, which UTF-8 cannot encode."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                # The path may hold the surrogate itself (a key): escape it, or the error body cannot be encoded.
                return (path or "<body>").encode("utf-8", "backslashreplace").decode()
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((f"{path}.{k}" if path else str(k), k))
                stack.append((f"{path}.{k}" if path else str(k), x))
        elif isinstance(v, list):
            stack.extend((f"{path}.{i}" if path else str(i), x) for i, x in enumerate(v))
    return None


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Strict JSON object parsing: bounded depth, no NaN/Infinity, no lone surrogates; BodyError otherwise."""
    if json_depth_exceeds(raw):
        raise BodyError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(raw, parse_constant=_no_constants, parse_float=_finite)
    except BodyError:
        raise
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, huge int literals
        raise BodyError(f"request body is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise BodyError(f"request body must be a JSON object, got {type(data).__name__}")
    bad = _first_lone_surrogate(data)
    if bad is not None:
        raise BodyError(f"{bad}: string holds a lone UTF-16 surrogate, which is not valid Unicode text", param=bad)
    return data


class _Strict(BaseModel):
    # strict: "stream": "yes" or "max_tokens": "8" are client bugs, not values to coerce (OpenAI refuses them).
    # forbid: a field we do not know would otherwise be dropped without a word.
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    # data:image/...;base64 (always), or http(s) where server.images.remote allows it; the body limit bounds it.
    url: str = Field(..., min_length=1)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model's processor decides the resolution


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart]
    name: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _images_from_users(self) -> ChatMessage:
        if self.role != "user" and self.image_urls():
            raise ValueError(f"image_url parts are accepted in user messages only, not in a {self.role!r} message")
        return self

    def text(self) -> str:
        """Plain text of the message (text parts of a multi-part content joined; images left out)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def image_urls(self) -> list[str]:
        """The URLs of this message's image parts, in order."""
        if isinstance(self.content, str):
            return []
        return [p.image_url.url for p in self.content if isinstance(p, ImagePart)]

    def engine_content(self) -> str | list[dict[str, str]]:
        """Content for the engines: plain text, or (with images) Hugging Face chat-template parts in order,
        each image a {"type": "image"} placeholder whose pixels travel separately."""
        if not self.image_urls():
            return self.text()
        assert isinstance(self.content, list)
        return [
            {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"} for p in self.content
        ]


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaSpec(_Strict):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only then")
        return self

    @property
    def constrained(self) -> bool:
        return self.type != "text"


# Fields OpenAI defines that this service does not do (yet): a non-default value is a 400 naming the
# field, never a 200 that quietly ignores it. value -> whether it is the harmless default.
_UNSUPPORTED: dict[str, Any] = {
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: v is None,
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: v in (None, 0, 0.0),
    "frequency_penalty": lambda v: v in (None, 0, 0.0),
    "top_logprobs": lambda v: v is None,
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "suffix": lambda v: v is None,
    "echo": lambda v: v in (None, False),
    "best_of": lambda v: v in (None, 1),
}


class _SamplingFields(_Strict):
    model: str = Field("auto", min_length=1, max_length=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    user: str | None = Field(None, max_length=512)  # an end-user id for abuse tracking: accepted, not used
    metadata: dict[str, str] | None = None  # echoed nowhere, stored nowhere: harmless to accept
    store: bool | None = None
    # Defined by OpenAI; refused unless the engines can honour them (see refused_field).
    logprobs: bool | int | None = None
    response_format: ResponseFormat | None = None
    # Still unsupported: typed loosely so the refusal names the field instead of a type error.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    top_logprobs: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None

    @field_validator("temperature")
    @classmethod
    def _tiny_is_greedy(cls, v: float | None) -> float | None:
        # logits / 1e-320 overflow to inf and sampling fails: as vLLM does, below 1e-5 means greedy.
        return 0.0 if v is not None and v < 1e-5 else v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings of at most 256 characters")
        return stops

    def token_cap(self) -> int | None:
        """max_completion_tokens (the current OpenAI name) wins over the deprecated max_tokens."""
        return self.max_completion_tokens or self.max_tokens

    def refused_field(self, supported: frozenset[str] = frozenset()) -> tuple[str, str] | None:
        """(field, why) for the first field set to something this deployment cannot do, else None.

        `supported` names optional features the engines provide ("logprobs", "response_format").
        """
        for name, harmless in _UNSUPPORTED.items():
            if name in type(self).model_fields and not harmless(getattr(self, name)):
                if name == "top_logprobs" and "logprobs" in supported:
                    if self.logprobs is not True:
                        return name, "top_logprobs requires logprobs: true"
                    continue
                return name, f"{name} is not supported by this service"
        if self.logprobs is not None and self.logprobs is not False and "logprobs" not in supported:
            return "logprobs", "logprobs is not supported by this service's engines yet"
        rf = self.response_format
        if rf is not None and rf.constrained and "response_format" not in supported:
            return "response_format", f"response_format type {rf.type!r} is not supported by this service's engines yet"
        if self.n > 1 and self.stream:
            return "n", "n > 1 is supported without streaming only"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        if self.store:
            return "store", "store=true is not supported: this service stores no completions"
        return None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_k(self) -> int | None:
        """How many alternatives per token the engine reports (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def image_urls(self) -> list[str]:
        """Every image URL of the conversation, in message order."""
        return [u for m in self.messages for u in m.image_urls()]


class CompletionRequest(_SamplingFields):
    prompt: str = Field(..., min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's logprobs is a count
    suffix: Any = None
    echo: Any = None
    best_of: Any = None

    def logprobs_k(self) -> int | None:
        return self.logprobs


class RouteRequest(_Strict):
    model: str = Field("auto", min_length=1, max_length=128)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Routing(BaseModel):
    """Which specialists answered, why, and which failed: attached to every response."""

    scores: dict[str, float] = Field(default_factory=dict)  # router domain -> score
    specialists: list[str] = Field(default_factory=list)  # chosen by the router (or pinned)
    used: list[str] = Field(default_factory=list)  # actually answered
    failed: dict[str, str] = Field(default_factory=dict)  # name -> reason
    fell_back: bool = False
    pinned: bool = False
    merged: bool = False
    synthesis: str | None = None  # which merge ran: "fusion" or "aggregate" (None: no merge)
    timings_ms: dict[str, float] = Field(default_factory=dict)  # per specialist, "fan_out" wall time, "merge"
    # Tokens each specialist generated behind a merge (the client saw the merger's text instead): name -> usage.
    specialist_usage: dict[str, Usage] = Field(default_factory=dict)
    retried: dict[str, int] = Field(default_factory=dict)  # name -> times its request went again (replica died)
    answers: dict[str, str] | None = None  # merged responses only: each specialist's own answer, by name
    modality: Literal["text", "image"] = "text"  # "image": the request carried images (routed by modality)
    reason: str | None = None  # why these specialists, when it was not the text router alone (images)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Engine logprob entries -> the chat completions shape {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None:
        return None
    strip = ("token", "logprob", "bytes")
    return {
        "content": [
            {**{k: e[k] for k in strip}, "top_logprobs": [{k: t[k] for k in strip} for t in e["top_logprobs"]]}
            for e in entries
        ]
    }


def completion_logprobs(entries: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any] | None:
    """Engine logprob entries -> the legacy completions shape (tokens, token_logprobs, top_logprobs, text_offset)."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
