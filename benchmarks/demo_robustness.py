"""Does the demo's claim hold whatever CPU kernels run it? The grid: torch's CPU kernel paths x seeds, each cell
plain LoRA and LaLoRA on configs/demo.yaml, then the demo's target (studies/demo_target.py) on the pair.

    python benchmarks/demo_robustness.py                         # default, avx2 and this machine's best; seeds 0 1 2
    python benchmarks/demo_robustness.py --capabilities avx2 --seeds 0 --jobs 2 --json

Each run is `lalora run configs/demo.yaml --set training.seed=S --set lora.init_seed=S [--set lalora.lambda=0]`
(the seeds of what the lineage trains: data order, dropout and the LoRA initialisation; the base is fixed) with
ATEN_CPU_CAPABILITY set
(torch's kernel path: `default`, `avx2`, `avx512`; a path the CPU lacks falls back, and the run records the
path it used in metrics.json's environment). The demo pins one torch thread, so --jobs 2 runs two at once on
two cores without changing a figure. Printed: a table (capability x seed: plain's and LaLoRA's mean
forgetting, the limit, the smallest learning ratio, met) and the smallest margins; the last line is one JSON
object, written with --json to benchmarks/results/cpu-<date>/demo-robustness.json. Exit 1 when a cell misses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def best_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability()).lower()


def _run(config: Path, out: Path, capability: str, seed: int, lam: float | None, sets: list[str]) -> dict[str, Any]:
    if not (out / "metrics.json").is_file():
        cmd = [str(Path(sys.executable).parent / "lalora"), "run", str(config), "--out", str(out)]
        cmd += [a for s in sets for a in ("--set", s)]  # the cell's own settings after them: they win
        cmd += ["--set", f"training.seed={seed}", "--set", f"lora.init_seed={seed}"]
        cmd += ["--set", f"lalora.lambda={lam:g}"] if lam is not None else []
        env = {
            **os.environ,
            "ATEN_CPU_CAPABILITY": capability,
            "PREFECT_HOME": str(out.parent / f".prefect-{out.name}"),
        }
        Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        log = out.parent / f"{out.name}.log"
        with open(log, "w") as f:
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return json.loads((out / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from studies.demo_target import MAX_FORGETTING_SHARE, MIN_LEARNED_RATIO, check_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--capabilities", nargs="+", default=None, help="default: default avx2 and this CPU's best")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-robustness")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each pins one torch thread)")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run (as lalora run --set)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    caps = args.capabilities or list(dict.fromkeys(["default", "avx2", best_capability()]))
    cells = [(c, s) for c in caps for s in args.seeds]
    t0 = time.perf_counter()
    jobs = {
        (c, s, kind): (args.out / f"{c}-seed{s}-{kind}", 0.0 if kind == "plain" else None)
        for c, s in cells
        for kind in ("plain", "lalora")
    }
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            key: pool.submit(_run, args.config, out, key[0], key[1], lam, args.sets) for key, (out, lam) in jobs.items()
        }
        metrics = {key: f.result() for key, f in futures.items()}
    rows = []
    for c, s in cells:
        plain, lalora = metrics[(c, s, "plain")], metrics[(c, s, "lalora")]
        check = check_target(plain, lalora)
        limit = MAX_FORGETTING_SHARE * check.plain_mean_forgetting
        rows.append(
            {
                "capability": c,
                "ran_on": lalora.get("environment", {}).get("torch_cpu_capability"),
                "seed": s,
                "plain_mean_forgetting": check.plain_mean_forgetting,
                "lalora_mean_forgetting": check.mean_forgetting,
                "limit": limit,
                "forgetting_margin": limit - check.mean_forgetting,
                "plain_max_drop": check.plain_max_drop,
                "learned_ratio": check.learned_ratio,
                "min_learned_ratio": min(check.learned_ratio.values()),
                "learning_margin": min(check.learned_ratio.values()) - MIN_LEARNED_RATIO,
                "met": check.met,
                "row0": lalora["R"][0],
            }
        )
    print(
        "| capability (ran on) | seed | plain mean forgetting | LaLoRA mean forgetting | limit | smallest "
        "R[i][i] ratio | met |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['capability']} ({r['ran_on']}) | {r['seed']} | {r['plain_mean_forgetting']:.3f} | "
            f"{r['lalora_mean_forgetting']:.3f} | {r['limit']:.3f} | {r['min_learned_ratio']:.0%} | "
            f"{'yes' if r['met'] else 'NO'} |"
        )
    report = {
        "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
        "overrides": args.sets,
        "cells": rows,
        "met": all(r["met"] for r in rows),
        "smallest_forgetting_margin": min(r["forgetting_margin"] for r in rows),
        "smallest_learning_margin": min(r["learning_margin"] for r in rows),
        "seconds": time.perf_counter() - t0,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(
        f"{sum(r['met'] for r in rows)} of {len(rows)} cells meet the target; smallest margins: forgetting "
        f"{report['smallest_forgetting_margin']:+.3f} (limit minus LaLoRA's), learning ratio "
        f"{report['smallest_learning_margin']:+.0%} (over {MIN_LEARNED_RATIO:.0%})"
    )
    if args.json:
        out = ROOT / "benchmarks" / "results" / f"cpu-{report['date']}" / "demo-robustness.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0 if report["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
