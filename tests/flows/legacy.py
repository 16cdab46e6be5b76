"""The lineage store of tests/fixtures/legacy-lineage, restored under a temporary directory."""

import shutil
import sqlite3
from pathlib import Path

FIXTURE = Path(__file__).parents[1] / "fixtures" / "legacy-lineage"
PREFIX = "/tmp/lalora-legacy-fixture/out"
"""Where the fixture was written; every absolute path in its store starts with it."""


def restore(out: Path) -> str:
    """The fixture's SQLite store and artifacts under ``out`` (its paths rewritten); the store's URI."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(FIXTURE / "mlartifacts", out / "mlartifacts")
    sql = (FIXTURE / "mlflow.sql").read_text().replace(PREFIX, str(out.resolve()))
    with sqlite3.connect(out / "mlflow.db") as db:
        db.executescript(sql)
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def config_text() -> str:
    return (FIXTURE / "tiny.yaml").read_text()
