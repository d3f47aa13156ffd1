"""Structured outputs: OpenAI response_format (json_object, json_schema) as a per-row logits mask, via xgrammar.

Why xgrammar: it is vLLM's default structured-output backend (so the HF engine and vLLM constrain
with the same grammar engine and agree on what a schema allows), it installs from PyPI as a wheel that
works with our CPU torch, its masks are computed in C++ from a compiled pushdown automaton (cheap per
token, unlike lm-format-enforcer's pure-Python prefix walk), and it compiles full JSON Schema
(refs, enums, patterns) rather than a subset. outlines would pull a larger stack for the same job.

The HF engine calls `processor.process(token_ids_so_far, logits)` once per decoding step of a row;
vLLM takes the same request through `vllm_structured_outputs` (its own xgrammar backend does the rest).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch
import xgrammar as xgr


class StructuredOutputError(ValueError):
    """A response_format that cannot be compiled (invalid or unsupported schema): a client error."""


def _kind_and_schema(response_format: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    kind = response_format.get("type")
    if kind == "json_object":
        # OpenAI's JSON mode promises a JSON object, not any JSON value: constrain to exactly that.
        return kind, {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        # OpenAI treats an absent schema as "any JSON object"; say so explicitly to the grammar.
        return kind, schema if schema is not None else {"type": "object"}
    raise StructuredOutputError(f"response_format type {kind!r} is not a constrained format")


def vllm_structured_outputs(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """Keyword arguments for vLLM's `StructuredOutputsParams` (vLLM >= 0.12: `SamplingParams(structured_outputs=...)`).

    None when nothing is constrained (no response_format, or type "text").
    """
    if not response_format or response_format.get("type") == "text":
        return None
    _, schema = _kind_and_schema(response_format)
    # json_object goes as the schema {"type": "object"} too: vLLM's own json_object allows any JSON value.
    return {"json": schema}


class StructuredCompiler:
    """Compiles response formats against one tokenizer; compiled grammars are cached by xgrammar."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None, stop_token_ids: list[int] | None = None) -> None:
        # vocab_size: the model's logits width, which may exceed the tokenizer's (padded embeddings);
        # ids past the tokenizer's vocabulary are then always masked. stop_token_ids: the ids the engine
        # stops on (all of generation_config's eos ids), so a complete JSON value ends the row there.
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.vocab_size = self.info.vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self._lock = threading.Lock()  # one compiler shared by the engine's threads

    def compile(self, response_format: dict[str, Any]) -> xgr.CompiledGrammar:
        _, schema = _kind_and_schema(response_format)
        try:
            with self._lock:
                return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as err:
            raise StructuredOutputError(f"response_format.json_schema.schema cannot be used: {err}") from None

    def processor(self, response_format: dict[str, Any]) -> JsonLogitsProcessor:
        """A fresh processor (it holds one row's grammar state): one per request row."""
        return JsonLogitsProcessor(self.compile(response_format), self.vocab_size)


class JsonLogitsProcessor:
    """Masks one row's logits so that only tokens continuing valid output of the grammar stay possible.

    Hook signature shared with the engines: process(token_ids_so_far, logits[vocab]) -> logits.
    token_ids_so_far are the row's generated ids (not the prompt); the processor feeds the ones it has
    not seen yet to its matcher, so it is called once per step, in order.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._seen = 0

    @property
    def finished(self) -> bool:
        """The grammar accepted a stop token: the output is complete."""
        return self.matcher.is_terminated()

    def process(self, token_ids_so_far: list[int], logits: torch.Tensor) -> torch.Tensor:
        for t in token_ids_so_far[self._seen :]:
            if not self.matcher.accept_token(int(t)):
                raise StructuredOutputError(f"token {t} was generated although the grammar forbids it")
        self._seen = len(token_ids_so_far)
        if self.matcher.is_terminated():
            return logits
        self.matcher.fill_next_token_bitmask(self._bitmask)
        out = logits.clone()
        # xgrammar's CPU kernel wants a contiguous float32 (1, V) row; other dtypes/devices round-trip.
        row = out[..., : self.vocab_size].reshape(1, -1).to("cpu", torch.float32).contiguous()
        xgr.apply_token_bitmask_inplace(row, self._bitmask)
        out[..., : self.vocab_size] = row.reshape(out[..., : self.vocab_size].shape).to(out.device, out.dtype)
        out[..., self.vocab_size :] = float("-inf")
        return out
