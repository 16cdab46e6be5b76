"""SIGKILL the `lalora run` process mid-fine-tune; the rerun continues from the last DeepSpeed
checkpoint and ends exactly where an uninterrupted run with the same seed ends."""

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file
from torch.testing import assert_close

from flows.lineage_flow import lineage_flow
from tests.configs import tiny
from tests.conftest import child_env, run_until_then_sigkill

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast


def config(replay: float, zero_stage: int) -> str:
    return tiny(
        "one",
        name="killed",
        model={"pretrain": {"steps": 10}},
        training={"steps": 48, "lr": 5.0e-3, "log_every": 4, "checkpoint_every": 4, "replay": {"fraction": replay}},
        deepspeed={"zero_stage": zero_stage},
        tracking={"experiment": "killed", "registered_model": "killed-adapter"},
    )


def _latest_step(out: Path) -> int:
    """The step a rerun resumes from, read as pipelines.runtime.engine does (an empty ``latest``, left by a
    kill while DeepSpeed rewrote it, stands for the newest tag)."""
    from pipelines.runtime.engine import _latest_tag

    found = list((out / "stages" / "01-one" / "checkpoints").glob("*/latest"))
    tag = _latest_tag(found[0].parent) if found else None
    return int(tag.removeprefix("step")) if tag else 0


@pytest.mark.parametrize("replay,zero_stage", [(0.0, 0), (0.25, 0), (0.0, 3)], ids=["plain", "replay", "zero3"])
def test_sigkill_mid_finetune_then_rerun_equals_an_uninterrupted_run(tmp_path, replay, zero_stage):
    """With replay too: the source's rows fill a quarter of every batch, and the resumed stage skips exactly
    the batches it trained. At ZeRO-3 the checkpoint holds the adapter's partition and its optimizer state;
    the resumed engine gathers it whole again."""
    from prefect.settings import PREFECT_API_URL

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(config(replay, zero_stage))
    out = tmp_path / "killed"
    seed = int(os.environ.get("LALORA_KILL_SEED") or time.time_ns() % 2**32)
    kill_at = random.Random(seed).choice(range(8, 37, 4))
    print(f"kill seed {seed} (rerun with LALORA_KILL_SEED={seed}): SIGKILL at step {kill_at}")
    # A fresh process picks its own rendezvous: the test process's own (in-process DeepSpeed tests
    # ran before) is not inherited, or the child would find the port taken.
    env = child_env(PREFECT_API_URL=str(PREFECT_API_URL.value()))
    proc = run_until_then_sigkill(
        ["run", str(cfg), "--out", str(out)], env, tmp_path / "killed.log", lambda: _latest_step(out) >= kill_at
    )
    killed_at = _latest_step(out)
    assert proc.returncode == -signal.SIGKILL and kill_at <= killed_at < 48, (seed, kill_at, killed_at)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    assert client.search_model_versions("name = 'killed-adapter'") == []  # the killed stage recorded no version

    resumed = lineage_flow(str(cfg), str(out), []).as_json()
    reference = lineage_flow(str(cfg), str(tmp_path / "reference"), []).as_json()

    assert resumed["stages_run"] == [1] and resumed["versions"] == ["1"]
    stage_run = client.get_model_version("killed-adapter", "1").run_id
    steps = [m.step for m in client.get_metric_history(stage_run, "train/loss")]
    assert steps and min(steps) > killed_at and max(steps) == 48, (killed_at, steps)  # continued, not restarted
    for key in ("R", "R_nll"):
        for got, want in zip(resumed[key], reference[key], strict=True):
            assert got == pytest.approx(want, abs=1e-6), (key, killed_at)
    a = load_file(out / "stages" / "01-one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "reference" / "stages" / "01-one" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert json.loads((out / "metrics.json").read_text())["R"] == resumed["R"]
    # the killed process could not close its MLflow runs; the rerun closed them as KILLED, saying why
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments, "attributes.status = 'RUNNING'") == []
    killed = client.search_runs(experiments, "attributes.status = 'KILLED'")
    assert len(killed) == 2  # the killed process's lineage run and its stage run
    assert all(r.data.tags["lalora.closed"].startswith("KILLED: its process (pid ") for r in killed)
    assert {r.data.tags["lalora.pid"] for r in killed} == {str(proc.pid)}
