"""The lineage flow: one Prefect flow run brings a lineage up to date with its config.

The lineage's state is its registered model in MLflow (one version per finished stage, see
flows/registry.py). A run plans against it first: finished stages are skipped, an interrupted
stage restarts from its DeepSpeed checkpoint, new domains become the next stages, and a
changed finished stage is refused before anything is recorded (or forked with ``fork``).
The steps, numbered as in the functions below: 1. where the lineage stands; 2. nothing new: the
report; 3. the base model; 4. the starting point; 5. new columns of R filled; then each stage:
6. the precision, 7. the fine-tune, 8. the scores and the gate, 9. the lineage state, 10. the
version; 11. the report. Its tasks are in flows/tasks.py.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from prefect import State, flow
from prefect.states import Completed, Failed

from flows import auto_lambda
from flows.console import bad_input_types
from flows.generator import ArtifactBase, BaseReference, HubBase
from flows.lease import StoreLease
from flows.lock import hold, lock_paths
from flows.notify import Outcome, announce
from flows.registry import LineageRegistry
from flows.runs import RunRef, close_orphaned_runs, end_run, is_local_store, start_run, tracking_uri
from flows.tasks import (
    fetch_precision_task,
    fetch_task,
    fingerprint_task,
    initial_adapter,
    package_task,
    plan_task,
    register_task,
    scores,
    stage_task,
)
from pipelines.config import LineageConfig, load_config
from pipelines.errors import BadInput
from pipelines.lineage import plan, preflight, report
from pipelines.lineage.record import VersionRecord
from pipelines.lineage.report import LineageResult, Promotion, StageTiming
from pipelines.runtime.environment import numerics
from pipelines.runtime.threads import torch_threads
from pipelines.scoring.scores import Row, rows_as_json, rows_from_json
from pipelines.stages.gate import GateInputs, GateResult
from pipelines.stages.pretrain import BaseInputs
from pipelines.stages.steps import FINETUNE, GATE, PRECISION, PRETRAIN, Job
from pipelines.workspace import StepPaths, Workspace, sha256_json, write_json_atomic


def config_hash(cfg: LineageConfig) -> str:
    return sha256_json(cfg.model_dump(mode="json", by_alias=True))


def _resolved(state: State[Any]) -> LineageResult:
    """``state`` as the flow's result: Prefect resolves a state a flow returns (its caller gets the state's data, or
    its error raised), which the flow's return type cannot say."""
    return cast(LineageResult, state)


@flow(name="lalora-lineage")
def lineage_flow(
    config_path: str,
    out_dir: str,
    overrides: list[str] | None = None,
    fork: str | None = None,
    config: dict[str, Any] | None = None,
) -> LineageResult:
    """Bring the lineage up to date with the config; return its result (``as_json()`` is metrics.json).

    The config is the YAML at ``config_path`` with ``overrides``, or ``config``, a config's JSON dump
    (a sweep's point), validated again with the schema. Holds the lineage: its output directory's
    lock and the store's lease, waiting for another run of it (`lalora run` takes them first and
    refuses instead unless --wait), so a scheduled run and a manual one, or two workers on two
    hosts, never write the same lineage at once.
    """
    try:
        cfg = LineageConfig.model_validate(config) if config is not None else load_config(config_path, overrides)
    except BadInput as e:  # on a worker's host: the config it was deployed with is not there (or not valid)
        message = f"{e} (on {socket.gethostname()})"
        announce(Outcome("failed", Path(config_path).stem, reason=message))  # no config: no webhook to post to
        return _resolved(Failed(message=message, data=e))
    try:
        preflight.check(cfg)  # a missing model or data file, LoRA targets matching nothing: before anything is recorded
        with (
            hold(lineage_locks(cfg, out_dir, fork), wait=True, timeout=cfg.orchestration.lock_timeout_seconds) as (
                _,
                lease,
            ),
            torch_threads(cfg.runtime.threads),
        ):
            result = _lineage(Lineage.open(cfg, config_path, out_dir, fork, lease))
    except Exception as e:  # someone hears of it: a Prefect event, and the webhook if one is set
        announce(
            Outcome("failed", fork or cfg.tracking.registered_model, reason=f"{type(e).__name__}: {e}"),
            cfg.notify.webhook,
            cfg.notify.timeout_seconds,
        )
        if isinstance(e, bad_input_types()):  # its one line is the run's final message, with no traceback logged
            return _resolved(Failed(message=str(e).strip().splitlines()[0], data=e))
        raise
    rejected = {v: p for v, p in result.promotion.items() if not p.promoted}
    if rejected:  # the run completed; its final state says what the gate refused
        return _resolved(
            Completed(
                message="; ".join(
                    f"version {v} (stage {p.stage}) not promoted: {p.reason}" for v, p in rejected.items()
                ),
                data=result,
            )
        )
    return result


