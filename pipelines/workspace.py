"""Where a lineage run keeps its files, and writing directories atomically."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Workspace:
    """The output directory of one lineage run."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def base(self) -> Path:
        return self.root / "base"

    def stage(self, index: int, domain: str) -> Path:
        from pipelines.safety import contained

        return contained(self.root, "stages", f"{index:02d}-{domain}")

    @property
    def init_adapter(self) -> Path:
        return self.root / "stages" / "00-init" / "adapter"


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _fsync_tree(d: Path) -> None:
    for p in sorted(d.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomic(target: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling directory with ``write`` and swap it onto ``target``.

    A crash leaves either the previous ``target`` or the new one, never a half-written one:
    an existing target is exchanged with the new directory in one rename (renameat2); a new
    one appears by a plain rename.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    _fsync_tree(tmp)
    if target.exists() and _exchange(tmp, target):
        shutil.rmtree(tmp)  # now holds the previous contents
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():  # no renameat2: a short window where target is absent (old kept beside it)
            os.replace(target, old)
        os.replace(tmp, target)
        if old.exists():
            shutil.rmtree(old)
    _fsync_dir(target.parent)
    return target


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary sibling, flush it to disk, rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def tree_sha256(root: Path) -> str:
    """sha256 over a directory's files: their paths relative to ``root`` and their contents."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()
