"""Evaluation throughput: our scorers against HF ``generate`` / a plain forward on the merged model, and
against one-example-at-a-time loops, side by side.

    python benchmarks/evaluation.py [--json] [--hidden 256 --layers 4 --n 32 --batch 32 --max-new 16 --device auto]
    python benchmarks/evaluation.py --json --no-loops --n 8 --batch 8 --max-new 128     # the GPU issue's 8 x 128

One Llama-shaped model with random weights and the character tokenizer (nothing downloaded), with a
LoRA adapter (``--lora-r`` on every linear layer, B drawn nonzero so the adapter changes the outputs);
prompts and choices are random printable strings of HellaSwag-like lengths (characters are tokens
here). Measured, each the minimum over ``--reps`` interleaved repetitions:
  gen_ours        pipelines.scoring.generate_texts on the peft model, ``--batch`` prompts per batch
  gen_hf_merged   the anchor: HF ``model.generate`` (greedy, KV cache) on a copy with the adapter merged by
                  peft (``merge_and_unload``), the same batches, prompts and new-token limit
  gen_hf_peft     HF ``generate`` on the unmerged peft model (what generate_texts ran before)
  mc_ours         pipelines.scoring.pair_loglikelihoods on the peft model: ``--batch`` (context, choice)
                  pairs per batch, each distinct context run once and shared through the KV cache
  mc_plain        the anchor: a plain forward of the full sequences (context + choice) on the merged copy,
                  ``--batch`` per forward, batched by length, log-softmax and gather
and, unless ``--no-loops``:
  gen_loop        generate_texts one prompt at a time
  mc_loop         one forward per (context, choice) pair on the merged copy: the manual loop of the tests
Our scorers merge the adapter into a copy once per model (``merge_s``, outside the timings: a stage
merges once for all its domains). The outputs are checked: generations equal to the anchor's and to
the unmerged model's, log-likelihoods against the plain forward on the merged and on the unmerged
model. The last line printed is one JSON object with the timings, the ratios (anchor time / ours:
the tokens/s ratio, same tokens) and ``targets``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import string
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm: no progress bars in the timings
import torch


def build(hidden: int, layers: int, heads: int, kv_heads: int, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.runtime.models import char_tokenizer

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        initializer_range=0.1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
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


def with_adapter(model: Any, r: int) -> Any:
    """A peft LoRA model on every linear layer, B drawn N(0, 0.02) (seeded) so the adapter changes the outputs."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return peft.eval()


@torch.no_grad()
def hf_generate(model: Any, tok: Any, prompts: list[list[int]], batch: int, max_new: int, device: str) -> list[str]:
    """HF ``generate``, greedy, on the batches generate_texts makes (longest first, left-padded)."""
    from pipelines.scoring.scorers import left_pad

    eos, pad = tok.eos_token_id, tok.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        ids, mask = left_pad([prompts[i] for i in chunk], pad, torch.device(device))
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
            use_cache=True,
        )
        for i, gen in zip(chunk, out[:, ids.shape[1] :].tolist(), strict=True):
            texts[i] = tok.decode(gen[: gen.index(eos)] if eos in gen else gen, skip_special_tokens=True)
    return texts


