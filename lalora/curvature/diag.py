"""Diagonal curvature: one precision per LoRA parameter."""

from __future__ import annotations

from typing import final

import torch
from torch import Tensor

from lalora.curvature.base import CurvatureEstimator, register_curvature
from lalora.curvature.hooks import ModuleGrads
from lalora.lora import LoraParam
from lalora.precision import DiagPrecision


@final
@register_curvature("diag")
class DiagCurvature(CurvatureEstimator):
    """F_i = mean_n (d l_n / d theta_i)^2, the paper's recommended structure."""

    def _init_state(self, params: list[LoraParam]) -> dict[str, Tensor]:
        return {p.name: torch.zeros(p.param.shape, dtype=torch.float32, device=p.param.device) for p in params}

    def _update(self, state: dict[str, Tensor], grads: list[ModuleGrads]) -> None:
        for rec in grads:
            state[rec.param.name].add_(rec.per_sample_grad().square().sum(0))

    def _finalize(self, state: dict[str, Tensor], n_samples: int, params: list[LoraParam]) -> DiagPrecision:
        return DiagPrecision({name: total / n_samples for name, total in state.items()})
