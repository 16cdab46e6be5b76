"""What a registered version records of its stage: one typed definition that the writer (registering
a stage) and the reader (resume, fork, export) share.

A version carries a few tags a person scans in the MLflow UI (lineage, stage, domain, promotion)
and the machine state that only resume reads as one JSON tag (``lalora.state``: hashes and the
``runs:/`` URIs of the adapter, precision, R rows, stage config and base), so resume stays one
registry query. Versions registered before that format (two dozen ``lalora.*`` tags) read the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Any

FORMAT = 2
"""1: every field its own ``lalora.*`` tag (before versions were MLflow models); 2: ``lalora.state``."""

ARTIFACTS = ("adapter", "precision", "rows", "config", "base")
"""What a version points at, by ``runs:/`` URI."""

STATE_TAG = "lalora.state"
_AUTO = {"val_rows_uri": "", "auto_lambda": None, "auto_trials": 0}


@dataclass(frozen=True)
class VersionRecord:
    """A finished stage, as its registered version records it."""

    lineage: str
    stage: int
    domain: str
    config_sha256: str
    """Hash of every setting that determines the stage's result (lineage_state.stage_config)."""
    data_sha256: str
    """Fingerprint of the data the stage used."""
    adapter_uri: str
    rows_uri: str
    """R so far: the scores of every row up to this stage."""
    config_uri: str
    """The stage config the hash was taken of (names what changed when a rerun is refused)."""
    base_uri: str
    base_recipe: str = ""
    """sha256 of the tiny base's recipe ('' for a given model.path)."""
    precision_uri: str = ""
    """The accumulated precision ('' for plain LoRA)."""
    precision_sha256: str = ""
    promoted: bool = True
    promotion_reason: str = ""
    forked_from: str = ""
    """``MODEL/VERSION`` this version was copied from by a fork."""
    val_rows_uri: str = ""
    """The validation scores of every row so far (a lineage with lambda auto; '' otherwise)."""
    auto_lambda: float | None = None
    """The lambda the stage's search chose (lambda auto; None otherwise)."""
    auto_trials: int = 0
    """The trial trainings the search ran."""
    format: int = FORMAT

    def uri(self, what: str) -> str:
        """The ``runs:/`` URI of ``adapter``, ``precision``, ``rows``, ``config`` or ``base`` ('' when none)."""
        if what not in (*ARTIFACTS, "val_rows"):
            raise KeyError(f"a version records no {what!r}; it records {', '.join(ARTIFACTS)}, val_rows")
        return getattr(self, f"{what}_uri")

    def forked(self, target: str, source: str, version: str) -> VersionRecord:
        """The same stage as recorded in the fork ``target`` of ``source``'s ``version``."""
        return replace(self, lineage=target, forked_from=f"{source}/{version}", format=FORMAT)

    def to_tags(self) -> dict[str, str]:
        tags = {
            "lalora.lineage": self.lineage,
            "lalora.stage": str(self.stage),
            "lalora.domain": self.domain,
            "lalora.promotion": "promoted" if self.promoted else "rejected",
            STATE_TAG: json.dumps(self._state(), sort_keys=True, separators=(",", ":")),
        }
        if self.promotion_reason and not self.promoted:
            tags["lalora.promotion_reason"] = self.promotion_reason[:4900]
        if self.forked_from:
            tags["lalora.forked_from"] = self.forked_from
        return tags

    def _state(self) -> dict[str, Any]:
        shown = {"lineage", "stage", "domain", "promoted", "promotion_reason", "forked_from", "format"}
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in shown}
        for name in _AUTO:  # only a searching lineage's versions carry them: others' state reads as before
            if state[name] == _AUTO[name]:
                del state[name]
        return {"format": FORMAT, **state}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> VersionRecord | None:
        """The record a version's tags hold; None for a version that records no stage."""
        if "lalora.stage" not in tags or "lalora.domain" not in tags:
            return None
        common: dict[str, Any] = {
            "lineage": tags.get("lalora.lineage", ""),
            "stage": int(tags["lalora.stage"]),
            "domain": tags["lalora.domain"],
            "promoted": tags.get("lalora.promotion", "promoted") == "promoted",
            "promotion_reason": tags.get("lalora.promotion_reason", ""),
            "forked_from": tags.get("lalora.forked_from", ""),
        }
        if STATE_TAG in tags:
            state = json.loads(tags[STATE_TAG])
            known = {f.name for f in fields(cls)}
            return cls(**common, **{k: v for k, v in state.items() if k in known and k != "format"}, format=FORMAT)
        if "lalora.stage_config_sha256" not in tags:
            return None
        uris: dict[str, Any] = {f"{what}_uri": tags.get(f"lalora.{what}_uri", "") for what in ARTIFACTS}
        return cls(
            **common,
            config_sha256=tags["lalora.stage_config_sha256"],  # format 1
            data_sha256=tags.get("lalora.data_sha256", ""),
            base_recipe=tags.get("lalora.base_recipe", ""),
            precision_sha256=tags.get("lalora.precision_sha256", ""),
            format=1,
            **uris,
        )
