"""Wall-clock marks of a launched step's first and last batch, so a launch's own cost can be measured.

A rank that records (rank 0 of a launched job) points the marks at a file with ``record_to``; everywhere
else ``mark`` is a no-op. ``pipelines.runtime.launch`` reads the file back: the seconds from the launcher's
start to the first batch (interpreters, imports, rendezvous, model load) and from the last batch to the
launcher's exit (saving, teardown).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

_sink: Path | None = None


def record_to(path: Path | None) -> None:
    """Append this process's marks to ``path`` from now on (None: stop)."""
    global _sink
    _sink = path


def mark(event: str) -> None:
    """Note the wall-clock time of ``event`` ('first_batch', 'last_batch')."""
    if _sink is None:
        return
    with open(_sink, "a") as f:
        f.write(json.dumps({"event": event, "time": time.time()}) + "\n")


def read(path: Path) -> dict[str, float]:
    """Each event's first time (first_batch) or last time (last_batch: a step with several loops ends at its last)."""
    marks: dict[str, float] = {}
    if not path.is_file():
        return marks
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] not in marks or rec["event"] == "last_batch":
            marks[rec["event"]] = float(rec["time"])
    return marks
