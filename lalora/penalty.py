"""The Laplace penalty added to the fine-tuning loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from lalora.lora import LoraParam
from lalora.precision import Precision, Prior


class LaplacePenalty:
    """(lam / 2) * (theta - theta*)^T (Lambda + tau) (theta - theta*) over the LoRA matrices.

    Built once per stage (anchor and precision moved to the parameters' device and dtype
    once); each call returns a differentiable 0-dim tensor that the training step adds to
    its loss. ``lam = 0`` is plain LoRA and returns a constant zero without touching the
    parameters.
    """

    def __init__(
        self,
        precision: Precision,
        anchor: Mapping[str, Tensor],
        params: Sequence[LoraParam],
        lam: float,
        prior: Prior | None = None,
    ) -> None:
        if lam < 0:
            raise ValueError(f"lambda must be >= 0, got {lam}")
        self.lam = float(lam)
        self.precision = precision.with_prior(prior) if prior is not None else precision
        live = {p.name: p.param for p in params}
        self._quad = self.precision.bind(live, anchor)
        self._zero_like = params[0].param

    def __call__(self) -> Tensor:
        if self.lam == 0.0:
            return self._zero_like.new_zeros(()).float()
        return 0.5 * self.lam * self._quad()
