"""Source-disjoint dev score: leave whole training sources out (one per domain per fold), never the held-out ones.

Run: nice -n 10 python -m router.dev_eval [--c 4] [--nb-alpha 1] [--drop-sources a,b] [--drug-feature names]
     [--disease-feature names] [--shapes] [--no-one-word] [--clean-pools 0.9] [--routed] [--folds 1,2]
     [--static-from DIR] [--static-scale 1]
Every modelling choice is made on this score; the held-out sources (router/data/SOURCES.md) are read
only by the final bench. Each fold trains on train+val minus its three sources and reports top-1
(argmax) accuracy on them; --routed fits on the train split alone, calibrates thresholds on the val
split as the trainer does, and also reports accuracy as prompts are routed. Summaries: the mean
over the first 12 left-out sources (the first round's folds, comparable across rounds), over the 15 of
folds 1-5 (the fifth fold leaves out sources of the second round: Python titles, patient chat questions,
human-written instructions), over the 4 chat-prompt sources of fold 6 (seventeenth round), and over all.
--drop-sources removes sources from every fold's training (they are still scored when a fold leaves
them out), which is how a corpus without some sources is measured on the same folds. --folds runs a
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
    DataError,
    TrainConfig,
    calibrate,
    check_config,
    confident_disagreements,
    features,
    fit_linear,
    hashing_for,
    load_static,
    read_jsonl,
    relabelled_sources,
    routed_choices,
    sample_weights,
    static_matrix,
    targets,
)

FOLDS = [
    ["cqa-webmasters", "healthsearchqa", "clinc150"],
    ["cqa-programmers", "icliniq", "fiqa"],
    ["cqa-unix", "questiondoctor", "banking77"],
    ["nl2bash", "rqe-clinical", "cqa-english"],
    ["codenn-python", "k-qa", "dolly"],
    # seventeenth round: chat prompts, the register the held-out instructions have and folds 1-5 lack.
    # No medical source: the only medical chat prompts are Chatbot Arena topic clusters, whose sister
    # sources (the same users' prompts, other clusterings) train every fold.
    ["arena-hard-code", "ifeval", "arena-hard", "mt-bench"],
]
SUMMARIES = [("first", "folds 1-4", FOLDS[:4]), ("", "folds 1-5", FOLDS[:5]), ("chat", "fold 6", FOLDS[5:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--c", type=float, default=TrainConfig.c)
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR, help="directory with train/val.jsonl.gz")
    parser.add_argument("--drop-sources", default="", help="comma-separated sources never trained on")
    parser.add_argument("--multi-label-weight", type=float, default=TrainConfig.multi_label_weight)
    parser.add_argument("--source-power", type=float, default=TrainConfig.source_power)
    parser.add_argument(
        "--buckets", type=int, default=TrainConfig.linear_buckets, help="hash space of the n-gram features"
    )
    parser.add_argument("--nb-alpha", type=float, default=TrainConfig.nb_alpha, help="NB feature scaling (0: off)")
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
    parser.add_argument(
        "--routed",
        action="store_true",
        help="also route as served: fit on the train split only, calibrate thresholds on the val split",
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
        nb_alpha=args.nb_alpha,
        linear_buckets=args.buckets,
        class_weight=class_weight,
        multi_label_weight=args.multi_label_weight,
        source_power=args.source_power,
        clean_pools=args.clean_pools,
    )
    try:
        check_config(cfg)
    except DataError as err:
        raise SystemExit(f"dev_eval: error: {err}") from None
    folds = [FOLDS[int(k) - 1] for k in args.folds.split(",") if k] or FOLDS
    train = read_jsonl(args.corpus / "train.jsonl.gz")
    data, n_train = train + read_jsonl(args.corpus / "val.jsonl.gz"), len(train)  # rows >= n_train: val split
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
    acc: dict[str, float] = {}
    routed: dict[str, float] = {}
    for fold in folds:
        tr = np.where(~np.isin(src, fold + dropped))[0]
        va = tr[tr >= n_train] if args.routed else tr[:0]
        tr = tr[tr < n_train] if args.routed else tr  # --routed: calibrate on validation rows, never fit on them
        # the cleaner sees only this fold's training rows, so the left-out sources stay unseen
        disputed, disputed_va = confident_disagreements(
            x[tr], y[tr], list(src[tr]), relabelled_sources(), cfg, (x[va], y[va], list(src[va]))
        )
        if disputed.any():
            print(f"clean_pools: dropped {disputed.sum()} pool items", flush=True)
        tr, va = tr[~disputed], va[~disputed_va]
        dev = np.where(np.isin(src, fold) & (y.sum(axis=1) == 1))[0]
        fitted = fit_linear(x[tr], y[tr], sample_weights(y[tr], list(src[tr]), cfg), cfg)
        scores = np.stack([lr.decision_function(x[dev]) for lr in fitted], axis=1)
        hits = {"argmax": scores.argmax(axis=1)}
        if args.routed:  # thresholds as the trainer calibrates them, prompts routed as the policy routes them
            probs_va = np.stack([lr.predict_proba(x[va])[:, 1] for lr in fitted], axis=1)
            thresholds = calibrate(probs_va, y[va], domains, cfg.calibration)
            print(f"thresholds: {thresholds}", flush=True)
            probs = 1 / (1 + np.exp(-scores))
            t = np.array([thresholds[d] for d in domains])
            chosen = routed_choices(probs, t, domains.index("general"), top_k=1)
            hits["routed"] = chosen.argmax(axis=1)
        for s in fold:
            rows = src[dev] == s
            if rows.any():
                truth = y[dev][rows].argmax(axis=1)
                acc[s] = float((hits["argmax"][rows] == truth).mean())
                line = f"{s:20s} {acc[s]:.3f}"
                if "routed" in hits:
                    routed[s] = float((hits["routed"][rows] == truth).mean())
                    line += f"  routed {routed[s]:.3f}"
                print(f"{line}  (n={rows.sum()})", flush=True)
    for name, scores_by_source in (("accuracy", acc), ("routed accuracy", routed)):
        if scores_by_source:
            for what, which, summary_folds in SUMMARIES:
                part = [scores_by_source[s] for fold in summary_folds for s in fold if s in scores_by_source]
                if part:
                    label = f"{what} {len(part)}".strip()
                    print(f"mean {name} over the {label} left-out sources ({which}): {np.mean(part):.4f}")
            every = np.mean(list(scores_by_source.values()))
            print(f"mean {name} over all {len(scores_by_source)} left-out sources: {every:.4f}")


if __name__ == "__main__":
    main()
