"""The DeepSpeed training loop shared by pretraining and LaLoRA fine-tuning."""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipelines.config import DeepSpeedConfig
from pipelines.errors import DivergenceError
from pipelines.runtime import timeline
from pipelines.runtime.distributed import distributed, world
from pipelines.runtime.loss import chunked_causal_loss, target_positions
from pipelines.tracker import Tracker

log = logging.getLogger(__name__)


def deepspeed_config(cfg: DeepSpeedConfig, batch_size: int, whole_numel: int = 0) -> dict:
    """``batch_size`` is the global batch; each of the world's ranks takes an equal share of it.

    At ZeRO-3 the parameters of at most ``whole_numel`` elements (the LoRA matrices: pass the largest one's
    size) are kept whole on every rank (DeepSpeed's persistent parameters: gathered once, all-gathered again
    after every optimizer step, never released), so the penalty and the curvature read them as they are; so is
    every parameter within ``cfg.persistence_threshold`` (DeepSpeed's default keeps the small base matrices
    whole, as a plain ZeRO-3 engine does); everything larger is partitioned across the ranks.
    """
    _, size = world()
    if batch_size % size:
        raise ValueError(f"batch size {batch_size} is not divisible by the world size {size}")
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero |= {"stage3_param_persistence_threshold": max(whole_numel, cfg.persistence_threshold)}
    return {
        "train_micro_batch_size_per_gpu": batch_size // size,
        "train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "gradient_clipping": cfg.gradient_clipping,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def compute_device() -> torch.device:
    """This rank's accelerator (the launcher's LOCAL_RANK-th GPU), else the CPU: where DeepSpeed puts an engine."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def keep_whole(params: list[nn.Parameter]) -> None:
    """Make ZeRO-3's persistent parameters whole on this rank where they are not (a collective: every rank
    calls it at the same points). DeepSpeed gathers them at a module's first forward and keeps them from the
    second step on, but while it traces the first step it releases them after each module like any other, and
    the penalty reads them after the forward. A no-op outside ZeRO-3 and once they are whole (a host-side
    status check, no device sync)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    zero: list[Any] = [p for p in params if hasattr(p, "ds_id")]  # ZeRO-3's attributes (ds_status, all_gather)
    if not zero:
        return
    if not all(getattr(p, "ds_persist", False) for p in zero):
        raise RuntimeError("ZeRO-3 partitioned a LoRA matrix: the persistence threshold is below its size")
    missing = [p for p in zero if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if missing:
        missing[0].all_gather(missing)


@dataclass(frozen=True)
class ParameterBytes:
    """Bytes of a model's parameters one rank holds: the base's (a partition of each at ZeRO-3) and the
    trainable ones (whole everywhere)."""

    base_per_rank: int
    base_whole: int
    trainable: int
    ranks: int

    def describe(self) -> str:
        mib = 1024**2
        split = (
            f" (partitioned over {self.ranks} ranks: {self.base_whole / mib:.2f} MiB whole)"
            if self.base_per_rank < self.base_whole
            else ""
        )
        return (
            f"base parameters {self.base_per_rank / mib:.2f} MiB per rank{split}; trainable "
            f"{self.trainable / mib:.3f} MiB whole on every rank"
        )


def parameter_bytes(module: nn.Module) -> ParameterBytes:
    """What this rank holds of ``module``'s parameters, measured on the live tensors (ZeRO-3: the local
    partition of each partitioned parameter, ``ds_tensor``)."""
    base = whole = trainable = 0
    for p in module.parameters():
        size = p.element_size()
        full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if p.requires_grad:
            trainable += full * size
            continue
        local = full if not hasattr(p, "ds_tensor") or getattr(p, "ds_persist", False) else p.ds_tensor.numel()
        base, whole = base + local * size, whole + full * size
    return ParameterBytes(base, whole, trainable, world()[1])


@contextmanager
def partitioned(model: nn.Module, ds: DeepSpeedConfig, whole: list[nn.Parameter]) -> Iterator[nn.Module]:
    """``model`` as a pass without an optimizer sees it: at ZeRO-3 inside a DeepSpeed engine (the base
    partitioned, its weights gathered module by module in the forward and the backward; ``whole`` kept whole),
    torn down after; at any other stage the model itself (its parameters are replicated already)."""
    if ds.zero_stage != 3:
        yield model
        return
    import deepspeed

    with distributed() as (_, size):
        engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(ds, size, max(p.numel() for p in whole)))
        try:
            keep_whole(whole)
            log.info("ZeRO-3: %s", parameter_bytes(engine.module).describe())
            yield engine.module
        finally:
            _destroy(engine)


