"""benchmarks/gpu_suite.py, the one script a lent GPU runs, runs here too: --shape tiny --device cpu."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import child_env

pytestmark = pytest.mark.slow  # DeepSpeed engines in a subprocess: make test, not test-fast

ROOT = Path(__file__).resolve().parents[2]


def test_the_suite_runs_on_the_cpu_and_ends_with_one_json_line(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_suite.py"),
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--steps",
        "3",
        "--seq",
        "48",
        "--gen-prompt",
        "8",
        "--gen-new",
        "4",
        "--work",
        str(tmp_path / "w"),
        "--options",
        "activation_checkpointing,loss_chunk_1024",
        "--budget-s",
        "900",  # the optional last measurement runs, however slow this machine
    ]  # fused AdamW: tests/pipelines/test_train_options
    out = subprocess.run(
        cmd, cwd=ROOT, env=child_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["anchor"] == {"skipped": "the anchor is CUDA-only (nccl, a 1B model on cuda)"}
    for zero in ("zero2", "zero3"):
        stages = summary["finetune"][zero]["stages"]
        assert [s["stage"] for s in stages] == [1, 2]
        assert all(s["tokens_per_s"] > 0 and s["final_penalty"] > 0 and s["base_bytes_per_rank"] > 0 for s in stages)
    # one rank holds the whole base at either stage; the same steps give the same losses
    z2, z3 = (summary["finetune"][z]["stages"] for z in ("zero2", "zero3"))
    assert [s["base_bytes_per_rank"] for s in z2] == [s["base_bytes_per_rank"] for s in z3]
    assert [s["final_loss"] for s in z2] == pytest.approx([s["final_loss"] for s in z3], rel=1e-5)
    options = summary["finetune_options"]  # each fine-tune option, one stage at ZeRO-2, beside the defaults
    assert set(options) == {"defaults", "activation_checkpointing", "loss_chunk_1024"}
    for name, got in options.items():
        assert got["tokens_per_s"] > 0, name
        if name != "defaults":  # the same first stage, computed another way
            assert got["tokens_vs_defaults"] > 0 and got["peak_vs_defaults"] is None, name
            assert got["final_loss"] == pytest.approx(z2[0]["final_loss"], rel=1e-4), name
    assert summary["curvature"]["diag_vs_backward"] > 0 and summary["curvature"]["kfac_vs_backward"] > 0
    generation = summary["generation"]
    assert 0 < generation["new_tokens"] <= 8 * 4 and generation["completions_equal_hf_merged"]
    assert generation["vs_hf_merged"] > 0 and generation["vs_hf_peft"] > 0
    assert not generation["deepspeed_linear_replaced"]  # the ZeRO-3 series before it put torch's linear back
    loglik = summary["loglik"]
    assert loglik["pairs"] == 8 * 4 * 4 and loglik["vs_plain_forward"] > 0
    assert loglik["max_abs_diff_vs_plain_forward"] < 1e-3  # the same log-likelihoods, merged either way (fp32)
    z3 = summary["zero3_vs_plain"]  # DeepSpeed's plain ZeRO-3 beside ours, each its own process
    assert z3["plain"]["side"] == "plain" and z3["ours"]["side"] == "ours" and z3["penalty_tensors"] > 0
    assert z3["plain"]["peak_gpu"] is None and z3["ours"]["final_penalty"] > 0  # no GPU here: RSS is the memory
    assert summary["ratios"]["zero3_tokens_per_s_vs_plain"] > 0
    assert (
        z3["ours_loss_chunk_1024"]["side"] == "ours"
        and summary["ratios"]["zero3_loss_chunk_1024_tokens_per_s_vs_plain"] > 0
    )
    assert set(summary["targets"]) == {
        "finetune_zero2_vs_anchor_zero2 >= 1.00",
        "diag_curvature_vs_backward <= 1.3",
        "kfac_curvature_vs_backward <= 2.0",
        "generation_vs_hf_merged >= 1.00",
        "loglik_vs_plain_forward >= 1.00",
        "zero3_tokens_per_s_vs_plain",
        "zero3_peak_memory_vs_plain_plus_penalty",
    }
    assert all(isinstance(v, bool) for k, v in summary["targets"].items() if not k.startswith("finetune"))
    assert (tmp_path / "w" / "z3-stage2" / "adapter" / "adapter_model.safetensors").is_file()
