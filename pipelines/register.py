"""Stage step 4: register the stage's adapter as a new version of the lineage's model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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


def register_stage(registry: Registry, model_name: str, adapter_dir: str, *, stage: int, domain: str,
                   precision_sha256: str | None, scores: dict[str, float], alias: str) -> RegisterResult:
    """New version tagged with its stage, domain and scores; ``alias`` moves to it."""
    tags = {"lalora.stage": str(stage), "lalora.domain": domain}
    if precision_sha256:
        tags["lalora.precision_sha256"] = precision_sha256
    tags |= {f"score.{k}": f"{v:.4f}" for k, v in scores.items()}
    version = registry.register(adapter_dir, "adapter", tags)
    registry.set_alias(alias, version)
    return RegisterResult(model_name, version)
