"""Per-row next-token choice for a mixed batch: logits hook, greedy or seeded top-p sampling, logprobs."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deployments.engines.base import LogitsProcessor, SamplingParams, token_logprob


@dataclass
class RowSampler:
    """One request's sampling state; its own generator, so a seed never touches the global RNG."""

    params: SamplingParams
    processor: LogitsProcessor | None = None
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device, processor: LogitsProcessor | None = None):
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=device)
            # Unseeded rows still get a private generator: sampling never reads or advances torch's global RNG.
            gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        return cls(params, processor, gen)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (at least one); (V,) -> (V,)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token when the mass before it already reaches top_p.
    drop = (probs.cumsum(-1) - probs) >= top_p
    drop[0] = False
    return logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))


def next_tokens(
    logits: torch.Tensor, rows: Sequence[RowSampler], token_text: Callable[[int], str]
) -> tuple[list[int], list[dict[str, Any] | None]]:
    """Choose one token per row from (B, V) logits; logprobs come from the model's raw fp32 distribution."""
    raw = logits.float()  # (B, V)
    lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    logprobs = torch.log_softmax(raw[lp_rows], dim=-1) if lp_rows else None  # (B_lp, V)
    x = raw
    hooked = [i for i, r in enumerate(rows) if r.processor is not None]
    if hooked:
        x = raw.clone()
        for i in hooked:
            x[i] = rows[i].processor.process(list(rows[i].generated), x[i])
    chosen = x.argmax(dim=-1).tolist()  # greedy rows keep this; one batched op for all of them
    for i, r in enumerate(rows):
        if r.params.greedy:
            continue
        row = top_p_filter(x[i] / r.params.temperature, r.params.top_p)
        chosen[i] = int(torch.multinomial(row.softmax(-1), 1, generator=r.generator))
    out: list[dict[str, Any] | None] = [None] * len(rows)
    for j, i in enumerate(lp_rows):
        lp, k = logprobs[j], rows[i].params.logprobs
        top = []
        if k:
            vals, ids = lp.topk(k)
            top = [_alt(token_text(t), t, v) for v, t in zip(vals.tolist(), ids.tolist(), strict=True)]
        t = chosen[i]
        out[i] = token_logprob(token_text(t), t, float(lp[t]), top)
    for r, t in zip(rows, chosen, strict=True):
        r.generated.append(t)
    return chosen, out


def _alt(token: str, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": token, "id": token_id, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
