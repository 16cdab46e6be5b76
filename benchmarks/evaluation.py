"""Evaluation throughput: the batched scorers against one-example-at-a-time loops, side by side.

    python benchmarks/evaluation.py [--json] [--hidden 256 --layers 4 --n 64 --batch 32 --device auto]

One Llama-shaped model with random weights and the character tokenizer (nothing downloaded);
prompts and choices are random printable strings of HellaSwag-like lengths (characters are
tokens here). Measured, each the minimum over ``--reps`` interleaved repetitions:
  gen_batched   pipelines.scoring.generate_texts, ``--batch`` prompts per generate call (KV cache)
  gen_loop      the same function one prompt at a time
  mc_batched    pipelines.scoring.pair_loglikelihoods: ``--batch`` (context, choice) pairs per
                batch, each distinct context run once and shared through the KV cache
  mc_nocache    the same pairs batched as full sequences (context repeated per choice, no cache)
  mc_loop       one forward per (context, choice) pair: the manual loop of the tests
The outputs are checked equal (generations exactly, log-likelihoods to a tolerance); the last
line printed is one JSON object with the timings and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm: no progress bars in the timings
import torch  # noqa: E402


def build(hidden: int, layers: int, heads: int, kv_heads: int, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.runtime.models import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      initializer_range=0.1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval(), tok


def text(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_letters + "  .,") for _ in range(rng.randint(lo, hi)))


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


@torch.no_grad()
def mc_loop(model: Any, examples: list[list[tuple[list[int], list[int]]]], device: str) -> list[list[float]]:
    out = []
    for ex in examples:
        lls = []
        for ctx, cont in ex:
            logp = model(input_ids=torch.tensor([ctx + cont], device=device)).logits[0].float().log_softmax(-1)
            idx = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=device)
            lls.append(float(logp[idx, torch.tensor(cont, device=device)].sum()))
        out.append(lls)
    return out


@torch.no_grad()
def mc_nocache(model: Any, examples: list[list[tuple[list[int], list[int]]]], batch: int, pad: int,
               device: str) -> list[list[float]]:
    """Full sequences, right-padded, ``batch`` pairs per forward, no context sharing."""
    pairs = [p for ex in examples for p in ex]
    lls: list[float] = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        seqs = [c + t for c, t in chunk]
        W = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (W - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (W - len(s)) for s in seqs], device=device)
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for row, (c, t) in enumerate(chunk):
            idx = torch.arange(len(c) - 1, len(c) - 1 + len(t), device=device)
            lls.append(float(logp[row, idx, torch.tensor(t, device=device)].sum()))
    out, k = [], 0
    for ex in examples:
        out.append(lls[k : k + len(ex)])
        k += len(ex)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON summary")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--n", type=int, default=32, help="prompts / multiple-choice examples")
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32, help="prompts per generate call; (context, choice) pairs per batch")
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pipelines.data.tokens import prompt_ids
    from pipelines.scoring.scorers import choice_pairs, generate_texts, pair_loglikelihoods

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tok = build(args.hidden, args.layers, args.heads, args.kv_heads, device, getattr(torch, args.dtype))
    rng = random.Random(0)
    prompts = [prompt_ids(tok, text(rng, 20, 60)) for _ in range(args.n)]
    rows = [{"prompt": text(rng, 40, 120), "choices": [text(rng, 8, 40) for _ in range(args.choices)], "label": 0}
            for _ in range(args.n)]
    examples = [choice_pairs(tok, r, None) for r in rows]
    pad = tok.pad_token_id

    runs: dict[str, Callable[[], Any]] = {
        "gen_batched": lambda: generate_texts(model, tok, prompts, batch_size=args.batch, max_new_tokens=args.max_new),
        "gen_loop": lambda: generate_texts(model, tok, prompts, batch_size=1, max_new_tokens=args.max_new),
        "mc_batched": lambda: pair_loglikelihoods(model, examples, batch_size=args.batch, pad=pad),
        "mc_nocache": lambda: mc_nocache(model, examples, args.batch, pad, device),
        "mc_loop": lambda: mc_loop(model, examples, device),
    }
    for fn in runs.values():  # warm-up (kernels, allocator)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs: dict[str, Any] = {}
    for _ in range(args.reps):
        for name, fn in runs.items():
            t, outputs[name] = timed(fn, device)
            times[name].append(t)
    best = {k: min(v) for k, v in times.items()}
    flat = {k: torch.tensor([v for ex in outputs[k] for v in ex]) for k in ("mc_batched", "mc_nocache", "mc_loop")}
    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                  "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "dtype": args.dtype},
        "workload": {"n": args.n, "choices": args.choices, "batch": args.batch, "max_new_tokens": args.max_new,
                     "reps": args.reps},
        "seconds": {k: round(v, 4) for k, v in best.items()},
        "generation_loop_over_batched": round(best["gen_loop"] / best["gen_batched"], 2),
        "mc_loop_over_batched": round(best["mc_loop"] / best["mc_batched"], 2),
        "mc_nocache_over_batched": round(best["mc_nocache"] / best["mc_batched"], 2),
        "generations_equal": outputs["gen_batched"] == outputs["gen_loop"],
        "mc_max_abs_diff_vs_loop": float((flat["mc_batched"] - flat["mc_loop"]).abs().max()),
        "mc_ranking_equal": [max(range(len(a)), key=a.__getitem__) for a in outputs["mc_batched"]]
        == [max(range(len(a)), key=a.__getitem__) for a in outputs["mc_loop"]],
    }
    if not args.json:
        print(f"{result['device']}, {result['model']['params_M']} M parameters, {args.dtype}")
        for k, v in best.items():
            print(f"  {k:<12} {v * 1e3:9.1f} ms")
        print(f"  generation: loop / batched = {result['generation_loop_over_batched']}x "
              f"(outputs equal: {result['generations_equal']})")
        print(f"  multiple choice: loop / batched = {result['mc_loop_over_batched']}x, no-cache batched / batched = "
              f"{result['mc_nocache_over_batched']}x (max |d ll| {result['mc_max_abs_diff_vs_loop']:.1e})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
