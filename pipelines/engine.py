"""The DeepSpeed training loop shared by pretraining and LaLoRA fine-tuning."""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pipelines.config import DeepSpeedConfig
from pipelines.errors import DivergenceError
from pipelines.tracking import Tracker

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_distributed() -> None:
    """Initialise torch.distributed for DeepSpeed: the launcher's env if present, else one local rank on gloo/nccl."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):  # DeepSpeed reads LOCAL_RANK later too
        os.environ.setdefault(key, value)
    rendezvous = {k: v for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())))
                  if k not in os.environ}
    os.environ.update(rendezvous)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    finally:
        # Only the process group's creation reads them; left set, every child process would inherit
        # this process's port and fail to bind it for its own group.
        for key in rendezvous:
            os.environ.pop(key, None)


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def deepspeed_config(cfg: DeepSpeedConfig, batch_size: int) -> dict:
    """``batch_size`` is the global batch; each of the world's ranks takes an equal share of it."""
    _, size = world()
    if batch_size % size:
        raise ValueError(f"batch size {batch_size} is not divisible by the world size {size}")
    return {
        "train_micro_batch_size_per_gpu": batch_size // size,
        "train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "gradient_clipping": cfg.gradient_clipping,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    final_penalty: float
    seconds: float
    tokens: int


def _shard(batch: dict[str, Tensor], rank: int, size: int) -> tuple[dict[str, Tensor], Tensor | None]:
    """This rank's rows of the global batch, and the normaliser that makes data parallelism exact.

    DeepSpeed averages gradients over ranks, so each rank divides its summed token NLL by
    (global target tokens / world size): the average is then the single-process token mean.
    """
    if size == 1:
        return batch, None
    n = batch["input_ids"].shape[0] // size
    local = {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}
    tokens = (batch["labels"][:, 1:] != -100).sum().to(torch.float64)  # every rank holds the global batch
    return local, tokens / size


def _loss_step(engine: nn.Module, batch: dict[str, Tensor], penalty: Callable[[], Tensor] | None,
               num_items: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean target-token NLL of the batch (transformers' own loss) and the penalty."""
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 **({"num_items_in_batch": num_items} if num_items is not None else {}))
    pen = penalty() if penalty is not None else out.loss.new_zeros(())
    return out.loss, pen


def _save(engine: nn.Module, ckpt: Path, step: int, client: dict) -> None:
    """Trainable state (adapter, optimizer) at ``step``; older checkpoints go once ``latest`` points here.

    DeepSpeed writes ``latest`` after the tag's files, so a kill mid-save leaves the previous one usable.
    """
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(ckpt), tag=tag, client_state=client, exclude_frozen_parameters=True)
    if world()[0] == 0:
        for old in ckpt.glob("step*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)


def _restore(engine: nn.Module, ckpt: Path | None) -> dict:
    """Load the latest checkpoint under ``ckpt`` into the engine; its client state ({} when none)."""
    if ckpt is None or not (ckpt / "latest").is_file():
        return {}
    path, client = engine.load_checkpoint(str(ckpt), load_module_strict=False, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        return {}
    log.info("resuming from %s at step %d", path, client["step"])
    return client


def train(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[dict[str, Tensor]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    ds: DeepSpeedConfig,
    make_penalty: Callable[[nn.Module], Callable[[], Tensor]] | None,
    tracker: Tracker,
    log_every: int,
    desc: str,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
) -> TrainResult:
    """Train ``params`` of ``model`` inside a DeepSpeed engine for ``steps`` steps.

    ``make_penalty`` receives the engine's module once the engine exists (so the anchor and
    precision are cast to the engine's dtype and device) and returns the penalty closure.
    ``batches`` yields global batches (the same sequence on every rank); each rank trains on
    its share. With ``checkpoint_dir``, the trainable state is saved every
    ``checkpoint_every`` steps and at the end, and a later call with the same directory
    continues from the latest checkpoint: same optimizer state, RNG and data position, so
    the result equals an uninterrupted run.
    """
    import time

    import deepspeed
    from tqdm.auto import tqdm

    ensure_distributed()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                      config=deepspeed_config(ds, batch_size))
    penalty = make_penalty(engine.module) if make_penalty is not None else None
    device = engine.device
    rank, size = world()
    client = _restore(engine, checkpoint_dir)
    start = int(client.get("step", 0))
    if start:
        torch.set_rng_state(client["rng"])
        for _ in range(start):  # the data order is a pure function of the seed: skip what was trained
            next(batches)
    engine.train()
    t0 = time.perf_counter()
    tokens, window = 0, []
    loss_v, pen_v = float(client.get("loss", "nan")), float(client.get("penalty", "nan"))
    bar = tqdm(range(start, steps), desc=desc, unit="step", leave=False, mininterval=1.0, disable=rank != 0)
    for step in bar:
        batch, num_items = _shard(next(batches), rank, size)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, pen = _loss_step(engine, batch, penalty, num_items)
        total = loss + pen
        if not torch.isfinite(total):
            raise DivergenceError(f"{desc}: non-finite {'loss' if not torch.isfinite(loss) else 'penalty'} at step "
                                  f"{step} (loss={loss.item()}, penalty={pen.item()}); lower training.lr or lalora.lambda")
        engine.backward(total)
        engine.step()
        tokens += int(batch["attention_mask"].sum())
        if size > 1:  # each rank's loss is its share of the global mean: the logged value is their mean
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= size
        window.append((loss.item(), pen.item()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            loss_v = sum(w[0] for w in window) / len(window)
            pen_v = sum(w[1] for w in window) / len(window)
            tracker.log_metrics({"train/loss": loss_v, "train/penalty": pen_v}, step=step + 1)
            bar.set_postfix(loss=f"{loss_v:.3f}", penalty=f"{pen_v:.3g}")
            window.clear()
        if checkpoint_dir is not None and checkpoint_every and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            _save(engine, checkpoint_dir, step + 1,
                  {"step": step + 1, "rng": torch.get_rng_state(), "loss": loss_v, "penalty": pen_v})
    bar.close()
    seconds = time.perf_counter() - t0
    engine.eval()
    if math.isnan(loss_v):
        raise DivergenceError(f"{desc}: no steps were run")
    return TrainResult(steps, loss_v, pen_v, seconds, tokens)
