"""ZeRO-2 against ZeRO-3 at world size 2 through the deepspeed launcher: what each rank holds, and the same result.

    python benchmarks/zero3.py                      # SmolLM2-135M-Instruct (make study-data converts it), gloo, CPU
    python benchmarks/zero3.py --base DIR --world-size 4 --steps 5

Runs a lineage stage's two steps (the curvature, diag, then the fine-tune with the penalty) through
``pipelines.stages.steps.run_step`` as ``lalora run`` does with ``deepspeed.world_size`` > 1, once at
ZeRO-2 and once at ZeRO-3, on the same data (the built-in copy task, max_length tokens). Reported: the base's
parameter bytes one rank holds during the fine-tune (measured on the live tensors by the engine loop), the
adapter's, the fine-tune seconds, and how far the ZeRO-3 precision and adapter are from ZeRO-2's. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=str(ROOT / ".cache" / "smollm2-135m-instruct"))
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args(argv)
    if not (Path(args.base) / "config.json").is_file():
        raise SystemExit(f"--base {args.base}: no model there (make study-data writes SmolLM2-135M-Instruct)")

    import torch
    from safetensors.torch import load_file

    from lalora import load_precision
    from pipelines.config import LineageConfig, LoraSettings
    from pipelines.stages.finetune import init_adapter
    from pipelines.stages.steps import FINETUNE, PRECISION, run_step
    from pipelines.tracker import LatestTracker
    from pipelines.workspace import StepPaths

    n = max(2, (args.max_length - 8) // 2)
    raw = {
        "model": {"path": args.base},
        "lora": {"r": args.rank, "alpha": 2 * args.rank, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "lalora": {"lambda": 1.0, "samples": 2 * args.batch, "batch_size": args.batch},
        "source": {
            "name": "src",
            "data": {"kind": "generator", "op": "copy", "min_len": n, "max_len": n, "size": 200},
            "eval_size": 8,
        },
        "domains": [
            {
                "name": "one",
                "data": {"kind": "generator", "op": "reverse", "min_len": n, "max_len": n, "size": 200},
                "eval_size": 8,
            }
        ],
        "training": {
            "steps": args.steps,
            "batch_size": args.batch,
            "lr": 1e-4,
            "log_every": args.steps,
            "max_length": args.max_length,
            "checkpoint_every": 0,
        },
    }
    out: dict[str, Any] = {
        "base": args.base,
        "world_size": args.world_size,
        "steps": args.steps,
        "batch": args.batch,
        "max_length": args.max_length,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lora = LoraSettings.model_validate(raw["lora"])
        anchor = init_adapter(args.base, lora, dtype="float32", out_dir=str(root / "init"))
        results = {}
        for zero in (2, 3):
            cfg = LineageConfig.model_validate(
                {**raw, "deepspeed": {"world_size": args.world_size, "zero_stage": zero}}
            )
            paths = StepPaths(args.base, anchor, None, str(root / "data"), str(root / f"z{zero}"))
            rec = LatestTracker()
            t0 = time.perf_counter()
            prec = run_step(PRECISION, cfg, 1, paths, rec)
            curvature_s = time.perf_counter() - t0
            paths = StepPaths(args.base, anchor, prec.path, str(root / "data"), str(root / f"z{zero}"))
            fine = run_step(FINETUNE, cfg, 1, paths, rec)
            results[zero] = (prec, fine)
            out[f"zero{zero}"] = {
                "base_bytes_per_rank": rec.values["train.base_param_bytes_per_rank"],
                "trainable_bytes": rec.values["train.trainable_param_bytes"],
                "finetune_seconds": fine.seconds,
                "curvature_step_seconds": curvature_s,
                "final_loss": fine.final_loss,
            }
            mib = 2**20
            sizes = out[f"zero{zero}"]
            print(
                f"ZeRO-{zero}, {args.world_size} ranks: base {sizes['base_bytes_per_rank'] / mib:.1f} MiB "
                f"per rank, LoRA {sizes['trainable_bytes'] / mib:.2f} MiB, fine-tune {fine.seconds:.1f} s "
                f"({args.steps} steps)",
                flush=True,
            )
        (p2, f2), (p3, f3) = results[2], results[3]
        s2, s3 = load_precision(p2.path)[0].diagonal(), load_precision(p3.path)[0].diagonal()
        a2 = load_file(f"{f2.adapter}/adapter_model.safetensors")
        a3 = load_file(f"{f3.adapter}/adapter_model.safetensors")
        rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))  # noqa: E731
        out["precision_max_rel_diff"] = max(rel(s3[k], s2[k]) for k in s2)
        out["adapter_max_abs_diff"] = max(float((a3[k] - a2[k]).abs().max()) for k in a2)
        out["adapter_close_rtol1e-4_atol1e-6"] = all(torch.allclose(a3[k], a2[k], rtol=1e-4, atol=1e-6) for k in a2)
        out["adapter_tensors"] = len(a3)
        out["base_bytes_ratio_zero3_vs_zero2"] = (
            out["zero3"]["base_bytes_per_rank"] / out["zero2"]["base_bytes_per_rank"]
        )
    print(
        f"ZeRO-3 / ZeRO-2 base bytes per rank: {out['base_bytes_ratio_zero3_vs_zero2']:.3f}; precision max rel "
        f"diff {out['precision_max_rel_diff']:.1e}; adapter max abs diff {out['adapter_max_abs_diff']:.1e} (within "
        f"rtol 1e-4, atol 1e-6: {out['adapter_close_rtol1e-4_atol1e-6']})"
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
