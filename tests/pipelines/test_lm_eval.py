"""Probes scored by lm-evaluation-harness itself, on a local custom task (offline: dataset_path json)."""

import json

import pytest

from pipelines.config import DomainConfig, EvaluationConfig
from pipelines.errors import BadInput

pytest.importorskip("lm_eval", reason="the lm-eval extra (make install installs it)")

ROWS = [
    {"question": f"copy {s}=", "choices": [s, s[::-1], s + "1", "9" + s], "label": i % 4}
    for i, s in enumerate(["123", "45", "809", "7", "31", "66", "2024", "58"])
]
for r in ROWS:  # the gold choice where the label says
    r["choices"][0], r["choices"][r["label"]] = r["choices"][r["label"]], r["choices"][0]


def task_dir(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(f"""task: lalora_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "rows.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return tmp_path / "tasks"


@pytest.fixture(scope="module")
def model():
    from pipelines.config import TinyModelConfig
    from pipelines.runtime.models import build_tiny_llama, char_tokenizer

    tok = char_tokenizer()
    return build_tiny_llama(
        TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=32), tok, seed=5
    ).eval(), tok


def test_an_lm_eval_probe_equals_the_projects_own_multiple_choice_scorer(model, tmp_path):
    """Same rows, same format (context, a space, the choice), BOS first in both (add_bos_token=True): the
    project's acc and acc_norm are lm-eval's."""
    from pipelines.data.presets import converter
    from pipelines.scoring.scores import score_domain

    net, tok = model
    probe = DomainConfig.model_validate(
        {
            "name": "tiny",
            "scoring": {
                "kind": "lm_eval",
                "task": "lalora_tiny_mc",
                "include_path": str(task_dir(tmp_path)),
                "metric": "acc_norm",
            },
        }
    )
    theirs = score_domain(net, tok, probe, [], EvaluationConfig(batch_size=8), max_length=32)
    ours_cfg = DomainConfig.model_validate(
        {
            "name": "tiny",
            "prompt_field": "question",
            "choices_field": "choices",
            "label_field": "label",
            "scoring": {"kind": "multiple_choice"},
        }
    )
    convert, _ = converter(ours_cfg)
    ours = score_domain(net, tok, ours_cfg, [convert(r) for r in ROWS], EvaluationConfig(batch_size=8), max_length=32)
    assert theirs.n == ours.n == len(ROWS) and theirs.metric == "acc_norm"
    assert theirs.values["acc"] == pytest.approx(ours.values["acc"])
    assert theirs.values["acc_norm"] == pytest.approx(ours.values["acc_norm"])
    assert theirs.values["nll"] == pytest.approx(ours.values["nll"], rel=1e-5)  # the gold choice, per token


def test_without_bos_lm_eval_scores_other_numbers(model, tmp_path):
    """The setting matters: add_bos_token false leaves the contexts as the tokenizer encodes them (no BOS)."""
    from pipelines.scoring.scores import score_domain

    net, tok = model
    scoring = {"kind": "lm_eval", "task": "lalora_tiny_mc", "include_path": str(task_dir(tmp_path))}
    with_bos, without = (
        score_domain(
            net,
            tok,
            DomainConfig.model_validate({"name": "t", "scoring": {**scoring, "add_bos_token": flag}}),
            [],
            EvaluationConfig(),
            max_length=32,
        )
        for flag in (True, False)
    )
    assert with_bos.values["nll"] != pytest.approx(without.values["nll"], rel=1e-4)


def test_an_unknown_task_is_bad_input(model, tmp_path):
    from pipelines.scoring.scores import score_domain

    net, tok = model
    probe = DomainConfig.model_validate(
        {"name": "x", "scoring": {"kind": "lm_eval", "task": "no_such_task", "include_path": str(task_dir(tmp_path))}}
    )
    with pytest.raises(BadInput, match="lm-eval has no task 'no_such_task'"):
        score_domain(net, tok, probe, [], EvaluationConfig(), max_length=32)
