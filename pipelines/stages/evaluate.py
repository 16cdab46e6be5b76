"""Stage step 8: score the adapter on every domain and probe, each with its own scorer."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipelines.config import DomainConfig, EvaluationConfig, LineageConfig
from pipelines.data.sources import load_domain
from pipelines.runtime.models import load_for_inference
from pipelines.scoring.inference import merge_in_place
from pipelines.scoring.scores import DomainScore, score_domain
from pipelines.tracker import Tracker
from pipelines.workspace import write_json_atomic


@dataclass(frozen=True, kw_only=True)
class EvaluateInputs:
    """What the evaluation reads; ``from_config`` is the one mapping from a lineage's config to it."""

    base: str
    adapter: str
    domains: tuple[DomainConfig, ...]
    evaluation: EvaluationConfig
    dtype: str
    max_length: int
    data_dir: str
    out_path: str
    split: Literal["eval", "val"] = "eval"
    """the evaluation rows (R), or the validation rows (what lambda auto's trials are scored on)"""

    @classmethod
    def from_config(
        cls,
        cfg: LineageConfig,
        *,
        base: str,
        adapter: str,
        domains: Sequence[DomainConfig],
        data_dir: str,
        out_path: str,
        split: Literal["eval", "val"] = "eval",
    ) -> EvaluateInputs:
        return cls(
            base=base,
            adapter=adapter,
            domains=tuple(domains),
            evaluation=cfg.evaluation,
            dtype=cfg.model.dtype,
            max_length=cfg.training.max_length,
            data_dir=data_dir,
            out_path=out_path,
            split=split,
        )


def evaluate(inputs: EvaluateInputs, tracker: Tracker | None = None) -> dict[str, DomainScore]:
    """Scores per domain name, also written as JSON to ``out_path``."""
    t0 = time.perf_counter()
    cfg, split, max_length = inputs.evaluation, inputs.split, inputs.max_length
    model, tokenizer = load_for_inference(inputs.base, inputs.adapter, inputs.dtype)
    model = merge_in_place(model)  # the scorers would merge a copy; the stage owns this model, so no copy
    scores: dict[str, DomainScore] = {}
    for domain in inputs.domains:
        if domain.score.kind == "lm_eval" and split == "eval":  # lm-eval reads its own task data
            scores[domain.name] = score_domain(model, tokenizer, domain, [], cfg, max_length=max_length)
            continue
        splits = load_domain(domain, Path(inputs.data_dir), eval_only=True)
        rows = splits.eval if split == "eval" else splits.val
        if not rows:
            raise ValueError(f"domain {domain.name} has no {split} rows to score")
        scores[domain.name] = score_domain(model, tokenizer, domain, rows, cfg, max_length=max_length)
    write_json_atomic(
        Path(inputs.out_path),
        {"seconds": time.perf_counter() - t0, "scores": {k: v.as_json() for k, v in scores.items()}},
    )
    return scores
