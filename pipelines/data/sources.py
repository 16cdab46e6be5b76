"""Domain data: load through ``datasets`` and fix the train / eval / curvature splits.

Every source goes through ``datasets.load_dataset``: a hub id, a local file, or a built-in
generator whose rows are first written to a JSONL file under the run's data directory (the
same path a user's own JSONL takes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import DataSource, DomainConfig, GeneratorSource, HubSource, LocalSource
from pipelines.config.formats import RowFormat
from pipelines.data.generators import GENERATORS
from pipelines.data.presets import Converter, RowError, converter
from pipelines.errors import BadInput
from pipelines.workspace import sha256_json, write_text_atomic


class DataError(BadInput):
    """Domain data that cannot be used, with what to fix."""


@dataclass
class DomainSplits:
    """Rows are dicts with ``prompt`` and ``answer`` (and, for multiple choice, ``choices`` and ``label``)."""

    name: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    curvature: list[dict[str, Any]]
    fingerprint: str
    """sha256 over the rows of all splits: changes whenever the data does."""
    val: list[dict[str, Any]] = field(default_factory=list)
    """Validation rows (``val_size``): what lambda auto scores its trials on; none unless set."""


_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_CHUNK = 1000


def _load_source(src: DataSource, domain: str, seed: int, data_dir: Path, file_stem: str) -> Any:
    """One source as a ``datasets.Dataset``; generated rows go through a JSONL file like a user's own."""
    import datasets

    datasets.disable_progress_bars()
    if isinstance(src, GeneratorSource):
        rows = GENERATORS[src.name](src, seed)
        path = data_dir / f"{file_stem}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not path.is_file() or path.read_text() != text:
            write_text_atomic(path, text)
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if isinstance(src, LocalSource):
        path = Path(src.path)
        if not path.is_file():
            raise DataError(f"domain {domain}: data file {path} not found (data.path is relative to the config file)")
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"domain {domain}: {path.name} has an unsupported extension; use one of {', '.join(_FORMATS)}"
            )
        if _is_empty(path, fmt):
            raise DataError(f"domain {domain}: data file {path} is empty; add rows or point data.path at another file")
        try:
            return datasets.load_dataset(fmt, data_files={src.split: str(path)}, split=src.split)
        except Exception as e:  # pyarrow / pandas parse errors have many types; one line names the file and cause
            if "corresponds to no data" in str(e):  # e.g. a CSV holding only its header
                raise DataError(f"domain {domain}: the data has no rows; check data.path / data.split") from None
            cause = f" ({_first_line(e.__cause__)})" if e.__cause__ else ""
            raise DataError(f"domain {domain}: cannot read {path.name} as {fmt}: {_first_line(e)}{cause}") from None
    assert isinstance(src, HubSource)
    try:
        return datasets.load_dataset(src.id, src.name, split=src.split)
    except (OSError, ValueError, KeyError) as e:  # not found, unreachable (ConnectionError), bad split or config
        config = f" config {src.name!r}" if src.name else ""
        raise DataError(
            f"domain {domain}: cannot load dataset {src.id!r}{config} split {src.split!r}: {_first_line(e)}"
        ) from None


def _is_empty(path: Path, fmt: str) -> bool:
    """No bytes, only whitespace, or a parquet file of zero rows (datasets fails on those with a vague error)."""
    if path.stat().st_size == 0:
        return True
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    if path.stat().st_size < 4096:
        return not path.read_text(errors="replace").strip()
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def _checked_converter(ds: Any, fmt: RowFormat, domain: str) -> Converter:
    """The format's converter, after checking that the data has rows and every column it reads."""
    if len(ds) == 0:
        raise DataError(f"domain {domain}: the data has no rows; check data.path / data.split")
    try:
        convert, needed = converter(fmt)
    except RowError as e:
        raise DataError(f"domain {domain}: {e}") from None
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        how = (
            f"preset {fmt.preset} reads {', '.join(needed)}"
            if fmt.preset
            else "set prompt_field / answer_field (or the templates, choices_field, label_field)"
        )
        raise DataError(
            f"domain {domain}: column(s) {', '.join(missing)} not in the data (columns: "
            f"{', '.join(ds.column_names)}); {how}"
        )
    return convert


