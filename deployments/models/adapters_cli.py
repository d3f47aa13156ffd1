"""`consilium adapter train`: LoRA / QLoRA adapter training for a specialist base model."""

from __future__ import annotations

import argparse
import json


def cmd_train(args: argparse.Namespace) -> int:
    from deployments.models.adapters import (
        AdapterDataError,
        AdapterTrainConfig,
        TargetModuleError,
        read_chat_jsonl,
        train_adapter,
    )

    cfg = AdapterTrainConfig(
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        target_modules=args.target_modules,
        quantization=args.quantization,
        seed=args.seed,
    )
    try:
        report = train_adapter(args.base, read_chat_jsonl(args.data), args.out, cfg, device=args.device)
    except (AdapterDataError, TargetModuleError) as err:
        raise SystemExit(f"consilium: error: {err}") from None
    print(json.dumps(report, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    adapter = sub.add_parser("adapter", help="train LoRA / QLoRA adapters for specialists")
    ad = adapter.add_subparsers(dest="adapter_cmd", required=True)
    tr = ad.add_parser("train", help="train on JSONL of {'prompt','response'} or {'messages'}")
    tr.add_argument("--base", required=True, help="base model directory or hub id")
    tr.add_argument("--data", required=True)
    tr.add_argument("--out", required=True, help="peft adapter directory to write")
    tr.add_argument("--quantization", choices=["none", "nf4"], default="none", help="nf4: QLoRA on a 4-bit base")
    tr.add_argument("--rank", type=int, default=8)
    tr.add_argument("--alpha", type=int, default=16)
    tr.add_argument("--dropout", type=float, default=0.05)
    tr.add_argument("--lr", type=float, default=2e-4)
    tr.add_argument("--epochs", type=int, default=1)
    tr.add_argument("--batch-size", type=int, default=4)
    tr.add_argument("--max-length", type=int, default=512)
    tr.add_argument("--target-modules", nargs="+", help="Linear layer names (default: every one found)")
    tr.add_argument("--device", help="torch device (default: what is present)")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=cmd_train)
