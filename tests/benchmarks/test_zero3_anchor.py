"""benchmarks/zero3_anchor.py, plain DeepSpeed ZeRO-3 beside ours, runs at its smallest shape and ends with one JSON
line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_env

pytestmark = pytest.mark.slow  # three processes with DeepSpeed engines (about 40 s): make test, not test-fast

ROOT = Path(__file__).resolve().parents[2]


TINY = ["--hidden", "64", "--layers", "1", "--vocab", "512", "--seq", "32", "--warmup", "1", "--steps", "2"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "zero3_anchor.py"), *TINY, "--repeats", "1", *args],
        cwd=ROOT,
        env=child_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = bench("--lambda", "0.5", "--work", str(tmp_path_factory.mktemp("zero3_anchor") / "w"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plain_and_ours_side_by_side_with_positive_figures(summary):
    for side in ("plain", "ours"):
        s = summary[side]
        assert s["tokens_per_s"] > 0 and s["peak_rss"] >= s["rss_start"] > 0 and len(s["tokens_per_s_repeats"]) == 1
        assert s["tokens_per_s_spread"] == 0.0 and len(s["step_ms_median_runs"]) == 1  # one run a side
        assert s["live_tensor_after_last_step"] > 0 and s["base_bytes_per_rank"] > 0
        assert s["trainable_bytes"] == summary["plain"]["trainable_bytes"]  # the same adapter on both sides
        assert s["live_models_training"]["DeepSpeedEngine"] >= 1
    ours = summary["ours"]
    assert ours["precision_bytes"] > 0 and ours["final_penalty"] > 0 and ours["tokens_per_step"] == 8 * 32
    assert summary["lambda"] == ours["lambda"] == 0.5  # --lambda reached the rank process
    assert summary["penalty_tensors"] > 0 and summary["ratios"]["zero3_tokens_per_s_vs_plain"] > 0
    step = summary["plain"]["step_ms_median"] / ours["step_ms_median"]
    assert summary["ratios"]["zero3_median_step_speed_vs_plain"] == pytest.approx(step)
    assert set(summary["targets"]) == {"zero3_tokens_per_s_vs_plain", "zero3_peak_memory_vs_plain_plus_penalty"}
    assert all(isinstance(v, bool) for v in summary["targets"].values())


def test_no_engine_or_base_from_the_curvature_step_is_alive_in_the_fine_tune(summary):
    """DeepSpeed 0.19.8 keeps a ZeRO-3 engine and its model referenced after ``engine.destroy()`` (a module left on
    its forward stack, a class-wide lru_cache); the engines' teardown drops both (pipelines/runtime/engine.py)."""
    ours = summary["ours"]
    assert ours["live_models_between_steps"]["DeepSpeedEngine"] == 0
    assert ours["live_models_between_steps"]["LlamaForCausalLM"] == 0
    assert ours["live_models_training"]["DeepSpeedEngine"] == 1
    assert ours["live_models_training"]["LlamaForCausalLM"] == 1  # the fine-tune's own, nothing else
    assert ours["live_models_after_finetune"]["DeepSpeedEngine"] == 0
    assert ours["live_models_after_finetune"]["LlamaForCausalLM"] == 0


def test_the_fine_tune_alone_runs_without_a_curvature_step_or_penalty(tmp_path):
    """--finetune-only: ours is the fine-tune alone (what the data path holds, without what the curvature step
    leaves); it trains without a precision, so it asks for --lambda 0 in one line first."""
    refused = bench("--finetune-only", "--work", str(tmp_path / "r"))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == ["--finetune-only trains without a precision: add --lambda 0"]
    out = bench("--finetune-only", "--lambda", "0", "--work", str(tmp_path / "w"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    ours = summary["ours"]
    assert summary["finetune_only"] and ours["lambda"] == 0.0 and ours["final_penalty"] == 0.0
    assert ours["precision_bytes"] == 0 and ours["curvature_step_s"] < 1.0 and ours["tokens_per_s"] > 0
    assert ours["rss_between_steps"] - ours["rss_start"] < 16  # nothing ran before the fine-tune
