"""R per score, metrics by domain name, tracker metrics, plots and the learning/forgetting Pareto front."""

import pytest

from pipelines.lineage.report import TradeOffPoint, build_report, format_matrix, pareto_front, write_plots
from pipelines.lineage.sweep import CURVATURE, LAMBDA, SeriesRow, plot_pareto
from pipelines.scoring.scores import DomainScore


def score(metric, value, nll, **values):
    return DomainScore("x", metric, {"nll": nll, metric: value, **values}, 10)


# source scored by NLL, one stage "math" (accuracy), one probe "hs" (acc_norm)
ROWS = [
    {"wiki": score("nll", 2.0, 2.0), "math": score("accuracy", 0.1, 1.5), "hs": score("acc_norm", 0.6, 1.1, acc=0.5)},
    {"wiki": score("nll", 2.5, 2.5), "math": score("accuracy", 0.7, 0.5), "hs": score("acc_norm", 0.5, 1.3, acc=0.45)},
]


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
    assert report.stage_metrics()[1] == {
        "R/wiki": 2.5,
        "R/math": 0.7,
        "R/hs": 0.5,
        "R_nll/wiki": 2.5,
        "R_nll/math": 0.5,
        "R_nll/hs": 1.3,
    }
    assert format_matrix(report.domains, report.R, scores=report.scores).startswith("R (nll, accuracy, acc_norm)")


def test_plots_are_written(tmp_path):
    report = build_report(["wiki", "math", "hs"], ROWS)
    paths = write_plots(report, tmp_path, "test")
    assert [p.name for p in paths] == ["R.png", "scores.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_pareto_front_by_hand(tmp_path):
    points = [
        TradeOffPoint(0.5, 0.1, "a"),
        TradeOffPoint(0.6, 0.3, "b"),
        TradeOffPoint(0.4, 0.2, "c"),
        TradeOffPoint(0.6, 0.35, "d"),
        TradeOffPoint(0.2, 0.0, "e"),
        TradeOffPoint(0.5, 0.1, "f"),
    ]
    # c is beaten by a (more learning, less forgetting), d by b (same learning, less forgetting)
    assert pareto_front(points) == [4, 0, 5, 1]
    assert pareto_front([TradeOffPoint(1.0, 1.0)]) == [0]
    rows = [
        SeriesRow(
            {CURVATURE: "diag", LAMBDA: float(i)},
            1,
            p.learning,
            0.0,
            p.forgetting,
            0.0,
            {"source": (p.forgetting, 0.0)},
            0.0,
            0.0,
            0.0,
            pareto=i in (4, 0, 5, 1),
        )
        for i, p in enumerate(points)
    ]
    path = plot_pareto(rows, tmp_path / "pareto.png", "lambda sweep")
    assert path.stat().st_size > 5000
