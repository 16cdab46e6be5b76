"""The package as a user installs it: the wheel built from this checkout, installed into a fresh virtualenv
outside it and run from an empty directory: ``--version``, ``env``, ``init``, ``validate`` and a short run of
the starter config.

Nothing is downloaded. The wheel is installed without its dependencies; they come from this environment's
site-packages, named in a ``.pth`` file of the fresh one. A directory a ``.pth`` file names joins
``sys.path`` but its own ``.pth`` files are not run, so this environment's editable install of the project
(``__editable__.lalora_pipelines-*.pth``, which installs an import finder for the checkout) stays inactive
there; the checks below assert that ``flows`` and the distribution's metadata come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # builds a wheel and a virtualenv, runs a lineage: make test, not test-fast

DEPENDENCIES = Path(sysconfig.get_paths()["purelib"])  # this environment's site-packages: torch, prefect, ...

NOT_BUILT_FROM = (
    ".git",
    ".venv",
    ".cache",
    ".pytest_cache",
    "runs",
    "build",
    "*.egg-info",
    "__pycache__",
    "tests",
    "benchmarks",
    "studies",
)

SHORT = [  # the starter config, shortened to two stages of a few steps (about 30 s here)
    "--set",
    "training.steps=4",
    "--set",
    "lalora.samples=16",
    "--set",
    "source.data.size=200",
    "--set",
    "source.eval_size=12",
    "--set",
    "domains=[{name: next-aj, data: {kind: generator, op: next, alphabet: abcdefghij, size: 100}, "
    "eval_size: 12}, {name: rotate-kt, data: {kind: generator, op: rotate, alphabet: klmnopqrst, "
    "size: 100}, eval_size: 12}]",
]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    bin: Path
    cwd: Path  # empty, outside the checkout
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 600) -> tuple[int, str]:
        """``lalora ARGS`` from the fresh environment: (exit code, stdout and stderr together)."""
        proc = subprocess.run(
            [str(self.bin / "lalora"), *args],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        return proc.returncode, proc.stdout


def _timed(what: str, command: list[str], **kwargs) -> None:
    t0 = time.perf_counter()
    subprocess.run(command, check=True, **kwargs)
    print(f"{what}: {time.perf_counter() - t0:.1f} s")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("package")
    # built from a copy: an in-tree build would leave build/ in the checkout, and files deleted since an
    # earlier build would travel on in build/lib
    src = root / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_BUILT_FROM))
    _timed(
        "wheel",
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(root / "dist"),
            ".",
        ],
        cwd=src,
    )
    (wheel,) = (root / "dist").glob("lalora_pipelines-*.whl")
    venv = root / "venv"
    _timed("venv", [sys.executable, "-m", "venv", "--without-pip", str(venv)])
    _timed(
        "install",
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
    )
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "_lalora_dependencies.pth").write_text(f"{DEPENDENCIES}\n")  # after the install: pip never sees them
    for pth in DEPENDENCIES.glob("*.pth"):  # their import hooks (setuptools' distutils shim), not the editable one
        if not pth.name.startswith("__editable__"):
            (site / pth.name).write_text(
                "".join(line for line in pth.read_text().splitlines(keepends=True) if line.startswith("import "))
            )
    cwd = root / "empty"
    cwd.mkdir()
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
    }  # the op make test compiled
    return Installed(wheel, venv / "bin", cwd, env)


def test_the_wheel_holds_the_demo_config_and_the_license(installed):
    with zipfile.ZipFile(installed.wheel) as whl:
        names = whl.namelist()
        assert whl.read("flows/demo.yaml") == (ROOT / "configs" / "demo.yaml").read_bytes()  # a file, not a link
        base = sorted(p.name for p in (ROOT / "configs" / "demo-base").iterdir())
        assert sorted(n.removeprefix("flows/demo-base/") for n in names if n.startswith("flows/demo-base/")) == base
        weights = "demo-base/model.safetensors"
        assert whl.read(f"flows/{weights}") == (ROOT / "configs" / weights).read_bytes()
        licenses = [n for n in names if ".dist-info/" in n and n.endswith("/LICENSE")]
        assert licenses and whl.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
    assert not [n for n in names if n.startswith(("tests/", "configs/", "benchmarks/"))]


def test_the_fresh_environment_imports_the_wheel_not_the_checkout(installed):
    probe = (
        "import json, sys, importlib.metadata as md, flows, pipelines, lalora\n"
        "print(json.dumps({'files': [m.__file__ for m in (flows, pipelines, lalora)], 'path': sys.path,\n"
        "                  'finders': [k for k in sys.modules if 'editable' in k],\n"
        "                  'dist': str(md.distribution('lalora-pipelines')._path), "
        "'version': flows.__version__}))"
    )
    out = subprocess.run(
        [str(installed.bin / "python"), "-c", probe],
        cwd=installed.cwd,
        env=installed.env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    seen = json.loads(out.splitlines()[-1])
    venv = installed.bin.parent
    assert all(Path(f).is_relative_to(venv) for f in seen["files"]), seen["files"]
    assert Path(seen["dist"]).is_relative_to(venv)
    assert seen["finders"] == []
    in_checkout = [
        p
        for p in seen["path"]
        if p and Path(p).resolve().is_relative_to(ROOT) and not Path(p).resolve().is_relative_to(DEPENDENCIES.resolve())
    ]
    assert in_checkout == [], in_checkout
    assert seen["version"] == installed.wheel.name.split("-")[1]


def test_version_and_env(installed):
    import torch

    code, out = installed.run("--version")
    assert (code, out) == (0, f"lalora {installed.wheel.name.split('-')[1]}\n")
    code, out = installed.run("env")
    assert code == 0, out
    assert f"- torch: {torch.__version__}\n" in out
    assert f"- Python: {sys.version.split()[0]} (CPython, {installed.bin / 'python'})\n" in out


def test_init_validate_and_run_the_starter(installed):
    code, out = installed.run("init", "proj")
    assert code == 0, out
    assert (installed.cwd / "proj" / "lalora.yaml").is_file()
    assert "    lalora validate proj/lalora.yaml\n    lalora run proj/lalora.yaml --out proj/runs/demo\n" in out
    code, out = installed.run("validate", "proj/lalora.yaml")
    assert code == 0 and out.startswith("proj/lalora.yaml: OK (3 stages"), out
    t0 = time.perf_counter()
    code, out = installed.run("run", "proj/lalora.yaml", "--out", "proj/runs/x", *SHORT)
    print(f"run: {time.perf_counter() - t0:.1f} s")
    assert code == 0, out[-5000:]
    assert "Traceback" not in out, out[-5000:]
    assert "registered: lalora-demo versions 1, 2 " in out, out[-3000:]
    metrics = json.loads((installed.cwd / "proj" / "runs" / "x" / "metrics.json").read_text())
    assert metrics["domains"] == ["source", "next-aj", "rotate-kt"], list(metrics)
