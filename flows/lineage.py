"""The lineage flow: one Prefect flow run adapts the model through every domain of a config.

Each task wraps exactly one ``pipelines`` function and passes paths, URIs and small result
values, never models or tensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.tracking import MlflowRegistry, RunRef, default_tracking_uri, end_run, start_run
from pipelines import evaluate as evaluate_mod
from pipelines import finetune as finetune_mod
from pipelines import precision as precision_mod
from pipelines import pretrain as pretrain_mod
from pipelines import register as register_mod
from pipelines import report as report_mod
from pipelines.config import LineageConfig, load_config
from pipelines.workspace import Workspace, write_json_atomic

_TASK = {"cache_policy": NO_CACHE, "persist_result": False}


@task(name="base-model", **_TASK)
def base_task(cfg: LineageConfig, out_dir: str, run: RunRef) -> pretrain_mod.BaseResult:
    return pretrain_mod.prepare_base(cfg.model, cfg.source, cfg.deepspeed, max_length=cfg.training.max_length,
                                     seed=cfg.seed, out_dir=out_dir, tracker=run.tracker())


@task(name="init-adapter", **_TASK)
def init_adapter_task(base_path: str, cfg: LineageConfig, out_dir: str) -> str:
    return finetune_mod.init_adapter(base_path, cfg.lora, dtype=cfg.model.dtype, out_dir=out_dir)


@task(name="precision", **_TASK)
def precision_task(base_path: str, anchor: str, cfg: LineageConfig, stage: int, previous: str | None, data_dir: str,
                   out_dir: str, run: RunRef) -> precision_mod.PrecisionResult:
    return precision_mod.compute_precision(
        base_path, anchor, cfg.lalora, cfg.all_domains[stage - 1], previous=previous, stage=stage,
        dtype=cfg.model.dtype, max_length=cfg.training.max_length, seed=cfg.seed, data_dir=data_dir,
        out_dir=out_dir, tracker=run.tracker())


@task(name="finetune", **_TASK)
def finetune_task(base_path: str, anchor: str, precision_dir: str | None, cfg: LineageConfig, stage: int,
                  data_dir: str, out_dir: str, run: RunRef) -> finetune_mod.FinetuneResult:
    return finetune_mod.finetune(base_path, anchor, precision_dir, cfg.lalora, cfg.domains[stage - 1], cfg.training,
                                 cfg.deepspeed, dtype=cfg.model.dtype, stage=stage, data_dir=data_dir,
                                 out_dir=out_dir, tracker=run.tracker())


@task(name="evaluate", **_TASK)
def evaluate_task(base_path: str, adapter: str, cfg: LineageConfig, out_path: str, data_dir: str
                  ) -> dict[str, dict[str, Any]]:
    scores = evaluate_mod.evaluate(base_path, adapter, cfg.eval_domains, cfg.evaluation, dtype=cfg.model.dtype,
                                   max_length=cfg.training.max_length, default_curvature=cfg.lalora.samples,
                                   data_dir=data_dir, out_path=out_path)
    return {k: v.as_json() for k, v in scores.items()}


@task(name="register", **_TASK)
def register_task(run: RunRef, model_name: str, alias: str, adapter: str, stage: int, domain: str,
                  precision_sha256: str | None, scores: dict[str, float]) -> register_mod.RegisterResult:
    registry = MlflowRegistry(run.uri, model_name, run.run_id)
    return register_mod.register_stage(registry, model_name, adapter, stage=stage, domain=domain,
                                       precision_sha256=precision_sha256, scores=scores, alias=alias)


def config_hash(cfg: LineageConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json", by_alias=True), sort_keys=True).encode()).hexdigest()


@flow(name="lalora-lineage")
def lineage_flow(config_path: str, out_dir: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Adapt the base model through every domain of the config; return the contents of metrics.json."""
    cfg = load_config(config_path, overrides)
    ws = Workspace(Path(out_dir).resolve())
    ws.root.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking.mlflow_uri or default_tracking_uri(ws.root)
    digest = config_hash(cfg)
    parent = start_run(uri, cfg.tracking.experiment, ws.root / "mlartifacts", cfg.name,
                       tags={"lalora.lineage": cfg.name, "lalora.config_sha256": digest})
    tracker = parent.tracker()
    tracker.log_params(cfg.model_dump(mode="json", by_alias=True))
    domains = [d.name for d in cfg.eval_domains]
    stage: RunRef | None = None
    try:
        # 1. the base model (the tiny one is pretrained on the source domain)
        base = base_task(cfg, str(ws.root), parent)
        # 2. the first anchor is the LoRA initialisation; scoring it gives row 0 of R
        anchor = init_adapter_task(base.path, cfg, str(ws.init_adapter))
        rows = [evaluate_task(base.path, anchor, cfg, str(ws.init_adapter.parent / "eval.json"), str(ws.data))]
        precision: precision_mod.PrecisionResult | None = None
        versions: list[str] = []
        for t, domain in enumerate(cfg.domains, start=1):
            stage_dir = ws.stage(t, domain.name)
            stage = start_run(uri, cfg.tracking.experiment, ws.root / "mlartifacts", f"stage {t}: {domain.name}",
                              parent=parent.run_id, tags={"lalora.stage": str(t), "lalora.domain": domain.name})
            # 3. precision at the anchor on the previous domain, accumulated (skipped for plain LoRA)
            if cfg.lalora.lam > 0:
                precision = precision_task(base.path, anchor, cfg, t, precision.path if precision else None,
                                           str(ws.data), str(stage_dir), stage)
            # 4. fine-tune on the new domain with the penalty, inside DeepSpeed
            tuned = finetune_task(base.path, anchor, precision.path if precision else None, cfg, t, str(ws.data),
                                  str(stage_dir), stage)
            # 5. score every domain
            scores = evaluate_task(base.path, tuned.adapter, cfg, str(stage_dir / "eval.json"), str(ws.data))
            rows.append(scores)
            stage.tracker().log_metrics({f"eval/{d}/{k}": v for d, s in scores.items() for k, v in s.items()
                                         if isinstance(v, float)})
            # 6. register the adapter as a new version
            reg = register_task(stage, cfg.tracking.registered_model, cfg.tracking.latest_alias, tuned.adapter, t,
                                domain.name, precision.sha256 if precision else None,
                                {d: s["score"] for d, s in scores.items()})
            versions.append(reg.version)
            end_run(stage)
            stage = None
            anchor = tuned.adapter
        # 7. the report: R per score, continual-learning metrics, plots
        report = report_mod.build_report(domains, rows)
        result = report.as_json(cfg.tracking.registered_model, versions,
                                {"mlflow_uri": uri, "run_id": parent.run_id, "lambda": cfg.lalora.lam,
                                 "curvature": cfg.lalora.curvature.kind, "config_sha256": digest})
        write_json_atomic(ws.root / "metrics.json", result)
        plots = report_mod.write_plots(report, ws.root, f"{cfg.name}: lambda = {cfg.lalora.lam:g}")
        tracker.log_metrics(report.flat_metrics())
        for i, row_metrics in enumerate(report.stage_metrics()):
            tracker.log_metrics(row_metrics, step=i)
        tracker.log_artifact(ws.root / "metrics.json")
        for plot in plots:
            tracker.log_artifact(plot)
        end_run(parent)
        return result
    except BaseException:
        if stage is not None:
            end_run(stage, "FAILED")
        end_run(parent, "FAILED")
        raise
