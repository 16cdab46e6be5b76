"""The Dockerfile and docker-compose.yml cannot be built here (no Docker engine): parse them and
check that every command they run exists in the package and accepts the arguments given."""

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from flows.cli import _parser

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile():
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_cuda_base_package_installed_lalora_entrypoint():
    instr = _dockerfile()
    assert instr[0][0] == "FROM" and instr[0][1].startswith("nvidia/cuda:")
    entry = [json.loads(arg) for op, arg in instr if op == "ENTRYPOINT"]
    assert entry == [["lalora"]]
    for op, arg in instr:
        if op == "COPY":
            for src in shlex.split(arg)[:-1]:
                assert (ROOT / src).exists(), src
    run = " ".join(arg for op, arg in instr if op == "RUN")
    assert "pip install -c constraints.txt '.[server]'" in run  # the tested set (the lock)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["lalora"] == "flows.cli:main"
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3; the extra installs it and not the old driver
    assert [d.split(">")[0] for d in project["optional-dependencies"]["server"]] == ["psycopg[binary]"]


def _help(*module_args: str) -> str:
    out = subprocess.run([sys.executable, "-m", *module_args, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    return out.stdout


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_stack_starts_in_order_and_restarts(compose):
    """PostgreSQL, MLflow and Prefect on it, a one-shot deploy, a worker: health checks gate every start."""
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "prefect-server", "deploy", "worker"}
    assert services["postgres"]["image"].startswith("postgres:")
    images = {services[s].get("image") for s in ("mlflow", "prefect-server", "deploy", "worker")}
    assert images == {"lalora:latest"} and services["mlflow"]["build"] == "."
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        for dep in svc.get("depends_on", {}):
            assert dep in services
        assert svc.get("restart") == ("no" if name == "deploy" else "unless-stopped"), name
    for name in ("postgres", "mlflow", "prefect-server"):
        assert services[name]["healthcheck"]["test"], name
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    needs = services["worker"]["depends_on"]
    assert needs == {
        "mlflow": {"condition": "service_healthy"},
        "prefect-server": {"condition": "service_healthy"},
        "deploy": {"condition": "service_completed_successfully"},
    }
    assert services["deploy"]["depends_on"] == {"prefect-server": {"condition": "service_healthy"}}
    env = services["worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # the Prefect server keeps its state in PostgreSQL too (the database the init script creates)
    db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db.startswith("postgresql+asyncpg://") and db.endswith("@postgres:5432/prefect")
    init = services["postgres"]["volumes"][1].split(":")[0]
    assert "CREATE DATABASE prefect" in (ROOT / init).read_text()


def test_compose_commands_exist_and_accept_their_arguments(compose):
    import click
    from mlflow.cli import server

    services = compose["services"]
    mlflow = services["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow"] and mlflow["command"][0] == "server"
    store = mlflow["command"][mlflow["command"].index("--backend-store-uri") + 1]
    assert store.startswith("postgresql+psycopg://")  # psycopg 3: the driver the server extra installs
    ctx = server.make_context("server", list(mlflow["command"][1:]))  # click parses them as `mlflow server` would
    hosts = ctx.params["allowed_hosts"].split(",")
    assert "mlflow" in hosts and "mlflow:5000" in hosts  # the name the worker calls it by
    with pytest.raises(click.exceptions.NoSuchOption):
        server.make_context("server", ["--no-such-option"])  # the check can fail
    prefect = services["prefect-server"]
    assert prefect["entrypoint"] == ["prefect"] and prefect["command"][:2] == ["server", "start"]
    help_text = _help("prefect", "server", "start")
    for flag in (a for a in prefect["command"] if a.startswith("--")):
        assert flag in help_text, flag
    worker = services["worker"]
    assert worker["entrypoint"] == ["prefect"] and worker["command"][:2] == ["worker", "start"]
    help_text = _help("prefect", "worker", "start")
    for flag in (a for a in worker["command"] if a.startswith("--")):
        assert flag in help_text, flag
    deploy = services["deploy"]
    assert "entrypoint" not in deploy  # the image's: lalora
    args = _parser().parse_args(deploy["command"])
    assert args.command == "deploy" and args.cron == "0 3 * * 1"
    assert args.pool == worker["command"][worker["command"].index("--pool") + 1]  # the pool the worker polls
    assert (ROOT / args.config).is_file()
