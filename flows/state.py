"""Lineage state in the MLflow model registry: read the finished stages, fetch their
artifacts onto this machine, fork a lineage, keep the aliases consistent.

Every finished stage is one version of the lineage's registered model; its tags hold the
stage index, domain, stage-config hash, data fingerprint and the ``runs:/`` URIs of the
adapter, the accumulated precision, the R rows so far, the stage config and the base model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from flows.tracking import _client
from pipelines.errors import BadInput
from pipelines.lineage_state import Recorded


def model_exists(uri: str, model: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        _client(uri).get_registered_model(model)
        return True
    except MlflowException:
        return False


def recorded_stages(uri: str, model: str) -> list[Recorded]:
    """The versions of ``model`` that record a stage (any other version is ignored)."""
    if not model_exists(uri, model):
        return []
    client = _client(uri)
    out = []
    for v in client.search_model_versions(f"name = '{model}'"):
        t = v.tags
        if "lalora.stage" in t and "lalora.stage_config_sha256" in t:
            out.append(Recorded(str(v.version), int(t["lalora.stage"]), t["lalora.domain"],
                                t["lalora.stage_config_sha256"], t.get("lalora.data_sha256", ""), dict(t)))
    return sorted(out, key=lambda r: int(r.version))


def fetch(uri: str, artifact_uri: str, dest: Path) -> str:
    """Download an artifact (file or directory) to ``dest`` once; later calls reuse it."""
    if dest.exists():
        return str(dest)
    from mlflow.artifacts import download_artifacts

    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    got = Path(download_artifacts(artifact_uri=artifact_uri, dst_path=str(tmp), tracking_uri=uri))
    os.replace(got, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


class RecordDamaged(BadInput):
    """A recorded artifact that no longer matches what was recorded (its checksum fails)."""


def fetch_precision(uri: str, model: str, rec: Recorded, dest: Path) -> str:
    """The accumulated precision a version records, fetched and checked against its checksum.

    A damaged local copy is fetched again once; a damaged record is refused naming the version
    and its ``runs:/`` URI, before anything runs or is recorded.
    """
    from lalora.checkpoint import CheckpointError, verify

    artifact = rec.uri("precision")
    for attempt in range(2):
        path = fetch(uri, artifact, dest)
        try:
            verify(path)
            return path
        except CheckpointError as e:
            if attempt == 0:
                shutil.rmtree(dest, ignore_errors=True)
                continue
            reason = str(e).replace(str(Path(path)), artifact)
    raise RecordDamaged(f"version {rec.version} of {model} (stage {rec.stage}, {rec.domain}): {reason}; nothing was "
                        f"run or recorded. Restore the artifact in the store, or delete version {rec.version} so stage "
                        f"{rec.stage} runs again")


def fetch_json(uri: str, artifact_uri: str, cache: Path) -> Any:
    return json.loads(Path(fetch(uri, artifact_uri, cache)).read_text())


def fork(uri: str, source: str, target: str, keep: list[Recorded]) -> list[Recorded]:
    """Create ``target`` with copies of ``keep`` (same artifacts and runs); the source is untouched."""
    client = _client(uri)
    client.create_registered_model(target, description=f"LaLoRA adapters, forked from {source}",
                                   tags={"lalora.forked_from": source})
    out = []
    for r in keep:
        v = client.get_model_version(source, r.version)
        tags = {**r.tags, "lalora.forked_from": f"{source}/{r.version}", "lalora.lineage": target}
        new = client.create_model_version(target, source=v.source, run_id=v.run_id, tags=tags)
        out.append(Recorded(str(new.version), r.stage, r.domain, r.config_sha256, r.data_sha256, tags))
    return out


def reconcile_aliases(uri: str, model: str, newest: str, champion: str) -> dict[str, str]:
    """``newest`` on the last stage's version, ``champion`` on the last promoted one (idempotent:
    repairs a run killed between registering a version and moving its aliases)."""
    client = _client(uri)
    done = recorded_stages(uri, model)
    if not done:
        return {}
    last = max(done, key=lambda r: (r.stage, -int(r.version)))
    aliases = {newest: last.version}
    promoted = [r for r in done if r.tags.get("lalora.promotion", "promoted") == "promoted"]
    if promoted:
        aliases[champion] = max(promoted, key=lambda r: int(r.version)).version
    current = client.get_registered_model(model).aliases
    for alias, version in aliases.items():
        if str(current.get(alias)) != version:
            client.set_registered_model_alias(model, alias, version)
    return aliases
