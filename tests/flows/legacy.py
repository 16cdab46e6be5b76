"""The lineage store of tests/fixtures/legacy-lineage, restored under a temporary directory."""

import shutil
from pathlib import Path

from tests.flows.stores import restore_sql

FIXTURE = Path(__file__).parents[1] / "fixtures" / "legacy-lineage"
PREFIX = "/tmp/lalora-legacy-fixture/out"
"""Where the fixture was written; every absolute path in its store starts with it."""


def restore(out: Path) -> str:
    """The fixture's SQLite store and artifacts under ``out`` (its paths rewritten); the store's URI."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(FIXTURE / "mlartifacts", out / "mlartifacts")
    return restore_sql((FIXTURE / "mlflow.sql").read_text(), PREFIX, out)


def config_text() -> str:
    return (FIXTURE / "tiny.yaml").read_text()
