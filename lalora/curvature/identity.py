"""The identity structure: Lambda = I, plain L2 towards the anchor (a baseline)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import final

import torch
from torch import Tensor, nn

from lalora.curvature.base import Batch, CurvatureEstimate, CurvatureEstimator, register_curvature
from lalora.curvature.hooks import ModuleGrads
from lalora.curvature.settings import NoSettings
from lalora.lora import LoraParam, lora_parameters
from lalora.precision import DiagPrecision


@final
@register_curvature("identity")
class IdentityCurvature(CurvatureEstimator):
    """Unit curvature for every LoRA parameter; reads no data."""

    settings = NoSettings

    def estimate(
        self, model: nn.Module, batches: Iterable[Batch], progress: Callable[[int], None] | None = None
    ) -> CurvatureEstimate:
        params = lora_parameters(model, self.adapter_name)
        return CurvatureEstimate(self._finalize({}, 1, params), 0, "identity")

    def _init_state(self, params: list[LoraParam]) -> dict[str, Tensor]:
        return {}

    def _update(self, state: dict[str, Tensor], grads: list[ModuleGrads]) -> None:
        return None

    def _finalize(self, state: dict[str, Tensor], n_samples: int, params: list[LoraParam]) -> DiagPrecision:
        return DiagPrecision(
            {p.name: torch.ones(p.param.shape, dtype=torch.float32, device=p.param.device) for p in params}
        )
