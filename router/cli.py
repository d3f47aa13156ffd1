"""`consilium router train|eval`: train tiny ada on labelled JSONL and report its quality and speed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    from router.train import DataError, TrainConfig, read_jsonl, train_router

    try:
        train = [ex for p in args.data for ex in read_jsonl(p)]
        val = read_jsonl(args.val) if args.val else None
        model, info = train_router(
            train, val, TrainConfig(epochs=args.epochs, lr=args.lr, dim=args.dim, seed=args.seed), progress=True
        )
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
    report = evaluate(model, examples, top_k=args.top_k)
    print(report.render())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from router.data import DATA_DIR

    router = sub.add_parser("router", help="train and evaluate the tiny ada router")
    rs = router.add_subparsers(dest="router_cmd", required=True)
    tr = rs.add_parser("train", help="train on labelled JSONL ({'text', 'labels'} per line)")
    tr.add_argument("--data", nargs="+", default=[str(DATA_DIR / "train.jsonl")], help="training JSONL file(s)")
    tr.add_argument("--val", help="validation JSONL for threshold calibration (default: split from --data)")
    tr.add_argument("--out", required=True, help="artifact directory to write")
    tr.add_argument("--epochs", type=int, default=16)
    tr.add_argument("--lr", type=float, default=0.05)
    tr.add_argument("--dim", type=int, default=32)
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=cmd_train)
    ev = rs.add_parser("eval", help="accuracy, P/R/F1, exact match, confusion and latency")
    ev.add_argument("--model", help="artifact directory (default: the shipped router)")
    ev.add_argument("--data", default=str(DATA_DIR / "heldout.jsonl"))
    ev.add_argument("--top-k", type=int, default=2)
    ev.set_defaults(func=cmd_eval)
