"""The lineage's results: the R matrix, continual-learning metrics, metrics.json and plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lalora import continual_metrics


@dataclass
class LineageReport:
    domains: list[str]
    R: list[list[float]]
    R_nll: list[list[float]]
    metrics: dict[str, Any]

    def as_json(self, registered_model: str, versions: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"domains": self.domains, "R": self.R, "R_nll": self.R_nll, **self.metrics,
                "registered_model": registered_model, "versions": versions, **(extra or {})}


def build_report(domains: list[str], rows: list[dict[str, dict[str, float]]]) -> LineageReport:
    """``rows[i][domain]`` holds the scores after stage i (``accuracy``, ``nll``)."""
    R = [[row[d]["accuracy"] for d in domains] for row in rows]
    R_nll = [[row[d]["nll"] for d in domains] for row in rows]
    m = continual_metrics(R)
    metrics = {"ACC": m.ACC, "BWT": m.BWT, "FWT": m.FWT, "forgetting": dict(zip(domains[:-1], m.forgetting)),
               "mean_forgetting": m.mean_forgetting, "learning": dict(zip(domains[1:], m.learning)),
               "mean_learning": m.mean_learning}
    return LineageReport(domains, R, R_nll, metrics)


def format_matrix(domains: list[str], R: list[list[float]], title: str = "R (accuracy)") -> str:
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
    return (f"ACC {m['ACC']:.3f}   BWT {m['BWT']:+.3f}   FWT {fwt}   mean forgetting {m['mean_forgetting']:.3f}\n"
            f"forgetting: {forg}\nlearning:   {learn}")


def plot_heatmap(domains: list[str], R: list[list[float]], path: Path, title: str) -> Path:
    """R as an annotated heatmap (rows: after stage i, columns: domain j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(domains), 1.0 + 0.7 * len(R)))
    im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(domains)), labels=domains, rotation=30, ha="right")
    ax.set_yticks(range(len(R)), labels=["before"] + [f"after {d}" for d in domains[1 : len(R)]])
    for i, row in enumerate(R):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
    ax.set_xlabel("evaluated on domain")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
