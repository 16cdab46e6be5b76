"""Curvature checkpoints: tensors in safetensors, metadata in JSON, never pickle.

A checkpoint is two files in one directory: ``precision.safetensors`` and
``precision.json``. The JSON carries the structure, Fisher type, sample count, the LoRA
matrix names and shapes, the prior, the accumulation history and the sha256 of the tensor
file. Both are written to temporary names first; renaming the JSON is the commit point. A
crash before it leaves the old checkpoint; a crash after it (before the tensors' rename)
leaves the new JSON and the new tensors under their temporary name, which the loader
recognises by the checksum and moves into place. Never half of each.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from lalora import kron as _kron  # noqa: F401  (registers the Kronecker structures)
from lalora.precision import PRECISIONS, Precision, Prior

FORMAT_VERSION = 1
TENSORS = "precision.safetensors"
META = "precision.json"


class CheckpointError(ValueError):
    """A curvature checkpoint that cannot be used, with the reason in the message."""


class NonFinitePrecision(CheckpointError):
    """A precision holding NaN or inf: the curvature pass diverged, or the file says so."""


def _check_finite(state: dict[str, Tensor], what: str) -> None:
    for name, t in state.items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            bad = int((~t.isfinite()).sum())
            raise NonFinitePrecision(
                f"{what}: {name} has {bad} non-finite value(s) (NaN or inf); the curvature "
                "diverged (check the base model and data, or lower lalora.prior / lambda)"
            )


@dataclass
class CurvatureMeta:
    structure: str
    fisher_type: str
    n_samples: int
    names: list[str]
    shapes: dict[str, list[int]]
    prior: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per accumulated domain: stage, domain, mode, gamma, n_samples, ..."""
    tensors: dict[str, list[int]] = field(default_factory=dict)
    """Every tensor in the safetensors file and its shape (for diag: the matrices themselves)."""
    sha256: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def prior_value(self) -> Prior:
        return Prior(**self.prior)


