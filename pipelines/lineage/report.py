"""The lineage's results: R matrices, continual-learning metrics, metrics.json and plots.

R holds each domain's own score (``metric``: accuracy, acc_norm, nll, ...); ``R_scores`` holds
one matrix per score name (None where a domain does not report it); ``R_nll`` every domain's
target-token NLL. Columns: the source, the stages' domains, then the probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lalora import continual_metrics
from pipelines.scoring.scores import Row


@dataclass
class LineageReport:
    domains: list[str]
    R: list[list[float]]
    R_nll: list[list[float]]
    metrics: dict[str, Any]
    R_scores: dict[str, list[list[float | None]]] = field(default_factory=dict)
    scores: list[str] = field(default_factory=list)
    """The score in R of each domain."""
    higher_is_better: list[bool] = field(default_factory=list)

    @property
    def n_stages(self) -> int:
        return len(self.R) - 1

    def as_json(
        self, registered_model: str, versions: list[str], extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {
            "domains": self.domains,
            "R": self.R,
            "R_nll": self.R_nll,
            "R_scores": self.R_scores,
            "scores": dict(zip(self.domains, self.scores, strict=True)),
            "higher_is_better": dict(zip(self.domains, self.higher_is_better, strict=True)),
            "probes": self.domains[self.n_stages + 1 :],
            **self.metrics,
            "registered_model": registered_model,
            "versions": versions,
            **(extra or {}),
        }

    def flat_metrics(self) -> dict[str, float]:
        """Scalars for a tracker: ACC, BWT, FWT, means, and ``forgetting/<domain>``, ``learning/<domain>``."""
        m = self.metrics
        out = {
            k: float(m[k])
            for k in ("ACC", "BWT", "FWT", "mean_forgetting", "mean_learning", "source_forgetting")
            if m.get(k) is not None
        }
        out |= {f"forgetting/{d}": float(v) for d, v in m["forgetting"].items()}
        out |= {f"learning/{d}": float(v) for d, v in m["learning"].items()}
        return out

    def stage_metrics(self) -> list[dict[str, float]]:
        """Row i of every R as ``R/<domain>`` and ``R_nll/<domain>``: a tracker's step i (score over stages)."""
        return [
            {
                **{f"R/{d}": v for d, v in zip(self.domains, row, strict=True)},
                **{f"R_nll/{d}": v for d, v in zip(self.domains, nll, strict=True)},
            }
            for row, nll in zip(self.R, self.R_nll, strict=True)
        ]


def build_report(domains: list[str], rows: list[Row]) -> LineageReport:
    """``rows[i][domain]`` holds the score after stage i. Columns past ``len(rows)`` (T + 1) are probes."""
    first = rows[0]
    scores = [first[d].metric for d in domains]
    up = [first[d].higher_is_better for d in domains]
    R = [[float(row[d].score) for d in domains] for row in rows]
    R_nll = [[float(row[d].nll) for d in domains] for row in rows]
    names = sorted({k for row in rows for s in row.values() for k, v in s.values.items() if isinstance(v, float)})
    R_scores = {k: [[row[d].values.get(k) for d in domains] for row in rows] for k in names}
    m = continual_metrics(R, up)
    metrics = {
        "ACC": m.ACC,
        "BWT": m.BWT,
        "FWT": m.FWT,
        "forgetting": {domains[j]: v for j, v in zip(m.forgetting_columns, m.forgetting, strict=True)},
        "mean_forgetting": m.mean_forgetting,
        "source_forgetting": m.source_forgetting,
        "learning": dict(zip(domains[1 : len(rows)], m.learning, strict=True)),
        "mean_learning": m.mean_learning,
        "averaged": [domains[j] for j in m.averaged],
    }
    return LineageReport(domains, R, R_nll, metrics, R_scores, scores, up)


@dataclass(frozen=True)
class Promotion:
    """The gate's verdict on a new version."""

    stage: int
    promoted: bool
    reason: str = ""


@dataclass(frozen=True)
class StageTiming:
    """Where a stage's wall time went: the pipelines work in its tasks, and everything around it."""

    stage: int
    wall_seconds: float
    compute_seconds: float

    @property
    def overhead_seconds(self) -> float:
        return self.wall_seconds - self.compute_seconds

    def as_json(self) -> dict[str, float]:
        return {
            "stage": self.stage,
            "wall_seconds": self.wall_seconds,
            "compute_seconds": self.compute_seconds,
            "overhead_seconds": self.overhead_seconds,
        }


