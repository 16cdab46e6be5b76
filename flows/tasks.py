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
from flows.registry import LineageRegistry
from flows.runs import RunRef
from pipelines.config import DomainConfig, LineageConfig
from pipelines.lineage import plan
from pipelines.lineage.record import VersionRecord
from pipelines.runtime.launch import is_transient
from pipelines.scoring.scores import Row
from pipelines.stages import evaluate, finetune, gate, pretrain
from pipelines.stages.steps import Step, run_step
from pipelines.tracker import NullTracker, Tracker
from pipelines.workspace import StepPaths


class _TaskOptions(TypedDict):
    cache_policy: CachePolicy
    persist_result: bool


_TASK: _TaskOptions = {"cache_policy": NO_CACHE, "persist_result": False}
T = TypeVar("T")


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
    return plan.data_fingerprints(cfg.all_domains, data_dir, cfg.lalora.samples, cfg.model.pretrain.extra_data, replay)


@task(name="plan", **_TASK)
def plan_task(keys: list[plan.StageKey], recorded: list[plan.Recorded], model: str) -> plan.Plan:
    return plan.plan(keys, recorded, model)


@task(name="fetch", **_TASK)
def fetch_task(registry: LineageRegistry, artifact_uri: str, name: str) -> str:
    return registry.fetch(artifact_uri, name)


@task(name="fetch-precision", **_TASK)
def fetch_precision_task(registry: LineageRegistry, recorded: plan.Recorded) -> str:
    return registry.fetch_precision(recorded)


@task(name="base-model", **_TASK)
def base_task(cfg: LineageConfig, out_dir: str, run: RunRef) -> Timed[pretrain.BaseResult]:
    return _timed(run, lambda tracker: pretrain.prepare_base(pretrain.BaseInputs.from_config(cfg, out_dir), tracker))


@task(name="init-adapter", **_TASK)
def init_adapter_task(base_path: str, cfg: LineageConfig, out_dir: str) -> str:
    return finetune.init_adapter(base_path, cfg.lora, dtype=cfg.model.dtype, out_dir=out_dir)


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


@task(name="step", retry_condition_fn=_transient, **_TASK)
def _step_task(step: Step[Any, Any], cfg: LineageConfig, stage: int, paths: StepPaths, run: RunRef) -> Timed[Any]:
    _attempt(run, step.name)
    return _timed(run, lambda tracker: run_step(step, cfg, stage, paths, tracker))


def step_task(step: Step[Any, T], cfg: LineageConfig, stage: int, paths: StepPaths, run: RunRef, *,
              retries: int = 0, retry_delay_seconds: float = 0.0) -> Timed[T]:
    """A stage's step (``pipelines.stages.steps``: the precision, the fine-tune) as the one Prefect task, named
    after the step and retried after a transient failure only. Safe to retry either: the precision is
    recomputed from the same anchor, data and previous precision; a fine-tune continues from the stage's latest
    DeepSpeed checkpoint."""
    task_run = _step_task.with_options(name=step.name, retries=retries, retry_delay_seconds=retry_delay_seconds)
    result: Timed[T] = task_run(step, cfg, stage, paths, run)
    return result


@task(name="evaluate", **_TASK)
def evaluate_task(base_path: str, adapter: str, cfg: LineageConfig, domains: list[DomainConfig], out_path: str,
                  data_dir: str, split: Literal["eval", "val"] = "eval") -> Timed[Row]:
    """Scores of the evaluation rows (R), or of the validation rows (lambda auto's trials)."""
    return _timed(None, lambda _: evaluate.evaluate(evaluate.EvaluateInputs.from_config(
        cfg, base=base_path, adapter=adapter, domains=domains, data_dir=data_dir, out_path=out_path, split=split)))


@task(name="gate", **_TASK)
def gate_task(domains: list[str], R: list[list[float]], higher_is_better: list[bool], cfg: LineageConfig
              ) -> gate.GateResult:
    return gate.gate(domains, R, cfg.promotion, higher_is_better)


@task(name="package", **_TASK)
def package_task(adapter: str, base: BaseReference, cfg: LineageConfig, example: str, dest: str) -> str:
    """The version's python_function model: the adapter, the base referenced."""
    return str(generator.save(Path(dest), adapter, base, dtype=cfg.model.dtype,
                              max_new_tokens=cfg.evaluation.max_new_tokens, stop=[],
                              batch_size=cfg.evaluation.batch_size, example=example))


@task(name="register", **_TASK)
def register_task(registry: LineageRegistry, run: RunRef, model_dir: str, record: VersionRecord, description: str,
                  aliases: list[str], lease: Any) -> str:
    lease.check()  # still this lineage's writer: a run whose lease expired registers nothing
    return registry.register(run, Path(model_dir), record, description, aliases)
