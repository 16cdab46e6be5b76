"""Stage 0: the base model. Loaded as given, or a tiny Llama pretrained on the source domain."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import DeepSpeedConfig, DomainConfig, LineageConfig, ModelConfig
from pipelines.data.sources import load_domain, load_rows
from pipelines.data.tokens import encode, special_ids, train_batches
from pipelines.errors import BadInput
from pipelines.runtime.engine import TrainResult, train
from pipelines.runtime.models import build_tiny_llama, char_tokenizer, weights_problem
from pipelines.tracker import Tracker
from pipelines.workspace import Workspace, sha256_json, write_dir_atomic, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BaseInputs:
    """What preparing the base reads; ``from_config`` is the one mapping from a lineage's config to it."""

    model: ModelConfig
    source: DomainConfig
    ds: DeepSpeedConfig
    max_length: int
    seed: int
    out_dir: str

    @classmethod
    def from_config(cls, cfg: LineageConfig, out_dir: str) -> BaseInputs:
        return cls(
            model=cfg.model,
            source=cfg.source,
            ds=cfg.deepspeed,
            max_length=cfg.training.max_length,
            seed=cfg.seed,
            out_dir=out_dir,
        )


@dataclass(frozen=True, kw_only=True)
class BaseResult:
    path: str
    """from_pretrained-loadable directory or hub id."""
    pretrained_here: bool
    seconds: float = 0.0
    final_loss: float | None = None


def pretraining_rows(source: DomainConfig, extra: Sequence[DomainConfig], data_dir: Path) -> tuple[list[dict], str]:
    """The source's training rows, then every row of each ``extra`` data set, and their fingerprint.

    Without ``extra`` the fingerprint is the source's own, as before the setting existed, so
    bases pretrained then stay up to date.
    """
    splits = load_domain(source, data_dir)
    if not extra:
        return list(splits.train), splits.fingerprint
    rows, fingerprints = list(splits.train), [splits.fingerprint]
    for data in extra:
        more, fingerprint = load_rows(data, data_dir)
        rows += more
        fingerprints.append(fingerprint)
    log.info(
        "pretraining on %d source rows and %d more from %s",
        len(splits.train),
        len(rows) - len(splits.train),
        ", ".join(d.name for d in extra),
    )
    return rows, sha256_json(fingerprints, sort_keys=False)  # as recorded (a list: the order is its own)


def prepare_base(inputs: BaseInputs, tracker: Tracker) -> BaseResult:
    """Return the base model's path, pretraining the tiny Llama first when ``model.path`` is empty.

    The pretraining data is the source's training split and ``model.pretrain.extra_data``. The
    pretrained base is reused when its recipe (model shape, pretraining settings, data) is
    unchanged, so a rerun does not pay for it twice.
    """
    model, source = inputs.model, inputs.source
    if model.path:
        problem = weights_problem(model.path, model.sha256) if model.sha256 else None
        if problem:
            raise BadInput(problem)
        return BaseResult(path=model.path, pretrained_here=False)
    ws = Workspace(Path(inputs.out_dir))
    rows, fingerprint = pretraining_rows(source, model.pretrain.extra_data, ws.data)
    digest = _recipe(inputs, fingerprint)
    marker = ws.base / "lalora_base.json"
    if marker.is_file() and json.loads(marker.read_text()).get("recipe_sha256") == digest:
        log.info("base model %s is up to date; not pretraining again", ws.base)
        return BaseResult(path=str(ws.base), pretrained_here=False)

    tokenizer = char_tokenizer()
    net = build_tiny_llama(model.tiny, tokenizer, inputs.seed)
    n_params = sum(p.numel() for p in net.parameters())
    tracker.log_params({"base.params": n_params, "base.pretrain_steps": model.pretrain.steps})
    result = _pretrain(net, tokenizer, rows, inputs, tracker) if model.pretrain.steps > 0 else None

    def write(d: Path) -> None:
        net.save_pretrained(d)
        tokenizer.save_pretrained(d)
        write_json_atomic(d / "lalora_base.json", {"recipe_sha256": digest, "params": n_params})

    write_dir_atomic(ws.base, write)
    log.info("pretrained a %d-parameter base model on %s -> %s", n_params, source.name, ws.base)
    return BaseResult(
        path=str(ws.base),
        pretrained_here=True,
        seconds=result.seconds if result else 0.0,
        final_loss=result.final_loss if result else None,
    )


def _recipe(inputs: BaseInputs, fingerprint: str) -> str:
    """sha256 of what makes the tiny base: its shape, the pretraining settings and data, the seed, the engine."""
    model = inputs.model
    pretrain = model.pretrain.model_dump(exclude=set() if model.pretrain.extra_data else {"extra_data"})
    recipe = {
        "tiny": model.tiny.model_dump(),
        "pretrain": pretrain,
        "seed": inputs.seed,
        "data": fingerprint,
        "max_length": inputs.max_length,
        "ds": inputs.ds.model_dump(),
    }
    return sha256_json(recipe)


def _pretrain(net: Any, tokenizer: Any, rows: list[dict], inputs: BaseInputs, tracker: Tracker) -> TrainResult:
    """``model.pretrain.steps`` steps of next-token training of every parameter of ``net`` on ``rows``."""
    pretrain, seed = inputs.model.pretrain, inputs.seed
    _, _, pad = special_ids(tokenizer)
    batches = train_batches(encode(tokenizer, rows, inputs.max_length), pretrain.batch_size, pad, seed)
    return train(
        net,
        list(net.parameters()),
        batches,
        steps=pretrain.steps,
        lr=pretrain.lr,
        batch_size=pretrain.batch_size,
        ds=inputs.ds,
        make_penalty=None,
        tracker=tracker,
        log_every=25,
        desc=f"pretrain base on {inputs.source.name}",
        seed=seed,
    )
