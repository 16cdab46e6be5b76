"""DeepSpeed's plain ZeRO-3 beside our ZeRO-3 stage, the same model, batch and steps: tokens/s and memory.

    python benchmarks/zero3_anchor.py                      # hidden 256, 4 layers, vocab 4096, r 16, 8 x 128, CPU (gloo)
    python benchmarks/zero3_anchor.py --world-size 2       # both sides under the deepspeed launcher, 2 ranks
    # the test:
    python benchmarks/zero3_anchor.py --hidden 64 --layers 1 --vocab 512 --seq 32 --warmup 1 --steps 2 --repeats 1

One run, one random Llama saved to disk with one LoRA initialisation (r on every linear layer), then, one after
the other, each in its own rank process(es) so that each has its own peak:

- plain: DeepSpeed's plain ZeRO-3 as a user writes it (``from_pretrained``, ``PeftModel.from_pretrained``,
  ``torch.optim.AdamW``, ``deepspeed.initialize`` with ``{"zero_optimization": {"stage": 3}}`` and DeepSpeed's
  defaults otherwise), B x T random tokens, ``warmup + steps`` steps of forward, backward, step;
- ours: a lineage stage as the pipeline runs it at ZeRO-3: ``compute_precision`` (diag) then ``finetune`` with
  the Laplace penalty (``--lambda``, default 1; 0 trains without it, which isolates the penalty's cost), the
  built-in copy task filling T, the same B, warm-up and steps (``--finetune-only --lambda 0``: the fine-tune
  alone, which isolates what the curvature step leaves behind from what the data path holds; ``--loss-chunk N``:
  with ``training.loss_chunk`` N, the LM head run on the copy task's target positions only, the answer half).

Each rank reports (MiB):

- ``peak_rss``: the rank's peak resident set (VmHWM), reset (``/proc/self/clear_refs`` 5) after the imports,
  which both sides share; ours: over the whole stage (curvature step and fine-tune), and ``finetune_peak_rss``
  for the fine-tune step alone (reset when the curvature step has returned);
- ``live_tensor`` bytes: every tensor reachable from Python (``gc``; each storage once) after the last step with
  the engine alive, and ours also between the two steps and after the fine-tune (what a step left behind);
- ``base_bytes_per_rank`` / ``trainable_bytes``: the model's parameters one rank holds (``parameter_bytes``).

tokens/s: attended tokens per (global) step x the timed steps over their wall time, after ``warmup`` steps (per-step
clocks: ours from the training loop's log calls with ``log_every`` 1); the sides run ``--repeats`` times,
alternated, and each side's fastest run is reported (its memory figures with it), beside each side's run-to-run
spread and the ratio of the sides' median steps (the median of each run's median step). The penalty's own tensors
are the precision (its state dict) and the anchor copy of the LoRA matrices. The last line printed is one JSON object
with both sides, the ratios and the targets: tokens/s >= plain's, and peak RSS <= plain's + the penalty's tensors.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20


def rss_kib(field: str) -> int:
    """VmRSS, VmHWM, RssAnon (heap) or RssFile (mapped files: code pages) of this process, KiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def live_models() -> dict[str, int]:
    """How many DeepSpeed engines, peft models and transformers models are alive (reachable or not yet collected)."""
    gc.collect()
    names = (
        "DeepSpeedEngine",
        "PeftModelForCausalLM",
        "PeftModel",
        "LlamaForCausalLM",
        "DeepSpeedZeroOptimizer_Stage3",
    )
    found = {n: 0 for n in names}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in found:
            found[name] += 1
    return found


def live_tensor_bytes() -> int:
    """Bytes of every tensor reachable from Python, each storage counted once (allocated, not necessarily touched:
    DeepSpeed's ZeRO-3 reduce bucket, ``reduce_bucket_size`` elements, is allocated whole and counts here whole)."""
    import torch

    gc.collect()
    seen: dict[tuple[int, str], int] = {}
    with warnings.catch_warnings():  # isinstance on deprecated module attributes warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type != "meta":
                s = obj.untyped_storage()
                if s.nbytes():
                    seen[(s.data_ptr(), str(obj.device))] = s.nbytes()
        except Exception:  # a half-built object in the heap
            continue
    return sum(seen.values())


