"""Cost of the Laplace penalty and of the curvature pass, as ratios measured side by side.

    python benchmarks/curvature.py [--json] [--hidden 256 --layers 4 --batch 8 --seq 128,32,16]

Measures on one Llama-shaped model with LoRA on every linear layer (random weights, B != 0):
  step_plain      training step: forward, backward, AdamW on the LoRA matrices
  step_diag       the same plus lalora's diag penalty (foreach kernels, one autograd node)
  step_naive      the same plus a naive Python sum over the LoRA matrices (the GPU anchor's 1.118x)
  backward        one batched forward + backward of the batch (the curvature pass's floor)
  fisher_hook     lalora's diag Fisher over the batch (per-sequence grads from layer hooks)
  fisher_loop     one forward + backward per sequence (brute force)
  penalty_only    the diag penalty's forward + backward alone (naive_only: the naive sum's)
  *_kfac, *_kfac_tri  the same step, curvature pass and penalty for the Kronecker structures
                  (top-k compressed factors); bytes_vs_adapter_S: stored precision / adapter size
Timings are the minimum over interleaved repetitions (medians are in the JSON too); each
sequence length is measured on the same model; the last line printed is one JSON object.
Its "targets" say whether the first sequence length meets them: each Kronecker curvature pass
over one batch, compressing its factors included, within 2x a batched forward + backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {
    # Llama-3.2-1B: the GPU anchor's shape (shared/bench/gpu_anchor.py)
    "llama-1b": {"hidden": 2048, "layers": 16, "vocab": 128256, "intermediate": 8192, "heads": 32, "kv_heads": 8},
}


def build(
    hidden: int,
    layers: int,
    vocab: int,
    r: int,
    seed: int = 0,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = heads or max(1, hidden // 64)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(dtype)
    base.config.use_cache = False
    model = get_peft_model(
        base,
        LoraConfig(
            r=r,
            lora_alpha=2 * r,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    for _name, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.01)  # nonzero B so every gradient is informative
    return model, cfg


KRON = ("kfac", "kfac_tri")
"""Kronecker structures measured beside diag; keys use _ where the config's kind uses -."""
KRON_CURVATURE_TARGET = 2.0
"""Most a Kronecker curvature pass over one batch may cost, in batched forwards + backwards (issue 27)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the summary as JSON only (last line)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--seq",
        default="128,32,16",
        help="tokens per sequence, comma-separated; the first sets the top-level keys (the demo's "
        "sequences are 12-18 tokens)",
    )
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--top-k", type=int, default=32, help="eigenpairs kept per large Kronecker factor")
    ap.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="a named model shape (overrides --hidden ...)"
    )
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x hidden)")
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--skip-loop", action="store_true", help="leave out the per-sequence loop (slow on big models)")
    ap.add_argument("--block", type=int, default=4, help="training steps per timed block")
    args = ap.parse_args()

    from lalora import DiagPrecision, LaplacePenalty, build_estimator, lora_parameters
    from lalora.curvature.hooks import sequence_nll

    if args.shape:
        for k, v in SHAPES[args.shape].items():
            setattr(args, k, v)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, cfg = build(
        args.hidden,
        args.layers,
        args.vocab,
        args.rank,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        device=args.device,
        dtype=dtype,
    )
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model.eval()  # dropout is 0, so train and eval mode compute the same; no mode switches are timed
    params = lora_parameters(model)
    plist = [p.param for p in params]
    anchor = {p.name: p.param.detach().clone() for p in params}
    g = torch.Generator().manual_seed(1)
    prec = DiagPrecision({p.name: torch.rand(p.param.shape, generator=g).to(p.param.device) for p in params})
    penalty = LaplacePenalty(prec, anchor, params, lam=1.0)
    naive_f = [prec.values[p.name] for p in params]
    naive_a = [anchor[p.name] for p in params]

    def measure(T: int) -> dict:
        opt = torch.optim.AdamW(plist, lr=1e-6)
        B = args.batch
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(args.device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

        def step(kind: str) -> None:
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            if kind == "diag":
                loss = loss + penalty()
            elif kind in kron_penalties:
                loss = loss + kron_penalties[kind]()
            elif kind == "naive":
                loss = loss + 0.5 * sum(
                    (f * (p - a).square()).sum() for f, p, a in zip(naive_f, plist, naive_a, strict=True)
                )
            loss.backward()
            opt.step()

        def backward() -> None:
            model.zero_grad(set_to_none=True)
            sequence_nll(model(input_ids=ids).logits, ids).sum().backward()

        estimator = build_estimator("diag")
        kron_estimators = {S: build_estimator(S.replace("_", "-"), top_k=args.top_k) for S in KRON}
        kron_precisions = {S: e.estimate(model, [batch]).precision for S, e in kron_estimators.items()}
        kron_penalties = {S: LaplacePenalty(p, anchor, params, lam=1.0) for S, p in kron_precisions.items()}
        adapter_bytes = sum(p.numel() * p.element_size() for p in plist)
        kron_bytes = {
            S: sum(t.numel() * t.element_size() for t in p.to_state_dict().values()) for S, p in kron_precisions.items()
        }

        def fisher_hook() -> None:
            estimator.estimate(model, [batch])

        def fisher_loop() -> None:
            acc = [torch.zeros_like(p) for p in plist]
            for i in range(B):
                model.zero_grad(set_to_none=True)
                sequence_nll(model(input_ids=ids[i : i + 1]).logits, ids[i : i + 1]).sum().backward()
                for a, p in zip(acc, plist, strict=True):
                    a.add_(p.grad.square())

        def penalty_only() -> None:
            penalty().backward()

        def naive_only() -> None:
            (
                0.5 * sum((f * (p - a).square()).sum() for f, p, a in zip(naive_f, plist, naive_a, strict=True))
            ).backward()

        fns = {
            "step_plain": lambda: step("plain"),
            "step_diag": lambda: step("diag"),
            "step_naive": lambda: step("naive"),
            "backward": backward,
            "fisher_hook": fisher_hook,
            "fisher_loop": fisher_loop,
            "penalty_only": penalty_only,
            "naive_only": naive_only,
        }
        if args.skip_loop:
            del fns["fisher_loop"]
        for S in KRON:
            fns[f"step_{S}"] = lambda S=S: step(S)
            fns[f"fisher_{S}"] = lambda S=S: kron_estimators[S].estimate(model, [batch])
            fns[f"penalty_only_{S}"] = lambda S=S: kron_penalties[S]().backward()
        for fn in fns.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        order = list(fns)
        for rep in range(args.reps):  # interleaved, order reversed every other rep, so drift hits all alike
            for k in order if rep % 2 == 0 else order[::-1]:
                n = args.block if k.startswith("step_") else 1  # steps timed in blocks: a few % must show
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    fns[k]()
                sync()
                times[k].append((time.perf_counter() - t0) * 1e3 / n)
        # min over repetitions: noise on a shared machine only ever adds time (timeit's advice)
        ms = {k: min(v) for k, v in times.items()}
        median = {k: statistics.median(v) for k, v in times.items()}
        n_all = sum(p.numel() for p in model.parameters())
        summary = {
            "penalty_overhead": ms["step_diag"] / ms["step_plain"],
            "penalty_overhead_naive": ms["step_naive"] / ms["step_plain"],
            "curvature_vs_backward": ms["fisher_hook"] / ms["backward"],
            "loop_vs_hook": ms["fisher_loop"] / ms["fisher_hook"] if "fisher_loop" in ms else None,
            # the penalty's own forward + backward, timed alone: 1 + that / plain step
            "penalty_overhead_isolated": 1 + ms["penalty_only"] / ms["step_plain"],
            "penalty_overhead_naive_isolated": 1 + ms["naive_only"] / ms["step_plain"],
            **{f"penalty_overhead_{S}": ms[f"step_{S}"] / ms["step_plain"] for S in KRON},
            **{f"penalty_overhead_{S}_isolated": 1 + ms[f"penalty_only_{S}"] / ms["step_plain"] for S in KRON},
            **{f"curvature_vs_backward_{S}": ms[f"fisher_{S}"] / ms["backward"] for S in KRON},
            **{f"bytes_vs_adapter_{S}": kron_bytes[S] / adapter_bytes for S in KRON},
            "bytes_vs_adapter_diag": 1.0,
            "ms": {k: round(v, 2) for k, v in ms.items()},
            "ms_median": {k: round(v, 2) for k, v in median.items()},
            "model": {
                "params": n_all,
                "lora_params": sum(p.numel() for p in plist),
                "lora_matrices": len(plist),
                "hidden": args.hidden,
                "layers": args.layers,
                "vocab": args.vocab,
                "rank": args.rank,
                "top_k": args.top_k,
            },
            "batch": B,
            "seq": T,
            "reps": args.reps,
            "threads": torch.get_num_threads(),
            "dtype": args.dtype,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        }
        return summary

    seqs = [int(v) for v in args.seq.split(",")]
    results = {T: measure(T) for T in seqs}
    summary = dict(results[seqs[0]])
    keep = (
        "penalty_overhead",
        "penalty_overhead_naive",
        "penalty_overhead_isolated",
        "penalty_overhead_naive_isolated",
        "curvature_vs_backward",
        "loop_vs_hook",
        "ms",
        *(f"{m}_{S}" for S in KRON for m in ("penalty_overhead", "curvature_vs_backward")),
        *(f"penalty_overhead_{S}_isolated" for S in KRON),
    )
    summary["by_seq"] = {str(T): {k: r[k] for k in keep} for T, r in results.items()}
    summary["targets"] = {
        f"curvature_vs_backward_{S} <= {KRON_CURVATURE_TARGET}": summary[f"curvature_vs_backward_{S}"]
        <= KRON_CURVATURE_TARGET
        for S in KRON
    }
    if not args.json:
        print(
            f"{'seq':>5} {'plain step':>11} {'diag/plain':>11} {'naive/plain':>12} {'diag alone':>11} "
            f"{'naive alone':>12} {'curv/bwd':>9} {'loop/hook':>10}"
        )
        for T, r in results.items():
            print(
                f"{T:>5} {r['ms']['step_plain']:>8.1f} ms {r['penalty_overhead']:>11.3f} "
                f"{r['penalty_overhead_naive']:>12.3f} {r['penalty_overhead_isolated']:>11.4f} "
                f"{r['penalty_overhead_naive_isolated']:>12.4f} {r['curvature_vs_backward']:>9.3f} "
                f"{(r['loop_vs_hook'] or float('nan')):>10.2f}"
            )
        print(f"\n{'seq':>5} {'structure':>10} {'step/plain':>11} {'alone':>8} {'curv/bwd':>9} {'bytes/adapter':>14}")
        for T, r in results.items():
            for S in KRON:
                print(
                    f"{T:>5} {S:>10} {r[f'penalty_overhead_{S}']:>11.3f} {r[f'penalty_overhead_{S}_isolated']:>8.4f} "
                    f"{r[f'curvature_vs_backward_{S}']:>9.3f} {r[f'bytes_vs_adapter_{S}']:>14.2f}"
                )
        print("\n" + "\n".join(f"target {k}: {v}" for k, v in summary["targets"].items()))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
