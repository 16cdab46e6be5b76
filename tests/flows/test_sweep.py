"""`lalora sweep` end to end on the tiny model: child runs, the table and the plot agree."""

import json

import pytest
from mlflow import MlflowClient

from flows.cli import main
from tests.configs import TINY, tiny
from tests.conftest import run_lalora

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    code = main(
        ["sweep", str(cfg), "--lambda", "0,5", "--curvature", "diag", "--stages", "1", "--out", str(root / "out")]
    )
    assert code == 0
    return root / "out"


def test_table_rows_match_the_child_runs(swept):
    summary = json.loads((swept / "sweep.json").read_text())
    client = MlflowClient(summary["mlflow_uri"])
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.points"] == "2"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert sorted(c.data.tags["lalora.sweep_point"] for c in children) == ["diag-lambda5-seed0", "plain-lambda0-seed0"]
    rows = {(r["curvature"], r["lam"]): r for r in summary["rows"]}
    assert set(rows) == {("plain", 0.0), ("diag", 5.0)}
    for child in children:
        m = child.data.metrics
        row = next(r for r in summary["rows"] if r["run_ids"] == [child.info.run_id])
        assert row["learning"] == pytest.approx(m["mean_learning"])
        assert row["forgetting"] == pytest.approx(m["mean_forgetting"])
        assert row["ACC"] == pytest.approx(m["ACC"])
        assert child.data.params["lalora.lambda"] == ("0.0" if row["curvature"] == "plain" else "5.0")
        # one stage: forgetting is the drop on the source
        point = next(p for p in summary["points"] if p["run_id"] == child.info.run_id)
        R = point["R"]
        assert len(R) == 2 and row["forgetting"] == pytest.approx(max(R[0][0] - R[1][0], 0.0))
    table = (swept / "sweep.md").read_text()
    assert "| plain | 0 | 1 |" in table and "| diag | 5 | 1 |" in table
    assert any(r["pareto"] for r in summary["rows"])
    assert (swept / "pareto.png").stat().st_size > 1000
    arts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"sweep.json", "sweep.md", "pareto.png"} <= arts


def test_the_base_is_pretrained_once_and_each_point_registers_its_own_model(swept):
    summary = json.loads((swept / "sweep.json").read_text())
    client = MlflowClient(summary["mlflow_uri"], registry_uri=summary["mlflow_uri"])
    names = sorted(m.name for m in client.search_registered_models())
    assert names == ["tiny-adapter-diag-lambda5-seed0", "tiny-adapter-plain-lambda0-seed0"]
    bases = [json.loads((p / "base" / "lalora_base.json").read_text()) for p in (swept / "points").iterdir()]
    assert len(bases) == 2 and bases[0] == bases[1]
    experiments = [e.experiment_id for e in client.search_experiments()]
    pretrained = [r for r in client.search_runs(experiments) if "base.params" in r.data.params]
    assert len(pretrained) == 1  # only a pretraining logs base.params: the second point reused the first's base


