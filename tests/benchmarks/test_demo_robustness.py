"""benchmarks/demo_robustness.py's table, margins and exit status, on the demo's recorded metrics (a cell whose
metrics.json exists is not run again, so no lineage trains here; `make demo-robustness` runs them all)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import child_env

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "benchmarks" / "results" / "cpu-2026-12-04"


def _cell(out: Path, name: str, plain: str, lalora: str) -> None:
    for kind, src in (("plain", plain), ("lalora", lalora)):
        (out / f"{name}-{kind}").mkdir(parents=True)
        shutil.copy(RECORDED / src, out / f"{name}-{kind}" / "metrics.json")


def _grid(out: Path, capability: str) -> tuple[int, list[str], dict]:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "demo_robustness.py"),
            "--capabilities",
            capability,
            "--seeds",
            "0",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, lines, json.loads(lines[-1])


def test_a_cell_that_meets_the_target_and_one_that_does_not(tmp_path):
    _cell(tmp_path, "avx512-seed0", "demo-lambda0-metrics.json", "demo-metrics.json")
    code, lines, report = _grid(tmp_path, "avx512")
    assert code == 0 and report["met"], lines
    assert "| avx512 (AVX512) | 0 | 0.613 | 0.162 | 0.307 | 86% | yes |" in lines
    assert round(report["smallest_forgetting_margin"], 3) == 0.145
    assert round(report["smallest_learning_margin"], 3) == 0.065
    # plain LoRA against itself: it forgets as much as plain LoRA, so the cell misses and the grid exits 1
    _cell(tmp_path, "avx2-seed0", "demo-lambda0-metrics.json", "demo-lambda0-metrics.json")
    code, lines, report = _grid(tmp_path, "avx2")
    assert code == 1 and not report["met"], lines
    assert "| avx2 (AVX512) | 0 | 0.613 | 0.613 | 0.307 | 100% | NO |" in lines
    assert "0 of 1 cells meet the target" in "\n".join(lines)