@torch.no_grad()
def mc_plain(
    model: Any, examples: list[list[tuple[list[int], list[int]]]], batch: int, pad: int, device: str
) -> list[list[float]]:
    """A plain forward of the full sequences, right-padded, ``batch`` pairs per forward, batched by length."""
    pairs = [p for ex in examples for p in ex]
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    lls = [0.0] * len(pairs)
    for s in range(0, len(order), batch):
        chunk = order[s : s + batch]
        seqs = [pairs[i][0] + pairs[i][1] for i in chunk]
        W = max(map(len, seqs))
        ids = torch.tensor([q + [pad] * (W - len(q)) for q in seqs], device=device)
        mask = torch.tensor([[1] * len(q) + [0] * (W - len(q)) for q in seqs], device=device)
        logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)  # (b, W-1, V)
        target = torch.tensor(
            [[0] * (len(pairs[i][0]) - 1) + pairs[i][1] + [0] * (W - len(q)) for i, q in zip(chunk, seqs, strict=True)],
            device=device,
        )
        scored = torch.tensor(
            [
                [0] * (len(pairs[i][0]) - 1) + [1] * len(pairs[i][1]) + [0] * (W - len(q))
                for i, q in zip(chunk, seqs, strict=True)
            ],
            device=device,
        )
        for i, v in zip(chunk, (logp.gather(-1, target[..., None])[..., 0] * scored).sum(-1).tolist(), strict=True):
            lls[i] = v
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
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank on every linear layer")
    ap.add_argument("--n", type=int, default=32, help="prompts / multiple-choice examples")
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument(
        "--batch", type=int, default=32, help="prompts per generate call; (context, choice) pairs per batch"
    )
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-loops", action="store_true", help="skip the one-at-a-time loops (slow at long lengths)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pipelines.data.tokens import prompt_ids
    from pipelines.scoring.inference import merged_copy
    from pipelines.scoring.scorers import choice_pairs, generate_texts, pair_loglikelihoods

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    base, tok = build(args.hidden, args.layers, args.heads, args.kv_heads, device, getattr(torch, args.dtype))
    params = sum(p.numel() for p in base.parameters())
    model = with_adapter(base, args.lora_r)
    merged = copy.deepcopy(model).merge_and_unload().eval()  # the anchor's model: plain peft, on its own copy
    merge_s, _ = timed(lambda: merged_copy(model), device)  # what our scorers pay once per model
    rng = random.Random(0)
    prompts = [prompt_ids(tok, text(rng, 20, 60)) for _ in range(args.n)]
    rows = [
        {"prompt": text(rng, 40, 120), "choices": [text(rng, 8, 40) for _ in range(args.choices)], "label": 0}
        for _ in range(args.n)
    ]
    examples = [choice_pairs(tok, r, None) for r in rows]
    pad = tok.pad_token_id

    runs: dict[str, Callable[[], Any]] = {
        "gen_ours": lambda: generate_texts(model, tok, prompts, batch_size=args.batch, max_new_tokens=args.max_new),
        "gen_hf_merged": lambda: hf_generate(merged, tok, prompts, args.batch, args.max_new, device),
        "gen_hf_peft": lambda: hf_generate(model, tok, prompts, args.batch, args.max_new, device),
        "mc_ours": lambda: pair_loglikelihoods(model, examples, batch_size=args.batch, pad=pad),
        "mc_plain": lambda: mc_plain(merged, examples, args.batch, pad, device),
    }
    if not args.no_loops:
        runs["gen_loop"] = lambda: generate_texts(model, tok, prompts, batch_size=1, max_new_tokens=args.max_new)
        runs["mc_loop"] = lambda: mc_loop(merged, examples, device)
    for fn in runs.values():  # warm-up (kernels, allocator; our scorers' merged copy)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    outputs: dict[str, Any] = {}
    for _ in range(args.reps):
        for name, fn in runs.items():
            t, outputs[name] = timed(fn, device)
            times[name].append(t)
    best = {k: min(v) for k, v in times.items()}
    unmerged = mc_plain(model, examples, args.batch, pad, device)  # not timed: the reference for the merge
    flat = {
        k: torch.tensor([v for ex in outs for v in ex])
        for k, outs in {**{k: outputs[k] for k in outputs if k.startswith("mc_")}, "unmerged": unmerged}.items()
    }
    new_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in outputs["gen_hf_merged"])
    ratios = {
        "generate_vs_hf_merged": best["gen_hf_merged"] / best["gen_ours"],
        "generate_vs_hf_peft": best["gen_hf_peft"] / best["gen_ours"],
        "loglik_vs_plain_forward": best["mc_plain"] / best["mc_ours"],
    }
    if not args.no_loops:
        ratios |= {
            "generation_loop_over_batched": best["gen_loop"] / best["gen_ours"],
            "mc_loop_over_batched": best["mc_loop"] / best["mc_ours"],
        }
    result = {
        "device": (
            torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
        ),
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "params_M": round(params / 1e6, 2),
            "lora_r": args.lora_r,
            "dtype": args.dtype,
        },
        "workload": {
            "n": args.n,
            "choices": args.choices,
            "batch": args.batch,
            "max_new_tokens": args.max_new,
            "reps": args.reps,
            "new_tokens": new_tokens,
        },
        "seconds": {k: round(v, 4) for k, v in best.items()},
        "merge_s": round(merge_s, 4),
        "tokens_per_s": {k: round(new_tokens / best[k], 1) for k in best if k.startswith("gen_")},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {
            "generate_vs_hf_merged": ratios["generate_vs_hf_merged"] >= 1.0,
            "loglik_vs_plain_forward": ratios["loglik_vs_plain_forward"] >= 1.0,
        },
        "generations_equal_hf_merged": outputs["gen_ours"] == outputs["gen_hf_merged"],
        "generations_equal_unmerged": outputs["gen_ours"] == outputs["gen_hf_peft"],
        "mc_max_abs_diff_vs_plain": float((flat["mc_ours"] - flat["mc_plain"]).abs().max()),
        "mc_max_abs_diff_vs_unmerged": float((flat["mc_ours"] - flat["unmerged"]).abs().max()),
    }
    if not args.no_loops:
        result["generations_equal_loop"] = outputs["gen_ours"] == outputs["gen_loop"]
        result["mc_max_abs_diff_vs_loop"] = float((flat["mc_ours"] - flat["mc_loop"]).abs().max())
    if not args.json:
        print(
            f"{result['device']}, {result['model']['params_M']} M parameters + LoRA r={args.lora_r}, {args.dtype}; "
            f"merging a copy: {merge_s * 1e3:.1f} ms"
        )
        for k, v in best.items():
            print(f"  {k:<14} {v * 1e3:9.1f} ms")
        print(
            f"  generation: HF generate merged / ours = {ratios['generate_vs_hf_merged']:.2f}x, unmerged / ours = "
            f"{ratios['generate_vs_hf_peft']:.2f}x (equal: {result['generations_equal_hf_merged']}, "
            f"{result['generations_equal_unmerged']})"
        )
        print(
            f"  log-likelihood: plain forward merged / ours = {ratios['loglik_vs_plain_forward']:.2f}x (max |d ll| "
            f"{result['mc_max_abs_diff_vs_plain']:.1e}, vs unmerged {result['mc_max_abs_diff_vs_unmerged']:.1e})"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
