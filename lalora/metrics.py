"""Continual-learning metrics over an accuracy matrix R.

R[i][j] is the score on domain j after stage i; row 0 is before any stage. Domain 0 is the
source (what the base model already knew, learned "at stage 0"), domain t is learned at
stage t, so R has T + 1 rows and T + 1 columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ContinualMetrics:
    ACC: float
    """mean_j R[T][j]: final score over all domains, the source included."""
    BWT: float
    """mean_{j<T} (R[T][j] - R[j][j]); negative means forgetting."""
    FWT: float | None
    """mean_{j>=2} (R[j-1][j] - R[0][j]); None with fewer than two stages."""
    forgetting: list[float]
    """forgetting_j = max_{l<T} R[l][j] - R[T][j] for j < T (Chaudhry et al. 2018)."""
    learning: list[float]
    """R[t][t] - R[t-1][t] for t = 1..T."""

    @property
    def mean_forgetting(self) -> float:
        return sum(self.forgetting) / len(self.forgetting) if self.forgetting else 0.0

    @property
    def mean_learning(self) -> float:
        return sum(self.learning) / len(self.learning) if self.learning else 0.0


def continual_metrics(R: Sequence[Sequence[float]]) -> ContinualMetrics:
    """All metrics of METHOD.md for a square (T + 1) x (T + 1) matrix R, T >= 1."""
    T = len(R) - 1
    if T < 1 or any(len(row) != T + 1 for row in R):
        raise ValueError(f"R must be (T+1) x (T+1) with T >= 1 (row 0 before any stage); got {len(R)} rows of "
                         f"lengths {[len(r) for r in R]}")
    acc = sum(R[T]) / (T + 1)
    bwt = sum(R[T][j] - R[j][j] for j in range(T)) / T
    fwt = sum(R[j - 1][j] - R[0][j] for j in range(2, T + 1)) / (T - 1) if T >= 2 else None
    forgetting = [max(R[l][j] for l in range(T)) - R[T][j] for j in range(T)]
    learning = [R[t][t] - R[t - 1][t] for t in range(1, T + 1)]
    return ContinualMetrics(acc, bwt, fwt, forgetting, learning)
