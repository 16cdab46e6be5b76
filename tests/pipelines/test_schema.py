"""The config's published contract: lalora.schema.json is the models' JSON Schema, and every shipped config meets it."""

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipelines.config import config_schema, load_config
from tests.conftest import child_env, lalora_script

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "lalora.schema.json"


def test_the_shipped_schema_is_the_models_schema():
    assert SHIPPED.read_text() == config_schema(), (
        "the config models changed: run `lalora schema --out lalora.schema.json`"
    )


def test_lalora_schema_prints_it():
    out = subprocess.run([lalora_script(), "schema"], env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == SHIPPED.read_text(), out.stderr[-2000:]


SHIPPED_YAML = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED_YAML)
def test_every_shipped_yaml_opens_with_the_schema_line_of_editors(config):
    """The YAML language server validates a file as it is typed against the schema its first line names."""
    path = ROOT / "configs" / config
    first = path.read_text().splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix), first
    assert (path.parent / first.removeprefix(prefix)).resolve() == SHIPPED, first
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(SHIPPED.read_text()))  # a catalogue too


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_meets_the_schema_and_a_broken_one_does_not(config):
    schema = json.loads(SHIPPED.read_text())
    data = yaml.safe_load((ROOT / "configs" / config).read_text())
    jsonschema.validate(data, schema)  # what an editor checks as the user types
    load_config(ROOT / "configs" / config)  # and what a run checks
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**data, "lalora": {**data.get("lalora", {}), "lambda": -1}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**data, "training": {"stepz": 3}}, schema)  # unknown keys are errors here too
