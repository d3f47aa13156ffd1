"""Routing policy: per-domain scores to the specialists that should answer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RoutingDecision:
    """What the API returns to clients as `routing` (plus, later, which specialists failed)."""

    specialists: list[str]  # chosen, highest score first
    scores: dict[str, float] = field(default_factory=dict)  # per domain
    fell_back: bool = False  # no domain passed its threshold
    pinned: bool = False  # the client named the specialist; the router was bypassed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoutingPolicy:
    """Every domain over its threshold (at most top_k, highest first); none: the fallback specialist."""

    thresholds: dict[str, float]
    fallback: str
    top_k: int = 2
    domain_to_specialist: dict[str, str] = field(default_factory=dict)
    default_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    def specialist_for(self, domain: str) -> str:
        return self.domain_to_specialist.get(domain, domain)

    def decide(self, scores: dict[str, float]) -> RoutingDecision:
        passed = [(s, d) for d, s in scores.items() if s >= self.thresholds.get(d, self.default_threshold)]
        passed.sort(key=lambda x: (-x[0], x[1]))
        chosen: list[str] = []
        for _, domain in passed:
            spec = self.specialist_for(domain)
            if spec not in chosen:  # two domains may map onto one specialist
                chosen.append(spec)
            if len(chosen) == self.top_k:
                break
        if not chosen:
            return RoutingDecision(specialists=[self.fallback], scores=scores, fell_back=True)
        return RoutingDecision(specialists=chosen, scores=scores)

    @staticmethod
    def pin(specialist: str) -> RoutingDecision:
        return RoutingDecision(specialists=[specialist], pinned=True)
