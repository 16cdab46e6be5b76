"""The lineage flow: one Prefect flow run brings a lineage up to date with its config.

The lineage's state is its registered model in MLflow (one version per finished stage, see
flows/state.py). A run plans against it first: finished stages are skipped, an interrupted
stage restarts from its DeepSpeed checkpoint, new domains become the next stages, and a
changed finished stage is refused before anything is recorded (or forked with ``fork``).

Each task wraps exactly one ``pipelines`` function and passes paths, URIs and small result
values, never models or tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import state, timing
from flows.lock import hold, lock_paths
from flows.tracking import (MlflowRegistry, RunRef, close_orphaned_runs, end_run, is_local_store, start_run,
                            tracking_uri)
from pipelines import evaluate as evaluate_mod
from pipelines import finetune as finetune_mod
from pipelines import lineage_state as ls
from pipelines import precision as precision_mod
from pipelines import preflight
from pipelines import pretrain as pretrain_mod
from pipelines import promote as promote_mod
from pipelines import register as register_mod
from pipelines import report as report_mod
from pipelines.config import DomainConfig, LineageConfig, load_config
from pipelines.errors import BadInput, DivergenceError
from pipelines.launch import launch, uses_launcher
from pipelines.runtime import torch_threads
from pipelines.workspace import Workspace, write_json_atomic

_TASK = {"cache_policy": NO_CACHE, "persist_result": False}
Rows = list[dict[str, dict[str, Any]]]
"""``rows[i][domain]``: the scores after stage i (``DomainScore.as_json()``: score, metric, nll, ...)."""


@task(name="fingerprint-data", **_TASK)
def fingerprint_task(cfg: LineageConfig, data_dir: str) -> dict[str, str]:
    return ls.data_fingerprints(cfg.all_domains, data_dir, cfg.lalora.samples, cfg.model.pretrain.extra_data)


@task(name="plan", **_TASK)
def plan_task(keys: list[ls.StageKey], recorded: list[ls.Recorded], model: str) -> ls.Plan:
    return ls.plan(keys, recorded, model)


@task(name="fetch", **_TASK)
def fetch_task(uri: str, artifact_uri: str, dest: str) -> str:
    return state.fetch(uri, artifact_uri, Path(dest))


@task(name="fetch-precision", **_TASK)
def fetch_precision_task(uri: str, model: str, recorded: ls.Recorded, dest: str) -> str:
    return state.fetch_precision(uri, model, recorded, Path(dest))


@task(name="base-model", **_TASK)
def base_task(cfg: LineageConfig, out_dir: str, run: RunRef) -> pretrain_mod.BaseResult:
    with timing.compute(run.run_id):
        return pretrain_mod.prepare_base(cfg.model, cfg.source, cfg.deepspeed, max_length=cfg.training.max_length,
                                         seed=cfg.seed, out_dir=out_dir, tracker=run.tracker())


@task(name="init-adapter", **_TASK)
def init_adapter_task(base_path: str, cfg: LineageConfig, out_dir: str) -> str:
    return finetune_mod.init_adapter(base_path, cfg.lora, dtype=cfg.model.dtype, out_dir=out_dir)


@task(name="precision", **_TASK)
def precision_task(base_path: str, anchor: str, cfg: LineageConfig, stage: int, previous: str | None, data_dir: str,
                   out_dir: str, run: RunRef) -> precision_mod.PrecisionResult:
    kwargs = dict(base_path=base_path, anchor_adapter=anchor, cfg=cfg.lalora, curvature_domain=cfg.all_domains[stage - 1],
                  previous=previous, stage=stage, dtype=cfg.model.dtype, max_length=cfg.training.max_length,
                  seed=cfg.seed, data_dir=data_dir, out_dir=out_dir)
    with timing.compute(run.run_id):
        if uses_launcher(cfg.deepspeed):
            return launch("precision", kwargs, cfg.deepspeed, out_dir, run.tracker())
        return precision_mod.compute_precision(**kwargs, tracker=run.tracker())


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what may pass a second time (a lost node, OOM, a killed launcher), not bad input or divergence."""
    try:
        state.result()
    except (DivergenceError, BadInput):
        return False
    except Exception:
        return True
    return True


