"""The lineage flow's Prefect tasks: each wraps exactly one pipelines (or registry) function and passes
paths, URIs and small typed results, never models or tensors.

A task that does a stage's work returns it ``Timed``: the seconds of the pipelines call less the
MLflow calls made from inside it, so a stage's overhead (Prefect, MLflow runs, logging, the
registry) is its wall time less the sum of its tasks' work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypedDict, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy

from flows import generator
from flows.generator import BaseReference
from flows.lease import StoreLease
from flows.registry import LineageRegistry
from flows.runs import RunRef
from pipelines.config import DomainConfig, LineageConfig
from pipelines.lineage import plan
from pipelines.lineage.record import VersionRecord
from pipelines.runtime.launch import is_transient
from pipelines.scoring.scores import Row
from pipelines.stages.evaluate import EvaluateInputs
from pipelines.stages.finetune import InitInputs
from pipelines.stages.steps import EVALUATE, INIT, Stage
from pipelines.tracker import NullTracker, Tracker


class _TaskOptions(TypedDict):
    cache_policy: CachePolicy
    persist_result: bool


_TASK: _TaskOptions = {"cache_policy": NO_CACHE, "persist_result": False}
T = TypeVar("T")
In = TypeVar("In")


@dataclass(frozen=True)
class Timed(Generic[T]):
    value: T
    compute_seconds: float


def _timed(run: RunRef | None, call: Callable[[Tracker], T]) -> Timed[T]:
    tracker: Any = run.tracker() if run is not None else NullTracker()
    t0 = time.perf_counter()
    value = call(tracker)
    return Timed(value, time.perf_counter() - t0 - getattr(tracker, "seconds", 0.0))


@task(name="fingerprint-data", **_TASK)
def fingerprint_task(cfg: LineageConfig, data_dir: str) -> dict[str, str]:
    replay = cfg.training.replay.data if cfg.training.replay.enabled else []
    return plan.data_fingerprints(cfg.all_domains, data_dir, cfg.model.pretrain.extra_data, replay)


@task(name="plan", **_TASK)
def plan_task(keys: list[plan.StageKey], recorded: list[plan.Recorded], model: str) -> plan.Plan:
    return plan.plan(keys, recorded, model)


@task(name="fetch", **_TASK)
def fetch_task(registry: LineageRegistry, artifact_uri: str, name: str) -> str:
    return registry.fetch(artifact_uri, name)


@task(name="fetch-precision", **_TASK)
def fetch_precision_task(registry: LineageRegistry, recorded: plan.Recorded) -> str:
    return registry.fetch_precision(recorded)


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what may pass a second time (``pipelines.runtime.launch.is_transient``: a launched rank
    killed by a signal, a rendezvous port taken); a step's own exception fails the same way again."""
    try:
        state.result()
    except Exception as e:
        return is_transient(e)
    return False


def _attempt(run: RunRef, step: str) -> None:
    """Record which attempt of the step this is (1 the first; a retry after a transient failure counts on)."""
    from prefect.runtime import task_run

    attempt = int(task_run.run_count or 1)
    run.tracker().log_metrics({f"launch/{step}_attempt": float(attempt)})
    if attempt > 1:
        get_run_logger().warning("%s: attempt %d after a transient failure", step, attempt)


@task(name="stage", retry_condition_fn=_transient, **_TASK)
def _stage_task(stage: Stage[Any, Any], inputs: Any, run: RunRef | None) -> Timed[Any]:
    if stage.launched and run is not None:
        _attempt(run, stage.name)
    return _timed(run, lambda tracker: stage.run(inputs, tracker))


def stage_task(
    stage: Stage[In, T], inputs: In, run: RunRef | None = None, *, retries: int = 0, retry_delay_seconds: float = 0.0
) -> Timed[T]:
    """Any stage (``pipelines.stages.steps``: the base, the LoRA initialisation, the precision, the fine-tune, the
    evaluation, the gate) as the one Prefect task, named after the stage, reporting to ``run`` (none: nothing
    logged). ``retries`` apply to a launched stage's transient failures only: the precision is recomputed from the
    same anchor, data and previous precision; a fine-tune continues from the stage's latest DeepSpeed checkpoint."""
    task_run = _stage_task.with_options(
        name=stage.name, retries=retries if stage.launched else 0, retry_delay_seconds=retry_delay_seconds
    )
    result: Timed[T] = task_run(stage, inputs, run)
    return result


def scores(
    cfg: LineageConfig,
    base_path: str,
    adapter: str,
    domains: list[DomainConfig],
    out_path: str,
    data_dir: str,
    split: Literal["eval", "val"] = "eval",
) -> Timed[Row]:
    """The evaluation stage: the adapter's scores of the evaluation rows (R), or of the validation rows (lambda
    auto's trials)."""
    return stage_task(
        EVALUATE,
        EvaluateInputs.from_config(
            cfg, base=base_path, adapter=adapter, domains=domains, data_dir=data_dir, out_path=out_path, split=split
        ),
    )


def initial_adapter(cfg: LineageConfig, base_path: str, out_dir: str) -> str:
    """The LoRA initialisation stage: the first stage's anchor, row 0 of R."""
    return stage_task(INIT, InitInputs.from_config(cfg, base=base_path, out_dir=out_dir)).value.adapter


@task(name="package", **_TASK)
def package_task(adapter: str, base: BaseReference, cfg: LineageConfig, example: str, dest: str) -> str:
    """The version's python_function model: the adapter, the base referenced."""
    return str(
        generator.save(
            Path(dest),
            adapter,
            base,
            dtype=cfg.model.dtype,
            max_new_tokens=cfg.evaluation.max_new_tokens,
            stop=[],
            batch_size=cfg.evaluation.batch_size,
            example=example,
        )
    )


@task(name="register", **_TASK)
def register_task(
    registry: LineageRegistry,
    run: RunRef,
    model_dir: str,
    record: VersionRecord,
    description: str,
    aliases: list[str],
    lease: StoreLease,
) -> str:
    lease.check()  # still this lineage's writer: a run whose lease expired registers nothing
    return registry.register(run, Path(model_dir), record, description, aliases)
