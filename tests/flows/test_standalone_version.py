"""A registered version loads where this project is not installed (issue 25): a fresh virtualenv outside the
repository, built from nothing but the version's own requirements.txt, loads the champion through pyfunc and
generates exactly what the pipeline's own generation does; `mlflow models serve --env-manager virtualenv`
builds its own environment from the model's files and serves the same completions on loopback.

Slow (two environment installs, from the package index through pip's own configuration); CI runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from flows.lineage_flow import lineage_flow
from tests.configs import TINY
from tests.conftest import ROOT
from tests.flows.servers import free_port, running, up

pytestmark = pytest.mark.slow

PROMPTS = ["reverse 123=", "increment 45=", "reverse 9081="]
CONSUMER = """
import json, sys, time
import importlib.metadata as md
t0 = time.perf_counter()
import mlflow
model = mlflow.pyfunc.load_model("models:/tiny-adapter@champion")
loaded = time.perf_counter() - t0
import flows
try:
    md.version("lalora-pipelines")
    installed = True
except md.PackageNotFoundError:
    installed = False
print(json.dumps({"completions": model.predict(json.loads(sys.argv[1]), params={"max_new_tokens": 6}),
                  "flows": flows.__file__, "project_installed": installed, "load_seconds": loaded}))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    """A consumer's environment: nothing of this process's Python path or virtualenv."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT)))
    return env | extra


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    (root / "tiny.yaml").write_text(TINY)
    result = lineage_flow(str(root / "tiny.yaml"), str(root / "out"), []).as_json()
    from pipelines.runtime.models import load_for_inference
    from pipelines.scoring.scorers import complete

    model, tok = load_for_inference(root / "out" / "base", root / "out" / "stages" / "02-two" / "adapter")
    return root, result["mlflow_uri"], complete(model, tok, PROMPTS, batch_size=12, max_new_tokens=6)


def test_the_version_carries_its_code_and_pins_real_distributions(champion):
    root, uri, _ = champion
    mlflow.set_tracking_uri(uri)
    try:
        requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/tiny-adapter@champion")).read_text()
        local = Path(mlflow.artifacts.download_artifacts("models:/tiny-adapter@champion", dst_path=str(root / "dl")))
    finally:
        mlflow.set_tracking_uri(None)
    lines = [line for line in requirements.splitlines() if line and not line.startswith("#")]
    assert all("==" in line for line in lines), lines  # every line pinned
    names = {line.split("==")[0].lower() for line in lines}
    assert {"torch", "transformers", "peft", "safetensors", "mlflow"} <= names
    assert "lalora-pipelines" not in names
    assert all("+" not in line for line in lines)  # no local build label: an index can satisfy every line
    for package in ("lalora", "pipelines", "flows"):
        assert (local / "code" / package / "__init__.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))


def test_a_fresh_environment_from_the_requirements_loads_and_serves_the_champion(champion, tmp_path):
    _root, uri, expected = champion
    mlflow.set_tracking_uri(uri)
    try:
        requirements = mlflow.pyfunc.get_model_dependencies("models:/tiny-adapter@champion")
    finally:
        mlflow.set_tracking_uri(None)
    venv = tmp_path / "consumer"
    env = _clean_env(MLFLOW_TRACKING_URI=uri, LALORA_CACHE_DIR=str(tmp_path / "cache"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", requirements],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1500,
    )
    assert pip.returncode == 0, pip.stdout[-3000:]
    install_seconds = time.perf_counter() - t0
    work = tmp_path / "empty"
    work.mkdir()
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", CONSUMER, json.dumps(PROMPTS)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["project_installed"]
    assert not got["flows"].startswith(str(ROOT)), got["flows"]  # the version's own code/, not this checkout
    assert got["completions"] == expected
    print(
        f"consumer environment installed in {install_seconds:.0f} s; the champion loaded in "
        f"{got['load_seconds']:.1f} s there"
    )

    port = free_port()
    cmd = [
        str(venv / "bin" / "mlflow"),
        "models",
        "serve",
        "-m",
        "models:/tiny-adapter@champion",
        "--env-manager",
        "virtualenv",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    serve_env = env | {
        "MLFLOW_ENV_ROOT": str(tmp_path / "envs"),
        "PATH": os.pathsep.join([str(venv / "bin"), env["PATH"]]),
    }
    with running(cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", serve_env, timeout=1500):
        body = json.dumps({"inputs": PROMPTS, "params": {"max_new_tokens": 6}}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert json.loads(resp.read())["predictions"] == expected
    assert not up(f"http://127.0.0.1:{port}/ping")
