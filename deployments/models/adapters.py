"""Train a LoRA (or QLoRA on a 4-bit NF4 base) adapter for a specialist from prompt/response JSONL."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from deployments.config import EngineConfig
from deployments.engines.base import resolve_device, resolve_dtype
from deployments.engines.hf import load_causal_lm, load_tokenizer

logger = logging.getLogger(__name__)


class AdapterDataError(ValueError):
    """A training line that cannot be used; the message names the file and line."""


class TargetModuleError(ValueError):
    """The requested target modules match no Linear layer of the model."""


@dataclass
class AdapterTrainConfig:
    """LoRA hyper-parameters and the training loop's settings."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 2e-4
    epochs: int = 1
    batch_size: int = 4
    max_length: int = 512  # prompt + response tokens per example
    val_fraction: float = 0.1
    target_modules: list[str] | None = None  # None: every Linear in the decoder blocks
    quantization: str = "none"  # "nf4": QLoRA
    seed: int = 0
    save_dtype: str | None = None  # e.g. "bfloat16": halves the adapter on disk; None keeps the training dtype
    extra: dict[str, Any] = field(default_factory=dict)


def read_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """Lines of {"prompt", "response"} or {"messages": [...]} (the last message is the assistant's)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterDataError(f"data file {str(path)!r} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise AdapterDataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if isinstance(row, dict) and "messages" in row:
            msgs = row["messages"]
            ok = (
                isinstance(msgs, list)
                and len(msgs) >= 2
                and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs
                )
            )
            if not ok or msgs[-1]["role"] != "assistant":
                raise AdapterDataError(
                    f"{path}:{n}: 'messages' must be a list of {{role, content}} ending with an assistant message"
                )
            out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            out.append([{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}])
        else:
            raise AdapterDataError(f"{path}:{n}: expected {{'prompt', 'response'}} or {{'messages'}}")
    if not out:
        raise AdapterDataError(f"{path}: no examples")
    return out


def linear_module_names(model: torch.nn.Module) -> dict[str, int]:
    """Suffix (e.g. q_proj) -> how many Linear layers carry it, excluding the output head."""
    import bitsandbytes as bnb

    kinds = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        suffix = name.rsplit(".", 1)[-1]
        if isinstance(module, kinds) and suffix not in ("lm_head", "score", "classifier"):
            counts[suffix] = counts.get(suffix, 0) + 1
    return counts


def resolve_target_modules(model: torch.nn.Module, requested: list[str] | None) -> list[str]:
    """The Linear suffixes to adapt; an unknown name is an error that lists the names that exist."""
    available = linear_module_names(model)
    if requested is None:
        if not available:
            raise TargetModuleError("the model has no Linear layers to adapt")
        return sorted(available)
    unknown = sorted(set(requested) - set(available))
    if unknown:
        raise TargetModuleError(
            f"target modules {unknown} match no Linear layer; this model has {sorted(available)} "
            "(a fused projection such as qkv_proj must be named as it is)"
        )
    return sorted(set(requested))


def encode_example(tokenizer, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels: the chat template renders the prompt; loss only on the assistant's reply."""
    prompt_ids = tokenizer(
        tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )["input_ids"]
    full_ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:  # templates that re-tokenise differently: append the reply
        reply = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
        full_ids = prompt_ids + reply + [tokenizer.eos_token_id]
    ids = full_ids[:max_length]
    labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids) :]
    return ids, labels


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):  # right padding is fine for teacher forcing
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _eval_mode(model: torch.nn.Module) -> None:
    """Dropout off, but 4-bit layers left in training mode.

    On CPU, bitsandbytes repacks a Linear4bit's weights for fast inference the first time it runs in
    eval mode, and the repacked path cannot be trained afterwards; its `training` flag only controls that.
    """
    import bitsandbytes as bnb

    model.eval()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.training = True


@torch.no_grad()
def _eval_loss(model, data, cfg: AdapterTrainConfig, pad_id: int, device: torch.device) -> float:
    _eval_mode(model)
    total = n = 0
    for i in range(0, len(data), cfg.batch_size):
        batch = data[i : i + cfg.batch_size]
        total += model(**_collate(batch, pad_id, device)).loss.item() * len(batch)
        n += len(batch)
    return total / max(1, n)


