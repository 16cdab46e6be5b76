"""The real flow with probes and mixed scorers: multiple choice and perplexity columns next to generation."""

import json

import pytest
from mlflow import MlflowClient

from flows.lineage_flow import lineage_flow
from tests.configs import tiny
from tests.pipelines.test_presets import ARC, TEXT

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast

CONFIG = tiny(
    {
        "name": "one",
        "data": {"kind": "generator", "op": "reverse", "size": 60},
        "eval_size": 8,
        "scoring": {"kind": "generate", "max_new_tokens": 4},
    },
    name="mixed",
    model={"pretrain": {"steps": 10}},
    lalora={"samples": 8},
    source={"data": {"size": 60}, "eval_size": 8},
    probes=[
        {"name": "arc", "data": {"kind": "local", "path": "arc.jsonl"}, "preset": "arc"},
        {
            "name": "wiki",
            "data": {"kind": "local", "path": "wiki.jsonl"},
            "preset": "text",
            "scoring": {"kind": "perplexity", "metric": "perplexity"},
        },
    ],
    training={"steps": 4, "group_by_length": True},
    evaluation={"batch_size": 8},
    tracking={"experiment": "mixed", "registered_model": "mixed-adapter"},
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    (root / "mixed.yaml").write_text(CONFIG)
    (root / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC))
    (root / "wiki.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEXT))
    return root, lineage_flow(str(root / "mixed.yaml"), str(root / "out"), []).as_json()


def test_metrics_json_holds_r_per_score_and_probe_forgetting(finished):
    root, result = finished
    assert json.loads((root / "out" / "metrics.json").read_text()) == json.loads(json.dumps(result))
    assert result["domains"] == ["src", "one", "arc", "wiki"] and result["probes"] == ["arc", "wiki"]
    assert result["scores"] == {"src": "accuracy", "one": "accuracy", "arc": "acc_norm", "wiki": "perplexity"}
    assert len(result["R"]) == 2 and all(len(row) == 4 for row in result["R"])
    assert [row[2] for row in result["R"]] == [row[2] for row in result["R_scores"]["acc_norm"]]
    assert result["R_scores"]["acc"][0][:2] == [None, None] and result["R_scores"]["perplexity"][1][3] > 1.0
    assert set(result["forgetting"]) == {"src", "arc", "wiki"} and set(result["learning"]) == {"one"}
    assert result["averaged"] == ["src", "one", "arc"]  # perplexity is reported per domain, not averaged
    assert result["ACC"] == pytest.approx(sum(result["R"][1][:3]) / 3)
    for name in ("R.png", "scores.png"):
        assert (root / "out" / name).stat().st_size > 5000
    stage = json.loads((root / "out" / "stages" / "01-one" / "eval.json").read_text())["scores"]
    assert stage["arc"]["scoring"] == "multiple_choice" and stage["arc"]["n"] == 2


def test_mlflow_has_per_domain_metrics_score_history_and_plots(finished):
    _, result = finished
    client = MlflowClient(result["mlflow_uri"])
    parent = client.get_run(result["run_id"])
    logged = {"ACC", "BWT", "source_forgetting", "forgetting/arc", "forgetting/wiki", "learning/one"}
    assert logged <= set(parent.data.metrics)
    history = client.get_metric_history(parent.info.run_id, "R/wiki")
    assert [m.step for m in history] == [0, 1] and [m.value for m in history] == [row[3] for row in result["R"]]
    assert {"metrics.json", "R.png", "scores.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    child = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )[0]
    assert {"eval/arc/acc", "eval/arc/acc_norm", "eval/wiki/perplexity", "eval/one/accuracy"} <= set(child.data.metrics)
    version = client.search_model_versions("name = 'mixed-adapter'")[0]
    assert f"wiki {result['R'][1][3]:.3f}" in version.description  # R after the stage, in each domain's own score


def test_an_lm_eval_probe_is_scored_by_lm_eval_as_a_column_of_r(tmp_path):
    """A probe naming an lm-eval task (a local custom task YAML) is scored through lm-eval on each row's adapter."""
    pytest.importorskip("lm_eval", reason="the lm-eval extra (make install installs it)")
    from tests.pipelines.test_lm_eval import task_dir

    task_dir(tmp_path)
    (tmp_path / "c.yaml").write_text(
        tiny(
            "one",
            probes=[
                {
                    "name": "tinymc",
                    "scoring": {"kind": "lm_eval", "task": "lalora_tiny_mc", "include_path": "tasks", "metric": "acc"},
                }
            ],
        )
    )
    result = lineage_flow(str(tmp_path / "c.yaml"), str(tmp_path / "out"), []).as_json()
    assert result["domains"] == ["src", "one", "tinymc"] and result["probes"] == ["tinymc"]
    assert result["scores"]["tinymc"] == "acc" and "tinymc" in result["forgetting"]
    scores = json.loads((tmp_path / "out" / "stages" / "01-one" / "eval.json").read_text())["scores"]["tinymc"]
    assert scores["scoring"] == "lm_eval" and scores["n"] == 8 and {"acc", "acc_norm", "nll"} <= set(scores)
    assert result["R"][1][2] == scores["acc"]
