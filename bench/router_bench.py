"""Tiny ada on held-out sources: accuracy, macro F1, recall per domain, two-domain, latency, size, training time.

Run: nice -n 10 python -m bench.router_bench [--skip-train]
The quality numbers are on whole sources that training never saw (router/data/SOURCES.md), not on a
random split; the two-domain number is on the hand-written two-domain prompts of unseen templates.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # "one CPU core": set before numpy loads its BLAS
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import print_table, save
from router.data import CORPUS_DIR
from router.evaluate import evaluate
from router.model import TinyAda, shipped_router_path
from router.train import read_jsonl, train_router


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(shipped_router_path()), help="artifact to measure")
    parser.add_argument("--skip-train", action="store_true", help="do not time a retraining")
    args = parser.parse_args()
    torch.set_num_threads(1)
    heldout = read_jsonl(CORPUS_DIR / "heldout.jsonl.gz")
    real = [ex for ex in heldout if ex.source != "handwritten" and len(ex.labels) == 1]
    two = [ex for ex in heldout if len(ex.labels) > 1]
    model = TinyAda.load(args.model)
    report = evaluate(model, real, timing=False)
    multi = evaluate(model, two, timing=False)
    texts = [ex.text for ex in heldout]
    for t in texts[:200]:
        model.score(t)  # warm-up
    lat, cpu = [], []  # wall time, and this thread's CPU time (the same call minus time preempted by others)
    for _ in range(3):
        for t in texts:
            c0, t0 = time.thread_time(), time.perf_counter()
            model.score(t)
            lat.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.thread_time() - c0) * 1000)
    long_text = " ".join(texts[:2000])  # ~200 kB: the featuriser reads a bounded prefix
    long_lat = []
    for _ in range(50):
        t0 = time.perf_counter()
        model.score(long_text)
        long_lat.append((time.perf_counter() - t0) * 1000)
    size = sum(f.stat().st_size for f in Path(args.model).iterdir())
    train_s = float("nan")
    if not args.skip_train:
        torch.set_num_threads(2)
        train, val = read_jsonl(CORPUS_DIR / "train.jsonl.gz"), read_jsonl(CORPUS_DIR / "val.jsonl.gz")
        t0 = time.perf_counter()
        trained, _ = train_router(train, val, progress=False)
        train_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            trained.save(Path(d))
    rows = [
        {"metric": "held-out sources: single-label accuracy", "value": report.accuracy, "target": ">= 0.95"},
        {"metric": "held-out sources: macro F1", "value": report.macro_f1, "target": ">= 0.93"},
        *[
            {"metric": f"held-out sources: {d} recall", "value": m["recall"], "target": ">= 0.90"}
            for d, m in report.per_domain.items()
        ],
        {"metric": "held-out sources: fell back to general", "value": report.fallback_rate, "target": "-"},
        {"metric": "two-domain prompts: both chosen", "value": multi.multi_both_chosen, "target": ">= 0.80"},
        {"metric": "latency p50 (ms, batch 1, 1 core)", "value": float(np.percentile(lat, 50)), "target": "<= 0.2"},
        {"metric": "latency p99 (ms)", "value": float(np.percentile(lat, 99)), "target": "<= 1"},
        {"metric": "CPU time per prompt p50 (ms, thread)", "value": float(np.percentile(cpu, 50)), "target": "-"},
        {"metric": "CPU time per prompt p99 (ms, thread)", "value": float(np.percentile(cpu, 99)), "target": "-"},
        {
            "metric": f"latency p50, {len(long_text) // 1000} kB prompt (ms)",
            "value": float(np.percentile(long_lat, 50)),
            "target": "bounded",
        },
        {"metric": "artifact size (MB)", "value": size / 1e6, "target": "<= 10"},
        {"metric": "training time (s, 2 threads)", "value": train_s, "target": "<= 300"},
    ]
    title = f"tiny ada router: {len(real)} prompts of {len(report.per_source)} held-out sources, {len(two)} two-domain"
    print_table(title, rows)
    print(f"load average during the run: {os.getloadavg()} on {os.cpu_count()} CPUs")
    print()
    print(report.render())
    print(
        "saved",
        save(
            "router",
            rows,
            per_source=report.per_source,
            confusion=report.confusion,
            thresholds=model.config.thresholds,
            load_avg=os.getloadavg(),
            latency_ms=lat,  # raw samples: bench/plot.py draws the histogram
        ),
    )


if __name__ == "__main__":
    main()
