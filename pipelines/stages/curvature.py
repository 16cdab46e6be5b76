"""Stage step 1: the Laplace precision at the anchor, accumulated over the lineage."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lalora import Precision, Prior, accumulate, build_estimator, load_precision, lora_parameters, save_precision
from lalora.curvature import CurvatureEstimate, CurvatureEstimator, MemoryEstimate
from lalora.lora import LoraParam
from pipelines.config import DeepSpeedConfig, DomainConfig, LaLoRAConfig, LineageConfig
from pipelines.data.sources import load_domain
from pipelines.data.tokens import encode, fixed_batches, special_ids
from pipelines.errors import BadInput
from pipelines.runtime import timeline
from pipelines.runtime.engine import compute_device, partitioned, world
from pipelines.runtime.models import load_adapter, load_base
from pipelines.tracker import Tracker
from pipelines.workspace import StepPaths

log = logging.getLogger(__name__)


class MemoryBudgetError(BadInput):
    """The curvature pass would need more memory than the configured budget."""


def check_memory(estimate: MemoryEstimate, cfg: LaLoRAConfig, stage: int) -> None:
    """Print what the structure needs and refuse it when over ``memory_budget_gb``."""
    gib = 1024**3
    log.info(
        "stage %d: %s curvature needs %.3g GiB during the pass and %.3g GiB stored (budget %.3g GiB)",
        stage,
        cfg.curvature.kind,
        estimate.pass_bytes / gib,
        estimate.stored_bytes / gib,
        cfg.memory_budget_gb,
    )
    if estimate.pass_bytes > cfg.memory_budget_gb * gib:
        raise MemoryBudgetError(
            f"{cfg.curvature.kind} curvature needs {estimate.pass_bytes / gib:.3g} GiB for its accumulators, over "
            f"lalora.memory_budget_gb={cfg.memory_budget_gb:g}; raise the budget, use curvature kind diag, or adapt "
            "fewer modules (lora.target_modules)"
        )


@dataclass(frozen=True, kw_only=True)
class PrecisionInputs:
    """What the curvature step reads; ``from_config`` is the one mapping from a lineage's config to it."""

    base: str
    """the base model (from_pretrained path or hub id)"""
    anchor: str
    """the adapter as it stands before the stage (the LoRA initialisation for the first stage)"""
    lalora: LaLoRAConfig
    domain: DomainConfig
    """the domain learned before the stage (the source for the first stage)"""
    previous: str | None
    """the precision accumulated so far (None at the first stage)"""
    stage: int
    dtype: str
    max_length: int
    seed: int
    data_dir: str
    out_dir: str
    ds: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        if self.domain.curvature_rows != (self.domain.curvature_size or self.lalora.samples):
            raise ValueError(
                f"domain {self.domain.name} gives {self.domain.curvature_rows} curvature rows, lalora.samples says "
                f"{self.lalora.samples}: take the domain from the lineage's config, or domain.with_samples(samples)"
            )

    @classmethod
    def from_config(cls, cfg: LineageConfig, stage: int, paths: StepPaths) -> PrecisionInputs:
        return cls(
            base=paths.base,
            anchor=paths.anchor,
            lalora=cfg.lalora,
            domain=cfg.all_domains[stage - 1],
            previous=paths.precision,
            stage=stage,
            dtype=cfg.model.dtype,
            max_length=cfg.training.max_length,
            seed=cfg.seed,
            data_dir=paths.data,
            out_dir=paths.out,
            ds=cfg.deepspeed,
        )


@dataclass(frozen=True, kw_only=True)
class PrecisionResult:
    path: str
    structure: str
    n_samples: int
    zero_curvature: int
    """LoRA matrices with exactly zero data curvature (all A matrices at a B = 0 anchor)."""
    seconds: float
    sha256: str


