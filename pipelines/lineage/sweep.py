"""The learning-forgetting study: sweep points, their configs, the aggregation, the table and the Pareto plot.

A sweep runs one lineage per point of a grid of config fields (``lalora.lambda``, the curvature
kind, and any field ``--grid FIELD=v1,v2`` names: replay fractions, ``lalora.samples``, prior
settings, ...), times the seeds. lambda = 0 is plain LoRA whatever the curvature, so it runs once
per remaining setting and seed, under the curvature name ``plain``; ``identity`` (plain L2
towards the anchor) is the other baseline. Each point's config is built as a value from the base
config and validated with the schema. Each point is summarised by the paper's two numbers:
learning, the mean gain on each new domain when it is learned (mean_t R[t][t] - R[t-1][t]), and
forgetting, the drop from their best score (Chaudhry et al.) of each earlier domain and probe,
averaged over the columns the sweep names (default: every accuracy-like earlier column); then
mean and spread over seeds.
"""

from __future__ import annotations

import itertools
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError, LineageConfig, set_path
from pipelines.errors import BadInput
from pipelines.lineage.report import LineageResult, TradeOffPoint, pareto_front

PLAIN = "plain"
LAMBDA, CURVATURE = "lalora.lambda", "lalora.curvature.kind"
AUTO = "auto"
"""A lambda axis value: each stage searches its lambda within the forgetting budget (lalora.auto)."""


@dataclass(frozen=True)
class Axis:
    """One swept config field and its values."""

    field: str
    values: tuple[Any, ...]

    @property
    def short(self) -> str:
        return {LAMBDA: "lambda", CURVATURE: "curvature"}.get(self.field, self.field.rsplit(".", 1)[-1])


@dataclass(frozen=True)
class SweepPoint:
    settings: tuple[tuple[str, Any], ...]
    """(field, value) of every swept field at this point; the curvature is ``plain`` at lambda 0."""
    seed: int

    def value(self, name: str, default: Any = None) -> Any:
        return dict(self.settings).get(name, default)

    @property
    def curvature(self) -> str:
        return str(self.value(CURVATURE, PLAIN if self.lam == 0 else ""))

    @property
    def lam(self) -> float | str:
        """The point's lambda: a number, or 'auto' (-1 when lambda is not swept)."""
        value = self.value(LAMBDA, -1.0)
        return value if value == AUTO else float(value)

    @property
    def setting(self) -> tuple[tuple[str, Any], ...]:
        """The point without its seed: what its row of the table aggregates over seeds."""
        return self.settings

    @property
    def label(self) -> str:
        """Names its directory and registered model: ``diag-lambda10-seed0``, other fields as ``name-value``."""
        parts: list[str] = []
        for name, value in self.settings:
            if name == CURVATURE:
                parts.insert(0, str(value))
            elif name == LAMBDA:
                parts.append(f"lambda{_cell(value)}")
            else:
                parts.append(f"{name.rsplit('.', 1)[-1]}{_slug(value)}")
        return "-".join([*parts, f"seed{self.seed}"])


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def parse_axis(text: str) -> Axis:
    """``FIELD=v1,v2,...`` (each value read as YAML: 0.1 is a number, diag a string) as an Axis."""
    import yaml

    name, sep, raw = text.partition("=")
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not sep or not name.strip() or not values:
        raise BadInput(f"--grid {text!r}: expected FIELD=v1,v2,... e.g. --grid training.replay.fraction=0.1,0.3")
    try:
        parsed = tuple(yaml.safe_load(v) for v in values)
    except yaml.YAMLError:
        raise BadInput(f"--grid {text!r}: a value is not valid YAML") from None
    nested = [v for v in parsed if isinstance(v, list | dict)]
    if nested:
        raise BadInput(
            f"--grid {text!r}: {nested[0]!r} is a list or mapping; a grid sweeps numbers, strings or booleans "
            "(set a list or mapping with --set, one sweep per value)"
        )
    return Axis(name.strip(), parsed)


