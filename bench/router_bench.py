"""Tiny ada: latency per prompt on one core, artifact size, training time, held-out quality."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import percentile, print_table, save
from router.data import DATA_DIR
from router.evaluate import evaluate
from router.model import TinyAda, shipped_router_path
from router.train import read_jsonl, train_router


def main() -> None:
    torch.set_num_threads(1)  # "one CPU core"
    os.environ["OMP_NUM_THREADS"] = "1"
    heldout = read_jsonl(DATA_DIR / "heldout.jsonl")
    model = TinyAda.load(shipped_router_path())
    texts = [ex.text for ex in heldout]
    for t in texts[:50]:
        model.score(t)  # warm-up
    lat = []
    for _ in range(5):
        for t in texts:
            t0 = time.perf_counter()
            model.score(t)
            lat.append((time.perf_counter() - t0) * 1000)
    long_text = " ".join(texts) * 20
    long_lat = []
    for _ in range(50):
        t0 = time.perf_counter()
        model.score(long_text)
        long_lat.append((time.perf_counter() - t0) * 1000)
    size = sum(f.stat().st_size for f in shipped_router_path().iterdir())
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    trained, _ = train_router(read_jsonl(DATA_DIR / "train.jsonl"), read_jsonl(DATA_DIR / "val.jsonl"), progress=False)
    train_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        trained.save(Path(d))
    report = evaluate(model, heldout)
    rows = [
        {"metric": "latency p50 (ms, batch 1, 1 core)", "value": percentile(lat, 50), "target": "< 0.5"},
        {"metric": "latency p99 (ms)", "value": percentile(lat, 99), "target": "< 2"},
        {
            "metric": f"latency p50, {len(long_text) // 1000} kB prompt (ms)",
            "value": percentile(long_lat, 50),
            "target": "bounded",
        },
        {"metric": "artifact size (MB)", "value": size / 1e6, "target": "< 5"},
        {"metric": "training time (s, 2 cores)", "value": train_s, "target": "< 60"},
        {"metric": "held-out single-label accuracy", "value": report.accuracy, "target": ">= 0.95"},
        {"metric": "held-out macro F1", "value": report.macro_f1, "target": ">= 0.93"},
        {"metric": "held-out multi-domain: all chosen", "value": report.multi_both_chosen, "target": ">= 0.80"},
        {"metric": "held-out exact match", "value": report.exact_match, "target": "-"},
    ]
    print_table(f"tiny ada router ({len(heldout)} held-out prompts from unseen templates)", rows)
    print("saved", save("router", rows, latency_ms=lat))  # raw samples: bench/plot.py draws the histogram


if __name__ == "__main__":
    main()
