"""Curvature estimators, one final class per structure, chosen by ``kind``."""

from lalora.curvature import diag as _diag  # noqa: F401  (registers "diag")
from lalora.curvature import identity as _identity  # noqa: F401  (registers "identity")
from lalora.curvature.base import (
    CURVATURES,
    CurvatureEstimate,
    CurvatureEstimator,
    FisherType,
    build_estimator,
    register_curvature,
)

__all__ = ["CURVATURES", "CurvatureEstimate", "CurvatureEstimator", "FisherType", "build_estimator", "register_curvature"]
