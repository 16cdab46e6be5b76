"""The curvature and fine-tune steps of a stage, run in this process or through the deepspeed launcher.

``run_step`` calls the stage function with the sub-configs it needs. With ``deepspeed.world_size``
above 1 (or a hostfile) it writes a job file (the lineage config as its JSON dump, the stage, the
paths), starts ``deepspeed [--hostfile H] --num_gpus N --module pipelines.runtime.launch JOB`` and
waits. Every rank validates the config again with the schema and runs the same stage function
(data parallel: each takes its share of every batch); rank 0 writes the outputs, records its
tracker calls to a JSON-lines file and the stage result to JSON, which ``run_step`` replays and returns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import DeepSpeedConfig, LineageConfig
from pipelines.tracker import JsonlTracker, NullTracker, Tracker, replay


class LaunchError(RuntimeError):
    """The launched ranks failed; the message names the job and the tail of their output."""


@dataclass(frozen=True)
class StepPaths:
    """What a step reads and writes."""

    base: str
    """the base model (from_pretrained path or hub id)"""
    anchor: str
    """the adapter the stage starts from"""
    precision: str | None
    """the accumulated precision so far (the curvature step's previous one; the fine-tune step's penalty)"""
    data: str
    out: str
    """the stage's directory"""
    checkpoint: str | None = None
    """the fine-tune step's DeepSpeed checkpoints"""


def _precision(cfg: LineageConfig, stage: int, paths: StepPaths, tracker: Tracker) -> Any:
    from pipelines.stages.curvature import compute_precision

    return compute_precision(paths.base, paths.anchor, cfg.lalora, cfg.all_domains[stage - 1], previous=paths.precision,
                             stage=stage, dtype=cfg.model.dtype, max_length=cfg.training.max_length, seed=cfg.seed,
                             data_dir=paths.data, out_dir=paths.out, tracker=tracker, ds=cfg.deepspeed)


def _finetune(cfg: LineageConfig, stage: int, paths: StepPaths, tracker: Tracker) -> Any:
    from pipelines.data.replay import replay_sources
    from pipelines.stages.finetune import finetune

    return finetune(paths.base, paths.anchor, paths.precision, cfg.lalora, cfg.domains[stage - 1], cfg.training,
                    cfg.deepspeed, dtype=cfg.model.dtype, stage=stage, data_dir=paths.data, out_dir=paths.out,
                    tracker=tracker, checkpoint_dir=paths.checkpoint,
                    replay_from=replay_sources(cfg.training.replay, cfg.source, cfg.domains[: stage - 1]))


def _steps() -> dict[str, tuple[Callable[..., Any], type]]:
    from pipelines.stages.curvature import PrecisionResult
    from pipelines.stages.finetune import FinetuneResult

    return {"precision": (_precision, PrecisionResult), "finetune": (_finetune, FinetuneResult)}


def uses_launcher(ds: DeepSpeedConfig) -> bool:
    return ds.world_size > 1 or ds.hostfile is not None


def run_step(step: str, cfg: LineageConfig, stage: int, paths: StepPaths, tracker: Tracker) -> Any:
    """Run ``step`` ('precision' or 'finetune') of ``stage``; its result."""
    fn, _ = _steps()[step]
    if not uses_launcher(cfg.deepspeed):
        return fn(cfg, stage, paths, tracker)
    return _launch(step, cfg, stage, paths, tracker)


def _launch(step: str, cfg: LineageConfig, stage: int, paths: StepPaths, tracker: Tracker) -> Any:
    from pipelines.runtime.distributed import free_port

    _, result_type = _steps()[step]
    ds = cfg.deepspeed
    work = Path(paths.out) / f"launch-{step}"
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("events.jsonl", "result.json"):
        (work / stale).unlink(missing_ok=True)
    job = work / "job.json"
    job.write_text(json.dumps({"step": step, "stage": stage, "paths": dataclasses.asdict(paths),
                               "config": cfg.as_json()}))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()), "--no_local_rank"]
    if ds.hostfile:
        cmd += ["--hostfile", ds.hostfile]
    if ds.world_size > 1 or not ds.hostfile:
        cmd += ["--num_gpus", str(ds.world_size)]
    cmd += ["--module", "pipelines.runtime.launch", str(job)]
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    replay(work / "events.jsonl", tracker)
    if proc.returncode != 0 or not (work / "result.json").is_file():
        tail = " | ".join(proc.stdout.strip().splitlines()[-5:])
        raise LaunchError(f"{step} on {ds.world_size} ranks failed (exit {proc.returncode}): {tail}")
    return result_type(**json.loads((work / "result.json").read_text()))


def _main(job_path: str) -> None:
    """One rank of a launched job."""
    from pipelines.runtime.distributed import distributed

    job = json.loads(Path(job_path).read_text())
    fn, _ = _steps()[job["step"]]
    cfg = LineageConfig.model_validate(job["config"])
    work = Path(job_path).parent
    with distributed() as (rank, _):
        result = fn(cfg, job["stage"], StepPaths(**job["paths"]),
                    JsonlTracker(work / "events.jsonl") if rank == 0 else NullTracker())
    if rank == 0:
        tmp = work / ".result.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(result)))
        os.replace(tmp, work / "result.json")


if __name__ == "__main__":
    _main(sys.argv[1])
