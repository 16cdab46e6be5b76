"""N consecutive 2-rank launches of a stage's precision and fine-tune steps: how many fail, and what a launch costs.

    python benchmarks/launch_soak.py 150                   # 75 precision + 75 fine-tune launches, ZeRO-3, gloo
    python benchmarks/launch_soak.py 20 --zero-stage 0 --keep runs/soak-failures

Each launch is what ``lalora run`` does with ``deepspeed.world_size: 2``: ``pipelines.stages.steps.run_step``
starts ``python -m deepspeed.launcher.runner --num_gpus 2 --module pipelines.stages.steps JOB`` on the tiny
model (a 1-layer Llama built from a config). Launches alternate precision, fine-tune, precision, ... on an
unchanged job, so every launch does the same work. A failed launch is counted (and, with ``--keep``, its
ranks' output saved), never retried here. Reported: failures (with the exit statuses), the failure rate with
its 95% upper bound (with no failure in N launches, about 3/N), and the launch overhead: the seconds from the
launcher's start to the step's first batch and from its last batch to the launcher's exit (medians and the
worst), next to the work itself. The last line printed is one JSON object; ``--json`` also writes it to
benchmarks/results/cpu-<date>/launch-soak.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG: dict[str, Any] = {
    "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    "lalora": {"lambda": 5.0, "samples": 24, "batch_size": 8},
    "source": {"name": "src", "data": {"kind": "generator", "op": "copy", "size": 80}, "eval_size": 8},
    "domains": [{"name": "one", "data": {"kind": "generator", "op": "reverse", "size": 80}, "eval_size": 8}],
    "training": {"steps": 8, "batch_size": 8, "lr": 5e-3, "log_every": 4, "max_length": 32, "checkpoint_every": 0},
}


def tiny_base(root: Path) -> tuple[str, str]:
    """A 1-layer Llama built from a config, and its LoRA initialisation, under ``root``: (base, adapter)."""
    from pipelines.config import LoraSettings, TinyModelConfig
    from pipelines.runtime.models import build_tiny_llama, char_tokenizer
    from pipelines.stages.finetune import init_adapter

    tok = char_tokenizer()
    base = build_tiny_llama(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=32), tok, seed=3
    )
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    anchor = init_adapter(
        str(root / "base"), LoraSettings.model_validate(CONFIG["lora"]), dtype="float32", out_dir=str(root / "init")
    )
    return str(root / "base"), anchor


def upper_95(failures: int, n: int) -> float:
    """The one-sided 95% Clopper-Pearson upper bound of a failure rate seen as ``failures`` in ``n``."""
    if failures >= n:
        return 1.0
    lo, hi = failures / n, 1.0
    for _ in range(60):  # P(X <= failures | p) = 0.05, by bisection on p
        p = (lo + hi) / 2
        cdf, term = 0.0, (1 - p) ** n
        for k in range(failures + 1):
            cdf += term
            term *= (n - k) / (k + 1) * p / (1 - p)
        lo, hi = (p, hi) if cdf > 0.05 else (lo, p)
    return hi


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "max": max(values)} if values else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, help="launches in all (alternating precision and fine-tune)")
    ap.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--keep", default=None, help="a folder for the output of every failed launch")
    ap.add_argument("--json", action="store_true", help="also write benchmarks/results/cpu-<date>/launch-soak.json")
    args = ap.parse_args(argv)

    from pipelines.config import LineageConfig
    from pipelines.stages.steps import STEPS, run_step
    from pipelines.tracker import LatestTracker
    from pipelines.workspace import StepPaths

    cfg = LineageConfig.model_validate(
        {**CONFIG, "deepspeed": {"world_size": args.world_size, "zero_stage": args.zero_stage}}
    )
    keep = Path(args.keep) if args.keep else None
    launches: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, anchor = tiny_base(root)
        precision: str | None = None
        for i in range(args.n):
            step = "precision" if i % 2 == 0 or precision is None else "finetune"
            paths = StepPaths(
                base, anchor, precision if step == "finetune" else None, str(root / "data"), str(root / "out")
            )
            rec = LatestTracker()
            t0 = time.perf_counter()
            try:
                result = run_step(STEPS[step], cfg, 1, paths, rec)
                error = None
            except Exception as e:  # counted, not retried: the soak measures the launch's own failure rate
                result, error = None, e
            wall = time.perf_counter() - t0
            if step == "precision" and result is not None:
                precision = result.path
            entry: dict[str, Any] = {
                "step": step,
                "ok": error is None,
                "wall_seconds": wall,
                "returncode": getattr(error, "returncode", None if error is None else -1),
                "error": None if error is None else str(error)[-400:],
                "startup_seconds": rec.values.get(f"launch/{step}_startup_seconds"),
                "teardown_seconds": rec.values.get(f"launch/{step}_teardown_seconds"),
                "work_seconds": getattr(result, "seconds", None),
            }
            launches.append(entry)
            if error is not None and keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                log = root / "out" / f"launch-{step}" / "output.log"
                (keep / f"launch-{i:04d}-{step}.log").write_text(log.read_text() if log.is_file() else str(error))
            print(
                f"launch {i + 1}/{args.n} {step}: {'ok' if error is None else 'FAILED'} {wall:.1f} s"
                + (f" ({entry['error']})" if error else ""),
                flush=True,
            )

    failed = [e for e in launches if not e["ok"]]
    report = {
        "n": args.n,
        "world_size": args.world_size,
        "zero_stage": args.zero_stage,
        "failures": len(failed),
        "failure_rate": len(failed) / args.n,
        "failure_rate_upper_95": upper_95(len(failed), args.n),
        "exit_statuses": sorted({e["returncode"] for e in failed}),
        "wall_seconds": _summary([e["wall_seconds"] for e in launches]),
        "startup_seconds": _summary([e["startup_seconds"] for e in launches if e["startup_seconds"] is not None]),
        "teardown_seconds": _summary([e["teardown_seconds"] for e in launches if e["teardown_seconds"] is not None]),
        "work_seconds": _summary([e["work_seconds"] for e in launches if e["work_seconds"]]),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(
        f"{len(failed)} of {args.n} launches failed (rate {report['failure_rate']:.3f}, 95% upper bound "
        f"{report['failure_rate_upper_95']:.3f}); exit statuses {report['exit_statuses']}"
    )
    for key in ("wall_seconds", "startup_seconds", "teardown_seconds", "work_seconds"):
        if report[key]:
            print(f"{key}: median {report[key]['median']:.2f}, max {report[key]['max']:.2f}")
    if args.json:
        out = ROOT / "benchmarks" / "results" / f"cpu-{report['date']}" / "launch-soak.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**report, "launches": launches}, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
