"""How the curvature of successive domains combines into one precision."""

from __future__ import annotations

from typing import Literal

from lalora.precision import Precision

AccumulationMode = Literal["sum", "online", "replace"]


def accumulate(previous: Precision | None, new: Precision, mode: AccumulationMode, gamma: float = 1.0) -> Precision:
    """Lambda_t = gamma * Lambda_{t-1} + F_t, as a new value.

    - ``sum``: gamma = 1, the recursive Laplace approximation (all domains count fully);
    - ``online``: gamma in [0, 1], online EWC (Schwarz et al. 2018), older domains fade;
    - ``replace``: only the newest domain's curvature.

    The prior precision is not part of the accumulated value: it is added once when the
    penalty is built, so it neither grows with the number of domains nor decays with gamma.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if previous is None or mode == "replace":
        return new
    if mode == "sum":
        return previous + new
    if mode == "online":
        return previous.scale(gamma) + new
    raise ValueError(f"unknown accumulation mode {mode!r}; expected one of sum, online, replace")
