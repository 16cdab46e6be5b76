"""Stage step 2: fine-tune the adapter on the new domain under DeepSpeed, with the Laplace penalty."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lalora import LaplacePenalty, Precision, Prior, load_precision, lora_parameters
from pipelines.config import DeepSpeedConfig, DomainConfig, LaLoRAConfig, LineageConfig, LoraSettings, TrainingConfig
from pipelines.data.replay import ReplayPool, mixed_batches, replay_pool, replay_rows, replay_sources
from pipelines.data.sources import DataError, load_domain
from pipelines.data.tokens import encode, special_ids
from pipelines.runtime.engine import train, world
from pipelines.runtime.loss import check_chunkable
from pipelines.runtime.models import adapter_state, load_adapter, load_base, new_adapter
from pipelines.tracker import Tracker
from pipelines.workspace import StepPaths, write_dir_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FinetuneInputs:
    """What the fine-tune step reads; ``from_config`` is the one mapping from a lineage's config to it."""

    base: str
    anchor: str
    """the adapter the stage starts from (the penalty's anchor)"""
    precision: str | None
    """the precision accumulated before the stage (None: no penalty)"""
    lalora: LaLoRAConfig
    """with the stage's own lambda (a number: lambda auto has chosen it)"""
    domain: DomainConfig
    training: TrainingConfig
    """with the stage's own steps and lr"""
    ds: DeepSpeedConfig
    dtype: str
    stage: int
    data_dir: str
    out_dir: str
    checkpoint_dir: str | None = None
    replay_from: tuple[DomainConfig, ...] = ()
    """the domains whose training rows are replayed (training.replay on)"""

    @classmethod
    def from_config(cls, cfg: LineageConfig, stage: int, paths: StepPaths) -> FinetuneInputs:
        return cls(
            base=paths.base,
            anchor=paths.anchor,
            precision=paths.precision,
            lalora=cfg.stage_lalora(stage),
            domain=cfg.domains[stage - 1],
            training=cfg.stage_training(stage),
            ds=cfg.deepspeed,
            dtype=cfg.model.dtype,
            stage=stage,
            data_dir=paths.data,
            out_dir=paths.out,
            checkpoint_dir=paths.checkpoint,
            replay_from=tuple(replay_sources(cfg.training.replay, cfg.source, cfg.domains[: stage - 1])),
        )


@dataclass(frozen=True, kw_only=True)
class FinetuneResult:
    adapter: str
    steps: int
    final_loss: float
    final_penalty: float
    seconds: float
    tokens_per_second: float
    quadratic: float | None = None
    """1/2 delta^T P delta at the end (no prior, no lambda): the Laplace model's rise of the earlier domains'
    per-sequence loss for the move delta from the anchor; None without a precision."""


@dataclass(frozen=True, kw_only=True)
class InitInputs:
    """What the LoRA initialisation reads; ``from_config`` is the one mapping from a lineage's config to it."""

    base: str
    lora: LoraSettings
    dtype: str
    out_dir: str

    @classmethod
    def from_config(cls, cfg: LineageConfig, *, base: str, out_dir: str) -> InitInputs:
        return cls(base=base, lora=cfg.lora, dtype=cfg.model.dtype, out_dir=out_dir)


@dataclass(frozen=True, kw_only=True)
class InitResult:
    adapter: str
    """The initial adapter's directory: the first stage's anchor, row 0 of R."""


def initialise(inputs: InitInputs, tracker: Tracker | None = None) -> InitResult:
    """The LoRA initialisation as a stage: ``init_adapter`` on the typed inputs."""
    return InitResult(adapter=init_adapter(inputs.base, inputs.lora, dtype=inputs.dtype, out_dir=inputs.out_dir))


def init_adapter(base_path: str, lora: LoraSettings, *, dtype: str, out_dir: str) -> str:
    """Save the LoRA initialisation (the first stage's anchor) and return its directory."""
    base, _ = load_base(base_path, dtype)
    model = new_adapter(base, lora)
    target = Path(out_dir)
    write_dir_atomic(target, lambda d: model.save_pretrained(d))
    return str(target)


