"""AdvancedCrossAttentionMerger: each answer's tokens attend to the other answers' tokens, gated from zero."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "merger.safetensors"
CONFIG_FILE = "merger.json"


@dataclass
class MergerConfig:
    """Cross-attention merger settings."""

    d_model: int  # width of the encoder states (T5 d_model)
    num_heads: int = 8  # query heads
    num_kv_heads: int | None = None  # grouped KV heads (GQA); None = num_heads
    qk_norm: bool = False  # RMSNorm on q and k per head (stabilises large logits)
    softcap: float | None = None  # tanh soft-capping of attention logits (Gemma 2 style)
    dropout: float = 0.0  # attention dropout (training only)
    routing_bias: bool = True  # add log(routing weight) of each key's source to the logits

    def __post_init__(self) -> None:
        kv = self.num_kv_heads or self.num_heads
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % kv:
            raise ValueError(f"num_kv_heads={kv} must divide num_heads={self.num_heads}")
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"softcap must be > 0, got {self.softcap}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class AdvancedCrossAttentionMerger(nn.Module):
    """Multi-head cross-attention across K answers, joined by a zero-initialised gated residual.

    Input (B, K, L, D) encoder states of K answers with mask (B, K, L) (True = real token).
    A token of answer k attends to the real tokens of every answer j != k. With the gate at zero
    the output is the input, bit for bit, so an untrained merger is plain Fusion-in-Decoder.
    """

    def __init__(self, config: MergerConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.h = c.num_heads
        self.h_kv = c.num_kv_heads or c.num_heads
        self.dh = c.d_model // c.num_heads
        self.norm = RMSNorm(c.d_model)  # pre-norm; T5 states are already RMS-normed, this keeps scale stable
        self.wq = nn.Linear(c.d_model, self.h * self.dh, bias=False)
        self.wk = nn.Linear(c.d_model, self.h_kv * self.dh, bias=False)
        self.wv = nn.Linear(c.d_model, self.h_kv * self.dh, bias=False)
        self.wo = nn.Linear(self.h * self.dh, c.d_model, bias=False)
        self.q_norm = RMSNorm(self.dh) if c.qk_norm else None
        self.k_norm = RMSNorm(self.dh) if c.qk_norm else None
        self.gate = nn.Parameter(torch.zeros(c.d_model))  # tanh(0) = 0: identity at init
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.xavier_uniform_(lin.weight)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        source_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, K, L, D = _check_shapes(x, mask, source_weights, self.config.d_model)
        T = K * L
        hx = self.norm(x).reshape(B, T, D)  # (B, T, D)
        q = self.wq(hx).view(B, T, self.h, self.dh).transpose(1, 2)  # (B, H, T, dh)
        k = self.wk(hx).view(B, T, self.h_kv, self.dh).transpose(1, 2)  # (B, Hkv, T, dh)
        v = self.wv(hx).view(B, T, self.h_kv, self.dh).transpose(1, 2)  # (B, Hkv, T, dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.h_kv != self.h:
            rep = self.h // self.h_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T, dh)

        valid = mask.reshape(B, T)  # (B, T)
        src = torch.arange(K, device=x.device).repeat_interleave(L)  # (T,) source index of each token
        allowed = valid[:, None, :] & (src[None, :, None] != src[None, None, :])  # (B, Tq, Tk)
        has_key = allowed.any(-1)  # (B, Tq): a query with no other-answer token to look at
        # Such rows would softmax over nothing (NaN, and NaN gradients); let them see every key
        # and zero their output below, so the math stays finite and their residual is the identity.
        allowed = allowed | ~has_key[..., None]
        bias = torch.zeros(B, T, T, dtype=q.dtype, device=x.device)  # (B, Tq, Tk)
        if self.config.routing_bias and source_weights is not None:
            logw = source_weights.to(q.dtype).clamp_min(1e-6).log().repeat_interleave(L, dim=1)  # (B, Tk)
            bias = bias + logw[:, None, :]
        bias = bias.masked_fill(~allowed, float("-inf"))[:, None]  # (B, 1, Tq, Tk)
        p_drop = self.config.dropout if self.training else 0.0

        if self.config.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop)  # (B, H, T, dh)
        else:
            cap = self.config.softcap
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.dh)  # (B, H, Tq, Tk)
            logits = cap * torch.tanh(logits / cap) + bias
            att = F.dropout(logits.softmax(-1), p=p_drop, training=self.training)
            out = att @ v  # (B, H, T, dh)

        out = self.wo(out.transpose(1, 2).reshape(B, T, self.h * self.dh))  # (B, T, D)
        out = out * has_key[..., None].to(out.dtype)
        return x + (torch.tanh(self.gate) * out).view(B, K, L, D)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, out / WEIGHTS_FILE)
        (out / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        return out

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> AdvancedCrossAttentionMerger:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a merger directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        merger = cls(MergerConfig(**json.loads((path / CONFIG_FILE).read_text())))
        merger.load_state_dict(load_file(path / WEIGHTS_FILE, device=str(map_location)))
        return merger


def _check_shapes(
    x: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None, d_model: int
) -> tuple[int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, K, L, D), got shape {tuple(x.shape)}")
    B, K, L, D = x.shape
    if d_model != D:
        raise ValueError(f"x has D={D} but the merger was built for d_model={d_model} (x {tuple(x.shape)})")
    if tuple(mask.shape) != (B, K, L):
        raise ValueError(f"mask must be (B, K, L) = {(B, K, L)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    if weights is not None and tuple(weights.shape) != (B, K):
        raise ValueError(f"source_weights must be (B, K) = {(B, K)}, got {tuple(weights.shape)}")
    return B, K, L, D
