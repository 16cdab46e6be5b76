"""The steps of a stage that may run on several ranks (curvature, fine-tune): one table, one way to run them.

Each step is its stage's typed inputs (``from_config``: the one mapping from the lineage's config), its
function and its typed result. ``run_step`` runs a step in this process, or with ``deepspeed.world_size``
above 1 (or a hostfile) through the deepspeed launcher (``pipelines.runtime.launch``): the job holds the
lineage config as its JSON dump, the stage and the paths; every rank (``python -m pipelines.stages.steps
JOB``) validates the config again with the schema and runs the same step (data parallel: each takes its share
of every batch); rank 0 writes the outputs and the result.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pipelines.config import LineageConfig
from pipelines.runtime.launch import launch, rank_main, uses_launcher
from pipelines.stages.curvature import PrecisionInputs, PrecisionResult, compute_precision
from pipelines.stages.finetune import FinetuneInputs, FinetuneResult, finetune
from pipelines.tracker import Tracker
from pipelines.workspace import StepPaths

MODULE = "pipelines.stages.steps"
In = TypeVar("In")
R = TypeVar("R")


@dataclass(frozen=True)
class Step(Generic[In, R]):
    """A stage's step: its name, the mapping from the lineage's config to its inputs, its function, its result."""

    name: str
    inputs: Callable[[LineageConfig, int, StepPaths], In]
    run: Callable[[In, Tracker], R]
    result: type[R]


PRECISION = Step("precision", PrecisionInputs.from_config, compute_precision, PrecisionResult)
FINETUNE = Step("finetune", FinetuneInputs.from_config, finetune, FinetuneResult)
STEPS: dict[str, Step[Any, Any]] = {step.name: step for step in (PRECISION, FINETUNE)}


def run_step(step: Step[In, R], cfg: LineageConfig, stage: int, paths: StepPaths, tracker: Tracker) -> R:
    """Run ``step`` of ``stage``; its result."""
    if not uses_launcher(cfg.deepspeed):
        return step.run(step.inputs(cfg, stage, paths), tracker)
    job = {"step": step.name, "stage": stage, "paths": dataclasses.asdict(paths), "config": cfg.as_json()}
    work = Path(paths.out) / f"launch-{step.name}"
    return step.result(**launch(step.name, job, cfg.deepspeed, work, tracker, MODULE))


def _rank(job: dict[str, Any], tracker: Tracker) -> Any:
    chosen = STEPS[job["step"]]
    cfg = LineageConfig.model_validate(job["config"])
    return chosen.run(chosen.inputs(cfg, job["stage"], StepPaths(**job["paths"])), tracker)


if __name__ == "__main__":
    rank_main(sys.argv[1], _rank)
