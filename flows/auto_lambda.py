"""lambda auto in the lineage flow: a stage's trials, each a nested MLflow run, and the validation rows.

A stage whose lambda is ``auto`` trains trials at the lambdas ``pipelines.lineage.auto.next_lambda`` asks
for, one after the other (each its own DeepSpeed engine, torn down before the next), scores each on the
validation rows of every domain and probe, and keeps the trial that learned most within the forgetting
budget (or, with ``lalora.auto.trial_share`` below 1, trains the stage once more at its lambda). The
trials so far are written to ``<stage>/auto/trials.json`` after each one: a run killed during trial k
resumes at trial k (from its DeepSpeed checkpoint) with the earlier trials' results, and ends where an
uninterrupted run ends.

The validation scores of every row of R (``val_rows``) travel with the versions like R's rows, so a
later stage reads its earlier rows' validation scores without scoring them again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.runs import RunRef, end_run
from flows.tasks import fetch_task, initial_adapter, scores, stage_task
from pipelines.lineage import auto, plan
from pipelines.lineage.preflight import budget_line
from pipelines.stages.steps import FINETUNE, Job
from pipelines.workspace import StepPaths, write_json_atomic

if TYPE_CHECKING:
    from flows.lineage_flow import Lineage

log = logging.getLogger(__name__)

ValRow = dict[str, float]
"""One row of validation scores: a score per domain and probe (the R columns' validation twins)."""


@dataclass(frozen=True)
class Searched:
    """What a stage's search left: the adapter it trains on with, the trials, the winner."""

    adapter: str
    val_row: ValRow
    trials: list[auto.Trial]
    chosen: auto.Trial
    feasible: bool
    summary: dict[str, Any]
    compute_seconds: float
    refusal: str = ""
    """One line when no lambda in range kept the budget ('' otherwise)."""


def retry_options(lx: Lineage) -> dict[str, Any]:
    o = lx.cfg.orchestration
    return {"retries": o.launch_retries, "retry_delay_seconds": o.retry_delay_seconds}


def search(
    lx: Lineage,
    base_path: str,
    key: plan.StageKey,
    paths: StepPaths,
    run: RunRef,
    val_rows: list[ValRow],
    higher_is_better: dict[str, bool],
    warm: float | None,
) -> Searched:
    """Stage ``key.stage``'s lambda: trials until the search ends, then the stage's adapter at the winner's.
    ``val_rows``: the validation scores of R's rows before the stage; ``higher_is_better``: each column's."""
    cfg, t = lx.cfg, key.stage
    settings, budget = cfg.lalora.auto, cfg.budget
    stage_steps = cfg.stage_training(t).steps
    steps = max(1, round(stage_steps * settings.trial_share))
    folder = Path(paths.out) / "auto"
    resolution = budget_line(cfg)
    if resolution:
        log.info("stage %d (%s): %s", t, key.domain, resolution)
    trials = _recorded_trials(lx, folder, key, run)
    while (lam := auto.next_lambda(trials, settings, budget, warm)) is not None:
        trials.append(_trial(lx, base_path, key, paths, run, (val_rows, higher_is_better), len(trials) + 1, lam, steps))
        write_json_atomic(folder / "trials.json", {"key": _key(key), "trials": [x.as_json() for x in trials]})
    chosen, feasible = auto.choose(trials, budget, settings.choice)
    most = auto.choose(trials, budget)[0]
    if chosen is not most and (gap := auto.paired_gap(most, chosen)) is not None:
        log.info(
            "stage %d (%s): lambda %.4g learned %.4f less than %.4g on the validation rows, within one paired "
            "standard error (%.4f): one_se takes the more penalised",
            t,
            key.domain,
            chosen.lam,
            gap[0],
            most.lam,
            gap[1],
        )
    summary = auto.summary(trials, chosen, feasible, budget, stage_steps, settings.choice)
    work = sum(x.seconds for x in trials)
    adapter, val_row = chosen.adapter, chosen.scores
    if chosen.steps < stage_steps:  # the trials were shortened: the stage trains in full at the chosen lambda
        tuned = stage_task(
            FINETUNE, Job(cfg=cfg.with_stage(t, lam=chosen.lam), stage=t, paths=paths), run, **retry_options(lx)
        )
        final = _validation(lx, base_path, tuned.value.adapter, folder / "final-val.json")
        adapter, val_row = tuned.value.adapter, final.value
        work = work + tuned.compute_seconds + final.compute_seconds
    refusal = "" if feasible else auto.refusal(trials, chosen, budget, settings)
    _log_choice(run, summary, refusal)
    return Searched(adapter, val_row, trials, chosen, feasible, summary, work, refusal)


def _key(key: plan.StageKey) -> str:
    return f"{key.config_sha256}-{key.data_sha256}"


def _trial(
    lx: Lineage,
    base_path: str,
    key: plan.StageKey,
    paths: StepPaths,
    run: RunRef,
    before: tuple[list[ValRow], dict[str, bool]],
    k: int,
    lam: float,
    steps: int,
) -> auto.Trial:
    """Trial ``k``: the stage's fine-tune at ``lam`` for ``steps`` steps as a nested run, scored on validation."""
    cfg, t = lx.cfg, key.stage
    domain = cfg.domains[t - 1].name
    out = Path(paths.out) / "auto" / f"trial-{k:02d}"
    checkpoint = out / "checkpoints" / f"{key.config_sha256[:16]}-{key.data_sha256[:16]}"
    tags = {"lalora.stage": str(t), "lalora.domain": domain, "lalora.lineage": lx.model, "lalora.trial": str(k)}
    child = lx.start_run(f"stage {t}: {domain}, trial {k} (lambda {lam:.4g})", parent=run.run_id, tags=tags)
    try:
        child.tracker().log_params({"trial.index": k, "trial.lambda": lam, "trial.steps": steps})
        job = Job(
            cfg=cfg.with_stage(t, lam=lam, steps=steps),
            stage=t,
            paths=replace(paths, out=str(out), checkpoint=str(checkpoint)),
        )
        tuned = stage_task(FINETUNE, job, child, **retry_options(lx))
        scored = _validation(lx, base_path, tuned.value.adapter, out / "val.json")
        columns = gated_columns(lx, t)
        learning, forgetting = auto.validation_metrics(
            columns, t, before[0], scored.value, [before[1][c] for c in columns]
        )
        own = scored.rows.get(domain, [])
        sign = 1.0 if before[1][domain] else -1.0
        seconds = tuned.compute_seconds + scored.compute_seconds
        trial = auto.Trial(
            k,
            lam,
            steps,
            learning,
            forgetting,
            seconds,
            tuned.value.adapter,
            tuned.value.quadratic,
            scored.value,
            child.run_id,
            list(cfg.lalora.auto.columns or []),
            [sign * v for v in own],
        )
        _log_trial(child, trial)
        end_run(child)
    except BaseException:
        end_run(child, "FAILED")
        raise
    _report(trial, t, domain, cfg.budget)
    return trial


def _report(trial: auto.Trial, t: int, domain: str, budget: float) -> None:
    over = "" if trial.feasible(budget) else f" over the budget {budget:g}"
    log.info(
        "stage %d (%s), trial %d: lambda %.4g, validation learning %+.3f, forgetting %.3f (%s)%s",
        t,
        domain,
        trial.index,
        trial.lam,
        trial.learning,
        trial.max_forgetting,
        trial.worst or "-",
        over,
    )


def _log_trial(child: RunRef, trial: auto.Trial) -> None:
    child.tracker().log_metrics(
        {
            "trial/validation_learning": trial.learning,
            "trial/validation_forgetting": trial.max_forgetting,
            "trial/seconds": trial.seconds,
            "trial/lambda": trial.lam,
            "trial/steps": float(trial.steps),
            **({"trial/predicted_loss_rise": trial.predicted} if trial.predicted is not None else {}),
            **{f"val/{d}/forgetting": f for d, f in trial.forgetting.items()},
            **{f"val/{d}/score": s for d, s in trial.scores.items()},
        }
    )


def _log_choice(run: RunRef, summary: dict[str, Any], refusal: str) -> None:
    tracker = run.tracker()
    tracker.log_metrics(
        {
            "auto/lambda": summary["lambda"],
            "auto/trials": float(summary["trials"]),
            "auto/feasible": float(summary["feasible"]),
            "auto/compute": summary["compute"],
            "auto/validation_forgetting": summary["validation_forgetting"],
            "auto/validation_learning": summary["validation_learning"],
        }
    )
    tracker.set_tags({"lalora.auto_lambda": f"{summary['lambda']:.6g}", "lalora.auto_trials": str(summary["trials"])})
    if refusal:
        log.warning("%s", refusal)


def _recorded_trials(lx: Lineage, folder: Path, key: plan.StageKey, run: RunRef) -> list[auto.Trial]:
    """The trials an interrupted run of this same stage finished (its adapters still here), each recorded again
    as a nested run of this stage's run, pointing at the run it came from."""
    path = folder / "trials.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    if saved.get("key") != _key(key):
        return []
    trials = []
    for data in saved["trials"]:
        trial = auto.Trial.from_json(data)
        if not (Path(trial.adapter) / "adapter_config.json").is_file():
            break
        child = lx.start_run(
            f"stage {key.stage}: {key.domain}, trial {trial.index} (lambda {trial.lam:.4g}, "
            "recorded by an interrupted run)",
            parent=run.run_id,
            tags={
                "lalora.stage": str(key.stage),
                "lalora.domain": key.domain,
                "lalora.lineage": lx.model,
                "lalora.trial": str(trial.index),
                "lalora.trial_run": trial.run_id,
            },
        )
        child.tracker().log_params({"trial.index": trial.index, "trial.lambda": trial.lam, "trial.steps": trial.steps})
        _log_trial(child, trial)
        end_run(child)
        trials.append(trial)
    if trials:
        log.info(
            "stage %d (%s): resuming the lambda search after %d recorded trial(s)", key.stage, key.domain, len(trials)
        )
    return trials


def gated_columns(lx: Lineage, t: int) -> list[str]:
    """The columns the gate reads after stage ``t``: the source, the domains up to it, the probes."""
    return [*lx.domains[: t + 1], *(d.name for d in lx.cfg.probes)]


@dataclass(frozen=True)
class Validated:
    """An adapter's validation scores, the seconds they took, and each domain's per-row shares of its score."""

    value: ValRow
    compute_seconds: float
    rows: dict[str, list[float]]


def _validation(lx: Lineage, base_path: str, adapter: str, out: Path, names: set[str] | None = None) -> Validated:
    """The adapter's validation score on every domain and probe (or on those ``names``)."""
    domains = [d for d in lx.cfg.eval_domains if names is None or d.name in names]
    scored = scores(lx.cfg, base_path, adapter, domains, str(out), str(lx.shared.data), "val")
    return Validated(
        {d: s.score for d, s in scored.value.items()},
        scored.compute_seconds,
        {d: s.per_row for d, s in scored.value.items()},
    )


def validation_rows(lx: Lineage, base_path: str, done: list[plan.Recorded], init: str | None) -> list[ValRow]:
    """Validation scores of rows 0..len(done): from the newest version when it holds them, the missing ones
    (versions from before the lineage searched, domains appended since) scored by that row's adapter."""
    rows: list[ValRow] = []
    if done and done[-1].uri("val_rows"):
        rows = lx.registry.fetch_json(done[-1].uri("val_rows"), "val_rows.json")
    rows = rows[: len(done) + 1]
    for i in range(len(done) + 1):
        have = rows[i] if i < len(rows) else {}
        missing = {d.name for d in lx.cfg.eval_domains} - have.keys()
        if not missing:
            continue
        if i == 0:
            adapter = init or initial_adapter(lx.cfg, base_path, str(lx.ws.init_adapter))
        else:
            adapter = fetch_task(lx.registry, done[i - 1].uri("adapter"), "adapter")
        scored = _validation(lx, base_path, adapter, lx.ws.root / "fill" / f"val-row{i}.json", missing).value
        row = {**scored, **have}
        rows = [*rows[:i], row, *rows[i + 1 :]] if i < len(rows) else [*rows, row]
    return rows


def validation_row(lx: Lineage, base_path: str, adapter: str, out: Path) -> ValRow:
    """A fixed-lambda stage's row of validation scores, in a lineage that searches in another stage."""
    return _validation(lx, base_path, adapter, out).value