@task(name="finetune", retry_condition_fn=_transient, **_TASK)
def finetune_task(base_path: str, anchor: str, precision_dir: str | None, cfg: LineageConfig, stage: int,
                  data_dir: str, out_dir: str, checkpoint_dir: str, run: RunRef) -> finetune_mod.FinetuneResult:
    """Safe to retry: a retry continues from the stage's latest DeepSpeed checkpoint."""
    kwargs = dict(base_path=base_path, anchor_adapter=anchor, precision_dir=precision_dir, lalora=cfg.lalora,
                  domain=cfg.domains[stage - 1], training=cfg.training, ds=cfg.deepspeed, dtype=cfg.model.dtype,
                  stage=stage, data_dir=data_dir, out_dir=out_dir, checkpoint_dir=checkpoint_dir)
    with timing.compute(run.run_id):
        if uses_launcher(cfg.deepspeed):
            return launch("finetune", kwargs, cfg.deepspeed, out_dir, run.tracker())
        return finetune_mod.finetune(**kwargs, tracker=run.tracker())


@task(name="evaluate", **_TASK)
def evaluate_task(base_path: str, adapter: str, cfg: LineageConfig, domains: list[DomainConfig], out_path: str,
                  data_dir: str, run_id: str = "") -> dict[str, dict[str, Any]]:
    with timing.compute(run_id):
        scores = evaluate_mod.evaluate(base_path, adapter, domains, cfg.evaluation, dtype=cfg.model.dtype,
                                       max_length=cfg.training.max_length, default_curvature=cfg.lalora.samples,
                                       data_dir=data_dir, out_path=out_path)
    return {k: v.as_json() for k, v in scores.items()}


@task(name="gate", **_TASK)
def gate_task(domains: list[str], R: list[list[float]], higher_is_better: list[bool], cfg: LineageConfig
              ) -> promote_mod.GateResult:
    return promote_mod.gate(domains, R, cfg.promotion, higher_is_better)


@task(name="register", **_TASK)
def register_task(run: RunRef, model_name: str, cfg: LineageConfig, adapter: str, stage: int, domain: str,
                  precision_sha256: str | None, scores: dict[str, float], lineage_state: dict[str, str],
                  gate: promote_mod.GateResult) -> register_mod.RegisterResult:
    registry = MlflowRegistry(run.uri, model_name, run.run_id)
    return register_mod.register_stage(registry, model_name, adapter, stage=stage, domain=domain,
                                       precision_sha256=precision_sha256, scores=scores,
                                       alias=cfg.tracking.latest_alias, state=lineage_state, gate=gate,
                                       champion_alias=cfg.promotion.alias)