def lineage_locks(cfg: LineageConfig, out_dir: str | Path, fork: str | None = None) -> list[Any]:
    """What a run of this lineage holds: its output directory's lock and the store's lease on the model."""
    root = Path(out_dir).resolve()
    return [
        *lock_paths(root),
        StoreLease(
            tracking_uri(cfg.tracking.mlflow_uri, root),
            fork or cfg.tracking.registered_model,
            cfg.orchestration.lease_ttl_seconds,
        ),
    ]


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
        if not fork:
            _same_lineage(shared.root / "metrics.json", cfg.tracking.registered_model, out_dir)
        shared.root.mkdir(parents=True, exist_ok=True)
        uri = tracking_uri(cfg.tracking.mlflow_uri, shared.root)
        return cls(
            cfg,
            config_path,
            shared,
            Workspace(shared.root / "forks" / fork) if fork else shared,
            LineageRegistry(uri, fork or cfg.tracking.registered_model, shared.root / "registry"),
            lease,
            shared.root / "mlartifacts" if is_local_store(uri) else None,
        )

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

    def rows(self, recorded: plan.Recorded) -> list[Row]:
        return rows_from_json(self.registry.fetch_json(recorded.uri("rows"), "rows.json"))

    def model_description(self) -> str:
        cfg = self.cfg
        return (
            f"LaLoRA lineage '{cfg.name}' (config {self.config_path}): one version per stage, each a "
            "python_function model (greedy completions by the base model with that stage's adapter). "
            f"Alias '{cfg.tracking.latest_alias}': the newest stage; '{cfg.promotion.alias}': the last version "
            f"the promotion gate accepted. Load: mlflow.pyfunc.load_model('models:/{self.model}@"
            f"{cfg.promotion.alias}')."
        )


def _same_lineage(metrics: Path, model: str, out_dir: str) -> None:
    """An output directory holds one lineage: refuse a config that registers under another name there (its
    stages, metrics.json and R.png would be overwritten)."""
    if not metrics.is_file():
        return
    try:
        recorded = json.loads(metrics.read_text()).get("registered_model")
    except (json.JSONDecodeError, AttributeError):
        return  # torn by a kill: the stages' own records decide
    if recorded and recorded != model:
        raise BadInput(
            f"{out_dir} holds the lineage {recorded!r} and this config registers {model!r} "
            f"(tracking.registered_model): give another --out, or --fork {model} to branch it from {recorded!r}"
        )


@dataclass(frozen=True)
class Base:
    path: str
    """from_pretrained-loadable directory or hub id, on this machine"""
    uri: str
    """what versions record: a ``runs:/`` URI of the logged base, or a hub id"""
    recipe: str = ""
    reference: BaseReference | None = None
    """how a version's model finds it (``_base_reference``), once per run; None when no stage runs"""


