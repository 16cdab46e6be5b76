"""Where a stage's wall time goes: the pipelines work inside tasks versus everything around it
(Prefect task runs, MLflow runs, logging, registry). Kept per MLflow run id, in this process."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_compute: dict[str, float] = defaultdict(float)
_tracking: dict[str, float] = defaultdict(float)


@contextmanager
def compute(run_id: str) -> Iterator[None]:
    """Time the pipelines call a task wraps."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        with _lock:
            _compute[run_id] += time.perf_counter() - t0


@contextmanager
def tracking(run_id: str) -> Iterator[None]:
    """Time an MLflow call made from inside a pipelines call (it is overhead, not compute)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        with _lock:
            _tracking[run_id] += time.perf_counter() - t0


def compute_seconds(run_id: str) -> float:
    with _lock:
        return _compute.pop(run_id, 0.0) - _tracking.pop(run_id, 0.0)
