"""Every stage of a lineage in one table, each with one shape: a name and a function from its typed inputs to its
typed result, ``run(inputs, tracker)``. Each stage's inputs have ``from_config``, the one mapping from the lineage's
config; its result is a frozen, keyword-only dataclass. ``flows.tasks.stage_task`` wraps every stage the same way.

Two stages may run on several ranks (the precision, the fine-tune): their inputs are a ``Job`` (the lineage's
config, the stage, its paths). In this process, or with ``deepspeed.world_size`` above 1 (or a hostfile) through
the deepspeed launcher (``pipelines.runtime.launch``): the job travels as the config's JSON dump, the stage and the
paths; every rank (``python -m pipelines.stages.steps JOB``) validates the config again with the schema, maps it to
the step's inputs and runs the same step (data parallel: each takes its share of every batch); rank 0 writes the
outputs and the result.
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
from pipelines.stages.evaluate import evaluate
from pipelines.stages.finetune import FinetuneInputs, FinetuneResult, finetune, initialise
from pipelines.stages.gate import decide
from pipelines.stages.pretrain import prepare_base
from pipelines.tracker import Tracker
from pipelines.workspace import StepPaths

MODULE = "pipelines.stages.steps"
In = TypeVar("In")
R = TypeVar("R")


@dataclass(frozen=True)
class Stage(Generic[In, R]):
    """A stage: its name (its Prefect task's) and its function from its typed inputs to its typed result."""

    name: str
    run: Callable[[In, Tracker], R]
    launched: bool = False
    """Runs on the ranks ``deepspeed`` asks for: a rank killed by a signal is a transient failure, worth a retry."""


@dataclass(frozen=True, kw_only=True)
class Job:
    """A launched stage's inputs: the lineage's config, the stage, its paths (each rank maps them to the step's)."""

    cfg: LineageConfig
    stage: int
    paths: StepPaths


@dataclass(frozen=True)
class _Step(Generic[In, R]):
    """A stage that may run on several ranks: the mapping from the config to its inputs, its function, its result."""

    name: str
    inputs: Callable[[LineageConfig, int, StepPaths], In]
    body: Callable[[In, Tracker], R]
    result: type[R]

    def __call__(self, job: Job, tracker: Tracker) -> R:
        cfg = job.cfg
        if not uses_launcher(cfg.deepspeed):
            return self.body(self.inputs(cfg, job.stage, job.paths), tracker)
        payload = {
            "step": self.name,
            "stage": job.stage,
            "paths": dataclasses.asdict(job.paths),
            "config": cfg.as_json(),
        }
        work = Path(job.paths.out) / f"launch-{self.name}"
        return self.result(**launch(self.name, payload, cfg.deepspeed, work, tracker, MODULE))


_LAUNCHED: dict[str, _Step[Any, Any]] = {
    step.name: step
    for step in (
        _Step("precision", PrecisionInputs.from_config, compute_precision, PrecisionResult),
        _Step("finetune", FinetuneInputs.from_config, finetune, FinetuneResult),
    )
}

PRETRAIN = Stage("base-model", prepare_base)
INIT = Stage("init-adapter", initialise)
PRECISION: Stage[Job, PrecisionResult] = Stage("precision", _LAUNCHED["precision"], launched=True)
FINETUNE: Stage[Job, FinetuneResult] = Stage("finetune", _LAUNCHED["finetune"], launched=True)
EVALUATE = Stage("evaluate", evaluate)
GATE = Stage("gate", decide)
STAGES: dict[str, Stage[Any, Any]] = {s.name: s for s in (PRETRAIN, INIT, PRECISION, FINETUNE, EVALUATE, GATE)}
STEPS: dict[str, Stage[Job, Any]] = {s.name: s for s in STAGES.values() if s.launched}


def run_step(step: Stage[Job, R], cfg: LineageConfig, stage: int, paths: StepPaths, tracker: Tracker) -> R:
    """Run the launched ``step`` of ``stage`` (in this process, or on the ranks the config asks for); its result."""
    return step.run(Job(cfg=cfg, stage=stage, paths=paths), tracker)


def _rank(job: dict[str, Any], tracker: Tracker) -> Any:
    chosen = _LAUNCHED[job["step"]]
    cfg = LineageConfig.model_validate(job["config"])
    return chosen.body(chosen.inputs(cfg, job["stage"], StepPaths(**job["paths"])), tracker)


if __name__ == "__main__":
    rank_main(sys.argv[1], _rank)