@dataclass
class Start:
    """Where the stages to run start: the anchor adapter, the accumulated precision, R's rows so far."""

    anchor: str
    precision: str | None
    rows: list[Row]
    init: str | None = None
    """the LoRA initialisation, when this run made it (row 0's adapter)"""
    val_rows: list[auto_lambda.ValRow] | None = None
    """validation scores of R's rows (a lineage that searches lambda; None otherwise)"""
    lam: float | None = None
    """the lambda the newest searching stage chose: the next search starts there"""


@dataclass(frozen=True)
class StageOutcome:
    """What one stage leaves: its version, the gate's verdict, the adapter and precision the next one starts from."""

    version: str
    promotion: Promotion
    adapter: str
    precision: str | None
    timing: StageTiming
    auto: dict[str, Any] | None = None
    """what the stage's lambda search did (lambda auto; None otherwise)"""


def _lineage(lx: Lineage) -> LineageResult:
    cfg = lx.cfg
    close_orphaned_runs(lx.uri, cfg.tracking.experiment, "lalora.lineage", lx.model)  # left RUNNING by a killed run
    stands = _where_it_stands(lx)  # 1.
    if not stands.todo:  # 2. nothing new: report what is recorded, record nothing (unless a new probe needs scores)
        rows = lx.rows(stands.done[-1])
        if all(d in row for row in rows for d in lx.domains):
            return _finish(
                lx,
                rows,
                stands,
                None,
                [],
                lx.registry.reconcile_aliases(cfg.tracking.latest_alias, cfg.promotion.alias),
            )
    parent = lx.start_run(
        cfg.name,
        tags={
            "lalora.lineage": lx.model,
            "lalora.config_sha256": config_hash(cfg),
            "lalora.resume_from": str(stands.resume_from),
        },
    )
    parent.tracker().log_params(cfg.model_dump(mode="json", by_alias=True))
    parent.tracker().log_params({f"environment.{k}": v for k, v in numerics(cfg.model.dtype).items()})
    try:
        last = stands.done[-1] if stands.done else None
        base = _base(lx, parent, last)  # 3.
        if stands.todo:
            base = replace(base, reference=_base_reference(lx, base))
        start = _starting_point(lx, base, last)  # 4.
        _fill_new_columns(lx, base, stands, start)  # 5.
        lx.registry.describe(lx.model_description())
        if cfg.searches and stands.todo:  # the validation scores of R's rows so far, which the search reads
            start.val_rows = auto_lambda.validation_rows(lx, base.path, stands.done, start.init)
        outcomes = []
        for key in stands.todo:  # 6.-10., one stage each
            outcome = _stage(lx, base, key, start, parent)
            outcomes.append(outcome)
            chosen = outcome.auto["lambda"] if outcome.auto else start.lam
            start = Start(outcome.adapter, outcome.precision, start.rows, val_rows=start.val_rows, lam=chosen)
        aliases = lx.registry.reconcile_aliases(cfg.tracking.latest_alias, cfg.promotion.alias)
        result = _finish(lx, start.rows, stands, parent, outcomes, aliases)  # 11.
        end_run(parent)
        return result
    except BaseException:
        end_run(parent, "FAILED")
        raise


def _where_it_stands(lx: Lineage) -> plan.Plan:
    """1. The data fingerprints against the registered versions: finished stages and stages to run."""
    cfg = lx.cfg
    keys = plan.stage_keys(cfg, fingerprint_task(cfg, str(lx.shared.data)))
    source = cfg.tracking.registered_model
    if lx.model != source and not lx.registry.exists():  # a new fork: copies of the unchanged versions
        original = LineageRegistry(lx.uri, source, lx.registry.cache)
        recorded = lx.registry.fork(
            source,
            plan.fork_point(keys, original.stages(), source),
            f"LaLoRA adapters, forked from {source}. " + lx.model_description(),
        )
    else:
        recorded = lx.registry.stages()
    try:
        return plan_task(keys, recorded, lx.model)
    except plan.LineageConflict as conflict:
        raise _refusal(lx, conflict) from None


