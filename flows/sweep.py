"""The sweep flow: one lineage per (curvature, lambda, seed) as child runs of one MLflow run.

Points run one after another on this device (each lineage is a Prefect subflow). They share
one MLflow store and experiment under the sweep's output directory, each registers its
adapters under its own model name, and the tiny base is pretrained once and reused. Rerun
into the same directory, a point whose lineage is already recorded is reported, not rerun.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.lineage import lineage_flow
from flows.tracking import _client, close_orphaned_runs, end_run, is_local_store, start_run, tracking_uri
from pipelines.config import load_config
from pipelines.engine import DivergenceError
from pipelines.sweep import PointResult, aggregate, format_table, plot_pareto, point_overrides, sweep_json, sweep_points
from pipelines.workspace import write_json_atomic

log = logging.getLogger(__name__)


@flow(name="lalora-sweep")
def sweep_flow(config_path: str, out_dir: str, lambdas: list[float], curvatures: list[str], seeds: int,
               overrides: list[str] | None = None, stages: int | None = None) -> dict[str, Any]:
    """Run every point, then write ``sweep.json``, ``sweep.md`` and ``pareto.png`` and log them to MLflow."""
    overrides = list(overrides or [])
    cfg = load_config(config_path, overrides)
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking.mlflow_uri, root)
    points = sweep_points(lambdas, curvatures, seeds)
    per_point = {p.label: point_overrides(p, cfg, uri, stages) for p in points}  # validates --stages up front
    close_orphaned_runs(uri, cfg.tracking.experiment, "lalora.sweep", cfg.name)  # left RUNNING by a killed sweep
    parent = start_run(uri, cfg.tracking.experiment, root / "mlartifacts" if is_local_store(uri) else None,
                       f"sweep: {cfg.name}",
                       tags={"lalora.sweep": cfg.name})
    tracker = parent.tracker()
    tracker.log_params({"sweep.lambdas": ",".join(f"{v:g}" for v in lambdas), "sweep.curvatures": ",".join(curvatures),
                        "sweep.seeds": seeds, "sweep.points": len(points), "sweep.stages": stages or len(cfg.domains)})
    client = _client(uri)
    results: list[PointResult] = []
    failed: list[dict[str, str]] = []
    first_dir: Path | None = None
    t_all = time.perf_counter()
    try:
        for i, point in enumerate(points, start=1):
            point_dir = root / "points" / point.label
            if first_dir is not None and not cfg.model.path and (first_dir / "base").is_dir() \
                    and not (point_dir / "base").exists():
                point_dir.mkdir(parents=True, exist_ok=True)
                shutil.copytree(first_dir / "base", point_dir / "base")  # reused: same recipe, no pretraining
            log.info("sweep point %d/%d: %s", i, len(points), point.label)
            t0 = time.perf_counter()
            try:
                metrics = lineage_flow(config_path, str(point_dir), [*overrides, *per_point[point.label]])
            except DivergenceError as e:
                failed.append({"point": point.label, "reason": str(e)})
                log.warning("sweep point %s diverged and is left out of the table: %s", point.label, e)
                continue
            first_dir = first_dir or point_dir
            if metrics["run_id"] is not None:  # None: the point's lineage was already finished (a rerun of the sweep)
                client.set_tag(metrics["run_id"], "mlflow.parentRunId", parent.run_id)
                client.set_tag(metrics["run_id"], "lalora.sweep_point", point.label)
            results.append(PointResult.from_metrics(point, metrics, time.perf_counter() - t0))
        rows = aggregate(results)
        table = format_table(rows)
        seconds = time.perf_counter() - t_all
        summary = sweep_json(rows, results, {"config": str(config_path), "mlflow_uri": uri, "run_id": parent.run_id,
                                             "failed": failed, "seconds": seconds})
        write_json_atomic(root / "sweep.json", summary)
        (root / "sweep.md").write_text(table + "\n")
        title = f"{cfg.name}: learning vs forgetting ({seeds} seed{'s' if seeds > 1 else ''})"
        plot = plot_pareto(rows, root / "pareto.png", title)
        for r in rows:
            tracker.log_metrics({f"{r.curvature}/lambda{r.lam:g}/learning": r.learning,
                                 f"{r.curvature}/lambda{r.lam:g}/forgetting": r.forgetting})
        for path in (root / "sweep.json", root / "sweep.md", plot):
            tracker.log_artifact(path)
        end_run(parent)
        return summary
    except BaseException:
        end_run(parent, "FAILED")
        raise
