"""The sweep flow: one lineage per point of a grid of config fields, as child runs of one MLflow run.

Points run one after another on this device (each lineage is a Prefect subflow, given its config
as a value). They share one MLflow store and experiment under the sweep's output directory, each
registers its adapters under its own model name, and the tiny base is pretrained once and reused.
Rerun into the same directory, a point whose lineage is already recorded is reported, not rerun.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.lineage_flow import lineage_flow
from flows.runs import RunRef, close_orphaned_runs, end_run, is_local_store, start_run, tracking_uri
from pipelines.config import LineageConfig, load_config
from pipelines.errors import DivergenceError
from pipelines.lineage.sweep import (
    Axis,
    PointResult,
    SweepPoint,
    aggregate,
    forgetting_label,
    format_table,
    plot_pareto,
    point_config,
    sweep_json,
    sweep_points,
)
from pipelines.workspace import write_json_atomic

log = logging.getLogger(__name__)


@flow(name="lalora-sweep")
def sweep_flow(
    config_path: str,
    out_dir: str,
    axes: list[tuple[str, list[Any]]],
    seeds: int,
    overrides: list[str] | None = None,
    stages: int | None = None,
    forgetting_on: list[str] | None = None,
    first_seed: int = 0,
) -> dict[str, Any]:
    """Run every point (seeds ``first_seed`` .. ``first_seed + seeds - 1``), then write ``sweep.json``,
    ``sweep.md`` and ``pareto.png`` and log them to MLflow; returns sweep.json's contents."""
    cfg = load_config(config_path, overrides)
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking.mlflow_uri, root)
    points = sweep_points([Axis(f, tuple(v)) for f, v in axes], seeds, first_seed)
    configs = {p.label: point_config(cfg, p, uri, stages) for p in points}  # every point valid before any runs
    close_orphaned_runs(uri, cfg.tracking.experiment, "lalora.sweep", cfg.name)  # left RUNNING by a killed sweep
    parent = start_run(
        uri,
        cfg.tracking.experiment,
        root / "mlartifacts" if is_local_store(uri) else None,
        f"sweep: {cfg.name}",
        tags={"lalora.sweep": cfg.name},
    )
    params = {f"sweep.{f}": ",".join(map(str, v)) for f, v in axes}
    sizes = {"sweep.seeds": seeds, "sweep.first_seed": first_seed, "sweep.points": len(points)}
    parent.tracker().log_params(params | sizes | {"sweep.stages": stages or len(cfg.domains)})
    t0 = time.perf_counter()
    try:
        results, failed = _run_points(config_path, root, cfg, points, configs, uri, parent.run_id)
        run = {"config": str(config_path), "mlflow_uri": uri, "run_id": parent.run_id}
        summary = _write(root, cfg, results, failed, forgetting_on, seeds, run | {"seconds": time.perf_counter() - t0})
        tracker = parent.tracker()
        for row in summary["rows"]:
            label = row["label"]
            tracker.log_metrics({f"{label}/learning": row["learning"], f"{label}/forgetting": row["forgetting"]})
        for path in ("sweep.json", "sweep.md", "pareto.png"):
            tracker.log_artifact(root / path)
        end_run(parent)
        return summary
    except BaseException:
        end_run(parent, "FAILED")
        raise


def _run_points(
    config_path: str,
    root: Path,
    cfg: LineageConfig,
    points: list[SweepPoint],
    configs: dict[str, LineageConfig],
    uri: str,
    parent: str,
) -> tuple[list[PointResult], list[dict[str, str]]]:
    """Each point's lineage in turn; a diverged one is left out of the table and named."""
    results: list[PointResult] = []
    failed: list[dict[str, str]] = []
    first_dir: Path | None = None
    for i, point in enumerate(points, start=1):
        point_dir = root / "points" / point.label
        if (
            first_dir is not None
            and not cfg.model.path
            and (first_dir / "base").is_dir()
            and not (point_dir / "base").exists()
        ):
            point_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(first_dir / "base", point_dir / "base")  # reused: same recipe, no pretraining
        log.info("sweep point %d/%d: %s", i, len(points), point.label)
        t0 = time.perf_counter()
        try:
            result = lineage_flow(config_path, str(point_dir), config=configs[point.label].as_json())
        except DivergenceError as e:
            failed.append({"point": point.label, "reason": str(e)})
            log.warning("sweep point %s diverged and is left out of the table: %s", point.label, e)
            continue
        first_dir = first_dir or point_dir
        if result.run_id is not None:  # None: the point's lineage was already finished (a rerun of the sweep)
            RunRef(uri, result.run_id).tracker().set_tags(
                {"mlflow.parentRunId": parent, "lalora.sweep_point": point.label}
            )
        results.append(PointResult.of(point, result, time.perf_counter() - t0))
    return results, failed


def _write(
    root: Path,
    cfg: LineageConfig,
    results: list[PointResult],
    failed: list[dict[str, str]],
    forgetting_on: list[str] | None,
    seeds: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """sweep.json, sweep.md and pareto.png of the points' results."""
    rows = aggregate(results, forgetting_on)
    label = forgetting_label(results, forgetting_on)
    summary = sweep_json(rows, results, {**extra, "failed": failed, "forgetting_on": label})
    write_json_atomic(root / "sweep.json", summary)
    (root / "sweep.md").write_text(format_table(rows, label) + "\n")
    plot_pareto(
        rows, root / "pareto.png", f"{cfg.name}: learning vs forgetting ({seeds} seed{'s' if seeds > 1 else ''})", label
    )
    return summary
