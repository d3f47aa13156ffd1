"""Source-disjoint dev score: leave whole training sources out (one per domain per fold), never the held-out ones.

Run: nice -n 10 python -m router.dev_eval [--c 16] [--static-from DIR] [--static-scale 1]
Every modelling choice is made on this score; the held-out sources (router/data/SOURCES.md) are read
only by the final bench. Each fold trains on train+val minus its three sources and reports top-1
(argmax) accuracy on them; the summary is the mean accuracy over the 12 left-out sources.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse as sp

from router.data import CORPUS_DIR
from router.model import HashingConfig
from router.train import TrainConfig, features, load_static, read_jsonl, static_matrix, targets

FOLDS = [
    ["cqa-webmasters", "healthsearchqa", "clinc150"],
    ["cqa-programmers", "icliniq", "fiqa"],
    ["cqa-unix", "questiondoctor", "banking77"],
    ["nl2bash", "rqe-clinical", "cqa-english"],
]


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--c", type=float, default=TrainConfig.c)
    parser.add_argument("--static-from", default="")
    parser.add_argument("--static-dim", type=int, default=TrainConfig.static_dim)
    parser.add_argument("--static-scale", type=float, default=TrainConfig.static_scale)
    args = parser.parse_args()
    cfg = TrainConfig()
    data = read_jsonl(CORPUS_DIR / "train.jsonl.gz") + read_jsonl(CORPUS_DIR / "val.jsonl.gz")
    domains = sorted({label for ex in data for label in ex.labels})
    hashing = HashingConfig(buckets=cfg.linear_buckets, punctuation=False)
    x = features([ex.text for ex in data], hashing)
    if args.static_from:
        table, tok = load_static(args.static_from, args.static_dim)
        table = table.astype(np.float16).astype(np.float32)
        s_x = static_matrix([ex.text for ex in data], tok, table, hashing.max_chars)
        x = sp.hstack([x, sp.csr_matrix(s_x * args.static_scale)]).tocsr()
    y = targets(data, domains).numpy()
    src = np.array([ex.source for ex in data])
    acc = {}
    for fold in FOLDS:
        tr = np.where(~np.isin(src, fold))[0]
        dev = np.where(np.isin(src, fold) & (y.sum(axis=1) == 1))[0]
        weight = np.where(y[tr].sum(axis=1) > 1, cfg.multi_label_weight, 1.0)
        scores = np.zeros((len(dev), len(domains)))
        for j in range(len(domains)):
            lr = LogisticRegression(C=args.c, solver="liblinear", class_weight=cfg.class_weight, max_iter=300)
            lr.fit(x[tr], y[tr, j], sample_weight=weight)
            scores[:, j] = lr.decision_function(x[dev])
        hit = scores.argmax(axis=1) == y[dev].argmax(axis=1)
        for s in fold:
            acc[s] = float(hit[src[dev] == s].mean())
            print(f"{s:20s} {acc[s]:.3f}", flush=True)
    print(f"mean accuracy over {len(acc)} left-out sources: {np.mean(list(acc.values())):.4f}")


if __name__ == "__main__":
    main()
