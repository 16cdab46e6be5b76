"""Stage step 3: score the adapter on every domain, each with its own scorer.

``generate`` (greedy, batched, KV cache, an answer extractor) reports ``accuracy``;
``multiple_choice`` reports ``acc`` and ``acc_norm``; ``perplexity`` reports ``nll`` and
``perplexity``. Every domain also reports ``nll``, the mean target-token NLL of its
reference answers (the gold choice for multiple choice), so R_nll covers all columns.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import DomainConfig, EvaluationConfig
from pipelines.data import load_domain
from pipelines.modeling import load_for_inference
from pipelines.scoring import score_generate, score_multiple_choice, score_perplexity, target_nll
from pipelines.workspace import write_json_atomic

LOWER_IS_BETTER = frozenset({"nll", "perplexity"})

__all__ = ["DomainScore", "LOWER_IS_BETTER", "evaluate", "score_domain", "target_nll"]


@dataclass
class DomainScore:
    scoring: str
    """generate, multiple_choice or perplexity."""
    metric: str
    """The value that goes into R: accuracy, acc, acc_norm, nll or perplexity."""
    values: dict[str, float] = field(default_factory=dict)
    """Every value the scorer reports, ``nll`` included."""
    n: int = 0

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
        """Flat: ``scoring``, ``metric``, ``score``, ``higher_is_better``, ``n`` and every value."""
        return {"scoring": self.scoring, "metric": self.metric, "score": self.score,
                "higher_is_better": self.higher_is_better, "n": self.n, **self.values}


def score_domain(model: Any, tokenizer: Any, domain: DomainConfig, rows: list[dict[str, Any]], cfg: EvaluationConfig,
                 *, max_length: int) -> DomainScore:
    """Score ``rows`` of ``domain`` with the domain's scorer."""
    scoring = domain.score
    desc = f"{domain.name}: {scoring.kind}"
    if scoring.kind == "generate":
        max_new = scoring.max_new_tokens or cfg.max_new_tokens
        values = score_generate(model, tokenizer, rows, scoring, batch_size=cfg.batch_size, max_new_tokens=max_new,
                                desc=desc)
        values["nll"] = target_nll(model, tokenizer, rows, cfg.batch_size, max_length, f"{domain.name}: nll")
        values["perplexity"] = math.exp(min(values["nll"], 50.0))
        metric = "accuracy"
    elif scoring.kind == "multiple_choice":
        values = score_multiple_choice(model, tokenizer, rows, batch_size=cfg.batch_size, desc=desc)
        metric = scoring.metric
    else:
        values = score_perplexity(model, tokenizer, rows, batch_size=cfg.batch_size, max_length=max_length, desc=desc)
        metric = scoring.metric
    return DomainScore(scoring.kind, metric, values, len(rows))


def evaluate(base_path: str, adapter_dir: str, domains: list[DomainConfig], cfg: EvaluationConfig, *, dtype: str,
             max_length: int, default_curvature: int, data_dir: str, out_path: str) -> dict[str, DomainScore]:
    """Scores per domain name, also written as JSON to ``out_path``."""
    t0 = time.perf_counter()
    model, tokenizer = load_for_inference(base_path, adapter_dir, dtype)
    scores: dict[str, DomainScore] = {}
    for domain in domains:
        rows = load_domain(domain, Path(data_dir), default_curvature, eval_only=True).eval
        scores[domain.name] = score_domain(model, tokenizer, domain, rows, cfg, max_length=max_length)
    write_json_atomic(Path(out_path), {"seconds": time.perf_counter() - t0,
                                       "scores": {k: v.as_json() for k, v in scores.items()}})
    return scores
