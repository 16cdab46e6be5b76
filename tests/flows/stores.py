"""Copies of an MLflow SQLite store and its artifacts, so a test can change a lineage without changing it for
the next test: the store's SQL with every absolute path rewritten, the artifact files copied."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path


def restore_sql(sql: str, prefix: str, out: Path) -> str:
    """The SQL dump of a store written under ``prefix`` as a store under ``out``; its URI."""
    out.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(out / "mlflow.db") as db:
        db.executescript(sql.replace(prefix, str(out.resolve())))
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def clone(src: Path, dst: Path) -> str:
    """A copy of output directory ``src`` (its store, artifacts and files) at ``dst``; the copy's store URI."""
    with sqlite3.connect(src / "mlflow.db") as db:
        sql = "\n".join(db.iterdump())
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("mlflow.db", ".lalora.lock"))
    (dst / "mlflow.db").unlink(missing_ok=True)
    return restore_sql(sql, str(src.resolve()), dst)
