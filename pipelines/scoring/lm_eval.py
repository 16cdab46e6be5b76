"""A probe scored by lm-evaluation-harness itself, on the stage's model (the ``lm-eval`` extra).

lm-eval runs the task (a registered one, or one defined by a YAML in ``include_path``, offline with
``dataset_path: json`` and local ``data_files``) through its ``HFLM`` wrapper around the very model
the project scores (base + the stage's adapter), with BOS before each context as the project's
own scorers put it (``add_bos_token``; see ``_bos_first``). Its metrics come back as the domain's values;
``nll`` is the negative log-likelihood of the gold choices per token (all documents' tokens together, as the
project's multiple-choice scorer counts it), from lm-eval's own log-likelihoods.
"""

from __future__ import annotations

import logging
from typing import Any

from pipelines.config.formats import LmEvalScoring
from pipelines.errors import BadInput

_EXTRA = "install the lm-eval extra: pip install -e '.[lm-eval]' (lm-eval 0.4.13)"


def _harness() -> tuple[Any, Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise BadInput(
            f"a probe is scored by lm-eval (scoring kind lm_eval), which is not installed; {_EXTRA}"
        ) from None
    return lm_eval, HFLM, TaskManager


def score_lm_eval(model: Any, tokenizer: Any, cfg: LmEvalScoring, *, batch_size: int) -> tuple[dict[str, float], int]:
    """(values, documents scored): every metric of the task, and ``nll`` of the gold choices."""
    lm_eval, HFLM, TaskManager = _harness()
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    manager = TaskManager(include_path=cfg.include_path, verbosity="ERROR")
    if cfg.task not in manager.all_tasks:
        where = f" or in {cfg.include_path}" if cfg.include_path else " (give include_path for a custom task's YAML)"
        raise BadInput(f"lm-eval has no task {cfg.task!r} among its registered tasks{where}")
    lm = _bos_first(HFLM)(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        add_bos_token=cfg.add_bos_token,
        device=str(next(model.parameters()).device),
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[cfg.task],
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    samples = out["samples"][cfg.task]
    if any(len(s["arguments"]) < 2 for s in samples):
        raise BadInput(
            f"lm-eval task {cfg.task!r} is not multiple choice (output_type: multiple_choice); only "
            "multiple-choice tasks can be probes"
        )
    values = {
        k.split(",")[0]: float(v)
        for k, v in out["results"][cfg.task].items()
        if "," in k and "_stderr" not in k and isinstance(v, (int, float))
    }
    if cfg.metric not in values:
        raise BadInput(f"lm-eval task {cfg.task!r} reports {', '.join(sorted(values))}, not metric {cfg.metric!r}")
    loglik, tokens = map(sum, zip(*(_gold(s, tokenizer) for s in samples), strict=True))
    values["nll"] = -loglik / max(tokens, 1)
    return values, len(samples)


def _bos_first(HFLM: type) -> type:
    """lm-eval's HF model, BOS before every encoding when ``add_bos_token``: lm-eval 0.4.13 only passes
    ``add_special_tokens`` to the tokenizer, which adds BOS only when its post-processor does (SmolLM2's and
    the character tokenizer's do not), so its contexts would start without the BOS the project's scorers put."""

    class BosFirst(HFLM):
        def tok_encode(self, string: str, *args: Any, **kwargs: Any) -> list[int]:
            ids = super().tok_encode(string, *args, **kwargs)
            bos = self.tokenizer.bos_token_id
            if self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
            return ids

    return BosFirst


def _gold(sample: dict[str, Any], tokenizer: Any) -> tuple[float, int]:
    """The gold choice's log-likelihood in one lm-eval sample, and its continuation's token count."""
    gold = int(sample["target"])
    tokens = len(tokenizer(sample["arguments"][gold][1], add_special_tokens=False)["input_ids"])
    return float(sample["filtered_resps"][gold][0]), tokens
