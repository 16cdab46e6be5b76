"""What a user sets of each curvature structure, with no torch: the config (``pipelines/config``) reads the
fields' defaults, descriptions and bounds from here, so loading a config imports no estimator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FisherType = Literal["empirical", "mc"]


@dataclass(frozen=True)
class FisherSettings:
    """What a user sets of a curvature estimated from data: the keyword arguments of its estimator, and the
    fields the config's ``lalora.curvature`` section has beside ``kind``."""

    fisher_type: FisherType = field(
        default="empirical",
        metadata={"doc": "empirical: observed labels; mc: labels sampled from the model (the 'true' Fisher)."},
    )
    mc_samples: int = field(default=1, metadata={"doc": "Label draws per sequence for fisher_type mc.", "ge": 1})


@dataclass(frozen=True)
class KronSettings(FisherSettings):
    """The Kronecker structures' settings: the Fisher's, and how the large factors are stored."""

    top_k: int = field(
        default=32,
        metadata={"doc": "Eigenpairs kept of each large (d x d) factor, plus its diagonal (our default).", "ge": 1},
    )
    max_terms: int = field(
        default=4,
        metadata={
            "doc": "Kronecker terms kept per matrix across domains before the two "
            "oldest merge into their nearest Kronecker product.",
            "ge": 1,
        },
    )


@dataclass(frozen=True)
class NoSettings:
    """The identity reads no data: there is nothing to set."""


SETTINGS: dict[str, type] = {
    "diag": FisherSettings,
    "kfac": KronSettings,
    "kfac-tri": KronSettings,
    "identity": NoSettings,
}
"""Each built-in kind's settings (each estimator declares the same class: tests/lalora/test_curvature.py)."""
