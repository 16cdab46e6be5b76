from pathlib import Path

import pytest

from flows.cli import main
from pipelines.config import ConfigError, LineageConfig, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_says_how_to_run_it(path):
    cfg = load_config(path)
    assert isinstance(cfg, LineageConfig) and cfg.domains
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run: lalora run configs/"), first


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


MINIMAL = "domains:\n  - name: d1\n"


def test_minimal_config_has_working_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.lalora.lam == 10.0 and cfg.lalora.curvature.kind == "diag" and cfg.source.name == "source"
    assert [d.name for d in cfg.all_domains] == ["source", "d1"]


def test_overrides_reach_any_field_including_list_items(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["lalora.lambda=0", "training.steps=50", "domains.0.eval_size=7",
                                                 "lalora.curvature={kind: identity}"])
    assert cfg.lalora.lam == 0 and cfg.training.steps == 50 and cfg.domains[0].eval_size == 7
    assert cfg.lalora.curvature.kind == "identity"


@pytest.mark.parametrize("text,overrides,expected", [
    (MINIMAL + "lora: {rr: 3}\n", [], "lora.rr: unknown key"),
    (MINIMAL, ["lalora.lambda=-1"], "lalora.lambda: Input should be greater than or equal to 0"),
    (MINIMAL, ["lora.r=0"], "lora.r: Input should be greater than 0"),
    (MINIMAL, ["lalora.accumulate.gamma=1.5"], "lalora.accumulate.gamma: Input should be less than or equal to 1"),
    (MINIMAL, ["lalora.curvature.kind=kfaq"], "lalora.curvature: unknown kind 'kfaq'; expected one of 'diag', 'identity'"),
    (MINIMAL, ["deepspeed.zero_stage=3"], "deepspeed.zero_stage: zero_stage 3 partitions the LoRA parameters"),
    (MINIMAL, ["tracking.latest_alias=latest"], "alias 'latest' is reserved by MLflow"),
    (MINIMAL, ["training.steps=many"], "training.steps: Input should be a valid integer"),
    (MINIMAL, ["lalora.accumulate.mode=forever"], "lalora.accumulate.mode: must be one of 'sum', 'online' or 'replace'"),
    ("domains:\n  - name: a\n  - name: a\n", [], "domain names must be unique"),
    ("domains:\n  - name: ../etc\n", [], "is not a valid domain name"),
    ("domains: []\n", [], "domains: List should have at least 1 item"),
    ("lora: [1, 2\n", [], "invalid YAML at line"),
    ("- 1\n", [], "top level must be a mapping"),
])
def test_bad_configs_name_the_field_and_the_fix(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    assert any(expected in line for line in e.value.errors), e.value.errors


def test_every_error_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL), ["lora.r=0", "lalora.lambda=-2", "training.lr=0"])
    assert len(e.value.errors) == 3


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, MINIMAL), ["lalora.lambda"])


def test_validate_command_exit_codes(tmp_path, capsys):
    good = write(tmp_path, MINIMAL)
    assert main(["validate", str(good)]) == 0
    assert "OK (1 stages: d1" in capsys.readouterr().out
    assert main(["validate", str(good), "--set", "lora.r=0", "--set", "lora.bogus=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(str(good)) for line in err)
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_run_rejects_a_bad_config_before_loading_anything(tmp_path, capsys):
    bad = write(tmp_path, MINIMAL + "lalora: {lambda: -1}\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lalora: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
