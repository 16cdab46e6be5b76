"""The registry delivers models: every version loads through pyfunc, `mlflow models serve` serves the
champion and answers exactly what the pipeline's own greedy generation produces, and `lalora export`
writes a peft adapter folder or a merged transformers model that load without MLflow."""

import json
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from flows.lineage_flow import lineage_flow
from pipelines.lineage.record import VersionRecord
from tests.configs import TINY
from tests.conftest import run_lalora
from tests.flows.servers import model_server

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast

PROMPTS = ["reverse 123=", "increment 45=", "reverse 9081="]


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    root = tmp_path_factory.mktemp("delivery")
    (root / "tiny.yaml").write_text(TINY)
    result = lineage_flow(str(root / "tiny.yaml"), str(root / "out"), []).as_json()
    return root, result


def _pipeline_completions(root: Path, stage_dir: str, max_new_tokens: int = 6) -> list[str]:
    """What the pipeline's own scoring generates with the stage's adapter (batch as the model's default)."""
    from pipelines.runtime.models import load_for_inference
    from pipelines.scoring.scorers import complete

    model, tok = load_for_inference(root / "out" / "base", root / "out" / "stages" / stage_dir / "adapter")
    return complete(model, tok, PROMPTS, batch_size=12, max_new_tokens=max_new_tokens)


def test_every_version_is_a_python_function_model_that_refers_to_the_base(lineage):
    _root, result = lineage
    client = MlflowClient(result["mlflow_uri"], registry_uri=result["mlflow_uri"])
    versions = client.search_model_versions("name = 'tiny-adapter'")
    assert len(versions) == len(result["versions"]) >= 2
    for v in versions:
        model_dir = Path(v.source.removeprefix("file://"))
        mlmodel = (model_dir / "MLmodel").read_text()
        assert "python_function" in mlmodel and "signature" in mlmodel
        assert sorted(p.name for p in (model_dir / "artifacts" / "adapter").iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert not list(model_dir.rglob("model.safetensors"))  # the base is referenced, never copied
        config = mlflow.models.Model.load(str(model_dir / "MLmodel")).flavors["python_function"]["config"]
        assert config["base"]["kind"] == "artifact"
        assert config["base"]["uri"] == VersionRecord.from_tags(v.tags).base_uri
        requirements = (model_dir / "requirements.txt").read_text()
        assert "peft==" in requirements and "torchvision" not in requirements
        assert json.loads((model_dir / "serving_input_example.json").read_text())["inputs"]


def test_the_champion_loads_through_pyfunc_and_generates_as_the_pipeline_does(lineage):
    root, result = lineage
    mlflow.set_tracking_uri(result["mlflow_uri"])
    try:
        model = mlflow.pyfunc.load_model("models:/tiny-adapter@champion")
    finally:
        mlflow.set_tracking_uri(None)
    import pandas as pd

    assert model.predict(PROMPTS, params={"max_new_tokens": 6}) == _pipeline_completions(root, "02-two")
    assert model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 6}) == _pipeline_completions(
        root, "02-two"
    )
    short = model.predict(PROMPTS[:1], params={"max_new_tokens": 2})
    assert len(short) == 1 and len(short[0]) <= 2


def test_mlflow_models_serve_answers_what_the_pipeline_generates(lineage, tmp_path):
    root, result = lineage
    with model_server(
        "models:/tiny-adapter@champion",
        result["mlflow_uri"],
        tmp_path / "serve.log",
        LALORA_CACHE_DIR=str(tmp_path / "cache"),
    ) as url:
        body = json.dumps({"inputs": PROMPTS, "params": {"max_new_tokens": 6}}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            served = json.loads(r.read())["predictions"]
    assert served == _pipeline_completions(root, "02-two")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_merged_is_a_standalone_model_equal_to_base_plus_adapter(lineage, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipelines.runtime.models import load_for_inference

    root, result = lineage
    out = tmp_path / "merged"
    code, output = run_lalora(
        ["export", "models:/tiny-adapter/1", "--out", str(out), "--merge", "--tracking-uri", result["mlflow_uri"]],
        tmp_path,
    )
    assert code == 0, output[-3000:]
    assert "exported tiny-adapter version 1 (stage 1: one) as a merged transformers model" in output
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "generation_config.json").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference, _ = load_for_inference(root / "out" / "base", root / "out" / "stages" / "01-one" / "adapter")
    ids = torch.randint(4, 90, (3, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(merged, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_export_without_merge_is_a_peft_adapter_folder(lineage, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from pipelines.runtime.models import load_for_inference

    root, result = lineage
    out = tmp_path / "adapter"
    code, output = run_lalora(
        ["export", "models:/tiny-adapter@champion", "--out", str(out)],
        tmp_path,
        MLFLOW_TRACKING_URI=result["mlflow_uri"],
    )
    assert code == 0, output[-3000:]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert (out / "base" / "config.json").is_file()  # the tiny base is not on the hub: it comes along
    peft_model = AutoPeftModelForCausalLM.from_pretrained(out).eval()  # the adapter names its base
    reference, _ = load_for_inference(root / "out" / "base", root / "out" / "stages" / "02-two" / "adapter")
    ids = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(peft_model, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("bad-uri", "is not a model URI: give models:/NAME/VERSION or models:/NAME@ALIAS"),
        ("missing-alias", "tiny-adapter has no alias 'production'"),
        ("missing-version", "tiny-adapter has no version 9"),
        ("missing-model", "no registered model 'nope'"),
        ("non-empty-out", "exists and is not empty"),
        ("out-under-a-file", "is a file, so nothing can be made under it"),
        ("unsupported-store", "'bogus://x' is not an MLflow store with a model registry"),
        ("missing-store", "the file does not exist (check --tracking-uri or MLFLOW_TRACKING_URI)"),
    ],
)
def test_export_refuses_bad_input_in_one_line(lineage, tmp_path, case, fragment):
    _, result = lineage
    out = tmp_path / "out"
    uri = {
        "bad-uri": "runs:/abc/model",
        "missing-alias": "models:/tiny-adapter@production",
        "missing-version": "models:/tiny-adapter/9",
        "missing-model": "models:/nope@champion",
    }.get(case, "models:/tiny-adapter@champion")
    if case == "non-empty-out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    store = {"unsupported-store": "bogus://x", "missing-store": f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"}
    if case == "out-under-a-file":
        (tmp_path / "file").write_text("mine")
        out = tmp_path / "file" / "out"
    args = ["export", uri, "--out", str(out), "--tracking-uri", store.get(case, result["mlflow_uri"])]
    code, output = run_lalora(args, tmp_path)
    assert code == 2 and "Traceback" not in output, output[-3000:]
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lalora: error: ") and fragment in lines[0], lines
    if case == "non-empty-out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not (tmp_path / "none").exists()  # a missing SQLite store is not created empty
