"""One base with 1, 2 and 4 LoRA adapters in a mixed batch vs the base alone; memory vs separate models."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import print_table, save
from deployments.config import EngineConfig
from deployments.engines.base import GenerationRequest, SamplingParams
from deployments.engines.hf import HFEngine
from deployments.models.zoo import add_random_lora, build_zoo


def tokens_per_s(engine: HFEngine, adapters: list[str | None], batch: int, new_tokens: int, repeats: int) -> float:
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    reqs = [
        GenerationRequest(
            prompt=f"question {i}: what helps with a cough?", params=params, adapter=adapters[i % len(adapters)]
        )
        for i in range(batch)
    ]
    engine.generate_batch_sync(reqs[:2])
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate_batch_sync(reqs)
        best = max(best, sum(r.completion_tokens for r in out) / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    zoo = Path(args.zoo) if args.zoo else tmp / "zoo"
    if not (zoo / "general").exists():
        build_zoo(zoo)
    names = [f"lora{i}" for i in range(4)]
    for i, n in enumerate(names):
        add_random_lora(zoo / "general", tmp / n, seed=100 + i)
    base = HFEngine(EngineConfig(model=str(zoo / "general")))
    multi = HFEngine(EngineConfig(model=str(zoo / "general"), adapters={n: str(tmp / n) for n in names}))
    rows = [
        {
            "setup": "base alone (no adapters loaded)",
            "adapters_in_batch": 0,
            "tokens_per_s": tokens_per_s(base, [None], args.batch, args.new_tokens, args.repeats),
        }
    ]
    for k in (1, 2, 4):
        rows.append(
            {
                "setup": f"one base, {k} adapter(s) mixed in the batch",
                "adapters_in_batch": k,
                "tokens_per_s": tokens_per_s(multi, list(names[:k]), args.batch, args.new_tokens, args.repeats),
            }
        )
    for r in rows:
        r["vs_base"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    print_table(f"mixed-adapter batches, zoo/general, batch {args.batch}, {args.new_tokens} new tokens, CPU", rows)

    base_bytes = base.model.get_memory_footprint()
    lora_bytes = sum(p.numel() * p.element_size() for n, p in multi.model.named_parameters() if "lora_" in n) / 4
    mem = [
        {
            "adapters": n,
            "one_base_plus_adapters_MB": (base_bytes + n * lora_bytes) / 1e6,
            "separate_models_MB": n * base_bytes / 1e6,
            "saving": 1 - (base_bytes + n * lora_bytes) / (n * base_bytes),
        }
        for n in (1, 2, 4, 8)
    ]
    print_table("weights memory: N adapters on one base vs N separate models (zoo sizes)", mem)
    print("saved", save("adapters", rows + mem, batch=args.batch, new_tokens=args.new_tokens))


if __name__ == "__main__":
    main()
