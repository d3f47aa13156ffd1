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
    depth_layers: int = 0  # DCA-style depth mix: read the last N encoder hidden states (0 = last layer only)
    # Sliding window: a token at position i of its answer attends only to positions i-W..i+W of every other
    # answer (None = all positions). For long answers: cost per query (K-1)(2W+1) keys instead of (K-1)L.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        kv = self.num_kv_heads or self.num_heads
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % kv:
            raise ValueError(f"num_kv_heads={kv} must divide num_heads={self.num_heads}")
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"softcap must be > 0, got {self.softcap}")
        if self.depth_layers == 1 or self.depth_layers < 0:
            raise ValueError(f"depth_layers must be 0 (off) or >= 2 encoder hidden states, got {self.depth_layers}")
        check_sliding_window(self.sliding_window)


def check_sliding_window(window: object) -> None:
    """None (off) or a whole number of positions >= 1; a ValueError naming the value otherwise."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding_window must be None (off) or an integer >= 1 (positions each side), got {window!r}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DepthMix(nn.Module):
    """DCA's generalised residual (GRN-v3) over encoder depth, one mix each for queries, keys and values.

    For stream s and layer i: a_si = static_si + tanh(<y_i, dynamic_si> / sqrt(D)) (per dimension plus a
    per-token, input-dependent gate), mix_s = sum_i a_si * y_i. Intermediate T5 states are the raw
    residual stream, whose scale grows with depth, so each is RMS-normed first; the last layer already
    passed T5's final norm and is used as is. static starts one-hot on the last layer and dynamic at
    zero, so at initialisation every mix equals the last layer exactly.
    """

    def __init__(self, n_layers: int, d_model: int, streams: int = 3) -> None:
        super().__init__()
        self.n = n_layers
        static = torch.zeros(streams, n_layers, d_model)
        static[:, -1] = 1.0
        self.static = nn.Parameter(static)  # (S, N, D)
        self.dynamic = nn.Parameter(torch.zeros(streams, n_layers, d_model))  # (S, N, D)
        self.norms = nn.ModuleList(RMSNorm(d_model) for _ in range(n_layers - 1))

    def forward(self, layers: torch.Tensor) -> list[torch.Tensor]:
        """layers (N, ..., D) -> one mix (..., D) per stream."""
        scale = 1.0 / math.sqrt(layers.shape[-1])
        mixes: list[torch.Tensor | None] = [None] * self.static.shape[0]
        for i in range(self.n):  # a loop, not a (S, N, ..., D) stack: memory stays O(S * tokens * D)
            y = self.norms[i](layers[i]) if i < self.n - 1 else layers[i]  # (..., D)
            for s in range(len(mixes)):
                a = self.static[s, i] + torch.tanh((y @ self.dynamic[s, i])[..., None] * scale)  # (..., D)
                mixes[s] = a * y if mixes[s] is None else mixes[s] + a * y
        return mixes  # type: ignore[return-value]


class AdvancedCrossAttentionMerger(nn.Module):
    """Multi-head cross-attention across K answers, joined by a zero-initialised gated residual.

    Input (B, K, L, D) encoder states of K answers with mask (B, K, L) (True = real token).
    A token of answer k attends to the real tokens of every answer j != k. With the gate at zero
    the output is the input, bit for bit, so an untrained merger is plain Fusion-in-Decoder.
    With depth_layers = N the queries, keys and values read a learned mix of the last N encoder
    hidden states (DepthMix) instead of the last one; the residual stays the last layer.
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
        # Created last so that, with the option off, parameters and initial values match the plain merger.
        self.depth = DepthMix(c.depth_layers, c.d_model) if c.depth_layers else None
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.xavier_uniform_(lin.weight)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        source_weights: torch.Tensor | None = None,
        layers: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, K, L, D), mask (B, K, L), source_weights (B, K), layers (N, B, K, L, D) with layers[-1] = x."""
        B, K, L, D = _check_shapes(x, mask, source_weights, self.config.d_model)
        T = K * L
        if self.depth is None:
            hq = hk = hv = self.norm(x).reshape(B, T, D)  # (B, T, D)
        else:
            if layers is None or tuple(layers.shape) != (self.config.depth_layers, B, K, L, D):
                got = None if layers is None else tuple(layers.shape)
                raise ValueError(
                    f"depth_layers={self.config.depth_layers} needs layers of shape (N, B, K, L, D) = "
                    f"{(self.config.depth_layers, B, K, L, D)}, got {got}"
                )
            hq, hk, hv = (self.norm(m).reshape(B, T, D) for m in self.depth(layers))  # 3 x (B, T, D)
        q, k, v = self.project(hq, hk, hv)  # 3 x (B, H, T, dh)

        valid = mask.reshape(B, T)  # (B, T)
        logw = None
        if self.config.routing_bias and source_weights is not None:
            logw = source_weights.to(q.dtype).clamp_min(1e-6).log().repeat_interleave(L, dim=1)  # (B, Tk)
        p_drop = self.config.dropout if self.training else 0.0
        window = self.config.sliding_window
        if window is not None and window < L - 1:  # a window covering the whole answer is no window
            out, keep = self._windowed(q, k, v, mask, logw, window, p_drop)  # (B, H, T, dh), (B, K, L)
            out = self.wo(out.transpose(1, 2).reshape(B, T, self.h * self.dh)).view(B, K, L, D)
            return x + torch.tanh(self.gate) * (out * keep[..., None].to(out.dtype))
        src = torch.arange(K, device=x.device).repeat_interleave(L)  # (T,) source index of each token
        outs, has_keys = [], []
        # One answer's queries at a time, against every key with its own answer's keys masked out: the
        # mask is one (B, T) row shared by the block's L queries, never the dense (B, T, T) of the
        # reference path, and no K/V is copied. Peak extra memory: one block's (B, H, L, T) logits.
        for j in range(K):
            allowed = valid & (src != j)  # (B, Tk)
            has_key = allowed.any(-1)  # (B,): does any other answer have a real token?
            # Without one, the softmax would run over nothing (NaN, and NaN gradients); let such a block
            # see every key and zero its output below, so the math stays finite and its residual is x.
            allowed = allowed | ~has_key[:, None]
            bias = torch.zeros(B, T, dtype=q.dtype, device=x.device) if logw is None else logw
            bias = bias.masked_fill(~allowed, float("-inf"))[:, None, None, :]  # (B, 1, 1, Tk)
            qj = q[:, :, j * L : (j + 1) * L]  # (B, H, L, dh)
            outs.append(self._attend(qj, k, v, bias, p_drop))  # (B, H, L, dh)
            has_keys.append(has_key)
        out = torch.stack(outs, 2).reshape(B, self.h, T, self.dh)  # (B, H, T, dh)
        out = self.wo(out.transpose(1, 2).reshape(B, T, self.h * self.dh)).view(B, K, L, D)
        out = out * torch.stack(has_keys, 1)[:, :, None, None].to(out.dtype)  # (B, K, L, D)
        return x + torch.tanh(self.gate) * out

    def _windowed(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        logw: torch.Tensor | None,
        window: int,
        p_drop: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sliding-window cross-attention: query (answer j, position i) sees keys (answer a != j, position p)
        with |i - p| <= window. Positions count from the start of each answer, so the window is aligned
        across answers (FiD passages share the "question: ... expert: ... answer:" prefix and tend to
        progress alike); a window over the concatenation would instead pair one answer's tail with the
        next one's head.

        Queries go in chunks of C positions; a chunk needs only positions [s - W, e + W) of each answer,
        so its logits are (B, H, C, K * (C + 2W)) and the whole pass costs O(T * K * (C + 2W)) instead
        of O(T * T). Returns the attention output (B, H, T, dh) and which queries had a key (B, K, L):
        a query whose window holds no real token of another answer keeps its input (output zeroed).
        """
        B, H, _, dh = q.shape
        K, L = mask.shape[1], mask.shape[2]
        C = min(L, max(16, window))  # queries per chunk
        kb, vb = k.view(B, H, K, L, dh), v.view(B, H, K, L, dh)  # (B, H, K, L, dh)
        wb = None if logw is None else logw.view(B, K, L)
        pos = torch.arange(L, device=q.device)
        out = q.new_empty(B, H, K * L, dh)  # written chunk by chunk: no list of pieces to concatenate
        keep = torch.empty(B, K, L, dtype=torch.bool, device=q.device)
        for j in range(K):
            for s in range(0, L, C):
                e = min(s + C, L)
                lo, hi = max(0, s - window), min(L, e + window)
                n = hi - lo
                kc = kb[:, :, :, lo:hi].reshape(B, H, K * n, dh)  # (B, H, Kn, dh)
                vc = vb[:, :, :, lo:hi].reshape(B, H, K * n, dh)
                other = (torch.arange(K, device=q.device) != j).repeat_interleave(n)  # (Kn,)
                near = (pos[s:e, None] - pos[lo:hi].repeat(K)[None, :]).abs() <= window  # (C, Kn)
                allowed = mask[:, :, lo:hi].reshape(B, 1, K * n) & other & near  # (B, C, Kn)
                has_key = allowed.any(-1)  # (B, C)
                allowed = allowed | ~has_key[..., None]  # keep the softmax finite; zeroed below
                bias = torch.zeros(B, e - s, K * n, dtype=q.dtype, device=q.device)
                if wb is not None:
                    bias = bias + wb[:, :, lo:hi].reshape(B, 1, K * n)
                bias = bias.masked_fill(~allowed, float("-inf"))[:, None]  # (B, 1, C, Kn)
                qc = q[:, :, j * L + s : j * L + e]  # (B, H, C, dh)
                out[:, :, j * L + s : j * L + e] = self._attend(qc, kc, vc, bias, p_drop)  # (B, H, C, dh)
                keep[:, j, s:e] = has_key
        return out, keep  # (B, H, T, dh), (B, K, L)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, p_drop: float
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(dh) [soft-capped] + bias) v, with attention dropout."""
        if self.config.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop)
        cap = self.config.softcap
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(self.dh)
        logits = cap * torch.tanh(logits / cap) + bias
        return F.dropout(logits.softmax(-1), p=p_drop, training=self.training) @ v

    def project(
        self, hq: torch.Tensor, hk: torch.Tensor, hv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, D) inputs -> per-head q, k, v (B, H, T, dh): QK norm applied, grouped KV heads repeated."""
        B, T, _ = hq.shape
        q = self.wq(hq).view(B, T, self.h, self.dh).transpose(1, 2)  # (B, H, T, dh)
        k = self.wk(hk).view(B, T, self.h_kv, self.dh).transpose(1, 2)  # (B, Hkv, T, dh)
        v = self.wv(hv).view(B, T, self.h_kv, self.dh).transpose(1, 2)  # (B, Hkv, T, dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.h_kv != self.h:
            rep = self.h // self.h_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T, dh)
        return q, k, v

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


