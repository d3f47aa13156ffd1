"""Synthesizer: FiD-style T5 encoding of each answer, cross-attention merger, T5 decoder writes the answer."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutput

from fusion.merger import AdvancedCrossAttentionMerger, MergerConfig, check_sliding_window

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    domain: str
    text: str
    weight: float = 1.0  # routing score of the specialist that wrote it


@dataclass
class SynthesisRequest:
    query: str
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.answers:
            raise ValueError("a synthesis request needs at least one answer")


def fid_passage(query: str, answer: Answer) -> str:
    return f"question: {query} expert: {answer.domain} answer: {answer.text}"


class TokenSink(BaseStreamer):
    """Passes each generated token id to a callback; the first put (prompt or decoder start) is skipped."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token, self.started = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # generate() first puts the prompt (decoder-only) or the decoder start token
            self.started = True
            return
        for t in value.reshape(-1).tolist():
            self.on_token(int(t))

    def end(self) -> None:
        pass


class Synthesizer:
    """FLAN-T5 (or the zoo's tiny T5) with an AdvancedCrossAttentionMerger between encoder and decoder."""

    def __init__(
        self,
        t5: T5ForConditionalGeneration,
        tokenizer,
        merger: AdvancedCrossAttentionMerger | None = None,
        max_answer_tokens: int = 256,
        depth_layers: int = 0,
        sliding_window: int | None = None,
    ) -> None:
        self.t5 = t5
        self.tokenizer = tokenizer
        d = t5.config.d_model
        heads = max(h for h in (8, 4, 2, 1) if d % h == 0)
        if merger is None:  # an untrained merger: the identity, with or without the depth mix
            merger = AdvancedCrossAttentionMerger(MergerConfig(d_model=d, num_heads=heads, depth_layers=depth_layers))
        elif depth_layers and depth_layers != merger.config.depth_layers:
            raise ValueError(
                f"depth_layers={depth_layers} was asked for but the merger was trained with "
                f"depth_layers={merger.config.depth_layers}"
            )
        if sliding_window is not None:  # no parameters: applies to a trained merger as well (None keeps its own)
            check_sliding_window(sliding_window)
            merger.config.sliding_window = sliding_window
        self.merger = merger.to(device=t5.device, dtype=t5.dtype)
        if self.merger.config.d_model != d:
            raise ValueError(f"merger d_model={self.merger.config.d_model} does not match T5 d_model={d}")
        n_states = t5.config.num_layers + 1  # the embeddings, then one per encoder layer
        if self.merger.config.depth_layers > n_states:
            raise ValueError(
                f"depth_layers={self.merger.config.depth_layers} exceeds the {n_states} hidden states "
                f"of this T5 encoder ({t5.config.num_layers} layers + embeddings)"
            )
        self.max_answer_tokens = max_answer_tokens
        self.lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        merger_path: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_answer_tokens: int = 256,
        depth_layers: int = 0,
        sliding_window: int | None = None,
    ) -> Synthesizer:
        tokenizer = AutoTokenizer.from_pretrained(model)
        t5 = T5ForConditionalGeneration.from_pretrained(model, dtype=dtype, use_safetensors=True).to(device).eval()
        merger = AdvancedCrossAttentionMerger.load(merger_path, map_location=device) if merger_path else None
        return cls(t5, tokenizer, merger, max_answer_tokens, depth_layers, sliding_window).eval()

    @property
    def device(self) -> torch.device:
        return self.t5.device

    def eval(self) -> Synthesizer:
        self.t5.eval()
        self.merger.eval()
        return self

    def encode(self, requests: Sequence[SynthesisRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused encoder states (B, Kmax*L, D) and their mask (B, Kmax*L)."""
        passages = [fid_passage(r.query, a) for r in requests for a in r.answers]
        # Each passage is cut to its own budget: a long answer is truncated, never dropped whole.
        enc = self.tokenizer(
            passages, max_length=self.max_answer_tokens, truncation=True, padding=True, return_tensors="pt"
        ).to(self.device)
        N = self.merger.config.depth_layers
        out = self.t5.encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=N > 0)
        states = out.last_hidden_state
        B, K, L, D = len(requests), max(len(r.answers) for r in requests), states.shape[1], states.shape[2]
        x = states.new_zeros(B, K, L, D)  # (B, K, L, D); absent answers stay zero and masked
        mask = torch.zeros(B, K, L, dtype=torch.bool, device=self.device)
        weights = torch.ones(B, K, device=self.device, dtype=states.dtype)
        # The last N hidden states (the last one is last_hidden_state) for the merger's depth mix.
        depth = torch.stack(out.hidden_states[-N:]) if N else None  # (N, passages, L, D)
        layers = states.new_zeros(N, B, K, L, D) if N else None  # (N, B, K, L, D)
        n = 0
        for b, r in enumerate(requests):
            for k, a in enumerate(r.answers):
                x[b, k] = states[n]
                mask[b, k] = enc.attention_mask[n].bool()
                weights[b, k] = a.weight
                if layers is not None:
                    layers[:, b, k] = depth[:, n]
                n += 1
        fused = self.merger(x, mask, weights, layers)  # (B, K, L, D)
        return fused.reshape(B, K * L, D), mask.reshape(B, K * L)

    def _gen_kwargs(self, max_new_tokens: int, temperature: float, top_p: float) -> dict:
        kw: dict = {"max_new_tokens": max_new_tokens}
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[SynthesisRequest],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        streamer: BaseStreamer | None = None,
    ) -> list[str]:
        """One synthesized answer per request; greedy when temperature is 0."""
        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            states, mask = self.encode(requests)
            out = self.t5.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=states),
                attention_mask=mask.long(),
                streamer=streamer,
                **self._gen_kwargs(max_new_tokens, temperature, top_p),
            )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def generate_stream(
        self,
        request: SynthesisRequest,
        on_token: Callable[[int], None],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> str:
        """Blocking; calls on_token for each generated id as the decoder produces it."""
        return self.generate([request], max_new_tokens, temperature, top_p, streamer=TokenSink(on_token))[0]

    def loss(self, requests: Sequence[SynthesisRequest], targets: Sequence[str], max_target_tokens: int = 128):
        """Teacher-forced cross-entropy of the targets given the fused answers (for training)."""
        states, mask = self.encode(requests)
        labels = self.tokenizer(
            list(targets), max_length=max_target_tokens, truncation=True, padding=True, return_tensors="pt"
        ).input_ids.to(self.device)
        labels[labels == self.tokenizer.pad_token_id] = -100
        out = self.t5(
            encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask.long(), labels=labels
        )
        return out.loss
