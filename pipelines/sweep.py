"""The learning-forgetting study: sweep points, their aggregation, the table and the Pareto plot.

A sweep runs one lineage per (curvature, lambda, seed). lambda = 0 is plain LoRA whatever
the curvature, so it runs once per seed as the ``plain`` baseline; ``identity`` (plain L2
towards the anchor) is the other baseline. Each point is summarised by the paper's two
numbers: learning, the mean gain on each new domain when it is learned
(mean_t R[t][t] - R[t-1][t]), and forgetting, the mean over earlier domains of the drop from
their best score (Chaudhry et al.), then mean and spread over seeds.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import LineageConfig
from pipelines.errors import BadInput
from pipelines.report import TradeOffPoint, pareto_front

PLAIN = "plain"


@dataclass(frozen=True)
class SweepPoint:
    curvature: str
    """A curvature kind, or ``plain`` for lambda = 0."""
    lam: float
    seed: int

    @property
    def label(self) -> str:
        return f"{self.curvature}-lambda{self.lam:g}-seed{self.seed}"

    @property
    def series(self) -> str:
        return self.curvature


def sweep_points(lambdas: list[float], curvatures: list[str], seeds: int) -> list[SweepPoint]:
    """Plain LoRA once per seed, then every curvature at every positive lambda."""
    if seeds < 1:
        raise BadInput(f"--seeds must be >= 1, got {seeds}")
    if any(v < 0 for v in lambdas):
        raise BadInput(f"lambda values must be >= 0, got {lambdas}")
    points = []
    for seed in range(seeds):
        if 0.0 in lambdas:
            points.append(SweepPoint(PLAIN, 0.0, seed))
        points += [SweepPoint(c, lam, seed) for c in curvatures for lam in lambdas if lam > 0]
    if not points:
        raise BadInput("the sweep has no points: give at least one lambda (0 for plain LoRA) and one curvature")
    return points


def point_overrides(point: SweepPoint, cfg: LineageConfig, tracking_uri: str, stages: int | None) -> list[str]:
    """``--set`` overrides that turn the base config into this point's lineage."""
    out = [f"lalora.lambda={point.lam!r}", f"lora.init_seed={point.seed}", f"training.seed={point.seed}",
           f"tracking.mlflow_uri={tracking_uri}",
           f"tracking.registered_model={cfg.tracking.registered_model}-{point.label}"]
    if point.curvature != PLAIN:
        current = cfg.lalora.curvature.model_dump()
        spec: dict[str, Any] = {"kind": point.curvature}
        if point.curvature != "identity":  # keep the Fisher settings the config chose
            spec |= {k: v for k, v in current.items() if k in ("fisher_type", "mc_samples")}
        out.append(f"lalora.curvature={json.dumps(spec)}")
    if stages is not None:
        if not 1 <= stages <= len(cfg.domains):
            raise BadInput(f"--stages must be between 1 and {len(cfg.domains)} (the config's domains), got {stages}")
        kept = [d.model_dump(mode="json", by_alias=True, exclude_unset=True) for d in cfg.domains[:stages]]
        out.append(f"domains={json.dumps(kept)}")
    return out


@dataclass
class PointResult:
    point: SweepPoint
    run_id: str
    learning: float
    forgetting: float
    ACC: float
    BWT: float
    source_final: float
    R: list[list[float]]
    seconds: float

    @staticmethod
    def from_metrics(point: SweepPoint, metrics: dict[str, Any], seconds: float) -> PointResult:
        R = metrics["R"]
        return PointResult(point, metrics["run_id"], float(metrics["mean_learning"]), float(metrics["mean_forgetting"]),
                           float(metrics["ACC"]), float(metrics["BWT"]), float(R[-1][0]), R, seconds)


@dataclass
class SeriesRow:
    """One (curvature, lambda) cell of the table: mean and spread over seeds."""

    curvature: str
    lam: float
    n: int
    learning: float
    learning_sd: float
    forgetting: float
    forgetting_sd: float
    ACC: float
    BWT: float
    source_final: float
    run_ids: list[str] = field(default_factory=list)
    pareto: bool = False


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[PointResult]) -> list[SeriesRow]:
    """Rows per (curvature, lambda) in sweep order, with the Pareto-optimal ones marked.

    A row is Pareto-optimal when no other row learns at least as much and forgets at most as
    much, with one of the two strictly better (means over seeds).
    """
    groups: dict[tuple[str, float], list[PointResult]] = {}
    for r in results:
        groups.setdefault((r.point.curvature, r.point.lam), []).append(r)
    rows = []
    for (curv, lam), rs in groups.items():
        rows.append(SeriesRow(
            curv, lam, len(rs),
            statistics.fmean(r.learning for r in rs), _sd([r.learning for r in rs]),
            statistics.fmean(r.forgetting for r in rs), _sd([r.forgetting for r in rs]),
            statistics.fmean(r.ACC for r in rs), statistics.fmean(r.BWT for r in rs),
            statistics.fmean(r.source_final for r in rs), [r.run_id for r in rs]))
    for i in pareto_front([TradeOffPoint(r.learning, r.forgetting) for r in rows]):
        rows[i].pareto = True
    return rows


def format_table(rows: list[SeriesRow]) -> str:
    """A Markdown table: one row per (curvature, lambda), Pareto-optimal rows marked *."""
    lines = ["| curvature | lambda | seeds | learning | forgetting | ACC | BWT | source after last stage | Pareto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pm = lambda m, s: f"{m:.3f}" + (f" +- {s:.3f}" if r.n > 1 else "")  # noqa: E731
        lines.append(f"| {r.curvature} | {r.lam:g} | {r.n} | {pm(r.learning, r.learning_sd)} | "
                     f"{pm(r.forgetting, r.forgetting_sd)} | {r.ACC:.3f} | {r.BWT:+.3f} | {r.source_final:.3f} | "
                     f"{'*' if r.pareto else ''} |")
    return "\n".join(lines)


def plot_pareto(rows: list[SeriesRow], path: Path, title: str) -> Path:
    """Learning (y) against forgetting (x) per curvature series, error bars over seeds, lambda annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    series: dict[str, list[SeriesRow]] = {}
    for r in rows:
        series.setdefault(r.curvature, []).append(r)
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r.lam)
        marker = "*" if name == PLAIN else "o"
        ax.errorbar([r.forgetting for r in rs], [r.learning for r in rs],
                    xerr=[r.forgetting_sd for r in rs], yerr=[r.learning_sd for r in rs],
                    marker=marker, markersize=12 if name == PLAIN else 6, capsize=3,
                    linestyle="-" if len(rs) > 1 else "none", label="plain LoRA (lambda 0)" if name == PLAIN else name)
        for r in rs:
            ax.annotate(f"{r.lam:g}", (r.forgetting, r.learning), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.forgetting)
    if len(front) > 1:
        ax.plot([r.forgetting for r in front], [r.learning for r in front], color="grey", linestyle=":",
                linewidth=1, label="Pareto front")
    ax.set_xlabel("forgetting (mean drop of earlier domains from their best)")
    ax.set_ylabel("learning (mean gain on each new domain)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_json(rows: list[SeriesRow], results: list[PointResult], extra: dict[str, Any]) -> dict[str, Any]:
    return {"rows": [asdict(r) for r in rows],
            "points": [{**asdict(r), "point": {**asdict(r.point), "label": r.point.label}} for r in results], **extra}
