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
    assert "pip install '.[server]'" in run
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["lalora"] == "flows.cli:main"
    assert any(d.startswith("psycopg2") for d in project["optional-dependencies"]["server"])


def _help(*module_args: str) -> str:
    out = subprocess.run([sys.executable, "-m", *module_args, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    return out.stdout


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_stack_has_postgres_mlflow_prefect_and_a_worker(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "prefect-server", "worker"}
    assert services["postgres"]["image"].startswith("postgres:")
    images = {services[s].get("image") for s in ("mlflow", "prefect-server", "worker")}
    assert images == {"lalora:latest"} and services["mlflow"]["build"] == "."
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        for dep in svc.get("depends_on", []):
            assert dep in services
    env = services["worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_compose_commands_exist_and_accept_their_arguments(compose):
    services = compose["services"]
    mlflow = services["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow"] and mlflow["command"][0] == "server"
    assert mlflow["command"][mlflow["command"].index("--backend-store-uri") + 1].startswith("postgresql://")
    help_text = _help("mlflow", "server")
    for flag in (a for a in mlflow["command"] if a.startswith("--")):
        assert flag in help_text, flag
    prefect = services["prefect-server"]
    assert prefect["entrypoint"] == ["prefect"] and prefect["command"][:2] == ["server", "start"]
    help_text = _help("prefect", "server", "start")
    for flag in (a for a in prefect["command"] if a.startswith("--")):
        assert flag in help_text, flag
    worker = services["worker"]
    assert "entrypoint" not in worker  # the image's: lalora
    args = _parser().parse_args(worker["command"])
    assert args.command == "serve" and args.cron == "0 3 * * 1"
    assert (ROOT / args.config).is_file()
