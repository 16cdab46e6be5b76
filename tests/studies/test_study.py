"""The study driver (studies/study.py): its tables from the recorded sweeps, and a finished part not run again.

The recorded study (benchmarks/results/cpu-2026-12-01/study.json) holds every part's sweep.json as it was
written by ``lalora sweep``; these tests rebuild the tables from it and compare them with study.md, which
the docs' study page (docs/results/study.md) reproduces.
"""

import json
from pathlib import Path

import pytest

from studies import study

RECORDED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cpu-2026-12-01"


@pytest.fixture(scope="module")
def recorded():
    return json.loads((RECORDED / "study.json").read_text())


def test_every_part_was_recorded_without_a_failed_lineage(recorded):
    """The study of 2026-12-01 recorded the first eight parts as they are specified today; the parts added after
    it (a third seed of the two-stage anchors, lambda auto) are recorded by the study that ran them."""
    specs = {part.name: part for part in study.PARTS}
    assert [p["part"] for p in recorded["parts"]] == [part.name for part in study.PARTS[:8]]
    for part in recorded["parts"]:
        spec, summary = specs[part["part"]], part["summary"]
        assert summary["failed"] == [], part["part"]
        seeds = set(range(spec.first_seed, spec.first_seed + spec.seeds))
        assert {p["point"]["seed"] for p in summary["points"]} == seeds, part["part"]
        assert all(len(p["R"]) == spec.stages + 1 for p in summary["points"]), part["part"]
        assert part["command"].split(" --forgetting-on")[0].endswith(f"--seeds {spec.seeds}"), part["part"]


def test_added_parts_run_only_their_new_seeds_and_join_the_recorded_rows(recorded):
    """two-stage-seed2 adds seed 2 to the recorded two-stage part (the same settings): its command runs seed 2
    alone, and the two-stage tables average every seed of a method; without lambda auto's part there is no
    budget table."""
    added = next(p for p in study.PARTS if p.name == "two-stage-seed2")
    assert added.first_seed == 2 and added.seeds == 1
    assert study.budget_table(recorded["parts"]) == ("", {})
    extra = {
        "part": "two-stage-seed2",
        "summary": {
            "points": [
                {**p, "point": {**p["point"], "seed": 2}}
                for p in next(q for q in recorded["parts"] if q["part"] == "two-stage")["summary"]["points"]
                if p["point"]["seed"] == 0
            ]
        },
    }
    _, matrices = study.two_stage_tables([*recorded["parts"], extra])
    assert matrices["plain LoRA"]["seeds"] == 3 and matrices["diag lambda 10"]["seeds"] == 3
    assert matrices["replay 0.25"]["seeds"] == 2


def test_the_tables_rebuilt_from_the_recorded_sweeps_are_study_md_and_the_docs(recorded):
    parts = recorded["parts"]
    md = (RECORDED / "study.md").read_text()
    page = (RECORDED.parents[2] / "docs" / "results" / "study.md").read_text()
    one, table = study.one_stage_table(study._rows(parts, "one-stage"))
    two, matrices = study.two_stage_tables(parts)
    for text in (one, two, study.samples_table(study._rows(parts, "one-stage"))):
        assert text in md and text in page
    methods = [r["method"] for r in table]
    assert methods[0] == "plain LoRA" and "replay 0.25" in methods and "replay 0.25 + diag lambda 10" in methods
    assert not any("N_s" in m for m in methods)  # the curvature-size points have their own table
    assert set(matrices) == {"plain LoRA", "diag lambda 10", "replay 0.25", "replay 0.25 + diag lambda 10"}


