"""Stage step 6: register the stage's adapter as a new version of the lineage's model.

The version carries the lineage state (stage, domain, hashes, artifact URIs) and the gate's
decision as tags, set when the version is created; aliases move after it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pipelines.promote import GateResult


class Registry(Protocol):
    """A model registry (MLflow's in flows/): versions with tags, and movable aliases."""

    def register(self, adapter_dir: str, artifact_path: str, tags: dict[str, str]) -> str:
        """Create a new version from the adapter directory; return the version id."""
        ...

    def set_alias(self, alias: str, version: str) -> None: ...


@dataclass
class RegisterResult:
    model: str
    version: str
    promoted: bool = False
    reason: str = ""


def register_stage(registry: Registry, model_name: str, adapter_dir: str, *, stage: int, domain: str,
                   precision_sha256: str | None, scores: dict[str, float], alias: str,
                   state: dict[str, str] | None = None, gate: GateResult | None = None,
                   champion_alias: str | None = None) -> RegisterResult:
    """New version tagged with its stage, domain, lineage ``state`` and scores; ``alias`` always moves to
    it, ``champion_alias`` only when the gate passed (otherwise the reason is a tag)."""
    tags = {"lalora.stage": str(stage), "lalora.domain": domain, **(state or {})}
    if precision_sha256:
        tags["lalora.precision_sha256"] = precision_sha256
    tags |= {f"score.{k}": f"{v:.4f}" for k, v in scores.items()}
    if gate is not None:
        tags["lalora.promotion"] = "promoted" if gate.promoted else "rejected"
        if not gate.promoted:
            tags["lalora.promotion_reason"] = gate.reason[:4900]
        tags |= {f"gate.{k}": f"{v:.4f}" for k, v in gate.metrics.items()}
    version = registry.register(adapter_dir, "adapter", tags)
    registry.set_alias(alias, version)
    promoted = gate is None or gate.promoted
    if champion_alias and promoted:
        registry.set_alias(champion_alias, version)
    return RegisterResult(model_name, version, promoted, "" if gate is None else gate.reason)
