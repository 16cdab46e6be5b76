"""What a lineage has done, and what a run still has to do.

The record of a finished stage is a registered model version (flows/ reads it from MLflow);
this module is the pure part: which settings define a stage's result, their hashes, and the
plan that compares the config with the record. A stage is finished when a version holds its
index with the same stage-config hash and data fingerprint; a changed one is a conflict.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import DeepSpeedConfig, DomainConfig, LaLoRAConfig, LineageConfig, TrainingConfig
from pipelines.config.base import NOT_IDENTITY, WHEN_SET, identity_fields
from pipelines.errors import BadInput
from pipelines.lineage.record import VersionRecord
from pipelines.workspace import sha256_json

# Settings that cannot change what a stage produces (bookkeeping, resources; how the same update is computed:
# rounding aside, a fused optimizer, recomputed activations and a chunked loss give the same adapter), as the
# fields mark themselves (pipelines.config.base.NOT_IDENTITY); the domain's settings counted only when set.
_IRRELEVANT = {
    "training": identity_fields(TrainingConfig, NOT_IDENTITY),
    "deepspeed": identity_fields(DeepSpeedConfig, NOT_IDENTITY),
    "lalora": identity_fields(LaLoRAConfig, NOT_IDENTITY),
}
_UNSET_UNSEEN = identity_fields(DomainConfig, WHEN_SET)
_STAGE_SECTIONS = ("seed", "model", "lora", "lalora", "source", "training", "deepspeed")


def _domain_identity(d: dict[str, Any]) -> dict[str, Any]:
    """A local file is identified by its contents (the data fingerprint), not where it lies on this machine."""
    d = json.loads(json.dumps(d))
    for key in _UNSET_UNSEEN:  # a domain's own settings count only when set: other configs keep their hashes
        if d.get(key) is None:
            d.pop(key, None)
    for src in (d.get("data"), (d.get("eval_data") or {}).get("data")):
        if isinstance(src, dict) and src.get("kind") == "local":
            src.pop("path", None)
    return d


def stage_config(cfg: LineageConfig, stage: int) -> dict[str, Any]:
    """Every setting that determines stage ``stage``'s adapter and precision (domains up to it)."""
    dump = cfg.model_dump(mode="json", by_alias=True)
    out = {k: dump[k] for k in _STAGE_SECTIONS}
    for section, keys in _IRRELEVANT.items():
        out[section] = {k: v for k, v in out[section].items() if k not in keys}
    out["source"] = _domain_identity(out["source"])
    out["domains"] = [_domain_identity(d) for d in dump["domains"][:stage]]
    model = out["model"]
    if model.get("sha256"):  # a local base is identified by its weights, not where it lies on this machine
        model.pop("path")
    else:  # configs from before the setting keep the hashes their versions recorded
        model.pop("sha256", None)
    pretrain = model["pretrain"]
    if pretrain.get("extra_data"):
        pretrain["extra_data"] = [_domain_identity(d) for d in pretrain["extra_data"]]
    else:  # configs from before the setting keep the hashes their versions recorded
        pretrain.pop("extra_data", None)
    if not any(cfg.stage_lambda(s) == "auto" for s in range(1, stage + 1)):
        out["lalora"].pop("auto")  # the search's settings are part of a stage that searched, or follows one
    else:  # searches from before a setting, or leaving it at its default, keep their hashes
        searched = out["lalora"]["auto"]
        if searched.get("columns") is None:
            searched.pop("columns", None)
        if searched.get("choice") == "most_learning":
            searched.pop("choice", None)
    replay = out["training"].pop("replay")
    if cfg.training.replay.enabled:  # off, a stage's hash is what it was before replay existed
        out["training"]["replay"] = {**replay, "data": [_domain_identity(d) for d in replay["data"]]}
    return out


def data_fingerprints(
    domains: list[DomainConfig],
    data_dir: str,
    pretrain_extra: Sequence[DomainConfig] = (),
    replay: Sequence[DomainConfig] = (),
) -> dict[str, str]:
    """sha256 of every domain's rows (all splits), by name: changes whenever the data does; the
    tiny base's ``model.pretrain.extra_data`` under ``pretrain:NAME``, replayed data sets under ``replay:NAME``."""
    from pipelines.data.sources import load_domain, load_rows

    out = {d.name: load_domain(d, Path(data_dir)).fingerprint for d in domains}
    out |= {f"pretrain:{d.name}": load_rows(d, Path(data_dir))[1] for d in pretrain_extra}
    return out | {f"replay:{d.name}": load_rows(d, Path(data_dir))[1] for d in replay}