def dense_reference_attention(
    merger: AdvancedCrossAttentionMerger,
    x: torch.Tensor,
    mask: torch.Tensor,
    source_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merger's original forward with a dense (B, T, T) mask, T = K * L: O(T^2) memory.

    Not used by the merger; kept as the reference its per-block and sliding-window paths are tested
    and benchmarked against (depth mixing off, eval mode).
    """
    m = merger
    B, K, L, D = _check_shapes(x, mask, source_weights, m.config.d_model)
    T = K * L
    hx = m.norm(x).reshape(B, T, D)  # (B, T, D)
    q, k, v = m.project(hx, hx, hx)  # 3 x (B, H, T, dh); the reference differs in the mask, not the projections
    valid = mask.reshape(B, T)  # (B, T)
    src = torch.arange(K, device=x.device).repeat_interleave(L)  # (T,)
    allowed = valid[:, None, :] & (src[None, :, None] != src[None, None, :])  # (B, Tq, Tk)
    if m.config.sliding_window is not None:  # the window as an explicit (Tq, Tk) band on in-answer positions
        pos = torch.arange(L, device=x.device).repeat(K)  # (T,)
        allowed = allowed & ((pos[:, None] - pos[None, :]).abs() <= m.config.sliding_window)
    has_key = allowed.any(-1)  # (B, Tq)
    allowed = allowed | ~has_key[..., None]
    bias = torch.zeros(B, T, T, dtype=q.dtype, device=x.device)  # (B, Tq, Tk)
    if m.config.routing_bias and source_weights is not None:
        logw = source_weights.to(q.dtype).clamp_min(1e-6).log().repeat_interleave(L, dim=1)  # (B, Tk)
        bias = bias + logw[:, None, :]
    bias = bias.masked_fill(~allowed, float("-inf"))[:, None]  # (B, 1, Tq, Tk)
    if m.config.softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, dh)
    else:
        cap = m.config.softcap
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(m.dh)  # (B, H, Tq, Tk)
        out = (cap * torch.tanh(logits / cap) + bias).softmax(-1) @ v  # (B, H, T, dh)
    out = m.wo(out.transpose(1, 2).reshape(B, T, m.h * m.dh))  # (B, T, D)
    out = out * has_key[..., None].to(out.dtype)
    return x + (torch.tanh(m.gate) * out).view(B, K, L, D)


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
