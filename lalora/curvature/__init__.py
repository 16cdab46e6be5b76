"""Curvature estimators, one final class per structure, chosen by ``kind``.

The package loads its estimators (and torch) when one of its names is first read, not when it is imported:
``lalora.curvature.settings``, which the config reads, stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lalora.curvature.base import (
        CURVATURES,
        CurvatureEstimate,
        CurvatureEstimator,
        MemoryEstimate,
        build_estimator,
        register_curvature,
    )
    from lalora.curvature.settings import FisherType

__all__ = [
    "CURVATURES",
    "CurvatureEstimate",
    "CurvatureEstimator",
    "FisherType",
    "MemoryEstimate",
    "build_estimator",
    "register_curvature",
]

BUILTIN = ("diag", "kfac", "kfac_tri", "identity")
"""The built-in structures' modules, registered in this order (the structures, then the baseline)."""


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'lalora.curvature' has no attribute {name!r}")
    for module in BUILTIN:  # registers "diag", "kfac", "kfac-tri", "identity"
        importlib.import_module(f"lalora.curvature.{module}")
    base = importlib.import_module("lalora.curvature.base")
    value = getattr(base, name)
    globals()[name] = value
    return value
