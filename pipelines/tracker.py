"""How stages report: a small Tracker protocol, implemented with MLflow in flows/."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...


class NullTracker:
    """Records nothing; for tests and library use without tracking."""

    def log_params(self, params: dict[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        return None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        return None


class LatestTracker(NullTracker):
    """Keeps the latest value of every param and metric logged (one flat dict): for a benchmark reading what
    the stage functions report."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.values.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.values.update(metrics)


class JsonlTracker:
    """Appends every call to a JSON-lines file, for a process that cannot reach the real tracker
    (a rank under the deepspeed launcher); ``replay`` hands the calls on afterwards."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _write(self, record: dict[str, Any]) -> None:
        import json

        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        self._write({"call": "log_params", "params": params})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._write({"call": "log_metrics", "metrics": metrics, "step": step})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._write({"call": "log_artifact", "path": str(path), "artifact_path": artifact_path})


def replay(path: str | Path, tracker: Tracker) -> None:
    """Send the calls a JsonlTracker recorded to ``tracker``, in order."""
    import json

    p = Path(path)
    if not p.is_file():
        return
    for line in p.read_text().splitlines():
        r = json.loads(line)
        if r["call"] == "log_params":
            tracker.log_params(r["params"])
        elif r["call"] == "log_metrics":
            tracker.log_metrics(r["metrics"], step=r["step"])
        else:
            tracker.log_artifact(r["path"], r["artifact_path"])
