"""Precision values: the curvature of the Laplace approximation as plain values with algebra.

A precision maps each LoRA matrix name to its block of the precision matrix. Values are
immutable in spirit: every operation returns a new value and leaves its inputs untouched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from lalora.lora import matrix_kind

P = TypeVar("P", bound="Precision")


@dataclass(frozen=True)
class Prior:
    """Prior precision tau, per matrix kind.

    With the standard LoRA initialisation (B = 0) the data curvature of every A matrix is
    exactly zero at the first anchor, so tau_A alone constrains A in the first stage.
    """

    tau_A: float = 1e-4
    tau_B: float = 1e-4

    def __post_init__(self) -> None:
        if not (self.tau_A >= 0 and self.tau_B >= 0):
            raise ValueError(f"prior precisions must be >= 0, got tau_A={self.tau_A}, tau_B={self.tau_B}")

    def for_name(self, name: str) -> float:
        return self.tau_A if matrix_kind(name) == "A" else self.tau_B


class Precision(ABC):
    """A block-structured precision over the LoRA matrices.

    Subclasses are one per structure (``diag``, ...). They support ``+`` (same structure and
    names), scaling by a non-negative float, the quadratic form, the prior, and a flat
    state dict of tensors for safetensors.
    """

    structure: ClassVar[str]

    @property
    @abstractmethod
    def names(self) -> list[str]:
        """LoRA matrix names in a fixed order."""

    @property
    @abstractmethod
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of the LoRA matrix each block belongs to."""

    @abstractmethod
    def __add__(self: P, other: P) -> P: ...

    @abstractmethod
    def scale(self: P, factor: float) -> P: ...

    @abstractmethod
    def quad_form(self, delta: Mapping[str, Tensor]) -> Tensor:
        """delta^T Lambda delta for a displacement keyed by LoRA matrix name (0-dim tensor)."""

    @abstractmethod
    def with_prior(self: P, prior: Prior) -> P:
        """Lambda + tau, tau chosen per matrix kind."""

    @abstractmethod
    def diagonal(self) -> dict[str, Tensor]:
        """The diagonal of each block, shaped like its LoRA matrix (for logging and checks)."""

    @abstractmethod
    def to_state_dict(self) -> dict[str, Tensor]: ...

    @classmethod
    @abstractmethod
    def from_state_dict(cls: type[P], state: Mapping[str, Tensor]) -> P: ...

    def bind(self, params: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> Callable[[], Tensor]:
        """A differentiable closure computing (theta - theta*)^T Lambda (theta - theta*).

        ``params`` are the live LoRA parameters, ``anchor`` their values at the anchor, both
        keyed by LoRA matrix name. Structures override this with a faster kernel; the
        default goes through ``quad_form`` with autograd.
        """
        self._check_names(params)

        def quad() -> Tensor:
            return self.quad_form({n: params[n] - anchor[n] for n in self.names})

        return quad

    def _check_names(self, params: Mapping[str, Tensor]) -> None:
        shapes = self.shapes
        missing = [n for n in shapes if n not in params]
        extra = [n for n in params if n not in shapes]
        if missing or extra:
            raise ValueError(
                f"precision and adapter disagree: {len(missing)} LoRA matrices missing from the adapter "
                f"(e.g. {missing[:2]}), {len(extra)} not in the precision (e.g. {extra[:2]})"
            )
        for n, shape in shapes.items():
            if tuple(params[n].shape) != shape:
                raise ValueError(f"shape mismatch for {n}: precision has {shape}, adapter has {tuple(params[n].shape)}")

    def __mul__(self: P, factor: float) -> P:
        return self.scale(float(factor))

    __rmul__ = __mul__

    def _check_compatible(self, other: Precision) -> None:
        if type(other) is not type(self):
            raise ValueError(
                f"cannot combine a {self.structure} precision with a {other.structure} precision; "
                "start a new lineage to change the curvature kind"
            )
        if self.shapes != other.shapes:
            missing = sorted(set(self.shapes) ^ set(other.shapes))
            detail = f"names differ: {missing[:3]}" if missing else "shapes differ"
            raise ValueError(f"precisions cover different LoRA matrices ({detail})")


class DiagPrecision(Precision):
    """One precision per LoRA parameter: Lambda = diag(values)."""

    structure: ClassVar[str] = "diag"

    def __init__(self, values: Mapping[str, Tensor]) -> None:
        self.values: dict[str, Tensor] = dict(values)

    @property
    def names(self) -> list[str]:
        return list(self.values)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(v.shape) for n, v in self.values.items()}

    def __add__(self, other: DiagPrecision) -> DiagPrecision:
        self._check_compatible(other)
        return DiagPrecision({n: v + other.values[n] for n, v in self.values.items()})

    def scale(self, factor: float) -> DiagPrecision:
        if factor < 0:
            raise ValueError(f"a precision can only be scaled by a non-negative factor, got {factor}")
        return DiagPrecision({n: v * factor for n, v in self.values.items()})

    def quad_form(self, delta: Mapping[str, Tensor]) -> Tensor:
        terms = [(v * delta[n].to(v.dtype).square()).sum() for n, v in self.values.items()]
        return torch.stack(terms).sum()

    def diagonal(self) -> dict[str, Tensor]:
        return dict(self.values)

    def with_prior(self, prior: Prior) -> DiagPrecision:
        return DiagPrecision({n: v + prior.for_name(n) for n, v in self.values.items()})

    def to_state_dict(self) -> dict[str, Tensor]:
        return {n: v.detach().contiguous() for n, v in self.values.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> DiagPrecision:
        return cls(dict(state))

    def bind(self, params: Mapping[str, Tensor], anchor: Mapping[str, Tensor]) -> Callable[[], Tensor]:
        """Flattened once: anchor and precision live in one contiguous vector each.

        Each call concatenates the live parameters into one vector (a single ``cat``) and the
        whole quadratic form is a handful of vector kernels in one autograd node, whose
        backward is the closed form 2 * Lambda * (theta - theta*) split back into views. Per
        matrix there remains only the ``cat`` input and autograd's gradient accumulation.
        """
        self._check_names(params)
        plist = [params[n] for n in self.names]
        ref = plist[0]
        anchor_flat = torch.cat([anchor[n].detach().reshape(-1) for n in self.names]).to(ref.device, ref.dtype)
        prec_flat = torch.cat([self.values[n].reshape(-1) for n in self.names]).to(ref.device, ref.dtype)
        layout = ([p.numel() for p in plist], [p.shape for p in plist])
        # Flat views of the live parameters, made once: optimizers update parameters in
        # place, so the views stay current; a wrapper that reallocates them is detected.
        views = [p.detach().view(-1) for p in plist]

        def quad() -> Tensor:
            nonlocal views
            if views[0].data_ptr() != plist[0].data_ptr() or views[-1].data_ptr() != plist[-1].data_ptr():
                views = [p.detach().view(-1) for p in plist]
            out: Tensor = _FlatQuadForm.apply(anchor_flat, prec_flat, layout, views, *plist)
            return out

        return quad

    def min_max(self) -> dict[str, tuple[float, float]]:
        """(min, max) per matrix kind, for logging how constrained A and B are."""
        out: dict[str, tuple[float, float]] = {}
        for kind in ("A", "B"):
            vals = [v for n, v in self.values.items() if matrix_kind(n) == kind]
            if vals:
                out[kind] = (min(float(v.min()) for v in vals), max(float(v.max()) for v in vals))
        return out


class _FlatQuadForm(torch.autograd.Function):
    """sum_i Lambda_i (theta_i - theta*_i)^2 over flattened parameters, with a closed-form backward."""

    @staticmethod
    def forward(
        ctx: Any,
        anchor: Tensor,
        prec: Tensor,
        layout: tuple[list[int], list[torch.Size]],
        views: list[Tensor],
        *params: Tensor,
    ) -> Tensor:
        delta = torch.cat(views).sub_(anchor)
        weighted = delta * prec
        ctx.save_for_backward(weighted)
        ctx.layout = layout
        return torch.dot(weighted.float(), delta.float())

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (weighted,) = ctx.saved_tensors
        flat = weighted * (2.0 * grad_out).to(weighted.dtype)
        sizes, shapes = ctx.layout
        grads = [g.view(shape) for g, shape in zip(torch.split(flat, sizes), shapes, strict=True)]
        return (None, None, None, None, *grads)


PRECISIONS: dict[str, type[Precision]] = {DiagPrecision.structure: DiagPrecision}
"""Precision classes by structure name, for checkpoint loading."""

Q = TypeVar("Q", bound=type[Precision])


def register_precision(cls: Q) -> Q:
    """Class decorator adding a precision class to ``PRECISIONS`` under its ``structure``."""
    if cls.structure in PRECISIONS:
        raise ValueError(
            f"precision structure {cls.structure!r} is already registered by {PRECISIONS[cls.structure].__name__}"
        )
    PRECISIONS[cls.structure] = cls
    return cls