def test_a_finished_part_is_reported_from_its_sweep_json_without_running(recorded, tmp_path):
    part = next(p for p in study.PARTS if p.name == "one-stage-kfac")
    summary = next(p["summary"] for p in recorded["parts"] if p["part"] == part.name)
    (tmp_path / part.name).mkdir()
    (tmp_path / part.name / "sweep.json").write_text(json.dumps(summary))
    result = study._run(part, tmp_path, lalora=str(tmp_path / "no-such-lalora"))  # running it would fail
    assert result["wall_seconds"] == summary["seconds"] and result["summary"] == summary
    assert not (tmp_path / f"{part.name}.log").exists()  # the part's log is not overwritten

    failed = [{"point": "kfac-lambda10-seed0", "reason": "diverged"}]
    (tmp_path / part.name / "sweep.json").write_text(json.dumps({**summary, "failed": failed}))
    with pytest.raises(FileNotFoundError):  # a part with a failed lineage runs again (its lineages resume)
        study._run(part, tmp_path, lalora=str(tmp_path / "no-such-lalora"))


def test_no_run_reports_what_an_unfinished_part_finished_so_far(tmp_path):
    """--no-run: a part without sweep.json is reported from its finished lineages' metrics.json (settings and
    seed from the sweep's own labels) and nothing is launched; the commands' list says it did not finish."""
    part = next(p for p in study.PARTS if p.name == "two-stage-seed2")
    done = tmp_path / part.name / "points" / "plain-lambda0-seed2"
    done.mkdir(parents=True)
    R = [[0.8, 1.5, 1.4, 0.79], [0.6, 1.2, 1.1, 0.75], [0.55, 1.3, 0.6, 0.75]]
    (done / "metrics.json").write_text(
        json.dumps({"R": R, "BWT": -0.1, "timing": [{"wall_seconds": 5.0}, {"wall_seconds": 6.0}]})
    )
    (tmp_path / part.name / "points" / "diag-lambda10-seed2").mkdir()  # started, not finished: left out
    result = study._run(part, tmp_path, lalora=str(tmp_path / "no-such-lalora"), run=False)
    points = result["summary"]["points"]
    assert [p["point"]["label"] for p in points] == ["plain-lambda0-seed2"] and points[0]["seconds"] == 11.0
    assert study.method(points[0]["point"]["settings"]) == "plain LoRA" and points[0]["point"]["seed"] == 2
    assert "not finished; 1 of 2 lineages reported" in study.commands([result])


def test_reuse_reports_a_part_an_earlier_study_recorded_whole_and_runs_the_rest(tmp_path):
    """--reuse: the study of 2026-12-05 recorded lambda auto's seed 0 (then one part of three seeds, reported
    with --no-run); today each seed is its own part. Seed 0 is reported from that file and not run; seed 1, which
    it did not record, runs (here: fails to start, lalora being absent); a part whose settings differ is not
    taken from a recorded part of the same name."""
    partial = RECORDED.parent / "cpu-2026-12-05" / "study-partial" / "study.json"
    absent = str(tmp_path / "no-such-lalora")
    seed0, seed1 = (next(p for p in study.PARTS if p.name == n) for n in ("two-stage-auto", "two-stage-auto-seed1"))
    result = study._run(seed0, tmp_path, lalora=absent, reuse=(partial,))
    assert result["reused"] == str(partial) and [p["point"]["seed"] for p in result["summary"]["points"]] == [0]
    assert result["summary"]["points"][0]["auto"]["1"]["lambda"] == 1.0
    assert "recorded by an earlier invocation" in study.commands([result])
    with pytest.raises(FileNotFoundError):
        study._run(seed1, tmp_path, lalora=absent, reuse=(partial,))
    other = study.Part("two-stage", ("--curvature", "diag", "--lambda", "0,100"), 2, 2)
    assert study._recorded(other, [partial]) is None


def test_the_budget_table_rebuilt_from_the_finished_study_is_its_study_md_and_the_docs():
    """The study of 2026-12-05: lambda auto at 3 seeds beside the two-stage anchors at 3 seeds each; its table is
    rebuilt from study.json, and study.md and the docs' study page hold it."""
    finished = RECORDED.parent / "cpu-2026-12-05"
    parts = json.loads((finished / "study.json").read_text())["parts"]
    table, figures = study.budget_table(parts)
    assert table in (finished / "study.md").read_text()
    assert table.split("\n\nTargets")[0] in (RECORDED.parents[2] / "docs" / "results" / "study.md").read_text()
    assert {m: len(f["learning2"]) for m, f in figures["figures"].items()} == {
        "plain LoRA": 3,
        "diag lambda 10": 3,
        "replay 0.25": 3,
        "diag lambda auto": 3,
    }
    assert figures["kept"] == [True, True] and 0.6 < figures["share"] < 0.62


