"""`consilium router train|eval`: train tiny ada on labelled JSONL and report its quality and speed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    from router.data import CORPUS_DIR
    from router.train import DataError, TrainConfig, read_jsonl, train_router

    try:
        train = [ex for p in args.data for ex in read_jsonl(p)]
        if args.val is None and args.data == [str(CORPUS_DIR / "train.jsonl.gz")]:
            args.val = str(CORPUS_DIR / "val.jsonl.gz")
        val = read_jsonl(args.val) if args.val else None
        # options whose CLI default is None leave TrainConfig's own default in place
        optional = {
            "c": args.c,
            "nb_alpha": args.nb_alpha,
            "disease_feature": args.disease_feature,
            "calibration": args.calibration,
            "clean_pools": args.clean_pools,
        }
        cfg = TrainConfig(
            kind=args.kind,
            **{name: value for name, value in optional.items() if value is not None},
            source_power=args.source_power,
            epochs=args.epochs,
            lr=args.lr,
            dim=args.dim,
            seed=args.seed,
            static_from=args.static_from,
            static_dim=args.static_dim,
            drug_feature=args.drug_feature,
            one_word=not args.no_one_word,
        )
        model, info = train_router(train, val, cfg, progress=True)
    except DataError as err:
        raise SystemExit(f"consilium: error: {err}") from None
    out = model.save(args.out)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    print(
        json.dumps(
            {
                "out": str(out),
                "domains": model.domains,
                "thresholds": model.config.thresholds,
                "artifact_bytes": size,
                **info,
            },
            indent=2,
        )
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from router.evaluate import evaluate
    from router.model import TinyAda, shipped_router_path
    from router.train import DataError, read_jsonl

    try:
        model = TinyAda.load(args.model or shipped_router_path())
        examples = read_jsonl(args.data)
    except (DataError, FileNotFoundError) as err:
        raise SystemExit(f"consilium: error: {err}") from None
    unknown = sorted({label for ex in examples for label in ex.labels} - set(model.domains))
    if unknown:
        raise SystemExit(f"consilium: error: labels {unknown} are not domains of this router {model.domains}")
    report = evaluate(model, examples, top_k=args.top_k, fallback=args.fallback)
    print(report.render())
    if args.plot:
        try:
            print("plot:", report.plot(args.plot))
        except (OSError, ValueError) as err:  # an unwritable path or an unknown image extension
            raise SystemExit(f"consilium: error: cannot write plot {args.plot!r}: {err}") from None
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from router.data import CORPUS_DIR

    router = sub.add_parser("router", help="train and evaluate the tiny ada router")
    rs = router.add_subparsers(dest="router_cmd", required=True)
    tr = rs.add_parser("train", help="train on labelled JSONL ({'text', 'labels'} per line)")
    tr.add_argument(
        "--data", nargs="+", default=[str(CORPUS_DIR / "train.jsonl.gz")], help="training JSONL file(s), .gz too"
    )
    tr.add_argument(
        "--val",
        default=None,
        help="validation JSONL for threshold calibration (default: the corpus's val split when --data is the "
        "default, else a split of --data)",
    )
    tr.add_argument("--out", required=True, help="artifact directory to write")
    tr.add_argument("--kind", choices=["linear", "fasttext"], default="linear", help="learner (router/train.py)")
    tr.add_argument(
        "--c", type=float, default=None, help="linear: inverse regularisation strength (default: TrainConfig's)"
    )
    tr.add_argument(
        "--source-power",
        type=float,
        default=0.0,
        help="linear: weigh each prompt by (its source's size) ** -POWER (0: every prompt alike)",
    )
    tr.add_argument(
        "--nb-alpha",
        type=float,
        default=None,
        metavar="A",
        help="linear: Naive Bayes feature scaling with smoothing A (0: off; the routers before the fourteenth "
        "round are --nb-alpha 0 --c 16) (default: TrainConfig's)",
    )
    tr.add_argument("--epochs", type=int, default=16)
    tr.add_argument("--lr", type=float, default=0.05)
    tr.add_argument("--dim", type=int, default=32)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument(
        "--static-from",
        default="",
        help="linear: add static token embeddings from a causal LM checkpoint dir or a router artifact",
    )
    tr.add_argument("--static-dim", type=int, default=64, help="linear: PCA components of the static embeddings")
    tr.add_argument(
        "--drug-feature",
        choices=["off", "names", "names+suffixes"],
        default="names",
        help="linear: one shared feature for any drug name in router/data/drugs.txt (+ drug-stem suffixes)",
    )
    tr.add_argument(
        "--disease-feature",
        choices=["off", "names"],
        default=None,
        help="linear: one shared feature for any disease/symptom name in router/data/diseases.txt "
        "(default: TrainConfig's)",
    )
    tr.add_argument(
        "--calibration",
        choices=["routing", "f1"],
        default=None,
        help="thresholds: 'routing' (jointly, as prompts are routed, two-domain prompts included) or 'f1' "
        "(per-domain F1, before the sixth round) (default: TrainConfig's)",
    )
    tr.add_argument(
        "--no-one-word",
        action="store_true",
        help="linear: without the one-word-prompt feature (before the eighth round)",
    )
    tr.add_argument(
        "--clean-pools",
        type=float,
        default=None,
        metavar="P",
        help="drop keyword-relabelled pool items that a model of the source-labelled prompts gives another domain "
        "above P (0: keep all) (default: TrainConfig's)",
    )
    tr.set_defaults(func=cmd_train)
    ev = rs.add_parser("eval", help="accuracy, P/R/F1, exact match, confusion and latency")
    ev.add_argument("--model", help="artifact directory (default: the shipped router)")
    ev.add_argument("--data", default=str(CORPUS_DIR / "heldout.jsonl.gz"), help="labelled JSONL (.gz too)")
    ev.add_argument("--top-k", type=int, default=2)
    ev.add_argument("--fallback", default="general", help="domain routed to when none is confident")
    ev.add_argument("--plot", metavar="FILE.png", help="draw the confusion matrix and per-domain precision/recall")
    ev.set_defaults(func=cmd_eval)
