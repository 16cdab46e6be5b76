"""Curvature estimators, one final class per structure, chosen by ``kind``."""

# Registered in this order (the config's kinds and its error messages list them so): the structures, then the baseline.
# isort: off
from lalora.curvature import diag as _diag  # noqa: F401  (registers "diag")
from lalora.curvature import kfac as _kfac  # noqa: F401  (registers "kfac")
from lalora.curvature import kfac_tri as _kfac_tri  # noqa: F401  (registers "kfac-tri")
from lalora.curvature import identity as _identity  # noqa: F401  (registers "identity")
# isort: on
from lalora.curvature.base import (
    CURVATURES,
    CurvatureEstimate,
    CurvatureEstimator,
    FisherType,
    MemoryEstimate,
    build_estimator,
    register_curvature,
)

__all__ = ["CURVATURES", "CurvatureEstimate", "CurvatureEstimator", "FisherType", "MemoryEstimate", "build_estimator",
           "register_curvature"]
