"""lambda auto through real lineage runs: the search keeps the budget on validation rows and records its trials
as nested MLflow runs; a budget nothing in range meets registers the stage unpromoted; a run killed during a
trial resumes at that trial and ends where an uninterrupted run ends."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from flows.lineage_flow import lineage_flow
from pipelines.lineage.auto import Trial, choose
from pipelines.lineage.record import VersionRecord
from tests.configs import DOMAINS, tiny
from tests.conftest import child_env, lalora_script, run_until_then_sigkill

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast

ROOT = Path(__file__).resolve().parents[2]
DEMO = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


def demo_base_config(budget: float, lam_range: tuple[float, float], max_trials: int) -> dict:
    """The demo's base (it knows the source well, so a new domain can make it forget) with one searched stage and a
    fixed one with its own lambda and steps; small splits, short stages."""
    small = {"eval_size": 50, "val_size": 50}
    return {
        "name": "auto",
        "seed": 0,
        "model": {
            "path": str(ROOT / "configs" / "demo-base"),
            "sha256": DEMO["model"]["sha256"],
            "tiny": DEMO["model"]["tiny"],
        },
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        "lalora": {
            "lambda": "auto",
            "samples": 64,
            "batch_size": 32,
            "prior": {"tau_A": 1.0, "tau_B": 1.0e-3},
            "auto": {
                "max_forgetting": budget,
                "min_lambda": lam_range[0],
                "max_lambda": lam_range[1],
                "max_trials": max_trials,
            },
        },
        "source": {**DEMO["source"], **small},
        "domains": [
            {**DEMO["domains"][0], **small, "data": {**DEMO["domains"][0]["data"], "size": 600}},
            {
                **DEMO["domains"][1],
                **small,
                "data": {**DEMO["domains"][1]["data"], "size": 400},
                "lambda": 0,
                "steps": 10,
            },
        ],
        "training": {"steps": 100, "lr": 1.0e-2, "batch_size": 32, "max_length": 32, "log_every": 10},
        "runtime": {"threads": 1},
        "evaluation": {"batch_size": 100, "max_new_tokens": 8},
        "promotion": {"max_forgetting": 1.0},
        "tracking": {"experiment": "auto", "registered_model": "auto-adapter"},
    }


def _client(out: Path) -> MlflowClient:
    uri = f"sqlite:///{out / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def _trial_runs(client: MlflowClient, stage_run: str) -> list:
    runs = client.search_runs(
        [client.get_experiment_by_name("auto").experiment_id], f"tags.`mlflow.parentRunId` = '{stage_run}'"
    )
    return sorted(runs, key=lambda r: int(r.data.tags["lalora.trial"]))


def test_auto_keeps_the_budget_on_validation_rows_and_records_every_trial(tmp_path):
    cfg = tmp_path / "auto.yaml"
    data = demo_base_config(0.1, (0.01, 100.0), 4)
    data["lalora"]["auto"]["choice"] = "one_se"  # the one-standard-error rule (the default is tested below)
    cfg.write_text(yaml.safe_dump({**data, "domains": data["domains"][:1]}))
    first = lineage_flow(str(cfg), str(tmp_path / "out"), []).as_json()
    # each trial keeps its per-row validation gains on the stage's own domain: their means differ as the trials'
    # learning does, and the search took the trial the rule takes from them
    saved = json.loads((tmp_path / "out" / "stages" / "01-next-aj" / "auto" / "trials.json").read_text())["trials"]
    recorded = [Trial.from_json(t) for t in saved]
    assert all(len(t.learning_rows) == 50 for t in recorded)
    offsets = [sum(t.learning_rows) / 50 - t.learning for t in recorded]
    assert max(offsets) - min(offsets) == pytest.approx(0.0, abs=1e-9)
    assert first["auto"]["1"]["choice"] == "one_se"
    assert first["auto"]["1"]["chosen_trial"] == choose(recorded, 0.1, "one_se")[0].index
    val_rows_1 = json.loads((tmp_path / "out" / "stages" / "01-next-aj" / "lineage" / "val_rows.json").read_text())
    cfg.write_text(yaml.safe_dump(data))  # a domain appended: the next run reads the recorded validation rows
    result = lineage_flow(str(cfg), str(tmp_path / "out"), []).as_json()
    assert result["stages_skipped"] == [1] and result["stages_run"] == [2]
    for i in (0, 1):  # rows 0 and 1 came with version 1; only the appended domain's column was scored for them
        filled = json.loads((tmp_path / "out" / "fill" / f"val-row{i}.json").read_text())["scores"]
        assert set(filled) == {"increment-digits"}
    search = first["auto"]["1"]
    assert result["auto"]["1"] == {"lambda": search["lambda"], "trials": search["trials"]}  # as version 1 says
    assert "2" not in result["auto"]  # stage 2 has its own lambda (0)
    assert search["feasible"] and 2 <= search["trials"] <= 4 and 0.01 <= search["lambda"] <= 100
    assert search["validation_forgetting"] <= 0.1
    assert len(set(search["lambdas"])) == search["trials"]  # no lambda tried twice
    # within the budget on the validation rows, as recorded with the version: row 1 against row 0
    val_rows = json.loads(
        (tmp_path / "out" / "stages" / "02-increment-digits" / "lineage" / "val_rows.json").read_text()
    )
    assert len(val_rows) == 3 and set(val_rows[0]) == {"source", "next-aj", "increment-digits"}
    assert [{k: r[k] for k in ("source", "next-aj")} for r in val_rows[:2]] == val_rows_1
    assert val_rows[0]["source"] - val_rows[1]["source"] <= 0.1
    assert val_rows[1]["source"] == pytest.approx(val_rows[0]["source"] - search["validation_forgetting"])
    # every trial a nested run of the stage's run: its lambda, steps, validation learning and forgetting, seconds
    client = _client(tmp_path / "out")
    v1, v2 = sorted(client.search_model_versions("name = 'auto-adapter'"), key=lambda v: int(v.version))
    trials = _trial_runs(client, v1.run_id)
    assert [float(r.data.params["trial.lambda"]) for r in trials] == pytest.approx(search["lambdas"])
    for r in trials:
        assert r.info.status == "FINISHED" and r.data.params["trial.steps"] == "100"
        assert {
            "trial/validation_learning",
            "trial/validation_forgetting",
            "trial/seconds",
            "val/source/forgetting",
            "trial/predicted_loss_rise",
        } <= set(r.data.metrics)
    record = VersionRecord.from_tags(v1.tags)
    assert record.auto_lambda == search["lambda"] and record.auto_trials == search["trials"]
    # benchmarks/auto_choice.py scores the trials again row by row (it stops unless they reproduce the recorded
    # scores) and finds the choice the run made under its rule
    report = tmp_path / "choice.json"
    script = ROOT / "benchmarks" / "auto_choice.py"
    bench = subprocess.run(
        [sys.executable, str(script), str(cfg), str(tmp_path / "out"), "--json", str(report)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    assert bench.returncode == 0, bench.stdout + bench.stderr
    (stage,) = json.loads(report.read_text())["stages"]
    assert stage["chosen"]["one_se"] == stage["recorded_choice"] == search["chosen_trial"]
    assert [r["lambda"] for r in stage["trials"]] == pytest.approx(search["lambdas"]) and stage["rows"] == 50
    assert f"lambda auto chose {search['lambda']:.4g} after {search['trials']} trial(s)" in v1.description
    # the fixed stage trains with its own lambda and steps, and searches nothing
    params = client.get_run(v2.run_id).data.params
    assert (params["lambda"], params["train.steps"]) == ("0.0", "10") and _trial_runs(client, v2.run_id) == []
    assert VersionRecord.from_tags(v2.tags).auto_lambda is None


def test_a_budget_no_lambda_in_range_meets_registers_the_stage_unpromoted_in_one_line(tmp_path):
    cfg = tmp_path / "auto.yaml"
    data = demo_base_config(0.05, (0.01, 0.02), 3)  # at these lambdas the source forgets about 0.2
    data["domains"] = data["domains"][:1]
    cfg.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [lalora_script(), "run", str(cfg), "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    search = result["auto"]["1"]
    assert not search["feasible"] and search["lambdas"] == pytest.approx([0.0002**0.5, 0.02])
    line = (
        f"no lambda in [0.01, 0.02] keeps validation forgetting within 0.05: the smallest reached was "
        f"{search['validation_forgetting']:.3f} (source, lambda {search['lambda']:g}) after 2 trial(s)"
    )
    said = [x.strip() for x in proc.stdout.splitlines() if line in x]  # once as the search ends, once in the summary
    assert len(said) == 2, said
    hint = "; raise lalora.auto.max_lambda or the budget"
    assert said[0].endswith(f"WARNING flows.auto_lambda: {line}{hint}"), said  # after a progress bar's last redraw
    assert said[1] == f"promotion:  version 1 (stage 1) NOT promoted: {line}{hint}", said
    assert "lalora: error" not in proc.stdout
    assert "Traceback" not in proc.stdout
    client = _client(tmp_path / "out")
    (v1,) = client.search_model_versions("name = 'auto-adapter'")
    assert v1.tags["lalora.promotion"] == "rejected" and line in v1.tags["lalora.promotion_reason"]
    assert "champion" not in client.get_registered_model("auto-adapter").aliases
    assert result["promotion"]["1"]["promoted"] is False


def _kill_config() -> str:
    domain = {**DOMAINS["one"], "val_size": 16}
    return tiny(
        domain,
        name="killed",
        source={"val_size": 16},
        model={"pretrain": {"steps": 10}},
        lalora={"lambda": "auto", "auto": {"max_forgetting": 0.5, "max_trials": 3, "trial_share": 0.5}},
        training={"steps": 40, "lr": 5.0e-3, "log_every": 4, "checkpoint_every": 4},
        tracking={"experiment": "auto", "registered_model": "auto-adapter"},
    )


def _trial_step(out: Path, trial: int) -> int:
    from pipelines.runtime.engine import _latest_tag

    found = list((out / "stages" / "01-one" / "auto" / f"trial-{trial:02d}" / "checkpoints").glob("*/latest"))
    tag = _latest_tag(found[0].parent) if found else None
    return int(tag.removeprefix("step")) if tag else 0


def test_a_run_killed_during_a_trial_resumes_at_that_trial_and_ends_as_an_uninterrupted_run(tmp_path):
    from prefect.settings import PREFECT_API_URL

    cfg = tmp_path / "killed.yaml"
    cfg.write_text(_kill_config())
    out = tmp_path / "killed"
    proc = run_until_then_sigkill(
        ["run", str(cfg), "--out", str(out)],
        child_env(PREFECT_API_URL=str(PREFECT_API_URL.value())),
        tmp_path / "killed.log",
        lambda: _trial_step(out, 2) >= 8,
    )
    assert proc.returncode == -signal.SIGKILL
    killed_at = _trial_step(out, 2)
    assert 8 <= killed_at < 20
    saved = json.loads((out / "stages" / "01-one" / "auto" / "trials.json").read_text())["trials"]
    assert [t["index"] for t in saved] == [1]  # trial 1 finished and recorded, trial 2 interrupted

    resumed = lineage_flow(str(cfg), str(out), []).as_json()
    reference = lineage_flow(str(cfg), str(tmp_path / "reference"), []).as_json()
    assert resumed["auto"]["1"]["lambdas"] == reference["auto"]["1"]["lambdas"]
    assert resumed["auto"]["1"]["lambda"] == reference["auto"]["1"]["lambda"]
    search = resumed["auto"]["1"]
    assert search["trial_steps"] == search["trials"] * 20 and search["stage_steps"] == 40  # trials of half a stage
    for key in ("R", "R_nll"):
        for got, want in zip(resumed[key], reference[key], strict=True):
            assert got == pytest.approx(want, abs=1e-6), key
    client = _client(out)
    (v1,) = client.search_model_versions("name = 'auto-adapter'")
    trials = _trial_runs(client, v1.run_id)
    assert [r.data.tags["lalora.trial"] for r in trials] == [str(k) for k in range(1, search["trials"] + 1)]
    assert trials[0].data.tags["lalora.trial_run"] == saved[0]["run_id"]  # trial 1's record, from the killed run
    steps = [m.step for m in client.get_metric_history(trials[1].info.run_id, "train/loss")]
    assert min(steps) > killed_at and max(steps) == 20  # trial 2 continued from its checkpoint
