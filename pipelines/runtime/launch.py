"""Running a step on several ranks through the deepspeed launcher, and telling a transient failure from the step's own.

``launch`` writes a job file, starts ``deepspeed [--hostfile H] --num_gpus N --module MODULE JOB`` and waits;
every rank runs ``rank_main`` (from MODULE's ``__main__``), rank 0 records its tracker calls to a JSON-lines
file and its result to JSON, which ``launch`` replays and returns. What a job holds and which step it runs is
the caller's (``pipelines.stages.steps``): this module imports nothing above the runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import DeepSpeedConfig
from pipelines.runtime import timeline
from pipelines.tracker import JsonlTracker, NullTracker, Tracker, replay
from pipelines.workspace import write_json_atomic

_SIGNAL_EXIT = 128
"""Exit statuses above this are a signal's (the launcher exits ``256 - N`` when a rank died of signal N)."""

_TRANSIENT_OUTPUT = ("Address already in use",)
"""Output that marks a failure of the launch rather than of the step: the rendezvous port taken between
choosing and binding it. (Not a peer's lost connection: the ranks that outlive a rank's own exception print
that too. Not an abort at exit: its status, above 128, says so already.)"""


class LaunchError(RuntimeError):
    """The launched ranks failed; the message names the job, the exit status and the tail of their output."""

    def __init__(self, step: str, world_size: int, returncode: int, output: str) -> None:
        self.step, self.returncode = step, returncode
        tail = " | ".join(output.strip().splitlines()[-5:])
        # exit 0 without a result: the node's launcher was killed (DeepSpeed's runner exits 0 when its child
        # dies of a signal, and propagates only positive statuses)
        self.transient = (
            returncode < 0
            or returncode > _SIGNAL_EXIT
            or returncode == 0
            or any(s in output for s in _TRANSIENT_OUTPUT)
        )
        why = "transient: a rank was killed or the launch itself failed" if self.transient else "the step failed"
        super().__init__(f"{step} on {world_size} ranks failed (exit {returncode}; {why}): {tail}")
        self._init_args = (step, world_size, returncode, output)

    def __reduce__(self) -> tuple[type, tuple[str, int, int, str]]:  # a task runner may pickle it
        return (LaunchError, self._init_args)


def is_transient(error: BaseException) -> bool:
    """Whether a step's failure may pass when the step runs again, which is safe for both steps (the
    precision is recomputed from the same inputs; a fine-tune continues from its latest checkpoint): a
    launched job whose rank or launcher was killed by a signal (the OOM killer, a lost node, an abort at
    exit; a launcher killed makes DeepSpeed's runner exit 0 with no result) or whose rendezvous port was
    taken. Not a rank's own exception (a bug, bad input, divergence: it fails the same way again), even when
    the other ranks then print a lost connection."""
    return isinstance(error, LaunchError) and error.transient


SHM_DIR = Path("/dev/shm")


def release_shared_memory(port: int) -> int:
    """Remove the shared-memory buffers a finished launch's ranks left behind; how many.

    DeepSpeed's CPU collectives (deepspeed/ops/csrc/cpu/comm/shm.cpp) allocate one 66 MiB buffer per local
    rank in /dev/shm, named ``deepspeed_allreduce_buffer_<i>_<addr>_<master port>_<rank>``, and never unlink
    it: each 2-rank launch left 132 MiB, and about 160 launches filled a 24 GiB /dev/shm until the OOM killer
    ran. The launch's own master port names exactly its buffers; its ranks have exited by now."""
    removed = 0
    for path in SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def uses_launcher(ds: DeepSpeedConfig) -> bool:
    return ds.world_size > 1 or ds.hostfile is not None


def launch(
    step: str, job: dict[str, Any], ds: DeepSpeedConfig, work: Path, tracker: Tracker, module: str
) -> dict[str, Any]:
    """Run ``python -m MODULE JOB`` on the ranks through the deepspeed launcher (``job`` written to
    ``work/job.json``); rank 0's ``result.json``. Its tracker calls are replayed into ``tracker``; a failed
    launch raises ``LaunchError``."""
    from pipelines.runtime.distributed import free_port

    work.mkdir(parents=True, exist_ok=True)
    for stale in ("events.jsonl", "result.json", "timeline.jsonl", "output.log"):
        (work / stale).unlink(missing_ok=True)
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job))
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port), "--no_local_rank"]
    if ds.hostfile:
        cmd += ["--hostfile", ds.hostfile]
    if ds.world_size > 1 or not ds.hostfile:
        cmd += ["--num_gpus", str(ds.world_size)]
    cmd += ["--module", module, str(job_path)]
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    started = time.time()
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        release_shared_memory(port)
    ended = time.time()
    (work / "output.log").write_text(proc.stdout)
    replay(work / "events.jsonl", tracker)
    if proc.returncode != 0:  # a result file beside a failed launch is not a result
        raise LaunchError(step, ds.world_size, proc.returncode, proc.stdout)
    if not (work / "result.json").is_file():
        raise LaunchError(step, ds.world_size, proc.returncode, f"{proc.stdout}\nthe ranks exited 0, no result.json")
    marks = timeline.read(work / "timeline.jsonl")
    if {"first_batch", "last_batch"} <= marks.keys():
        tracker.log_metrics(
            {
                f"launch/{step}_startup_seconds": marks["first_batch"] - started,
                f"launch/{step}_teardown_seconds": ended - marks["last_batch"],
            }
        )
    result: dict[str, Any] = json.loads((work / "result.json").read_text())
    return result


def rank_main(job_path: str, run: Callable[[dict[str, Any], Tracker], Any]) -> None:
    """One rank of a launched job: ``run(job, tracker)``, rank 0's result (a dataclass) written, then every rank
    leaves the group together."""
    import gc

    from pipelines.runtime.distributed import distributed, shutdown

    job = json.loads(Path(job_path).read_text())
    work = Path(job_path).parent
    with distributed() as (rank, _):
        timeline.record_to(work / "timeline.jsonl" if rank == 0 else None)
        result = run(job, JsonlTracker(work / "events.jsonl") if rank == 0 else NullTracker())
        if rank == 0:
            write_json_atomic(work / "result.json", dataclasses.asdict(result))
        gc.collect()  # the step's engines and their communication buffers, while the group still exists
        shutdown()  # a step that raised skips this: the other ranks may still be inside a collective