def _refusal(lx: Lineage, conflict: plan.LineageConflict) -> plan.LineageConflict:
    """The conflict as one actionable line, naming the changed settings when the record has them."""
    detail = ""
    rec = conflict.recorded
    if rec is not None and rec.uri("config") and "config" in str(conflict):
        try:
            old = lx.registry.fetch_json(rec.uri("config"), "stage_config.json")
            detail = " (" + "; ".join(plan.config_diff(old, plan.stage_config(lx.cfg, conflict.stage))) + ")"
        except Exception:  # the diff is a courtesy; the refusal stands without it
            detail = ""
    return plan.LineageConflict(
        f"{conflict}{detail}; nothing was run or recorded. Restore the config, or start a "
        f"new lineage from stage {conflict.stage} with --fork NAME",
        conflict.stage,
        rec,
    )


def _base(lx: Lineage, parent: RunRef, last: plan.Recorded | None) -> Base:
    """3. The base model: as configured (logged once when it is a local directory), or the recorded tiny
    base, or the tiny base prepared (pretrained) here and logged once."""
    from pipelines.runtime.models import is_local_path

    cfg, recorded = lx.cfg, last.uri("base") if last else ""
    if cfg.model.path:
        if recorded.startswith("runs:/") or not is_local_path(cfg.model.path):
            return Base(cfg.model.path, recorded or cfg.model.path)
        return Base(cfg.model.path, lx.registry.shared_base(parent, cfg.tracking.experiment, cfg.model.path))
    marker = lx.shared.base / "lalora_base.json"
    local_recipe = json.loads(marker.read_text()).get("recipe_sha256") if marker.is_file() else None
    if last and local_recipe != last.record.base_recipe:
        return Base(fetch_task(lx.registry, recorded, "base"), recorded, last.record.base_recipe)
    path = stage_task(PRETRAIN, BaseInputs.from_config(cfg, str(lx.shared.root)), parent).value.path
    recipe = json.loads(marker.read_text())["recipe_sha256"]
    return Base(path, recorded or lx.registry.shared_base(parent, cfg.tracking.experiment, path), recipe)


def _starting_point(lx: Lineage, base: Base, last: plan.Recorded | None) -> Start:
    """4. The anchor, precision and R rows where the lineage stands (or the LoRA initialisation, row 0)."""
    cfg = lx.cfg
    if last:
        precision = fetch_precision_task(lx.registry, last) if last.uri("precision") else None
        return Start(
            fetch_task(lx.registry, last.uri("adapter"), "adapter"),
            precision,
            lx.rows(last),
            lam=last.record.auto_lambda,
        )
    init = initial_adapter(cfg, base.path, str(lx.ws.init_adapter))
    row0 = scores(
        cfg, base.path, init, cfg.eval_domains, str(lx.ws.init_adapter.parent / "eval.json"), str(lx.shared.data)
    ).value
    return Start(init, None, [row0], init)


def _fill_new_columns(lx: Lineage, base: Base, stands: plan.Plan, start: Start) -> None:
    """5. Domains (or probes) appended since a row was scored: that row's adapter scores them once."""
    cfg = lx.cfg
    for i, row in enumerate(start.rows):
        missing = [d for d in cfg.eval_domains if d.name not in row]
        if not missing:
            continue
        if i == 0:
            adapter = start.init or initial_adapter(cfg, base.path, str(lx.ws.init_adapter))
        else:
            adapter = fetch_task(lx.registry, stands.done[i - 1].uri("adapter"), "adapter")
        row |= scores(
            cfg, base.path, adapter, missing, str(lx.ws.root / "fill" / f"row{i}.json"), str(lx.shared.data)
        ).value


