"""The tiny model and stage config of the launch tests (the same as benchmarks/launch_soak.py's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("launch_soak", ROOT / "benchmarks" / "launch_soak.py")
assert _spec is not None and _spec.loader is not None
_soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_soak)
CONFIG = _soak.CONFIG


def tiny_base(root: Path) -> tuple[str, str]:
    """(base path, initial adapter path) of the soak's tiny model under ``root``."""
    return _soak.tiny_base(root)
