"""The real flow end to end: Prefect flow run, DeepSpeed engine, MLflow store and registry."""

import json

import pytest
from mlflow import MlflowClient

from flows.lineage_flow import lineage_flow
from tests.configs import ONE_DOMAIN, TINY, tiny
from tests.conftest import assert_one_line_error, run_lalora

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    result = lineage_flow(str(cfg), str(root / "out"), []).as_json()
    return root, result


def test_r_matrix_and_metrics_json(finished):
    root, result = finished
    on_disk = json.loads((root / "out" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    for key in ("R", "domains", "ACC", "BWT", "forgetting", "registered_model", "versions"):
        assert key in on_disk
    assert on_disk["domains"] == ["src", "one", "two"]
    assert len(on_disk["R"]) == 3 and all(len(row) == 3 for row in on_disk["R"])
    # each row of R is what that stage's scoring wrote (row 0: the LoRA initialisation, before any stage)
    evals = [root / "out" / "stages" / d / "eval.json" for d in ("00-init", "01-one", "02-two")]
    for row, path in zip(on_disk["R"], evals, strict=True):
        scores = json.loads(path.read_text())["scores"]
        assert row == [scores[d]["score"] for d in on_disk["domains"]]
    assert on_disk["R_nll"][2] == [json.loads(evals[2].read_text())["scores"][d]["nll"] for d in on_disk["domains"]]
    assert set(on_disk["forgetting"]) == {"src", "one"}
    assert (root / "out" / "R.png").stat().st_size > 1000


def test_mlflow_runs_hold_params_metrics_and_artifacts(finished):
    _root, result = finished
    client = MlflowClient(result["mlflow_uri"])
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["lalora.lambda"] == "5.0"
    assert {"ACC", "BWT", "mean_forgetting"} <= set(parent.data.metrics)
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"metrics.json", "R.png"} <= top
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["lalora.domain"] for r in children) == ["one", "two"]
    for run in children:
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == [2, 4, 6]
        assert "train/penalty" in run.data.metrics and "eval/src/accuracy" in run.data.metrics
        assert "curvature/n_samples" in run.data.metrics
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert arts == {"model", "curvature", "lineage"}  # the adapter once, inside the version's model
        adapter = {a.path for a in client.list_artifacts(run.info.run_id, "model/artifacts/adapter")}
        assert adapter == {
            "model/artifacts/adapter/adapter_config.json",
            "model/artifacts/adapter/adapter_model.safetensors",
        }
        files = {a.path for a in client.list_artifacts(run.info.run_id, "curvature")}
        assert {"curvature/precision.safetensors", "curvature/precision.json"} <= files
    stage1 = next(r for r in children if r.data.tags["lalora.domain"] == "one")
    assert stage1.data.metrics["curvature/zero_A_matrices"] == 2  # B = 0 caveat: q_proj and v_proj A, visible


def test_registry_has_one_version_per_stage(finished):
    _, result = finished
    client = MlflowClient(result["mlflow_uri"], registry_uri=result["mlflow_uri"])
    versions = sorted(client.search_model_versions("name = 'tiny-adapter'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"] == result["versions"]
    assert [v.tags["lalora.domain"] for v in versions] == ["one", "two"]
    assert [v.tags["lalora.stage"] for v in versions] == ["1", "2"]
    assert str(client.get_model_version_by_alias("tiny-adapter", "newest").version) == "2"
    assert all(v.source.endswith(f"{v.run_id}/artifacts/model") for v in versions)  # a python_function model


def test_adapter_and_precision_checkpoints_on_disk(finished):
    from lalora import load_precision

    root, _ = finished
    stage2 = root / "out" / "stages" / "02-two"
    assert (stage2 / "adapter" / "adapter_config.json").is_file()
    _precision, meta = load_precision(stage2 / "precision")
    assert [h["domain"] for h in meta.history] == ["src", "one"]
    assert meta.structure == "diag" and meta.n_samples == 16


def test_cli_run_prints_the_summary(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(ONE_DOMAIN)
    code, out = run_lalora(["run", str(cfg), "--out", str(tmp_path / "out"), "--set", "lalora.lambda=0"], tmp_path)
    assert code == 0, out[-3000:]
    assert "Traceback" not in out
    assert "R (accuracy)" in out and "BWT" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert "registered: tiny-adapter versions 1" in out
    assert not (tmp_path / "out" / "stages" / "01-one" / "precision").exists()  # lambda = 0 computes no curvature


def test_missing_data_fails_in_one_line_and_registers_nothing(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny("one", {"name": "two", "data": {"kind": "local", "path": "missing.jsonl"}, "eval_size": 12}))
    code, output = run_lalora(["run", str(cfg), "--out", str(tmp_path / "out")], tmp_path)
    assert code == 2, output[-3000:]
    assert_one_line_error(output, "lalora: error: domains.1.data.path: ")
    assert output.strip().endswith("relative to the config file)"), output[-500:]
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("tiny")  # the data is checked before any run is opened
    assert exp is None or client.search_runs([exp.experiment_id]) == []
    assert client.search_model_versions("name = 'tiny-adapter'") == []


@pytest.mark.parametrize("kind", ["kfac-tri"])
def test_kronecker_curvature_runs_through_the_lineage(kind, tmp_path):
    from lalora import load_precision

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(ONE_DOMAIN)
    result = lineage_flow(
        str(cfg), str(tmp_path / "out"), [f"lalora.curvature.kind={kind}", "lalora.curvature.top_k=4"]
    ).as_json()
    assert len(result["R"]) == 2 and result["versions"] == ["1"]
    precision, meta = load_precision(tmp_path / "out" / "stages" / "01-one" / "precision")
    assert meta.structure == kind and precision.top_k == 4
    assert all(t.s.n == 32 and t.s.k == 4 for n, ts in precision.blocks.items() if n.endswith("lora_A") for t in ts)


def test_curvature_over_the_memory_budget_is_refused_in_one_line(tmp_path):
    """Raised inside the stage's Prefect task: the installed script's whole output is read (Prefect's own log
    handlers write to the terminal's stderr, which capsys does not see)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(ONE_DOMAIN)
    args = ["run", str(cfg), "--out", str(tmp_path / "out"), "--set", "lalora.curvature.kind=kfac"]
    code, output = run_lalora([*args, "--set", "lalora.memory_budget_gb=1e-9"], tmp_path)
    assert code == 2, output[-3000:]
    assert_one_line_error(output, "lalora: error: kfac curvature needs")
    assert "lalora.memory_budget_gb=1e-09" in output.strip().splitlines()[-1]


def test_the_prefect_flow_run_publishes_the_outcome_as_a_markdown_artifact(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(ONE_DOMAIN)
    result = lineage_flow(str(cfg), str(tmp_path / "out"), ["tracking.registered_model=Artifact_Check"]).as_json()
    with get_client(sync_client=True) as client:
        key = ArtifactFilterKey(any_=["lalora-artifact-check"])
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    assert artifact.type == "markdown" and artifact.flow_run_id is not None
    text = artifact.data
    assert text.startswith("# Lineage Artifact_Check") and "| after stage | src | one |" in text
    assert f"| 1: one | {' | '.join(f'{v:.3f}' for v in result['R'][1])} |" in text
    assert "ACC " in text and "- version 1 (stage 1): promoted to `champion`" in text
