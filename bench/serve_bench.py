"""Load on the running tiny service: req/s and p50/p99 at concurrency 1/8/32, fan-out ratio, graph overhead.

Start the service first (`make serve`), then: python -m bench.serve_bench [--url http://127.0.0.1:8000]
Traffic goes to the given loopback URL only; every loop is bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx

from bench.common import percentile, print_table, save

SINGLE = "What are the early symptoms of hypertension?"  # routes to medical alone
TWO = "Write a Python script that parses patient records and flags patients with diabetes."  # medical + code


def body(prompt: str, model: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


async def one(client: httpx.AsyncClient, url: str, payload: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = await client.post(f"{url}/v1/chat/completions", json=payload)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return dt, r.json()


async def load(url: str, payload: dict, concurrency: int, total: int) -> dict:
    lat: list[float] = []
    async with httpx.AsyncClient(timeout=120) as client:
        queue = list(range(total))

        async def worker() -> None:
            while queue:
                queue.pop()
                dt, _ = await one(client, url, payload)
                lat.append(dt)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "requests": total,
        "req_per_s": total / wall,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
    }


async def alone(url: str, payload: dict, n: int) -> tuple[float, dict[str, float]]:
    """p50 client latency and the p50 of each server-side timing the response reports."""
    async with httpx.AsyncClient(timeout=120) as client:
        await one(client, url, payload)  # warm-up
        runs = [await one(client, url, payload) for _ in range(n)]
    timings: dict[str, list[float]] = {}
    for _, body in runs:
        for k, v in body["routing"]["timings_ms"].items():
            timings.setdefault(k, []).append(v)
    return percentile([dt for dt, _ in runs], 50), {k: percentile(v, 50) for k, v in timings.items()}


def in_process(zoo: Path, prompts: list[tuple[str, str]], max_tokens: int, n: int) -> dict[str, float]:
    """p50 of the same greedy work through MultiSpecializedLanguageModelPipeline (no Ray, no HTTP)."""
    import yaml

    from deployments.pipeline import MultiSpecializedLanguageModelPipeline

    args = yaml.safe_load((Path(__file__).parents[1] / "configs" / "zoo.yaml").read_text())["applications"][0]["args"]
    for s in args["specialists"]:
        s["model"] = s["model"].replace(".zoo", str(zoo))
        s["adapters"] = {k: v.replace(".zoo", str(zoo)) for k, v in s.get("adapters", {}).items()}
    args["merger"]["model"] = args["merger"]["model"].replace(".zoo", str(zoo))
    pipe = MultiSpecializedLanguageModelPipeline(args)
    out = {}
    for name, prompt in prompts:
        pipe.generate(prompt, max_length=max_tokens, temperature=0.0)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            pipe.generate(prompt, max_length=max_tokens, temperature=0.0)
            times.append(time.perf_counter() - t0)
        out[name] = percentile(times, 50)
    pipe.clear_resources()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--zoo", default=".zoo")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    args = ap.parse_args()
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("serve_bench only targets a service on this machine (loopback)")

    rows = []
    for label, prompt in (("single-route", SINGLE), ("two-route", TWO)):
        for c in (1, 8, 32):
            r = asyncio.run(load(args.url, body(prompt, "auto", args.max_tokens), c, max(args.requests, c)))
            rows.append({"prompt": label, "concurrency": c, **r})
    print_table(f"tiny service at {args.url}, max_tokens={args.max_tokens}, greedy", rows)

    n = 15
    med, med_t = asyncio.run(alone(args.url, body(TWO, "medical", args.max_tokens), n))
    code, code_t = asyncio.run(alone(args.url, body(TWO, "code", args.max_tokens), n))
    two, two_t = asyncio.run(alone(args.url, body(TWO, "auto", args.max_tokens), n))
    single, _ = asyncio.run(alone(args.url, body(SINGLE, "auto", args.max_tokens), n))
    local = in_process(Path(args.zoo), [("single", SINGLE), ("two", TWO)], args.max_tokens, n)
    fan = [
        {"measure": "medical alone, p50 ms", "value": med * 1000},
        {"measure": "code alone, p50 ms", "value": code * 1000},
        {"measure": "two-route (both + merger), p50 ms", "value": two * 1000},
        {
            "measure": "fan-out ratio: two-route / slower single (client-side, merger included)",
            "value": two / max(med, code),
        },
        {
            "measure": "server: medical alone / code alone, p50 ms",
            "value": f"{med_t.get('medical', 0):.1f} / {code_t.get('code', 0):.1f}",
        },
        {
            "measure": "server: two-route fan-out wall / merge, p50 ms",
            "value": f"{two_t.get('fan_out', 0):.1f} / {two_t.get('merge', 0):.1f}",
        },
        {
            "measure": "fan-out ratio: fan-out wall / slower specialist alone (server-side)",
            "value": two_t.get("fan_out", 0) / max(med_t.get("medical", 1e-9), code_t.get("code", 1e-9)),
        },
        {"measure": "single-route served p50 ms", "value": single * 1000},
        {"measure": "single-route in-process p50 ms", "value": local["single"] * 1000},
        {"measure": "graph overhead, single-route ms", "value": (single - local["single"]) * 1000},
        {"measure": "two-route in-process p50 ms", "value": local["two"] * 1000},
        {"measure": "graph overhead, two-route ms", "value": (two - local["two"]) * 1000},
    ]
    print_table("fan-out and graph overhead (concurrency 1)", fan)
    print("saved", save("serve", rows + fan, url=args.url, max_tokens=args.max_tokens))


if __name__ == "__main__":
    main()