def _stage(lx: Lineage, base: Base, key: plan.StageKey, start: Start, parent: RunRef) -> StageOutcome:
    """6.-10. One stage, as one MLflow run under the lineage's."""
    cfg, t = lx.cfg, key.stage
    domain = cfg.domains[t - 1]
    t0 = time.perf_counter()
    stage_dir = lx.ws.stage(t, domain.name)
    tags = {"lalora.stage": str(t), "lalora.domain": domain.name, "lalora.lineage": lx.model}
    run = lx.start_run(
        f"stage {t}: {domain.name}", parent.run_id, tags | {"lalora.stage_config_sha256": key.config_sha256}
    )
    try:
        checkpoint = stage_dir / "checkpoints" / f"{key.config_sha256[:16]}-{key.data_sha256[:16]}"
        paths = StepPaths(
            base.path, start.anchor, start.precision, str(lx.shared.data), str(stage_dir), str(checkpoint)
        )
        # 6. precision at the anchor on the previous domain, accumulated (skipped when no stage has the penalty)
        retry = auto_lambda.retry_options(lx)
        precision = stage_task(PRECISION, Job(cfg=cfg, stage=t, paths=paths), run, **retry) if cfg.penalised else None
        if precision is not None:
            paths = replace(paths, precision=precision.value.path)
        # 7. fine-tune on the new domain with the penalty, inside DeepSpeed (resumes an interrupted run); with
        # lambda auto, trials first, each scored on validation rows
        adapter, tuned_seconds, searched = _train(lx, base, key, start, paths, run)
        # 8. score every domain and probe; the gate reads R (each domain's own score) up to this stage
        scored = scores(cfg, base.path, adapter, cfg.eval_domains, str(stage_dir / "eval.json"), str(lx.shared.data))
        start.rows.append(scored.value)
        run.tracker().log_metrics(_score_metrics(scored.value))
        verdict = _gate(lx, t, start.rows)
        if searched is not None and not searched.feasible:  # the budget could not be kept: never the champion
            verdict = GateResult(promoted=False, reasons=[searched.refusal, *verdict.reasons], metrics=verdict.metrics)
        # 9. the lineage state travels with the version: R so far (and its validation scores), stage config
        _lineage_state(lx, t, start, stage_dir, run)
        # 10. the version: the adapter as a python_function model, its record, the aliases it earns
        recorded = precision.value if precision else None
        version = _register(lx, base, key, run, adapter, recorded, scored.value, verdict, stage_dir, searched)
        _drop_checkpoints(stage_dir)
        work = tuned_seconds + sum(x.compute_seconds for x in (precision, scored) if x is not None)
        timing = StageTiming(t, time.perf_counter() - t0, work)
        run.tracker().log_metrics({f"stage/{k}": v for k, v in timing.as_json().items() if k != "stage"})
        end_run(run)
    except BaseException:
        end_run(run, "FAILED")
        raise
    return StageOutcome(
        version,
        Promotion(t, verdict.promoted, verdict.reason),
        adapter,
        paths.precision,
        timing,
        searched.summary if searched else None,
    )


def _score_metrics(row: Row) -> dict[str, float]:
    """A row of scores as the stage run's metrics: ``eval/<domain>/<name>``."""
    return {f"eval/{d}/{k}": v for d, s in row.items() for k, v in s.as_json().items() if isinstance(v, float)}


def _drop_checkpoints(stage_dir: Path) -> None:
    """The stage's DeepSpeed checkpoints and its trials': the version holds the result now."""
    shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    for trial_checkpoints in (stage_dir / "auto").glob("trial-*/checkpoints"):
        shutil.rmtree(trial_checkpoints, ignore_errors=True)


