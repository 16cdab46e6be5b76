"""Shared fixtures: seeded tiny peft models built from a config (nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from pipelines.tracker import NullTracker

VOCAB = 11

if os.environ.get("PYTEST_XDIST_WORKER"):  # make test's workers share the cores: one torch thread each (and children)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _one_layer_llama(vocab: int, hidden: int, intermediate: int, max_positions: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def tiny_lora_model(seed: int = 0, vocab: int = VOCAB, nonzero_b: bool = True, r: int = 2):
    """A 1-layer Llama with LoRA on q/v/up projections, fp32, eval mode."""
    torch.manual_seed(seed)
    base = _one_layer_llama(vocab, 16, 24, 32)
    model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    if nonzero_b:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def wide_lora_model(
    seed: int = 0,
    hidden: int = 144,
    intermediate: int = 320,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "up_proj"),
):
    """A 1-layer Llama, LoRA on ``targets`` (A and B ~ N(0, 0.3^2)); at hidden 144 and MLP 320 every large factor is
    compressed by a sketch at top_k 8 (``lalora.factors.sketched``), so its sum keeps the rows while at most n."""
    torch.manual_seed(seed)
    base = _one_layer_llama(VOCAB, hidden, intermediate, 64)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=list(targets)))
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _stop_ephemeral_prefect_servers():
    """Stop the ephemeral Prefect servers an in-process run started (``lalora sweep`` through ``flows.cli.main``)
    while the session's output is still open: Prefect stops them at exit otherwise, and its log line then meets
    a closed stream (a "--- Logging error ---" traceback in the test log)."""
    yield
    import sys

    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in {id(s): s for s in SubprocessASGIServer._instances.values()}.values():
            server.stop()


@pytest.fixture
def model():
    return tiny_lora_model()


def padded_batch(seed: int = 1, vocab: int = VOCAB, lengths=(7, 5, 6, 3)):
    """Right-padded sequences with masked prompts (2 tokens) and padding, like training batches."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
        labels[i, 2:n] = ids[i, 2:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child process (`python -m flows.cli ...`): the repository importable, and
    none of this process's rendezvous (in-process DeepSpeed tests set MASTER_* explicitly)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    }
    return env | {"PYTHONPATH": str(ROOT), **extra}


def lalora_script() -> str:
    """The installed ``lalora`` console script of this interpreter's environment (what a user runs)."""
    import shutil
    import sys

    script = Path(sys.executable).parent / "lalora"
    found = str(script) if script.is_file() else shutil.which("lalora")
    assert found, "the lalora console script is not installed (pip install -e .)"
    return found


def run_lalora(args: list[str], tmp_path: Path, *, timeout: float = 600, **env: str) -> tuple[int, str]:
    """``lalora ARGS`` in a subprocess, as a terminal runs it: (exit code, stdout and stderr together).

    Its Prefect home is a fresh, not yet existing directory under ``tmp_path`` (the command must create it).
    """
    import subprocess

    home = tmp_path / "prefect-home" / "nested"
    proc = subprocess.run(
        [lalora_script(), *args],
        env=child_env(PREFECT_HOME=str(home), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout


def assert_one_line_error(output: str, fragment: str) -> None:
    """No traceback anywhere; exactly one error line, the last one, holding ``fragment``."""
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, errors
    last = output.strip().splitlines()[-1]
    assert last == errors[0] and last.startswith("lalora: error: ") and fragment in last, last


def run_until_then_sigkill(
    args: list[str], env: dict[str, str], log_path: Path, reached: Any, timeout: float = 300
) -> Any:
    """Start ``python -m flows.cli ARGS`` (its output to ``log_path``: a file, not a pipe, so nothing blocks the
    child while we poll), wait until ``reached()`` holds, SIGKILL it; the finished process. Fails when the run
    ended first."""
    import signal
    import subprocess
    import sys
    import time

    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.time() + timeout
            while not reached() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, f"the run ended before it was killed: {log_path.read_text()[-2000:]}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc


class LossSteps(NullTracker):
    """A tracker that keeps the steps at which the training loss was logged (what a resumed fine-tune trained)."""

    def __init__(self) -> None:
        self.steps: list[int | None] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "train/loss" in metrics:
            self.steps.append(step)
