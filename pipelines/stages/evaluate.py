"""Stage step 8: score the adapter on every domain and probe, each with its own scorer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pipelines.config import DomainConfig, EvaluationConfig
from pipelines.data.sources import load_domain
from pipelines.runtime.models import load_for_inference
from pipelines.scoring.inference import merge_in_place
from pipelines.scoring.scores import DomainScore, score_domain
from pipelines.workspace import write_json_atomic


def evaluate(base_path: str, adapter_dir: str, domains: list[DomainConfig], cfg: EvaluationConfig, *, dtype: str,
             max_length: int, default_curvature: int, data_dir: str, out_path: str,
             split: Literal["eval", "val"] = "eval") -> dict[str, DomainScore]:
    """Scores per domain name, also written as JSON to ``out_path``: of the evaluation rows (R), or of the
    validation rows (``split="val"``: what lambda auto's trials are scored on)."""
    t0 = time.perf_counter()
    model, tokenizer = load_for_inference(base_path, adapter_dir, dtype)
    model = merge_in_place(model)  # the scorers would merge a copy; the stage owns this model, so no copy
    scores: dict[str, DomainScore] = {}
    for domain in domains:
        if domain.score.kind == "lm_eval" and split == "eval":  # lm-eval reads its own task data
            scores[domain.name] = score_domain(model, tokenizer, domain, [], cfg, max_length=max_length)
            continue
        splits = load_domain(domain, Path(data_dir), default_curvature, eval_only=True)
        rows = splits.eval if split == "eval" else splits.val
        if not rows:
            raise ValueError(f"domain {domain.name} has no {split} rows to score")
        scores[domain.name] = score_domain(model, tokenizer, domain, rows, cfg, max_length=max_length)
    write_json_atomic(Path(out_path), {"seconds": time.perf_counter() - t0,
                                       "scores": {k: v.as_json() for k, v in scores.items()}})
    return scores