def _imports() -> None:
    """What both sides import before their memory is measured, so neither carries the other's modules."""
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import pipelines.stages.curvature
    import pipelines.stages.finetune  # noqa: F401


def _throughput(times: list[float], start: float, warmup: int, tokens_per_step: float) -> dict[str, float]:
    """tokens/s after ``warmup`` (>= 1) steps and over every step; ``times`` are the ends of the steps."""
    timed = len(times) - warmup
    return {
        "tokens_per_s": timed * tokens_per_step / (times[-1] - times[warmup - 1]),
        "tokens_per_s_all_steps": len(times) * tokens_per_step / (times[-1] - start),
        # each step's start beside its end: as many as the steps
        "step_ms_median": sorted((b - a) * 1e3 for a, b in zip([start, *times[:-1]], times, strict=True))[
            len(times) // 2
        ],
    }


def gpu_reset() -> None:
    """Start the device's peak memory again (CUDA only)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def gpu_peak() -> float | None:
    """The device's peak allocated memory since ``gpu_reset``, MiB (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / MIB if torch.cuda.is_available() else None


def child_plain(args: argparse.Namespace) -> dict[str, Any]:
    """DeepSpeed's plain ZeRO-3 on the PEFT model, as a user writes it."""
    import deepspeed
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from pipelines.runtime.engine import parameter_bytes

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    rss0 = rss_kib("VmRSS")
    reset_peak()
    gpu_reset()
    dtype = getattr(torch, args.dtype)
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(args.base, dtype=dtype), args.anchor, is_trainable=True
    )
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": args.batch // size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        **({"bf16": {"enabled": True}} if dtype == torch.bfloat16 else {}),
    }
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0),
        config=config,
    )
    ids = torch.randint(5, 100, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    n = args.batch // size
    ids = ids[rank * n : (rank + 1) * n].to(engine.device)
    engine.train()
    times, start = [], time.perf_counter()
    for _ in range(args.warmup + args.steps):
        loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter())
    held, models = parameter_bytes(engine.module), live_models()
    out = {
        "rank": rank,
        "side": "plain",
        "rss_start": rss0 / 1024,
        "peak_rss": rss_kib("VmHWM") / 1024,
        "peak_gpu": gpu_peak(),
        "live_tensor_after_last_step": live_tensor_bytes() / MIB,
        "base_bytes_per_rank": held.base_per_rank,
        "trainable_bytes": held.trainable,
        "final_loss": float(loss),
        "live_models_training": models,
        "persistence_threshold": engine._config.zero_config.param_persistence_threshold,
        **_throughput(times, start, args.warmup, args.batch * args.seq),
    }
    engine.destroy()
    return out


