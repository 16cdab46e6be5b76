"""Orchestration: the Prefect flows and tasks, MLflow runs and registry, the command line."""

from __future__ import annotations

from typing import Any

DISTRIBUTION = "lalora-pipelines"


def version() -> str:
    """The installed distribution's version: pyproject.toml's ``version`` is its one source."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed(DISTRIBUTION)
    except PackageNotFoundError:  # imported from a checkout that was never installed
        return "unknown (not installed)"


def __getattr__(name: str) -> Any:  # ``flows.__version__``, read when asked, not at import time
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
