"""A lineage registered before versions were MLflow models (bare adapter folders, two dozen tags) still
resumes, reports and takes a new domain; the new version is a python_function model."""

import json

import mlflow
import pytest
from mlflow import MlflowClient

from flows.lineage_flow import lineage_flow
from pipelines.lineage.record import VersionRecord
from tests.flows.legacy import config_text, restore

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast

THREE = "  - {name: three, data: {kind: generator, op: next, alphabet: abcdefghij, size: 80}, eval_size: 12}\n"


def test_an_old_lineage_reports_and_takes_a_new_domain(tmp_path):
    uri = restore(tmp_path / "store")
    client = MlflowClient(uri, registry_uri=uri)
    old = sorted(client.search_model_versions("name = 'tiny-adapter'"), key=lambda v: int(v.version))
    assert [v.source.endswith("/adapter") for v in old] == [True, True]  # the old layout: no MLmodel
    assert all(VersionRecord.from_tags(v.tags).format == 1 for v in old)

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(config_text().replace("tracking: {", f"tracking: {{mlflow_uri: '{uri}', "))
    report = lineage_flow(str(cfg), str(tmp_path / "out"), []).as_json()  # resume reads the old record: nothing to run
    assert report["stages_run"] == [] and report["stages_skipped"] == [1, 2] and report["versions"] == ["1", "2"]
    assert len(report["R"]) == 3

    cfg.write_text(cfg.read_text().replace("training:", THREE + "training:"))
    result = lineage_flow(str(cfg), str(tmp_path / "elsewhere"), []).as_json()  # another machine: all from the store
    assert result["stages_skipped"] == [1, 2] and result["stages_run"] == [3] and result["versions"] == ["1", "2", "3"]
    assert [r[:3] for r in result["R"][:3]] == report["R"]  # the recorded rows as they were
    assert all(len(row) == 4 for row in result["R"])
    v3 = client.get_model_version("tiny-adapter", "3")
    record = VersionRecord.from_tags(v3.tags)
    assert record.format == 2 and record.stage == 3 and record.base_uri == VersionRecord.from_tags(old[0].tags).base_uri
    assert v3.source.endswith("/artifacts/model")
    meta_file = tmp_path / "elsewhere" / "stages" / "03-three" / "precision" / "precision.json"
    assert [h["domain"] for h in json.loads(meta_file.read_text())["history"]] == ["src", "one", "two"]
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/tiny-adapter/3")
    finally:
        mlflow.set_tracking_uri(None)
    assert len(model.predict(["abc=", "cba="])) == 2
    assert old[0].source == client.get_model_version("tiny-adapter", "1").source  # the old versions untouched
