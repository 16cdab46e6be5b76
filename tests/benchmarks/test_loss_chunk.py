"""benchmarks/loss_chunk.py: both sides in their own processes, the same loss, the ratios in one JSON line; with
half of each sequence a masked prompt."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_env

pytestmark = pytest.mark.slow  # two model processes

ROOT = Path(__file__).resolve().parents[2]


def test_the_chunked_side_computes_the_full_sides_loss_and_both_are_measured():
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "loss_chunk.py"),
        "--vocab",
        "512",
        "--hidden",
        "32",
        "--batch",
        "2",
        "--seq",
        "16",
        "--chunk",
        "5",
        "--steps",
        "1",
        "--targets",
        "0.5",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["chunked"]["loss"] == pytest.approx(summary["full"]["loss"], rel=1e-5)
    assert summary["time_ratio"] > 0 and summary["peak_ratio"] > 0 and summary["logits_mib"] == 2 * 16 * 512 * 4 / 2**20
