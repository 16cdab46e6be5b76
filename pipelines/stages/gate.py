"""Stage step 5: the promotion gate. A new version becomes the champion only if the lineage's
continual-learning metrics after the stage meet the configured conditions."""

from __future__ import annotations

from dataclasses import dataclass, field

from lalora import continual_metrics
from pipelines.config import LineageConfig, PromotionConfig
from pipelines.tracker import Tracker


@dataclass(frozen=True, kw_only=True)
class GateInputs:
    """What the gate reads; ``from_config`` is the one mapping from a lineage's config to it."""

    domains: tuple[str, ...]
    """R's columns: the source, the stages' domains so far, the probes"""
    R: tuple[tuple[float, ...], ...]
    """each column's own score after rows 0..T"""
    higher_is_better: tuple[bool, ...]
    promotion: PromotionConfig

    @classmethod
    def from_config(
        cls, cfg: LineageConfig, *, domains: list[str], R: list[list[float]], higher_is_better: list[bool]
    ) -> GateInputs:
        return cls(
            domains=tuple(domains),
            R=tuple(tuple(row) for row in R),
            higher_is_better=tuple(higher_is_better),
            promotion=cfg.promotion,
        )


@dataclass(frozen=True, kw_only=True)
class GateResult:
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    """One line per failed condition; empty when promoted."""
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


TOLERANCE = 1e-9
"""Relative slack of a limit: scores are averages (an accuracy over 50 rows moves in steps of 0.02, and
0.80 - 0.78 is 0.020000000000000018 in floating point), so a difference equal to a limit is within it."""


def beyond(value: float, limit: float) -> bool:
    """Whether ``value`` exceeds ``limit`` by more than rounding: a forgetting over its budget (or, with the
    arguments the other way round, a learning or BWT below its floor)."""
    return value > limit + TOLERANCE * max(1.0, abs(limit))


def gate(
    domains: list[str], R: list[list[float]], cfg: PromotionConfig, higher_is_better: list[bool] | None = None
) -> GateResult:
    """Check the conditions on R after stage T = len(R) - 1.

    R holds each domain's own score (rows 0..T; columns: the source, domains 1..T, then any
    probes); ``higher_is_better`` gives each column's direction (default: all accuracies).
    Forgetting and learning are signed so that positive forgetting is worse and positive
    learning better, each in its column's own units; BWT averages the accuracy-like columns.
    """
    T = len(R) - 1
    m = continual_metrics(R, higher_is_better)
    target = domains[T]
    metrics = {
        "BWT": m.BWT,
        "ACC": m.ACC,
        "learning": m.learning[-1],
        "max_forgetting": max(m.forgetting) if m.forgetting else 0.0,
    }
    reasons = []
    if cfg.min_bwt is not None and beyond(cfg.min_bwt, m.BWT):
        reasons.append(f"BWT {m.BWT:+.3f} < min_bwt {cfg.min_bwt:+.3f}")
    if cfg.max_forgetting is not None:
        for j, f in zip(m.forgetting_columns, m.forgetting, strict=True):
            if beyond(f, cfg.max_forgetting):
                reasons.append(f"forgetting of {domains[j]} {f:.3f} > max_forgetting {cfg.max_forgetting:.3f}")
    if cfg.min_learning is not None and beyond(cfg.min_learning, m.learning[-1]):
        reasons.append(f"learning on {target} {m.learning[-1]:+.3f} < min_learning {cfg.min_learning:+.3f}")
    return GateResult(promoted=not reasons, reasons=reasons, metrics=metrics)


def decide(inputs: GateInputs, tracker: Tracker | None = None) -> GateResult:
    """The gate as a stage: ``gate`` on the typed inputs."""
    return gate(list(inputs.domains), [list(row) for row in inputs.R], inputs.promotion, list(inputs.higher_is_better))
