"""``lalora --version``, ``lalora env`` and ``lalora init`` through the installed script, as a terminal runs them."""

import re
import subprocess
import sys
from importlib.metadata import version as installed

import torch

from flows.about import LIBRARIES, installed_version
from tests.conftest import ROOT, child_env, run_lalora


def pyproject_version() -> str:
    return re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)


def test_version_is_pyprojects(tmp_path):
    code, out = run_lalora(["--version"], tmp_path)
    assert code == 0, out
    assert out == f"lalora {pyproject_version()}\n"


def test_version_imports_nothing_heavy():
    probe = ("import sys\nfrom flows.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
             "    assert e.code == 0\nprint(sorted(m for m in ('torch', 'prefect', 'mlflow', 'deepspeed', 'transformers')"
             " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], env=child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]", out.stdout


def test_env_names_what_a_bug_report_needs(tmp_path):
    code, out = run_lalora(["env"], tmp_path)
    assert code == 0, out
    lines = dict(line.removeprefix("- ").split(": ", 1) for line in out.splitlines())
    assert list(lines) == ["lalora-pipelines", "Python", "platform", *LIBRARIES, "torch CPU capability",
                           "CUDA available"], out
    assert lines["lalora-pipelines"] == pyproject_version()
    assert lines["Python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
    for name in LIBRARIES:
        assert lines[name] == installed(name)
    assert lines["torch"] == torch.__version__
    assert lines["torch CPU capability"] == torch.backends.cpu.get_cpu_capability()
    assert lines["CUDA available"].split()[0] == str(torch.cuda.is_available())


def test_a_missing_library_is_named_not_installed():
    assert installed_version("lalora-no-such-distribution") == "not installed"
