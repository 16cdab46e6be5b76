"""LaLoRA: LoRA fine-tuning with a Laplace-approximation penalty on the LoRA weights.

This package is the method only: curvature estimators, precision values, the penalty,
curvature checkpoints and continual-learning metrics. It depends on torch (and safetensors
for checkpoints) and never on orchestration, tracking or data-loading frameworks.
"""

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
