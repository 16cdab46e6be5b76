"""One run per lineage at a time: a lock file that names its holder and survives a crashed one.

The lock is a small JSON file (pid, hostname, start time, command) created with
``O_CREAT | O_EXCL``, so exactly one process wins. A second run refuses in one line naming the
holder, or waits for it. A lock left by a dead process on this host (SIGKILL, power loss) is
taken over with a warning; a lock held from another host is never broken automatically.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


def lock_paths(out_dir: str | os.PathLike[str], registry_uri: str | None, registered_model: str) -> list[Path]:
    """The output directory's lock, and one keyed by the registry and model name when the registry is shared
    (an explicit tracking URI): two output directories then still cannot write the same model at once."""
    paths = [Path(out_dir) / LOCK_NAME]
    if registry_uri:
        key = hashlib.sha256(f"{registry_uri}\n{registered_model}".encode()).hexdigest()[:24]
        root = Path(os.environ.get("LALORA_LOCK_DIR") or Path.home() / ".cache" / "lalora" / "locks")
        paths.append(root / f"{key}.lock")
    return paths


_held: set[Path] = set()
"""Lock paths this process holds (Prefect may run the flow body in another thread than the CLI's)."""


@contextlib.contextmanager
def hold(paths: list[Path], wait: bool = False) -> Iterator[None]:
    """Hold every lock in ``paths`` (in order) for the block; released on any exit but SIGKILL.

    Reentrant within a process: a path this process already holds (the CLI holds the lineage, then
    the flow asks again) is not taken twice. Another process waits or refuses. (Scheduled runs
    each get their own process from Prefect's runner.)
    """
    locks: list[LineageLock] = []
    try:
        for p in paths:
            key = Path(p).resolve()
            if key in _held:
                continue
            lock = LineageLock(p)
            lock.acquire(wait=wait)
            locks.append(lock)
            _held.add(key)
        yield
    finally:
        for lock in reversed(locks):
            lock.release()
            _held.discard(lock.path.resolve())
