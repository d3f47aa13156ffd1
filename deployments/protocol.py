"""OpenAI-compatible request and response schemas, and the error body every 4xx/5xx carries."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """Plain text of the message (text parts of a multi-part content joined)."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (n=1, user, ...)

    model: str = Field("auto", min_length=1, max_length=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

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
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(_SamplingFields):
    prompt: str = Field(..., min_length=1)


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = "auto"
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Routing(BaseModel):
    """Which specialists answered, why, and which failed: attached to every response."""

    scores: dict[str, float] = Field(default_factory=dict)
    specialists: list[str] = Field(default_factory=list)  # chosen by the router (or pinned)
    used: list[str] = Field(default_factory=list)  # actually answered
    failed: dict[str, str] = Field(default_factory=dict)  # name -> reason
    fell_back: bool = False
    pinned: bool = False
    merged: bool = False
    timings_ms: dict[str, float] = Field(default_factory=dict)  # per specialist, "fan_out" wall time, "merge"
    answers: dict[str, str] | None = None  # merged responses only: each specialist's own answer, by name


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