def _rows(ds: Any, fmt: RowFormat, domain: str, seed: int, limit: int | None) -> list[dict[str, Any]]:
    """Shuffle (seeded) and convert records to rows until ``limit`` rows; skipped records do not count."""
    convert = _checked_converter(ds, fmt, domain)
    ds = ds.shuffle(seed=seed)
    out: list[dict[str, Any]] = []
    for start in range(0, len(ds), _CHUNK):
        chunk = ds[start : start + _CHUNK]
        for i in range(len(chunk[ds.column_names[0]])):
            record = {c: chunk[c][i] for c in ds.column_names}
            try:
                row = convert(record)
            except RowError as e:
                raise DataError(f"domain {domain}: row {start + i} (after the shuffle): {e}") from None
            except Exception as e:  # a template reading a missing key, a wrong type in a column
                raise DataError(
                    f"domain {domain}: row {start + i} (after the shuffle) cannot be formatted: {_first_line(e)}"
                ) from None
            if row is not None:
                out.append(row)
                if limit is not None and len(out) >= limit:
                    return out
    return out


def load_rows(cfg: DomainConfig, data_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """Every usable row of a domain's ``data``, shuffled (seeded), with their fingerprint; no splits."""
    rows = _rows(
        _load_source(cfg.data, cfg.name, cfg.split_seed, data_dir, cfg.name),
        cfg,
        cfg.name,
        cfg.split_seed,
        cfg.train_size,
    )
    if not rows:
        raise DataError(f"{cfg.name}: no usable rows (every record was skipped)")
    return rows, sha256_json(rows, sort_keys=False)  # the data fingerprint as lineages recorded it


def load_domain(cfg: DomainConfig, data_dir: Path, *, eval_only: bool = False) -> DomainSplits:
    """Load a domain and fix its splits: eval first, then validation (``val_size``, when set), train the rest,
    curvature a prefix of train (the Laplace approximation is of the training posterior) of ``curvature_rows``.

    With ``eval_data`` the evaluation rows come from that source, and the validation and training rows from
    ``data``. ``eval_only`` (probes, scoring) loads only what evaluation and validation need and accepts
    fewer rows than ``eval_size``.
    """
    val_size = cfg.val_size or 0
    if cfg.eval_data is None:
        ds = _load_source(cfg.data, cfg.name, cfg.split_seed, data_dir, cfg.name)
        _checked_converter(ds, cfg, cfg.name)
        held = cfg.eval_size + val_size
        if not eval_only and 0 < len(ds) <= held:
            raise DataError(
                f"domain {cfg.name}: {len(ds)} rows cannot give eval_size={cfg.eval_size}"
                f"{f', val_size={val_size}' if val_size else ''} and a training split; lower "
                f"{'them' if val_size else 'eval_size'} or add data"
            )
        limit = held if eval_only else (held + cfg.train_size if cfg.train_size else None)
        rows = _rows(ds, cfg, cfg.name, cfg.split_seed, limit)
        eval_rows, val_rows, train_rows = rows[: cfg.eval_size], rows[cfg.eval_size : held], rows[held:]
        if not eval_only and not train_rows:
            raise DataError(
                f"domain {cfg.name}: only {len(rows)} usable rows, none left for training after "
                f"eval_size={cfg.eval_size}{f' and val_size={val_size}' if val_size else ''}; lower "
                "eval_size or add data"
            )
    else:
        eval_ds = _load_source(cfg.eval_data.data, cfg.name, cfg.split_seed, data_dir, f"{cfg.name}.eval")
        eval_rows = _rows(eval_ds, cfg.eval_data, cfg.name, cfg.split_seed, cfg.eval_size)
        limit = val_size if eval_only else (val_size + cfg.train_size if cfg.train_size else None)
        rows = (
            []
            if eval_only and not val_size
            else _rows(
                _load_source(cfg.data, cfg.name, cfg.split_seed, data_dir, cfg.name),
                cfg,
                cfg.name,
                cfg.split_seed,
                limit,
            )
        )
        val_rows, train_rows = rows[:val_size], [] if eval_only else rows[val_size:]
    if not eval_rows:
        raise DataError(f"domain {cfg.name}: no usable evaluation rows (every record was skipped)")
    if not eval_only and not train_rows:
        raise DataError(f"domain {cfg.name}: no usable training rows (every record was skipped)")
    if val_size and not val_rows:
        raise DataError(
            f"domain {cfg.name}: no rows left for val_size={val_size} after eval_size={cfg.eval_size}; "
            "add data or lower eval_size"
        )
    if cfg.chat_template != "never":
        eval_rows, val_rows, train_rows = (
            [{**r, "chat": cfg.chat_template} for r in rows] for rows in (eval_rows, val_rows, train_rows)
        )
    curvature_rows = train_rows[: cfg.curvature_rows]
    digest = sha256_json([eval_rows, train_rows, *([val_rows] if val_size else [])], sort_keys=False)  # as recorded
    return DomainSplits(cfg.name, train_rows, eval_rows, curvature_rows, digest, val_rows)