@dataclass(frozen=True)
class LineageResult:
    """What a lineage run ends with; ``as_json`` is metrics.json."""

    report: LineageReport
    registered_model: str
    versions: list[str]
    mlflow_uri: str
    run_id: str | None
    """the run's MLflow parent run (None: nothing was recorded)"""
    lam: float | str
    """lalora.lambda: a number, or 'auto'"""
    curvature: str
    config_sha256: str
    stages_skipped: list[int]
    stages_run: list[int]
    promotion: dict[str, Promotion]
    """by version"""
    aliases: dict[str, str]
    timing: list[StageTiming]
    environment: dict[str, str] = field(default_factory=dict)
    """what can change the numbers besides the config (pipelines.runtime.environment.numerics)"""
    auto: dict[str, dict[str, Any]] = field(default_factory=dict)
    """by stage: what its lambda search chose (lambda auto; empty otherwise)"""

    def as_json(self) -> dict[str, Any]:
        return self.report.as_json(
            self.registered_model,
            self.versions,
            {
                "mlflow_uri": self.mlflow_uri,
                "run_id": self.run_id,
                "lambda": self.lam,
                "curvature": self.curvature,
                "config_sha256": self.config_sha256,
                "stages_skipped": self.stages_skipped,
                "stages_run": self.stages_run,
                "promotion": {v: asdict(p) for v, p in self.promotion.items()},
                "aliases": self.aliases,
                "timing": [t.as_json() for t in self.timing],
                "environment": self.environment,
                **({"auto": self.auto} if self.auto else {}),
            },
        )


def format_matrix(
    domains: list[str], R: list[list[float]], title: str | None = None, scores: Sequence[str] | None = None
) -> str:
    """R as text; the title names the scores (``R (accuracy)`` when every domain is scored by accuracy)."""
    if title is None:
        title = f"R ({', '.join(dict.fromkeys(scores or ['accuracy']))})"
    width = max(8, *(len(d) for d in domains)) + 1
    head = f"{title:<16}" + "".join(f"{d:>{width}}" for d in domains)
    lines = [head]
    for i, row in enumerate(R):
        label = "before stages" if i == 0 else f"after {i}: {domains[i]}"
        lines.append(f"{label[:16]:<16}" + "".join(f"{v:>{width}.3f}" for v in row))
    return "\n".join(lines)


def format_summary(report: LineageReport) -> str:
    m = report.metrics
    forg = ", ".join(f"{k} {v:+.3f}" for k, v in m["forgetting"].items())
    learn = ", ".join(f"{k} {v:+.3f}" for k, v in m["learning"].items())
    fwt = "n/a" if m["FWT"] is None else f"{m['FWT']:+.3f}"
    return (
        f"ACC {m['ACC']:.3f}   BWT {m['BWT']:+.3f}   FWT {fwt}   mean forgetting {m['mean_forgetting']:.3f}\n"
        f"forgetting: {forg}\nlearning:   {learn}"
    )


def lambda_text(lam: float | str) -> str:
    return lam if isinstance(lam, str) else f"{lam:g}"


def auto_text(summary: dict[str, Any]) -> str:
    """One sentence: what a stage's lambda search chose, and at what cost."""
    if "budget" not in summary:  # as an earlier run's version records it
        return f"lambda auto chose {summary['lambda']:.4g} after {summary['trials']} trial(s)."
    within = "within" if summary["feasible"] else "over"
    return (
        f"lambda auto chose {summary['lambda']:.4g} after {summary['trials']} trial(s) "
        f"({summary['compute']:.2g}x the stage's steps): validation forgetting "
        f"{summary['validation_forgetting']:.3f} ({within} the budget {summary['budget']:g}), learning "
        f"{summary['validation_learning']:+.3f}."
    )


def version_description(
    model: str,
    stage: int,
    domain: str,
    domains: list[str],
    row: list[float],
    scores: list[str],
    promoted: bool,
    reason: str,
    champion: str,
    auto: str = "",
) -> str:
    """What a person reads on a registered version: the stage, R after it, the gate's verdict, how to load it."""
    r = ", ".join(f"{d} {v:.3f}" for d, v in zip(domains, row, strict=True))
    verdict = f"promoted (alias {champion} moved here)" if promoted else f"not promoted: {reason}"
    return (
        f"Stage {stage} of lineage {model}: adapted to {domain}.\n\n"
        f"R after the stage ({', '.join(dict.fromkeys(scores))}): {r}.\n\n"
        + (f"{auto}\n\n" if auto else "")
        + f"Promotion gate: {verdict}.\n\n"
        "A python_function model: greedy completions of prompts by the base model with this stage's adapter "
        "(the base is referenced, not copied). Serve it with `mlflow models serve -m models:/NAME/VERSION`; "
        "export it with `lalora export models:/NAME/VERSION --out DIR [--merge]`. Self-contained: the code it "
        "runs is in its code/ folder and its requirements.txt pins what logged it, torch included (a CPU build "
        "of that version satisfies it; a GPU host installs its own build of the same torch version first)."
    )


