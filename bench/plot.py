"""PNG charts from bench/results/*.json: throughput and latency against concurrency, router latency histogram.

    python -m bench.plot [--results bench/results] [--out bench/results/plots]

Any result file whose rows carry `concurrency` is a load run: one line per remaining string column value
(e.g. `prompt`), req/s on one chart, p50 (solid) and p99 (dashed) latency on another. Engine results
(`batch`, `tokens_per_s`) get a tokens/s chart; the router bench's raw latencies (meta `latency_ms`) a
histogram. Missing or unreadable files are reported and skipped: plotting never fails a run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    """name -> record for every readable *.json; a bad file is reported, not fatal."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(results.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"skip {path}: {err}", file=sys.stderr)
            continue
        if isinstance(record, dict) and isinstance(record.get("rows"), list):
            out[path.stem] = record
        else:
            print(f"skip {path}: no 'rows' list", file=sys.stderr)
    return out


def load_series(rows: list[dict[str, Any]], x: str, y: str) -> dict[str, tuple[list[float], list[float]]]:
    """Rows with numeric x and y, grouped by their other string-valued columns; sorted by x."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if not (isinstance(r.get(x), int | float) and isinstance(r.get(y), int | float)):
            continue
        label = " ".join(str(v) for k, v in r.items() if isinstance(v, str) and k not in (x, y)) or y
        series.setdefault(label, []).append((float(r[x]), float(r[y])))
    return {k: ([a for a, _ in sorted(v)], [b for _, b in sorted(v)]) for k, v in series.items()}


def _figure():  # imported lazily: matplotlib is only needed to draw
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_load(name: str, record: dict[str, Any], out: Path) -> list[Path]:
    """Throughput and latency against concurrency for one load run."""
    plt = _figure()
    rows = record["rows"]
    made = []
    thr_key = next((k for k in ("req_per_s", "requests_per_s", "tokens_per_s") if any(k in r for r in rows)), None)
    if thr_key:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, (xs, ys) in load_series(rows, "concurrency", thr_key).items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.set(xscale="log", xlabel="concurrency", ylabel=thr_key.replace("_", " "), title=f"{name}: throughput")
        ax.set_xticks(sorted({r["concurrency"] for r in rows if "concurrency" in r}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
        made.append(_save(fig, out / f"{name}_throughput.png"))
    if any("p50_ms" in r for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, (xs, ys) in load_series(rows, "concurrency", "p50_ms").items():
            (line,) = ax.plot(xs, ys, marker="o", label=f"{label} p50")
            p99 = load_series(rows, "concurrency", "p99_ms").get(label)
            if p99:
                ax.plot(*p99, marker="x", linestyle="--", color=line.get_color(), label=f"{label} p99")
        ax.set(xscale="log", xlabel="concurrency", ylabel="latency (ms)", title=f"{name}: latency")
        ax.set_xticks(sorted({r["concurrency"] for r in rows if "concurrency" in r}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        made.append(_save(fig, out / f"{name}_latency.png"))
    return made


def plot_engine(name: str, record: dict[str, Any], out: Path) -> list[Path]:
    plt = _figure()
    series = load_series(record["rows"], "batch", "tokens_per_s")
    if not series:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel="batch size", ylabel="tokens/s", title=f"{name}: throughput")
    ax.grid(alpha=0.3)
    return [_save(fig, out / f"{name}_tokens_per_s.png")]


def plot_router_histogram(record: dict[str, Any], out: Path) -> list[Path]:
    lat = np.asarray(record.get("meta", {}).get("latency_ms") or [], dtype=float)
    if lat.size == 0:
        print("router: no raw latencies in meta.latency_ms (rerun python -m bench.router_bench)", file=sys.stderr)
        return []
    plt = _figure()
    p50, p99 = np.percentile(lat, [50, 99])
    fig, ax = plt.subplots(figsize=(6, 4))
    # Log-spaced bins on a log axis: a few slow outliers (a busy machine) must not squash the body.
    lo, hi = max(lat.min(), 1e-4), max(lat.max(), lat.min() * 1.01, 2e-4)
    ax.hist(lat, bins=np.geomspace(lo, hi, 60), color="#3559e0")
    ax.set_xscale("log")
    for q, v in (("p50", p50), ("p99", p99)):
        ax.axvline(v, color="k", linestyle="--", linewidth=1)
        ax.text(v, ax.get_ylim()[1] * 0.9, f" {q} {v:.3f} ms", fontsize=8)
    ax.set(xlabel="latency per prompt (ms)", ylabel="prompts", title=f"router latency ({lat.size} samples)")
    return [_save(fig, out / "router_latency_hist.png")]


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_all(results: Path, out: Path) -> list[Path]:
    made: list[Path] = []
    for name, record in load_results(results).items():
        rows = record["rows"]
        if any("concurrency" in r for r in rows):
            made += plot_load(name, record, out)
        if any("batch" in r and "tokens_per_s" in r for r in rows):
            made += plot_engine(name, record, out)
        if name == "router":
            made += plot_router_histogram(record, out)
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=None, help="default: <results>/plots")
    args = ap.parse_args()
    if not args.results.is_dir():
        raise SystemExit(f"no results directory {args.results}: run a benchmark first (python -m bench.serve_bench)")
    made = plot_all(args.results, args.out or args.results / "plots")
    if not made:
        print(f"nothing to plot in {args.results}")
    for p in made:
        print("wrote", p)


if __name__ == "__main__":
    main()
