"""R per score, metrics by domain name, tracker metrics, plots and the learning/forgetting Pareto front."""

import pytest

from pipelines.report import TradeOffPoint, build_report, format_matrix, pareto_front, write_plots
from pipelines.sweep import SeriesRow, plot_pareto


def score(metric, value, nll, **values):
    return {"scoring": "x", "metric": metric, "score": value, "higher_is_better": metric not in ("nll", "perplexity"),
            "n": 10, "nll": nll, metric: value, **values}


# source scored by NLL, one stage "math" (accuracy), one probe "hs" (acc_norm)
ROWS = [{"wiki": score("nll", 2.0, 2.0), "math": score("accuracy", 0.1, 1.5), "hs": score("acc_norm", 0.6, 1.1, acc=0.5)},
        {"wiki": score("nll", 2.5, 2.5), "math": score("accuracy", 0.7, 0.5), "hs": score("acc_norm", 0.5, 1.3, acc=0.45)}]


def test_r_per_score_and_metrics_by_domain():
    report = build_report(["wiki", "math", "hs"], ROWS)
    assert report.R == [[2.0, 0.1, 0.6], [2.5, 0.7, 0.5]] and report.R_nll == [[2.0, 1.5, 1.1], [2.5, 0.5, 1.3]]
    assert report.R_scores["acc"] == [[None, None, 0.5], [None, None, 0.45]]
    assert report.R_scores["accuracy"] == [[None, 0.1, None], [None, 0.7, None]]
    m = report.metrics
    assert m["ACC"] == pytest.approx(0.6) and m["BWT"] == pytest.approx(-0.1) and m["FWT"] is None
    assert m["forgetting"] == pytest.approx({"wiki": 0.5, "hs": 0.1}) and m["learning"] == pytest.approx({"math": 0.6})
    assert m["source_forgetting"] == pytest.approx(0.1) and m["averaged"] == ["math", "hs"]
    js = report.as_json("model", ["1"])
    assert js["probes"] == ["hs"] and js["scores"] == {"wiki": "nll", "math": "accuracy", "hs": "acc_norm"}
    assert js["higher_is_better"] == {"wiki": False, "math": True, "hs": True}
    flat = report.flat_metrics()
    assert flat["forgetting/wiki"] == pytest.approx(0.5) and flat["learning/math"] == pytest.approx(0.6)
    assert "FWT" not in flat and flat["ACC"] == pytest.approx(0.6)
    assert report.stage_metrics()[1] == {"R/wiki": 2.5, "R/math": 0.7, "R/hs": 0.5,
                                         "R_nll/wiki": 2.5, "R_nll/math": 0.5, "R_nll/hs": 1.3}
    assert format_matrix(report.domains, report.R, scores=report.scores).startswith("R (nll, accuracy, acc_norm)")


def test_plots_are_written(tmp_path):
    report = build_report(["wiki", "math", "hs"], ROWS)
    paths = write_plots(report, tmp_path, "test")
    assert [p.name for p in paths] == ["R.png", "scores.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_pareto_front_by_hand(tmp_path):
    points = [TradeOffPoint(0.5, 0.1, "a"), TradeOffPoint(0.6, 0.3, "b"), TradeOffPoint(0.4, 0.2, "c"),
              TradeOffPoint(0.6, 0.35, "d"), TradeOffPoint(0.2, 0.0, "e"), TradeOffPoint(0.5, 0.1, "f")]
    # c is beaten by a (more learning, less forgetting), d by b (same learning, less forgetting)
    assert pareto_front(points) == [4, 0, 5, 1]
    assert pareto_front([TradeOffPoint(1.0, 1.0)]) == [0]
    rows = [SeriesRow("diag", float(i), 1, p.learning, 0.0, p.forgetting, 0.0, 0.0, 0.0, 0.0, pareto=i in (4, 0, 5, 1))
            for i, p in enumerate(points)]
    path = plot_pareto(rows, tmp_path / "pareto.png", "lambda sweep")
    assert path.stat().st_size > 5000


def _metrics(R):
    from lalora import continual_metrics

    m = continual_metrics(R)
    domains = ["source", "a", "b"]
    forgetting = dict(zip(domains, m.forgetting))
    return {"domains": domains, "R": R, "forgetting": forgetting, "mean_forgetting": sum(m.forgetting) / len(m.forgetting)}


def test_demo_target_by_hand():
    from pipelines.report import check_target

    plain = _metrics([[0.9, 0.2, 0.1], [0.1, 1.0, 0.1], [0.0, 0.2, 0.9]])  # forgets 0.9 and 0.8: mean 0.85
    good = _metrics([[0.9, 0.2, 0.1], [0.8, 0.85, 0.1], [0.7, 0.6, 0.75]])  # forgets 0.2, 0.25: mean 0.225; 85%, 83%
    check = check_target(plain, good)
    assert check.plain_max_drop == pytest.approx(0.9) and check.plain_mean_forgetting == pytest.approx(0.85)
    assert check.mean_forgetting == pytest.approx(0.225)
    assert check.learned_ratio == pytest.approx({"a": 0.85, "b": 0.75 / 0.9}) and check.met
    slow = _metrics([[0.9, 0.2, 0.1], [0.8, 0.85, 0.1], [0.7, 0.6, 0.7]])  # b: 0.7 / 0.9 < 0.8
    assert not check_target(plain, slow).met
    leaky = _metrics([[0.9, 0.2, 0.1], [0.3, 0.85, 0.1], [0.2, 0.3, 0.9]])  # forgets 0.7, 0.55: over half of 0.85
    assert not check_target(plain, leaky).met
    with pytest.raises(ValueError, match="different domains"):
        check_target(plain, {**good, "domains": ["source", "a", "c"]})


def test_demo_target_script_exit_codes(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "demo_target.py"
    plain = _metrics([[0.9, 0.2, 0.1], [0.1, 1.0, 0.1], [0.0, 0.2, 0.9]])
    runs = {"plain": plain, "good": _metrics([[0.9, 0.2, 0.1], [0.8, 0.85, 0.1], [0.7, 0.6, 0.75]]),
            "slow": _metrics([[0.9, 0.2, 0.1], [0.8, 0.85, 0.1], [0.7, 0.6, 0.7]])}
    for name, m in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(m))

    def run(*args):
        return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True)

    ok = run(tmp_path / "plain.json", tmp_path / "good.json")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("target met"), ok.stdout + ok.stderr
    slow = run(tmp_path / "plain.json", tmp_path / "slow.json")
    assert slow.returncode == 1 and "stage 2 b: R[2][2] LaLoRA 0.700 / plain 0.900 = 78% (>= 80%: NO)" in slow.stdout
    as_json = json.loads(run(tmp_path / "plain.json", tmp_path / "good.json", "--json").stdout)
    assert as_json["met"] is True and as_json["mean_forgetting"] == pytest.approx(0.225)
    missing = run(tmp_path / "nope.json", tmp_path / "good.json")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1 and "nope.json" in missing.stderr
