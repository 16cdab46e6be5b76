"""How far the Laplace quadratic model is from what lambda auto's trials measured, on a finished lineage.

    make demo-auto && python benchmarks/auto_predictor.py configs/demo-auto.yaml runs/demo-auto [--json]

Every trial of a stage that searched lambda records 1/2 delta^T P delta (``predicted``): the Laplace model's
rise, for the move delta from the stage's anchor, of the earlier domains' per-sequence loss summed over the
domains P accumulates (source and the earlier stages' domains; probes are not in P). This measures that rise
on the validation rows: per domain, the mean per-sequence target NLL with the trial's adapter less the
anchor's, summed, and sets it beside the prediction and the trial's validation forgetting (accuracy, the
quantity the budget reads). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def per_sequence_nll(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_length: int) -> float:
    """Mean over ``rows`` of the summed target-token NLL (the loss the Laplace model is of)."""
    from pipelines.data.tokens import encode, fixed_batches, special_ids

    total = 0.0
    with torch.no_grad():
        for b in fixed_batches(encode(tokenizer, rows, max_length), 64, special_ids(tokenizer)[2]):
            logits, labels = (
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1],
                b["labels"][:, 1:],
            )
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
                )
            )
    return total / len(rows)


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra = {v: i for i, v in enumerate(sorted(a))}
    rb = {v: i for i, v in enumerate(sorted(b))}
    x, y = torch.tensor([ra[v] for v in a], dtype=torch.float64), torch.tensor([rb[v] for v in b], dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x @ y) / denominator) if denominator else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path)
    p.add_argument("run", type=Path, help="the lineage's --out directory")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the overrides the lineage ran with (a sweep point's --set), as lalora run takes them",
    )
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipelines.config import load_config
    from pipelines.data.sources import load_domain
    from pipelines.runtime.models import load_for_inference
    from pipelines.workspace import Workspace

    cfg = load_config(args.config, args.overrides)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    ws, data = Workspace(args.run.resolve()), args.run.resolve() / "data"
    base = str(cfg.model.path if cfg.model.path else ws.base)  # load_config resolved a directory beside the config
    adapters = [str(ws.init_adapter)]
    out: list[dict[str, Any]] = []
    for t, domain in enumerate(cfg.domains, start=1):
        stage = ws.stage(t, domain.name)
        trials_file = stage / "auto" / "trials.json"
        trials = json.loads(trials_file.read_text())["trials"] if trials_file.is_file() else []
        earlier = [d for d in cfg.all_domains[:t]]
        rows = {d.name: load_domain(d, data, eval_only=True).val for d in earlier}

        def nll(adapter: str, rows: dict[str, list[dict[str, Any]]] = rows) -> dict[str, float]:
            model, tok = load_for_inference(base, adapter, cfg.model.dtype)
            return {n: per_sequence_nll(model, tok, r, cfg.training.max_length) for n, r in rows.items()}

        anchor = nll(adapters[-1])
        for trial in trials:
            measured = nll(trial["adapter"])
            rise = sum(measured[n] - anchor[n] for n in rows)
            out.append(
                {
                    "stage": t,
                    "trial": trial["index"],
                    "lambda": trial["lam"],
                    "predicted": trial["predicted"],
                    "measured": rise,
                    "ratio": trial["predicted"] / rise if rise > 0 else None,
                    "validation_forgetting": max(trial["forgetting"].values(), default=0.0),
                }
            )
            print(
                f"stage {t} trial {trial['index']}: lambda {trial['lam']:<8.4g} predicted {trial['predicted']:.4f}"
                f"  measured {rise:+.4f}  validation forgetting {out[-1]['validation_forgetting']:.3f}",
                flush=True,
            )
        chosen = json.loads((args.run / "metrics.json").read_text()).get("auto", {}).get(str(t))
        adapters.append(
            str(stage / "auto" / f"trial-{chosen['chosen_trial']:02d}" / "adapter")
            if chosen and trials
            else str(stage / "adapter")
        )
    by_stage = {}
    for t in sorted({r["stage"] for r in out}):
        rs = [r for r in out if r["stage"] == t]
        by_stage[t] = {
            "spearman_predicted_measured": _spearman([r["predicted"] for r in rs], [r["measured"] for r in rs]),
            "spearman_predicted_forgetting": _spearman(
                [r["predicted"] for r in rs], [r["validation_forgetting"] for r in rs]
            ),
        }
        print(
            f"stage {t}: rank correlation of predicted with measured loss rise "
            f"{by_stage[t]['spearman_predicted_measured']}, with validation forgetting "
            f"{by_stage[t]['spearman_predicted_forgetting']}"
        )
    print(json.dumps({"trials": out, "by_stage": by_stage}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