def sweep_points(axes: list[Axis], seeds: int, first_seed: int = 0) -> list[SweepPoint]:
    """Every combination of the axes' values, times the seeds (``first_seed`` on: a sweep extended by more seeds
    runs only the new ones); at lambda 0 the curvature is ``plain`` (the same lineage whatever the kind: run
    once). Plain points first within each seed."""
    if seeds < 1:
        raise BadInput(f"--seeds must be >= 1, got {seeds}")
    if first_seed < 0:
        raise BadInput(f"--first-seed must be >= 0, got {first_seed}")
    for axis in axes:
        if axis.field == LAMBDA and any(
            v != AUTO and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0) for v in axis.values
        ):
            raise BadInput(f"lambda values must be numbers >= 0 or auto, got {list(axis.values)}")
    fields_ = [a.field for a in axes]
    if len(set(fields_)) != len(fields_):
        raise BadInput(f"a field is swept twice: {', '.join(sorted({f for f in fields_ if fields_.count(f) > 1}))}")
    points: list[SweepPoint] = []
    for seed in range(first_seed, first_seed + seeds):
        combos = []
        for values in itertools.product(*(a.values for a in axes)):
            settings = dict(zip(fields_, values, strict=True))
            if settings.get(LAMBDA) == 0 and CURVATURE in settings:
                settings[CURVATURE] = PLAIN
            combos.append(tuple((f, settings[f]) for f in fields_))
        unique = list(dict.fromkeys(combos))
        plain = [c for c in unique if dict(c).get(CURVATURE) == PLAIN]
        points += [SweepPoint(c, seed) for c in plain + [c for c in unique if c not in plain]]
    if not points:
        raise BadInput("the sweep has no points: give at least one value per swept field")
    return points


def point_config(base: LineageConfig, point: SweepPoint, tracking_uri: str, stages: int | None) -> LineageConfig:
    """The point's lineage as a config value: the base config with the point's settings, its seed (LoRA
    initialisation and data order), its own registered model in the sweep's store, and the first ``stages``
    domains; validated with the schema (a field that does not exist is a one-line error)."""
    data = base.as_json()
    for name, value in point.settings:
        if name == CURVATURE:
            continue
        set_path(data, name, value, "--grid")
    if point.curvature != PLAIN and CURVATURE in dict(point.settings):
        kept = {k: v for k, v in base.lalora.curvature.model_dump().items() if k in ("fisher_type", "mc_samples")}
        set_path(data, "lalora.curvature", {"kind": point.curvature, **(kept if point.curvature != "identity" else {})})
    for name, value in (
        ("lora.init_seed", point.seed),
        ("training.seed", point.seed),
        ("tracking.mlflow_uri", tracking_uri),
        ("tracking.registered_model", f"{base.tracking.registered_model}-{point.label}"),
    ):
        set_path(data, name, value)
    if stages is not None:
        if not 1 <= stages <= len(base.domains):
            raise BadInput(f"--stages must be between 1 and {len(base.domains)} (the config's domains), got {stages}")
        data["domains"] = data["domains"][:stages]
        data.pop("catalogue", None)  # its domains are already in the list
    try:
        return LineageConfig.model_validate(data)
    except Exception as e:
        from pydantic import ValidationError

        from pipelines.config import format_errors

        if isinstance(e, ValidationError):
            raise ConfigError(f"sweep point {point.label}", format_errors(e)) from None
        raise


@dataclass
class PointResult:
    point: SweepPoint
    run_id: str | None
    learning: float
    forgetting: dict[str, float]
    """the forgetting of each earlier column (the source, earlier domains, probes)"""
    averaged: list[str]
    """the accuracy-like columns (what the default forgetting mean runs over)"""
    ACC: float
    BWT: float
    source_final: float
    R: list[list[float]]
    seconds: float
    auto: dict[str, dict[str, Any]] = field(default_factory=dict)
    """lambda auto: what each stage's search chose (metrics.json's ``auto``)"""

    @staticmethod
    def of(point: SweepPoint, result: LineageResult, seconds: float) -> PointResult:
        m, R = result.report.metrics, result.report.R
        return PointResult(
            point,
            result.run_id,
            float(m["mean_learning"]),
            dict(m["forgetting"]),
            list(m["averaged"]),
            float(m["ACC"]),
            float(m["BWT"]),
            float(R[-1][0]),
            R,
            seconds,
            dict(result.auto),
        )

    def mean_forgetting(self, on: list[str] | None) -> float:
        names = on or [d for d in self.forgetting if d in self.averaged]
        return statistics.fmean(self.forgetting[d] for d in names)