@dataclass(frozen=True)
class StageKey:
    stage: int
    domain: str
    config_sha256: str
    data_sha256: str
    """Fingerprint of the data the stage used: the source's, every domain's up to it, and the tiny
    base's extra pretraining data."""


def stage_keys(cfg: LineageConfig, fingerprints: dict[str, str]) -> list[StageKey]:
    keys = []
    for t, d in enumerate(cfg.domains, start=1):
        data = [fingerprints[x.name] for x in cfg.all_domains[: t + 1]]
        data += [fingerprints[f"pretrain:{x.name}"] for x in cfg.model.pretrain.extra_data]
        if cfg.training.replay.enabled:
            data += [fingerprints[f"replay:{x.name}"] for x in cfg.training.replay.data]
        keys.append(StageKey(t, d.name, sha256_json(stage_config(cfg, t)), sha256_json(data)))
    return keys


@dataclass(frozen=True)
class Recorded:
    """A finished stage: its registered version and what the version records."""

    version: str
    record: VersionRecord

    @property
    def stage(self) -> int:
        return self.record.stage

    @property
    def domain(self) -> str:
        return self.record.domain

    @property
    def config_sha256(self) -> str:
        return self.record.config_sha256

    @property
    def data_sha256(self) -> str:
        return self.record.data_sha256

    def uri(self, what: str) -> str:
        """``adapter``, ``precision``, ``rows``, ``config`` or ``base``: the artifact URI the version records."""
        return self.record.uri(what)


class LineageConflict(BadInput):
    """The config disagrees with what the lineage has already recorded."""

    def __init__(self, message: str, stage: int, recorded: Recorded | None) -> None:
        super().__init__(message)
        self.stage = stage
        self.recorded = recorded


@dataclass
class Plan:
    done: list[Recorded]
    todo: list[StageKey]

    @property
    def resume_from(self) -> int:
        """Index of the first stage to run (len(done) + 1)."""
        return len(self.done) + 1


def first_conflict(keys: list[StageKey], recorded: list[Recorded], model: str) -> LineageConflict | None:
    """The first finished stage the config no longer matches, or None."""
    by_stage: dict[int, Recorded] = {}
    for r in sorted(recorded, key=lambda r: int(r.version)):
        by_stage.setdefault(r.stage, r)  # one version per stage; the first one is the record
    for s in sorted(by_stage):
        r = by_stage[s]
        if s > len(keys):
            return LineageConflict(
                f"{model} has finished stage {s} ({r.domain}, version {r.version}) but the config "
                f"lists only {len(keys)} domain(s)",
                s,
                r,
            )
        k = keys[s - 1]
        if k.domain != r.domain:
            return LineageConflict(
                f"stage {s} of {model} was domain {r.domain!r} (version {r.version}); the config "
                f"puts {k.domain!r} there",
                s,
                r,
            )
        if k.config_sha256 != r.config_sha256:
            return LineageConflict(f"the config of finished stage {s} ({r.domain}, version {r.version}) changed", s, r)
        if k.data_sha256 != r.data_sha256:
            return LineageConflict(
                f"the data of finished stage {s} ({r.domain}, version {r.version}) changed (fingerprint differs)", s, r
            )
    missing = [s for s in range(1, max(by_stage, default=0) + 1) if s not in by_stage]
    if missing:
        return LineageConflict(f"{model} has no version for stage {missing[0]} but has later ones", missing[0], None)
    return None


def plan(keys: list[StageKey], recorded: list[Recorded], model: str) -> Plan:
    """Finished stages to skip and stages to run; raises LineageConflict."""
    conflict = first_conflict(keys, recorded, model)
    if conflict is not None:
        raise conflict
    done = sorted({r.stage: r for r in sorted(recorded, key=lambda r: -int(r.version))}.values(), key=lambda r: r.stage)
    return Plan(done, keys[len(done) :])


def fork_point(keys: list[StageKey], recorded: list[Recorded], model: str) -> list[Recorded]:
    """The finished stages a fork keeps: those before the first conflict (all of them when none)."""
    conflict = first_conflict(keys, recorded, model)
    keep = len(keys) if conflict is None else conflict.stage - 1
    done = {r.stage: r for r in sorted(recorded, key=lambda r: -int(r.version))}
    return [done[s] for s in sorted(done) if s <= keep]


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> list[str]:
    """'key: old -> new' for flattened keys that differ (at most ``limit``)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        if isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
            return {k: v for i, val in enumerate(d) for k, v in flat(val, f"{prefix}{i}.").items()}
        return {prefix.rstrip("."): d}

    a, b = flat(old), flat(new)
    out = [
        f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])
