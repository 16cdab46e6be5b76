"""`lalora ui` starts real servers on 127.0.0.1 and stops them; `lalora serve` builds a real
Prefect deployment with a cron schedule (applied to the session's temporary Prefect API)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import build_deployment, main
from tests.conftest import child_env
from tests.flows.servers import free_port, up

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo.yaml"


def test_ui_serves_mlflow_and_prefect_on_localhost_until_interrupted(tmp_path):
    mlflow_port, prefect_port = free_port(), free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "ui",
            "--out",
            str(tmp_path / "out"),
            "--mlflow-port",
            str(mlflow_port),
            "--prefect-port",
            str(prefect_port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    urls = [f"http://127.0.0.1:{mlflow_port}/health", f"http://127.0.0.1:{prefect_port}/api/health"]
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not all(up(u) for u in urls) and proc.poll() is None:
            time.sleep(1)
        assert proc.poll() is None, proc.stdout.read()
        assert all(up(u) for u in urls)
        assert (tmp_path / "out" / "mlflow.db").is_file()  # the UI reads the run directory's store
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert f"http://127.0.0.1:{mlflow_port}" in out and f"PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in out
    assert not any(up(u) for u in urls)  # both children stopped with it


def test_serve_refuses_without_a_prefect_server_or_with_a_bad_cron(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["serve", str(CONFIG), "--cron", "0 3 * * 1"]) == 2
    assert "needs a Prefect server" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["serve", str(CONFIG), "--cron", "61 * * * *"]) == 2
    assert "not a valid cron schedule" in capsys.readouterr().err


def test_serve_deployment_has_the_schedule_and_parameters(tmp_path):
    from prefect import get_client

    deployment = build_deployment(str(CONFIG), str(tmp_path / "out"), ["training.steps=5"], "0 3 * * 1", "weekly")
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        d = client.read_deployment(deployment_id)
    assert d.name == "weekly"
    assert [s.schedule.cron for s in d.schedules] == ["0 3 * * 1"] and d.schedules[0].active
    assert d.parameters == {
        "config_path": str(CONFIG),
        "out_dir": str(tmp_path / "out"),
        "overrides": ["training.steps=5"],
    }
    assert d.entrypoint.endswith("flows/lineage_flow.py:lineage_flow")


def test_a_run_of_the_served_deployment_adapts_the_lineage(tmp_path):
    """`lalora serve` in its own process picks up a run of its deployment (what the cron schedule
    creates) and runs the real lineage: the registry gets a version per stage, the flow run completes."""
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from tests.configs import TINY

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    env = child_env(PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_RUNNER_POLL_FREQUENCY="1")
    with open(tmp_path / "serve.log", "w") as log:  # the child writes to its own copy
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "serve",
                str(cfg),
                "--cron",
                "0 3 * * 1",
                "--name",
                "served",
                "--out",
                str(out),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 120
        with get_client(sync_client=True) as client:
            while True:  # serve() registers the deployment, then polls for its runs
                try:
                    client.read_deployment_by_name("lalora-lineage/served")
                    break
                except ObjectNotFound:
                    assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
                    time.sleep(0.5)
        run = run_deployment("lalora-lineage/served", timeout=600)  # as the schedule would, now
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    versions = MlflowClient(uri, registry_uri=uri).search_model_versions("name = 'tiny-adapter'")
    assert sorted(v.tags["lalora.stage"] for v in versions) == ["1", "2"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["R"]) == 3 and metrics["versions"] == ["1", "2"]