@dataclass
class SeriesRow:
    """One setting of the table (the point without its seed): mean and spread over seeds."""

    setting: dict[str, Any]
    n: int
    learning: float
    learning_sd: float
    forgetting: float
    """the mean over ``forgetting_on``"""
    forgetting_sd: float
    per_column: dict[str, tuple[float, float]]
    """every earlier column's forgetting: (mean, sd) over seeds"""
    ACC: float
    BWT: float
    source_final: float
    run_ids: list[str | None] = field(default_factory=list)
    pareto: bool = False

    @property
    def curvature(self) -> str:
        return str(self.setting.get(CURVATURE, ""))

    @property
    def label(self) -> str:
        """The setting as its points' labels name it, without the seed (``diag-lambda10``)."""
        return SweepPoint(tuple(self.setting.items()), 0).label.removesuffix("-seed0") or "point"

    @property
    def lam(self) -> float | str | None:
        if LAMBDA not in self.setting:
            return None
        value = self.setting[LAMBDA]
        return value if value == AUTO else float(value)


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[PointResult], forgetting_on: list[str] | None = None) -> list[SeriesRow]:
    """Rows per setting in sweep order, with the Pareto-optimal ones marked (means over seeds: no other row
    learns at least as much and forgets at most as much, with one of the two strictly better)."""
    groups: dict[tuple[tuple[str, Any], ...], list[PointResult]] = {}
    for r in results:
        groups.setdefault(r.point.setting, []).append(r)
    rows = []
    for setting, rs in groups.items():
        forget = [r.mean_forgetting(forgetting_on) for r in rs]
        columns = {
            d: (statistics.fmean(r.forgetting[d] for r in rs), _sd([r.forgetting[d] for r in rs]))
            for d in rs[0].forgetting
        }
        rows.append(
            SeriesRow(
                dict(setting),
                len(rs),
                statistics.fmean(r.learning for r in rs),
                _sd([r.learning for r in rs]),
                statistics.fmean(forget),
                _sd(forget),
                columns,
                statistics.fmean(r.ACC for r in rs),
                statistics.fmean(r.BWT for r in rs),
                statistics.fmean(r.source_final for r in rs),
                [r.run_id for r in rs],
            )
        )
    for i in pareto_front([TradeOffPoint(r.learning, r.forgetting) for r in rows]):
        rows[i].pareto = True
    return rows


def forgetting_columns(cfg: LineageConfig, stages: int | None) -> list[str]:
    """The columns a sweep's forgetting can average: the source, every domain before the last stage, the probes."""
    kept = cfg.domains[: stages or len(cfg.domains)]
    return [cfg.source.name, *(d.name for d in kept[:-1]), *(d.name for d in cfg.probes)]


def forgetting_label(results: list[PointResult], forgetting_on: list[str] | None) -> str:
    """What the forgetting axis averages, by name."""
    names = forgetting_on or ([d for d in results[0].forgetting if d in results[0].averaged] if results else [])
    return f"forgetting (mean of {', '.join(names)})" if len(names) != 1 else f"forgetting ({names[0]})"


def _pm(mean: float, sd: float, n: int) -> str:
    return f"{mean:.3f}" + (f" +- {sd:.3f}" if n > 1 else "")


