"""Soak: N minutes at concurrency 32 against the zoo graph; errors must be 0 and every replica's memory flat.

    python -m bench.soak --minutes 10 --concurrency 32

A closed loop of `concurrency` clients sends a mix of pinned, routed (merged) and streamed requests.
Every replica's resident memory (RSS) is sampled every --sample-s seconds; the slope of a least-squares
line through the samples after the warm-up is reported in MB per minute, and again over the second half
alone (a leak keeps its slope; allocator warm-up levels off). --report-s N asks the router ingress for its
own memory view every N seconds (RSS against glibc's bytes in use and free, Python objects; tracemalloc
too with --tracemalloc FRAMES) and once more at the end, idle, after malloc_trim. Writes
bench/results/soak.json (with every replica's RSS series).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.faults_bench import MEDICAL, TWO_DOMAIN, one_request, start, stop

BODIES: list[dict[str, Any]] = [
    {"model": "medical", "messages": [{"role": "user", "content": MEDICAL}], "max_tokens": 8},
    {"model": "auto", "messages": [{"role": "user", "content": TWO_DOMAIN}], "max_tokens": 8},
    {"model": "code", "messages": [{"role": "user", "content": "def f(x):"}], "max_tokens": 8, "stream": True},
    {"model": "auto", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8, "stream": True},
]


def replica_rss_mb(app: str) -> dict[str, float]:
    """ "<deployment> (pid N)" -> RSS (MB) of each replica process (Ray titles them ray::ServeReplica:app:name)."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = p.info["cmdline"] or []
        head = cmd[0] if cmd else ""
        prefix = f"ray::ServeReplica:{app}:"
        if head.startswith(prefix) and p.info["memory_info"] is not None:
            # The title ends in the running method (".handle_request..."): one replica is one pid.
            name = f"{head.removeprefix(prefix).split()[0].split('.')[0]} (pid {p.pid})"
            out[name] = p.info["memory_info"].rss / 2**20
    return out


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    ts, ys = [t for t, _ in samples], [y for _, y in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 60.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


def ingress_report(app: str, top: int = 15, trim: bool = False) -> dict[str, Any]:
    """The router ingress's memory report (deployments.memory) through a Serve handle; {"error": ...} if it fails."""
    from ray import serve

    try:
        return serve.get_deployment_handle("router", app_name=app).memory_report.remote(top, trim).result(timeout_s=120)
    except Exception as err:  # a diagnosis must never end the soak
        return {"error": repr(err)}


def soak(
    url: str,
    app: str,
    minutes: float,
    concurrency: int,
    sample_s: float,
    warmup_s: float,
    report_s: float = 0.0,
) -> dict[str, Any]:
    end = time.monotonic() + minutes * 60
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0

    def client(i: int) -> None:
        nonlocal sent
        k = i
        while time.monotonic() < end:
            o = one_request(url, BODIES[k % len(BODIES)])
            k += 1
            with lock:
                sent += 1
                latencies.append(o.seconds)
                if not o.ok:
                    errors.append(f"{o.status} {o.detail}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples: dict[str, list[tuple[float, float]]] = {}
    reports: list[dict[str, Any]] = []
    next_report = 0.0
    while time.monotonic() < end:
        now = time.monotonic() - t0
        for name, mb in replica_rss_mb(app).items():
            samples.setdefault(name, []).append((now, mb))
        if report_s and now >= next_report:
            with lock:
                done = sent
            rep = ingress_report(app)
            reports.append({"t_s": round(now, 1), "requests": done, **rep})
            print(json.dumps(reports[-1])[:4000], flush=True)
            next_report = now + report_s
        time.sleep(sample_s)
    for t in threads:
        t.join(timeout=180)
    wall = time.monotonic() - t0
    if report_s:
        # Idle now: give glibc's free heap back (malloc_trim) and see how much of the RSS was live memory.
        rep = ingress_report(app, trim=True)
        reports.append({"t_s": round(time.monotonic() - t0, 1), "requests": sent, **rep})
    memory = {}
    for name, series in sorted(samples.items()):
        steady = [(t, y) for t, y in series if t >= warmup_s] or series
        # A leak keeps its slope; warm-up (allocator, caches) flattens: the second half tells them apart.
        second = steady[len(steady) // 2 :]
        memory[name] = {
            "rss_start_mb": round(steady[0][1], 1),
            "rss_end_mb": round(steady[-1][1], 1),
            "slope_mb_per_min": round(slope_per_min(steady), 3),
            "slope_second_half_mb_per_min": round(slope_per_min(second), 3),
            "samples": len(steady),
            "series": [(round(t, 1), round(y, 1)) for t, y in series],
        }
    lat = sorted(latencies)
    return {
        "minutes": minutes,
        "concurrency": concurrency,
        "requests": sent,
        "errors": len(errors),
        "error_examples": errors[:10],
        "rps": round(sent / wall, 2),
        "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3) if lat else None,
        "memory": memory,
        "ingress_reports": reports,
    }


def print_ingress_reports(reports: list[dict[str, Any]]) -> None:
    """The ingress's own view: RSS against what is live (Python objects, traced bytes, glibc blocks in use)."""
    print("\nrouter ingress (deployments.memory; the last row after malloc_trim, idle):")
    print("| t s | requests | RSS MB | anon MB | malloc in use MB | malloc free MB | py objects | traced MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in reports:
        if "error" in r:
            print(f"| {r['t_s']} | {r['requests']} | {r['error'][:60]} | | | | | |")
            continue
        m = r.get("malloc") or {}
        rss, malloc = r["rss_mb"], m
        if "rss_after_trim_mb" in r:
            rss, malloc = f"{r['rss_mb']} -> {r['rss_after_trim_mb']}", r.get("malloc_after_trim") or {}
        print(
            f"| {r['t_s']} | {r['requests']} | {rss} | {r.get('anon_mb', '')} | {malloc.get('in_use_mb', '')} "
            f"| {malloc.get('free_mb', '')} | {r['gc_objects']} | {r.get('traced_mb', '-')} |"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path(".zoo"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="samples before this are left out of the slope")
    ap.add_argument(
        "--report-s", type=float, default=0.0, help="ask the ingress for a memory report this often (0: never)"
    )
    ap.add_argument(
        "--tracemalloc", type=int, default=0, help="frames for tracemalloc in the ingress (0: off; slows it down)"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = ap.parse_args(argv)
    if not (args.zoo / "zoo.json").is_file():
        from deployments.models.zoo import build_zoo

        build_zoo(args.zoo)
    app = f"soak{os.getpid()}"
    if args.tracemalloc:
        os.environ["CONSILIUM_TRACEMALLOC"] = str(args.tracemalloc)  # inherited by the replicas ray.init starts
    url = start(args.zoo, app, max_tokens=8, frozen_timeout_s=60.0)  # no drill here: normal timeouts
    try:
        report = soak(
            url,
            app,
            args.minutes,
            args.concurrency,
            args.sample_s,
            min(args.warmup_s, args.minutes * 30),
            args.report_s,
        )
    finally:
        stop()
    print(
        f"soak: {report['minutes']} min, concurrency {report['concurrency']}: {report['requests']} requests, "
        f"{report['rps']} req/s, p50 {report['p50_s']} s, p99 {report['p99_s']} s, errors {report['errors']}"
    )
    print("| replica | RSS start MB | RSS end MB | slope MB/min | 2nd half MB/min | samples |")
    print("|---|---|---|---|---|---|")
    for name, m in report["memory"].items():
        print(
            f"| {name} | {m['rss_start_mb']} | {m['rss_end_mb']} | {m['slope_mb_per_min']} "
            f"| {m['slope_second_half_mb_per_min']} | {m['samples']} |"
        )
    if report["ingress_reports"]:
        print_ingress_reports(report["ingress_reports"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **report}, indent=2))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
