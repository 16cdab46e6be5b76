"""The lineage's registered model in MLflow. This module owns every registry call.

Each finished stage is one version: an MLflow ``python_function`` model (flows/generator.py) whose
tags hold the stage's record (pipelines.record.VersionRecord): a few a person scans (stage, domain,
promotion) and the machine state resume reads, so resuming is one registry query. The alias
``newest`` follows the last stage; the champion alias the last version the gate promoted. A
version registered for a stage another version already records (two workers, a lost lease) is
tagged a duplicate, moves no alias and is never read as the stage's record.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.lock import LockHeld
from flows.runs import RunRef, mlflow_client
from pipelines.errors import BadInput
from pipelines.lineage.plan import Recorded
from pipelines.lineage.record import VersionRecord
from pipelines.workspace import move_into_place, sha256_text

DUPLICATE_TAG = "lalora.duplicate_of"


class RecordDamaged(BadInput):
    """A recorded artifact that no longer matches what was recorded (its checksum fails)."""


class StageTaken(LockHeld):
    """Another run registered the same stage first: this run's version is a duplicate."""


@dataclass(frozen=True)
class LineageRegistry:
    """One lineage: a registered model in the store at ``uri``; ``cache`` keeps local copies of its
    recorded artifacts, keyed by URI (a record never changes once written)."""

    uri: str
    model: str
    cache: Path

    @property
    def client(self) -> Any:
        return mlflow_client(self.uri)

    def exists(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.model)
            return True
        except MlflowException:
            return False

    def stages(self) -> list[Recorded]:
        """The versions that record a stage, in version order; duplicates and other versions left out."""
        if not self.exists():
            return []
        out = []
        for v in self.client.search_model_versions(f"name = '{self.model}'"):
            record = VersionRecord.from_tags(dict(v.tags))
            if record is not None and DUPLICATE_TAG not in v.tags:
                out.append(Recorded(str(v.version), record))
        return sorted(out, key=lambda r: int(r.version))

    # --- recorded artifacts ------------------------------------------------------------------
    def local(self, artifact_uri: str, name: str) -> Path:
        return self.cache / f"{sha256_text(artifact_uri)[:16]}-{name}"

    def fetch(self, artifact_uri: str, name: str) -> str:
        """A recorded artifact (file or directory) on this machine, downloaded once."""
        dest = self.local(artifact_uri, name)
        if dest.exists():
            return str(dest)
        from mlflow.artifacts import download_artifacts

        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        got = Path(download_artifacts(artifact_uri=artifact_uri, dst_path=str(tmp), tracking_uri=self.uri))
        move_into_place(got, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        return str(dest)

    def fetch_json(self, artifact_uri: str, name: str) -> Any:
        return json.loads(Path(self.fetch(artifact_uri, name)).read_text())

    def fetch_precision(self, rec: Recorded) -> str:
        """The accumulated precision a version records, checked against its checksum.

        A damaged local copy is fetched again once; a damaged record is refused naming the version
        and its ``runs:/`` URI, before anything runs or is recorded.
        """
        from lalora.checkpoint import CheckpointError, verify

        artifact = rec.uri("precision")
        for attempt in range(2):
            path = self.fetch(artifact, "precision")
            try:
                verify(path)
                return path
            except CheckpointError as e:
                if attempt == 0:
                    shutil.rmtree(path, ignore_errors=True)
                    continue
                reason = str(e).replace(str(Path(path)), artifact)
        raise RecordDamaged(
            f"version {rec.version} of {self.model} (stage {rec.stage}, {rec.domain}): {reason}; "
            f"nothing was run or recorded. Restore the artifact in the store, or delete version "
            f"{rec.version} so stage {rec.stage} runs again"
        )

    def location(self, runs_uri: str) -> str:
        """The absolute artifact location (``file://``, ``mlflow-artifacts:/``, ...) of a ``runs:/`` URI."""
        run_id, _, path = runs_uri.removeprefix("runs:/").partition("/")
        return f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"

    # --- writing ---------------------------------------------------------------------------------
    def describe(self, description: str) -> None:
        """Create the registered model if needed and set its description."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_registered_model(self.model, description=description)
        except MlflowException:
            try:
                self.client.create_registered_model(self.model, description=description)
            except MlflowException:  # created by another worker in between
                self.client.update_registered_model(self.model, description=description)

    def register(
        self, run: RunRef, model_dir: Path, record: VersionRecord, description: str, aliases: list[str]
    ) -> str:
        """Log the version's model on ``run`` and register it; move ``aliases`` to it unless another
        version already records the stage (then this one is tagged a duplicate and StageTaken raised)."""
        client = self.client
        client.log_artifacts(run.run_id, str(model_dir), "model")
        source = self.location(f"runs:/{run.run_id}/model")
        version = str(
            client.create_model_version(
                self.model, source=source, run_id=run.run_id, tags=record.to_tags(), description=description
            ).version
        )
        first = min(int(r.version) for r in self.stages() if r.stage == record.stage)
        if first != int(version):
            client.set_model_version_tag(self.model, version, DUPLICATE_TAG, str(first))
            raise StageTaken(
                f"another run registered stage {record.stage} of {self.model} as version {first} while "
                f"this one ran; this run's version {version} is tagged a duplicate and moved no alias"
            )
        for alias in aliases:
            client.set_registered_model_alias(self.model, alias, version)
        return version

    def reconcile_aliases(self, newest: str, champion: str) -> dict[str, str]:
        """``newest`` on the last stage's version, ``champion`` on the last promoted one (idempotent:
        repairs a run killed between registering a version and moving its aliases)."""
        done = self.stages()
        if not done:
            return {}
        by_stage = {r.stage: r for r in reversed(done)}  # the first version of each stage
        aliases = {newest: by_stage[max(by_stage)].version}
        promoted = [r for r in by_stage.values() if r.record.promoted]
        if promoted:
            aliases[champion] = max(promoted, key=lambda r: int(r.version)).version
        current = self.client.get_registered_model(self.model).aliases
        for alias, version in aliases.items():
            if str(current.get(alias)) != version:
                self.client.set_registered_model_alias(self.model, alias, version)
        return aliases

    def fork(self, source: str, keep: list[Recorded], description: str) -> list[Recorded]:
        """This model as a copy of ``source``'s versions ``keep`` (same models and runs); the source is untouched."""
        client = self.client
        client.create_registered_model(self.model, description=description, tags={"lalora.forked_from": source})
        out = []
        for r in keep:
            v = client.get_model_version(source, r.version)
            record = r.record.forked(self.model, source, r.version)
            new = client.create_model_version(
                self.model, source=v.source, run_id=v.run_id, tags=record.to_tags(), description=v.description
            )
            out.append(Recorded(str(new.version), record))
        return out

    def shared_base(self, run: RunRef, experiment: str, base_dir: str) -> str:
        """The ``runs:/`` URI of the base model in this store: logged on ``run`` once, or the copy an earlier
        lineage of the experiment logged with the same contents (a sweep's points share one)."""
        from pipelines.workspace import tree_sha256

        digest = tree_sha256(Path(base_dir))
        client = self.client
        exp = client.get_experiment_by_name(experiment)
        found = client.search_runs([exp.experiment_id], f"tags.`lalora.base_sha256` = '{digest}'", max_results=1)
        if found:
            return f"runs:/{found[0].info.run_id}/base"
        client.log_artifacts(run.run_id, base_dir, "base")
        client.set_tag(run.run_id, "lalora.base_sha256", digest)
        return f"runs:/{run.run_id}/base"
