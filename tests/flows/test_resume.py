"""Lineage state in the MLflow registry: skip finished stages, append a domain, refuse a changed
finished stage (or fork), and the promotion gate both ways. Real Prefect flow runs, a real
SQLite MLflow store and registry, the real DeepSpeed engine on a tiny model."""

import json

import pytest
from mlflow import MlflowClient

from flows.lineage_flow import lineage_flow
from pipelines.lineage.record import VersionRecord
from tests.configs import tiny
from tests.conftest import assert_one_line_error, run_lalora
from tests.flows.stores import clone

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast

PROMOTE_ALL = {"min_bwt": -1.0, "max_forgetting": 1.0, "min_learning": -1.0}
BASE = tiny("one", "two", training={"checkpoint_every": 2}, promotion=PROMOTE_ALL)


def _client(uri):
    return MlflowClient(uri, registry_uri=uri)


def _versions(client, model):
    return sorted(client.search_model_versions(f"name = '{model}'"), key=lambda v: int(v.version))


def _aliases(client, model):
    return {k: str(v) for k, v in client.get_registered_model(model).aliases.items()}


def _runs(client):
    return client.search_runs([client.get_experiment_by_name("tiny").experiment_id])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The two-stage lineage, run once for the module."""
    root = tmp_path_factory.mktemp("resume")
    (root / "tiny.yaml").write_text(BASE)
    return root / "out", lineage_flow(str(root / "tiny.yaml"), str(root / "out"), []).as_json()


@pytest.fixture
def lineage(recorded, tmp_path):
    """Each test's own copy of the recorded lineage (store, artifacts, files), so no test sees another's changes."""
    out, result = recorded
    uri = clone(out, tmp_path / "out")
    (tmp_path / "tiny.yaml").write_text(BASE)
    return tmp_path, {**result, "mlflow_uri": uri}


def test_first_run_records_the_lineage_state_on_each_version(lineage):
    root, result = lineage
    assert result["stages_run"] == [1, 2] and result["stages_skipped"] == []
    client = _client(result["mlflow_uri"])
    v1, v2 = _versions(client, "tiny-adapter")
    for v, stage in ((v1, 1), (v2, 2)):
        t = v.tags
        assert set(t) == {"lalora.lineage", "lalora.stage", "lalora.domain", "lalora.promotion", "lalora.state"}
        assert t["lalora.stage"] == str(stage) and t["lalora.lineage"] == "tiny-adapter"
        assert t["lalora.promotion"] == "promoted"
        record = VersionRecord.from_tags(t)
        assert len(record.config_sha256) == 64 and len(record.data_sha256) == 64
        for what in ("adapter", "precision", "rows", "config", "base"):
            assert record.uri(what).startswith("runs:/"), what
        assert f"Stage {stage} of lineage tiny-adapter" in v.description and "Promotion gate: promoted" in v.description
    assert VersionRecord.from_tags(v1.tags).config_sha256 != VersionRecord.from_tags(v2.tags).config_sha256
    assert "models:/tiny-adapter@champion" in client.get_registered_model("tiny-adapter").description
    rows = json.loads((root / "out" / "stages" / "02-two" / "lineage" / "rows.json").read_text())
    assert [list(r) for r in rows] == [["src", "one", "two"]] * 3
    assert _aliases(client, "tiny-adapter") == {"newest": "2", "champion": "2"}
    assert not (root / "out" / "stages" / "01-one" / "checkpoints").exists()  # removed once the version holds it


def test_every_run_records_what_can_change_its_numbers(lineage):
    """Package versions, torch's CPU kernel path, the thread count, the device and the dtype: in metrics.json and
    as the lineage run's params."""
    import torch

    _root, result = lineage
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] and env["peft"] and env["deepspeed"]
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch_threads"].isdigit() and env["device"] and env["dtype"] == "float32"
    params = _client(result["mlflow_uri"]).get_run(result["run_id"]).data.params
    assert {k.removeprefix("environment."): v for k, v in params.items() if k.startswith("environment.")} == env


def test_rerun_of_a_finished_lineage_records_and_computes_nothing(lineage):
    root, first = lineage
    client = _client(first["mlflow_uri"])
    runs_before = len(_runs(client))
    adapter = root / "out" / "stages" / "02-two" / "adapter" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns
    code, out = run_lalora(["run", str(root / "tiny.yaml"), "--out", str(root / "out")], root)
    assert code == 0 and "Traceback" not in out, out[-3000:]
    assert "is up to date: 2 stages recorded, nothing run" in out
    result = json.loads((root / "out" / "metrics.json").read_text())
    assert result["stages_run"] == [] and result["stages_skipped"] == [1, 2]
    assert result["R"] == first["R"] and result["versions"] == ["1", "2"]
    assert len(_versions(client, "tiny-adapter")) == 2
    assert len(_runs(client)) == runs_before  # not even an empty run
    assert adapter.stat().st_mtime_ns == mtime


def test_changed_finished_stage_is_refused_in_one_line_and_nothing_is_recorded(lineage):
    root, first = lineage
    client = _client(first["mlflow_uri"])
    runs_before = len(_runs(client))
    args = ["run", str(root / "tiny.yaml"), "--out", str(root / "out"), "--set", "domains.1.data.size=90"]
    code, output = run_lalora(args, root)
    assert code == 2, output[-3000:]
    assert_one_line_error(output, "lalora: error: the config of finished stage 2 (two, version 2) changed")
    last = output.strip().splitlines()[-1]
    assert "domains.1.data.size: 80 -> 90" in last and "--fork NAME" in last
    assert len(_versions(client, "tiny-adapter")) == 2 and len(_runs(client)) == runs_before
    assert _aliases(client, "tiny-adapter") == {"newest": "2", "champion": "2"}


