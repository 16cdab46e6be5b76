"""Real servers for tests, bound to 127.0.0.1 on free ports, started and stopped by the test."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipelines.runtime.distributed import free_port
from tests.conftest import child_env

__all__ = ["free_port", "mlflow_server", "model_server", "running", "up"]

BIN = str(Path(sys.executable).parent)
"""The environment's bin: `mlflow models serve` execs uvicorn from PATH."""


def up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def server_env(**extra: str) -> dict[str, str]:
    return child_env(PATH=f"{BIN}:{os.environ.get('PATH', '')}", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **extra)


@contextlib.contextmanager
def running(cmd: list[str], health: str, log: Path, env: dict[str, str], timeout: float = 240) -> Iterator[None]:
    """Start ``cmd`` in its own process group, wait until ``health`` answers 200, stop the group after."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not up(health):
            time.sleep(0.5)
        assert proc.poll() is None and up(health), log.read_text()[-3000:]
        yield
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` on loopback with a SQLite store and a proxied artifact store; its URL."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
           "--workers", "1"]
    with running(cmd, f"http://127.0.0.1:{port}/health", root / "server.log", server_env()):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, log: Path, **env: str) -> Iterator[str]:
    """`mlflow models serve -m MODEL_URI --env-manager local` on loopback; its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]
    with running(cmd, f"http://127.0.0.1:{port}/ping", log, server_env(MLFLOW_TRACKING_URI=tracking_uri, **env)):
        yield f"http://127.0.0.1:{port}"
