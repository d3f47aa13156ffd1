"""GPU smoke test of the real vLLM engine: generate, stream, two adapters. Run on a node with CUDA and vllm.

    pip install -e ".[vllm]"
    python scripts/gpu_smoke.py --model Qwen/Qwen2.5-0.5B-Instruct [--adapter a=/path/to/lora --adapter b=...]

Prints one line per check and exits non-zero on the first failure. With no --adapter, it trains two
tiny LoRA adapters on the fly (a few steps each, `consilium adapter train`'s code) so the multi-LoRA
path is exercised too.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}")
    if not ok:
        sys.exit(1)


async def run(args: argparse.Namespace) -> None:
    import torch

    from deployments.config import EngineConfig
    from deployments.engines.base import GenerationRequest, SamplingParams
    from deployments.engines.select import select_engine_class
    from deployments.engines.vllm import VLLMEngine

    check("cuda present", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
    adapters = dict(a.split("=", 1) for a in args.adapter)
    if not adapters:
        from deployments.models.adapters import AdapterTrainConfig, train_adapter

        tmp = Path(tempfile.mkdtemp())
        for name, reply in (("yes", "yes indeed"), ("no", "no way")):
            data = [
                [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": reply}]
                for i in range(32)
            ]
            train_adapter(
                args.model,
                data,
                tmp / name,
                AdapterTrainConfig(epochs=3, lr=1e-3, rank=8, target_modules=["q_proj", "v_proj"]),
            )
            adapters[name] = str(tmp / name)
    cfg = EngineConfig(
        model=args.model,
        backend="vllm",
        adapters=adapters,
        engine_kwargs={"max_model_len": 2048, "gpu_memory_utilization": args.gpu_memory_utilization},
    )
    check("backend auto picks vllm", select_engine_class(cfg.model_copy(update={"backend": "auto"})) is VLLMEngine)
    t0 = time.perf_counter()
    engine = VLLMEngine(cfg)
    print(f"engine up in {time.perf_counter() - t0:.1f}s")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=32)
    req = GenerationRequest(messages=({"role": "user", "content": "Name three primary colours."},), params=greedy)
    r = await engine.generate(req)
    check("generate", r.completion_tokens > 0 and bool(r.text.strip()), repr(r.text[:80]))
    deltas = [d async for d in engine.stream(req)]
    streamed = "".join(d.text for d in deltas)
    check("stream == generate (greedy)", streamed == r.text, f"{len(deltas)} deltas")
    outs = {}
    for name in adapters:
        q = GenerationRequest(messages=({"role": "user", "content": "question 3"},), params=greedy, adapter=name)
        outs[name] = (await engine.generate(q)).text
    check("adapters differ", len(set(outs.values())) == len(outs), repr(outs))
    batch = [
        GenerationRequest(messages=({"role": "user", "content": f"Count to {i}."},), params=greedy) for i in range(64)
    ]
    t0 = time.perf_counter()
    res = await engine.generate_batch(batch)
    dt = time.perf_counter() - t0
    toks = sum(x.completion_tokens for x in res)
    check("batch of 64", len(res) == 64, f"{toks} tokens in {dt:.2f}s = {toks / dt:.0f} tok/s")
    engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
