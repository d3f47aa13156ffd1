"""Soak: N minutes at concurrency 32 against the zoo graph; errors must be 0 and every replica's memory flat.

    python -m bench.soak --minutes 10 --concurrency 32

A closed loop of `concurrency` clients sends a mix of pinned, routed (merged) and streamed requests.
Every replica's resident memory (RSS) is sampled every --sample-s seconds; the slope of a least-squares
line through the samples after the warm-up is reported in MB per minute. Writes bench/results/soak.json.
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


def soak(url: str, app: str, minutes: float, concurrency: int, sample_s: float, warmup_s: float) -> dict[str, Any]:
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
    while time.monotonic() < end:
        now = time.monotonic() - t0
        for name, mb in replica_rss_mb(app).items():
            samples.setdefault(name, []).append((now, mb))
        time.sleep(sample_s)
    for t in threads:
        t.join(timeout=180)
    wall = time.monotonic() - t0
    memory = {}
    for name, series in sorted(samples.items()):
        steady = [(t, y) for t, y in series if t >= warmup_s] or series
        memory[name] = {
            "rss_start_mb": round(steady[0][1], 1),
            "rss_end_mb": round(steady[-1][1], 1),
            "slope_mb_per_min": round(slope_per_min(steady), 3),
            "samples": len(steady),
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
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path(".zoo"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="samples before this are left out of the slope")
    ap.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = ap.parse_args(argv)
    if not (args.zoo / "zoo.json").is_file():
        from deployments.models.zoo import build_zoo

        build_zoo(args.zoo)
    app = f"soak{os.getpid()}"
    url = start(args.zoo, app, max_tokens=8, frozen_timeout_s=60.0)  # no drill here: normal timeouts
    try:
        report = soak(url, app, args.minutes, args.concurrency, args.sample_s, min(args.warmup_s, args.minutes * 30))
    finally:
        stop()
    print(
        f"soak: {report['minutes']} min, concurrency {report['concurrency']}: {report['requests']} requests, "
        f"{report['rps']} req/s, p50 {report['p50_s']} s, p99 {report['p99_s']} s, errors {report['errors']}"
    )
    print("| replica | RSS start MB | RSS end MB | slope MB/min | samples |")
    print("|---|---|---|---|---|")
    for name, m in report["memory"].items():
        print(f"| {name} | {m['rss_start_mb']} | {m['rss_end_mb']} | {m['slope_mb_per_min']} | {m['samples']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **report}, indent=2))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
