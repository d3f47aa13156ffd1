"""`consilium fusion train`: train the merger on query/answers/target JSONL and save it."""

from __future__ import annotations

import argparse
import json


def cmd_train(args: argparse.Namespace) -> int:
    from fusion.synthesizer import Synthesizer
    from fusion.train import FusionDataError, FusionTrainConfig, read_fusion_jsonl, train_fusion

    try:
        train = read_fusion_jsonl(args.data)
        val = read_fusion_jsonl(args.val) if args.val else None
    except FusionDataError as err:
        raise SystemExit(f"consilium: error: {err}") from None
    try:
        synth = Synthesizer.from_pretrained(
            args.model,
            merger_path=args.init,
            max_answer_tokens=args.max_answer_tokens,
            depth_layers=args.depth_layers,
            sliding_window=args.sliding_window,
        )
    except ValueError as err:  # e.g. --depth-layers larger than the encoder or unlike --init's, a bad --sliding-window
        raise SystemExit(f"consilium: error: {err}") from None
    cfg = FusionTrainConfig(mode=args.mode, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    history = train_fusion(synth, train, val, cfg)
    out = synth.merger.save(args.out)
    if args.mode in ("lora", "full"):
        # The decoder changed too: save it beside the merger so the merger deployment can load both.
        t5 = synth.t5.merge_and_unload() if args.mode == "lora" else synth.t5
        t5.save_pretrained(out / "t5", safe_serialization=True)
        synth.tokenizer.save_pretrained(out / "t5")
    print(json.dumps({"out": str(out), "history": history}, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    fusion = sub.add_parser("fusion", help="train the cross-attention merger")
    fs = fusion.add_subparsers(dest="fusion_cmd", required=True)
    tr = fs.add_parser("train", help="train on {'query', 'answers': [{'domain', 'text'}], 'target'} JSONL")
    tr.add_argument("--model", required=True, help="T5 checkpoint directory")
    tr.add_argument("--data", required=True)
    tr.add_argument("--val")
    tr.add_argument("--out", required=True, help="merger directory to write")
    tr.add_argument("--init", help="start from this merger directory")
    tr.add_argument(
        "--mode",
        choices=["frozen", "lora", "full"],
        default="frozen",
        help="frozen: only the merger learns; lora: plus LoRA on T5; full: everything (tiny models)",
    )
    tr.add_argument("--epochs", type=int, default=3)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--max-answer-tokens", type=int, default=256)
    tr.add_argument(
        "--depth-layers",
        type=int,
        default=0,
        help="DCA-style depth mix: the merger reads the last N encoder hidden states (0 = last layer only)",
    )
    tr.add_argument(
        "--sliding-window",
        type=int,
        default=None,
        help="merger attention: each answer token sees positions within +-W of the other answers (default: all)",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=cmd_train)
