"""What can be known to be wrong before anything trains: the model path, the LoRA targets, local files.

No weights are read: the base model's modules are built on the meta device from its config.
Each problem is one line naming the config field and the fix; ``lalora validate`` prints them
all, ``lalora run`` refuses on the first run of a lineage that has any.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.config import DomainConfig, HubSource, LineageConfig, LocalSource
from pipelines.errors import BadInput, expand_user


class PreflightError(BadInput):
    """Problems found before training; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _domains(cfg: LineageConfig) -> list[tuple[str, DomainConfig]]:
    """Every configured data set with its field path."""
    return (
        [("source", cfg.source)]
        + [(f"domains.{i}", d) for i, d in enumerate(cfg.domains)]
        + [(f"probes.{i}", d) for i, d in enumerate(cfg.probes)]
        + [(f"model.pretrain.extra_data.{i}", d) for i, d in enumerate(cfg.model.pretrain.extra_data)]
        + [(f"training.replay.data.{i}", d) for i, d in enumerate(cfg.training.replay.data)]
    )


def data_problems(cfg: LineageConfig) -> list[str]:
    """Local data files (and local dataset directories given as hub ids) that do not exist."""
    from pipelines.runtime.models import is_local_path

    problems = []
    for where, d in _domains(cfg):
        sources = [("data", d.data)] + ([("eval_data.data", d.eval_data.data)] if d.eval_data else [])
        for field, src in sources:
            if isinstance(src, LocalSource) and not Path(src.path).is_file():
                problems.append(
                    f"{where}.{field}.path: {src.path} not found (a local path is relative to the config file)"
                )
            elif isinstance(src, HubSource) and is_local_path(src.id):
                try:
                    missing = not expand_user(src.id, f"{where}.{field}.id").exists()
                except BadInput as e:
                    problems.append(str(e))
                    continue
                if missing:
                    problems.append(
                        f"{where}.{field}.id: {src.id} is written as a local path but does not exist "
                        "(give an existing dataset directory or a hub id such as openai/gsm8k)"
                    )
    for where, d in _domains(cfg):
        if d.score.kind == "lm_eval":
            import importlib.util

            if importlib.util.find_spec("lm_eval") is None:
                problems.append(
                    f"{where}.scoring: kind lm_eval needs lm-eval; install the extra: pip install -e '.[lm-eval]'"
                )
            if d.score.include_path and not Path(d.score.include_path).is_dir():
                problems.append(
                    f"{where}.scoring.include_path: {d.score.include_path} is not a directory of task "
                    "YAMLs (relative to the config file)"
                )
    if cfg.deepspeed.hostfile and not Path(cfg.deepspeed.hostfile).is_file():
        problems.append(f"deepspeed.hostfile: {cfg.deepspeed.hostfile} not found")
    return problems


def model_problems(cfg: LineageConfig) -> list[str]:
    """A local model path without a model, or LoRA targets that match no module of the base."""
    from pipelines.runtime.models import ModelError, meta_model, model_path_problem, unmatched_targets, weights_problem

    if cfg.model.path:
        problem = model_path_problem(cfg.model.path)
        if not problem and cfg.model.sha256:
            problem = weights_problem(cfg.model.path, cfg.model.sha256)
        if problem:
            return [problem]
    elif cfg.model.sha256:
        return [
            "model.sha256 checks a local model.path, and model.path is empty (the tiny base is pretrained here): "
            "drop model.sha256 or set model.path"
        ]
    try:
        model = meta_model(cfg.model)
    except ModelError as e:
        return [str(e)]
    if model is None:  # a hub model not in the local cache: checked when it is loaded
        return []
    problem = unmatched_targets(model, list(cfg.lora.target_modules))
    return [problem] if problem else []


def memory_line(cfg: LineageConfig) -> str | None:
    """What one rank holds of the parameters, from the base's shapes (no weights read): the base's bytes
    (at ZeRO-3 a partition of each matrix larger than the LoRA matrices, which stay whole) and the adapter's;
    None for a hub model not in the local cache."""
    import math

    import torch

    from pipelines.runtime.models import _DTYPES, meta_model

    model = meta_model(cfg.model)
    if model is None:
        return None
    size = torch.empty((), dtype=_DTYPES[cfg.model.dtype]).element_size()
    targets = set(cfg.lora.target_modules)
    lora = [
        cfg.lora.r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    whole_below = max(
        (
            cfg.lora.r * max(m.in_features, m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
        ),
        default=0,
    )
    whole_below = max(whole_below, cfg.deepspeed.persistence_threshold)
    ranks, zero3 = cfg.deepspeed.world_size, cfg.deepspeed.zero_stage == 3
    whole = per_rank = 0
    for p in model.parameters():
        n = p.numel()
        whole += n
        per_rank += math.ceil(n / ranks) if zero3 and n > whole_below else n
    mib = 1024**2
    plural = "s" if ranks > 1 else ""
    split = f" (ZeRO-3 over {ranks} rank{plural}: {whole * size / mib:.2f} MiB whole)" if zero3 else ""
    return (
        f"parameters per rank: base {per_rank * size / mib:.2f} MiB{split}, LoRA {sum(lora) * size / mib:.3f} MiB "
        f"whole on every rank (ZeRO-{cfg.deepspeed.zero_stage}, {cfg.model.dtype})"
    )


def budget_line(cfg: LineageConfig) -> str | None:
    """With lambda auto: the forgetting budget in validation rows of each budgeted column scored by accuracy
    (a row is 1 / val_size of its score), and, where that is under 2 rows, that one row flipping by chance
    (sampling, not lambda) is over half the budget. None without a searching stage or such a column."""
    if not cfg.searches:
        return None
    budget, named = cfg.budget, cfg.lalora.auto.columns
    rows = {
        d.name: (budget * d.val_size, d.val_size)
        for d in cfg.eval_domains
        if (named is None or d.name in named) and d.score.kind in ("generate", "multiple_choice") and d.val_size
    }
    if not rows:
        return None
    each = ", ".join(f"{n} {r:.3g} of {v}" for n, (r, v) in rows.items())
    line = f"lambda auto: the forgetting budget {budget:g} in validation rows: {each}"
    coarse = {n: r for n, (r, _) in rows.items() if r < 2}
    if coarse:
        share = ", ".join(f"{n} {100 / r:.0f}%" for n, r in coarse.items())
        line += (
            f"; one row is over half the budget ({share}): a row flipping by chance, not lambda, decides a "
            "trial there; raise val_size or the budget"
        )
    return line


def preflight(cfg: LineageConfig) -> list[str]:
    """Every problem that can be known without training, one line each (empty: none)."""
    return model_problems(cfg) + data_problems(cfg)


def check(cfg: LineageConfig) -> None:
    """Raise PreflightError listing every problem ``preflight`` finds."""
    problems = preflight(cfg)
    if problems:
        raise PreflightError(problems)
