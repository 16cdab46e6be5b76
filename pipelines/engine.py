"""The DeepSpeed training loop shared by pretraining and LaLoRA fine-tuning."""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipelines.config import DeepSpeedConfig
from pipelines.tracking import Tracker

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The loss or the penalty stopped being finite."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_distributed() -> None:
    """Initialise torch.distributed for DeepSpeed: the launcher's env if present, else one local rank on gloo/nccl."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def deepspeed_config(cfg: DeepSpeedConfig, batch_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch_size,
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


def _loss_step(engine: nn.Module, batch: dict[str, Tensor], penalty: Callable[[], Tensor] | None) -> tuple[Tensor, Tensor]:
    """Mean target-token NLL of the batch (transformers' own loss) and the penalty."""
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    pen = penalty() if penalty is not None else out.loss.new_zeros(())
    return out.loss, pen


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
) -> TrainResult:
    """Train ``params`` of ``model`` inside a DeepSpeed engine for ``steps`` steps.

    ``make_penalty`` receives the engine's module once the engine exists (so the anchor and
    precision are cast to the engine's dtype and device) and returns the penalty closure.
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
    engine.train()
    t0 = time.perf_counter()
    tokens, window = 0, []
    loss_v = pen_v = float("nan")
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False, mininterval=1.0)
    for step in bar:
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss, pen = _loss_step(engine, batch, penalty)
        total = loss + pen
        if not torch.isfinite(total):
            raise DivergenceError(f"{desc}: non-finite {'loss' if not torch.isfinite(loss) else 'penalty'} at step "
                                  f"{step} (loss={loss.item()}, penalty={pen.item()}); lower training.lr or lalora.lambda")
        engine.backward(total)
        engine.step()
        tokens += int(batch["attention_mask"].sum())
        window.append((loss.item(), pen.item()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            loss_v = sum(w[0] for w in window) / len(window)
            pen_v = sum(w[1] for w in window) / len(window)
            tracker.log_metrics({"train/loss": loss_v, "train/penalty": pen_v}, step=step + 1)
            bar.set_postfix(loss=f"{loss_v:.3f}", penalty=f"{pen_v:.3g}")
            window.clear()
    bar.close()
    seconds = time.perf_counter() - t0
    engine.eval()
    if math.isnan(loss_v):
        raise DivergenceError(f"{desc}: no steps were run")
    return TrainResult(steps, loss_v, pen_v, seconds, tokens)
