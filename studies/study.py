"""The learning-forgetting study (``make study``): every table of the study page (docs/results/study.md),
from one command.

SmolLM2-135M-Instruct learns GSM8K (and, in the two-stage lineage, gsm_symbolic after it) on this CPU;
forgetting is measured on two probes of what it knows (capital cities, demonyms). Each part below is a
real ``lalora sweep`` of ``configs/smollm2-math.yaml``; the parts run two at a time (the config pins one
torch thread per lineage), then their ``sweep.json`` files are combined into:

- one stage, three seeds: plain LoRA, plain L2 at two lambdas, LaLoRA diag at two, kfac at one, replay
  alone at two fractions, replay + LaLoRA; learning and the forgetting of each probe, mean +- sd, the
  Pareto front and a plot with error bars;
- two stages, two seeds: plain LoRA, LaLoRA, replay, replay + LaLoRA; R (mean over seeds) and BWT;
- the curvature data size: ``lalora.samples`` 8 / 32 / 128 at the LaLoRA point.

    python -m studies.study --out runs/study --results benchmarks/results/cpu-2026-12-01
    python -m studies.study --out runs/study --results DIR --only one-stage   # parts whose names start so

Written to ``--results``: ``study.json`` (every row and point, with run ids and wall times),
``study.md`` (the tables) and ``study-pareto.png``. A part whose sweep already finished in ``--out``
(its ``sweep.json`` with no failed lineage) is reported from that file, with the wall time the sweep
recorded, without running again; a part that stopped half-way is run again and its lineages resume from
their registries. Delete ``--out/NAME`` to rerun a part from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-math.yaml"
PROBES = ("capitals", "demonyms")


@dataclass(frozen=True)
class Part:
    name: str
    args: tuple[str, ...]
    stages: int
    seeds: int
    first_seed: int = 0
    """A part that adds seeds to another part's settings runs from this seed (its rows join the other's)."""


LAMBDA = ("--curvature", "diag", "--lambda")
SAMPLES_LAMBDA = 10.0
"""The diag point whose curvature data size is swept (and the two-stage lineage's LaLoRA point): the
earlier study's best diag lambda, fixed before this one ran."""
BUDGET = 0.02
"""The forgetting budget of the lambda auto part, on the capitals' validation rows."""
AUTO = (
    f"lalora.auto.max_forgetting={BUDGET}",
    "lalora.auto.columns=[capitals]",
    "lalora.auto.max_trials=3",
    "source.val_size=50",
    "probes.0.val_size=50",
    "domains.0.val_size=40",
    "domains.1.val_size=40",
)
"""lambda auto: the budget on capitals (the source, what the base knows); at most 3 full-length trials a stage
(the CPU's budget: a trial is 60 steps, ~4 minutes); validation rows carved from what evaluation leaves
(capitals 232 rows: 100 scored, 50 validation, 82 for curvature; demonyms 213: 120 scored, 50 validation;
the math domains 40 each, scored by NLL, whose per-row spread is small)."""
AUTO_ARGS = ("--curvature", "diag", "--lambda", "auto", *(a for kv in AUTO for a in ("--set", kv)))
"""lambda auto's three seeds are a part each, so that the two queues run two of its (long) lineages at once."""
AUTO_KFAC = tuple("source.val_size=100" if kv == "source.val_size=50" else kv for kv in AUTO)
"""lambda auto with kfac (whose frontier lies above diag's) on 100 validation capitals, a row 0.01, half the budget:
every row of the capitals but the 100 scored and lalora.samples' 32 curvature rows (232 in all)."""
AUTO_KFAC_ARGS = ("--curvature", "kfac", "--lambda", "auto", *(a for kv in AUTO_KFAC for a in ("--set", kv)))
SPLITS = tuple(kv for kv in AUTO_KFAC if "val_size" in kv)
"""The validation rows lambda auto holds out (with kfac): the splits, and so the training rows, of its lineages."""
PAIRED_PART = "two-stage-plain-valsplit"
PAIRED = "plain LoRA, validation rows held out"
"""The budget table's row of the part that runs plain LoRA on lambda auto's splits: the learning the search's
lineages are compared with row for row (the same training rows, LoRA initialisations and data orders)."""
PARTS = (
    Part("one-stage-diag", (*LAMBDA, "0,10,100"), 1, 3),
    Part("one-stage-l2", ("--curvature", "identity", "--lambda", "0.1,1"), 1, 3),
    Part("one-stage-kfac", ("--curvature", "kfac", "--lambda", "10"), 1, 3),
    Part("one-stage-replay", (*LAMBDA, "0", "--grid", "training.replay.fraction=0.25,0.5"), 1, 3),
    Part("one-stage-replay-diag", (*LAMBDA, "10", "--grid", "training.replay.fraction=0.25"), 1, 3),
    Part("one-stage-samples", (*LAMBDA, f"{SAMPLES_LAMBDA:g}", "--grid", "lalora.samples=8,128"), 1, 3),
    Part("two-stage", (*LAMBDA, "0,10"), 2, 2),
    Part("two-stage-replay", (*LAMBDA, "0,10", "--grid", "training.replay.fraction=0.25"), 2, 2),
    Part("two-stage-seed2", (*LAMBDA, "0,10"), 2, 1, first_seed=2),
    Part("two-stage-replay-seed2", (*LAMBDA, "0", "--grid", "training.replay.fraction=0.25"), 2, 1, first_seed=2),
    *(
        Part(f"two-stage-auto{'-seed' + str(seed) if seed else ''}", AUTO_ARGS, 2, 1, first_seed=seed)
        for seed in range(3)
    ),
    # where 80% of plain LoRA's second-stage learning lies: fixed lambdas below every one the search chose
    Part("two-stage-frontier", (*LAMBDA, "0.03"), 2, 3),
    Part("two-stage-frontier-low", (*LAMBDA, "0.003"), 2, 1),
    # the search again, with kfac (whose frontier lies higher) and a validation row half the budget
    *(
        Part(f"two-stage-auto-kfac{'-seed' + str(seed) if seed else ''}", AUTO_KFAC_ARGS, 2, 1, first_seed=seed)
        for seed in range(3)
    ),
    # plain LoRA on the rows the searching lineages train on: their validation rows held out of training
    Part(PAIRED_PART, (*LAMBDA, "0", *(a for kv in SPLITS for a in ("--set", kv))), 2, 3),
)
"""Two queues of about equal length: every other part."""


def _command(part: Part, out: Path, lalora: str) -> list[str]:
    return [
        lalora,
        "sweep",
        str(CONFIG.relative_to(ROOT)),
        *part.args,
        "--stages",
        str(part.stages),
        "--seeds",
        str(part.seeds),
        *(["--first-seed", str(part.first_seed)] if part.first_seed else []),
        "--forgetting-on",
        ",".join(PROBES),
        "--out",
        str(out / part.name),
    ]


def _recorded(part: Part, studies: list[Path]) -> dict[str, Any] | None:
    """The part as an earlier study recorded it (``--reuse``), when every lineage it runs today finished there
    under the same settings: a finished sweep, or the lineages a ``--no-run`` report found (a part later split
    into one part a seed matches the seeds it names). None when no study recorded all of them."""
    points = sweep_points(part)
    for path in studies:
        for recorded in json.loads(path.read_text())["parts"]:
            summary, args = recorded["summary"], recorded["command"].split(" --stages ")[0]
            found = {p["point"]["label"] for p in summary["points"]}
            if (
                recorded["part"].split("-seed")[0] == part.name.split("-seed")[0]
                and summary.get("failed") == []
                and args == " ".join(_command(part, Path(), "")[1:]).split(" --stages ")[0]
                and {p.label for p in points} <= found
            ):
                chosen = [p for p in summary["points"] if p["point"]["label"] in {q.label for q in points}]
                return {**recorded, "part": part.name, "reused": str(path), "summary": {**summary, "points": chosen}}
    return None


def sweep_points(part: Part) -> list[Any]:
    """The lineages a part's sweep runs (settings, seed, label), as ``lalora sweep`` expands them."""
    from flows.cli import _parser, _sweep_axes
    from pipelines.lineage.sweep import sweep_points as expand

    return expand(_sweep_axes(_parser().parse_args(["sweep", str(CONFIG), *part.args])), part.seeds, part.first_seed)


def _run(part: Part, out: Path, lalora: str, run: bool = True, reuse: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One part's sweep, logged to OUT/NAME.log; its sweep.json and wall time (``run`` False: a part that has not
    finished is reported from the lineages it finished so far, and nothing runs). A part an earlier study in
    ``reuse`` recorded whole is reported from it and not run."""
    finished = out / part.name / "sweep.json"
    cmd = _command(part, out, lalora)
    if not finished.exists() and (recorded := _recorded(part, list(reuse))):
        print(f"{part.name}: recorded by {recorded['reused']}, reported from it", flush=True)
        return recorded
    if finished.exists() and not (summary := json.loads(finished.read_text()))["failed"]:
        print(f"{part.name}: finished earlier ({finished}), reported from it", flush=True)
        return {"part": part.name, "command": " ".join(cmd[1:]), "wall_seconds": summary["seconds"], "summary": summary}
    if not run:
        return {
            "part": part.name,
            "command": " ".join(cmd[1:]),
            "wall_seconds": None,
            "summary": _finished_so_far(part, out),
        }
    # Each part its own Prefect database: two ephemeral servers migrating one fresh SQLite file at once
    # race (one fails its start-up with "no such column" and Prefect starts another).
    env = {**os.environ, "PREFECT_HOME": str(out / part.name / ".prefect")}
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / f"{part.name}.log", "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"study part {part.name} failed (exit {code}); see {out / part.name}.log")
    summary = json.loads((out / part.name / "sweep.json").read_text())
    return {
        "part": part.name,
        "command": " ".join(cmd[1:]),
        "wall_seconds": time.perf_counter() - t0,
        "summary": summary,
    }


def _finished_so_far(part: Part, out: Path) -> dict[str, Any]:
    """A part whose sweep has not finished (``--no-run``): the lineages it finished so far, read from their
    metrics.json, as sweep.json's points (the same settings, seeds and labels the sweep gives them)."""
    found = []
    for point in sweep_points(part):
        metrics = out / part.name / "points" / point.label / "metrics.json"
        if metrics.exists():
            m = json.loads(metrics.read_text())
            found.append(
                {
                    "point": {"settings": dict(point.settings), "seed": point.seed, "label": point.label},
                    "R": m["R"],
                    "BWT": m["BWT"],
                    "auto": m.get("auto", {}),
                    "seconds": sum(t["wall_seconds"] for t in m["timing"]),
                }
            )
    return {"points": found, "rows": [], "failed": [], "lineages": len(sweep_points(part))}


def method(setting: dict[str, Any]) -> str:
    """A row's name in the tables, from the fields its sweep set."""
    kind, lam = setting.get("lalora.curvature.kind"), setting.get("lalora.lambda")
    replay, samples = setting.get("training.replay.fraction"), setting.get("lalora.samples")
    lam = lam if isinstance(lam, str) else f"{lam:g}"
    name = {"plain": "plain LoRA", "identity": f"L2 (identity), lambda {lam}"}.get(kind, f"{kind} lambda {lam}")
    if replay:
        name = f"replay {replay:g}" if kind == "plain" else f"replay {replay:g} + {name}"
    if samples:
        name += f", N_s {samples}"
    return name


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.3f} +- {sd:.3f}"


