"""lambda auto: which lambda a stage trains with, found by trials scored on validation rows.

The pure part (flows/auto_lambda.py runs the trials): what a trial measured, whether it keeps the
forgetting budget, which lambda to try next and which trial wins. Forgetting and learning are those of
the promotion gate (``lalora.metrics.continual_metrics``), read on the validation rows: a column's
forgetting is its best earlier validation score less the trial's (sign flipped for a lower-is-better
score), learning is the stage's own domain's gain over the row before.

The search is a geometric bisection on a log scale between ``min_lambda`` and ``max_lambda``. The first
trial is the warm start (the previous stage's choice, else the range's geometric middle). Until the budget
is bracketed, trials step a decade at a time: up while over the budget (over it at ``max_lambda`` too: no
lambda in range meets it, and the search stops), down while within it (within it at ``min_lambda``:
nothing learns more, and it stops). Then it halves the bracket [highest lambda over the budget, lowest
within it] until the two are closer than ``resolution`` or ``max_trials`` trials ran. More penalty forgets
less and learns less, so the lowest lambda within the budget is the one that learns most; the winner is the
feasible trial that learned most (the smallest forgetting when none is feasible).

The trials' validation learning is a mean over a few dozen rows: trials a few lambdas apart often differ by
less than its sampling error, and taking the largest then favours the least penalty, whose forgetting is the
likeliest to be over the budget on rows the search did not see. ``choice: one_se`` takes, of the feasible
trials, the one with the most penalty whose learning is within one paired standard error of the best's
(Breiman et al.'s one-standard-error rule, glmnet's ``lambda.1se``): the error of the difference of two trials'
learning, from their per-row scores on the same validation rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lalora import continual_metrics
from pipelines.config import AutoLambdaConfig
from pipelines.stages.gate import beyond

_STEP = 10.0
"""Until a trial on each side of the budget brackets it, the next trial's lambda is a decade further."""


@dataclass(frozen=True)
class Trial:
    """One trial training of a stage at ``lam``, scored on the validation rows."""

    index: int
    lam: float
    steps: int
    learning: float
    """The stage's own domain: validation score gained over the row before (positive is better)."""
    forgetting: dict[str, float]
    """Per earlier column (the source, earlier domains, probes): best earlier validation score less this one."""
    seconds: float
    adapter: str
    predicted: float | None = None
    """1/2 delta^T P delta: the Laplace model's rise of the earlier domains' per-sequence loss."""
    scores: dict[str, float] = field(default_factory=dict)
    """The trial's validation score per column."""
    run_id: str = ""
    budgeted: list[str] = field(default_factory=list)
    """The columns the budget applies to (``lalora.auto.columns``); empty: every column."""
    learning_rows: list[float] = field(default_factory=list)
    """The stage's own domain's validation score per row, signed so that higher is better (the difference of
    two trials' means is the difference of their learning); empty where the scorer gives none."""

    @property
    def bounded(self) -> dict[str, float]:
        """The forgetting the budget applies to."""
        return {c: f for c, f in self.forgetting.items() if not self.budgeted or c in self.budgeted}

    @property
    def max_forgetting(self) -> float:
        return max(self.bounded.values(), default=0.0)

    @property
    def worst(self) -> str:
        """The budgeted column that forgot most."""
        bounded = self.bounded
        return max(bounded, key=lambda k: bounded[k]) if bounded else ""

    def feasible(self, budget: float) -> bool:
        return not beyond(self.max_forgetting, budget)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trial:
        return cls(**data)


def validation_metrics(
    columns: list[str],
    stage: int,
    rows: Sequence[dict[str, float]],
    trial: dict[str, float],
    higher_is_better: list[bool],
) -> tuple[float, dict[str, float]]:
    """Learning and per-column forgetting of a trial's validation scores ``trial`` after the rows before it.

    ``columns`` as the gate reads R: the source, the domains up to ``stage``, the probes."""
    R = [[row[c] for c in columns] for row in [*rows, trial]]
    m = continual_metrics(R, higher_is_better)
    return m.learning[-1], {columns[j]: f for j, f in zip(m.forgetting_columns, m.forgetting, strict=True)}


