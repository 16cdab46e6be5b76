"""Which trial each of lambda auto's choice rules takes on a finished lineage.

    python benchmarks/auto_choice.py CONFIG RUN [--set KEY=VALUE ...] [--json]

RUN is a finished lineage's --out directory (a sweep point's ``points/<label>``), CONFIG and ``--set`` the
config and overrides it ran with (the validation and evaluation splits must be the lineage's: ``val_size``,
``eval_size``, ``split_seed``). Every trial's adapter is scored again on its stage's own validation rows, row by
row (the aggregate must equal the recorded one, else the tool stops: the splits differ), and both rules of
``lalora.auto.choice`` choose among the recorded trials: ``most_learning`` (the largest validation learning)
and ``one_se`` (the most penalty within one paired standard error of it). Where the rules part, the tool names
the first stage they part at: from there a lineage run with the other rule trains on trials of its own, and only
that run (``--set lalora.auto.choice=...``) says what the other rule learns and forgets on the evaluation rows.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RULES = ("most_learning", "one_se")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path)
    p.add_argument("run", type=Path, help="the lineage's --out directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, help="also write the JSON object here")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipelines.config import load_config
    from pipelines.data.sources import load_domain
    from pipelines.lineage.auto import Trial, choose, paired_gap
    from pipelines.runtime.models import load_for_inference
    from pipelines.scoring.scores import score_domain
    from pipelines.workspace import Workspace

    cfg = load_config(args.config, args.overrides)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    ws, data = Workspace(args.run.resolve()), args.run.resolve() / "data"
    base = str(cfg.model.path if cfg.model.path else ws.base)
    metrics = json.loads((args.run / "metrics.json").read_text())
    budget = cfg.budget

    def score(adapter: str, domain: Any, rows: list[dict[str, Any]]) -> Any:
        model, tok = load_for_inference(base, adapter, cfg.model.dtype)
        return score_domain(model, tok, domain, rows, cfg.evaluation, max_length=cfg.training.max_length)

    stages: list[dict[str, Any]] = []
    for t, domain in enumerate(cfg.domains, start=1):
        trials_file = ws.stage(t, domain.name) / "auto" / "trials.json"
        if not trials_file.is_file():
            continue
        val = load_domain(domain, data, eval_only=True).val
        trials = []
        for saved in json.loads(trials_file.read_text())["trials"]:
            scored = score(saved["adapter"], domain, val)
            recorded = saved["scores"][domain.name]
            if not math.isclose(scored.score, recorded, rel_tol=1e-5, abs_tol=1e-9):
                raise SystemExit(
                    f"stage {t} trial {saved['index']}: scored {scored.score:.6f} on the validation rows, the lineage "
                    f"recorded {recorded:.6f}: the splits differ from the run's; pass the --set it ran with"
                )
            sign = 1.0 if scored.higher_is_better else -1.0
            trials.append(Trial.from_json({**saved, "learning_rows": [sign * v for v in scored.per_row]}))
        chosen = {rule: choose(trials, budget, rule)[0] for rule in RULES}
        best = chosen["most_learning"]
        rows = []
        for trial in trials:
            gap = paired_gap(best, trial)
            rows.append(
                {
                    "trial": trial.index,
                    "lambda": trial.lam,
                    "feasible": trial.feasible(budget),
                    "validation_learning": trial.learning,
                    "validation_forgetting": trial.max_forgetting,
                    "gap_to_most": gap[0] if gap else None,
                    "gap_se": gap[1] if gap else None,
                }
            )
            print(
                f"stage {t} trial {trial.index}: lambda {trial.lam:<8.4g} learning {trial.learning:+.4f} "
                f"forgetting {trial.max_forgetting:+.3f}{'' if trial.feasible(budget) else ' (over)'}"
                + (f"  gap to the most {gap[0]:+.4f} +- {gap[1]:.4f}" if gap else ""),
                flush=True,
            )
        searched = metrics.get("auto", {}).get(str(t), {})  # a stage a later run skipped records its lambda only
        by_lambda = next((x.index for x in trials if x.lam == searched.get("lambda")), None)
        recorded = searched.get("chosen_trial") or by_lambda
        stages.append(
            {
                "stage": t,
                "domain": domain.name,
                "rows": len(val),
                "trials": rows,
                "chosen": {rule: c.index for rule, c in chosen.items()},
                "recorded_choice": recorded,
            }
        )
        print(f"stage {t}: most_learning takes trial {best.index}, one_se trial {chosen['one_se'].index}", flush=True)

    out: dict[str, Any] = {"run": str(args.run), "budget": budget, "stages": stages}
    parted = [s for s in stages if s["chosen"]["most_learning"] != s["chosen"]["one_se"]]
    if parted:
        out["verdict"] = (
            f"the rules part at stage {parted[0]['stage']}: a lineage with the other rule differs from there; run it"
        )
    else:
        out["verdict"] = "both rules take the recorded trials"
    print(out["verdict"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