def file_sha256(path: Path) -> str:
    """What ``sha256sum`` prints for ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_tmp(path: Path, write: Any) -> Path:
    """``write`` to a temporary sibling of ``path``, flushed to disk; returns the temporary path."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    return tmp


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_precision(
    directory: str | os.PathLike[str],
    precision: Precision,
    *,
    fisher_type: str,
    n_samples: int,
    prior: Prior,
    history: list[dict[str, Any]] | None = None,
) -> CurvatureMeta:
    """Write ``precision`` to ``directory`` and return the metadata written beside it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Cloned: structures may share a factor between terms (safetensors refuses shared storage).
    state = {k: v.detach().cpu().contiguous().clone() for k, v in precision.to_state_dict().items()}
    _check_finite(state, f"refusing to save the {precision.structure} precision to {d}")
    tensors_tmp = _write_tmp(
        d / TENSORS, lambda p: save_file(state, str(p), metadata={"structure": precision.structure})
    )
    meta = CurvatureMeta(
        structure=precision.structure,
        fisher_type=fisher_type,
        n_samples=int(n_samples),
        names=precision.names,
        shapes={n: list(s) for n, s in precision.shapes.items()},
        prior={"tau_A": prior.tau_A, "tau_B": prior.tau_B},
        history=list(history or []),
        tensors={k: list(v.shape) for k, v in state.items()},
        sha256=file_sha256(tensors_tmp),
    )
    meta_tmp = _write_tmp(d / META, lambda p: p.write_text(json.dumps(asdict(meta), indent=2)))
    os.replace(meta_tmp, d / META)  # the commit point: from here the new checkpoint is the checkpoint
    os.replace(tensors_tmp, d / TENSORS)
    _fsync_dir(d)
    return meta


def _roll_forward(d: Path, meta: CurvatureMeta) -> str | None:
    """After a crash between the two renames: move the committed tensors into place; their sha256, or None."""
    for pending in sorted(d.glob(f".{TENSORS}.tmp-*")):
        digest = file_sha256(pending)
        if digest == meta.sha256:
            try:
                os.replace(pending, d / TENSORS)
            except OSError:
                return None  # a read-only copy: leave it, the checksum error stands
            return digest
    return None


def read_meta(directory: str | os.PathLike[str]) -> CurvatureMeta:
    """The metadata of a checkpoint, validated for form (not yet against any adapter)."""
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"no curvature checkpoint at {directory}: {META} is missing")
    try:
        raw = json.loads(path.read_text())
        meta = CurvatureMeta(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"curvature metadata {path} is unreadable: {e}") from None
    if meta.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"curvature checkpoint format {meta.format_version} is not supported (expected {FORMAT_VERSION})"
        )
    if meta.structure not in PRECISIONS:
        raise CheckpointError(f"curvature checkpoint has unknown structure {meta.structure!r}")
    return meta


def verify(directory: str | os.PathLike[str]) -> CurvatureMeta:
    """The metadata of a checkpoint whose tensor file matches its checksum (a crash between the two
    renames rolled forward); raises CheckpointError otherwise. Reads no tensors."""
    d = Path(directory)
    meta = read_meta(d)
    tensors = d / TENSORS
    digest = file_sha256(tensors) if tensors.is_file() else ""
    if digest != meta.sha256:
        digest = _roll_forward(d, meta) or digest
    if not tensors.is_file():
        raise CheckpointError(f"curvature checkpoint {d} has metadata but no {TENSORS}")
    if digest != meta.sha256:
        raise CheckpointError(
            f"curvature checkpoint {tensors} fails its checksum (sha256 {digest[:12]}..., "
            f"metadata says {meta.sha256[:12]}...): the file was modified or is corrupt"
        )
    return meta


def load_precision(
    directory: str | os.PathLike[str], expected_shapes: dict[str, tuple[int, ...]] | None = None
) -> tuple[Precision, CurvatureMeta]:
    """Load a checkpoint, verifying its checksum, and its names and shapes against an adapter.

    ``expected_shapes`` maps each LoRA matrix name of the adapter the precision will be
    used with to its shape; each disagreement raises CheckpointError naming it.
    """
    d = Path(directory)
    meta = verify(d)
    tensors = d / TENSORS
    try:
        state: dict[str, Tensor] = load_file(str(tensors))
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"curvature checkpoint {tensors} is not a valid safetensors file: {e}") from None
    _check_finite(state, f"curvature checkpoint {tensors}")
    listed = meta.tensors or meta.shapes
    if sorted(state) != sorted(listed):
        raise CheckpointError(f"curvature checkpoint {d}: tensor names do not match its metadata")
    for name, t in state.items():
        if list(t.shape) != listed[name]:
            raise CheckpointError(
                f"curvature checkpoint {d}: {name} has shape {list(t.shape)}, metadata says {listed[name]}"
            )
    try:
        precision = PRECISIONS[meta.structure].from_state_dict(state)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"curvature checkpoint {d} does not form a {meta.structure} precision: {e}") from None
    if {n: list(s) for n, s in precision.shapes.items()} != meta.shapes:
        raise CheckpointError(f"curvature checkpoint {d}: its tensors describe other LoRA matrices than its metadata")
    matrices = precision.shapes
    if expected_shapes is not None:
        missing = [n for n in expected_shapes if n not in matrices]
        if missing:
            raise CheckpointError(
                f"curvature checkpoint {d} lacks {len(missing)} LoRA matrices of the adapter, "
                f"e.g. {missing[0]} (was it computed for another adapter or target_modules?)"
            )
        extra = [n for n in matrices if n not in expected_shapes]
        if extra:
            raise CheckpointError(
                f"curvature checkpoint {d} has {len(extra)} LoRA matrices the adapter lacks, e.g. {extra[0]}"
            )
        for name, shape in expected_shapes.items():
            if tuple(matrices[name]) != tuple(shape):
                raise CheckpointError(
                    f"curvature checkpoint {d}: shape mismatch for {name}: checkpoint "
                    f"{tuple(matrices[name])}, adapter {tuple(shape)} (another LoRA rank?)"
                )
    return precision, meta