def train_adapter(
    base: str,
    data: list[list[dict[str, str]]],
    out: str | Path,
    cfg: AdapterTrainConfig,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and save a peft adapter directory; return the report (modules adapted, losses, seconds)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    engine_cfg = EngineConfig(model=base, quantization=cfg.quantization, device=device)
    dev = resolve_device(device)
    tokenizer = load_tokenizer(engine_cfg)
    model = load_causal_lm(engine_cfg, dev, resolve_dtype("auto", dev))
    if cfg.quantization in ("nf4", "int8"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = resolve_target_modules(model, cfg.target_modules)
    lora = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n})
    if not adapted:
        raise TargetModuleError(f"no module received an adapter (targets {targets})")
    logger.info("LoRA on %d modules (%s)", len(adapted), ", ".join(targets))

    encoded = [encode_example(tokenizer, m, cfg.max_length) for m in data]
    encoded = [e for e in encoded if any(lbl != -100 for lbl in e[1])]  # a reply truncated away teaches nothing
    random.Random(cfg.seed).shuffle(encoded)
    n_val = max(1, int(len(encoded) * cfg.val_fraction)) if len(encoded) > 1 else 0
    val, train = encoded[:n_val], encoded[n_val:] or encoded
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    pad = tokenizer.pad_token_id
    history = [{"epoch": 0, "val_loss": _eval_loss(model, val or train, cfg, pad, dev)}]
    steps = cfg.epochs * ((len(train) + cfg.batch_size - 1) // cfg.batch_size)
    bar = tqdm(total=steps, disable=not progress, desc="adapter train", unit="step")
    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        rng.shuffle(train)
        for i in range(0, len(train), cfg.batch_size):
            loss = model(**_collate(train[i : i + cfg.batch_size], pad, dev)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch, "val_loss": _eval_loss(model, val or train, cfg, pad, dev)})
        bar.write(json.dumps(history[-1]))
    bar.close()
    out = Path(out)
    if cfg.save_dtype is not None:  # loading copies into the engine's own dtype, so storage may be smaller
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(getattr(torch, cfg.save_dtype))
    model.save_pretrained(out)
    report = {
        "base": str(base),
        "out": str(out),
        "target_modules": targets,
        "adapted_modules": len(adapted),
        "train_examples": len(train),
        "val_examples": len(val),
        "history": history,
        "seconds": time.perf_counter() - t0,
        "quantization": cfg.quantization,
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
    }
    (out / "consilium_training.json").write_text(json.dumps(report, indent=2))
    return report


@torch.no_grad()
def heldout_perplexity(
    base: str,
    adapters: dict[str, str],
    data: dict[str, list[list[dict[str, str]]]],
    max_length: int = 256,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Perplexity on the assistant tokens of each data set, for the base ("base") and each adapter.

    Token-weighted: every reply token counts once, however the examples are batched.
    """
    dev = resolve_device(device)
    engine_cfg = EngineConfig(model=base, adapters=adapters, device=device)
    tokenizer = load_tokenizer(engine_cfg)
    model = load_causal_lm(engine_cfg, dev, resolve_dtype("auto", dev))
    pad = tokenizer.pad_token_id
    out: dict[str, dict[str, float]] = {}
    for variant in ["base", *adapters]:
        out[variant] = {}
        for domain, rows in data.items():
            encoded = [encode_example(tokenizer, m, max_length) for m in rows]
            total = tokens = 0.0
            for i in range(0, len(encoded), batch_size):
                batch = _collate(encoded[i : i + batch_size], pad, dev)
                labels = batch.pop("labels")
                if variant == "base" and adapters:
                    with model.disable_adapter():
                        logits = model(**batch).logits
                else:
                    if adapters:
                        model.set_adapter(variant)
                    logits = model(**batch).logits
                # Shifted cross-entropy summed over reply tokens (labels -100 elsewhere).
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
                )
                total += loss.item()
                tokens += (labels[:, 1:] != -100).sum().item()
            out[variant][domain] = float(torch.exp(torch.tensor(total / max(tokens, 1))))
    return out
