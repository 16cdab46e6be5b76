"""One run per lineage at a time: a kernel lock on a file that names its holder.

The lock is ``fcntl.flock`` on the lock file, held as long as the holder's file descriptor is open: the
kernel releases it when the holder exits or dies (SIGKILL, a container recreated under a new hostname),
whatever host the holder ran on, so a lock is never left behind. The JSON in the file (pid, hostname,
start time, command) only says who holds it. A second run refuses in one line naming the holder, or
waits for it, printing the holder once, and gives up after its timeout
(``orchestration.lock_timeout_seconds``).
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
    except (ValueError, KeyError, TypeError):  # the holder is between taking the lock and writing its name
        return Holder(-1, "?", 0.0, "starting")


class LineageLock:
    """Exclusive hold of ``path``; ``acquire`` raises LockHeld naming the holder unless ``wait``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.me = Holder(os.getpid(), socket.gethostname(), time.time(), " ".join(sys.argv[:4]) or "python")
        self.fd: int | None = None
        self.key = str(self.path.resolve())

    @property
    def held(self) -> bool:
        return self.fd is not None

    def _try_lock(self) -> bool:
        """Take the kernel lock on the file now at ``path`` (never on one a releasing holder just unlinked)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder unlinked it between our open and our lock: take the new file
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self.me.__dict__).encode())
        os.fsync(fd)
        self.fd = fd
        return True

    def acquire(self, wait: bool = False, poll: float = 1.0, timeout: float | None = None) -> None:
        """Hold the lock; with ``wait``, wait for the holder at most ``timeout`` seconds (None: no limit)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        announced = False
        while not self._try_lock():
            holder = _read(self.path) or Holder(-1, "?", 0.0, "releasing")
            if not wait:
                raise LockHeld(
                    f"lineage is locked by another run: {holder.describe()}; lock file {self.path} "
                    "(wait for it with --wait)"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise LockHeld(
                    f"gave up after {timeout:g} s waiting for the run holding {self.path}: "
                    f"{holder.describe()} (orchestration.lock_timeout_seconds)"
                )
            if not announced:
                print(f"lalora: waiting for the run holding {self.path}: {holder.describe()}", file=sys.stderr)
                announced = True
            time.sleep(poll)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:  # ours, not a file someone made meanwhile
                self.path.unlink()  # while still locked: a waiter that opened this file sees it is gone
        os.close(self.fd)
        self.fd = None

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
def hold(locks: list[Any], wait: bool = False, timeout: float | None = None) -> Iterator[list[Any]]:
    """Hold every lock in ``locks`` (paths of lock files, or objects with ``key``, ``acquire`` and
    ``release``, in order) for the block; yields the live locks; released on any exit but SIGKILL.

    Reentrant within a process: a lock this process already holds (the CLI holds the lineage, then
    the flow asks again) is not taken twice, and the live one is yielded. Another process waits or
    refuses; a waiter gives up after ``timeout`` seconds for each lock. (Scheduled runs each get their own
    process from Prefect's runner.)
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
            lock.acquire(wait=wait, timeout=timeout)
            taken.append(lock)
            _held[lock.key] = lock
            live.append(lock)
        yield live
    finally:
        for lock in reversed(taken):
            lock.release()
            _held.pop(lock.key, None)
