"""Our HF engine (scheduler + KV-cache runner) vs transformers' ContinuousBatchingManager on the same work.

Why this exists: transformers ships continuous batching (paged KV cache, `generate_batch`,
`add_request`, `cancel_request`) but no per-row LoRA adapters, which our shared-base specialists need.
This measures both on greedy decoding so the choice is made on numbers, not taste.

    python -m bench.cb_compare [--zoo .zoo] [--requests 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from bench.common import print_table, save
from deployments.config import EngineConfig
from deployments.engines.base import GenerationRequest, SamplingParams
from deployments.engines.hf import HFEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", default=".zoo")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread each, as in a Serve replica; fair on a shared machine
    model_dir = str(Path(args.zoo) / "general")
    prompts = [f"question {i}: what helps with a fever of {38 + i % 3} degrees?" for i in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_tokens, logprobs=0)

    engine = HFEngine(EngineConfig(model=model_dir))
    reqs = [GenerationRequest(prompt=p, params=params) for p in prompts]
    inputs = [engine.render(r) for r in reqs]
    engine.generate_batch_sync(reqs[:2])  # warm-up
    t0 = time.perf_counter()
    ours = engine.generate_batch_sync(reqs)
    ours_s = time.perf_counter() - t0
    ours_tokens = sum(r.completion_tokens for r in ours)
    ours_ids = [[e["id"] for e in r.logprobs] for r in ours]
    engine.close()

    rows = [
        {"engine": "consilium HFEngine", "tokens": ours_tokens, "wall_s": ours_s, "tok_per_s": ours_tokens / ours_s}
    ]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = GenerationConfig(
        max_new_tokens=args.max_tokens,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id,
    )
    same = None
    try:
        model.generate_batch(inputs[:2], generation_config=gen)  # warm-up
        t0 = time.perf_counter()
        out = model.generate_batch(inputs, generation_config=gen)
        cb_s = time.perf_counter() - t0
        theirs = [
            list(o.generated_tokens) for o in sorted(out.values(), key=lambda o: int(o.request_id.split("_")[-1]))
        ]
        cb_tokens = sum(len(t) for t in theirs)
        same = sum(a == b for a, b in zip(ours_ids, theirs, strict=True))
        rows.append(
            {
                "engine": "transformers ContinuousBatching",
                "tokens": cb_tokens,
                "wall_s": cb_s,
                "tok_per_s": cb_tokens / cb_s,
            }
        )
    except Exception as err:  # report, do not hide: the point is to compare
        rows.append({"engine": f"transformers ContinuousBatching failed: {type(err).__name__}: {err}"[:120]})
    print_table(f"{args.requests} greedy requests x {args.max_tokens} tokens, zoo general, CPU", rows)
    if same is not None:
        print(f"identical greedy token ids: {same}/{args.requests} requests")
    print("saved", save("cb_compare", rows, requests=args.requests, max_tokens=args.max_tokens, identical=same))


if __name__ == "__main__":
    main()