def _train(
    lx: Lineage, base: Base, key: plan.StageKey, start: Start, paths: StepPaths, run: RunRef
) -> tuple[str, float, auto_lambda.Searched | None]:
    """7. The stage's adapter and the seconds it took; with lambda auto, the search that chose its lambda. In a
    lineage that searches, the adapter's validation scores join ``start.val_rows``."""
    cfg, t = lx.cfg, key.stage
    if cfg.stage_lambda(t) == "auto":
        assert start.val_rows is not None
        directions = {d: s.higher_is_better for d, s in start.rows[0].items()}
        searched = auto_lambda.search(lx, base.path, key, paths, run, start.val_rows, directions, start.lam)
        start.val_rows.append(searched.val_row)
        return searched.adapter, searched.compute_seconds, searched
    tuned = stage_task(FINETUNE, Job(cfg=cfg, stage=t, paths=paths), run, **auto_lambda.retry_options(lx))
    if start.val_rows is not None:
        start.val_rows.append(
            auto_lambda.validation_row(lx, base.path, tuned.value.adapter, Path(paths.out) / "val.json")
        )
    return tuned.value.adapter, tuned.compute_seconds, None


def _lineage_state(lx: Lineage, t: int, start: Start, stage_dir: Path, run: RunRef) -> None:
    """9. R's rows so far, their validation scores (a lineage that searches) and the stage config, logged."""
    write_json_atomic(stage_dir / "lineage" / "rows.json", rows_as_json(start.rows))
    write_json_atomic(stage_dir / "lineage" / "stage_config.json", plan.stage_config(lx.cfg, t))
    if start.val_rows is not None:
        write_json_atomic(stage_dir / "lineage" / "val_rows.json", start.val_rows)
    run.tracker().log_artifact(stage_dir / "lineage", "lineage")


def _gate(lx: Lineage, t: int, rows: list[Row]) -> GateResult:
    """The promotion gate on R up to stage ``t``: the source, the stages' domains so far, the probes."""
    gated = [*lx.domains[: t + 1], *(d.name for d in lx.cfg.probes)]
    R = [[row[d].score for d in gated] for row in rows]
    inputs = GateInputs.from_config(
        lx.cfg, domains=gated, R=R, higher_is_better=[rows[0][d].higher_is_better for d in gated]
    )
    return stage_task(GATE, inputs).value


def _register(
    lx: Lineage,
    base: Base,
    key: plan.StageKey,
    run: RunRef,
    adapter: str,
    precision: Any,
    scores: Row,
    verdict: GateResult,
    stage_dir: Path,
    searched: auto_lambda.Searched | None = None,
) -> str:
    cfg, t = lx.cfg, key.stage
    domain = cfg.domains[t - 1]
    record = VersionRecord(
        lineage=lx.model,
        stage=t,
        domain=domain.name,
        config_sha256=key.config_sha256,
        data_sha256=key.data_sha256,
        adapter_uri=f"runs:/{run.run_id}/model/artifacts/adapter",
        rows_uri=f"runs:/{run.run_id}/lineage/rows.json",
        config_uri=f"runs:/{run.run_id}/lineage/stage_config.json",
        base_uri=base.uri,
        base_recipe=base.recipe,
        precision_uri=f"runs:/{run.run_id}/curvature" if precision else "",
        precision_sha256=precision.sha256 if precision else "",
        promoted=verdict.promoted,
        promotion_reason=verdict.reason,
        val_rows_uri=f"runs:/{run.run_id}/lineage/val_rows.json" if cfg.searches else "",
        auto_lambda=searched.chosen.lam if searched else None,
        auto_trials=len(searched.trials) if searched else 0,
    )
    assert base.reference is not None  # set before the first stage runs
    model_dir = package_task(adapter, base.reference, cfg, _example_prompt(lx, t), str(stage_dir / "model"))
    description = report.version_description(
        lx.model,
        t,
        domain.name,
        lx.domains,
        [scores[d].score for d in lx.domains],
        [scores[d].metric for d in lx.domains],
        verdict.promoted,
        verdict.reason,
        cfg.promotion.alias,
        report.auto_text(searched.summary) if searched else "",
    )
    aliases = [cfg.tracking.latest_alias] + ([cfg.promotion.alias] if verdict.promoted else [])
    version = register_task(lx.registry, run, model_dir, record, description, aliases, lx.lease)
    for kind in ("registered", *(() if verdict.promoted else ("rejected",))):
        announce(Outcome(kind, lx.model, t, version, verdict.reason), cfg.notify.webhook, cfg.notify.timeout_seconds)
    return version


