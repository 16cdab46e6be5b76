"""Continual-learning metrics over a score matrix R.

R[i][j] is the score on domain j after stage i; row 0 is before any stage. Domain 0 is the
source (what the base model already knew, learned "at stage 0"), domain t is learned at
stage t, so R has T + 1 rows and T + 1 columns. Probe columns (evaluation-only benchmarks of
what the base model knows, e.g. HellaSwag) may follow: they are treated like the source,
learned at stage 0, so they enter ACC, BWT and forgetting but never FWT or learning.

Scores may be lower-is-better (NLL). Per column the differences are signed so that positive
forgetting always means "got worse" and positive learning "got better", in the column's own
units. The averages (ACC, BWT, FWT, mean forgetting, mean learning) run over the
higher-is-better columns when there are any (accuracies share one scale; an NLL column
would mix units), else over all columns. Mean learning and mean / source forgetting apply
that rule to their own columns: where none of a mean's columns is an accuracy, it runs over
all of them, so a lineage that learns NLL-scored domains while an accuracy probe measures
forgetting still has a learning figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ContinualMetrics:
    ACC: float
    """mean_j R[T][j] over the averaged columns: final score, the source (and probes) included."""
    BWT: float
    """mean_{j<T, probes} s_j (R[T][j] - R[ref_j][j]), ref_j = j (0 for probes); negative means forgetting."""
    FWT: float | None
    """mean_{2<=j<=T} s_j (R[j-1][j] - R[0][j]); None with fewer than two stages."""
    forgetting: list[float]
    """forgetting_j = max_{l<T} s_j R[l][j] - s_j R[T][j] for j < T, then for each probe (Chaudhry et al. 2018)."""
    learning: list[float]
    """s_t (R[t][t] - R[t-1][t]) for t = 1..T."""
    forgetting_columns: tuple[int, ...] = ()
    """Column of each ``forgetting`` entry."""
    averaged: tuple[int, ...] = ()
    """Columns ACC, BWT and FWT run over."""
    higher_is_better: tuple[bool, ...] = ()
    """Direction of each column (empty: every column is an accuracy)."""

    def _one_scale(self, columns: Sequence[int]) -> list[int]:
        """The higher-is-better columns among ``columns`` when there are any, else all of them."""
        up = [j for j in columns if not self.higher_is_better or self.higher_is_better[j]]
        return up or list(columns)

    def _mean_forgetting_over(self, columns: Sequence[int]) -> float:
        keep = self._one_scale(columns)
        vals = [f for f, j in zip(self.forgetting, self.forgetting_columns, strict=True) if j in keep]
        return sum(vals) / len(vals) if vals else 0.0

    @property
    def mean_forgetting(self) -> float:
        return self._mean_forgetting_over(self.forgetting_columns)

    @property
    def source_forgetting(self) -> float:
        """Mean forgetting of what the base model knew (source and probes): the paper's forgetting axis."""
        T = len(self.learning)
        return self._mean_forgetting_over([j for j in self.forgetting_columns if j == 0 or j > T])

    @property
    def mean_learning(self) -> float:
        keep = self._one_scale(range(1, len(self.learning) + 1))
        vals = [v for t, v in enumerate(self.learning, start=1) if t in keep]
        return sum(vals) / len(vals) if vals else 0.0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def continual_metrics(R: Sequence[Sequence[float]], higher_is_better: Sequence[bool] | None = None) -> ContinualMetrics:
    """All metrics of METHOD.md for R of shape (T + 1) x (T + 1 + P), T >= 1, P probe columns.

    ``higher_is_better[j]`` gives column j's direction (default: every score is an accuracy).
    """
    T = len(R) - 1
    width = len(R[0]) if R else 0
    if T < 1 or width < T + 1 or any(len(row) != width for row in R):
        raise ValueError(
            f"R must be (T+1) x (T+1) with T >= 1 (row 0 before any stage), plus optional probe "
            f"columns; got {len(R)} rows of lengths {[len(r) for r in R]}"
        )
    up = list(higher_is_better) if higher_is_better is not None else [True] * width
    if len(up) != width:
        raise ValueError(f"higher_is_better has {len(up)} entries for {width} columns")
    s = [1.0 if u else -1.0 for u in up]
    averaged = tuple(j for j in range(width) if up[j]) if any(up) else tuple(range(width))
    probes = list(range(T + 1, width))
    ref = {j: j for j in range(T)} | {j: 0 for j in probes}
    acc = _mean([R[T][j] for j in averaged])
    bwt = _mean([s[j] * (R[T][j] - R[ref[j]][j]) for j in ref if j in averaged])
    fwt = _mean([s[j] * (R[j - 1][j] - R[0][j]) for j in range(2, T + 1) if j in averaged]) if T >= 2 else None
    columns = tuple(ref)
    forgetting = [max(s[j] * R[i][j] for i in range(T)) - s[j] * R[T][j] for j in columns]
    learning = [s[t] * (R[t][t] - R[t - 1][t]) for t in range(1, T + 1)]
    return ContinualMetrics(
        acc if acc is not None else 0.0,
        bwt if bwt is not None else 0.0,
        fwt,
        forgetting,
        learning,
        columns,
        averaged,
        tuple(up),
    )