def next_lambda(trials: Sequence[Trial], auto: AutoLambdaConfig, budget: float, warm: float | None) -> float | None:
    """The lambda of the next trial, or None: the search is over."""
    if len(trials) >= auto.max_trials:
        return None
    lo, hi = auto.min_lambda, auto.max_lambda
    if not trials:
        start = warm if warm is not None else math.sqrt(lo * hi)
        return min(max(start, lo), hi)
    feasible = [t.lam for t in trials if t.feasible(budget)]
    over = [t.lam for t in trials if not t.feasible(budget)]
    if not feasible:  # more penalty, a decade at a time, up to the range's top
        top = max(over)
        return None if top >= hi else min(top * _STEP, hi)
    if not over:  # less penalty, a decade at a time, down to the range's bottom
        bottom = min(feasible)
        return None if bottom <= lo else max(bottom / _STEP, lo)
    below, above = max((x for x in over if x < min(feasible)), default=None), min(feasible)
    if below is None:  # more penalty forgot more: not monotone here; the lowest feasible one stands
        return None
    if above / below <= auto.resolution:
        return None
    return math.sqrt(below * above)


def paired_gap(best: Trial, other: Trial) -> tuple[float, float] | None:
    """How much more ``best`` learned than ``other`` on the same validation rows, and that difference's
    standard error (the per-row differences' standard deviation over the square root of the rows); None when
    either lacks per-row scores or they were not scored on the same rows."""
    a, b = best.learning_rows, other.learning_rows
    if not a or len(a) != len(b) or len(a) < 2:
        return None
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = math.fsum(diffs) / len(diffs)
    var = math.fsum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return best.learning - other.learning, math.sqrt(var / len(diffs))


def choose(trials: Sequence[Trial], budget: float, choice: str = "most_learning") -> tuple[Trial, bool]:
    """The winning trial and whether it is within the budget: the feasible one that learned most (the lower
    lambda on a tie), else the one that forgot least. ``choice`` ``one_se``: of the feasible trials, the one with
    the largest lambda whose learning is within one paired standard error of the most's (``paired_gap``;
    a trial without per-row scores is within it only when it is the most's)."""
    if not trials:
        raise ValueError("no trials to choose from")
    feasible = [t for t in trials if t.feasible(budget)]
    if not feasible:
        return min(trials, key=lambda t: (t.max_forgetting, t.lam)), False
    best = max(feasible, key=lambda t: (t.learning, -t.lam))
    if choice != "one_se":
        return best, True

    def within(t: Trial) -> bool:
        gap = paired_gap(best, t)
        return t is best or (gap is not None and gap[0] <= gap[1])

    return max((t for t in feasible if within(t)), key=lambda t: t.lam), True


def summary(
    trials: Sequence[Trial],
    chosen: Trial,
    feasible: bool,
    budget: float,
    stage_steps: int,
    choice: str = "most_learning",
) -> dict[str, Any]:
    """What a stage's search did, for the version, metrics.json and the Prefect artifact."""
    return {
        "choice": choice,
        "lambda": chosen.lam,
        "trials": len(trials),
        "feasible": feasible,
        "budget": budget,
        "chosen_trial": chosen.index,
        "validation_learning": chosen.learning,
        "validation_forgetting": chosen.max_forgetting,
        "worst_column": chosen.worst,
        "trial_steps": sum(t.steps for t in trials),
        "stage_steps": stage_steps,
        "compute": sum(t.steps for t in trials) / stage_steps,
        "lambdas": [t.lam for t in trials],
    }


def refusal(trials: Sequence[Trial], chosen: Trial, budget: float, auto: AutoLambdaConfig) -> str:
    """One line: no lambda in range keeps the budget, and the smallest forgetting reached."""
    return (
        f"no lambda in [{auto.min_lambda:g}, {auto.max_lambda:g}] keeps validation forgetting within "
        f"{budget:g}: the smallest reached was {chosen.max_forgetting:.3f} ({chosen.worst}, lambda "
        f"{chosen.lam:g}) after {len(trials)} trial(s); raise lalora.auto.max_lambda or the budget"
    )