def _base_reference(lx: Lineage, base: Base) -> BaseReference:
    """How a version's model finds its base: the logged artifact's location, or the hub id at its revision."""
    if base.uri.startswith("runs:/"):
        return ArtifactBase(uri=base.uri, location=lx.registry.location(base.uri))
    from pipelines.runtime.models import hub_revision

    return HubBase(id=base.uri, revision=hub_revision(base.uri))


def _example_prompt(lx: Lineage, stage: int) -> str:
    """A prompt of the stage's domain for the model's input example (the first evaluation row)."""
    from pipelines.data.sources import load_domain

    domain = lx.cfg.domains[stage - 1]
    return load_domain(domain, lx.shared.data, eval_only=True).eval[0]["prompt"]


def _finish(
    lx: Lineage,
    rows: list[Row],
    stands: plan.Plan,
    parent: RunRef | None,
    outcomes: list[StageOutcome],
    aliases: dict[str, str],
) -> LineageResult:
    """11. The report: R per score, continual-learning metrics, plots; logged on the run when there is one,
    and as a Markdown artifact of the Prefect flow run."""
    cfg, ws, domains = lx.cfg, lx.ws, lx.domains
    rows = [{d: row[d] for d in domains} for row in rows]  # columns of domains the config no longer lists drop out
    lineage_report = report.build_report(domains, rows)
    result = LineageResult(
        lineage_report,
        lx.model,
        [r.version for r in stands.done] + [o.version for o in outcomes],
        lx.uri,
        parent.run_id if parent else None,
        cfg.lalora.lam,
        cfg.lalora.curvature.kind,
        config_hash(cfg),
        [r.stage for r in stands.done],
        [k.stage for k in stands.todo],
        {o.version: o.promotion for o in outcomes},
        aliases,
        [o.timing for o in outcomes],
        numerics(cfg.model.dtype),
        _searches(stands, outcomes),
    )
    ws.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(ws.root / "metrics.json", result.as_json())
    plots = report.write_plots(lineage_report, ws.root, f"{cfg.name}: lambda = {report.lambda_text(cfg.lalora.lam)}")
    if parent is not None:
        tracker = parent.tracker()
        tracker.log_metrics(lineage_report.flat_metrics())
        for i, row_metrics in enumerate(lineage_report.stage_metrics()):
            tracker.log_metrics(row_metrics, step=i)
        tracker.log_artifact(ws.root / "metrics.json")
        for plot in plots:
            tracker.log_artifact(plot)
    _publish(lx, result)
    return result


def _searches(stands: plan.Plan, outcomes: list[StageOutcome]) -> dict[str, dict[str, Any]]:
    """What each stage's lambda search did, by stage: this run's in full, earlier runs' as their versions say."""
    out = {
        str(r.stage): {"lambda": r.record.auto_lambda, "trials": r.record.auto_trials}
        for r in stands.done
        if r.record.auto_lambda is not None
    }
    return out | {str(o.promotion.stage): o.auto for o in outcomes if o.auto is not None}


def _publish(lx: Lineage, result: LineageResult) -> None:
    """The outcome in the Prefect UI: a Markdown artifact of this flow run (R, metrics, promotions)."""
    from prefect.artifacts import create_markdown_artifact

    key = re.sub(r"[^a-z0-9-]+", "-", f"lalora-{lx.model}".lower()).strip("-")
    create_markdown_artifact(
        markdown=report.markdown_summary(
            result.report, result.promotion, lx.model, lx.cfg.promotion.alias, result.auto
        ),
        key=key,
        description=f"LaLoRA lineage {lx.model}: R and promotions",
    )
