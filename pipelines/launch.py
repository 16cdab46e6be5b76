"""Scale-out: run the fine-tune or curvature step through the deepspeed launcher.

``launch`` writes a job file, starts ``deepspeed [--hostfile H] --num_gpus N --module
pipelines.launch JOB`` and waits. Every rank runs the same stage function (data parallel:
each takes its share of every batch); rank 0 writes the outputs, records its tracker calls
to a JSON-lines file and the stage result to JSON, which ``launch`` replays and returns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipelines import config as config_mod
from pipelines.config import DeepSpeedConfig
from pipelines.tracking import JsonlTracker, NullTracker, Tracker, replay


class LaunchError(RuntimeError):
    """The launched ranks failed; the message names the job and the tail of their output."""


def _steps() -> dict[str, tuple[Any, type]]:
    from pipelines.finetune import FinetuneResult, finetune
    from pipelines.precision import PrecisionResult, compute_precision

    return {"finetune": (finetune, FinetuneResult), "precision": (compute_precision, PrecisionResult)}


def _encode(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {"__config__": type(value).__name__, "value": value.model_dump(mode="json", by_alias=True)}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__config__" in value:
        return getattr(config_mod, value["__config__"]).model_validate(value["value"])
    return value


def uses_launcher(ds: DeepSpeedConfig) -> bool:
    return ds.world_size > 1 or ds.hostfile is not None


def launch(step: str, kwargs: dict[str, Any], ds: DeepSpeedConfig, work_dir: str | Path, tracker: Tracker) -> Any:
    """Run ``step`` ('finetune' or 'precision') with ``kwargs`` on ``ds.world_size`` ranks; its result."""
    from pipelines.engine import _free_port

    fn, result_type = _steps()[step]
    work = Path(work_dir) / f"launch-{step}"
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("events.jsonl", "result.json"):
        (work / stale).unlink(missing_ok=True)
    job = work / "job.json"
    job.write_text(json.dumps({"step": step, "kwargs": {k: _encode(v) for k, v in kwargs.items()}}))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()), "--no_local_rank"]
    if ds.hostfile:
        cmd += ["--hostfile", ds.hostfile]
    if ds.world_size > 1 or not ds.hostfile:
        cmd += ["--num_gpus", str(ds.world_size)]
    cmd += ["--module", "pipelines.launch", str(job)]
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    replay(work / "events.jsonl", tracker)
    if proc.returncode != 0 or not (work / "result.json").is_file():
        tail = " | ".join(proc.stdout.strip().splitlines()[-5:])
        raise LaunchError(f"{step} on {ds.world_size} ranks failed (exit {proc.returncode}): {tail}")
    return result_type(**json.loads((work / "result.json").read_text()))


def _main(job_path: str) -> None:
    """One rank of a launched job."""
    from pipelines.engine import ensure_distributed, world

    job = json.loads(Path(job_path).read_text())
    fn, _ = _steps()[job["step"]]
    ensure_distributed()
    rank, _ = world()
    work = Path(job_path).parent
    kwargs = {k: _decode(v) for k, v in job["kwargs"].items()}
    result = fn(**kwargs, tracker=JsonlTracker(work / "events.jsonl") if rank == 0 else NullTracker())
    if rank == 0:
        tmp = work / ".result.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(result)))
        os.replace(tmp, work / "result.json")


if __name__ == "__main__":
    _main(sys.argv[1])
