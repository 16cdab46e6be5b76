"""training.loss_chunk against transformers' own loss: step time and peak memory, side by side.

    python benchmarks/loss_chunk.py                          # CPU: vocabulary 32k, 4 x 256 tokens, chunk 256
    python benchmarks/loss_chunk.py --targets 0.5            # the first half of each sequence a masked prompt
    python benchmarks/loss_chunk.py --vocab 128256 --batch 8 --seq 1024 --chunk 1024 --hidden 2048 --device cuda

Each side runs in its own process (peak RSS is a process's high-water mark; on a GPU the peak allocated
memory): a random Llama of the given shape with LoRA r 16 on every linear layer, ``--steps`` forward +
backward passes of one batch (every position a target, or with ``--targets`` s < 1 the first 1 - s of each
sequence a prompt whose labels are -100, as in supervised fine-tuning), timed after one warm-up step. ``full``
is ``model(..., labels=...).loss``; ``chunked`` is ``pipelines.runtime.loss.chunked_causal_loss`` with the target
positions found on the host, as the training loop finds them. The last line is one JSON object with both sides
and the ratios (chunked over full).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def side(args: argparse.Namespace) -> dict[str, float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.runtime.loss import chunked_causal_loss, target_positions

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg).to(args.device), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    ).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels = ids.clone()
    labels[:, : round(args.seq * (1 - args.targets))] = -100
    targets = target_positions(labels).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch = {k: v.to(args.device) for k, v in batch.items()}
    cuda = args.device.startswith("cuda")

    def step() -> float:
        loss = (
            chunked_causal_loss(model, batch, args.chunk, None, targets)
            if args.side == "chunked"
            else model(**batch).loss
        )
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    loss = step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"seconds_per_step": seconds, "peak_mib": peak, "loss": loss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--targets", type=float, default=1.0, help="share of each sequence that is a target (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--side", choices=["full", "chunked"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        print(json.dumps(side(args)))
        return 0
    out: dict[str, object] = {k: v for k, v in vars(args).items() if k != "side"}
    for name in ("full", "chunked"):
        proc = subprocess.run(
            [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--side", name],
            capture_output=True,
            text=True,
            check=True,
        )
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {out[name]}", flush=True)
    full, chunked = out["full"], out["chunked"]
    assert isinstance(full, dict) and isinstance(chunked, dict)
    out["time_ratio"] = chunked["seconds_per_step"] / full["seconds_per_step"]
    out["peak_ratio"] = chunked["peak_mib"] / full["peak_mib"]
    out["logits_mib"] = args.batch * args.seq * args.vocab * 4 / 2**20
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
