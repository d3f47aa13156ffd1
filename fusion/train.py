"""Train the merger (T5 frozen, T5 with LoRA, or everything) on query/answers/target JSONL."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from fusion.synthesizer import Answer, SynthesisRequest, Synthesizer

logger = logging.getLogger(__name__)
Mode = Literal["frozen", "lora", "full", "fid"]


class FusionDataError(ValueError):
    """A training line that cannot be used; the message names the file and line."""


@dataclass
class FusionExample:
    request: SynthesisRequest
    target: str


@dataclass
class FusionTrainConfig:
    """Training settings."""

    mode: Mode = "frozen"  # frozen: merger only; lora: merger + LoRA on T5; full: everything; fid: T5 only
    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    lora_r: int = 8
    max_target_tokens: int = 128
    seed: int = 0


def read_fusion_jsonl(path: str | Path) -> list[FusionExample]:
    """{"query", "answers": [{"domain", "text", "weight"?}], "target"} per line."""
    path = Path(path)
    if not path.is_file():
        raise FusionDataError(f"data file {str(path)!r} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FusionDataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise FusionDataError(f"{path}:{n}: expected an object, got {type(row).__name__}")
        for key in ("query", "target"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise FusionDataError(f"{path}:{n}: {key!r} must be a non-empty string")
        answers = row.get("answers")
        if not isinstance(answers, list) or not answers:
            raise FusionDataError(f"{path}:{n}: 'answers' must be a non-empty list")
        parsed = []
        for i, a in enumerate(answers):
            if not isinstance(a, dict) or not isinstance(a.get("text"), str) or not isinstance(a.get("domain"), str):
                raise FusionDataError(f"{path}:{n}: answers[{i}] needs string 'domain' and 'text'")
            w = a.get("weight", 1.0)
            if not isinstance(w, (int, float)) or w <= 0:
                raise FusionDataError(f"{path}:{n}: answers[{i}].weight must be > 0, got {w!r}")
            parsed.append(Answer(a["domain"], a["text"], float(w)))
        out.append(FusionExample(SynthesisRequest(row["query"], parsed), row["target"]))
    if not out:
        raise FusionDataError(f"{path}: no examples")
    return out


def trainable_parameters(synth: Synthesizer, cfg: FusionTrainConfig) -> list[torch.nn.Parameter]:
    """Freeze what the mode keeps fixed; return what the optimiser updates."""
    for p in synth.t5.parameters():
        p.requires_grad_(cfg.mode == "full" or cfg.mode == "fid")
    for p in synth.merger.parameters():
        p.requires_grad_(cfg.mode != "fid")
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        synth.t5 = get_peft_model(
            synth.t5, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules=["q", "v"])
        )
    params = [p for p in synth.merger.parameters() if p.requires_grad]
    params += [p for p in synth.t5.parameters() if p.requires_grad]
    return params


def _batches(data: list[FusionExample], size: int, rng: random.Random | None) -> list[list[FusionExample]]:
    order = data[:]
    if rng is not None:
        rng.shuffle(order)
    return [order[i : i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def validation_loss(synth: Synthesizer, data: list[FusionExample], cfg: FusionTrainConfig) -> float:
    synth.eval()
    total = n = 0
    for batch in _batches(data, cfg.batch_size, None):
        loss = synth.loss([e.request for e in batch], [e.target for e in batch], cfg.max_target_tokens)
        total += loss.item() * len(batch)
        n += len(batch)
    return total / max(1, n)


def train_fusion(
    synth: Synthesizer,
    train: list[FusionExample],
    val: list[FusionExample] | None,
    cfg: FusionTrainConfig,
    progress: bool = True,
) -> list[dict[str, float]]:
    """AdamW over the mode's parameters; returns per-epoch train and validation loss."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = trainable_parameters(synth, cfg)
    if not params:
        raise ValueError(f"mode {cfg.mode!r} leaves nothing to train")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    history = []
    steps = cfg.epochs * ((len(train) + cfg.batch_size - 1) // cfg.batch_size)
    bar = tqdm(total=steps, disable=not progress, desc=f"fusion train ({cfg.mode})", unit="step")
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        synth.t5.train()
        synth.merger.train()
        total = 0.0
        for batch in _batches(train, cfg.batch_size, rng):
            loss = synth.loss([e.request for e in batch], [e.target for e in batch], cfg.max_target_tokens)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            total += loss.item() * len(batch)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        record = {"epoch": epoch + 1, "train_loss": total / len(train), "seconds": time.perf_counter() - t0}
        if val:
            record["val_loss"] = validation_loss(synth, val, cfg)
        history.append(record)
        bar.write(json.dumps(record))
    bar.close()
    synth.eval()
    return history
