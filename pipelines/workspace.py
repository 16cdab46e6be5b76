"""Where a lineage run keeps its files; the one way a file or directory is written atomically
(``move_into_place`` and the writers on it) and the one way contents are hashed (``sha256_json``,
``sha256_text``, ``tree_sha256``)."""

from __future__ import annotations

import hashlib
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


@dataclass(frozen=True)
class StepPaths:
    """What a step reads and writes."""

    base: str
    """the base model (from_pretrained path or hub id)"""
    anchor: str
    """the adapter the stage starts from"""
    precision: str | None
    """the accumulated precision so far (the curvature step's previous one; the fine-tune step's penalty)"""
    data: str
    out: str
    """the stage's directory"""
    checkpoint: str | None = None
    """the fine-tune step's DeepSpeed checkpoints"""


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


def move_into_place(src: Path, target: Path) -> Path:
    """Put the finished file or directory ``src`` (on ``target``'s filesystem) at ``target``, flushed to disk.

    A crash leaves either the previous ``target`` or the new one, never a half-written one: an existing
    target is exchanged with ``src`` in one rename (renameat2) and its previous contents removed; a new one
    appears by a plain rename.
    """
    if src.is_dir():
        _fsync_tree(src)
    else:
        with open(src, "rb") as f:
            os.fsync(f.fileno())
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and _exchange(src, target):
        _remove(src)  # now holds the previous contents
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():  # no renameat2: a short window where target is absent (old kept beside it)
            os.replace(target, old)
        os.replace(src, target)
        if old.exists():
            _remove(old)
    _fsync_dir(target.parent)
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _scratch(target: Path) -> Path:
    """A temporary sibling of ``target`` (this process's own), emptied."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        _remove(tmp)
    return tmp


def write_dir_atomic(target: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling directory with ``write`` (it receives the path, not yet created) and move it onto
    ``target`` (``move_into_place``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(target)
    write(tmp)
    return move_into_place(tmp, target)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling and move it onto ``path`` (``move_into_place``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(path)
    tmp.write_text(text)
    move_into_place(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_json(value: Any, *, sort_keys: bool = True) -> str:
    """sha256 of ``value``'s JSON. Keys sorted, so equal mappings hash equal; ``sort_keys=False`` only where a
    hash was recorded that way (the data fingerprints), so that recorded lineages keep their hashes."""
    return sha256_text(json.dumps(value, sort_keys=sort_keys))


def tree_sha256(root: Path) -> str:
    """sha256 over a directory's files: their paths relative to ``root`` and their contents."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()
