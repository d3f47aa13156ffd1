"""Iteration-level scheduler for the HF engine: waiting and running queues, one decision per decoding step.

Following vLLM v1's split, this class only decides who runs; the runner (deployments/engines/hf.py)
does the forward passes. It is pure Python (no threads, no torch) so it is tested on its own.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count(1)


@dataclass(eq=False)
class Sequence:
    """One request's state from admission to finish; `payload` is what the runner attaches."""

    prompt_len: int
    max_new: int
    id: int = field(default_factory=lambda: next(_ids))
    payload: Any = None
    generated: int = 0
    cancelled: bool = False  # set from any thread; the scheduler drops the row at the next step
    finished: bool = False
    steps_after_cancel: int = 0  # forward passes this row took part in after it was cancelled

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class StepPlan:
    """What one step runs: rows joining (prefill), rows continuing (decode), rows dropped before it."""

    prefill: list[Sequence]
    decode: list[Sequence]
    aborted: list[Sequence]

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    """FIFO admission into a running batch bounded by rows and by the prompt tokens prefilled per step."""

    def __init__(self, max_num_seqs: int = 32, max_prefill_tokens: int = 4096) -> None:
        if max_num_seqs < 1 or max_prefill_tokens < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} and max_prefill_tokens={max_prefill_tokens} must be >= 1")
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        """Drop cancelled rows, keep every running row decoding, admit waiting rows into free slots."""
        aborted = [s for s in self.running if s.cancelled] + [s for s in self.waiting if s.cancelled]
        self.running = [s for s in self.running if not s.cancelled]
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        decode = list(self.running)
        prefill: list[Sequence] = []
        longest = 0
        while self.waiting and len(self.running) + len(prefill) < self.max_num_seqs:
            nxt = self.waiting[0]
            # A left-padded prefill costs rows x longest prompt; the first joiner is always admitted.
            cost = (len(prefill) + 1) * max(longest, nxt.prompt_len)
            if prefill and cost > self.max_prefill_tokens:
                break
            longest = max(longest, nxt.prompt_len)
            prefill.append(self.waiting.popleft())
        self.running.extend(prefill)
        for s in aborted:
            s.finished = True
        return StepPlan(prefill=prefill, decode=decode, aborted=aborted)

    def finish(self, seq: Sequence) -> None:
        """A row ended (stop, length or error): it leaves the batch now."""
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)

    def drain(self) -> list[Sequence]:
        """Every row, waiting or running, removed (engine shutdown or a failed step)."""
        out = [*self.running, *self.waiting]
        self.running, self.waiting = [], deque()
        for s in out:
            s.finished = True
        return out
