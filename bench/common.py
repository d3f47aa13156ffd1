"""Small helpers every benchmark shares: a printed table and a JSON record under bench/results/."""

from __future__ import annotations

import contextlib
import json
import platform
import random
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"

# Ports a local Serve proxy may take. Not from the kernel's ephemeral range (32768-60999 on Linux): while a
# local Ray starts, its workers' gRPC servers (ray.init leaves their ports to the kernel) and its outgoing
# connections are given ephemeral ports, so a port that was free when picked there can be taken before Serve
# binds it (CI failed once with "Failed to bind"). Not `ray start`'s worker ports (10002-19999) nor Serve's
# direct-ingress replica ports (30000-31000) either.
LOCAL_PORTS = (20000, 29999)


def free_port() -> int:
    """A loopback TCP port in LOCAL_PORTS that nothing listens on now."""
    for _ in range(200):
        port = random.randint(*LOCAL_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free loopback port in {LOCAL_PORTS[0]}-{LOCAL_PORTS[1]} after 200 tries")


@contextlib.contextmanager
def haproxy_running(cfg: Path, host: str, port: int, timeout_s: float = 15) -> Iterator[subprocess.Popen]:
    """`haproxy -f cfg` in the foreground (as a user runs the front), up once host:port accepts; stopped after."""
    from deployments.front import Address, FrontError, start_haproxy

    # Its output goes to a file, not a pipe: a pipe nobody reads could fill and stall haproxy.
    with tempfile.TemporaryFile() as out:
        try:
            proc = start_haproxy(cfg, Address(host, port), out, timeout_s)
        except FrontError as err:
            raise RuntimeError(str(err)) from None
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def percentile(xs: list[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation (numpy's default); NaN for no samples."""
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarize_ms(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    p50, p99 = np.percentile(ms, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "mean_ms": float(ms.mean())}


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        print(f"{title}: no rows")
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def save(name: str, rows: list[dict[str, Any]], **meta: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "meta": meta,
        "rows": rows,
    }
    path.write_text(json.dumps(record, indent=2))
    return path