def _cell(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_table(rows: list[SeriesRow], label: str) -> str:
    """A Markdown table: one row per setting, labelled by the fields that vary; the forgetting mean the
    sweep chose (named by what it averages) and every earlier column's forgetting; Pareto rows marked *."""
    fields_ = list(rows[0].setting) if rows else []
    varying = [f for f in fields_ if len({_cell(r.setting[f]) for r in rows}) > 1] or fields_
    columns = list(rows[0].per_column) if rows else []
    if len(columns) == 1:  # the mean is that one column
        columns = []
    names = [Axis(f, ()).short for f in varying]
    head = [
        *names,
        "seeds",
        "learning",
        label,
        *(f"forgetting: {d}" for d in columns),
        "ACC",
        "BWT",
        "source after last stage",
        "Pareto",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            *(_cell(r.setting[f]) for f in varying),
            str(r.n),
            _pm(r.learning, r.learning_sd, r.n),
            _pm(r.forgetting, r.forgetting_sd, r.n),
            *(_pm(*r.per_column[d], r.n) for d in columns),
            f"{r.ACC:.3f}",
            f"{r.BWT:+.3f}",
            f"{r.source_final:.3f}",
            "*" if r.pareto else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def series_of(rows: list[SeriesRow]) -> tuple[str | None, dict[str, list[SeriesRow]]]:
    """The plot's series: by curvature when it is swept (with lambda along each), else by the first
    varying field; (the field that orders each series, the series)."""
    if not rows:
        return None, {}
    fields_ = list(rows[0].setting)
    varying = [f for f in fields_ if len({_cell(r.setting[f]) for r in rows}) > 1]
    group = CURVATURE if CURVATURE in varying else (varying[0] if len(varying) > 1 else None)
    along = next((f for f in varying if f != group), None)
    series: dict[str, list[SeriesRow]] = {}
    for r in rows:
        rest = [f"{Axis(f, ()).short} {_cell(r.setting[f])}" for f in varying if f not in (group, along)]
        name = " / ".join(([_cell(r.setting[group])] if group else []) + rest) or "points"
        series.setdefault(name, []).append(r)
    return along, series


def plot_pareto(rows: list[SeriesRow], path: Path, title: str, xlabel: str = "forgetting") -> Path:
    """Learning (y) against forgetting (x) per series, error bars over seeds, each point annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    along, series = series_of(rows)
    for name, rs in series.items():
        if along:
            rs = sorted(rs, key=lambda r: (str(type(r.setting[along])), r.setting[along]))
        marker = "*" if name == PLAIN else "o"
        ax.errorbar(
            [r.forgetting for r in rs],
            [r.learning for r in rs],
            xerr=[r.forgetting_sd for r in rs],
            yerr=[r.learning_sd for r in rs],
            marker=marker,
            markersize=12 if name == PLAIN else 6,
            capsize=3,
            linestyle="-" if len(rs) > 1 else "none",
            label="plain LoRA (lambda 0)" if name == PLAIN else name,
        )
        for r in rs:
            note = _cell(r.setting[along]) if along else ""
            ax.annotate(note, (r.forgetting, r.learning), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.forgetting)
    if len(front) > 1:
        ax.plot(
            [r.forgetting for r in front],
            [r.learning for r in front],
            color="grey",
            linestyle=":",
            linewidth=1,
            label="Pareto front",
        )
    ax.set_xlabel(xlabel + " (drop from the best)")
    ax.set_ylabel("learning (mean gain on each new domain)")
    ax.set_title(title + (f"; points labelled by {Axis(along, ()).short}" if along else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_json(rows: list[SeriesRow], results: list[PointResult], extra: dict[str, Any]) -> dict[str, Any]:
    def row(r: SeriesRow) -> dict[str, Any]:
        return {
            **asdict(r),
            "curvature": r.curvature,
            "lam": r.lam,
            "label": r.label,
            "per_column": {d: {"mean": m, "sd": s} for d, (m, s) in r.per_column.items()},
        }

    return {
        "rows": [row(r) for r in rows],
        "points": [
            {**asdict(r), "point": {"settings": dict(r.point.settings), "seed": r.point.seed, "label": r.point.label}}
            for r in results
        ],
        **extra,
    }
