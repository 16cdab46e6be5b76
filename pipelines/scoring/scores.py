"""Each domain's score, by its own scorer.

``generate`` (greedy, batched, KV cache, an answer extractor) reports ``accuracy``;
``multiple_choice`` reports ``acc`` and ``acc_norm``; ``perplexity`` reports ``nll`` and
``perplexity``. Every domain also reports ``nll``, the mean target-token NLL of its
reference answers (the gold choice for multiple choice), so R_nll covers all columns. Each score
also keeps every row's share of it (``per_row``), where its scorer gives one, so that two adapters scored
on the same rows can be compared row by row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import DomainConfig, EvaluationConfig
from pipelines.scoring.inference import inference_model, torch_linear
from pipelines.scoring.scorers import (
    RowShares,
    score_generate_rows,
    score_multiple_choice_rows,
    score_perplexity_rows,
    target_nll,
)

LOWER_IS_BETTER = frozenset({"nll", "perplexity"})
_SHAPE = ("scoring", "metric", "score", "higher_is_better", "n", "per_row")


@dataclass
class DomainScore:
    scoring: str
    """generate, multiple_choice or perplexity."""
    metric: str
    """The value that goes into R: accuracy, acc, acc_norm, nll or perplexity."""
    values: dict[str, float] = field(default_factory=dict)
    """Every value the scorer reports, ``nll`` included."""
    n: int = 0
    per_row: list[float] = field(default_factory=list)
    """Each scored row's share of ``score`` (their mean), in the rows' order; empty where the scorer gives
    none (lm-eval; a ``perplexity`` metric, which is not a mean over rows)."""

    @property
    def score(self) -> float:
        return self.values[self.metric]

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    @property
    def nll(self) -> float:
        return self.values["nll"]

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.nll, 50.0))

    def as_json(self) -> dict[str, Any]:
        """Flat: ``scoring``, ``metric``, ``score``, ``higher_is_better``, ``n``, every value, and ``per_row``
        where there is one."""
        return {
            "scoring": self.scoring,
            "metric": self.metric,
            "score": self.score,
            "higher_is_better": self.higher_is_better,
            "n": self.n,
            **self.values,
            **({"per_row": self.per_row} if self.per_row else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DomainScore:
        """The inverse of ``as_json`` (a recorded rows.json)."""
        return cls(
            data["scoring"],
            data["metric"],
            {k: v for k, v in data.items() if k not in _SHAPE},
            int(data.get("n", 0)),
            list(data.get("per_row", [])),
        )


Row = dict[str, DomainScore]
"""The scores of one row of R: every scored domain after one stage (row 0: before any stage)."""


def rows_as_json(rows: list[Row]) -> list[dict[str, dict[str, Any]]]:
    return [{d: s.as_json() for d, s in row.items()} for row in rows]


def rows_from_json(data: list[dict[str, dict[str, Any]]]) -> list[Row]:
    return [{d: DomainScore.from_json(s) for d, s in row.items()} for row in data]


def score_domain(
    model: Any,
    tokenizer: Any,
    domain: DomainConfig,
    rows: list[dict[str, Any]],
    cfg: EvaluationConfig,
    *,
    max_length: int,
) -> DomainScore:
    """Score ``rows`` of ``domain`` with the domain's scorer."""
    scoring = domain.score
    desc = f"{domain.name}: {scoring.kind}"
    shares: RowShares
    if scoring.kind == "generate":
        max_new = scoring.max_new_tokens or cfg.max_new_tokens
        values, shares = score_generate_rows(
            model, tokenizer, rows, scoring, batch_size=cfg.batch_size, max_new_tokens=max_new, desc=desc
        )
        values["nll"] = target_nll(model, tokenizer, rows, cfg.batch_size, max_length, f"{domain.name}: nll")
        values["perplexity"] = math.exp(min(values["nll"], 50.0))
        metric = "accuracy"
    elif scoring.kind == "lm_eval":
        from pipelines.scoring.lm_eval import score_lm_eval

        with torch_linear():  # lm-eval runs the merged model our scorers run
            values, n = score_lm_eval(inference_model(model), tokenizer, scoring, batch_size=cfg.batch_size)
        return DomainScore(scoring.kind, scoring.metric, values, n)
    elif scoring.kind == "multiple_choice":
        values, shares = score_multiple_choice_rows(model, tokenizer, rows, batch_size=cfg.batch_size, desc=desc)
        metric = scoring.metric
    else:
        values, shares = score_perplexity_rows(
            model, tokenizer, rows, batch_size=cfg.batch_size, max_length=max_length, desc=desc
        )
        metric = scoring.metric
    return DomainScore(scoring.kind, metric, values, len(rows), shares.get(metric, []))