class _Clock:
    """A tracker that stamps the end of every logged step (``log_every`` 1) and, at the last one, counts the
    live tensors while the engine is still alive."""

    def __init__(self, last: int) -> None:
        self.values: dict[str, Any] = {}
        self.times: list[float] = []
        self.last, self.live, self.models = last, 0, {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.values.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.values.update(metrics)
        if "train/loss" in metrics:
            self.times.append(time.perf_counter())
            if step == self.last:
                self.live, self.models = live_tensor_bytes(), live_models()

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        return None


def child_ours(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's ZeRO-3 stage: the curvature step, then the fine-tune with the penalty."""
    from lalora import load_precision
    from pipelines.config import DeepSpeedConfig, DomainConfig, LaLoRAConfig, TrainingConfig
    from pipelines.runtime.distributed import world
    from pipelines.stages.curvature import PrecisionInputs, compute_precision
    from pipelines.stages.finetune import FinetuneInputs, finetune

    work = Path(args.work)
    length = max(2, (args.seq - 4) // 2)  # prompt + answer fill T (as benchmarks/gpu_suite.py)
    domain = DomainConfig.model_validate(
        {
            "name": "copy",
            "data": {"kind": "generator", "op": "copy", "min_len": length, "max_len": length, "size": 400},
            "eval_size": 8,
        }
    )
    lalora = LaLoRAConfig.model_validate(
        {"lambda": args.lam, "samples": 2 * args.batch, "batch_size": args.batch, "curvature": {"kind": args.curvature}}
    )
    domain = domain.with_samples(lalora.samples)  # as a lineage's config resolves it
    total = args.warmup + args.steps
    training = TrainingConfig(
        steps=total,
        lr=1e-5,
        batch_size=args.batch,
        max_length=args.seq,
        log_every=1,
        checkpoint_every=0,
        loss_chunk=args.loss_chunk,
    )
    ds = DeepSpeedConfig(
        zero_stage=3,
        world_size=args.world_size,
        precision="bf16" if args.dtype == "bfloat16" else "fp32",
        gradient_clipping=1.0,
        persistence_threshold=args.persistence_threshold,
    )
    rss0, anon0, file0 = rss_kib("VmRSS"), rss_kib("RssAnon"), rss_kib("RssFile")
    reset_peak()
    gpu_reset()
    t0 = time.perf_counter()
    clock = _Clock(total)
    curvature = PrecisionInputs(
        base=args.base,
        anchor=args.anchor,
        lalora=lalora,
        domain=domain,
        previous=None,
        stage=1,
        dtype=args.dtype,
        max_length=args.seq,
        seed=0,
        data_dir=str(work / "data"),
        out_dir=str(work / "ours"),
        ds=ds,
    )
    prec = None if args.finetune_only else compute_precision(curvature, clock)
    curvature_s = time.perf_counter() - t0
    precision_peak, precision_gpu = rss_kib("VmHWM"), gpu_peak()
    between, models_between = live_tensor_bytes(), live_models()
    rss1, anon1, file1 = rss_kib("VmRSS"), rss_kib("RssAnon"), rss_kib("RssFile")
    reset_peak()
    gpu_reset()
    start = time.perf_counter()
    result = finetune(
        FinetuneInputs(
            base=args.base,
            anchor=args.anchor,
            precision=prec.path if prec is not None else None,
            lalora=lalora,
            domain=domain,
            training=training,
            ds=ds,
            dtype=args.dtype,
            stage=1,
            data_dir=str(work / "data"),
            out_dir=str(work / "ours"),
        ),
        clock,
    )
    finetune_peak, finetune_gpu = rss_kib("VmHWM"), gpu_peak()
    after, models_after = live_tensor_bytes(), live_models()
    state = load_precision(prec.path)[0].to_state_dict() if prec is not None else {}
    size = world()[1]  # the loop counts this rank's tokens; every rank takes an equal share of the global batch
    # the result carries a rate, not a count: the count comes back through float division, so round it
    per_step = round(result.tokens_per_second * result.seconds / result.steps) * size
    return {
        "rank": world()[0],
        "side": "ours",
        "rss_start": rss0 / 1024,
        "peak_rss": max(precision_peak, finetune_peak) / 1024,
        "precision_step_peak_rss": precision_peak / 1024,
        "peak_gpu": max(precision_gpu, finetune_gpu) if finetune_gpu is not None else None,
        "finetune_peak_gpu": finetune_gpu,
        "rss_between_steps": rss1 / 1024,
        "rss_between_steps_anon": anon1 / 1024,  # what is left of the curvature step: heap, and code pages mapped
        "rss_between_steps_file": file1 / 1024,
        "rss_start_anon": anon0 / 1024,
        "rss_start_file": file0 / 1024,
        "finetune_peak_rss": finetune_peak / 1024,
        "live_tensor_between_steps": between / MIB,
        "live_tensor_after_last_step": clock.live / MIB,
        "live_models_training": clock.models,
        "tokens_per_step": per_step,
        "live_tensor_after_finetune": after / MIB,
        "live_models_between_steps": models_between,
        "live_models_after_finetune": models_after,
        "base_bytes_per_rank": clock.values["train.base_param_bytes_per_rank"],
        "trainable_bytes": clock.values["train.trainable_param_bytes"],
        "precision_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "final_loss": result.final_loss,
        "final_penalty": result.final_penalty,
        "lambda": lalora.lam,
        "loss_chunk": training.loss_chunk,
        "curvature_step_s": curvature_s,
        "persistence_threshold": ds.persistence_threshold,  # the engine's is at least the largest LoRA matrix's
        **_throughput(clock.times, start, args.warmup, per_step),
        "tokens_per_s_all_steps": result.tokens_per_second * size,
    }  # the loop's own clock (its load excluded)


def child(args: argparse.Namespace) -> None:
    _imports()
    out = (child_plain if args.child == "plain" else child_ours)(args)
    Path(args.work, f"{args.child}-rank{out['rank']}.json").write_text(json.dumps(out))
    import torch

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from pipelines.runtime.distributed import shutdown

        gc.collect()
        shutdown()


def run_side(side: str, args: argparse.Namespace, work: Path, anchor: str) -> dict[str, Any]:
    """One side in its own rank process(es); rank 0's figures, the peak RSS the largest of the ranks'."""
    from pipelines.runtime.distributed import free_port
    from pipelines.runtime.launch import release_shared_memory

    port = free_port()
    script = [
        str(Path(__file__).resolve()),
        "--child",
        side,
        "--work",
        str(work),
        "--base",
        str(work / "base"),
        "--anchor",
        anchor,
        *(
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k
            in (
                "batch",
                "seq",
                "warmup",
                "steps",
                "curvature",
                "world_size",
                "dtype",
                "persistence_threshold",
                "loss_chunk",
            )
        ),
        f"--lambda={args.lam}",
        *(["--finetune-only"] if args.finetune_only else []),
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(ROOT)
    if args.world_size == 1:
        cmd = [sys.executable, *script]
        env |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    else:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--master_port",
            str(port),
            "--no_local_rank",
            "--num_gpus",
            str(args.world_size),
            *script,
        ]
    for old in work.glob(f"{side}-rank*.json"):
        old.unlink()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        release_shared_memory(port)
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob(f"{side}-rank*.json"))]
    if proc.returncode != 0 or len(ranks) != args.world_size:
        raise SystemExit(f"{side} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    out = dict(ranks[0])
    for key in [k for k in out if "rss" in k or "gpu" in k or k.startswith("live_tensor")]:
        out[key] = max(r[key] for r in ranks) if out[key] is not None else None
    return out


def compare(plain: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Ratios and targets of the two sides: tokens/s >= plain's; peak memory (RSS, and the GPU's when there is
    one) <= plain's + the penalty's own tensors (the precision and the anchor copy of the LoRA matrices)."""
    penalty_mib = (ours["precision_bytes"] + ours["trainable_bytes"]) / MIB
    budget = plain["peak_rss"] + penalty_mib
    ratios = {
        "zero3_tokens_per_s_vs_plain": ours["tokens_per_s"] / plain["tokens_per_s"],
        # the median step of each side's runs (the median of their medians): less swayed by one fast run
        "zero3_median_step_speed_vs_plain": statistics.median(
            plain.get("step_ms_median_runs", [plain["step_ms_median"]])
        )
        / statistics.median(ours.get("step_ms_median_runs", [ours["step_ms_median"]])),
        "zero3_peak_rss_vs_plain_plus_penalty": ours["peak_rss"] / budget,
        "zero3_finetune_peak_rss_vs_plain_plus_penalty": ours["finetune_peak_rss"] / budget,
        "zero3_peak_rss_growth_vs_plain": (ours["peak_rss"] - ours["rss_start"])
        / (plain["peak_rss"] - plain["rss_start"]),
        # what the fine-tune itself adds over the RSS the curvature step left, against what plain's training adds
        "zero3_finetune_rss_growth_vs_plain": (ours["finetune_peak_rss"] - ours["rss_between_steps"])
        / (plain["peak_rss"] - plain["rss_start"]),
        "zero3_live_tensors_vs_plain_plus_penalty": ours["live_tensor_after_last_step"]
        / (plain["live_tensor_after_last_step"] + penalty_mib),
    }
    targets = {
        "zero3_tokens_per_s_vs_plain": ratios["zero3_tokens_per_s_vs_plain"] >= 1.0,
        "zero3_peak_memory_vs_plain_plus_penalty": ours["peak_rss"] <= budget,
    }
    if plain.get("peak_gpu") is not None and ours.get("peak_gpu") is not None:  # on a GPU the device's memory counts
        gpu_budget = plain["peak_gpu"] + penalty_mib
        ratios["zero3_peak_gpu_vs_plain_plus_penalty"] = ours["peak_gpu"] / gpu_budget
        ratios["zero3_finetune_peak_gpu_vs_plain_plus_penalty"] = ours["finetune_peak_gpu"] / gpu_budget
        targets["zero3_peak_memory_vs_plain_plus_penalty"] = ours["peak_gpu"] <= gpu_budget
    return {
        "penalty_tensors": penalty_mib,
        "ratios": ratios,
        "targets": targets,
        "live_tensor_diff_ours_minus_plain": ours["live_tensor_after_last_step"] - plain["live_tensor_after_last_step"],
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=None, help="default: 4 x hidden")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank, on every linear layer")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="timed steps after the warm-up")
    ap.add_argument(
        "--persistence-threshold",
        type=int,
        default=100_000,
        help="ours: deepspeed.persistence_threshold (default DeepSpeed's 100,000; 0: partition every base matrix)",
    )
    ap.add_argument("--curvature", default="diag", help="our curvature kind")
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both sides' weights and math")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side, alternated; the faster one is reported")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0, help="ours: lambda (0: no penalty)")
    ap.add_argument(
        "--finetune-only",
        action="store_true",
        help="ours: the fine-tune alone, without the curvature step before it (needs --lambda 0: no precision)",
    )
    ap.add_argument(
        "--loss-chunk",
        type=int,
        default=0,
        help="ours: training.loss_chunk (default 0: transformers' loss over every position, as plain's)",
    )
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--child", choices=["plain", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--anchor", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.finetune_only and args.lam != 0:
        raise SystemExit("--finetune-only trains without a precision: add --lambda 0")
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps: at least 1 each (the first step traces ZeRO-3's fetch order)")
    if args.child:
        child(args)
        return 0
    import torch

    from benchmarks.gpu_suite import save_base
    from pipelines.config import LoraSettings
    from pipelines.stages.finetune import init_adapter

    shape = {
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "intermediate": args.intermediate or 4 * args.hidden,
        "heads": max(1, args.hidden // 64),
        "kv_heads": max(1, args.hidden // 64),
    }
    t_all = time.perf_counter()
    summary: dict[str, Any] = {
        "shape": shape,
        "lora_rank": args.rank,
        "batch": args.batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "world_size": args.world_size,
        "curvature": args.curvature,
        "persistence_threshold": args.persistence_threshold,
        "lambda": args.lam,
        "loss_chunk": args.loss_chunk,
        "finetune_only": args.finetune_only,
        "torch_threads": torch.get_num_threads(),
        "memory_unit": "MiB",
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        save_base(shape, getattr(torch, args.dtype), work / "base")
        anchor = init_adapter(
            str(work / "base"),
            LoraSettings(r=args.rank, alpha=2 * args.rank),
            dtype=args.dtype,
            out_dir=str(work / "init"),
        )
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "ours": []}
        for _ in range(args.repeats):  # alternated, so that a busy spell of a shared machine hits both sides
            for side in ("plain", "ours"):
                runs[side].append(run_side(side, args, work, anchor))
        for side, done in runs.items():
            summary[side] = max(done, key=lambda r: r["tokens_per_s"])
            rates = [r["tokens_per_s"] for r in done]
            summary[side]["tokens_per_s_repeats"] = rates
            # run-to-run spread of a side: a ratio of the two sides within it is not told apart from 1
            summary[side]["tokens_per_s_spread"] = (max(rates) - min(rates)) / max(rates)
            summary[side]["step_ms_median_runs"] = [r["step_ms_median"] for r in done]
            s = summary[side]
            print(
                f"{side}: {s['tokens_per_s']:,.0f} tok/s, peak RSS {s['peak_rss']:.0f} MiB (from {s['rss_start']:.0f}"
                f" after imports), live tensors {s['live_tensor_after_last_step']:.1f} MiB",
                flush=True,
            )
    summary.update(compare(summary["plain"], summary["ours"]))
    summary["seconds"] = time.perf_counter() - t_all
    plain, ours = summary["plain"], summary["ours"]
    print(
        f"ours / plain tokens/s {summary['ratios']['zero3_tokens_per_s_vs_plain']:.3f}; "
        f"peak RSS {ours['peak_rss']:.0f}"
        f" MiB vs plain {plain['peak_rss']:.0f} + penalty {summary['penalty_tensors']:.2f} MiB"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