def test_the_frontier_rows_rebuilt_from_their_recorded_sweeps_are_the_docs_figures():
    """Issue 26's frontier (fixed diag lambda 0.03 at seeds 0-2, 0.003 at seed 0; one sweep.json a command, under
    cpu-2026-12-05/frontier): as the parts two-stage-frontier and -low, the budget table gains their rows, the
    recorded rows stay as they were, and the figures the docs' study page states are those of the rows."""
    finished = RECORDED.parent / "cpu-2026-12-05"
    parts = json.loads((finished / "study.json").read_text())["parts"]

    def points(*names: str) -> list[dict]:
        return [json.loads((finished / "frontier" / n).read_text())["points"][0] for n in names]

    frontier = [
        {
            "part": "two-stage-frontier",
            "summary": {"points": points(*(f"diag-lambda0.03-seed{s}.json" for s in range(3)))},
        },
        {"part": "two-stage-frontier-low", "summary": {"points": points("diag-lambda0.003-seed0.json")}},
    ]
    assert {p.name for p in study.PARTS} >= {f["part"] for f in frontier}
    before, _ = study.budget_table(parts)
    table, figures = study.budget_table(parts + frontier)
    rows = table.split("\n\nTargets")[0].splitlines()
    assert rows[:6] == before.split("\n\nTargets")[0].splitlines()  # the recorded rows unchanged
    assert rows[6].startswith("| diag lambda 0.03 | 3 | 0.03 | 1 / 1 | 0.023 +- 0.075 | 0.043 +- 0.060 |")
    assert rows[6].endswith("| 0.672 +- 0.029 | 79% |")
    assert rows[7].startswith("| diag lambda 0.003 | 1 | 0.003 | 1 / 1 | 0.180 +- 0.000 | 0.150 +- 0.000 |")
    low = figures["figures"]["diag lambda 0.003"]["learning2"][0]
    assert round(low, 3) == 0.734 and round(low / 0.833, 2) == 0.88  # the page's 88%: of seed 0's own plain LoRA
    page = (RECORDED.parents[2] / "docs" / "results" / "study.md").read_text()
    assert (
        "| 0.03 | 3 | 0.023 +- 0.075 (-0.02, 0.11, -0.02) | 0.043 +- 0.060 (0.05, -0.02, 0.10) | 0.672 +- 0.029 |"
        in page
    )


def test_lambda_auto_with_kfac_rows_rebuilt_from_their_recorded_sweeps_are_the_docs_figures():
    """Issue 26's search again, with kfac on 100 validation capitals (the parts two-stage-auto-kfac, -seed1, -seed2;
    one sweep.json a seed under cpu-2026-12-05/frontier): the budget table gains its row and its own verdict, the
    rows before it stay as they were, and the docs' study page states that row."""
    finished = RECORDED.parent / "cpu-2026-12-05"
    parts = json.loads((finished / "study.json").read_text())["parts"]

    def part(name: str, *files: str) -> dict:
        points = [json.loads((finished / "frontier" / f).read_text())["points"][0] for f in files]
        return {"part": name, "summary": {"points": points}}

    kfac = [
        part(f"two-stage-auto-kfac{'-seed' + str(s) if s else ''}", f"kfac-lambdaauto-val100-seed{s}.json")
        for s in range(3)
    ]
    assert {p.name for p in study.PARTS} >= {k["part"] for k in kfac}
    assert all("source.val_size=100" in p.args for p in study.PARTS if p.name.startswith("two-stage-auto-kfac"))
    before, _ = study.budget_table(parts)
    table, figures = study.budget_table(parts + kfac)
    rows = table.split("\n\nTargets")[0].splitlines()
    assert rows[:6] == before.split("\n\nTargets")[0].splitlines()
    assert rows[6].startswith("| kfac lambda auto | 3 | 0.316 +- 0.000 / 0.119 +- 0.171 | 3.000 +- 0.000 / 3.000")
    assert rows[6].endswith("| -0.037 +- 0.021 | 0.020 +- 0.026 | 0.369 +- 0.004 | 0.630 +- 0.026 | 74% |")
    kept = figures["targets"]["kfac lambda auto"]
    assert kept["kept"] == [True, True] and 0.74 < kept["share"] < 0.745
    assert table.endswith(
        "Targets, kfac lambda auto: capitals' forgetting within the budget 0.02 plus the seeds' spread at stage 1: "
        "holds; at stage 2: holds; second-stage learning at least 80% of plain LoRA's: 74%, does not hold."
    )
    assert rows[6] in (RECORDED.parents[2] / "docs" / "results" / "study.md").read_text()