def config_hash(cfg: LineageConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json", by_alias=True), sort_keys=True).encode()).hexdigest()


def _cached(cache: Path, artifact_uri: str, name: str) -> str:
    """Local copy of a recorded artifact, keyed by its URI (records never change once written)."""
    return str(cache / f"{hashlib.sha256(artifact_uri.encode()).hexdigest()[:16]}-{name}")


def _refusal(uri: str, cfg: LineageConfig, conflict: ls.LineageConflict, cache: Path) -> ls.LineageConflict:
    """The conflict as one actionable line, naming the changed settings when the record has them."""
    detail = ""
    rec = conflict.recorded
    if rec is not None and rec.uri("config") and "config" in str(conflict):
        try:
            old = state.fetch_json(uri, rec.uri("config"), Path(_cached(cache, rec.uri("config"), "stage_config.json")))
            detail = " (" + "; ".join(ls.config_diff(old, ls.stage_config(cfg, conflict.stage))) + ")"
        except Exception:  # the diff is a courtesy; the refusal stands without it
            detail = ""
    return ls.LineageConflict(f"{conflict}{detail}; nothing was run or recorded. Restore the config, or start a new "
                              f"lineage from stage {conflict.stage} with --fork NAME", conflict.stage, rec)


@flow(name="lalora-lineage")
def lineage_flow(config_path: str, out_dir: str, overrides: list[str] | None = None,
                 fork: str | None = None) -> dict[str, Any]:
    """Bring the lineage up to date with the config; return the contents of metrics.json.

    Holds the lineage lock (waiting for another run of it; `lalora run` takes it first and refuses
    instead unless --wait), so a scheduled run and a manual one never write the same lineage at once.
    """
    cfg = load_config(config_path, overrides)
    preflight.check(cfg)  # a missing model or data file, LoRA targets matching nothing: before anything is recorded
    with hold(lineage_locks(cfg, out_dir), wait=True), torch_threads(cfg.runtime.threads):
        return _lineage(cfg, out_dir, fork)


def lineage_locks(cfg: LineageConfig, out_dir: str | Path) -> list[Path]:
    """The locks a run of this lineage holds: its output directory's, and the shared registry's."""
    return lock_paths(Path(out_dir).resolve(), cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                      cfg.tracking.registered_model)


def _lineage(cfg: LineageConfig, out_dir: str, fork: str | None) -> dict[str, Any]:
    shared = Workspace(Path(out_dir).resolve())  # data, base model, local MLflow store
    shared.root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(shared.root / "forks" / fork) if fork else shared  # this lineage's stages and report
    uri = tracking_uri(cfg.tracking.mlflow_uri, shared.root)
    artifacts = shared.root / "mlartifacts" if is_local_store(uri) else None
    model = fork or cfg.tracking.registered_model
    cache = shared.root / "registry"

    close_orphaned_runs(uri, cfg.tracking.experiment, "lalora.lineage", model)  # runs a killed process left RUNNING
    # 1. where the lineage stands: data fingerprints against the registered versions
    fingerprints = fingerprint_task(cfg, str(shared.data))
    keys = ls.stage_keys(cfg, fingerprints)
    recorded = state.recorded_stages(uri, model)
    if fork and fork != cfg.tracking.registered_model and not state.model_exists(uri, fork):
        source = state.recorded_stages(uri, cfg.tracking.registered_model)
        recorded = state.fork(uri, cfg.tracking.registered_model, fork,
                              ls.fork_point(keys, source, cfg.tracking.registered_model))
    try:
        plan = plan_task(keys, recorded, model)
    except ls.LineageConflict as conflict:
        raise _refusal(uri, cfg, conflict, cache) from None
    domains = [d.name for d in cfg.eval_domains]  # R's columns: the source, the stages' domains, the probes
    probes = [d.name for d in cfg.probes]
    versions = [r.version for r in plan.done]
    if not plan.todo:  # 2. nothing new: report what is recorded, record nothing (unless a new probe needs scores)
        rows = state.fetch_json(uri, plan.done[-1].uri("rows"), Path(_cached(cache, plan.done[-1].uri("rows"), "rows.json")))
        if all(d in row for row in rows for d in domains):
            aliases = state.reconcile_aliases(uri, model, cfg.tracking.latest_alias, cfg.promotion.alias)
            return _finish(cfg, ws, model, domains, rows, versions, uri, None, plan, {}, aliases, [])

    parent = start_run(uri, cfg.tracking.experiment, artifacts, cfg.name,
                       tags={"lalora.lineage": model, "lalora.config_sha256": config_hash(cfg),
                             "lalora.resume_from": str(plan.resume_from)})
    parent.tracker().log_params(cfg.model_dump(mode="json", by_alias=True))
    stage: RunRef | None = None
    try:
        # 3. the base model: the recorded one, else prepared (the tiny one pretrained) and recorded
        last = plan.done[-1] if plan.done else None
        recipe_file = shared.base / "lalora_base.json"
        if cfg.model.path:
            base_path, base_uri, recipe = cfg.model.path, cfg.model.path, ""
        elif last and (not recipe_file.is_file()
                       or json.loads(recipe_file.read_text()).get("recipe_sha256") != last.tags.get("lalora.base_recipe")):
            base_path = fetch_task(uri, last.uri("base"), _cached(cache, last.uri("base"), "base"))
            base_uri, recipe = last.uri("base"), last.tags["lalora.base_recipe"]
        else:
            base_path = base_task(cfg, str(shared.root), parent).path
            recipe = json.loads(recipe_file.read_text())["recipe_sha256"]
            if last and last.uri("base"):
                base_uri = last.uri("base")
            else:
                parent.tracker().log_artifact(base_path, "base")
                base_uri = f"runs:/{parent.run_id}/base"

        # 4. the anchor, precision and R rows where the lineage stands (or the LoRA initialisation, row 0)
        init = None
        if last:
            anchor = fetch_task(uri, last.uri("adapter"), _cached(cache, last.uri("adapter"), "adapter"))
            precision_path = (fetch_precision_task(uri, model, last, _cached(cache, last.uri("precision"), "precision"))
                              if last.uri("precision") else None)
            rows: Rows = state.fetch_json(uri, last.uri("rows"), Path(_cached(cache, last.uri("rows"), "rows.json")))
        else:
            anchor = init = init_adapter_task(base_path, cfg, str(ws.init_adapter))
            precision_path = None
            rows = [evaluate_task(base_path, anchor, cfg, cfg.eval_domains, str(ws.init_adapter.parent / "eval.json"),
                                  str(shared.data))]
        # 5. domains (or probes) appended since a row was scored: score that row's adapter on them once
        for i, row in enumerate(rows):
            missing = [d for d in cfg.eval_domains if d.name not in row]
            if missing:
                if i == 0:
                    adapter_i = init or init_adapter_task(base_path, cfg, str(ws.init_adapter))
                else:
                    rec = plan.done[i - 1]
                    adapter_i = fetch_task(uri, rec.uri("adapter"), _cached(cache, rec.uri("adapter"), "adapter"))
                row |= evaluate_task(base_path, adapter_i, cfg, missing, str(ws.root / "fill" / f"row{i}.json"),
                                     str(shared.data))

        promotion: dict[str, dict[str, Any]] = {}
        stage_times = []
        for key in plan.todo:
            t, domain = key.stage, cfg.domains[key.stage - 1]
            t0 = time.perf_counter()
            stage_dir = ws.stage(t, domain.name)
            stage = start_run(uri, cfg.tracking.experiment, artifacts, f"stage {t}: {domain.name}",
                              parent=parent.run_id, tags={"lalora.stage": str(t), "lalora.domain": domain.name,
                                                          "lalora.lineage": model,
                                                          "lalora.stage_config_sha256": key.config_sha256})
            # 6. precision at the anchor on the previous domain, accumulated (skipped for plain LoRA)
            precision = None
            if cfg.lalora.lam > 0:
                precision = precision_task(base_path, anchor, cfg, t, precision_path, str(shared.data),
                                           str(stage_dir), stage)
                precision_path = precision.path
            # 7. fine-tune on the new domain with the penalty, inside DeepSpeed (resumes an interrupted run)
            ckpt = stage_dir / "checkpoints" / f"{key.config_sha256[:16]}-{key.data_sha256[:16]}"
            tuned = finetune_task.with_options(retries=cfg.orchestration.finetune_retries,
                                               retry_delay_seconds=cfg.orchestration.retry_delay_seconds)(
                base_path, anchor, precision_path, cfg, t, str(shared.data), str(stage_dir), str(ckpt), stage)
            # 8. score every domain and probe; the gate reads R (each domain's own score) up to this stage
            scores = evaluate_task(base_path, tuned.adapter, cfg, cfg.eval_domains, str(stage_dir / "eval.json"),
                                   str(shared.data), stage.run_id)
            rows.append(scores)
            stage.tracker().log_metrics({f"eval/{d}/{k}": v for d, s in scores.items() for k, v in s.items()
                                         if isinstance(v, float)})
            gated = [*domains[: t + 1], *probes]
            R = [[float(row[d]["score"]) for d in gated] for row in rows]
            verdict = gate_task(gated, R, [bool(rows[0][d]["higher_is_better"]) for d in gated], cfg)
            # 9. the lineage state travels with the version: R so far, stage config, artifact URIs
            write_json_atomic(stage_dir / "lineage" / "rows.json", rows)
            write_json_atomic(stage_dir / "lineage" / "stage_config.json", ls.stage_config(cfg, t))
            stage.tracker().log_artifact(stage_dir / "lineage", "lineage")
            lineage_state = {
                "lalora.lineage": model, "lalora.stage_config_sha256": key.config_sha256,
                "lalora.data_sha256": key.data_sha256, "lalora.adapter_uri": f"runs:/{stage.run_id}/adapter",
                "lalora.precision_uri": f"runs:/{stage.run_id}/curvature" if precision else "",
                "lalora.rows_uri": f"runs:/{stage.run_id}/lineage/rows.json",
                "lalora.config_uri": f"runs:/{stage.run_id}/lineage/stage_config.json",
                "lalora.base_uri": base_uri, "lalora.base_recipe": recipe}
            reg = register_task(stage, model, cfg, tuned.adapter, t, domain.name,
                                precision.sha256 if precision else None,
                                {d: s["score"] for d, s in scores.items()}, lineage_state, verdict)
            versions.append(reg.version)
            promotion[reg.version] = {"stage": t, "promoted": reg.promoted, "reason": reg.reason}
            shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # the version holds the result now
            wall = time.perf_counter() - t0
            work = timing.compute_seconds(stage.run_id)
            stage.tracker().log_metrics({"stage/wall_seconds": wall, "stage/compute_seconds": work,
                                         "stage/overhead_seconds": wall - work})
            stage_times.append({"stage": t, "wall_seconds": wall, "compute_seconds": work,
                                "overhead_seconds": wall - work})
            end_run(stage)
            stage = None
            anchor = tuned.adapter
        aliases = state.reconcile_aliases(uri, model, cfg.tracking.latest_alias, cfg.promotion.alias)
        result = _finish(cfg, ws, model, domains, rows, versions, uri, parent, plan, promotion, aliases, stage_times)
        end_run(parent)
        return result
    except BaseException:
        if stage is not None:
            end_run(stage, "FAILED")
        end_run(parent, "FAILED")
        raise


def _finish(cfg: LineageConfig, ws: Workspace, model: str, domains: list[str], rows: Rows, versions: list[str],
            uri: str, parent: RunRef | None, plan: ls.Plan, promotion: dict[str, dict[str, Any]],
            aliases: dict[str, str], stage_times: list[dict[str, float]]) -> dict[str, Any]:
    """10. the report: R per score, continual-learning metrics, plots; logged on the run when there is one."""
    rows = [{d: row[d] for d in domains} for row in rows]  # columns of domains the config no longer lists drop out
    report = report_mod.build_report(domains, rows)
    result = report.as_json(model, versions, {
        "mlflow_uri": uri, "run_id": parent.run_id if parent else None, "lambda": cfg.lalora.lam,
        "curvature": cfg.lalora.curvature.kind, "config_sha256": config_hash(cfg),
        "stages_skipped": [r.stage for r in plan.done], "stages_run": [k.stage for k in plan.todo],
        "promotion": promotion, "aliases": aliases, "timing": stage_times})
    ws.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ws.root / "metrics.json", result)
    plots = report_mod.write_plots(report, ws.root, f"{cfg.name}: lambda = {cfg.lalora.lam:g}")
    if parent is not None:
        tracker = parent.tracker()
        tracker.log_metrics(report.flat_metrics())
        for i, row_metrics in enumerate(report.stage_metrics()):
            tracker.log_metrics(row_metrics, step=i)
        tracker.log_artifact(ws.root / "metrics.json")
        for plot in plots:
            tracker.log_artifact(plot)
    return result
