"""Evaluate tiny ada as it routes: accuracy, per-domain P/R/F1, confusion, per-source accuracy, latency, plot."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from router.model import TinyAda
from router.policy import RoutingPolicy
from router.train import Example


@dataclass
class EvalReport:
    domains: list[str]
    accuracy: float  # single-label prompts: the routed top-1 domain (fallback included) is the label
    macro_f1: float  # macro F1 of that top-1 decision over the domains
    exact_match: float  # the set of domains over threshold (or the fallback) equals the label set
    multi_both_chosen: float  # multi-domain prompts: every labelled domain chosen by the policy (top_k)
    per_domain: dict[str, dict[str, float]] = field(default_factory=dict)  # top-1 precision/recall/f1/support
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)  # true -> routed top-1
    per_source: dict[str, dict[str, float]] = field(default_factory=dict)  # source -> {n, accuracy}
    fallback_rate: float = 0.0  # share of single-label prompts where no domain passed its threshold
    fallback: str | None = None  # the domain the policy falls back to
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    n_single: int = 0
    n_multi: int = 0

    def render(self) -> str:
        lines = [
            f"single-label accuracy  {self.accuracy:.4f}  (n={self.n_single}, routed top-1, fallback {self.fallback})",
            f"macro F1               {self.macro_f1:.4f}",
            f"fell back              {self.fallback_rate:.4f}",
            f"exact match            {self.exact_match:.4f}",
            f"multi-domain, all chosen {self.multi_both_chosen:.4f}  (n={self.n_multi})",
            f"latency p50 / p99      {self.latency_p50_ms:.3f} / {self.latency_p99_ms:.3f} ms",
            "",
            f"{'domain':12s} {'precision':>9s} {'recall':>7s} {'f1':>7s} {'support':>8s}",
        ]
        for d, m in self.per_domain.items():
            lines.append(f"{d:12s} {m['precision']:9.4f} {m['recall']:7.4f} {m['f1']:7.4f} {int(m['support']):8d}")
        lines += ["", "confusion (rows: true, cols: routed top-1, single-label prompts)"]
        lines.append(" " * 12 + "".join(f"{d:>10s}" for d in self.domains))
        for d in self.domains:
            lines.append(f"{d:12s}" + "".join(f"{self.confusion[d][p]:10d}" for p in self.domains))
        if len(self.per_source) > 1:
            lines += ["", f"{'source':20s} {'n':>6s} {'accuracy':>9s}"]
            for s, m in self.per_source.items():
                lines.append(f"{s:20s} {int(m['n']):6d} {m['accuracy']:9.4f}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Confusion matrix and per-domain precision/recall side by side, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")  # files only: never a window, never a display
        import matplotlib.pyplot as plt

        cm = np.array([[self.confusion[t][p] for p in self.domains] for t in self.domains])
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
        ax1.imshow(cm, cmap="Blues")
        ax1.set_xticks(range(len(self.domains)), self.domains)
        ax1.set_yticks(range(len(self.domains)), self.domains)
        ax1.set_xlabel("routed top-1")
        ax1.set_ylabel("label")
        ax1.set_title(f"confusion (n={self.n_single}, accuracy {self.accuracy:.3f})")
        for i in range(len(self.domains)):
            for j in range(len(self.domains)):
                color = "white" if cm[i, j] > cm.max() / 2 else "black"
                ax1.text(j, i, str(cm[i, j]), ha="center", va="center", color=color)
        x = np.arange(len(self.domains))
        prec = [self.per_domain[d]["precision"] for d in self.domains]
        rec = [self.per_domain[d]["recall"] for d in self.domains]
        ax2.bar(x - 0.2, prec, 0.4, label="precision")
        ax2.bar(x + 0.2, rec, 0.4, label="recall")
        ax2.set_xticks(x, self.domains)
        ax2.set_ylim(0, 1.05)
        ax2.set_title(f"per domain (macro F1 {self.macro_f1:.3f})")
        ax2.legend(loc="lower right")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def latency_ms(model: TinyAda, texts: list[str], repeats: int = 1) -> list[float]:
    """Wall time of scoring one prompt at a time (batch 1), in ms."""
    out = []
    for _ in range(repeats):
        for t in texts:
            t0 = time.perf_counter()
            model.score(t)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def routed_top1(scores: dict[str, float], thresholds: dict[str, float], fallback: str | None) -> tuple[str, bool]:
    """The domain the router sends a prompt to first, and whether that was the fallback."""
    passed = [d for d in scores if scores[d] >= thresholds[d]]
    if passed:
        return max(passed, key=lambda d: (scores[d], d)), False
    if fallback is not None:
        return fallback, True
    return max(scores, key=lambda d: (scores[d], d)), True


def evaluate(
    model: TinyAda, examples: list[Example], top_k: int = 2, fallback: str | None = "general", timing: bool = True
) -> EvalReport:
    """Route every example as the serving policy would; fallback None (or not a domain) means plain argmax."""
    domains = model.domains
    fallback = fallback if fallback in domains else None
    thresholds = {d: model.config.thresholds.get(d, 0.5) for d in domains}
    policy = RoutingPolicy(thresholds=thresholds, fallback=fallback or "__none__", top_k=top_k)
    scores = model.score_batch([ex.text for ex in examples])
    y_true, y_pred, sources = [], [], []
    fell = exact = multi_ok = n_multi = 0
    for ex, s in zip(examples, scores, strict=True):
        truth = set(ex.labels)
        chosen = set(policy.decide(s).specialists) & set(domains) or ({fallback} if fallback else set())
        exact += chosen == truth
        if len(truth) == 1:
            top, fell_back = routed_top1(s, thresholds, fallback)
            fell += fell_back
            y_true.append(ex.labels[0])
            y_pred.append(top)
            sources.append(ex.source or "-")
        else:
            n_multi += 1
            multi_ok += truth <= chosen
    per: dict[str, dict[str, float]] = {}
    confusion = {d: dict.fromkeys(domains, 0) for d in domains}
    per_source: dict[str, dict[str, float]] = {}
    macro = acc = 0.0
    if y_true:
        p, r, f, sup = precision_recall_fscore_support(y_true, y_pred, labels=domains, zero_division=0)
        per = {
            d: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(sup[i])}
            for i, d in enumerate(domains)
        }
        cm = confusion_matrix(y_true, y_pred, labels=domains)
        confusion = {t: {q: int(cm[i, j]) for j, q in enumerate(domains)} for i, t in enumerate(domains)}
        present = sorted(set(y_true))  # a domain absent from the labels has no recall to average
        macro = float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
        acc = float(np.mean(np.array(y_true) == np.array(y_pred)))
        hits: dict[str, list[bool]] = defaultdict(list)
        for t, q, s in zip(y_true, y_pred, sources, strict=True):
            hits[s].append(t == q)
        per_source = {s: {"n": len(h), "accuracy": float(np.mean(h))} for s, h in sorted(hits.items())}
    lat = np.array(latency_ms(model, [ex.text for ex in examples])) if timing else np.zeros(1)
    return EvalReport(
        domains=domains,
        accuracy=acc,
        macro_f1=macro,
        exact_match=exact / max(1, len(examples)),
        multi_both_chosen=multi_ok / max(1, n_multi),
        per_domain=per,
        confusion=confusion,
        per_source=per_source,
        fallback_rate=fell / max(1, len(y_true)),
        fallback=fallback,
        latency_p50_ms=float(np.percentile(lat, 50)),
        latency_p99_ms=float(np.percentile(lat, 99)),
        n_single=len(y_true),
        n_multi=n_multi,
    )
