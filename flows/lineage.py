"""The lineage flow: one Prefect flow run brings a lineage up to date with its config.

The lineage's state is its registered model in MLflow (one version per finished stage, see
flows/registry.py). A run plans against it first: finished stages are skipped, an interrupted
stage restarts from its DeepSpeed checkpoint, new domains become the next stages, and a
changed finished stage is refused before anything is recorded (or forked with ``fork``).

Each task wraps exactly one ``pipelines`` (or registry) function and passes paths, URIs and
small result values, never models or tensors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows import generator, timing
from flows.lease import StoreLease
from flows.lock import hold, lock_paths
from flows.registry import LineageRegistry
from flows.tracking import RunRef, close_orphaned_runs, end_run, is_local_store, start_run, tracking_uri
from pipelines import evaluate as evaluate_mod
from pipelines import finetune as finetune_mod
from pipelines import lineage_state as ls
from pipelines import precision as precision_mod
from pipelines import preflight
from pipelines import pretrain as pretrain_mod
from pipelines import promote as promote_mod
from pipelines import report as report_mod
from pipelines.config import DomainConfig, LineageConfig, load_config
from pipelines.record import VersionRecord
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
def fetch_task(registry: LineageRegistry, artifact_uri: str, name: str) -> str:
    return registry.fetch(artifact_uri, name)


@task(name="fetch-precision", **_TASK)
def fetch_precision_task(registry: LineageRegistry, recorded: ls.Recorded) -> str:
    return registry.fetch_precision(recorded)


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


@task(name="package", **_TASK)
def package_task(adapter: str, base: dict[str, Any], cfg: LineageConfig, example: str, dest: str) -> str:
    """The version's python_function model: the adapter, the base referenced."""
    return str(generator.save(Path(dest), adapter, base, dtype=cfg.model.dtype,
                              max_new_tokens=cfg.evaluation.max_new_tokens, stop=[],
                              batch_size=cfg.evaluation.batch_size, example=example))


@task(name="register", **_TASK)
def register_task(registry: LineageRegistry, run: RunRef, model_dir: str, record: VersionRecord, description: str,
                  aliases: list[str], lease: Any) -> str:
    lease.check()  # still this lineage's writer: a run whose lease expired registers nothing
    return registry.register(run, Path(model_dir), record, description, aliases)