def test_the_kfac_frontier_rows_are_their_recorded_sweeps():
    """The kfac frontier of the study page (one sweep.json a command under cpu-2026-12-05/frontier), the second
    stage's own lambda included: each row's forgetting, learning and share of its seed's plain LoRA are its R."""
    frontier = RECORDED.parent / "cpu-2026-12-05" / "frontier"
    page = (RECORDED.parents[2] / "docs" / "results" / "study.md").read_text()
    plain = {0: 0.833, 1: 0.885, 2: 0.832}  # each seed's plain LoRA (the budget table's plain rows)
    rows = {
        ("kfac 10", 0): "kfac-lambda10-seed0",
        ("kfac 10", 1): "kfac-lambda10-seed1",
        ("kfac 1", 0): "kfac-lambda1-seed0",
        ("kfac 0.3", 0): "kfac-lambda0.3-seed0",
        ("kfac 0.1", 0): "kfac-lambda0.1-seed0",
        ("kfac 0.3, then 0.001 at stage 2", 0): "kfac-lambda0.3-stage2-lambda0.001-seed0",
        ("kfac 0.3, then 0 (plain LoRA) at stage 2", 0): "kfac-lambda0.3-stage2-lambda0-seed0",
        ("kfac 0.3, then 0.1 at stage 2", 0): "kfac-lambda0.3-stage2-lambda0.1-seed0",
        ("kfac 0.3", 1): "kfac-lambda0.3-stage2-lambda0.3-seed1",
        ("kfac 0.3, then 0.1 at stage 2", 1): "kfac-lambda0.3-stage2-lambda0.1-seed1",
        ("kfac 0.3", 2): "kfac-lambda0.3-stage2-lambda0.3-seed2",
        ("kfac 0.3, then 0.1 at stage 2", 2): "kfac-lambda0.3-stage2-lambda0.1-seed2",
    }
    for (label, seed), name in rows.items():
        point = json.loads((frontier / f"{name}.json").read_text())["points"][0]
        assert point["point"]["seed"] == seed
        R = point["R"]
        stage1, stage2 = R[0][0] - R[1][0], max(R[0][0], R[1][0]) - R[2][0]  # the capitals
        learning = R[0][2] - R[2][2]  # gsm_symbolic's NLL drop from the base
        share = round(100 * learning / plain[seed])
        row = f"| {label} | {seed} | {stage1 + 0:.2f} | {stage2:.2f} | {learning:.3f} | "
        assert row in page, row
        line = page[page.index(row) :].splitlines()[0]
        assert f"| {share}%" in line or f"| **{share}%**" in line, line


