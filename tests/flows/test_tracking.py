"""Runs left RUNNING by a dead process are closed by the next run; live ones are never touched."""

import socket
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from flows.runs import close_orphaned_runs, start_run

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast


def test_only_runs_of_dead_processes_on_this_host_are_closed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()  # a pid that has exited
    runs = {
        "dead here": start_run(uri, "exp", tmp_path / "art", "a", tags={"lalora.sweep": "s", "lalora.pid": dead}),
        "alive here": start_run(uri, "exp", tmp_path / "art", "b", tags={"lalora.sweep": "s"}),  # this process
        "dead elsewhere": start_run(
            uri,
            "exp",
            tmp_path / "art",
            "c",
            tags={"lalora.sweep": "s", "lalora.pid": dead, "lalora.host": "other-host"},
        ),
        "other sweep": start_run(uri, "exp", tmp_path / "art", "d", tags={"lalora.sweep": "t", "lalora.pid": dead}),
    }
    closed = close_orphaned_runs(uri, "exp", "lalora.sweep", "s")
    client = MlflowClient(uri)
    status = {k: client.get_run(r.run_id).info.status for k, r in runs.items()}
    assert closed == [runs["dead here"].run_id]
    assert status == {
        "dead here": "KILLED",
        "alive here": "RUNNING",
        "dead elsewhere": "RUNNING",
        "other sweep": "RUNNING",
    }
    tag = client.get_run(runs["dead here"].run_id).data.tags["lalora.closed"]
    assert tag == (
        f"KILLED: its process (pid {dead} on {socket.gethostname()}) ended without closing it; closed by the next run"
    )
    assert close_orphaned_runs(uri, "exp", "lalora.sweep", "s") == []  # idempotent
    assert close_orphaned_runs(uri, "missing-experiment", "lalora.sweep", "s") == []
