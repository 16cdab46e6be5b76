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
        return self.root / "stages" / f"{index:02d}-{domain}"

    @property
    def init_adapter(self) -> Path:
        return self.root / "stages" / "00-init" / "adapter"


def write_dir_atomic(target: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling directory with ``write`` and rename it onto ``target``.

    A crash leaves either the previous ``target`` or the new one, never a half-written one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
    return target


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
