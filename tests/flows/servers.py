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

__all__ = [
    "create_database",
    "free_port",
    "mlflow_server",
    "model_server",
    "postgres",
    "postgres_missing",
    "prefect_server",
    "running",
    "up",
]

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
        stop_group(proc, health)


def stop_group(proc: subprocess.Popen, health: str | None = None) -> None:
    """Stop ``proc``'s process group: SIGTERM, then SIGKILL to whatever of the group is left (a server's
    workers outlive its leader: ``mlflow models serve`` exits before the scoring server it started), then
    wait until ``health`` no longer answers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 30
    while health and up(health) and time.time() < deadline:
        time.sleep(0.5)


def _pg_bin() -> Path | None:
    """The PostgreSQL server binaries: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    import glob
    import shutil

    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    return Path(dirs[-1]) if dirs else None


def postgres_missing() -> str | None:
    """Why no throwaway PostgreSQL can run here (one line), or None."""
    if _pg_bin() is None:
        return "no PostgreSQL server binaries (pg_ctl, initdb) on PATH or in /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL (initdb + pg_ctl, trust auth) on a free loopback port, in a temp dir; its URL
    ``postgresql://postgres@127.0.0.1:PORT``. PostgreSQL refuses to run as root: as root it runs as the
    ``postgres`` user, in a directory that user owns."""
    import shlex
    import shutil
    import tempfile

    bin_dir = _pg_bin()
    assert bin_dir is not None, postgres_missing()
    root = Path(tempfile.mkdtemp(prefix="lalora-pg-"))
    data, port = root / "data", free_port()
    as_root = os.geteuid() == 0
    if as_root:
        shutil.chown(root, "postgres", "postgres")

    def pg(*args: str) -> None:
        cmd = " ".join(shlex.quote(a) for a in args)
        full = ["su", "postgres", "-s", "/bin/sh", "-c", cmd] if as_root else ["sh", "-c", cmd]
        subprocess.run(full, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)

    try:
        pg(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        pg(
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off",
            "start",
        )
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}"
        finally:
            pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(server: str, name: str) -> str:
    """A new, empty database on ``server`` (a postgres() URL); its URL."""
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


@contextlib.contextmanager
def mlflow_server(root: Path, backend: str | None = None) -> Iterator[str]:
    """`mlflow server` on loopback with a SQLite store (or ``backend``, e.g. a PostgreSQL URL) and a proxied
    artifact store; its URL."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend or f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    with running(cmd, f"http://127.0.0.1:{port}/health", root / "server.log", server_env()):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, log: Path, **env: str) -> Iterator[str]:
    """`mlflow models serve -m MODEL_URI --env-manager local` on loopback; its URL."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with running(cmd, f"http://127.0.0.1:{port}/ping", log, server_env(MLFLOW_TRACKING_URI=tracking_uri, **env)):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def prefect_server(root: Path) -> Iterator[str]:
    """`prefect server start` on loopback with its own PREFECT_HOME (SQLite); its API URL (``.../api``)."""
    port = free_port()
    home = root / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    env = server_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
    )
    with running(cmd, f"http://127.0.0.1:{port}/api/health", root / "prefect-server.log", env):
        yield f"http://127.0.0.1:{port}/api"