def test_another_registered_model_in_the_same_out_is_refused_and_nothing_is_overwritten(lineage):
    """An output directory holds one lineage: a config registering under another name there would retrain into
    its stages and overwrite its metrics.json; it is refused in one line (--fork is the way to branch)."""
    root, first = lineage
    client = _client(first["mlflow_uri"])
    metrics = (root / "out" / "metrics.json").read_bytes()
    runs_before = len(_runs(client))
    args = ["run", str(root / "tiny.yaml"), "--out", str(root / "out"), "--set", "tracking.registered_model=other"]
    code, output = run_lalora(args, root)
    assert code == 2, output[-3000:]
    assert_one_line_error(output, "holds the lineage 'tiny-adapter' and this config registers 'other'")
    assert "--fork other" in output.strip().splitlines()[-1]
    assert (root / "out" / "metrics.json").read_bytes() == metrics and len(_runs(client)) == runs_before
    assert "other" not in [m.name for m in client.search_registered_models()]


def test_fork_starts_a_new_lineage_from_the_changed_stage(lineage):
    root, first = lineage
    client = _client(first["mlflow_uri"])
    argv = [
        "run",
        str(root / "tiny.yaml"),
        "--out",
        str(root / "out"),
        "--set",
        "domains.1.data.size=90",
        "--fork",
        "tiny-fork",
    ]
    code, out = run_lalora(argv, root)
    assert code == 0 and "Traceback" not in out, out[-3000:]
    assert "ran stage(s) 2" in out and "skipped finished stage(s) 1" in out
    original = _versions(client, "tiny-adapter")
    forked = _versions(client, "tiny-fork")
    assert len(original) == 2  # untouched
    assert [v.tags["lalora.stage"] for v in forked] == ["1", "2"]
    assert forked[0].tags["lalora.forked_from"] == "tiny-adapter/1"
    assert forked[0].source == original[0].source and forked[0].run_id == original[0].run_id
    assert "lalora.forked_from" not in forked[1].tags
    assert (
        VersionRecord.from_tags(forked[1].tags).config_sha256 != VersionRecord.from_tags(original[1].tags).config_sha256
    )
    assert (root / "out" / "forks" / "tiny-fork" / "metrics.json").is_file()
    assert json.loads((root / "out" / "metrics.json").read_text())["registered_model"] == "tiny-adapter"
    code, out = run_lalora(argv, root)  # the fork is a lineage like any other: a rerun resumes it
    assert code == 0 and "is up to date" in out, out[-3000:]
    assert len(_versions(client, "tiny-fork")) == 2


PROBE = {
    "name": "probe",
    "data": {"kind": "generator", "op": "next", "alphabet": "abcdefghij", "size": 40},
    "eval_size": 8,
}


def test_probe_added_to_a_finished_lineage_is_scored_on_every_recorded_row_without_a_new_version(lineage):
    """No stage to run, but a new R column: each recorded adapter (and the LoRA initialisation) is
    scored on the probe once; the recorded columns stay as they were."""
    root, first = lineage
    client = _client(first["mlflow_uri"])
    cfg = root / "probe.yaml"
    cfg.write_text(tiny("one", "two", training={"checkpoint_every": 2}, promotion=PROMOTE_ALL, probes=[PROBE]))
    result = lineage_flow(str(cfg), str(root / "out"), []).as_json()
    assert result["stages_run"] == [] and result["stages_skipped"] == [1, 2]
    assert result["domains"] == ["src", "one", "two", "probe"] and result["probes"] == ["probe"]
    assert [r[:3] for r in result["R"]] == first["R"] and all(len(r) == 4 for r in result["R"])
    assert "probe" in result["forgetting"] and result["run_id"] is not None
    assert len(_versions(client, "tiny-adapter")) == 2


def test_appended_domain_on_another_machine_is_exactly_one_new_version_and_the_gate_can_refuse(lineage, tmp_path):
    """A fresh output directory (nothing on disk) against the same store: base, adapter, precision
    and R come from the registry; the gate rejects the new version, which stays registered."""
    _root, first = lineage
    client = _client(first["mlflow_uri"])
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        tiny(
            "one",
            "two",
            "three",
            training={"checkpoint_every": 2},
            tracking={"mlflow_uri": first["mlflow_uri"]},
            promotion={"min_learning": 2.0, "max_forgetting": 0.0},
        )
    )
    result = lineage_flow(str(cfg), str(tmp_path / "elsewhere"), []).as_json()
    assert result["stages_skipped"] == [1, 2] and result["stages_run"] == [3]
    assert not (tmp_path / "elsewhere" / "stages" / "01-one").exists()  # nothing of stage 1 recomputed
    assert result["domains"] == ["src", "one", "two", "three"] and len(result["R"]) == 4
    assert all(len(row) == 4 for row in result["R"])
    assert [r[:3] for r in result["R"][:3]] == [r[:3] for r in first["R"]]  # recorded rows kept as they were
    versions = _versions(client, "tiny-adapter")
    assert [str(v.version) for v in versions] == ["1", "2", "3"]
    v3 = versions[2]
    assert v3.tags["lalora.stage"] == "3" and v3.tags["lalora.promotion"] == "rejected"
    reason = v3.tags["lalora.promotion_reason"]
    assert "learning on three" in reason and "< min_learning +2.000" in reason
    assert result["promotion"]["3"]["promoted"] is False
    assert _aliases(client, "tiny-adapter") == {"newest": "3", "champion": "2"}
    from lalora import load_precision

    _, meta = load_precision(tmp_path / "elsewhere" / "stages" / "03-three" / "precision")
    assert [h["domain"] for h in meta.history] == ["src", "one", "two"]  # accumulated onto the recorded precision