def config_hash(cfg: LineageConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json", by_alias=True), sort_keys=True).encode()).hexdigest()


@flow(name="lalora-lineage")
def lineage_flow(config_path: str, out_dir: str, overrides: list[str] | None = None,
                 fork: str | None = None) -> dict[str, Any]:
    """Bring the lineage up to date with the config; return the contents of metrics.json.

    Holds the lineage: its output directory's lock and the store's lease, waiting for another run of
    it (`lalora run` takes them first and refuses instead unless --wait), so a scheduled run and a
    manual one, or two workers on two hosts, never write the same lineage at once.
    """
    cfg = load_config(config_path, overrides)
    preflight.check(cfg)  # a missing model or data file, LoRA targets matching nothing: before anything is recorded
    with hold(lineage_locks(cfg, out_dir, fork), wait=True) as (_, lease), torch_threads(cfg.runtime.threads):
        return _lineage(Lineage.open(cfg, config_path, out_dir, fork, lease))


def lineage_locks(cfg: LineageConfig, out_dir: str | Path, fork: str | None = None) -> list[Any]:
    """What a run of this lineage holds: its output directory's lock and the store's lease on the model."""
    root = Path(out_dir).resolve()
    return [*lock_paths(root), StoreLease(tracking_uri(cfg.tracking.mlflow_uri, root),
                                          fork or cfg.tracking.registered_model, cfg.orchestration.lease_ttl_seconds)]


@dataclass
class Lineage:
    """One run of a lineage: its config, where its files go, its store and registered model."""

    cfg: LineageConfig
    config_path: str
    shared: Workspace
    """data, base model, the local MLflow store (shared with forks)"""
    ws: Workspace
    """this lineage's stages and report"""
    registry: LineageRegistry
    lease: Any
    artifacts: Path | None
    """the local store's artifact root (None: a tracking server's own)"""

    @classmethod
    def open(cls, cfg: LineageConfig, config_path: str, out_dir: str, fork: str | None, lease: Any) -> Lineage:
        shared = Workspace(Path(out_dir).resolve())
        shared.root.mkdir(parents=True, exist_ok=True)
        uri = tracking_uri(cfg.tracking.mlflow_uri, shared.root)
        return cls(cfg, config_path, shared, Workspace(shared.root / "forks" / fork) if fork else shared,
                   LineageRegistry(uri, fork or cfg.tracking.registered_model, shared.root / "registry"), lease,
                   shared.root / "mlartifacts" if is_local_store(uri) else None)

    @property
    def uri(self) -> str:
        return self.registry.uri

    @property
    def model(self) -> str:
        return self.registry.model

    @property
    def domains(self) -> list[str]:
        """R's columns: the source, the stages' domains, the probes."""
        return [d.name for d in self.cfg.eval_domains]

    def start_run(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> RunRef:
        return start_run(self.uri, self.cfg.tracking.experiment, self.artifacts, name, parent=parent, tags=tags)

    def model_description(self) -> str:
        cfg = self.cfg
        return (f"LaLoRA lineage '{cfg.name}' (config {self.config_path}): one version per stage, each a "
                "python_function model (greedy completions by the base model with that stage's adapter). "
                f"Alias '{cfg.tracking.latest_alias}': the newest stage; '{cfg.promotion.alias}': the last version "
                f"the promotion gate accepted. Load: mlflow.pyfunc.load_model('models:/{self.model}@"
                f"{cfg.promotion.alias}').")


@dataclass(frozen=True)
class Base:
    path: str
    """from_pretrained-loadable directory or hub id, on this machine"""
    uri: str
    """what versions record: a ``runs:/`` URI of the logged base, or a hub id"""
    recipe: str = ""


@dataclass
class Start:
    """Where the stages to run start: the anchor adapter, the accumulated precision, R's rows so far."""

    anchor: str
    precision: str | None
    rows: Rows
    init: str | None = None
    """the LoRA initialisation, when this run made it (row 0's adapter)"""


@dataclass(frozen=True)
class StageOutcome:
    stage: int
    version: str
    promoted: bool
    reason: str
    adapter: str
    precision: str | None
    timing: dict[str, float] = field(default_factory=dict)


def _lineage(lx: Lineage) -> dict[str, Any]:
    cfg = lx.cfg
    close_orphaned_runs(lx.uri, cfg.tracking.experiment, "lalora.lineage", lx.model)  # left RUNNING by a killed run
    plan = _where_it_stands(lx)  # 1.
    if not plan.todo:  # 2. nothing new: report what is recorded, record nothing (unless a new probe needs scores)
        rows = lx.registry.fetch_json(plan.done[-1].uri("rows"), "rows.json")
        if all(d in row for row in rows for d in lx.domains):
            aliases = lx.registry.reconcile_aliases(cfg.tracking.latest_alias, cfg.promotion.alias)
            return _finish(lx, rows, plan, None, [], aliases)
    parent = lx.start_run(cfg.name, tags={"lalora.lineage": lx.model, "lalora.config_sha256": config_hash(cfg),
                                          "lalora.resume_from": str(plan.resume_from)})
    parent.tracker().log_params(cfg.model_dump(mode="json", by_alias=True))
    try:
        last = plan.done[-1] if plan.done else None
        base = _base(lx, parent, last)  # 3.
        start = _starting_point(lx, base, last)  # 4.
        _fill_new_columns(lx, base, plan, start)  # 5.
        outcomes = []
        lx.registry.describe(lx.model_description())
        for key in plan.todo:  # 6.-10., one stage each
            outcome = _stage(lx, base, key, start, parent)
            outcomes.append(outcome)
            start = Start(outcome.adapter, outcome.precision, start.rows)
        aliases = lx.registry.reconcile_aliases(cfg.tracking.latest_alias, cfg.promotion.alias)
        result = _finish(lx, start.rows, plan, parent, outcomes, aliases)  # 11.
        end_run(parent)
        return result
    except BaseException:
        end_run(parent, "FAILED")
        raise


def _where_it_stands(lx: Lineage) -> ls.Plan:
    """1. The data fingerprints against the registered versions: finished stages and stages to run."""
    cfg = lx.cfg
    keys = ls.stage_keys(cfg, fingerprint_task(cfg, str(lx.shared.data)))
    source = cfg.tracking.registered_model
    if lx.model != source and not lx.registry.exists():  # a new fork: copies of the unchanged versions
        original = LineageRegistry(lx.uri, source, lx.registry.cache)
        recorded = lx.registry.fork(source, ls.fork_point(keys, original.stages(), source),
                                    f"LaLoRA adapters, forked from {source}. " + lx.model_description())
    else:
        recorded = lx.registry.stages()
    try:
        return plan_task(keys, recorded, lx.model)
    except ls.LineageConflict as conflict:
        raise _refusal(lx, conflict) from None


def _refusal(lx: Lineage, conflict: ls.LineageConflict) -> ls.LineageConflict:
    """The conflict as one actionable line, naming the changed settings when the record has them."""
    detail = ""
    rec = conflict.recorded
    if rec is not None and rec.uri("config") and "config" in str(conflict):
        try:
            old = lx.registry.fetch_json(rec.uri("config"), "stage_config.json")
            detail = " (" + "; ".join(ls.config_diff(old, ls.stage_config(lx.cfg, conflict.stage))) + ")"
        except Exception:  # the diff is a courtesy; the refusal stands without it
            detail = ""
    return ls.LineageConflict(f"{conflict}{detail}; nothing was run or recorded. Restore the config, or start a new "
                              f"lineage from stage {conflict.stage} with --fork NAME", conflict.stage, rec)


def _base(lx: Lineage, parent: RunRef, last: ls.Recorded | None) -> Base:
    """3. The base model: as configured (logged once when it is a local directory), or the recorded tiny
    base, or the tiny base prepared (pretrained) here and logged once."""
    from pipelines.modeling import is_local_path

    cfg, recorded = lx.cfg, last.uri("base") if last else ""
    if cfg.model.path:
        if recorded.startswith("runs:/") or not is_local_path(cfg.model.path):
            return Base(cfg.model.path, recorded or cfg.model.path)
        return Base(cfg.model.path, lx.registry.shared_base(parent, cfg.tracking.experiment, cfg.model.path))
    marker = lx.shared.base / "lalora_base.json"
    local_recipe = json.loads(marker.read_text()).get("recipe_sha256") if marker.is_file() else None
    if last and local_recipe != last.record.base_recipe:
        return Base(fetch_task(lx.registry, recorded, "base"), recorded, last.record.base_recipe)
    path = base_task(cfg, str(lx.shared.root), parent).path
    recipe = json.loads(marker.read_text())["recipe_sha256"]
    return Base(path, recorded or lx.registry.shared_base(parent, cfg.tracking.experiment, path), recipe)


def _starting_point(lx: Lineage, base: Base, last: ls.Recorded | None) -> Start:
    """4. The anchor, precision and R rows where the lineage stands (or the LoRA initialisation, row 0)."""
    cfg = lx.cfg
    if last:
        precision = fetch_precision_task(lx.registry, last) if last.uri("precision") else None
        return Start(fetch_task(lx.registry, last.uri("adapter"), "adapter"), precision,
                     lx.registry.fetch_json(last.uri("rows"), "rows.json"))
    init = init_adapter_task(base.path, cfg, str(lx.ws.init_adapter))
    row0 = evaluate_task(base.path, init, cfg, cfg.eval_domains, str(lx.ws.init_adapter.parent / "eval.json"),
                         str(lx.shared.data))
    return Start(init, None, [row0], init)


def _fill_new_columns(lx: Lineage, base: Base, plan: ls.Plan, start: Start) -> None:
    """5. Domains (or probes) appended since a row was scored: that row's adapter scores them once."""
    cfg = lx.cfg
    for i, row in enumerate(start.rows):
        missing = [d for d in cfg.eval_domains if d.name not in row]
        if not missing:
            continue
        if i == 0:
            adapter = start.init or init_adapter_task(base.path, cfg, str(lx.ws.init_adapter))
        else:
            adapter = fetch_task(lx.registry, plan.done[i - 1].uri("adapter"), "adapter")
        row |= evaluate_task(base.path, adapter, cfg, missing, str(lx.ws.root / "fill" / f"row{i}.json"),
                             str(lx.shared.data))


def _stage(lx: Lineage, base: Base, key: ls.StageKey, start: Start, parent: RunRef) -> StageOutcome:
    """6.-10. One stage, as one MLflow run under the lineage's."""
    cfg, t, domain = lx.cfg, key.stage, lx.cfg.domains[key.stage - 1]
    t0 = time.perf_counter()
    stage_dir = lx.ws.stage(t, domain.name)
    run = lx.start_run(f"stage {t}: {domain.name}", parent=parent.run_id,
                       tags={"lalora.stage": str(t), "lalora.domain": domain.name, "lalora.lineage": lx.model,
                             "lalora.stage_config_sha256": key.config_sha256})
    try:
        # 6. precision at the anchor on the previous domain, accumulated (skipped for plain LoRA)
        precision = None
        if cfg.lalora.lam > 0:
            precision = precision_task(base.path, start.anchor, cfg, t, start.precision, str(lx.shared.data),
                                       str(stage_dir), run)
        precision_path = precision.path if precision else start.precision
        # 7. fine-tune on the new domain with the penalty, inside DeepSpeed (resumes an interrupted run)
        ckpt = stage_dir / "checkpoints" / f"{key.config_sha256[:16]}-{key.data_sha256[:16]}"
        tuned = finetune_task.with_options(retries=cfg.orchestration.finetune_retries,
                                           retry_delay_seconds=cfg.orchestration.retry_delay_seconds)(
            base.path, start.anchor, precision_path, cfg, t, str(lx.shared.data), str(stage_dir), str(ckpt), run)
        # 8. score every domain and probe; the gate reads R (each domain's own score) up to this stage
        scores = evaluate_task(base.path, tuned.adapter, cfg, cfg.eval_domains, str(stage_dir / "eval.json"),
                               str(lx.shared.data), run.run_id)
        start.rows.append(scores)
        run.tracker().log_metrics({f"eval/{d}/{k}": v for d, s in scores.items() for k, v in s.items()
                                   if isinstance(v, float)})
        gated = [*lx.domains[: t + 1], *(d.name for d in cfg.probes)]
        R = [[float(row[d]["score"]) for d in gated] for row in start.rows]
        verdict = gate_task(gated, R, [bool(start.rows[0][d]["higher_is_better"]) for d in gated], cfg)
        # 9. the lineage state travels with the version: R so far, stage config
        write_json_atomic(stage_dir / "lineage" / "rows.json", start.rows)
        write_json_atomic(stage_dir / "lineage" / "stage_config.json", ls.stage_config(cfg, t))
        run.tracker().log_artifact(stage_dir / "lineage", "lineage")
        # 10. the version: the adapter as a python_function model, its record, the aliases it earns
        version = _register(lx, base, key, run, tuned.adapter, precision, scores, verdict, stage_dir)
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # the version holds the result now
        wall = time.perf_counter() - t0
        work = timing.compute_seconds(run.run_id)
        times = {"stage": t, "wall_seconds": wall, "compute_seconds": work, "overhead_seconds": wall - work}
        run.tracker().log_metrics({f"stage/{k}": v for k, v in times.items() if k != "stage"})
        end_run(run)
    except BaseException:
        end_run(run, "FAILED")
        raise
    return StageOutcome(t, version, verdict.promoted, verdict.reason, tuned.adapter, precision_path, times)


def _register(lx: Lineage, base: Base, key: ls.StageKey, run: RunRef, adapter: str, precision: Any,
              scores: dict[str, dict[str, Any]], verdict: promote_mod.GateResult, stage_dir: Path) -> str:
    cfg, t = lx.cfg, key.stage
    domain = cfg.domains[t - 1]
    record = VersionRecord(
        lineage=lx.model, stage=t, domain=domain.name, config_sha256=key.config_sha256, data_sha256=key.data_sha256,
        adapter_uri=f"runs:/{run.run_id}/model/artifacts/adapter", rows_uri=f"runs:/{run.run_id}/lineage/rows.json",
        config_uri=f"runs:/{run.run_id}/lineage/stage_config.json", base_uri=base.uri, base_recipe=base.recipe,
        precision_uri=f"runs:/{run.run_id}/curvature" if precision else "",
        precision_sha256=precision.sha256 if precision else "", promoted=verdict.promoted,
        promotion_reason=verdict.reason)
    model_dir = package_task(adapter, _base_reference(lx, base), cfg, _example_prompt(lx, t),
                             str(stage_dir / "model"))
    description = report_mod.version_description(
        lx.model, t, domain.name, lx.domains, [float(scores[d]["score"]) for d in lx.domains],
        [str(scores[d]["metric"]) for d in lx.domains], verdict.promoted, verdict.reason, cfg.promotion.alias)
    aliases = [cfg.tracking.latest_alias] + ([cfg.promotion.alias] if verdict.promoted else [])
    return register_task(lx.registry, run, model_dir, record, description, aliases, lx.lease)


def _base_reference(lx: Lineage, base: Base) -> dict[str, Any]:
    """How a version's model finds its base: the logged artifact's location, or the hub id at its revision."""
    if base.uri.startswith("runs:/"):
        return {"kind": "artifact", "uri": base.uri, "location": lx.registry.location(base.uri)}
    from pipelines.modeling import hub_revision

    return {"kind": "hub", "id": base.uri, "revision": hub_revision(base.uri)}


def _example_prompt(lx: Lineage, stage: int) -> str:
    """A prompt of the stage's domain for the model's input example (the first evaluation row)."""
    from pipelines.data import load_domain

    domain = lx.cfg.domains[stage - 1]
    return load_domain(domain, lx.shared.data, lx.cfg.lalora.samples, eval_only=True).eval[0]["prompt"]


def _finish(lx: Lineage, rows: Rows, plan: ls.Plan, parent: RunRef | None, outcomes: list[StageOutcome],
            aliases: dict[str, str]) -> dict[str, Any]:
    """11. The report: R per score, continual-learning metrics, plots; logged on the run when there is one,
    and as a Markdown artifact of the Prefect flow run."""
    cfg, ws, domains = lx.cfg, lx.ws, lx.domains
    rows = [{d: row[d] for d in domains} for row in rows]  # columns of domains the config no longer lists drop out
    report = report_mod.build_report(domains, rows)
    promotion = {o.version: {"stage": o.stage, "promoted": o.promoted, "reason": o.reason} for o in outcomes}
    result = report.as_json(lx.model, [r.version for r in plan.done] + [o.version for o in outcomes], {
        "mlflow_uri": lx.uri, "run_id": parent.run_id if parent else None, "lambda": cfg.lalora.lam,
        "curvature": cfg.lalora.curvature.kind, "config_sha256": config_hash(cfg),
        "stages_skipped": [r.stage for r in plan.done], "stages_run": [k.stage for k in plan.todo],
        "promotion": promotion, "aliases": aliases, "timing": [o.timing for o in outcomes]})
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
    _publish(lx, report, promotion)
    return result


def _publish(lx: Lineage, report: report_mod.LineageReport, promotion: dict[str, dict[str, Any]]) -> None:
    """The outcome in the Prefect UI: a Markdown artifact of this flow run (R, metrics, promotions)."""
    import re

    from prefect.artifacts import create_markdown_artifact

    key = re.sub(r"[^a-z0-9-]+", "-", f"lalora-{lx.model}".lower()).strip("-")
    create_markdown_artifact(markdown=report_mod.markdown_summary(report, promotion, lx.model, lx.cfg.promotion.alias),
                             key=key, description=f"LaLoRA lineage {lx.model}: R and promotions")
