"""One run per lineage at a time: a lock file that names its holder and survives a crashed one.

The lock is a small JSON file (pid, hostname, start time, command) created with
``O_CREAT | O_EXCL``, so exactly one process wins. A second run refuses in one line naming the
holder, or waits for it. A lock left by a dead process on this host (SIGKILL, power loss) is
taken over with a warning; a lock held from another host is never broken automatically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".lalora.lock"


class LockHeld(RuntimeError):
    """Another live run holds the lineage."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: float
    command: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} since {when} ({self.command})"


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> Holder | None:
    try:
        raw = json.loads(path.read_text())
        return Holder(int(raw["pid"]), str(raw["host"]), float(raw["started"]), str(raw.get("command", "")))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        # Half-written by a holder killed between open and write: treat as a dead holder on this host.
        return Holder(-1, socket.gethostname(), 0.0, "unreadable lock file")


class LineageLock:
    """Exclusive hold of ``path``; ``acquire`` raises LockHeld naming the holder unless ``wait``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.me = Holder(os.getpid(), socket.gethostname(), time.time(), " ".join(sys.argv[:4]) or "python")
        self.held = False
        self.key = str(self.path.resolve())

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me.__dict__, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _break_if_stale(self) -> Holder | None:
        """Remove the lock if its holder is a dead process on this host; return the live holder otherwise."""
        guard = self.path.with_name(self.path.name + ".guard")
        with open(guard, "a") as g:  # serialises take-overs, so two waiters never both break the same lock
            fcntl.flock(g.fileno(), fcntl.LOCK_EX)
            holder = _read(self.path)
            if holder is None:
                return None
            if holder.host != socket.gethostname() or (holder.pid > 0 and process_alive(holder.pid)):
                return holder
            log.warning("taking over the lineage lock %s from a dead run (%s)", self.path, holder.describe())
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return None

    def acquire(self, wait: bool = False, poll: float = 1.0, timeout: float | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        announced = False
        while True:
            if self._try_create():
                self.held = True
                return
            holder = self._break_if_stale()
            if holder is None:
                continue
            if not wait or (deadline is not None and time.monotonic() > deadline):
                raise LockHeld(f"lineage is locked by another run: {holder.describe()}; lock file {self.path} "
                               "(wait for it with --wait; delete the file only if that run is gone)")
            if not announced:
                print(f"lalora: waiting for the run holding {self.path}: {holder.describe()}", file=sys.stderr)
                announced = True
            time.sleep(poll)

    def release(self) -> None:
        if not self.held:
            return
        holder = _read(self.path)
        if holder is not None and (holder.pid, holder.host, holder.started) == (self.me.pid, self.me.host, self.me.started):
            self.path.unlink()
        self.held = False

    def __enter__(self) -> LineageLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_paths(out_dir: str | os.PathLike[str]) -> list[Path]:
    """The output directory's lock: two runs never write one output directory at once. (Writers of one
    registered model from several output directories or hosts are kept apart by the store's lease,
    flows/lease.py.)"""
    return [Path(out_dir) / LOCK_NAME]


_held: dict[str, Any] = {}
"""The locks this process holds, by key (Prefect may run the flow body in another thread than the CLI's)."""


@contextlib.contextmanager
def hold(locks: list[Any], wait: bool = False) -> Iterator[list[Any]]:
    """Hold every lock in ``locks`` (paths of lock files, or objects with ``key``, ``acquire`` and
    ``release``, in order) for the block; yields the live locks; released on any exit but SIGKILL.

    Reentrant within a process: a lock this process already holds (the CLI holds the lineage, then
    the flow asks again) is not taken twice, and the live one is yielded. Another process waits or
    refuses. (Scheduled runs each get their own process from Prefect's runner.)
    """
    taken: list[Any] = []
    live: list[Any] = []
    try:
        for lock in locks:
            if isinstance(lock, (str, os.PathLike)):
                lock = LineageLock(lock)
            if lock.key in _held:
                live.append(_held[lock.key])
                continue
            lock.acquire(wait=wait)
            taken.append(lock)
            _held[lock.key] = lock
            live.append(lock)
        yield live
    finally:
        for lock in reversed(taken):
            lock.release()
            _held.pop(lock.key, None)