def _destroy(engine: Any) -> None:
    """Tear the engine down, and undo what its ZeRO-3 set-up did to the process: ``zero.Init`` replaces
    ``torch.nn.functional.linear`` with DeepSpeed's Python autograd function "unless manually reset", which
    would slow every later linear layer in this process (the next step's curvature, scoring, a next engine
    at another stage) by up to 2x. A later ZeRO-3 engine replaces it again while it lives."""
    modules = {id(m) for m in engine.module.modules()}
    engine.destroy()
    if str(getattr(torch.nn.functional.linear, "__module__", "")).startswith("deepspeed."):
        torch.nn.functional.linear = torch._C._nn.linear
    _drop_zero3_references(modules)
    release_freed_memory()


def release_freed_memory() -> None:
    """Hand what a torn-down engine freed back to the system, so a long-lived flow process does not hold a
    finished step's peak into the next one: the cycles its references leave (``gc``), the CUDA caching
    allocator's free blocks, and on glibc the C heap's free pages (``malloc_trim``: measured on the CPU,
    440 MiB of a curvature step's activations and gathered weights were still resident at the fine-tune's
    start without it, benchmarks/zero3_anchor.py). Where a libc has no ``malloc_trim`` that part is skipped."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` from the process's own symbols (no library search, no subprocess), or None."""
    import ctypes

    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # another libc (musl, macOS), or no dlopen(NULL) (Windows)
        return None
    return trim


def _drop_zero3_references(modules: set[int]) -> None:
    """What DeepSpeed 0.19's ZeRO-3 keeps after ``engine.destroy()``, which would keep the engine, its model and
    its partitions alive for the rest of the process (a curvature step's engine and base beside the fine-tune's):
    the module-level stack of modules in a forward (``FWD_MODULE_STACK``: a module whose post-forward hook did not
    run stays on it), and the class-wide ``lru_cache`` of the parameter coordinator's release sets (keyed by the
    coordinator and the module). Only this engine's modules leave the stack; the cache only memoises."""
    try:
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    except ImportError:
        return
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [m for m in stack if id(m) not in modules]
    cached = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(cached, "__closure__", None) or ():  # instrument_w_nvtx wraps the lru_cache
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


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


def _loss_step(
    engine: nn.Module,
    batch: dict[str, Tensor],
    penalty: Callable[[], Tensor] | None,
    num_items: Tensor | None,
    regather: Callable[[], None] | None,
    loss_chunk: int = 0,
    targets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean target-token NLL of the batch (transformers' own loss, or the same computed ``loss_chunk`` target
    tokens at a time, ``targets`` their positions) and the penalty (at ZeRO-3 ``regather`` first makes the LoRA
    matrices whole for it)."""
    if loss_chunk:
        loss = chunked_causal_loss(engine, batch, loss_chunk, num_items, targets)
    else:
        loss = engine(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,  # load_base turns the KV cache on for scoring; a training forward would fill one
            **({"num_items_in_batch": num_items} if num_items is not None else {}),
        ).loss
    if penalty is None:
        return loss, loss.new_zeros(())
    if regather is not None:
        regather()
    return loss, penalty()


def adamw(params: list[nn.Parameter], lr: float, impl: str = "auto") -> torch.optim.AdamW:
    """The fine-tune's AdamW (no weight decay): ``impl`` 'fused' (one kernel for every matrix), 'unfused' (torch's
    own choice: multi-tensor on a GPU, a loop over the matrices on the CPU), 'auto' (fused on a GPU, unfused on
    the CPU, where the lineages recorded so far ran it)."""
    fused = impl == "fused" or (impl == "auto" and torch.cuda.is_available())
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True if fused else None)


def _save(engine: Any, ckpt: Path, step: int, client: dict) -> None:
    """Trainable state (adapter, optimizer) at ``step``; older checkpoints go once ``latest`` points here.

    DeepSpeed writes ``latest`` after the tag's files, so a kill mid-save leaves the previous one usable.
    """
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(ckpt), tag=tag, client_state=client, exclude_frozen_parameters=True)
    if world()[0] == 0:
        for old in ckpt.glob("step*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)


def _latest_tag(ckpt: Path) -> str | None:
    """The tag ``ckpt/latest`` names. DeepSpeed rewrites that file in place (truncate, then write) after the
    tag's files are complete, so a kill in between leaves it empty: then the newest tag is the complete one."""
    latest = ckpt / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag:
        tags = sorted(p.name for p in ckpt.glob("step*") if p.is_dir())
        tag = tags[-1] if tags else ""
        log.warning("%s was left empty by a kill while it was rewritten; resuming from %s", latest, tag or "scratch")
    return tag or None


