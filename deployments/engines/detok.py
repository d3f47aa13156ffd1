"""Incremental detokenization and stop-string handling shared by the HF engine and the merger's streams."""

from __future__ import annotations

from collections.abc import Sequence

from deployments.engines.base import safe_stream_prefix


class IncrementalDetokenizer:
    """Token ids in, new text out, at O(1) cost per token instead of re-decoding the whole answer.

    Fast tokenizers use `tokenizers.decoders.DecodeStream`, which buffers a partial UTF-8 character
    (byte-fallback pieces) until it is complete. Slow tokenizers fall back to decoding a short window
    of recent ids (vLLM's prefix/read offsets), which is also O(1) per token.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        backend = getattr(tokenizer, "_tokenizer", None)
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._prefix = 0  # fallback: window start and how far the window has been emitted
        self._read = 0

    def step(self, token_id: int) -> str:
        """The text this token completes ('' while a multi-byte character is still partial)."""
        self.ids.append(token_id)
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=self.skip)
        after = decode(self.ids[self._prefix :], skip_special_tokens=self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""


class TextAssembler:
    """Builds one answer's text token by token: detokenizes, cuts at stop strings, holds back what may
    still become a stop string, and says how much text is safe to emit now."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.emitted = 0
        self.hit_stop = False

    def add(self, token_id: int) -> str:
        """Add one token; return the newly safe text (possibly ''). Sets hit_stop on a stop string."""
        piece = self.detok.step(token_id)
        if not piece:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += piece
        if self.stop:
            # Only the tail can hold a new match: search from where a stop could have begun.
            cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.hit_stop = self.text[:cut], True
                return self.flush()
        safe = safe_stream_prefix(self.text, self.stop)
        if safe <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : safe], safe
        return out

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the answer)."""
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out
