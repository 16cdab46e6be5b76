"""Domain data: load through ``datasets``, split, tokenize with prompt masking, batch.

Every source goes through ``datasets.load_dataset``: a hub id, a local file, or a built-in
generator whose rows are first written to a JSONL file under the run's data directory (the
same path a user's own JSONL takes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipelines.config import DomainConfig, GeneratorSource, HubSource, LocalSource
from pipelines.generators import GENERATORS


class DataError(ValueError):
    """Domain data that cannot be used, with what to fix."""


@dataclass
class DomainSplits:
    """Rows are dicts with ``prompt`` and ``answer``."""

    name: str
    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    curvature: list[dict[str, str]]
    fingerprint: str
    """sha256 over the rows of all splits: changes whenever the data does."""


_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _load_rows(cfg: DomainConfig, data_dir: Path) -> Any:
    import datasets

    datasets.disable_progress_bars()
    src = cfg.data
    if isinstance(src, GeneratorSource):
        rows = GENERATORS[src.name](src, cfg.split_seed)
        path = data_dir / f"{cfg.name}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not path.is_file() or path.read_text() != text:
            data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if isinstance(src, LocalSource):
        path = Path(src.path)
        if not path.is_file():
            raise DataError(f"domain {cfg.name}: data file {path} not found (data.path is relative to the config file)")
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"domain {cfg.name}: {path.name} has an unsupported extension; use one of {', '.join(_FORMATS)}")
        return datasets.load_dataset(fmt, data_files={src.split: str(path)}, split=src.split)
    assert isinstance(src, HubSource)
    try:
        return datasets.load_dataset(src.id, src.name, split=src.split)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"domain {cfg.name}: cannot load dataset {src.id!r} split {src.split!r}: {e}") from None


def load_domain(cfg: DomainConfig, data_dir: Path, default_curvature: int) -> DomainSplits:
    """Load a domain and fix its splits: eval first, train the rest, curvature a prefix of train."""
    ds = _load_rows(cfg, data_dir)
    missing = [f for f in (cfg.prompt_field, cfg.answer_field) if f not in ds.column_names]
    if missing:
        raise DataError(f"domain {cfg.name}: column(s) {', '.join(missing)} not in the data (columns: "
                        f"{', '.join(ds.column_names)}); set prompt_field / answer_field")
    if len(ds) <= cfg.eval_size:
        raise DataError(f"domain {cfg.name}: {len(ds)} rows cannot give eval_size={cfg.eval_size} and a training "
                        "split; lower eval_size or add data")
    ds = ds.shuffle(seed=cfg.split_seed)
    rows = [{"prompt": str(p), "answer": str(a)} for p, a in zip(ds[cfg.prompt_field], ds[cfg.answer_field])]
    eval_rows, train_rows = rows[: cfg.eval_size], rows[cfg.eval_size :]
    curvature_rows = train_rows[: cfg.curvature_size or default_curvature]
    digest = hashlib.sha256(json.dumps([eval_rows, train_rows]).encode()).hexdigest()
    return DomainSplits(cfg.name, train_rows, eval_rows, curvature_rows, digest)


# --- tokenization -----------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """-100 on BOS and prompt tokens: only the answer and EOS carry loss."""


def special_ids(tokenizer: Any) -> tuple[int | None, int, int]:
    """(bos, eos, pad); pad falls back to eos, which is always masked in labels."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set one (tokenizer.eos_token) so answers can end")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return tokenizer.bos_token_id, eos, pad


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    bos, _, _ = special_ids(tokenizer)
    return ([bos] if bos is not None else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode(tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> list[Encoded]:
    """Prompt and answer tokenized apart and joined, so the label mask is exact; truncated to max_length."""
    _, eos, _ = special_ids(tokenizer)
    answers = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    out = []
    for r, ans in zip(rows, answers):
        p = prompt_ids(tokenizer, r["prompt"])
        ids = (p + ans + [eos])[:max_length]
        labels = ([-100] * len(p) + ans + [eos])[:max_length]
        out.append(Encoded(ids, labels))
    return out


def collate(examples: list[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right padding; (B, T) input_ids, attention_mask and labels (-100 on padding)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fixed_batches(examples: list[Encoded], batch_size: int, pad_id: int) -> list[dict[str, Tensor]]:
    return [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


def train_batches(examples: list[Encoded], batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled batches; epoch e uses the permutation seeded by (seed, e)."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield collate([examples[j] for j in order[i : i + batch_size]], pad_id)
        epoch += 1