def _restore(engine: Any, ckpt: Path | None) -> dict:
    """Load the latest checkpoint under ``ckpt`` into the engine; its client state ({} when none)."""
    tag = _latest_tag(ckpt) if ckpt is not None else None
    if tag is None:
        return {}
    path, client = engine.load_checkpoint(
        str(ckpt), tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        return {}
    log.info("resuming from %s at step %d", path, client["step"])
    return client


class _Window:
    """Loss and penalty of the steps since the last log, summed on the device: the training step makes
    no host sync (it would stall a GPU's queue). ``flush`` reads them in one transfer, at the log
    interval and before every checkpoint, and raises if a step was not finite."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, penalty
        self.steps = 0  # in the window: every rank runs as many
        # the first non-finite step, its loss, its penalty
        self.bad = torch.full((3,), -1.0, dtype=torch.float64, device=device)

    def add(self, step: int, loss: Tensor, pen: Tensor) -> None:
        values = torch.stack([loss.detach().double(), pen.detach().double()])
        fresh = (self.bad[0] < 0) & ~torch.isfinite(values).all()
        self.bad = torch.where(fresh, torch.cat([values.new_full((1,), float(step)), values]), self.bad)
        self.sums += values
        self.steps += 1

    def flush(self, desc: str, size: int) -> tuple[float, float]:
        """(mean loss, mean penalty) of the window over every rank; this is the one host sync per interval."""
        sums = self.sums.clone()
        if size > 1:  # each rank's loss is its share of the global mean: the logged value is their mean
            torch.distributed.all_reduce(sums)
            sums /= size
            torch.distributed.all_reduce(self.bad, op=torch.distributed.ReduceOp.MAX)
        loss, pen, step, bad_loss, bad_pen = torch.cat([sums, self.bad]).tolist()  # the CPU-GPU sync point
        if step >= 0:
            what = "loss" if not math.isfinite(bad_loss) else "penalty"
            raise DivergenceError(
                f"{desc}: non-finite {what} at step {int(step)} "
                f"(loss={bad_loss}, penalty={bad_pen}); lower training.lr or lalora.lambda"
            )
        n, self.steps = self.steps, 0
        self.sums.zero_()
        return loss / n, pen / n


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
    seed: int = 0,
    optimizer_impl: str = "auto",
    loss_chunk: int = 0,
) -> TrainResult:
    """Train ``params`` of ``model`` inside a DeepSpeed engine for ``steps`` steps.

    ``make_penalty`` receives the engine's module once the engine exists (so the anchor and precision are cast to
    the engine's dtype and device) and returns the penalty closure. ``batches`` yields global batches (the same
    sequence on every rank); each rank trains on its share. With ``checkpoint_dir``, the trainable state is saved
    every ``checkpoint_every`` steps and at the end, and a later call with the same directory continues from the
    latest checkpoint: same optimizer state, RNG and data position, so the result equals an uninterrupted run. The
    engine is torn down when ``train`` returns (its gradient hooks removed), so the next call can build another
    over the same parameters. ``seed`` seeds the RNG the steps draw from (dropout), in a fork of the process's RNG.
    ``optimizer_impl`` and ``loss_chunk``: ``training.optimizer_impl`` and ``training.loss_chunk``.
    """
    import deepspeed

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with distributed(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        optimizer = adamw(params, lr, optimizer_impl)
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            config=deepspeed_config(ds, batch_size, max(p.numel() for p in params)),
        )
        try:
            keep_whole(params)
            held = parameter_bytes(engine.module)
            log.info("%s: ZeRO-%d, %s", desc, ds.zero_stage, held.describe())
            tracker.log_params(
                {"train.base_param_bytes_per_rank": held.base_per_rank, "train.trainable_param_bytes": held.trainable}
            )
            regather = (lambda: keep_whole(params)) if ds.zero_stage == 3 else None
            return _loop(
                engine,
                make_penalty(engine.module) if make_penalty is not None else None,
                batches,
                regather,
                steps=steps,
                tracker=tracker,
                log_every=log_every,
                desc=desc,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=checkpoint_every,
                loss_chunk=loss_chunk,
            )
        finally:
            _destroy(engine)


def _resume(engine: Any, checkpoint_dir: Path | None, batches: Iterator[dict[str, Tensor]]) -> dict[str, Any]:
    """The latest checkpoint's client state (empty without one): its RNG restored, the batches it trained skipped."""
    client = _restore(engine, checkpoint_dir)
    start = int(client.get("step", 0))
    if start:
        torch.set_rng_state(client["rng"])
        for _ in range(start):  # the data order is a pure function of the seed: skip what was trained
            next(batches)
    return client


