"""Cost of the Laplace penalty and of the curvature pass, as ratios measured side by side.

    python benchmarks/curvature.py [--json] [--hidden 256 --layers 4 --batch 8 --seq 128]

Measures on one Llama-shaped model with LoRA on every linear layer (random weights, B != 0):
  step_plain      training step: forward, backward, AdamW on the LoRA matrices
  step_diag       the same plus lalora's diag penalty (foreach kernels, one autograd node)
  step_naive      the same plus a naive Python sum over the LoRA matrices (the GPU anchor's 1.118x)
  backward        one batched forward + backward of the batch (the curvature pass's floor)
  fisher_hook     lalora's diag Fisher over the batch (per-sequence grads from layer hooks)
  fisher_loop     one forward + backward per sequence (brute force)
Timings are medians of interleaved repetitions; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(hidden: int, layers: int, vocab: int, r: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=1024)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.01)  # nonzero B so every gradient is informative
    return model, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the summary as JSON only (last line)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()

    from lalora import DiagPrecision, LaplacePenalty, build_estimator, lora_parameters
    from lalora.curvature.hooks import sequence_nll

    model, cfg = build(args.hidden, args.layers, args.vocab, args.rank)
    model.train()
    params = lora_parameters(model)
    plist = [p.param for p in params]
    anchor = {p.name: p.param.detach().clone() for p in params}
    g = torch.Generator().manual_seed(1)
    prec = DiagPrecision({p.name: torch.rand(p.param.shape, generator=g) for p in params})
    penalty = LaplacePenalty(prec, anchor, params, lam=1.0)
    naive_f = [prec.values[p.name] for p in params]
    naive_a = [anchor[p.name] for p in params]
    opt = torch.optim.AdamW(plist, lr=1e-6)
    B, T = args.batch, args.seq
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step(kind: str) -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        if kind == "diag":
            loss = loss + penalty()
        elif kind == "naive":
            loss = loss + 0.5 * sum((f * (p - a).square()).sum() for f, p, a in zip(naive_f, plist, naive_a))
        loss.backward()
        opt.step()

    def backward() -> None:
        model.zero_grad(set_to_none=True)
        sequence_nll(model(input_ids=ids).logits, ids).sum().backward()

    estimator = build_estimator("diag")

    def fisher_hook() -> None:
        estimator.estimate(model, [batch])

    def fisher_loop() -> None:
        acc = [torch.zeros_like(p) for p in plist]
        for i in range(B):
            model.zero_grad(set_to_none=True)
            sequence_nll(model(input_ids=ids[i:i + 1]).logits, ids[i:i + 1]).sum().backward()
            for a, p in zip(acc, plist):
                a.add_(p.grad.square())

    fns = {"step_plain": lambda: step("plain"), "step_diag": lambda: step("diag"), "step_naive": lambda: step("naive"),
           "backward": backward, "fisher_hook": fisher_hook, "fisher_loop": fisher_loop}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.reps):  # interleaved, so drift hits every measurement alike
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    ms = {k: statistics.median(v) for k, v in times.items()}
    n_all = sum(p.numel() for p in model.parameters())
    summary = {
        "penalty_overhead": ms["step_diag"] / ms["step_plain"],
        "penalty_overhead_naive": ms["step_naive"] / ms["step_plain"],
        "curvature_vs_backward": ms["fisher_hook"] / ms["backward"],
        "loop_vs_hook": ms["fisher_loop"] / ms["fisher_hook"],
        "ms": {k: round(v, 2) for k, v in ms.items()},
        "model": {"params": n_all, "lora_params": sum(p.numel() for p in plist), "lora_matrices": len(plist),
                  "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "rank": args.rank},
        "batch": B, "seq": T, "reps": args.reps, "device": "cpu", "threads": torch.get_num_threads(),
    }
    if not args.json:
        for k, v in ms.items():
            print(f"{k:<12} {v:9.1f} ms")
        print(f"penalty overhead (diag step / plain step):  {summary['penalty_overhead']:.3f}"
              f"   naive Python sum: {summary['penalty_overhead_naive']:.3f}")
        print(f"curvature pass / batched backward:          {summary['curvature_vs_backward']:.3f}")
        print(f"per-sequence loop / hook curvature:         {summary['loop_vs_hook']:.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
