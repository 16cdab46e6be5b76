"""MLflow behind the pipelines' Tracker protocol: runs, their parameters, metrics and artifacts.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so
tasks can run in any thread and only pass URIs and ids between them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.lock import process_alive

log = logging.getLogger(__name__)

RESERVED_ALIASES = {"latest"}
"""MLflow reserves ``latest``: ``models:/NAME/latest`` already resolves to the newest version."""


def default_tracking_uri(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def tracking_uri(configured: str | None, out_dir: str | Path) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI (a server), else a SQLite store under the output dir."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out_dir)


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/"))


_READY: set[str] = set()


def ensure_sqlite_store(uri: str) -> None:
    """Create a new SQLite store whole or not at all.

    MLflow creates its tables in many migration steps on first use; a process killed among
    them leaves a store no later run can open (found by the fault-injection test). A missing
    store is therefore built under a temporary name and renamed into place.
    """

    if uri in _READY or not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.exists():
        from mlflow import MlflowClient

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.init-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments()  # runs every migration
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # atomic, and never replaces a store another process just created
        tmp.unlink(missing_ok=True)
    _READY.add(uri)


def mlflow_client(uri: str) -> Any:
    """The MLflow client of the store at ``uri``, tracking and registry alike (a SQLite store made ready first):
    the one way the runs, the registry and the lease reach MLflow."""
    from mlflow import MlflowClient

    ensure_sqlite_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@dataclass(frozen=True)
class RunRef:
    """A run, by value: what tasks receive instead of a live client."""

    uri: str
    run_id: str

    def tracker(self) -> MlflowTracker:
        return MlflowTracker(self.uri, self.run_id)


class MlflowTracker:
    """pipelines.tracker.Tracker on one MLflow run; ``seconds`` is the time its calls took (overhead, not
    the work of the stage that reports through it)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = mlflow_client(uri)
        self.run_id = run_id
        self.seconds = 0.0

    @contextmanager
    def _timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        from pipelines.safety import redact_params

        # never a secret in the tracking store: secret-named keys, secret env values, URL passwords
        items = [Param(k, str(v)[:6000]) for k, v in redact_params(flatten(params)).items()]
        with self._timed():
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            with self._timed():
                self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        with self._timed():
            if p.is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)


def start_run(
    uri: str,
    experiment: str,
    artifact_root: Path | None,
    name: str,
    parent: str | None = None,
    tags: dict[str, str] | None = None,
) -> RunRef:
    """Create (if needed) the experiment and start a run in it. Artifacts go under ``artifact_root``
    for a local store; a tracking server (``artifact_root`` None) uses its own artifact store."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=location)
    all_tags = {"lalora.host": socket.gethostname(), "lalora.pid": str(os.getpid()), **(tags or {})}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    return RunRef(uri, run.info.run_id)


def end_run(ref: RunRef, status: str = "FINISHED") -> None:
    mlflow_client(ref.uri).set_terminated(ref.run_id, status=status)


def close_orphaned_runs(uri: str, experiment: str, tag: str, value: str) -> list[str]:
    """Mark KILLED the runs tagged ``tag = value`` left RUNNING by a process on this host that no longer exists.

    A SIGKILLed or crashed run cannot close its MLflow runs; the next run of the lineage (or sweep)
    does, tagging why. Runs started on another host, or by a live process, are left alone.
    """
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    host = socket.gethostname()
    closed = []
    for run in client.search_runs(
        [exp.experiment_id], f"tags.`{tag}` = '{value}' and attributes.status = 'RUNNING'", max_results=1000
    ):
        tags = run.data.tags
        if tags.get("lalora.host") != host or not tags.get("lalora.pid", "").isdigit():
            continue
        if process_alive(int(tags["lalora.pid"])):
            continue
        client.set_tag(
            run.info.run_id,
            "lalora.closed",
            f"KILLED: its process (pid {tags['lalora.pid']} on {host}) "
            "ended without closing it; closed by the next run",
        )
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.warning(
            "closed %d run(s) of %s %s left RUNNING by a process that died: %s",
            len(closed),
            tag,
            value,
            ", ".join(closed),
        )
    return closed


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as dotted keys (``domains.0.name``)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    if isinstance(data, list) and data and all(isinstance(v, (dict, list)) for v in data):
        out = {}
        for i, v in enumerate(data):
            out |= flatten(v, f"{prefix}{i}.")
        return out
    return {prefix.rstrip("."): data}