def _rows(parts: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    rows = []
    for part in parts:
        if part["part"].startswith(prefix):
            for r in part["summary"]["rows"]:
                rows.append({**r, "method": method(r["setting"]), "part": part["part"]})
    return rows


def one_stage_table(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    from pipelines.lineage.report import TradeOffPoint, pareto_front

    unique = {r["method"]: r for r in rows if not r["method"].endswith(("N_s 8", "N_s 128"))}
    table = list(unique.values())
    for i in pareto_front([TradeOffPoint(r["learning"], r["forgetting"]) for r in table]):
        table[i]["study_pareto"] = True
    head = (
        "| method | seeds | learning (GSM8K NLL drop) | forgetting: capitals | forgetting: demonyms | "
        "forgetting (mean of both) | capitals after | Pareto |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in table:
        cols = r["per_column"]
        lines.append(
            f"| {r['method']} | {r['n']} | {_pm(r['learning'], r['learning_sd'])} | "
            f"{_pm(cols['capitals']['mean'], cols['capitals']['sd'])} | "
            f"{_pm(cols['demonyms']['mean'], cols['demonyms']['sd'])} | "
            f"{_pm(r['forgetting'], r['forgetting_sd'])} | "
            f"{r['source_final']:.3f} | {'*' if r.get('study_pareto') else ''} |"
        )
    return "\n".join(lines), table


def samples_table(rows: list[dict[str, Any]]) -> str:
    def at_point(r: dict[str, Any]) -> bool:  # diag, lambda SAMPLES_LAMBDA, no replay
        st = r["setting"]
        return (
            st.get("lalora.curvature.kind") == "diag"
            and st.get("lalora.lambda") == SAMPLES_LAMBDA
            and not st.get("training.replay.fraction")
        )

    chosen = sorted(filter(at_point, rows), key=lambda r: r["setting"].get("lalora.samples", 32))
    lines = [
        "| lalora.samples (curvature sequences) | learning | forgetting: capitals | forgetting: demonyms |",
        "|---|---|---|---|",
    ]
    for r in chosen:
        cols = r["per_column"]
        lines.append(
            f"| {r['setting'].get('lalora.samples', 32)} | {_pm(r['learning'], r['learning_sd'])} | "
            f"{_pm(cols['capitals']['mean'], cols['capitals']['sd'])} | "
            f"{_pm(cols['demonyms']['mean'], cols['demonyms']['sd'])} |"
        )
    return "\n".join(lines)


def two_stage_tables(parts: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """R (mean over seeds) and BWT (mean +- sd) per method."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        if part["part"].startswith("two-stage"):
            for p in part["summary"]["points"]:
                name = PAIRED if part["part"].startswith(PAIRED_PART) else method(p["point"]["settings"])
                by_method.setdefault(name, []).append(p)
    out, text = {}, []
    domains = ["capitals", "gsm8k", "gsm_symbolic", "demonyms"]
    for name, points in by_method.items():
        R = [
            [statistics.fmean(p["R"][i][j] for p in points) for j in range(len(points[0]["R"][0]))]
            for i in range(len(points[0]["R"]))
        ]
        bwt = [p["BWT"] for p in points]
        out[name] = {"R_mean": R, "BWT": bwt, "seeds": len(points)}
        text += [
            f"{name} ({len(points)} seeds): BWT {statistics.fmean(bwt):+.3f} +- {_sd(bwt):.3f}",
            "",
            "| after stage | " + " | ".join(f"{d} ({'NLL' if d.startswith('gsm') else 'acc'})" for d in domains) + " |",
            "|---|---|---|---|---|",
        ]
        for i, row in enumerate(R):
            text.append(f"| {'before' if i == 0 else domains[i]} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        text.append("")
    return "\n".join(text), out


BUDGET_METHODS = (
    "plain LoRA",
    "diag lambda 10",
    "replay 0.25",
    "diag lambda auto",
    "diag lambda 0.03",
    "diag lambda 0.003",
    "kfac lambda auto",
    PAIRED,
)


def _per_seed(points: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each two-stage lineage's figures the budget is judged on, from its R (the evaluation rows): the capitals'
    forgetting after each stage (best earlier score less this one, as the gate reads it), each stage's learning
    against the base (NLL drop on its domain), and lambda auto's compute (trial steps over the stage's steps)."""
    cap, gsm, sym = 0, 1, 2  # R's columns: capitals (source), gsm8k, gsm_symbolic, demonyms
    out: dict[str, list[float]] = {}
    for p in points:
        R = p["R"]
        out.setdefault("forgetting1", []).append(R[0][cap] - R[1][cap])
        out.setdefault("forgetting2", []).append(max(R[0][cap], R[1][cap]) - R[2][cap])
        out.setdefault("learning1", []).append(R[0][gsm] - R[1][gsm])
        out.setdefault("learning2", []).append(R[0][sym] - R[2][sym])
        for stage, a in (p.get("auto") or {}).items():
            out.setdefault(f"lambda{stage}", []).append(float(a["lambda"]))
            compute = a.get("compute", a.get("trials"))  # a lineage finished earlier records its trials only
            out.setdefault(f"compute{stage}", []).append(float(compute))
    return out


def budget_table(parts: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """lambda auto against the fixed points: forgetting of capitals on the evaluation rows per stage against the
    budget plus the seeds' spread, second-stage learning against plain LoRA's, and the search's compute."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        if part["part"].startswith("two-stage"):
            for p in part["summary"]["points"]:
                name = PAIRED if part["part"].startswith(PAIRED_PART) else method(p["point"]["settings"])
                by_method.setdefault(name, []).append(p)
    figures = {m: _per_seed(by_method[m]) for m in BUDGET_METHODS if m in by_method}
    if "diag lambda auto" not in figures or "plain LoRA" not in figures:
        return "", {}

    def pm(values: list[float]) -> str:
        return f"{statistics.fmean(values):.3f} +- {_sd(values):.3f}"

    plain2 = statistics.fmean(figures["plain LoRA"]["learning2"])
    lines = [
        "| method | seeds | lambda (stage 1 / 2) | trials' compute (stage 1 / 2) | forgetting: capitals, "
        "stage 1 | stage 2 | learning: gsm8k | gsm_symbolic | gsm_symbolic, share of plain LoRA's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in figures.items():
        fixed = by_method[name][0]["point"]["settings"].get("lalora.lambda")
        lam = " / ".join(pm(f[k]) for k in ("lambda1", "lambda2") if k in f) or f"{fixed:g}"
        compute = " / ".join(pm(f[k]) for k in ("compute1", "compute2") if k in f) or "1 / 1"
        share = statistics.fmean(f["learning2"]) / plain2
        lines.append(
            f"| {name} | {len(f['learning2'])} | {lam} | {compute} | {pm(f['forgetting1'])} | "
            f"{pm(f['forgetting2'])} | {pm(f['learning1'])} | {pm(f['learning2'])} | {share:.0%} |"
        )
    verdicts, targets = [], {}
    for name in ("diag lambda auto", "kfac lambda auto"):
        if name not in figures:
            continue
        auto = figures[name]
        kept = [statistics.fmean(auto[k]) <= BUDGET + _sd(auto[k]) for k in ("forgetting1", "forgetting2")]
        share = statistics.fmean(auto["learning2"]) / plain2
        targets[name] = {"kept": kept, "share": share}
        paired = ""
        if PAIRED in figures:
            same_rows = statistics.fmean(auto["learning2"]) / statistics.fmean(figures[PAIRED]["learning2"])
            targets[name]["share_same_rows"] = same_rows
            paired = (
                f"; against plain LoRA trained on the same rows (the validation rows held out): {same_rows:.0%}, "
                f"{'holds' if same_rows >= 0.8 else 'does not hold'}"
            )
        verdicts.append(
            ("Targets" if name == "diag lambda auto" else f"Targets, {name}")
            + f": capitals' forgetting within the budget {BUDGET} plus the seeds' spread at stage 1: "
            f"{'holds' if kept[0] else 'does not hold'}; at stage 2: {'holds' if kept[1] else 'does not hold'}; "
            f"second-stage learning at least 80% of plain LoRA's: {share:.0%}, "
            f"{'holds' if share >= 0.8 else 'does not hold'}{paired}."
        )
    diag = targets["diag lambda auto"]
    return "\n".join([*lines, "", "\n\n".join(verdicts)]), {
        "figures": figures,
        "budget": BUDGET,
        "kept": diag["kept"],
        "share": diag["share"],
        "targets": targets,
    }


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def commands(parts: list[dict[str, Any]]) -> str:
    """Each part's command, its sweep's wall time (the other queue running beside it) and its median lineage."""
    lines = [
        "## The commands (each a lalora sweep; wall time with the other queue running beside it; a part "
        "resumed after an interruption records the time of its last invocation)",
        "",
    ]
    for p in parts:
        lineages = [q["seconds"] for q in p["summary"]["points"]]
        if "reused" in p:
            lines.append(
                f"- `lalora {p['command']}`: recorded by an earlier invocation ({p['reused']}); "
                f"{len(lineages)} lineages used, median {statistics.median(lineages):.0f} s a lineage"
            )
            continue
        if "lineages" in p["summary"]:  # reported before its sweep finished (--no-run)
            lines.append(
                f"- `lalora {p['command']}`: not finished; {len(lineages)} of {p['summary']['lineages']} "
                f"lineages reported" + (f", median {statistics.median(lineages):.0f} s a lineage" if lineages else "")
            )
            continue
        lines.append(
            f"- `lalora {p['command']}`: {p['wall_seconds']:.0f} s, {len(lineages)} lineages, median "
            f"{statistics.median(lineages):.0f} s a lineage"
        )
    return "\n".join(lines)


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 5.2))
    for r in table:
        marker = "*" if r["method"] == "plain LoRA" else ("s" if "replay" in r["method"] else "o")
        ax.errorbar(
            r["forgetting"],
            r["learning"],
            xerr=r["forgetting_sd"],
            yerr=r["learning_sd"],
            marker=marker,
            markersize=10 if marker == "*" else 6,
            capsize=3,
            linestyle="none",
            label=r["method"],
        )
    front = sorted((r for r in table if r.get("study_pareto")), key=lambda r: r["forgetting"])
    if len(front) > 1:
        ax.plot(
            [r["forgetting"] for r in front],
            [r["learning"] for r in front],
            color="grey",
            linestyle=":",
            linewidth=1,
            label="Pareto front",
        )
    ax.set_xlabel("forgetting (mean drop of capitals and demonyms accuracy; mean +- sd over 3 seeds)")
    ax.set_ylabel("learning (GSM8K worked-answer NLL drop, nats/token)")
    ax.set_title("SmolLM2-135M-Instruct learns GSM8K: one stage, 60 steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.study", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "study")
    p.add_argument("--results", type=Path, required=True, help="where study.json, study.md, study-pareto.png go")
    p.add_argument("--only", default="", help="run only the parts whose names start with this")
    p.add_argument("--workers", type=int, default=2, help="parts run at a time (each lineage one torch thread)")
    p.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        help="an earlier study.json: a part it recorded "
        "with every lineage finished (the same settings and seeds) is reported from it, not run",
    )
    p.add_argument(
        "--no-run",
        action="store_true",
        help="run nothing: report the finished parts, and the lineages "
        "an unfinished part finished so far (marked so in the commands' list)",
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    lalora = str(Path(sys.executable).parent / "lalora")
    chosen = [part for part in PARTS if part.name.startswith(args.only)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        parts = list(pool.map(lambda part: _run(part, args.out, lalora, not args.no_run, tuple(args.reuse)), chosen))
    wall = time.perf_counter() - t0
    one, table = one_stage_table(_rows(parts, "one-stage"))
    two, matrices = two_stage_tables(parts)
    budget, budget_json = budget_table(parts)
    md = (
        f"# The study (python -m studies.study, {args.workers} parts at a time, one thread a lineage; this "
        f"invocation {wall:.0f} s)\n\n## One stage, 3 seeds\n\n{one}\n\n"
        f"## The curvature data size\n\n{samples_table(_rows(parts, 'one-stage'))}\n\n"
        f"## Two stages\n\n{two}\n\n"
        + (f"## A forgetting budget: lambda auto, {BUDGET} on capitals\n\n{budget}\n\n" if budget else "")
        + f"{commands(parts)}\n"
    )
    (args.results / "study.md").write_text(md)
    (args.results / "study.json").write_text(
        json.dumps(
            {
                "wall_seconds": wall,
                "workers": args.workers,
                "cpu_count": os.cpu_count(),
                "one_stage": table,
                "two_stage": matrices,
                "budget": budget_json,
                "parts": [{k: v for k, v in p.items()} for p in parts],
            },
            indent=1,
        )
    )
    if table:
        plot(table, args.results / "study-pareto.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
