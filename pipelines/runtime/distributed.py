"""torch.distributed around the code that needs it, as a context that leaves the process as it found it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_RANK_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
"""A single local rank's environment (DeepSpeed reads LOCAL_RANK outside the group's creation too)."""


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def distributed() -> Iterator[tuple[int, int]]:
    """torch.distributed for DeepSpeed around a block; yields (rank, world size).

    Under the deepspeed launcher, its ranks (their environment is the launcher's). Otherwise one
    local rank (gloo, or nccl on a GPU): the single-rank environment DeepSpeed reads (RANK,
    WORLD_SIZE, LOCAL_RANK) is set for the block and restored after it; the rendezvous
    (MASTER_ADDR / MASTER_PORT, a free port) only while the group is created, so a child process
    never inherits this process's port. The group, once made, stays for the process's later
    engines: DeepSpeed caches its groups, and a destroyed one would break the next engine.
    """
    import deepspeed

    dist = torch.distributed
    if ("WORLD_SIZE" in os.environ and "MASTER_PORT" in os.environ) or (dist.is_initialized() and world()[1] > 1):
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend=_backend(), verbose=False)
        yield world()
        return
    saved = {k: os.environ.get(k) for k in _RANK_ENV}
    os.environ.update(_RANK_ENV)
    try:
        if not dist.is_initialized():
            rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
            before = {k: os.environ.get(k) for k in rendezvous}
            os.environ.update(rendezvous)
            try:
                deepspeed.init_distributed(dist_backend=_backend(), verbose=False)
            finally:
                _restore(before)
        yield world()
    finally:
        _restore(saved)


def shutdown() -> None:
    """End a launched rank's part in the process group: wait for every rank, then destroy the group.

    Called by each rank of a launched job after its work (and rank 0's result) is done, never in the
    in-process path, whose group stays for the process's later engines. Without it a rank exits with
    gloo's worker threads alive, and the last collective's work object may be released by such a thread
    while the interpreter finalizes: releasing its tensors takes the GIL, which a finalizing interpreter
    answers with ``pthread_exit``; the forced unwind crosses a ``noexcept`` destructor
    (``ProcessGroupGloo::AsyncWork::~AsyncWork``) and the C++ runtime calls ``std::terminate``
    ("terminate called without an active exception", SIGABRT, the launcher's exit 250). The barrier makes
    every rank's last collective complete before any rank leaves; destroying the group joins gloo's
    threads (NCCL: aborts its communicators) while the interpreter is whole. DeepSpeed's own call is
    used so that its cached group references go too.
    """
    import deepspeed.comm as ds_comm

    dist = torch.distributed
    if not dist.is_initialized():
        return
    dist.barrier()
    ds_comm.destroy_process_group()


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _restore(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