def test_sweep_bad_input_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    assert main(["sweep", str(cfg), "--curvature", "diag,bogus"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lalora: error: --curvature: unknown kind(s) bogus; choose from diag, identity, kfac, kfac-tri"
    )
    assert main(["sweep", str(cfg), "--lambda", "0,x"]) == 2
    assert "--lambda" in capsys.readouterr().err
    assert main(["sweep", str(cfg), "--stages", "5", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lalora: error: --stages must be between 1 and 2 (the config's domains), got 5"
    )
    cases = [
        (["--lambda", ""], "lalora: error: --lambda '': expected comma-separated numbers or auto"),
        (["--curvature", ""], "lalora: error: --curvature '': no kind given"),
        (["--grid", "lora.target_modules=[q_proj]"], "['q_proj'] is a list or mapping; a grid sweeps numbers"),
        (["--grid", "lalora.lambda=true"], "lambda values must be numbers >= 0 or auto, got [True]"),
        (["--grid", "domains.9.name=a"], "lalora: error: --grid: domains.9.name: domains.9 is not an index"),
        (["--out", str(cfg)], f"lalora: error: --out {cfg}: is a file; give a directory"),
    ]
    for args, fragment in cases:  # refused before any lineage starts (no default sweep in place of an empty flag)
        assert main(["sweep", str(cfg), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (args, err)


def test_rerun_of_a_finished_sweep_reports_the_recorded_lineages_without_running_them(swept):
    before = json.loads((swept / "sweep.json").read_text())
    client = MlflowClient(before["mlflow_uri"], registry_uri=before["mlflow_uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs_before = {r.info.run_id for r in client.search_runs(experiments)}
    adapters = sorted((swept / "points").glob("*/stages/*/adapter/adapter_model.safetensors"))
    mtimes = [a.stat().st_mtime_ns for a in adapters]
    cfg = swept.parent / "tiny.yaml"
    args = ["sweep", str(cfg), "--lambda", "0,5", "--curvature", "diag", "--stages", "1", "--out", str(swept)]
    code, out = run_lalora(args, swept.parent)
    assert code == 0 and "Traceback" not in out, out[-3000:]
    assert "| plain | 0 | 1 |" in out and "| diag | 5 | 1 |" in out and "sweep of 2 lineages" in out
    after = json.loads((swept / "sweep.json").read_text())
    assert [(r["curvature"], r["learning"], r["forgetting"]) for r in after["rows"]] == [
        (r["curvature"], r["learning"], r["forgetting"]) for r in before["rows"]
    ]
    new = [r for r in client.search_runs(experiments) if r.info.run_id not in runs_before]
    assert [r.data.tags.get("lalora.sweep") for r in new] == ["tiny"]  # the rerun's own sweep run, nothing else
    assert len(adapters) == 4 and [a.stat().st_mtime_ns for a in adapters] == mtimes  # init and stage 1, each point
    assert all(len(client.search_model_versions(f"name = '{m.name}'")) == 1 for m in client.search_registered_models())


def test_stages_keeps_only_what_each_kept_domain_set(tmp_path):
    """--stages re-states the kept domains; a preset with eval_data must survive the round trip
    (dumping every default made the preset look overridden and the point's config invalid)."""
    from pipelines.config import load_config
    from pipelines.lineage.sweep import CURVATURE, LAMBDA, SweepPoint, point_config

    rows = "\n".join(
        json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) for i in range(40)
    )
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "eval.jsonl").write_text(rows)
    cfg_path = tmp_path / "math.yaml"
    math = {"data": {"kind": "local", "path": "train.jsonl"}, "preset": "gsm8k"}
    cfg_path.write_text(
        tiny(
            {"name": "math", **math, "eval_data": {"data": {"kind": "local", "path": "eval.jsonl"}, "preset": "gsm8k"}},
            {"name": "more-math", **math},
        )
    )
    cfg = load_config(cfg_path)
    point = point_config(cfg, SweepPoint(((CURVATURE, "diag"), (LAMBDA, 10.0)), 0), "sqlite:///x.db", 1)
    assert [d.name for d in point.domains] == ["math"]
    assert point.domains[0].eval_data == cfg.domains[0].eval_data
    assert point.domains[0].data == cfg.domains[0].data


def test_a_grid_of_any_config_field_sweeps_like_lambda(tmp_path, capsys):
    """--grid training.replay.fraction beside --lambda: one lineage per combination, the table labelled by the
    fields that vary, each point's config built as a value (its stored params say so)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    assert (
        main(
            [
                "sweep",
                str(cfg),
                "--lambda",
                "0,5",
                "--curvature",
                "diag",
                "--grid",
                "training.replay.fraction=0,0.5",
                "--stages",
                "1",
                "--forgetting-on",
                "src",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "sweep.json").read_text())
    labels = [p["point"]["label"] for p in summary["points"]]
    assert labels == [
        "plain-lambda0-fraction0-seed0",
        "plain-lambda0-fraction0.5-seed0",
        "diag-lambda5-fraction0-seed0",
        "diag-lambda5-fraction0.5-seed0",
    ]
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| curvature | lambda | fraction | seeds | learning | forgetting (src) |")
    assert "| diag | 5 | 0.5 | 1 |" in table[3 + 2]
    client = MlflowClient(summary["mlflow_uri"])
    for point in summary["points"]:
        params = client.get_run(point["run_id"]).data.params
        assert float(params["training.replay.fraction"]) == point["point"]["settings"]["training.replay.fraction"]
    assert summary["forgetting_on"] == "forgetting (src)"


def test_grid_bad_input_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    assert main(["sweep", str(cfg), "--grid", "training.nope=1,2"]) == 2
    assert "training.nope: unknown key" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["sweep", str(cfg), "--grid", "training.replay.fraction"]) == 2
    assert "expected FIELD=v1,v2" in capsys.readouterr().err
    assert main(["sweep", str(cfg), "--lambda", "0,5", "--forgetting-on", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lalora: error: --forgetting-on: nowhere is not an earlier column of this sweep; choose from src, one"


def test_a_sweep_point_can_search_its_lambda(tmp_path):
    """--lambda 0,auto: the auto point is labelled lambdaauto, its config searches with the sweep's budget, and
    the table's cells and the study's row names read it."""
    from flows.cli import _parser, _sweep_axes
    from pipelines.config import load_config
    from pipelines.lineage.sweep import LAMBDA, point_config, sweep_points
    from studies.study import method

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(TINY)
    args = _parser().parse_args(["sweep", str(cfg_path), "--lambda", "0,auto", "--curvature", "diag"])
    points = sweep_points(_sweep_axes(args), 1)
    assert [p.label for p in points] == ["plain-lambda0-seed0", "diag-lambdaauto-seed0"]
    assert points[1].lam == "auto" and points[1].curvature == "diag"
    cfg = load_config(cfg_path, ["lalora.auto.max_forgetting=0.1"])
    assert point_config(cfg, points[1], "sqlite:///x.db", 1).searches
    assert method(dict(points[1].settings)) == "diag lambda auto"
    assert dict(points[0].settings)[LAMBDA] == 0.0


def test_a_sweep_can_add_seeds_to_a_finished_one(tmp_path):
    """--seeds 1 --first-seed 2: only seed 2's points (their labels, registered models and LoRA seeds say so)."""
    from pipelines.config import load_config
    from pipelines.errors import BadInput
    from pipelines.lineage.sweep import CURVATURE, LAMBDA, Axis, point_config, sweep_points

    axes = [Axis(CURVATURE, ("diag",)), Axis(LAMBDA, (0.0, 10.0))]
    points = sweep_points(axes, 1, first_seed=2)
    assert [p.label for p in points] == ["plain-lambda0-seed2", "diag-lambda10-seed2"]
    assert [p.label for p in sweep_points(axes, 3)][-2:] == [p.label for p in points]  # as a 3-seed sweep's
    with pytest.raises(BadInput, match="--first-seed must be >= 0"):
        sweep_points(axes, 1, first_seed=-1)
    (tmp_path / "tiny.yaml").write_text(TINY)
    cfg = point_config(load_config(tmp_path / "tiny.yaml"), points[1], "sqlite:///x.db", 1)
    assert cfg.training.seed == 2 and cfg.lora.init_seed == 2
