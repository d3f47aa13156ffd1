"""The engine protocol every specialist backend implements, and the value types it speaks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


class LogitsProcessor(Protocol):
    """A per-request hook run on each row's next-token logits before sampling (e.g. constrained decoding).

    `token_ids_so_far` are the tokens this request has generated (not the prompt); `logits` is the
    row's fp32 vector over the vocabulary. Return the logits to sample from (mask with -inf).
    """

    def process(self, token_ids_so_far: list[int], logits: torch.Tensor) -> torch.Tensor: ...


class EngineInputError(ValueError):
    """The request cannot be served as asked (prompt too long, unknown adapter): a client error."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; temperature 0 means greedy."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: each token's logprob and its k best alternatives
    # OpenAI response_format (json_object / json_schema) as JSON text; None: unconstrained output.
    response_format: str | None = None

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise EngineInputError(f"top logprobs must be within [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if not 0.0 <= self.temperature <= 2.0:
            raise EngineInputError(f"temperature must be within [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise EngineInputError(f"top_p must be within (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise EngineInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt: either raw text (completions) or chat messages (rendered with the chat template).

    Multimodal requests: a message's content may be a list of parts in the Hugging Face chat-template
    shape (`{"type": "text", "text": ...}`, `{"type": "image"}`), and `images` holds the decoded,
    validated RGB images (PIL) in the order their `{"type": "image"}` parts appear.
    """

    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # None: the base model without any adapter
    prompt_ids: tuple[int, ...] | None = None  # already rendered by the serving engine (tokenise once)
    logits_processor: LogitsProcessor | None = field(default=None, compare=False)  # in-process only
    images: tuple[Any, ...] = ()  # PIL.Image.Image in RGB, one per {"type": "image"} part
    # The model's processed image inputs (HF: pixel_values and friends), set with prompt_ids by the engine
    # that rendered the request, so the images are processed once.
    image_inputs: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise EngineInputError("exactly one of prompt or messages must be given")


@dataclass
class GenerationResult:
    """The new text only (never the echoed prompt) with token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    # One entry per generated token when SamplingParams.logprobs is set (see token_logprob).
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class StreamDelta:
    """One piece of a streamed answer; the last one carries finish_reason and the counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict[str, Any]] | None = None  # the tokens generated since the previous delta


def content_text(content: str | Sequence[dict[str, Any]]) -> str:
    """A message's text: the string, or its text parts joined (image parts carry no text)."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def token_logprob(token: str, token_id: int, logprob: float, top: list[dict[str, Any]] | None = None) -> dict:
    """One generated token's log probability, JSON-able: {token, id, logprob, bytes, top_logprobs}."""
    return {
        "token": token,
        "id": token_id,
        "logprob": logprob,
        "bytes": list(token.encode("utf-8")),
        "top_logprobs": top or [],
    }


@runtime_checkable
class Engine(Protocol):
    """What a specialist deployment needs from a backend (HF transformers or vLLM)."""

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    async def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]: ...

    def check_health(self) -> None: ...

    def close(self) -> None: ...


def resolve_device(requested: str | None) -> torch.device:
    """The configured device, else the best one present (never a hard-coded "cuda")."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 where the GPU supports it, fp16 on other accelerators, fp32 on CPU."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut text before the earliest stop string; say whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def safe_stream_prefix(text: str, stop: Sequence[str]) -> int:
    """How many leading chars of text can be emitted without risking a later stop-string match."""
    hold = 0
    for s in stop:
        # Hold back the longest suffix of text that is a proper prefix of a stop string.
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-n:]):
                hold = max(hold, n)
                break
    return len(text) - hold
