"""Tokens/s of the HF engine on a zoo model at batch 1, 4 and 16 (CPU unless a GPU is present)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import print_table, save
from deployments.config import EngineConfig
from deployments.engines.base import GenerationRequest, SamplingParams
from deployments.engines.hf import HFEngine
from deployments.models.zoo import build_zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", help="existing zoo dir (built in a temp dir when absent)")
    ap.add_argument("--model", default="general")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantization", choices=["none", "nf4"], default="none")
    args = ap.parse_args()
    zoo = Path(args.zoo) if args.zoo else Path(tempfile.mkdtemp()) / "zoo"
    if not (zoo / args.model).exists():
        build_zoo(zoo)
    engine = HFEngine(EngineConfig(model=str(zoo / args.model), quantization=args.quantization))
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    prompts = [f"question {i}: what is the treatment for a fever of {37 + i % 4} degrees?" for i in range(16)]
    engine.generate_batch_sync([GenerationRequest(prompt=p, params=params) for p in prompts[:2]])  # warm-up
    rows = []
    for bs in (1, 4, 16):
        reqs = [GenerationRequest(prompt=p, params=params) for p in prompts[:bs]]
        best = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = engine.generate_batch_sync(reqs)
            dt = time.perf_counter() - t0
            toks = sum(r.completion_tokens for r in out)
            if best is None or dt < best[0]:
                best = (dt, toks)
        dt, toks = best
        rows.append(
            {
                "batch": bs,
                "new_tokens": toks,
                "seconds": dt,
                "tokens_per_s": toks / dt,
                "ms_per_step": 1000 * dt / args.new_tokens,
            }
        )
    title = f"HF engine, zoo/{args.model}, {engine.device}, {engine.dtype}, quantization={args.quantization}"
    print_table(title, rows)
    print("saved", save(f"engine_{args.quantization}", rows, model=args.model, device=str(engine.device)))


if __name__ == "__main__":
    main()
