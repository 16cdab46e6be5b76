"""The docs' generated pages are what the models and the parser say: docs/reference/config.md from the config's
pydantic models, docs/reference/cli.md from ``lalora``'s argparse parser (``make docs`` rewrites both)."""

import argparse
import re
from pathlib import Path

from pydantic import BaseModel, Field

from flows.cli import _parser
from pipelines.config.reference import cli_reference, config_paths, config_reference

DOCS = Path(__file__).resolve().parents[2] / "docs"
STALE = "is stale: run `make docs` (or python docs/generate.py) and commit docs/reference/"


def test_the_config_reference_is_the_models():
    assert (DOCS / "reference" / "config.md").read_text() == config_reference(), f"docs/reference/config.md {STALE}"


def test_the_cli_reference_is_the_parser():
    assert (DOCS / "reference" / "cli.md").read_text() == cli_reference(_parser()), f"docs/reference/cli.md {STALE}"


def test_every_field_of_every_model_has_its_row():
    text = config_reference()
    paths = config_paths()
    for path in (
        "lalora.lambda",
        "lalora.curvature.top_k",
        "domains[].scoring.task",
        "training.overlong",
        "training.replay.fraction",
        "domains[].eval_data.data",
        "orchestration.launch_retries",
    ):
        assert path in paths, path
    for path in paths:
        assert f"| `{path}` |" in text, path


def test_a_row_says_type_default_constraints_and_description():
    lines = config_reference().splitlines()
    rows = {line.split(" | ")[0].strip("| `"): line for line in lines if line.startswith("| `")}
    assert rows["lora.dropout"] == (
        "| `lora.dropout` | `float` | `0.0` | >= 0, < 1 | LoRA dropout during fine-tuning (never during curvature). |"
    )
    assert '| `float` (>= 0) \\| `"auto"` | `10.0` |' in rows["lalora.lambda"]
    assert '[`lalora.curvature`](#lalora-curvature) by `kind` | `{kind: "diag"}` |' in rows["lalora.curvature"]
    assert "| **required** | selects this kind |" in rows["lalora.curvature.kind"]
    assert "| list of [`domains[]`](#domains) | **required** | min length 1 |" in rows["domains"]
    assert '| `{name: "source"}` |' in rows["source"]  # a model's default, by what differs from its own defaults
    assert "also read as `finetune_retries`" in rows["orchestration.launch_retries"]
    assert "sqlite:///&lt;out&gt;/mlflow.db" in rows["tracking.mlflow_uri"]  # prose is not HTML


def test_every_anchor_the_config_page_links_to_exists():
    text = config_reference()
    anchors = set(re.findall(r"\{#([a-z0-9-]+)\}", text))
    for target in re.findall(r"\]\(#([a-z0-9-]+)\)", text):
        assert target in anchors, target


def test_a_model_shared_by_several_fields_is_documented_once_and_named_at_each():
    class Part(BaseModel):
        size: int = Field(1, gt=0, description="How big.")

    class Root(BaseModel):
        one: Part = Field(default_factory=Part, description="A single part.")
        many: list[Part] = Field(default_factory=list, description="Parts.")

    text = config_reference(Root)
    assert text.count("| `many[].size` | `int` | `1` | > 0 | How big. |") == 1 and "`one.size`" not in text
    assert "The same fields also at: `one`." in text


def test_every_command_and_option_is_on_the_cli_page():
    text = cli_reference(_parser())
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert f"## `lalora {name}` {{#{name}}}" in text, name
        for action in parser._actions:
            for option in action.option_strings:
                assert option in ("-h", "--help") or f"`{option}" in text, (name, option)
