"""A short LaLoRA lineage on a Llama-3.2-1B-shaped model under DeepSpeed: fine-tune throughput and curvature cost.

    python benchmarks/gpu_lineage.py --json                  # on a GPU: the 1B shape, bf16, ZeRO-2
    python benchmarks/gpu_lineage.py --shape tiny --device cpu --dtype fp32 --zero 0   # a smoke run here

Two stages on random tokens (B x T, every token a target), as the pipeline runs them:
curvature (diag, per-sequence Fisher from hooks) at the anchor, accumulated, then LoRA
fine-tuning with the Laplace penalty inside a DeepSpeed engine (pipelines.engine.train, the
pipeline's own loop: its per-step finiteness check and logging included). Reported per
stage: fine-tune tokens/s over the measured steps (warm-up steps run first in their own
engine), the curvature pass in ms and against one batched forward + backward of the same
batch. Run beside shared/bench/gpu_anchor_ds.py, whose ZeRO-2 step is the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.curvature import SHAPES, build

SHAPES = {**SHAPES, "tiny": {"hidden": 64, "layers": 2, "vocab": 512, "intermediate": 128, "heads": 4, "kv_heads": 2}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--curvature-batches", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from lalora import LaplacePenalty, Prior, accumulate, build_estimator, lora_parameters
    from lalora.curvature.hooks import sequence_nll
    from pipelines.config import DeepSpeedConfig
    from pipelines.runtime.engine import train
    from pipelines.tracker import NullTracker

    shape = SHAPES[args.shape]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, cfg = build(
        shape["hidden"],
        shape["layers"],
        shape["vocab"],
        args.rank,
        intermediate=shape["intermediate"],
        heads=shape["heads"],
        kv_heads=shape["kv_heads"],
        device=args.device,
        dtype=dtype,
    )
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    params = lora_parameters(model)
    plist = [p.param for p in params]
    ds = DeepSpeedConfig(zero_stage=args.zero, precision=args.dtype, gradient_clipping=1.0)
    g = torch.Generator().manual_seed(0)
    B, T = args.batch, args.seq

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(args.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def batches():
        while True:
            yield batch()

    def backward_ms(b: dict[str, torch.Tensor]) -> float:
        ts = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            sequence_nll(model(input_ids=b["input_ids"]).logits, b["labels"]).sum().backward()
            sync()
            ts.append((time.perf_counter() - t0) * 1e3)
        model.zero_grad(set_to_none=True)
        return min(ts)

    precision = None
    stages = []
    for stage in range(1, args.stages + 1):
        curv = [batch() for _ in range(args.curvature_batches)]
        bwd = backward_ms(curv[0])
        sync()
        t0 = time.perf_counter()
        est = build_estimator("diag").estimate(model, curv)
        sync()
        curv_ms = (time.perf_counter() - t0) * 1e3 / len(curv)
        precision = accumulate(precision, est.precision, "sum")
        anchor = {p.name: p.param.detach().clone() for p in params}
        prior = Prior(1.0, 1e-3)

        def make_penalty(module, precision=precision, anchor=anchor, prior=prior):
            return LaplacePenalty(precision, anchor, lora_parameters(module), 1.0, prior)

        common = dict(lr=1e-5, batch_size=B, ds=ds, make_penalty=make_penalty, tracker=NullTracker(), log_every=10**9)
        train(model, plist, batches(), steps=args.warmup, desc=f"stage {stage} warm-up", **common)
        sync()
        res = train(model, plist, batches(), steps=args.steps, desc=f"stage {stage}", **common)
        stages.append(
            {
                "stage": stage,
                "tokens_per_s": res.tokens / res.seconds,
                "ms_per_step": res.seconds * 1e3 / res.steps,
                "final_loss": res.final_loss,
                "final_penalty": res.final_penalty,
                "curvature_ms_per_batch": curv_ms,
                "curvature_vs_backward": curv_ms / bwd,
                "backward_ms": bwd,
                "zero_curvature_matrices": len(est.zero_curvature),
            }
        )
    summary = {
        "shape": args.shape,
        "dtype": args.dtype,
        "zero_stage": args.zero,
        "batch": B,
        "seq": T,
        "rank": args.rank,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "tokens_per_s": statistics.median(s["tokens_per_s"] for s in stages),
        "curvature_vs_backward": statistics.median(s["curvature_vs_backward"] for s in stages),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
        "stages": stages,
    }
    if not args.json:
        for s in stages:
            print(
                f"stage {s['stage']}: {s['tokens_per_s']:,.0f} tok/s ({s['ms_per_step']:.1f} ms/step), curvature "
                f"{s['curvature_ms_per_batch']:.1f} ms/batch = {s['curvature_vs_backward']:.2f} x backward"
            )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
