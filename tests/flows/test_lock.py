"""One run per lineage: a real second process holds the lock; refusal, waiting and take-over from a dead holder."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import EXIT_LOCKED, main
from flows.lock import LOCK_NAME, LineageLock, LockHeld

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast

ROOT = Path(__file__).parents[2]

HOLDER = """
import sys, time
from flows.lock import LineageLock
lock = LineageLock(sys.argv[1]); lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def spawn_holder(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_acquirer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / LOCK_NAME
    proc = spawn_holder(path, 60)
    try:
        content = json.loads(path.read_text())
        assert content["pid"] == proc.pid and content["host"] == socket.gethostname() and content["started"] > 0
        with pytest.raises(LockHeld, match=f"locked by another run: pid {proc.pid} on {socket.gethostname()}"):
            LineageLock(path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_cli_run_refuses_in_one_line_and_touches_nothing(tmp_path, capsys):
    from tests.configs import ONE_DOMAIN

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(ONE_DOMAIN)
    out = tmp_path / "out"
    proc = spawn_holder(out / LOCK_NAME, 60)
    try:
        assert main(["run", str(cfg), "--out", str(out)]) == EXIT_LOCKED
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"lalora: error: lineage is locked by another run: pid {proc.pid}")
        # no mlflow.db, no stages: nothing ran, nothing registered (only the lock file)
        assert {p.name for p in out.iterdir()} <= {LOCK_NAME}
    finally:
        proc.kill()
        proc.wait()


def test_waiter_gets_the_lock_when_the_holder_finishes(tmp_path):
    path = tmp_path / LOCK_NAME
    proc = spawn_holder(path, 1.5)
    t0 = time.monotonic()
    lock = LineageLock(path)
    lock.acquire(wait=True, poll=0.1, timeout=30)
    assert time.monotonic() - t0 > 0.5 and proc.wait() == 0
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_lock_of_a_killed_holder_does_not_block(tmp_path):
    """The kernel released the killed holder's lock; its file (naming it) stays and is simply taken."""
    path = tmp_path / LOCK_NAME
    proc = spawn_holder(path, 60)
    os.kill(proc.pid, signal.SIGKILL)  # a crashed run: no release, the file stays
    proc.wait()
    assert json.loads(path.read_text())["pid"] == proc.pid
    with LineageLock(path) as lock:
        lock.acquire()
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_lock_file_left_by_a_dead_process_under_another_hostname_does_not_block(tmp_path):
    """A container recreated under a new hostname finds its predecessor's file: nobody holds its kernel lock."""
    path = tmp_path / LOCK_NAME
    path.write_text(
        json.dumps({"pid": 1, "host": "old-container-7f3a", "started": time.time() - 60, "command": "lalora run"})
    )
    lock = LineageLock(path)
    lock.acquire(wait=False)
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    lock.release()


def test_a_live_holder_blocks_a_waiter_until_its_timeout(tmp_path, capfd):
    path = tmp_path / LOCK_NAME
    proc = spawn_holder(path, 60)
    try:
        t0 = time.monotonic()
        with pytest.raises(
            LockHeld,
            match=r"gave up after 1\.5 s waiting for the run holding .* pid "
            f"{proc.pid}",
        ):
            LineageLock(path).acquire(wait=True, poll=0.1, timeout=1.5)
        assert 1.5 <= time.monotonic() - t0 < 10
        waiting = [line for line in capfd.readouterr().err.splitlines() if "waiting for the run holding" in line]
        assert len(waiting) == 1  # the holder printed once, not at every poll
    finally:
        proc.kill()
        proc.wait()


def test_a_run_waiting_past_the_lock_timeout_exits_4_in_one_line(tmp_path):
    """Through the installed script: `lalora run --wait` on a held lineage gives up after the config's
    orchestration.lock_timeout_seconds, one line, exit 4, nothing recorded."""
    from tests.configs import tiny
    from tests.conftest import run_lalora

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny("one", orchestration={"lock_timeout_seconds": 2}))
    out = tmp_path / "out"
    proc = spawn_holder(out / LOCK_NAME, 120)
    try:
        code, text = run_lalora(["run", str(cfg), "--out", str(out), "--wait"], tmp_path, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert code == EXIT_LOCKED, text
    errors = [line for line in text.splitlines() if line.startswith("lalora: error:")]
    assert len(errors) == 1 and "gave up after 2 s" in errors[0] and "Traceback" not in text
    assert {p.name for p in out.iterdir()} <= {LOCK_NAME}


def test_a_lineage_holds_its_output_directory_and_the_stores_lease_on_its_model(tmp_path):
    from flows.lineage_flow import lineage_locks
    from pipelines.config import LineageConfig

    cfg = LineageConfig.model_validate(
        {"domains": [{"name": "a"}], "tracking": {"mlflow_uri": "http://127.0.0.1:5000", "registered_model": "m"}}
    )
    a, b = lineage_locks(cfg, tmp_path / "a"), lineage_locks(cfg, tmp_path / "b")
    assert a[0] == tmp_path / "a" / LOCK_NAME and b[0] == tmp_path / "b" / LOCK_NAME
    assert a[1].key == b[1].key  # two output directories, one registered model: one lease
    assert lineage_locks(cfg, tmp_path / "a", fork="f")[1].key != a[1].key  # a fork writes its own model
    local = lineage_locks(LineageConfig.model_validate({"domains": [{"name": "a"}]}), tmp_path / "a")[1]
    assert local.uri == f"sqlite:///{(tmp_path / 'a' / 'mlflow.db').resolve()}"


def test_hold_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    """`lalora run` holds the lineage, then the flow asks for it again: no self-deadlock, one lock file."""
    from flows.lock import hold

    path = tmp_path / LOCK_NAME
    with hold([path]):
        first = path.read_text()
        with hold([path], wait=False):  # the flow inside the CLI's hold
            assert path.read_text() == first
        assert path.read_text() == first  # the inner exit did not release the outer hold
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys\nfrom flows.lock import hold, LockHeld\n"
                "try:\n    hold([sys.argv[1]]).__enter__()\nexcept LockHeld:\n    print('refused')",
                str(path),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert probe.stdout.strip() == "refused"
    assert not path.exists()
