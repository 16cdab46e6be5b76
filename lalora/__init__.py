"""LaLoRA: LoRA fine-tuning with a Laplace-approximation penalty on the LoRA weights.

This package is the method only: curvature estimators, precision values, the penalty,
curvature checkpoints and continual-learning metrics. It depends on torch (and safetensors
for checkpoints) and never on orchestration, tracking or data-loading frameworks.

Its names load on first use (PEP 562): importing ``lalora`` (or ``lalora.curvature.settings``, which the config
reads) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lalora.accumulate import AccumulationMode, accumulate
    from lalora.checkpoint import CheckpointError, CurvatureMeta, load_precision, save_precision
    from lalora.curvature import (
        CURVATURES,
        CurvatureEstimate,
        CurvatureEstimator,
        build_estimator,
        register_curvature,
    )
    from lalora.kron import KronPrecision, KronTriPrecision
    from lalora.lora import LoraParam, lora_parameters
    from lalora.metrics import ContinualMetrics, continual_metrics
    from lalora.penalty import LaplacePenalty
    from lalora.precision import DiagPrecision, Precision, Prior

_MODULES = {
    "AccumulationMode": "lalora.accumulate",
    "CURVATURES": "lalora.curvature",
    "CheckpointError": "lalora.checkpoint",
    "ContinualMetrics": "lalora.metrics",
    "CurvatureEstimate": "lalora.curvature",
    "CurvatureEstimator": "lalora.curvature",
    "CurvatureMeta": "lalora.checkpoint",
    "DiagPrecision": "lalora.precision",
    "KronPrecision": "lalora.kron",
    "KronTriPrecision": "lalora.kron",
    "LaplacePenalty": "lalora.penalty",
    "LoraParam": "lalora.lora",
    "Precision": "lalora.precision",
    "Prior": "lalora.precision",
    "accumulate": "lalora.accumulate",
    "build_estimator": "lalora.curvature",
    "continual_metrics": "lalora.metrics",
    "load_precision": "lalora.checkpoint",
    "lora_parameters": "lalora.lora",
    "register_curvature": "lalora.curvature",
    "save_precision": "lalora.checkpoint",
}
"""Where each exported name lives."""

__all__ = [
    "CURVATURES",
    "AccumulationMode",
    "CheckpointError",
    "ContinualMetrics",
    "CurvatureEstimate",
    "CurvatureEstimator",
    "CurvatureMeta",
    "DiagPrecision",
    "KronPrecision",
    "KronTriPrecision",
    "LaplacePenalty",
    "LoraParam",
    "Precision",
    "Prior",
    "accumulate",
    "build_estimator",
    "continual_metrics",
    "load_precision",
    "lora_parameters",
    "register_curvature",
    "save_precision",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'lalora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULES[name]), name)
    globals()[name] = value
    return value
