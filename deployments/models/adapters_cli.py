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
        save_dtype=args.save_dtype,
    )
    try:
        report = train_adapter(args.base, read_chat_jsonl(args.data), args.out, cfg, device=args.device)
    except (AdapterDataError, TargetModuleError) as err:
        raise SystemExit(f"consilium: error: {err}") from None
    print(json.dumps(report, indent=2))
    return 0


def _pair(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deployments.models.adapters import AdapterDataError, heldout_perplexity, read_chat_jsonl

    try:
        data = {name: read_chat_jsonl(path) for name, path in args.data}
    except AdapterDataError as err:
        raise SystemExit(f"consilium: error: {err}") from None
    for name, path in args.adapter or []:
        if not (Path(path) / "adapter_config.json").is_file():
            raise SystemExit(f"consilium: error: adapter {name!r}: {path!r} holds no adapter_config.json")
    ppl = heldout_perplexity(args.base, dict(args.adapter or []), data, max_length=args.max_length)
    domains = list(data)
    print("| model | " + " | ".join(f"{d} ppl" for d in domains) + " |")
    print("|---" * (len(domains) + 1) + "|")
    for variant, row in ppl.items():
        cells = []
        for d in domains:
            change = "" if variant == "base" else f" ({100 * (row[d] / ppl['base'][d] - 1):+.1f}%)"
            cells.append(f"{row[d]:.2f}{change}")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"perplexity": ppl, "examples": {d: len(v) for d, v in data.items()}}, indent=2) + "\n"
        )
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
    tr.add_argument("--save-dtype", choices=["bfloat16", "float16", "float32"], help="adapter dtype on disk")
    tr.set_defaults(func=cmd_train)

    ev = ad.add_parser("eval", help="held-out perplexity of the base and each adapter on each data set")
    ev.add_argument("--base", required=True, help="base model directory")
    ev.add_argument("--adapter", action="append", type=_pair, metavar="NAME=DIR", help="adapter to compare")
    ev.add_argument("--data", action="append", type=_pair, required=True, metavar="DOMAIN=JSONL", help="held-out set")
    ev.add_argument("--max-length", type=int, default=256)
    ev.add_argument("--json", help="also write the numbers to this JSON file")
    ev.set_defaults(func=cmd_eval)
