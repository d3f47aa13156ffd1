"""Evaluate tiny ada: accuracy, per-domain P/R/F1, exact match, confusion matrix and latency."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from router.model import TinyAda
from router.policy import RoutingPolicy
from router.train import Example


@dataclass
class EvalReport:
    domains: list[str]
    accuracy: float  # single-label prompts: top-scoring domain is the label
    macro_f1: float  # multi-label decisions at the calibrated thresholds
    exact_match: float  # the set of domains over threshold equals the label set
    multi_both_chosen: float  # multi-domain prompts: every labelled domain chosen by the policy (top_k=2)
    per_domain: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # true -> predicted top-1
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    n_single: int = 0
    n_multi: int = 0

    def render(self) -> str:
        lines = [
            f"single-label accuracy  {self.accuracy:.4f}  (n={self.n_single})",
            f"macro F1               {self.macro_f1:.4f}",
            f"exact match            {self.exact_match:.4f}",
            f"multi-domain, all chosen {self.multi_both_chosen:.4f}  (n={self.n_multi})",
            f"latency p50 / p99      {self.latency_p50_ms:.3f} / {self.latency_p99_ms:.3f} ms",
            "",
            f"{'domain':12s} {'precision':>9s} {'recall':>7s} {'f1':>7s} {'support':>8s}",
        ]
        for d, m in self.per_domain.items():
            lines.append(f"{d:12s} {m['precision']:9.4f} {m['recall']:7.4f} {m['f1']:7.4f} {int(m['support']):8d}")
        lines += ["", "confusion (rows: true, cols: predicted top-1, single-label prompts)"]
        lines.append(" " * 12 + "".join(f"{d:>10s}" for d in self.domains))
        for d in self.domains:
            lines.append(f"{d:12s}" + "".join(f"{self.confusion[d][p]:10d}" for p in self.domains))
        return "\n".join(lines)


def latency_ms(model: TinyAda, texts: list[str], repeats: int = 1) -> list[float]:
    """Wall time of scoring one prompt at a time (batch 1), in ms."""
    out = []
    for _ in range(repeats):
        for t in texts:
            t0 = time.perf_counter()
            model.score(t)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round((len(s) - 1) * q / 100))] if s else 0.0


def evaluate(model: TinyAda, examples: list[Example], top_k: int = 2) -> EvalReport:
    domains = model.domains
    thresholds = {d: model.config.thresholds.get(d, 0.5) for d in domains}
    policy = RoutingPolicy(thresholds=thresholds, fallback="__none__", top_k=top_k)
    scores = model.score_batch([ex.text for ex in examples])
    tp = dict.fromkeys(domains, 0)
    fp = dict.fromkeys(domains, 0)
    fn = dict.fromkeys(domains, 0)
    confusion = {d: dict.fromkeys(domains, 0) for d in domains}
    single_ok = n_single = exact = multi_ok = n_multi = 0
    for ex, s in zip(examples, scores, strict=True):
        predicted = {d for d in domains if s[d] >= thresholds[d]}
        truth = set(ex.labels)
        for d in domains:
            tp[d] += d in predicted and d in truth
            fp[d] += d in predicted and d not in truth
            fn[d] += d not in predicted and d in truth
        exact += predicted == truth
        if len(truth) == 1:
            n_single += 1
            top = max(domains, key=lambda d: s[d])
            (label,) = truth
            single_ok += top == label
            confusion[label][top] += 1
        else:
            n_multi += 1
            multi_ok += truth <= set(policy.decide(s).specialists)
    per = {}
    for d in domains:
        p = tp[d] / max(1, tp[d] + fp[d])
        r = tp[d] / max(1, tp[d] + fn[d])
        per[d] = {"precision": p, "recall": r, "f1": 2 * p * r / max(1e-12, p + r), "support": tp[d] + fn[d]}
    lat = latency_ms(model, [ex.text for ex in examples])
    return EvalReport(
        domains=domains,
        accuracy=single_ok / max(1, n_single),
        macro_f1=sum(m["f1"] for m in per.values()) / len(per),
        exact_match=exact / max(1, len(examples)),
        multi_both_chosen=multi_ok / max(1, n_multi),
        per_domain=per,
        confusion=confusion,
        latency_p50_ms=_pct(lat, 50),
        latency_p99_ms=_pct(lat, 99),
        n_single=n_single,
        n_multi=n_multi,
    )