def _loop(
    engine: Any,
    penalty: Callable[[], Tensor] | None,
    batches: Iterator[dict[str, Tensor]],
    regather: Callable[[], None] | None,
    *,
    steps: int,
    tracker: Tracker,
    log_every: int,
    desc: str,
    checkpoint_dir: Path | None,
    checkpoint_every: int,
    loss_chunk: int = 0,
) -> TrainResult:
    """The training steps of ``train``: resume, step, log and checkpoint."""
    import time

    from tqdm.auto import tqdm

    rank, size = world()
    client = _resume(engine, checkpoint_dir, batches)
    start = int(client.get("step", 0))
    engine.train()
    t0 = time.perf_counter()
    window, tokens = _Window(engine.device), torch.zeros((), dtype=torch.long)
    loss_v, pen_v = float(client.get("loss", "nan")), float(client.get("penalty", "nan"))
    bar = tqdm(range(start, steps), desc=desc, unit="step", leave=False, mininterval=1.0, disable=rank != 0)
    timeline.mark("first_batch")
    for step in bar:
        batch, num_items = _shard(next(batches), rank, size)
        tokens += batch["attention_mask"].sum()  # on the host's copy of the batch: no device sync
        on_device = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
        # the chunked loss's target positions, found on the host's copy: no device sync
        targets = target_positions(batch["labels"]).to(engine.device, non_blocking=True) if loss_chunk else None
        loss, pen = _loss_step(engine, on_device, penalty, num_items, regather, loss_chunk, targets)
        window.add(step, loss, pen)
        engine.backward(loss + pen)
        engine.step()
        done = step + 1
        save = checkpoint_dir is not None and checkpoint_every and (done % checkpoint_every == 0 or done == steps)
        if done % log_every == 0 or done == steps or save:  # divergence is caught here, before anything is saved
            loss_v, pen_v = window.flush(desc, size)
            tracker.log_metrics({"train/loss": loss_v, "train/penalty": pen_v}, step=done)
            bar.set_postfix(loss=f"{loss_v:.3f}", penalty=f"{pen_v:.3g}")
        if save:
            assert checkpoint_dir is not None  # a save is due only with a checkpoint directory
            state = {"step": done, "rng": torch.get_rng_state(), "loss": loss_v, "penalty": pen_v}
            _save(engine, checkpoint_dir, done, state)
    bar.close()
    timeline.mark("last_batch")
    engine.eval()
    if math.isnan(loss_v):
        raise DivergenceError(f"{desc}: no steps were run")
    return TrainResult(steps, loss_v, pen_v, time.perf_counter() - t0, int(tokens))