def markdown_summary(
    report: LineageReport,
    promotion: dict[str, Promotion],
    model: str,
    champion: str,
    auto: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The outcome of a lineage run as Markdown (the Prefect UI shows it): R, the metrics, the promotions."""
    head = "| after stage | " + " | ".join(report.domains) + " |"
    lines = [f"# Lineage {model}", "", head, "|" + "---|" * (len(report.domains) + 1)]
    for i, row in enumerate(report.R):
        label = "before any stage" if i == 0 else f"{i}: {report.domains[i]}"
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += ["", "```", format_summary(report), "```", "", "## Promotion", ""]
    for version, p in promotion.items():
        verdict = f"promoted to `{champion}`" if p.promoted else f"not promoted: {p.reason}"
        lines.append(f"- version {version} (stage {p.stage}): {verdict}")
    if not promotion:
        lines.append("- no new version in this run")
    if auto:
        lines += ["", "## lambda auto", ""] + [f"- stage {stage}: {auto_text(s)}" for stage, s in auto.items()]
    return "\n".join(lines) + "\n"


# --- plots -----------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _shade(column: list[float], up: bool) -> list[float]:
    """Colour values in [0, 1], brighter = better: accuracies as they are, other scores min-max per column."""
    if up and all(0.0 <= v <= 1.0 for v in column):
        return column
    lo, hi = min(column), max(column)
    scaled = [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in column]
    return scaled if up else [1.0 - v for v in scaled]


def plot_heatmap(
    domains: list[str],
    R: list[list[float]],
    path: Path,
    title: str,
    higher_is_better: Sequence[bool] | None = None,
    scores: Sequence[str] | None = None,
) -> Path:
    """R as an annotated heatmap (rows: after stage i, columns: domain j; probes after a line)."""
    plt = _pyplot()
    up = list(higher_is_better) if higher_is_better is not None else [True] * len(domains)
    columns = [_shade([row[j] for row in R], up[j]) for j in range(len(domains))]
    shade = [[columns[j][i] for j in range(len(domains))] for i in range(len(R))]
    fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 1.1 * len(domains)), 1.6 + 0.7 * len(R)))
    im = ax.imshow(shade, vmin=0.0, vmax=1.0, cmap="viridis")
    labels = [f"{d}\n({s})" for d, s in zip(domains, scores, strict=True)] if scores else domains
    ax.set_xticks(range(len(domains)), labels=labels, rotation=30, ha="right")
    ax.set_yticks(range(len(R)), labels=["before"] + [f"after {d}" for d in domains[1 : len(R)]])
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", color="white" if shade[i][j] < 0.6 else "black", fontsize=9
            )
    if len(domains) > len(R):
        ax.axvline(len(R) - 0.5, color="white", linewidth=2)
    ax.set_xlabel("evaluated on domain" + (" (probes right of the white line)" if len(domains) > len(R) else ""))
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="better →")
    return _save(fig, path)


def plot_scores(
    domains: list[str], R: list[list[float]], path: Path, title: str, scores: Sequence[str] | None = None
) -> Path:
    """Each domain's score over the stages, one panel per domain; a dotted line marks its own stage."""
    plt = _pyplot()
    n = len(domains)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False, sharex=True)
    stages = list(range(len(R)))
    for j, d in enumerate(domains):
        ax = axes[j // cols][j % cols]
        ax.plot(stages, [row[j] for row in R], marker="o")
        if 1 <= j < len(R):
            ax.axvline(j, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{d} ({scores[j]})" if scores else d, fontsize=9)
        ax.set_xticks(stages, labels=["base"] + [str(t) for t in stages[1:]])
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.supxlabel("after stage")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def write_plots(report: LineageReport, out_dir: Path, title: str) -> list[Path]:
    """``R.png`` (heatmap) and ``scores.png`` (score over stages) in ``out_dir``."""
    return [
        plot_heatmap(
            report.domains, report.R, out_dir / "R.png", title, report.higher_is_better or None, report.scores or None
        ),
        plot_scores(report.domains, report.R, out_dir / "scores.png", title, report.scores or None),
    ]


# --- learning vs forgetting ---------------------------------------------------------------------
@dataclass(frozen=True)
class TradeOffPoint:
    """One run of a sweep: what it learned and what it forgot (e.g. metrics.json's mean_learning, source_forgetting)."""

    learning: float
    forgetting: float
    label: str = ""


def pareto_front(points: Sequence[TradeOffPoint]) -> list[int]:
    """Indices of the points no other point dominates (at least as much learning and at most as much
    forgetting, strictly better in one), ordered by forgetting."""
    front = []
    for i, p in enumerate(points):
        dominated = any(
            q.learning >= p.learning
            and q.forgetting <= p.forgetting
            and (q.learning > p.learning or q.forgetting < p.forgetting)
            for q in points
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i].forgetting, -points[i].learning))
