"""Does the Laplace penalty see the forgetting? Predicted against actual source-loss increase.

    python benchmarks/laplace_fit.py                     # configs/demo.yaml: tiny base, first domain
    python benchmarks/laplace_fit.py --config configs/demo-scratch.yaml   # the base has not seen the domain
    python benchmarks/laplace_fit.py --steps 5,20,100,300 --json

The penalty is a second-order model of the loss on earlier data: after a move delta from the
anchor, the per-sequence NLL on the curvature data should rise by about 1/2 delta^T F delta.
This trains plain LoRA (lambda = 0) on the config's first domain, from the first stage's anchor
(the LoRA initialisation), and at each listed step compares the actual rise of the source's
mean per-sequence NLL with what each structure predicts: the full empirical Fisher
(1/2 mean_n (g_n . delta)^2 over the same sequences, no structural approximation), kfac and
diag. The first ratio says how local the move is (the quadratic model itself); the others
what the structure loses on top. Plain torch AdamW on the CPU, no tracking: a diagnostic.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", default="5,20,50,100,300", help="comma-separated training steps to measure at")
    p.add_argument("--sequences", type=int, default=128, help="source sequences for the Fisher and the loss")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from lalora import LaplacePenalty, build_estimator, lora_parameters
    from pipelines.config import load_config
    from pipelines.data.sources import load_domain
    from pipelines.data.tokens import encode, fixed_batches, special_ids, train_batches
    from pipelines.runtime.models import build_tiny_llama, char_tokenizer, load_base, new_adapter
    from pipelines.stages.pretrain import pretraining_rows

    cfg = load_config(args.config, args.overrides)
    if cfg.runtime.threads:  # the config's thread count, as a lineage of it runs (the demos pin one)
        torch.set_num_threads(cfg.runtime.threads)
    checkpoints = sorted({int(s) for s in args.steps.split(",")})
    data = Path(tempfile.mkdtemp(prefix="lalora-fit-"))
    source = load_domain(cfg.source.with_samples(args.sequences), data)
    target = load_domain(cfg.domains[0].with_samples(args.sequences), data)
    L = cfg.training.max_length

    def fit(model, params, rows, steps, lr, batch, seed, on_step=None):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        batches = train_batches(encode(tok, rows, L), batch, pad, seed)
        for step in range(1, steps + 1):
            b = next(batches)
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_step:
                on_step(step)

    if cfg.model.path:
        base, tok = load_base(cfg.model.path, cfg.model.dtype)
        _, _, pad = special_ids(tok)
    else:
        tok = char_tokenizer()
        _, _, pad = special_ids(tok)
        base = build_tiny_llama(cfg.model.tiny, tok, cfg.seed)
        torch.manual_seed(cfg.seed)
        pre = cfg.model.pretrain
        rows, _ = pretraining_rows(cfg.source, pre.extra_data, data)  # the source and model.pretrain.extra_data
        fit(base, list(base.parameters()), rows, pre.steps, pre.lr, pre.batch_size, cfg.seed)
    base.requires_grad_(False)
    model = new_adapter(base, cfg.lora)
    params = lora_parameters(model)
    anchor = {q.name: q.param.detach().clone() for q in params}
    seqs = encode(tok, source.curvature[: args.sequences], L)
    batches = fixed_batches(seqs, 32, pad)

    def per_sequence_nll(m) -> float:
        total = 0.0
        with torch.no_grad():
            for b in batches:
                out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                logits, labels = out.logits[:, :-1].float(), b["labels"][:, 1:]
                total += float(
                    torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
                    )
                )
        return total / len(seqs)

    # per-sequence gradients at the anchor (a loop: the exact empirical Fisher, no structure)
    grads = []
    for b in fixed_batches(seqs, 1, pad):
        model.zero_grad()
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        n_tok = int((b["labels"][:, 1:] != -100).sum())
        (out.loss * n_tok).backward()  # summed target-token NLL of the sequence
        grads.append(torch.cat([q.param.grad.flatten() for q in params]).clone())
    G = torch.stack(grads)
    model.zero_grad()
    quads = {}
    for kind in ("diag", "kfac"):
        est = build_estimator(kind, seed=cfg.seed, fisher_type="empirical").estimate(model, batches)
        quads[kind] = LaplacePenalty(est.precision, anchor, params, lam=1.0)  # 1/2 delta^T F delta
    before = per_sequence_nll(model)
    rows = []

    def measure(step: int) -> None:
        if step not in checkpoints:
            return
        delta = torch.cat([(q.param.detach() - anchor[q.name]).flatten() for q in params])
        row = {
            "step": step,
            "actual": per_sequence_nll(model) - before,
            "full_fisher": 0.5 * float(((G @ delta) ** 2).mean()),
        }
        with torch.no_grad():
            row |= {k: float(pen()) for k, pen in quads.items()}
        rows.append(row)

    torch.manual_seed(cfg.training.seed + 1)
    fit(
        model,
        [q.param for q in params],
        target.train,
        max(checkpoints),
        cfg.training.lr,
        cfg.training.batch_size,
        cfg.training.seed + 1,
        measure,
    )
    result = {
        "config": str(args.config),
        "domain": cfg.domains[0].name,
        "source": cfg.source.name,
        "source_nll_per_sequence_at_anchor": before,
        "sequences": len(seqs),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"plain LoRA on {result['domain']}, source {result['source']}: mean per-sequence NLL {before:.3f} at the "
        f"anchor, {len(seqs)} sequences"
    )
    print(f"{'step':>5} {'actual rise':>12} {'full Fisher':>12} {'kfac':>10} {'diag':>10} {'actual/full':>12}")
    for r in rows:
        ratio = r["actual"] / r["full_fisher"] if r["full_fisher"] > 0 else float("inf")
        print(
            f"{r['step']:>5} {r['actual']:>12.3f} {r['full_fisher']:>12.4f} {r['kfac']:>10.4f} {r['diag']:>10.4f} "
            f"{ratio:>12.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
