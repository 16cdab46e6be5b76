"""Orchestration overhead per stage: Prefect + MLflow around the stage's own work.

    python benchmarks/overhead.py                       # the demo lineage (configs/demo.yaml)
    python benchmarks/overhead.py --set training.steps=50 --json

Runs the lineage through the real flow (ephemeral Prefect API unless PREFECT_API_URL is set;
a fresh SQLite MLflow store under --out). Inside each stage the flow times the pipelines
calls its tasks wrap (curvature, fine-tune, evaluation), less the MLflow calls made from
inside them; the stage's overhead is its wall time minus that work: Prefect task runs, MLflow
runs, metric / artifact logging, the registry, the gate. Budget: max(3 s, 5% of the stage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="output directory (default: a fresh temporary one)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from flows.console import prepare_environment

    prepare_environment()
    from flows.lineage_flow import lineage_flow

    out = args.out or tempfile.mkdtemp(prefix="lalora-overhead-")
    t0 = time.perf_counter()
    result = lineage_flow(args.config, out, args.overrides).as_json()
    total = time.perf_counter() - t0
    rows = []
    for s in result["timing"]:
        budget = max(3.0, 0.05 * s["wall_seconds"])
        rows.append(
            {
                **s,
                "overhead_fraction": s["overhead_seconds"] / s["wall_seconds"],
                "budget_seconds": budget,
                "within_budget": s["overhead_seconds"] <= budget,
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "config": args.config,
                    "overrides": args.overrides,
                    "lineage_seconds": total,
                    "cpu_threads": os.cpu_count(),
                    "stages": rows,
                },
                indent=2,
            )
        )
    else:
        print(f"{'stage':>5} {'wall s':>8} {'work s':>8} {'overhead s':>11} {'overhead %':>11} {'budget s':>9}")
        for r in rows:
            print(
                f"{r['stage']:>5} {r['wall_seconds']:>8.2f} {r['compute_seconds']:>8.2f} "
                f"{r['overhead_seconds']:>11.2f} {100 * r['overhead_fraction']:>10.1f}% {r['budget_seconds']:>9.2f}"
                + ("" if r["within_budget"] else "  OVER BUDGET")
            )
        print(f"lineage: {total:.1f} s in all (base model and row 0 included), output in {out}")
    return 0 if all(r["within_budget"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
