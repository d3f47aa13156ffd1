"""Train tiny ada on labelled JSONL prompts and calibrate per-domain thresholds on a validation split."""

from __future__ import annotations

import gzip
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from router.model import HashingConfig, TinyAda, TinyAdaConfig

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A labelled file that cannot be used; the message names the file and line."""


@dataclass
class Example:
    text: str
    labels: list[str]
    source: str = ""  # dataset the prompt came from (router/data/SOURCES.md); empty for user data


@dataclass
class TrainConfig:
    """Training settings (defaults train the shipped router in a few seconds on 2 cores)."""

    epochs: int = 16
    batch_size: int = 32
    lr: float = 0.05
    weight_decay: float = 0.0
    dim: int = 32
    buckets: int = 1 << 15
    val_fraction: float = 0.125  # used when no separate validation file is given
    feature_dropout: float = 0.5  # drop this share of a prompt's features per step: no single cue dominates
    seed: int = 0


def read_jsonl(path: str | Path) -> list[Example]:
    """{"text": str, "labels": [str, ...], "source"?: str} per line (.jsonl or .jsonl.gz); bad lines name their line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    out = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            text, labels = row.get("text") if isinstance(row, dict) else None, None
            if isinstance(row, dict):
                labels = row.get("labels")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{n}: 'text' must be a non-empty string")
            if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
                raise DataError(f"{path}:{n}: 'labels' must be a non-empty list of strings, got {labels!r}")
            source = row.get("source", "")
            out.append(Example(text, labels, source if isinstance(source, str) else ""))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def targets(examples: list[Example], domains: list[str]) -> torch.Tensor:
    index = {d: i for i, d in enumerate(domains)}
    y = torch.zeros(len(examples), len(domains))
    for i, ex in enumerate(examples):
        for label in ex.labels:
            y[i, index[label]] = 1.0
    return y


def calibrate_thresholds(probs: np.ndarray, y: np.ndarray, domains: list[str]) -> dict[str, float]:
    """Per domain, the threshold maximising F1 on validation (ties: the one closest to 0.5)."""
    grid = np.round(np.arange(0.05, 0.951, 0.025), 3)
    out = {}
    for j, d in enumerate(domains):
        best = (-1.0, 0.0, 0.5)
        for t in grid:
            pred = probs[:, j] >= t
            tp = float((pred & (y[:, j] == 1)).sum())
            fp = float((pred & (y[:, j] == 0)).sum())
            fn = float((~pred & (y[:, j] == 1)).sum())
            f1 = 2 * tp / max(1.0, 2 * tp + fp + fn)
            key = (f1, -abs(t - 0.5), t)
            if key > best:
                best = key
        out[d] = float(best[2])
    return out


def _dropout(ids: torch.Tensor, p: float) -> torch.Tensor:
    if p <= 0 or len(ids) < 2:
        return ids
    keep = torch.rand(len(ids)) >= p
    return ids[keep] if keep.any() else ids[:1]


def train_router(
    train: list[Example],
    val: list[Example] | None = None,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> tuple[TinyAda, dict[str, float]]:
    """Fit a TinyAda; return it with its validation metrics. Domains are the sorted labels in the data."""
    cfg = config or TrainConfig()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if val is None:
        shuffled = train[:]
        random.Random(cfg.seed).shuffle(shuffled)
        n_val = max(1, int(len(shuffled) * cfg.val_fraction))
        val, train = shuffled[:n_val], shuffled[n_val:]
    domains = sorted({label for ex in train for label in ex.labels})
    unknown = sorted({label for ex in val for label in ex.labels} - set(domains))
    if unknown:
        raise DataError(f"validation labels {unknown} never occur in training data")
    model = TinyAda(TinyAdaConfig(domains=domains, dim=cfg.dim, hashing=HashingConfig(buckets=cfg.buckets)))
    feats = [model.batch([ex.text]) for ex in train]  # featurise once, reuse each epoch
    ids = [f[0] for f in feats]
    y = targets(train, domains)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    t0 = time.perf_counter()
    order = list(range(len(train)))
    bar = tqdm(
        total=cfg.epochs * ((len(train) + cfg.batch_size - 1) // cfg.batch_size),
        disable=not progress,
        desc="router train",
        unit="step",
    )
    model.train()
    for epoch in range(cfg.epochs):
        random.Random(cfg.seed + epoch).shuffle(order)
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            bags = [_dropout(ids[i], cfg.feature_dropout) for i in idx]
            flat = torch.cat(bags)
            offsets = torch.tensor([0] + [len(b) for b in bags[:-1]]).cumsum(0)
            loss = loss_fn(model(flat, offsets), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / len(train):.4f}")
    bar.close()
    model.eval()
    model.refresh()
    probs = np.array([[s[d] for d in domains] for s in model.score_batch([ex.text for ex in val])])
    yv = targets(val, domains).numpy()
    model.config.thresholds = calibrate_thresholds(probs, yv, domains)
    logger.info("trained on %d prompts, %d domains in %.1fs", len(train), len(domains), time.perf_counter() - t0)
    val_loss = float(loss_fn(torch.logit(torch.tensor(probs).clamp(1e-6, 1 - 1e-6)), torch.tensor(yv)))
    return model, {"val_loss": val_loss, "train_seconds": time.perf_counter() - t0}
