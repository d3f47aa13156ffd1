"""Load on the tiny service: throughput and TTFT under concurrency, streams vs batching, backpressure, fan-out.

Either against a running service (`make serve`, then `python -m bench.serve_bench --url http://127.0.0.1:8000`)
or self-hosted (`python -m bench.serve_bench --start`: configs/zoo.yaml on the zoo, port 8103, in a private
local Ray cluster; only then can it read the engines' step statistics for the disconnect row).
Traffic goes to the given loopback URL only; every loop is bounded in count.
Sections: `engines` (issue #11: c1/c32/c256, TTFT, 8 streams, short-during-long, disconnect, 503) and
`load`, `fanout` (the original tables).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil

from bench.common import haproxy_running, percentile, print_table, save

PORT = 8140  # this helper's port for a self-hosted run

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


# ---- engines under load (issue #11) -------------------------------------------------------------------
# These sections drive the service with aiohttp: httpx's connection pool cost this process ~15 ms of CPU per
# request at 256 connections (measured), which on a 2-core machine starved the service it was measuring;
# aiohttp costs ~1 ms. Each throughput row reports the CPU every process spent per request.


class Reply:
    """What a test reads of an HTTP answer: status, headers, JSON body."""

    def __init__(self, status: int, headers: Any, raw: bytes) -> None:
        self.status_code, self.headers, self.raw = status, headers, raw

    def json(self) -> Any:
        return json.loads(self.raw)


PROBE_TIMEOUT_S = 5.0  # a probe that was admitted (not refused) waits behind the fillers' long answers


async def probe_post(client: aiohttp.ClientSession, url: str, payload: dict) -> tuple[float, Reply]:
    """post(), but a probe still unanswered after PROBE_TIMEOUT_S hangs up (the service frees its slot) and
    comes back as status 0: it was admitted, so it is no refusal to time, and the bench must not wait on it."""
    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(post(client, url, payload), PROBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        return time.perf_counter() - t0, Reply(0, {}, b"")


def session_for(concurrency: int) -> aiohttp.ClientSession:
    conn = aiohttp.TCPConnector(limit=concurrency + 16)
    return aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300))


async def post(client: aiohttp.ClientSession, url: str, payload: dict) -> tuple[float, Reply]:
    t0 = time.perf_counter()
    async with client.post(f"{url}/v1/chat/completions", json=payload) as r:
        raw = await r.read()
    return time.perf_counter() - t0, Reply(r.status, r.headers, raw)


async def stream_once(client: aiohttp.ClientSession, url: str, payload: dict, stop_after: int | None = None) -> dict:
    """One SSE stream: time to first content, total time, completion tokens (from usage)."""
    t0 = time.perf_counter()
    ttft, tokens, chunks = None, 0, 0
    body_ = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    async with client.post(f"{url}/v1/chat/completions", json=body_) as r:
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                chunks += 1
                ttft = ttft if ttft is not None else time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            if stop_after is not None and chunks >= stop_after:
                r.close()  # hang up: the connection is closed, not drained
                break
    return {"ttft": ttft, "wall": time.perf_counter() - t0, "tokens": tokens, "chunks": chunks, "status": r.status}


class CpuMeter:
    """CPU seconds (user + system) of this process (the client) and, self-hosted, of every Ray process it started."""

    ROLES = (("ray::ProxyActor", "proxy"), ("ray::ServeReplica:consilium:router", "router"))

    def __init__(self, specialist: str) -> None:
        self.roles = (*self.ROLES, (f"ray::ServeReplica:consilium:specialist-{specialist}", specialist))

    def read(self) -> dict[str, float]:
        me = psutil.Process()
        out: dict[str, float] = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                title = (p.cmdline() or [""])[0]
                t = p.cpu_times()
            except psutil.Error:
                continue
            role = (
                "client"
                if p.pid == me.pid
                else next((r for prefix, r in self.roles if title.startswith(prefix)), "rest")
            )
            out[role] = out.get(role, 0.0) + t.user + t.system
        return out

    @staticmethod
    def per_request(before: dict[str, float], after: dict[str, float], n: int) -> str:
        ms = {k: (after[k] - before.get(k, 0.0)) * 1000 / max(1, n) for k in after}
        return " ".join(f"{k} {v:.1f}" for k, v in ms.items() if v >= 0.05)


async def throughput(url: str, model: str, concurrency: int, total: int, max_tokens: int, stats=None) -> dict:
    lat: list[float] = []
    codes: list[int] = []
    tokens = 0
    payload = body(SINGLE, model, max_tokens)
    meter = CpuMeter(model)
    async with session_for(concurrency) as client:
        await post(client, url, payload)  # warm-up
        left = list(range(total))

        async def worker() -> None:
            nonlocal tokens
            while left:
                left.pop()
                dt, r = await post(client, url, payload)
                codes.append(r.status_code)
                if r.status_code == 200:
                    lat.append(dt)
                    tokens += r.json()["usage"]["completion_tokens"]

        before = await stats() if stats else None
        cpu0 = meter.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu1 = meter.read()
        after = await stats() if stats else None
    engine = {}
    if before and after:
        steps = after["steps"] - before["steps"]
        engine = {
            "engine_busy": (after["busy_s"] - before["busy_s"]) / wall,  # fraction of wall time in decoding steps
            "rows_per_step": (after["tokens"] - before["tokens"]) / max(1, steps),
        }
    return {
        "concurrency": concurrency,
        "requests": total,
        "ok": codes.count(200),
        "503": codes.count(503),
        "served_req_per_s": codes.count(200) / wall,  # answered with 200; refusals are counted apart, never as served
        "tok_per_s": tokens / wall,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        **engine,
        "cpu_ms_per_request": CpuMeter.per_request(cpu0, cpu1, total),
    }


async def ttft(url: str, model: str, concurrency: int, total: int, max_tokens: int) -> dict:
    out: list[dict] = []
    async with session_for(concurrency) as client:
        await stream_once(client, url, body(SINGLE, model, max_tokens))
        left = list(range(total))

        async def worker() -> None:
            while left:
                left.pop()
                out.append(await stream_once(client, url, body(SINGLE, model, max_tokens)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    t = [o["ttft"] for o in out if o["ttft"] is not None]
    return {
        "concurrency": concurrency,
        "streams": len(out),
        "ttft_p50_ms": percentile(t, 50) * 1000,
        "ttft_p99_ms": percentile(t, 99) * 1000,
    }


async def streams_vs_one(url: str, model: str, n: int, max_tokens: int, stats=None, rounds: int = 5) -> dict:
    """Aggregate tok/s of n concurrent streams against one stream alone, in `rounds` alternating pairs.

    One 200-token stream lasts a fifth of a second here, so a single pair is at the mercy of whatever
    else the 2-core box runs in that moment: the ratio is the median of n streams over the median of one,
    and every pair's own ratio is reported beside it.
    """
    payload = body("Tell me everything you know about fevers, at length.", model, max_tokens)
    ones, manys, tokens, chunks = [], [], 0, []
    rows = steps = 0  # engine tokens and steps while the n streams ran
    async with session_for(n) as client:
        # Warm both shapes: the first n-stream batch pays for the larger KV caches and the n connections.
        await stream_once(client, url, payload)
        await asyncio.gather(*(stream_once(client, url, payload) for _ in range(n)))
        for _ in range(rounds):
            one = await stream_once(client, url, payload)
            ones.append(one["tokens"] / one["wall"])
            s0 = await stats() if stats else None
            t0 = time.perf_counter()
            many = await asyncio.gather(*(stream_once(client, url, payload) for _ in range(n)))
            manys.append(sum(m["tokens"] for m in many) / (time.perf_counter() - t0))
            s1 = await stats() if stats else None
            if s0 and s1:
                rows, steps = rows + s1["tokens"] - s0["tokens"], steps + s1["steps"] - s0["steps"]
            tokens = one["tokens"]
            chunks += [m["chunks"] for m in many]
    one_rate, agg = statistics.median(ones), statistics.median(manys)
    out = {
        "one_stream_tok_s": one_rate,
        f"{n}_streams_tok_s": agg,
        "ratio": agg / one_rate,
        "ratio_per_round": [m / o for o, m in zip(ones, manys, strict=True)],
        "tokens_per_stream": tokens,
        "chunks_per_stream": sum(chunks) / len(chunks),
    }
    if steps:
        out["rows_per_step"] = rows / steps
    return out


async def short_during_long(url: str, model: str, long_tokens: int, n: int = 8) -> dict:
    short = body("Fever?", model, 4)
    async with session_for(4) as client:
        await post(client, url, short)
        alone = [(await post(client, url, short))[0] for _ in range(n)]
        first = asyncio.Event()
        done_at: list[float] = []

        async def long_stream() -> dict:
            t0 = time.perf_counter()
            tokens = 0
            payload = {**body("Tell me everything about fevers, at length.", model, long_tokens), "stream": True}
            payload["stream_options"] = {"include_usage": True}
            async with client.post(f"{url}/v1/chat/completions", json=payload) as r:
                async for raw in r.content:
                    line = raw.decode()
                    if line.startswith("data: {"):
                        first.set()
                        ev = json.loads(line[6:])
                        if ev.get("usage"):
                            tokens = ev["usage"]["completion_tokens"]
            done_at.append(time.perf_counter())
            return {"wall": time.perf_counter() - t0, "tokens": tokens}

        task = asyncio.create_task(long_stream())
        await first.wait()
        during = []
        for _ in range(n):
            dt, _ = await post(client, url, short)
            during.append((dt, not done_at))  # was the long stream still running when it came back?
        stream = await task
    lat = [dt for dt, running in during if running]
    return {
        "short_alone_p50_ms": percentile(alone, 50) * 1000,
        "short_during_p50_ms": percentile(lat, 50) * 1000,
        "ratio": percentile(lat, 50) / percentile(alone, 50),
        "measured_while_streaming": f"{len(lat)}/{n}",
        "long_stream_tokens": stream["tokens"],
        "long_stream_s": stream["wall"],
    }


async def disconnect(url: str, model: str, stats) -> dict:
    """Read a few chunks of a 400-token stream, hang up, and watch the engine drop the row."""
    before = await stats()
    async with session_for(2) as client:
        # This prompt runs the full 400 tokens on the zoo's medical (the old one hit EOS at 32 tokens under
        # medical's system prompt, which a 20 ms stream interval could reach before the hang-up).
        prompt = "Tell me everything about fevers, at length."
        got = await stream_once(client, url, body(prompt, model, 400), stop_after=3)
    t_close = time.perf_counter()
    deadline = t_close + 30
    while (s := await stats())["aborted"] == before["aborted"] and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    return {
        "aborted_rows": s["aborted"] - before["aborted"],
        "ms_to_abort": (time.perf_counter() - t_close) * 1000,
        "tokens_generated": s["tokens"] - before["tokens"],
        "chunks_received": got["chunks"],
        "max_steps_after_cancel": s["max_steps_after_cancel"],
    }


def _refusals(res: list[tuple[float, Reply]]) -> dict:
    # A refusal is a 503 with code "overloaded"; a 503 for any other reason (e.g. a request that was
    # queued, then timed out at the specialist) is counted apart, never timed as a refusal.
    refused = [(dt, r) for dt, r in res if r.status_code == 503 and r.json()["error"].get("code") == "overloaded"]
    lat = [dt for dt, _ in refused]
    # Which bound refused, as the service says in X-Refused-By: "front" (HAProxy, `consilium front`, before
    # Serve), "ingress" (the ingress replica's total), "specialist" (its per-specialist share, before any
    # handle call), "queue" (Ray's queue behind the handle).
    by = Counter(r.headers.get("x-refused-by", "unknown") for _, r in refused)
    return {
        "sent": len(res),
        "ok": sum(r.status_code == 200 for _, r in res),
        "waited": sum(r.status_code == 0 for _, r in res),  # admitted, unanswered after PROBE_TIMEOUT_S
        "503": len(refused),
        "503_by_front | ingress | specialist | queue": " | ".join(
            str(by[k]) for k in ("front", "ingress", "specialist", "queue")
        )
        + (f" (+{by['unknown']} unattributed)" if by["unknown"] else ""),
        "refused_by": dict(by),
        "503_p50_ms": percentile(lat, 50) * 1000,
        "503_p99_ms": percentile(lat, 99) * 1000,
        "503_max_ms": max(lat, default=float("nan")) * 1000,
        "retry_after": refused[0][1].headers.get("retry-after") if refused else None,
        "openai_body": all(
            r.json()["error"]["type"] == "service_unavailable" and r.headers.get("retry-after") for _, r in refused
        ),  # True when none
        "codes": dict(
            Counter(r.json()["error"].get("code") if r.status_code not in (0, 200) else r.status_code for _, r in res)
        ),
    }


async def overload(
    url: str, model: str, bound: int, ongoing: int, max_tokens: int, stats, ingress=None, fill: int | None = None
) -> dict:
    """Refusal latency at the bound (the target) and in a burst of bound + 128 sent at once (reported too).

    At the bound: `fill` clients (the specialist's capacity; default `bound`) keep long requests in flight
    (each sends the next when one ends), so the binding bound (`bound`: the smaller of the ingress's and the
    specialist's) stays full; then probes arrive one at a time and 64 at once, and every refusal is
    timed from send to answer. The burst measures something else: a refusal there waits behind the
    intake (proxy, ingress, routing) of the burst's own accepted requests.
    """
    long = body(SINGLE, model, max_tokens)
    probe = body(SINGLE, model, 4)
    async with session_for(bound + 128) as client:
        await post(client, url, probe)
        tasks = [asyncio.create_task(post(client, url, long)) for _ in range(bound + 128)]
        done, pending = await asyncio.wait(tasks, timeout=10)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.sleep(3)  # the cancelled requests' rows leave the engine
    async with session_for(bound + 256) as client:
        stop = asyncio.Event()

        async def filler() -> None:
            while not stop.is_set():
                _, r = await post(client, url, long)
                if r.status_code == 503:
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))

        fillers = [asyncio.create_task(filler()) for _ in range(fill or bound)]
        deadline = time.perf_counter() + 60
        reached = False
        while time.perf_counter() < deadline:
            s = await stats() if stats else None
            a = await ingress() if ingress else None
            # Every filler has crossed the proxy into the ingress, and the engine holds max_ongoing_requests
            # (the rest wait in the ingress's queue for the specialist): the intake is over, the bound is full.
            if s is None or (s["running"] + s["waiting"] >= ongoing and (a is None or a["inflight"] >= bound)):
                reached = True
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        before = await ingress() if ingress else None
        one_by_one = [await probe_post(client, url, probe) for _ in range(48)]
        at_once = await asyncio.gather(*(probe_post(client, url, probe) for _ in range(64)))
        after = await ingress() if ingress else None
        stop.set()
        for t in fillers:
            t.cancel()
        await asyncio.gather(*fillers, return_exceptions=True)
    return {
        "bound_reached": reached,
        "ingress_before_probes": before,
        "ingress_after_probes": after,
        "at_bound": _refusals(one_by_one),
        "at_bound_64_at_once": _refusals(at_once),
        "burst": {**_refusals([t.result() for t in done]), "still_running_after_10s": len(pending)},
    }


PROBES = (
    f"  probes 503 | 200 | hung up after {PROBE_TIMEOUT_S:.0f} s, of sent (refused by front | ingress | specialist | "
    "Ray queue)"
)


def probes_row(r: dict) -> str:
    return f"{r['503']} | {r['ok']} | {r['waited']} of {r['sent']} ({r['503_by_front | ingress | specialist | queue']})"


def engines_section(url: str, graph: dict, stats, quick: bool) -> list[dict]:
    model = "medical"
    spec = next(s for s in graph["specialists"] if s["name"] == model)
    ongoing = spec["deployment"]["max_ongoing_requests"]
    from deployments.config import parse_graph_config

    config = parse_graph_config(graph)
    # The bound a pinned request meets: the ingress replica's total or its share of the specialist, the smaller.
    group = spec.get("group") or model
    capacity = config.specialist_capacity()[group]
    bound = min(capacity, config.ingress_bound())
    # c32 and c256 run long enough (5 s or more at ~100 req/s) that warm-up and stragglers do not set the rate.
    totals = {1: 64, 32: 512, 256: 1024} if not quick else {1: 16, 32: 64, 256: 256}
    tp = [asyncio.run(throughput(url, model, c, totals[c], 16, stats)) for c in (1, 32, 256)]
    print_table(
        f"pinned {model}, max_tokens 16, greedy: throughput (served = answered 200; cpu = ms per request by process)",
        tp,
    )
    tt = [asyncio.run(ttft(url, model, c, 32 if c == 1 else 128, 16)) for c in (1, 32)]
    print_table("time to first token (streams, max_tokens 16)", tt)
    sv = asyncio.run(streams_vs_one(url, model, 8, 200, stats))
    sd = asyncio.run(short_during_long(url, model, 400))
    dc = asyncio.run(disconnect(url, model, stats)) if stats is not None else None
    ingress = ingress_stats_reader() if stats is not None else None  # self-hosted only, like stats
    # Long answers keep the slots busy; as many fillers as the specialist holds, whichever bound binds.
    ov = asyncio.run(overload(url, model, bound, ongoing, 400, stats, ingress, fill=capacity))
    at, many, burst = ov["at_bound"], ov["at_bound_64_at_once"], ov["burst"]
    c32, c256 = tp[1]["served_req_per_s"], tp[2]["served_req_per_s"]
    summary = [
        {
            "measure": "c256 / c32 served throughput (200s per second, refusals not counted; target >= 0.9)",
            "value": c256 / c32,
        },
        {"measure": "  c256 refused (503) | c32 refused", "value": f"{tp[2]['503']} | {tp[1]['503']}"},
        {"measure": "8 streams / 1 stream aggregate tok/s, medians of 5 rounds (target >= 4)", "value": sv["ratio"]},
        {
            "measure": "  each round's own ratio",
            "value": " ".join(f"{r:.2f}" for r in sv["ratio_per_round"]),
        },
        {
            "measure": "  one stream tok/s | 8 streams tok/s (medians) | engine rows per step",
            "value": f"{sv['one_stream_tok_s']:.0f} | {sv['8_streams_tok_s']:.0f} | {sv.get('rows_per_step', 0):.2f}",
        },
        {"measure": "short request during a 400-token stream / alone, p50 (target <= 2)", "value": sd["ratio"]},
        {
            "measure": "  short alone | during p50 ms (measured while streaming)",
            "value": f"{sd['short_alone_p50_ms']:.1f} | {sd['short_during_p50_ms']:.1f}"
            f" ({sd['measured_while_streaming']})",
        },
        {
            "measure": "  long stream tokens | seconds",
            "value": f"{sd['long_stream_tokens']} | {sd['long_stream_s']:.2f}",
        },
        {
            "measure": "bounds: ingress | its share of the specialist (fillers) | bound reached",
            "value": f"{config.ingress_bound()} | {capacity} | {ov['bound_reached']}",
        },
        {
            "measure": f"at the bound ({bound} in flight), one at a time: 503 p50 | p99 | max ms (target < 100)",
            "value": f"{at['503_p50_ms']:.1f} | {at['503_p99_ms']:.1f} | {at['503_max_ms']:.1f}",
        },
        {
            "measure": PROBES,
            "value": probes_row(at),
        },
        {
            "measure": "at the bound, 64 at once: 503 latency p50 | p99 | max ms",
            "value": f"{many['503_p50_ms']:.1f} | {many['503_p99_ms']:.1f} | {many['503_max_ms']:.1f}",
        },
        {
            "measure": PROBES,
            "value": probes_row(many),
        },
        {
            "measure": f"burst of {bound + 128} at once: 503 latency p50 | p99 | max ms",
            "value": f"{burst['503_p50_ms']:.1f} | {burst['503_p99_ms']:.1f} | {burst['503_max_ms']:.1f}",
        },
        {
            "measure": "  burst 503s | 200s in 10 s | still running",
            "value": f"{burst['503']} | {burst['ok']} | {burst['still_running_after_10s']}",
        },
        {
            "measure": "  burst 503s refused by front | ingress | specialist | Ray queue",
            "value": burst["503_by_front | ingress | specialist | queue"],
        },
        {
            "measure": "503 has Retry-After | OpenAI error body (all)",
            "value": f"{at['retry_after']} | {at['openai_body'] and many['openai_body'] and burst['openai_body']}",
        },
    ]
    if dc is not None:
        summary += [
            {
                "measure": "disconnect: forwards a cancelled row still took (target <= 1)",
                "value": dc["max_steps_after_cancel"],
            },
            {
                "measure": "disconnect: ms from hang-up to row dropped | tokens generated",
                "value": f"{dc['ms_to_abort']:.1f} | {dc['tokens_generated']}",
            },
        ]
    for row in tt:
        summary.append(
            {
                "measure": f"TTFT p50 | p99 ms at c{row['concurrency']}",
                "value": f"{row['ttft_p50_ms']:.1f} | {row['ttft_p99_ms']:.1f}",
            }
        )
    b, a = ov["ingress_before_probes"], ov["ingress_after_probes"]
    if b and a and group in a.get("specialists", {}):
        # What the Ray queue (the backstop) refused during the probes, and (our in-flight count, Ray's
        # num_queued_requests) at its last refusals: how far the backstop's view was from the ingress's.
        n = a["specialists"][group]["queue_refused"] - b["specialists"][group]["queue_refused"]
        summary.append(
            {
                "measure": "  Ray queue refusals during the probes (fillers too) | last (ours, Ray queued)",
                "value": f"{n} | {a['queue_refusals'][-3:] if n else '-'}",
            }
        )
    print_table("engines under load (issue #11)", summary)
    return [*tp, *tt, {"streams_vs_one": sv}, {"short_during_long": sd}, {"disconnect": dc}, {"overload": ov}, *summary]


def engine_alone(zoo: Path, max_tokens: int = 16) -> list[dict]:
    """The same pinned work on the HF engine in this process (no Serve, no HTTP): where does c256 go?"""
    import torch

    from deployments.config import EngineConfig
    from deployments.engines.base import GenerationRequest, SamplingParams
    from deployments.engines.hf import HFEngine

    torch.set_num_threads(1)  # as in a Serve replica (Ray sets OMP_NUM_THREADS from num_cpus)
    engine = HFEngine(EngineConfig(model=str(zoo / "medical")))
    req = GenerationRequest(
        messages=({"role": "user", "content": SINGLE},),
        params=SamplingParams(temperature=0.0, max_new_tokens=max_tokens),
    )

    async def run(c: int, total: int) -> dict:
        left = list(range(total))
        tokens = 0

        async def worker() -> None:
            nonlocal tokens
            while left:
                left.pop()
                n = (await engine.generate(req)).completion_tokens  # read after the await: no lost update
                tokens += n

        await engine.generate(req)
        before = engine.engine_stats()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - t0
        after = engine.engine_stats()
        steps = max(1, after["steps"] - before["steps"])
        return {
            "concurrency": c,
            "req_per_s": total / wall,
            "tok_per_s": tokens / wall,
            "rows_per_step": tokens / steps,
        }

    rows = [asyncio.run(run(c, max(64, 2 * c))) for c in (1, 32, 256)]
    print_table(f"HF engine alone (in process), zoo medical, max_tokens {max_tokens}", rows)

    async def streams(n: int, tokens: int = 200) -> float:
        """Aggregate tok/s of n concurrent streams consumed in this process (no Serve, no HTTP)."""
        sreq = GenerationRequest(
            messages=({"role": "user", "content": "Tell me everything you know about fevers, at length."},),
            params=SamplingParams(temperature=0.0, max_new_tokens=tokens),
        )

        async def one() -> int:
            last = 0
            async for d in engine.stream(sreq):
                last = d.completion_tokens or last
            return last

        await one()
        t0 = time.perf_counter()
        total = sum(await asyncio.gather(*(one() for _ in range(n))))
        return total / (time.perf_counter() - t0)

    one, eight = asyncio.run(streams(1)), asyncio.run(streams(8))
    srows = [{"streams": 1, "tok_per_s": one, "ratio": 1.0}, {"streams": 8, "tok_per_s": eight, "ratio": eight / one}]
    print_table("HF engine alone: 200-token streams, aggregate tok/s (the in-engine ceiling of 8 streams / 1)", srows)
    engine.close()
    return rows + srows


def tiny_graph(zoo: Path) -> dict:
    import yaml

    args = yaml.safe_load((Path(__file__).parents[1] / "configs" / "zoo.yaml").read_text())["applications"][0]["args"]
    for s in args["specialists"]:
        s["model"] = s["model"].replace(".zoo", str(zoo))
        s["adapters"] = {k: v.replace(".zoo", str(zoo)) for k, v in s.get("adapters", {}).items()}
    args["merger"]["model"] = args["merger"]["model"].replace(".zoo", str(zoo))
    return args


def apply_overrides(graph: dict, sets: list[str]) -> None:
    """`--set a.b=v`: a dotted path into the graph args (a specialist by name: specialists.medical.x), v as YAML."""
    import yaml

    for item in sets:
        path, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        node, keys = graph, path.split(".")
        for k in keys[:-1]:
            if isinstance(node, list):
                node = next((x for x in node if x.get("name") == k), None)
                if node is None:
                    raise SystemExit(f"--set {item!r}: no list item named {k!r}")
            else:
                node = node.setdefault(k, {})
        node[keys[-1]] = yaml.safe_load(raw)


def start_service(graph: dict) -> str:
    """configs/zoo.yaml's graph in a private local Ray cluster on this helper's port."""
    import ray
    from ray import serve

    from deployments.app import build_graph
    from deployments.config import parse_graph_config

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_graph(parse_graph_config(graph)), name="consilium", route_prefix="/")
    return f"http://127.0.0.1:{PORT}"


@contextlib.contextmanager
def front_for(graph: dict, url: str) -> Iterator[str]:
    """`consilium front` for the graph (its bound derived from the config, as the CLI does), HAProxy running on
    PORT + 1 in front of the service at `url`; yields the front's URL."""
    from deployments.config import parse_graph_config
    from deployments.front import Address, plan_front, write_front

    listen = Address("127.0.0.1", PORT + 1)
    backend = Address("127.0.0.1", httpx.URL(url).port)
    plan = plan_front(parse_graph_config(graph), listen=listen, backends=(backend,))
    with tempfile.TemporaryDirectory() as tmp, haproxy_running(write_front(plan, Path(tmp)), listen.host, listen.port):
        print(f"front: HAProxy on {listen}, refusing completions past {plan.max_inflight} in flight")
        yield f"http://{listen}"


def engine_stats_reader(name: str):
    from ray import serve

    handle = serve.get_deployment_handle(f"specialist-{name}", app_name="consilium")

    async def read() -> dict:
        return await handle.engine_stats.remote()

    return read


def ingress_stats_reader():
    from ray import serve

    handle = serve.get_deployment_handle("router", app_name="consilium")

    async def read() -> dict:
        return await handle.admission_stats.remote()

    return read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--zoo", default=".zoo")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--start", action="store_true", help=f"host configs/zoo.yaml on port {PORT} for the run")
    ap.add_argument(
        "--front",
        action="store_true",
        help=f"with --start: send every request through `consilium front` (HAProxy, port {PORT + 1})",
    )
    ap.add_argument(
        "--sections", default="inprocess,engines,load,fanout", help="comma-separated: inprocess, engines, load, fanout"
    )
    ap.add_argument("--quick", action="store_true", help="fewer requests per level")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --start, override the graph config, e.g. server.deployment.num_replicas=2 or "
        "specialists.medical.stream_interval_s=0.02 (repeatable)",
    )
    args = ap.parse_args()
    if args.front and not args.start:
        raise SystemExit("--front needs --start (against a running service, point --url at your front instead)")
    sections = set(args.sections.split(","))
    stats = None
    if args.start:
        graph = tiny_graph(Path(args.zoo))
        apply_overrides(graph, args.set)
        print("config overrides:", args.set or "none")
        args.url = start_service(graph)
        stats = engine_stats_reader("medical")
    else:
        graph = tiny_graph(Path(args.zoo))
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("serve_bench only targets a service on this machine (loopback)")
    with contextlib.ExitStack() as stack:
        if args.front:
            args.url = stack.enter_context(front_for(graph, args.url))
        run_sections(args, graph, stats, sections)


def run_sections(args: argparse.Namespace, graph: dict, stats, sections: set[str]) -> None:
    try:
        if "inprocess" in sections:
            print("saved", save("engine_alone", engine_alone(Path(args.zoo))))
        if "engines" in sections:
            rows = engines_section(args.url, graph, stats, args.quick)
            print("saved", save("serve_engines", rows, url=args.url, self_hosted=args.start, front=args.front))
        if sections & {"load", "fanout"}:
            classic(args, sections)
    finally:
        if args.start:
            from ray import serve

            serve.shutdown()


def classic(args: argparse.Namespace, sections: set[str]) -> None:
    """The original tables: req/s per concurrency for one- and two-route prompts, fan-out and graph overhead."""
    rows = []
    for label, prompt in (("single-route", SINGLE), ("two-route", TWO)):
        for c in (1, 8, 32):
            r = asyncio.run(load(args.url, body(prompt, "auto", args.max_tokens), c, max(args.requests, c)))
            rows.append({"prompt": label, "concurrency": c, **r})
    print_table(f"tiny service at {args.url}, max_tokens={args.max_tokens}, greedy", rows)
    if "fanout" not in sections:
        print("saved", save("serve", rows, url=args.url, max_tokens=args.max_tokens))
        return

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
