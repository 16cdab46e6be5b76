"""``lalora export``: a registered version as files other tools load, without MLflow.

Without ``merge``: a peft adapter folder and the base's tokenizer (what peft, vLLM's LoRA serving
and TGI load); its adapter_config.json names the base by its hub id, or, for a base the lineage
logged (the tiny one, a local directory), by the copy exported beside it in ``DIR/base``. With
``merge``: a standalone transformers model, the adapter merged into the base weights.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flows.registry import LineageRegistry
from pipelines.config.schema import store_uri_problem
from pipelines.errors import BadInput
from pipelines.lineage.record import VersionRecord

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")


@dataclass(frozen=True)
class Exported:
    out: Path
    model: str
    version: str
    record: VersionRecord
    merged: bool


def resolve(uri: str, model_uri: str) -> tuple[str, str, VersionRecord]:
    """(registered model, version, its record) of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    m = _URI.match(model_uri)
    if not m:
        raise BadInput(
            f"{model_uri!r} is not a model URI: give models:/NAME/VERSION or models:/NAME@ALIAS "
            "(e.g. models:/lalora-demo@champion)"
        )
    name = m["name"]
    problem = store_uri_problem(uri)
    if problem:
        raise BadInput(problem)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise BadInput(
            f"no MLflow store at {uri}: the file does not exist (check --tracking-uri or MLFLOW_TRACKING_URI)"
        )
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            first = str(e).strip().splitlines()[0][:200]
            raise BadInput(
                f"the tracking store {uri} cannot be read: {first} (check --tracking-uri or MLFLOW_TRACKING_URI)"
            ) from None
        raise BadInput(f"no registered model {name!r} in {uri} (check the name, or --tracking-uri)") from None
    try:
        v = (
            client.get_model_version(name, m["version"])
            if m["version"]
            else client.get_model_version_by_alias(name, m["alias"])
        )
    except MlflowException:
        what = f"version {m['version']}" if m["version"] else f"alias {m['alias']!r}"
        have = ", ".join(f"{a} -> {n}" for a, n in model.aliases.items()) or "none"
        raise BadInput(f"{name} has no {what} in {uri} (aliases: {have})") from None
    record = VersionRecord.from_tags(dict(v.tags))
    if record is None:
        raise BadInput(f"version {v.version} of {name} records no LaLoRA stage (it was not registered by lalora)")
    return name, str(v.version), record


def _recorded_base_settings(registry: LineageRegistry, record: VersionRecord) -> tuple[str | None, str]:
    """(hub revision, dtype) the version's model records for its base: the commit the adapter was trained
    on, not the hub's head. A version of the old format (a bare adapter folder, no MLmodel) records neither."""
    import yaml

    model_uri, sep, _ = record.adapter_uri.rpartition("/artifacts/adapter")
    if not sep:
        return None, "float32"
    mlmodel = yaml.safe_load(Path(registry.fetch(f"{model_uri}/MLmodel", "MLmodel")).read_text())
    config = mlmodel["flavors"]["python_function"]["config"]
    return config["base"].get("revision"), config.get("dtype", "float32")


def export(uri: str, model_uri: str, out: Path, merge: bool = False) -> Exported:
    from pipelines.runtime.models import export_adapter, export_merged, is_local_path

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"--out {out} exists and is not empty; give a new directory (nothing was written)")
    name, version, record = resolve(uri, model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        registry = LineageRegistry(uri, name, Path(tmp))
        adapter = registry.fetch(record.adapter_uri, "adapter")
        revision, dtype = _recorded_base_settings(registry, record)
        logged = record.base_uri.startswith("runs:/") or is_local_path(record.base_uri)
        base = registry.fetch(record.base_uri, "base") if record.base_uri.startswith("runs:/") else record.base_uri
        out.mkdir(parents=True, exist_ok=True)
        if merge:
            export_merged(base, adapter, out, dtype=dtype, revision=revision)
        elif logged:
            import shutil

            shutil.copytree(base, out / "base", dirs_exist_ok=True)
            export_adapter(adapter, str(out / "base"), out, base_name=str((out / "base").resolve()))
        else:
            export_adapter(adapter, base, out, revision=revision)
    (out / "lalora_export.json").write_text(
        json.dumps(
            {
                "model_uri": model_uri,
                "registered_model": name,
                "version": version,
                "stage": record.stage,
                "domain": record.domain,
                "base": record.base_uri,
                "merged": merge,
            },
            indent=2,
        )
    )
    return Exported(out, name, version, record, merge)