def compute_precision(inputs: PrecisionInputs, tracker: Tracker) -> PrecisionResult:
    """F_hat(anchor; domain), accumulated onto ``previous``, written to ``out_dir``.

    At ``ds.zero_stage`` 3 the pass runs inside a DeepSpeed engine, the base partitioned across the ranks and the
    LoRA matrices whole (their layer inputs and output gradients, which the estimator reads, exist in the forward
    and backward as at any other stage).
    """
    t0 = time.perf_counter()
    cfg, domain, stage = inputs.lalora, inputs.domain, inputs.stage
    base, tokenizer = load_base(inputs.base, inputs.dtype)
    model = load_adapter(base, inputs.anchor, trainable=True)
    params = lora_parameters(model)
    shapes = {p.name: tuple(p.param.shape) for p in params}
    prior = Prior(cfg.prior.tau_A, cfg.prior.tau_B)
    prev_precision, history = None, []
    if inputs.previous is not None:
        prev_precision, prev_meta = load_precision(inputs.previous, shapes)
        history = prev_meta.history

    splits = load_domain(domain, Path(inputs.data_dir))
    _, _, pad = special_ids(tokenizer)
    every = fixed_batches(encode(tokenizer, splits.curvature, inputs.max_length), cfg.batch_size, pad)
    estimator = build_estimator(
        cfg.curvature.kind, seed=inputs.seed + stage, **cfg.curvature.model_dump(exclude={"kind"})
    )
    check_memory(estimator.memory(shapes), cfg, stage)
    est = _estimate(estimator, model, params, _rank_share(every, inputs.ds.zero_stage == 3), inputs.ds, domain.name)
    zero_a = _zero_a(est, params, stage, prior)
    fresh = type(est.precision).from_state_dict({k: v.cpu() for k, v in est.precision.to_state_dict().items()})
    precision = accumulate(prev_precision, fresh, cfg.accumulate.mode, cfg.accumulate.gamma)  # kept on the host
    entry = {"stage": stage, "domain": domain.name, **_accumulated(cfg, est), "data_sha256": splits.fingerprint}
    target = Path(inputs.out_dir) / "precision"
    if world()[0] != 0:  # rank 0 writes
        return PrecisionResult(
            path=str(target),
            structure=precision.structure,
            n_samples=est.n_samples,
            zero_curvature=len(est.zero_curvature),
            seconds=0.0,
            sha256="",
        )
    meta = save_precision(
        target, precision, fisher_type=est.fisher_type, n_samples=est.n_samples, prior=prior, history=[*history, entry]
    )
    seconds = time.perf_counter() - t0
    tracker.log_metrics(_curvature_stats(precision, seconds, est.n_samples, len(est.zero_curvature), len(zero_a)))
    tracker.log_artifact(target, "curvature")
    return PrecisionResult(
        path=str(target),
        structure=meta.structure,
        n_samples=est.n_samples,
        zero_curvature=len(est.zero_curvature),
        seconds=seconds,
        sha256=meta.sha256,
    )


def _accumulated(cfg: LaLoRAConfig, est: CurvatureEstimate) -> dict[str, object]:
    """How the stage's curvature joined the precision: the entry's rule and estimate, for its history."""
    return {
        "mode": cfg.accumulate.mode,
        "gamma": cfg.accumulate.gamma,
        "n_samples": est.n_samples,
        "fisher_type": est.fisher_type,
    }


def _estimate(
    estimator: CurvatureEstimator,
    model: torch.nn.Module,
    params: list[LoraParam],
    batches: list[dict[str, torch.Tensor]],
    ds: DeepSpeedConfig,
    name: str,
) -> CurvatureEstimate:
    """The curvature pass over this rank's ``batches`` on the compute device (a GPU when there is one; at ZeRO-3
    inside a DeepSpeed engine, which puts the module there)."""
    from tqdm.auto import tqdm

    zero3 = ds.zero_stage == 3
    total = sum(len(b["input_ids"]) for b in batches)
    with tqdm(total=total, desc=f"curvature on {name}", unit="seq", leave=False, disable=world()[0] != 0) as bar:
        device = compute_device()
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        if not zero3:
            model.to(device)
        with partitioned(model, ds, [p.param for p in params]) as module:
            timeline.mark("first_batch")
            est = estimator.estimate(module, batches, progress=bar.update)
            timeline.mark("last_batch")
    return est


def _zero_a(est: CurvatureEstimate, params: list[LoraParam], stage: int, prior: Prior) -> list[str]:
    """The A matrices with zero data curvature; a warning when that is every one of them (a B = 0 anchor)."""
    zero_a = [n for n in est.zero_curvature if n.endswith(".lora_A")]
    if zero_a and len(zero_a) == sum(1 for p in params if p.kind == "A"):
        log.warning(
            "stage %d: every A matrix has zero curvature at this anchor (B = 0 at the LoRA initialisation); "
            "only tau_A = %g constrains A in this stage. Expected, not a bug.",
            stage,
            prior.tau_A,
        )
    return zero_a


def _rank_share(every: list[dict[str, torch.Tensor]], zero3: bool) -> list[dict[str, torch.Tensor]]:
    """This rank's curvature batches: under the deepspeed launcher each rank sums its share (the estimator
    all-reduces). At ZeRO-3 each forward gathers weights with every rank, so all run as many batches, the
    extra ones labelled -100 throughout (they score nothing)."""
    rank, size = world()
    batches = every[rank::size]
    if zero3 and size > 1:
        filler = {**every[0], "labels": torch.full_like(every[0]["labels"], -100)}
        batches += [filler] * (-(-len(every) // size) - len(batches))
    return batches


def _curvature_stats(precision: Precision, seconds: float, n_samples: int, zero: int, zero_a: int) -> dict[str, float]:
    """The pass's metrics: time, samples, matrices with zero curvature, mean and max curvature of A and B."""
    stats = {
        "curvature/seconds": seconds,
        "curvature/n_samples": n_samples,
        "curvature/zero_matrices": zero,
        "curvature/zero_A_matrices": zero_a,
    }
    state = precision.diagonal()
    for kind in ("A", "B"):
        vals = [v for n, v in state.items() if n.endswith(f".lora_{kind}")]
        if vals:
            stats[f"curvature/mean_{kind}"] = float(sum(v.sum() for v in vals) / sum(v.numel() for v in vals))
            stats[f"curvature/max_{kind}"] = float(max(v.max() for v in vals))
    return stats
