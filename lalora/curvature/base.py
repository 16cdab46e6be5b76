"""The curvature estimator interface and the registry of structures."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from lalora.curvature.hooks import ModuleGrads, per_sequence_output_grads
from lalora.curvature.settings import FisherSettings, FisherType
from lalora.lora import LoraParam, lora_parameters
from lalora.precision import Precision

State = dict[str, Any]
"""A structure's running sums: tensors, or objects that sum themselves across ranks with ``all_reduce_()``
(``kron_stats.GramSum``); one object may sit under several keys."""

Batch = Mapping[str, Tensor]
"""``input_ids`` and ``labels`` (B, T), optional ``attention_mask`` (B, T); labels use -100
for tokens that carry no loss (prompt, padding), shifted inside as in transformers."""


@dataclass
class CurvatureEstimate:
    """What a curvature pass returns: the data curvature F_hat and how it was obtained."""

    precision: Precision
    n_samples: int
    fisher_type: str
    zero_curvature: list[str] = field(default_factory=list)
    """LoRA matrices whose curvature is exactly zero (all A matrices at a B = 0 anchor)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a structure needs: during the curvature pass (accumulators) and once stored."""

    pass_bytes: int
    stored_bytes: int


class CurvatureEstimator(ABC):
    """Estimates F_hat(theta*; D_c), a per-sequence mean, over the LoRA matrices of a model.

    ``estimate`` runs the model over curvature batches at its current weights (the anchor).
    Sequences are samples: each contributes the gradient of its summed target-token NLL,
    with labels either observed (``empirical``) or drawn from the model (``mc``).
    Under torch.distributed the per-rank sums are all-reduced before the mean, so every
    rank returns what one process would on the union of the ranks' batches.
    """

    kind: ClassVar[str]
    settings: ClassVar[type] = FisherSettings
    """The estimator's user settings, a frozen dataclass: its fields are keyword arguments of ``__init__``."""

    def __init__(
        self, fisher_type: FisherType = "empirical", mc_samples: int = 1, seed: int = 0, adapter_name: str = "default"
    ) -> None:
        if fisher_type not in ("empirical", "mc"):
            raise ValueError(f"fisher_type must be 'empirical' or 'mc', got {fisher_type!r}")
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.seed = seed
        self.adapter_name = adapter_name

    # --- what a structure implements -------------------------------------------------
    @abstractmethod
    def _init_state(self, params: list[LoraParam]) -> State:
        """Zeroed running sums, keyed freely; all are all-reduced (summed) across ranks."""

    @abstractmethod
    def _update(self, state: State, grads: list[ModuleGrads]) -> None:
        """Add one batch's per-sequence statistics to the running sums."""

    @abstractmethod
    def _finalize(self, state: State, n_samples: int, params: list[LoraParam]) -> Precision:
        """Turn the summed statistics into a precision (divide by ``n_samples``)."""

    def _all_reduce(self, state: State, n: int) -> int:
        """Sum the running sums and the sample count over ranks, in place; a structure whose ranks may
        hold different keys makes them agree first (every rank calls this, batches or none)."""
        return _all_reduce_(state, n)

    def memory(self, shapes: dict[str, tuple[int, ...]]) -> MemoryEstimate:
        """Bytes for LoRA matrices of these shapes; the default is one fp32 per parameter."""
        n = 4 * sum(int(torch.tensor(s).prod()) for s in shapes.values())
        return MemoryEstimate(n, n)

    # --- the shared pass --------------------------------------------------------------
    def estimate(
        self, model: nn.Module, batches: Iterable[Batch], progress: Callable[[int], None] | None = None
    ) -> CurvatureEstimate:
        # A DeepSpeed engine (ZeRO 0-2: parameters replicated) is run through its module, so
        # the engine's gradient-reduction hooks never see this pass.
        model = unwrap(model)
        params = lora_parameters(model, self.adapter_name)
        state = self._init_state(params)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        n = 0
        was_training = model.training
        if was_training:
            model.eval()  # no dropout: the curvature is that of the deterministic model
        try:
            for batch in batches:
                for grads, n_seq in per_sequence_output_grads(
                    model, params, batch, self.fisher_type, self.mc_samples, generator
                ):
                    self._update(state, grads)
                    n += n_seq
                if progress is not None:
                    progress(int(batch["input_ids"].shape[0]))
        finally:
            if was_training:
                model.train()
        n = self._all_reduce(state, n)
        if n == 0:
            raise ValueError("no curvature samples: every sequence had its labels masked (-100)")
        precision = self._finalize(state, n, params)
        diagonal = precision.diagonal()  # which matrices have no curvature: one device-to-host transfer
        nonzero = torch.stack([t.any() for t in diagonal.values()]).tolist() if diagonal else []
        zero = [name for name, any_ in zip(diagonal, nonzero, strict=True) if not any_]
        return CurvatureEstimate(precision, n, self.fisher_type, zero)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a wrapper that exposes it as ``.module`` (DeepSpeed engine, DDP)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def distributed() -> bool:
    """Whether this process is one of several torch.distributed ranks."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_(state: State, n: int) -> int:
    """Sum the running sums and the sample count over ranks, in place: in the keys' sorted order (the same
    on every rank), a sum under several keys once."""
    dist = torch.distributed
    if not distributed():
        return n
    for t in {id(state[k]): state[k] for k in sorted(state)}.values():
        if isinstance(t, Tensor):
            dist.all_reduce(t)
        else:
            t.all_reduce_()
    device = next(t.device for t in state.values() if isinstance(t, Tensor))
    count = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(count)
    return int(count.item())


E = TypeVar("E", bound=type[CurvatureEstimator])
CURVATURES: dict[str, type[CurvatureEstimator]] = {}
"""Estimator classes by the config's ``kind``."""


def register_curvature(kind: str) -> Callable[[E], E]:
    """Class decorator adding an estimator to ``CURVATURES`` under ``kind``."""

    def deco(cls: E) -> E:
        if kind in CURVATURES:
            raise ValueError(f"curvature kind {kind!r} is already registered by {CURVATURES[kind].__name__}")
        cls.kind = kind
        CURVATURES[kind] = cls
        return cls

    return deco


def build_estimator(kind: str, **kwargs: object) -> CurvatureEstimator:
    """The estimator registered under ``kind``, constructed with ``kwargs``."""
    try:
        cls = CURVATURES[kind]
    except KeyError:
        raise ValueError(
            f"unknown curvature kind {kind!r}; registered kinds: {', '.join(sorted(CURVATURES))}"
        ) from None
    return cls(**kwargs)  # type: ignore[arg-type]
