"""The demo's target (issue 2), from plain LoRA's and LaLoRA's metrics.json of the same lineage.

With lambda = 0 some earlier domain's accuracy drops by at least 20 points; with the demo's lambda
the mean forgetting is at most half of plain LoRA's, while each new domain is still learned,
R[i][i] at least 80% of plain LoRA's. ``benchmarks/demo_target.py`` prints it (``make demo-check``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIN_PLAIN_DROP = 0.20
"""Plain LoRA must forget at least this much of some earlier domain."""
MAX_FORGETTING_SHARE = 0.5
"""LaLoRA's mean forgetting may be at most this share of plain LoRA's."""
MIN_LEARNED_RATIO = 0.80
"""Each stage's R[i][i] under LaLoRA must reach this share of plain LoRA's."""


@dataclass(frozen=True)
class TargetCheck:
    """The demo's target, from plain LoRA's and LaLoRA's metrics.json of the same lineage."""

    plain_max_drop: float
    """Largest forgetting of any earlier domain (source included) under plain LoRA."""
    plain_mean_forgetting: float
    mean_forgetting: float
    """LaLoRA's."""
    learned_ratio: dict[str, float]
    """R[i][i] of LaLoRA over R[i][i] of plain LoRA, per stage's domain."""

    @property
    def plain_forgets(self) -> bool:
        return self.plain_max_drop >= MIN_PLAIN_DROP

    @property
    def forgets_less(self) -> bool:
        return self.mean_forgetting <= MAX_FORGETTING_SHARE * self.plain_mean_forgetting

    def learned(self, domain: str) -> bool:
        return self.learned_ratio[domain] >= MIN_LEARNED_RATIO

    @property
    def met(self) -> bool:
        return self.plain_forgets and self.forgets_less and all(map(self.learned, self.learned_ratio))


def check_target(plain: dict[str, Any], lalora: dict[str, Any]) -> TargetCheck:
    """Compare two metrics.json of the same domains: plain LoRA (lambda 0) and LaLoRA."""
    if plain["domains"] != lalora["domains"]:
        raise ValueError(f"the runs cover different domains: {plain['domains']} and {lalora['domains']}")
    stages = len(plain["R"]) - 1
    stage_domains = plain["domains"][1 : stages + 1]
    ratio = {
        d: (lalora["R"][i][i] / plain["R"][i][i] if plain["R"][i][i] > 0 else float("inf"))
        for i, d in enumerate(stage_domains, start=1)
    }
    return TargetCheck(
        plain_max_drop=max(plain["forgetting"].values()),
        plain_mean_forgetting=plain["mean_forgetting"],
        mean_forgetting=lalora["mean_forgetting"],
        learned_ratio=ratio,
    )
