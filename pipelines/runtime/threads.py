"""The process's compute resources around a stage: torch's thread count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (None: leave torch's setting), then restore it.

    The thread count can decide how a CPU kernel splits a floating-point reduction (which kernels do
    depends on the torch build and the shapes); a run that pins it gives the same numbers on any machine
    of the same kind, whatever its core count.
    """
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
