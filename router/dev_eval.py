"""Source-disjoint dev score: leave whole training sources out (one per domain per fold), never the held-out ones.

Run: nice -n 10 python -m router.dev_eval [--c 16] [--drop-sources a,b] [--drug-feature names]
     [--disease-feature names] [--shapes] [--no-one-word] [--clean-pools 0.9] [--folds 1,2] [--static-from DIR]
     [--static-scale 1]
Every modelling choice is made on this score; the held-out sources (router/data/SOURCES.md) are read
only by the final bench. Each fold trains on train+val minus its three sources and reports top-1
(argmax) accuracy on them. Two summaries: the mean over the first 12 left-out sources (the first
round's folds, comparable across rounds) and over all 15 (the fifth fold leaves out sources of the
second round: Python titles, patient chat questions, human-written instructions). --drop-sources
removes sources from every fold's training (they are still scored when a fold leaves them out), which
is how a corpus without the second round's sources is measured on the same folds. --folds runs a
subset of the folds for quick screening only: a shipped choice is backed by the full run's means.
--disease-list and --shapes-without are ablations (another disease names file; shape kinds left out).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import scipy.sparse as sp

import router.model as model_module
from router.data import CORPUS_DIR, read_entries
from router.train import (
    DISEASE_FEATURES,
    DRUG_FEATURES,
    TrainConfig,
    confident_disagreements,
    features,
    hashing_for,
    load_static,
    read_jsonl,
    relabelled_sources,
    source_weights,
    static_matrix,
    targets,
)

FOLDS = [
    ["cqa-webmasters", "healthsearchqa", "clinc150"],
    ["cqa-programmers", "icliniq", "fiqa"],
    ["cqa-unix", "questiondoctor", "banking77"],
    ["nl2bash", "rqe-clinical", "cqa-english"],
    ["codenn-python", "k-qa", "dolly"],
]


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--c", type=float, default=TrainConfig.c)
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR, help="directory with train/val.jsonl.gz")
    parser.add_argument("--drop-sources", default="", help="comma-separated sources never trained on")
    parser.add_argument("--multi-label-weight", type=float, default=TrainConfig.multi_label_weight)
    parser.add_argument("--source-power", type=float, default=TrainConfig.source_power)
    parser.add_argument("--class-weight", default="balanced", choices=["balanced", "none"])
    parser.add_argument("--drug-feature", default=TrainConfig.drug_feature, choices=DRUG_FEATURES)
    parser.add_argument("--disease-feature", default=TrainConfig.disease_feature, choices=DISEASE_FEATURES)
    parser.add_argument("--disease-list", type=Path, help="ablation: another names file for the disease feature")
    parser.add_argument("--shapes", action="store_true", help="identifier-shape features (HashingConfig.shapes)")
    parser.add_argument("--no-one-word", action="store_true", help="ablation: without the one-word-prompt feature")
    parser.add_argument("--shapes-without", default="", help="ablation: comma-separated shape kinds left out")
    parser.add_argument(
        "--folds", default="", help="comma-separated fold numbers (1-5) to run, for quick screening (default: all)"
    )
    parser.add_argument(
        "--clean-pools",
        type=float,
        default=TrainConfig.clean_pools,
        help="drop relabelled-pool items a source-labelled model disputes above this probability (0: off)",
    )
    parser.add_argument("--static-from", default="")
    parser.add_argument("--static-dim", type=int, default=TrainConfig.static_dim)
    parser.add_argument("--static-scale", type=float, default=TrainConfig.static_scale)
    args = parser.parse_args()
    class_weight = None if args.class_weight == "none" else "balanced"
    cfg = TrainConfig(
        drug_feature=args.drug_feature,
        disease_feature=args.disease_feature,
        shapes=args.shapes,
        one_word=not args.no_one_word,
        c=args.c,
        class_weight=class_weight,
        multi_label_weight=args.multi_label_weight,
        clean_pools=args.clean_pools,
    )
    folds = [FOLDS[int(k) - 1] for k in args.folds.split(",") if k] or FOLDS
    data = read_jsonl(args.corpus / "train.jsonl.gz") + read_jsonl(args.corpus / "val.jsonl.gz")
    dropped = [s for s in args.drop_sources.split(",") if s]
    domains = sorted({label for ex in data for label in ex.labels})
    for kind in filter(None, args.shapes_without.split(",")):
        del model_module._SHAPES[kind]  # ablation only: HashingConfig reads the kinds when it is built
    hashing = hashing_for(cfg)
    if args.disease_list:
        hashing = dataclasses.replace(hashing, lexicons={"disease": read_entries(args.disease_list)})
    x = features([ex.text for ex in data], hashing)
    if args.static_from:
        table, tok = load_static(args.static_from, args.static_dim)
        table = table.astype(np.float16).astype(np.float32)
        s_x = static_matrix([ex.text for ex in data], tok, table, hashing.max_chars)
        x = sp.hstack([x, sp.csr_matrix(s_x * args.static_scale)]).tocsr()
    y = targets(data, domains).numpy()
    src = np.array([ex.source for ex in data])
    acc = {}
    for fold in folds:
        tr = np.where(~np.isin(src, fold + dropped))[0]
        # the cleaner sees only this fold's training rows, so the left-out sources stay unseen
        disputed, _ = confident_disagreements(x[tr], y[tr], list(src[tr]), relabelled_sources(), cfg)
        if disputed.any():
            print(f"clean_pools: dropped {disputed.sum()} pool items", flush=True)
        tr = tr[~disputed]
        dev = np.where(np.isin(src, fold) & (y.sum(axis=1) == 1))[0]
        weight = np.where(y[tr].sum(axis=1) > 1, args.multi_label_weight, 1.0)
        if args.source_power:
            weight = weight * source_weights(list(src[tr]), args.source_power)
        scores = np.zeros((len(dev), len(domains)))
        for j in range(len(domains)):
            lr = LogisticRegression(C=args.c, solver="liblinear", class_weight=class_weight, max_iter=300)
            lr.fit(x[tr], y[tr, j], sample_weight=weight)
            scores[:, j] = lr.decision_function(x[dev])
        hit = scores.argmax(axis=1) == y[dev].argmax(axis=1)
        for s in fold:
            if (src[dev] == s).any():
                acc[s] = float(hit[src[dev] == s].mean())
                print(f"{s:20s} {acc[s]:.3f}  (n={(src[dev] == s).sum()})", flush=True)
    first = [acc[s] for fold in FOLDS[:4] for s in fold if s in acc]
    print(f"mean accuracy over the first {len(first)} left-out sources (folds 1-4): {np.mean(first):.4f}")
    print(f"mean accuracy over all {len(acc)} left-out sources: {np.mean(list(acc.values())):.4f}")


if __name__ == "__main__":
    main()