def test_lambda_auto_against_plain_lora_on_its_own_training_rows():
    """The part two-stage-plain-valsplit (plain LoRA with lambda auto's validation rows held out of training, seeds
    0-2; cpu-2026-12-05/frontier/plain-valsplit.json): its row joins the budget table after the recorded rows, and
    each auto verdict adds its share of that plain LoRA's learning, the comparison on the same training rows."""
    finished = RECORDED.parent / "cpu-2026-12-05"
    parts = json.loads((finished / "study.json").read_text())["parts"]

    def part(name: str, file: str) -> dict:
        return {"part": name, "summary": {"points": json.loads((finished / "frontier" / file).read_text())["points"]}}

    kfac = [
        part(f"two-stage-auto-kfac{'-seed' + str(s) if s else ''}", f"kfac-lambdaauto-val100-seed{s}.json")
        for s in range(3)
    ]
    paired = part(study.PAIRED_PART, "plain-valsplit.json")
    spec = next(p for p in study.PARTS if p.name == study.PAIRED_PART)
    assert spec.seeds == 3 and spec.args[-8:] == tuple(a for kv in study.SPLITS for a in ("--set", kv))
    assert {p["point"]["seed"] for p in paired["summary"]["points"]} == {0, 1, 2}
    before, _ = study.budget_table(parts + kfac)
    table, figures = study.budget_table(parts + kfac + [paired])
    rows = table.split("\n\nTargets")[0].splitlines()
    assert rows[:7] == before.split("\n\nTargets")[0].splitlines()
    assert rows[7] == (
        "| plain LoRA, validation rows held out | 3 | 0 | 1 / 1 | 0.173 +- 0.064 | 0.203 +- 0.047 | 0.324 +- 0.017 "
        "| 0.764 +- 0.025 | 90% |"
    )
    assert 0.82 < figures["targets"]["kfac lambda auto"]["share_same_rows"] < 0.83
    assert 0.67 < figures["targets"]["diag lambda auto"]["share_same_rows"] < 0.68
    assert table.endswith(
        "second-stage learning at least 80% of plain LoRA's: 74%, does not hold; against plain LoRA trained on the "
        "same rows (the validation rows held out): 83%, holds."
    )
    page = (RECORDED.parents[2] / "docs" / "results" / "study.md").read_text()
    assert rows[7] in page


def test_which_trial_each_rule_takes_is_the_recorded_replay_and_the_one_se_lineage():
    """The study page's choice table (benchmarks/auto_choice.py on the three kfac searches, one JSON a seed) and the
    lineage run with one_se at seed 1, where the rules part (frontier/kfac-lambdaauto-val100-onese-seed1.json)."""
    finished = RECORDED.parent / "cpu-2026-12-05"
    page = (RECORDED.parents[2] / "docs" / "results" / "study.md").read_text()
    taken = {}
    for seed in range(3):
        replay = json.loads((finished / f"auto-choice-seed{seed}.json").read_text())
        assert replay["budget"] == 0.02 and [s["rows"] for s in replay["stages"]] == [40, 40]
        for stage in replay["stages"]:
            lam = {t["trial"]: t["lambda"] for t in stage["trials"]}
            assert stage["recorded_choice"] == stage["chosen"]["most_learning"]  # the search ran most_learning
            taken[seed, stage["stage"]] = tuple(f"{lam[stage['chosen'][r]]:.2g}" for r in ("most_learning", "one_se"))
    assert taken == {
        (0, 1): ("0.32", "0.32"),
        (0, 2): ("0.32", "0.32"),
        (1, 1): ("0.32", "3.2"),
        (1, 2): ("0.032", "0.32"),
        (2, 1): ("0.32", "0.32"),
        (2, 2): ("0.01", "0.01"),
    }
    (point,) = json.loads((finished / "frontier" / "kfac-lambdaauto-val100-onese-seed1.json").read_text())["points"]
    assert point["point"]["seed"] == 1
    assert [point["auto"][s]["choice"] for s in ("1", "2")] == ["one_se", "one_se"]
    assert [round(point["auto"][s]["lambda"], 3) for s in ("1", "2")] == [3.162, 0.316]
    R = point["R"]
    learning = R[0][2] - R[2][2]
    plain = json.loads((finished / "frontier" / "plain-valsplit.json").read_text())["points"]
    same_rows = next(p["R"] for p in plain if p["point"]["seed"] == 1)
    share = learning / (same_rows[0][2] - same_rows[2][2])
    assert f"gsm_symbolic's NLL drop {learning:.3f} ({share:.0%} of plain LoRA on the" in page
    assert "the capitals " + ", ".join(f"{r[0]:.2f}" for r in R) + " (forgetting -0.02 / 0.01" in page