def finetune(inputs: FinetuneInputs, tracker: Tracker) -> FinetuneResult:
    """Train from the anchor adapter on ``domain``; the penalty pulls towards the anchor, and with ``training.replay``
    on, rows of ``replay_from`` (training splits only) and of the replayed data sets fill part of every batch.

    With ``checkpoint_dir`` the stage saves DeepSpeed checkpoints every ``training.checkpoint_every`` steps and, if
    one is there already (an interrupted run of this same stage), continues from it. Under the launcher rank 0 writes.
    """
    lalora, domain, training, stage = inputs.lalora, inputs.domain, inputs.training, inputs.stage
    model, tokenizer = _trainable(inputs)
    params = lora_parameters(model)
    anchor = {p.name: p.param.detach().clone() for p in params}
    lam = lalora.lam
    if isinstance(lam, str):  # 'auto' is searched first: a stage trains with the chosen lambda (stage_lalora)
        raise ValueError(f"stage {stage} trains with a chosen lambda, got {lam!r}")
    precision = None
    if inputs.precision is not None and lam > 0:
        precision, _ = load_precision(inputs.precision, {p.name: tuple(p.param.shape) for p in params})
    prior = Prior(lalora.prior.tau_A, lalora.prior.tau_B)

    def make_penalty(module: torch.nn.Module) -> LaplacePenalty:
        assert precision is not None
        return LaplacePenalty(precision, anchor, lora_parameters(module), lam, prior)

    batches = _batches(tokenizer, domain, training, list(inputs.replay_from), Path(inputs.data_dir), stage, tracker)
    tracker.log_params({"train.steps": training.steps, "train.lr": training.lr, "lambda": lalora.lam})
    result = train(
        model,
        [p.param for p in params],
        batches,
        steps=training.steps,
        lr=training.lr,
        batch_size=training.batch_size,
        ds=inputs.ds,
        make_penalty=make_penalty if precision is not None else None,
        tracker=tracker,
        log_every=training.log_every,
        desc=f"stage {stage}: {domain.name}",
        checkpoint_dir=Path(inputs.checkpoint_dir) if inputs.checkpoint_dir else None,
        checkpoint_every=training.checkpoint_every,
        seed=training.seed + stage,
        optimizer_impl=training.optimizer_impl,
        loss_chunk=training.loss_chunk,
    )
    target = Path(inputs.out_dir) / "adapter"
    state = adapter_state(model)
    if world()[0] == 0:
        write_dir_atomic(target, lambda d: model.save_pretrained(d, state_dict=state))
    quadratic = _quadratic(precision, anchor, model) if precision is not None else None
    tps = result.tokens / result.seconds if result.seconds > 0 else 0.0
    tracker.log_metrics({"train/seconds": result.seconds, "train/tokens_per_second": tps})
    return FinetuneResult(
        adapter=str(target),
        steps=result.steps,
        final_loss=result.final_loss,
        final_penalty=result.final_penalty,
        seconds=result.seconds,
        tokens_per_second=tps,
        quadratic=quadratic,
    )


def _trainable(inputs: FinetuneInputs) -> tuple[Any, Any]:
    """The base with the anchor adapter, trainable, as the training options ask; and its tokenizer."""
    base, tokenizer = load_base(inputs.base, inputs.dtype)
    model = load_adapter(base, inputs.anchor, trainable=True)
    if inputs.training.loss_chunk:
        check_chunkable(model)
    if inputs.training.activation_checkpointing:  # non-reentrant: the frozen inputs need no gradient
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def _quadratic(precision: Precision, anchor: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    """1/2 delta^T P delta for the move delta of the trained LoRA weights from the anchor."""
    with torch.no_grad():
        delta = {p.name: p.param.detach() - anchor[p.name] for p in lora_parameters(model)}
        return 0.5 * float(precision.quad_form({n: delta[n] for n in precision.names}))


def _batches(
    tokenizer: Any,
    domain: DomainConfig,
    training: TrainingConfig,
    replay_from: list[DomainConfig],
    data_dir: Path,
    stage: int,
    tracker: Tracker,
) -> Iterator[dict[str, torch.Tensor]]:
    """The stage's endless training batches: the domain's training split, with the replay pool's rows mixed in."""
    _, _, pad = special_ids(tokenizer)

    def encoded(rows: list[dict[str, Any]], what: str) -> list[Any]:
        try:
            return encode(tokenizer, rows, training.max_length, training.overlong)
        except DataError as e:
            raise DataError(f"domain {domain.name}: {what} {e}") from None

    examples = encoded(load_domain(domain, data_dir).train, "training")
    replay = training.replay
    pool = replay_pool(replay, replay_from, data_dir) if replay.enabled else ReplayPool()
    tracker.log_params(
        {
            "train.examples": len(examples),
            "train.replay.fraction": replay.fraction,
            "train.replay.rows_per_batch": replay_rows(training.batch_size, replay.fraction) if pool.rows else 0,
            **{f"train.replay.pool.{name}": n for name, n in pool.counts.items()},
        }
    )
    return mixed_batches(
        examples,
        encoded(pool.rows, "replayed") if pool.rows else [],
        training.batch_size,
        replay.fraction,
        pad,
        training.seed + stage,
        replay.seed + stage,
        training.group_by_length,
    )
