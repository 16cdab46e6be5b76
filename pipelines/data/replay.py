"""Replay (rehearsal): earlier data mixed into every batch of a stage.

The pool of a stage is the training split of each source the config names (the earlier stages'
domains, the source) and every row of the named data sets, each capped at ``max_per_domain``:
never a row of any evaluation split, which ``load_domain`` holds out first. Each batch of B rows
then holds round(fraction * B) rows of the pool and the rest of the new domain, two endless
shuffled streams with their own seeds, so the batches are a pure function of the seeds and a
resumed stage skips exactly what it trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from pipelines.config import DomainConfig, ReplayConfig
from pipelines.data.sources import load_domain, load_rows
from pipelines.data.tokens import Encoded, batch_indices, collate, train_batches


@dataclass(frozen=True)
class ReplayPool:
    """The rows a stage replays, and how many came from each source."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def replay_sources(replay: ReplayConfig, source: DomainConfig, earlier: list[DomainConfig]) -> list[DomainConfig]:
    """The domains whose training splits a stage replays: the source and the earlier stages' domains, as named."""
    return ([source] if "source" in replay.sources else []) + (list(earlier) if "domains" in replay.sources else [])


def replay_pool(replay: ReplayConfig, domains: list[DomainConfig], data_dir: Path) -> ReplayPool:
    """The training rows of ``domains`` and every row of ``replay.data``, each capped at ``max_per_domain``."""
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    cap = replay.max_per_domain
    for d in domains:
        taken = load_domain(d, data_dir).train[:cap]
        rows += taken
        counts[d.name] = len(taken)
    for d in replay.data:
        taken = load_rows(d, data_dir)[0][:cap]
        rows += taken
        counts[d.name] = len(taken)
    return ReplayPool(rows, counts)


def replay_rows(batch_size: int, fraction: float) -> int:
    """Rows of each batch drawn from the pool: round(fraction * B), at least 1 when replay is on, at most B - 1."""
    if fraction <= 0:
        return 0
    return min(batch_size - 1, max(1, round(fraction * batch_size)))


def mixed_batches(
    new: list[Encoded],
    replayed: list[Encoded],
    batch_size: int,
    fraction: float,
    pad_id: int,
    seed: int,
    replay_seed: int,
    group_by_length: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Endless batches of ``batch_size`` rows: the new domain's, then ``replay_rows`` of the pool's."""
    k = replay_rows(batch_size, fraction) if replayed else 0
    if k == 0:
        yield from train_batches(new, batch_size, pad_id, seed, group_by_length)
        return
    fresh = batch_indices([len(e.input_ids) for e in new], batch_size - k, seed, group_by_length)
    old = batch_indices([len(e.input_ids) for e in replayed], k, replay_seed)
    for a, b in zip(fresh, old, strict=True):
        yield collate([new[i] for i in a] + [replayed[j] for j in b], pad_id)
