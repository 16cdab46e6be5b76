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
    probe = (
        "import sys\nfrom flows.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0\nprint(sorted(m for m in ('torch', 'prefect', 'mlflow', 'deepspeed', "
        "'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]", out.stdout


def test_env_names_what_a_bug_report_needs(tmp_path):
    code, out = run_lalora(["env"], tmp_path)
    assert code == 0, out
    lines = dict(line.removeprefix("- ").split(": ", 1) for line in out.splitlines())
    assert list(lines) == [
        "lalora-pipelines",
        "Python",
        "platform",
        *LIBRARIES,
        "torch CPU capability",
        "CUDA available",
    ], out
    assert lines["lalora-pipelines"] == pyproject_version()
    assert lines["Python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
    for name in LIBRARIES:
        assert lines[name] == installed(name)
    assert lines["torch"] == torch.__version__
    assert lines["torch CPU capability"] == torch.backends.cpu.get_cpu_capability()
    assert lines["CUDA available"].split()[0] == str(torch.cuda.is_available())


def test_a_missing_library_is_named_not_installed():
    assert installed_version("lalora-no-such-distribution") == "not installed"


DEMO = ROOT / "configs" / "demo.yaml"


def test_the_packaged_demo_is_configs_demo_yaml():
    """One source of truth: the package's copy is a link to the checkout's file (the wheel build copies it)."""
    from flows.starter import demo_config_text

    link = ROOT / "flows" / "demo.yaml"
    assert link.is_symlink() and link.resolve() == DEMO.resolve()
    assert demo_config_text() == DEMO.read_text()
    base = ROOT / "flows" / "demo-base"
    assert base.is_symlink() and base.resolve() == (DEMO.parent / "demo-base").resolve()


def test_init_writes_the_demo_and_says_how_to_run_it(tmp_path):
    from pipelines.config import load_config

    d = tmp_path / "new" / "project"
    code, out = run_lalora(["init", str(d)], tmp_path)
    assert code == 0, out
    written = d / "lalora.yaml"
    assert f"    lalora validate {written}\n" in out and f"    lalora run {written} --out {d}/runs/demo\n" in out
    text, demo = written.read_text().splitlines(), DEMO.read_text().splitlines()
    assert demo[0] == "# yaml-language-server: $schema=../lalora.schema.json"
    assert text[0] == "# yaml-language-server: $schema=lalora.schema.json"  # the schema written beside it
    assert (d / "lalora.schema.json").read_text() == (ROOT / "lalora.schema.json").read_text()
    assert text[1] == f"# Run: lalora run {written} --out {d}/runs/demo"
    assert text[2] == (
        f"# Plain LoRA for comparison: lalora run {written} --out {d}/runs/demo-lambda0 --set lalora.lambda=0"
    )
    assert text[3:] == demo[3:]  # every other line, comments included, as the demo has it
    weights = "demo-base/model.safetensors"
    assert (d / weights).read_bytes() == (DEMO.parent / weights).read_bytes()
    mine, demo = load_config(written).model_dump(), load_config(DEMO).model_dump()
    assert mine["model"].pop("path") == str(d / "demo-base")
    assert demo["model"].pop("path") == str(DEMO.parent / "demo-base")
    assert mine == demo  # the same config but for where its base lies (the base beside it, checked by its sha256)
    code, out = run_lalora(["validate", str(written)], tmp_path)
    assert code == 0 and f"{written}: OK (3 stages" in out, out


def test_init_refuses_an_existing_config_unless_forced(tmp_path):
    written = tmp_path / "p" / "lalora.yaml"
    assert run_lalora(["init", str(tmp_path / "p")], tmp_path)[0] == 0
    written.write_text("# mine\n")
    code, out = run_lalora(["init", str(tmp_path / "p")], tmp_path)
    assert (code, out) == (
        2,
        f"lalora: error: {written} already exists (pass --force to overwrite the starter's files)\n",
    )
    assert written.read_text() == "# mine\n"
    code, out = run_lalora(["init", str(tmp_path / "p"), "--force"], tmp_path)
    assert code == 0, out
    assert written.read_text().splitlines()[3:] == DEMO.read_text().splitlines()[3:]


def test_init_keeps_a_starters_schema_or_base_left_without_its_config(tmp_path):
    """Only the config removed: the schema and demo-base beside it are not silently replaced either."""
    assert run_lalora(["init", str(tmp_path / "p")], tmp_path)[0] == 0
    (tmp_path / "p" / "lalora.yaml").unlink()
    schema = tmp_path / "p" / "lalora.schema.json"
    schema.write_text("{}")
    code, out = run_lalora(["init", str(tmp_path / "p")], tmp_path)
    assert (code, out) == (
        2,
        f"lalora: error: {schema} already exists (pass --force to overwrite the starter's files)\n",
    )
    assert schema.read_text() == "{}" and not (tmp_path / "p" / "lalora.yaml").exists()


def test_init_refuses_a_file_as_its_directory(tmp_path):
    (tmp_path / "f").write_text("")
    code, out = run_lalora(["init", str(tmp_path / "f")], tmp_path)
    assert (code, out) == (2, f"lalora: error: {tmp_path / 'f'}: exists and is not a directory\n")


def test_base_pretrains_a_configs_tiny_base_that_a_config_then_checks(tmp_path):
    """``lalora base`` writes the recipe's base and its sha256; a config naming that sha256 validates against it,
    and the same directory is refused as --out once it holds something."""
    from pipelines.runtime.models import file_sha256

    out = tmp_path / "b"
    code, text = run_lalora(["base", str(DEMO), "--out", str(out), "--set", "model.pretrain.steps=3"], tmp_path)
    assert code == 0, text
    sha = file_sha256(out / "model.safetensors")
    assert text.splitlines()[-1] == f"model.sha256: {sha}", text
    assert f"wrote {out}: a tiny Llama pretrained 3 steps on source and 3 extra data sets in " in text
    code, text = run_lalora(
        ["validate", str(DEMO), "--set", f"model.path={out}", "--set", f"model.sha256={sha}"], tmp_path
    )
    assert code == 0, text
    code, text = run_lalora(["base", str(DEMO), "--out", str(out)], tmp_path)
    assert (code, text) == (
        2,
        f"lalora: error: {out}: exists and is not an empty directory (give a new one, or remove it first)\n",
    )


def test_validate_checks_every_file_it_is_given(tmp_path):
    """lalora validate A B C: each file checked and reported (an OK line, or its errors, one a line), exit 2 when
    any has a problem; a bad file in the middle does not hide the files after it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("domains: [{name: a}]\nlalora: {lambda: -1}\n")
    auto = ROOT / "configs" / "demo-auto.yaml"
    code, out = run_lalora(["validate", str(DEMO), str(bad), str(auto)], tmp_path)
    assert code == 2, out
    assert f"{DEMO}: OK (3 stages" in out and f"{auto}: OK (3 stages" in out
    errors = [line for line in out.splitlines() if line.startswith(str(bad))]
    assert errors == [f"{bad}: lalora.lambda: Input should be greater than or equal to 0"], out
    assert "Traceback" not in out
    code, out = run_lalora(["validate", str(DEMO), str(auto)], tmp_path)
    assert code == 0 and out.count(": OK (") == 2, out
