"""Production's form (issue 24): a real `prefect server start` on loopback, `lalora deploy` of the tiny lineage on a
work pool, `prefect deployment run`, and real `prefect worker start --pool` processes that run it. Outcomes reach
people: Prefect events read back from the server's API, and a webhook on loopback that receives a rejected
promotion and a failed run. Everything through the installed scripts, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from mlflow import MlflowClient

from tests.configs import tiny
from tests.conftest import child_env, run_lalora
from tests.flows.servers import BIN, prefect_server

pytestmark = pytest.mark.slow

PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefect-server")
    with prefect_server(root) as api:
        yield api


def _env(api: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "client-home"
    home.mkdir(exist_ok=True)
    return child_env(
        PREFECT_API_URL=api,
        PREFECT_HOME=str(home),
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", ""),
        **extra,
    )


def _api(api: str, path: str, body: dict | None = None) -> object:
    import urllib.request

    req = urllib.request.Request(
        f"{api}{path}",
        data=json.dumps(body or {}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _flow_runs(api: str, deployment: str) -> list[dict]:
    runs = _api(api, "/flow_runs/filter", {"flow_runs": {}, "sort": "EXPECTED_START_TIME_ASC"})
    return [r for r in runs if r.get("deployment_id") == deployment]


def _deploy(api: str, tmp_path: Path, config: Path, pool: str, out: Path, *args: str) -> tuple[str, str]:
    code, text = run_lalora(
        ["deploy", str(config), "--pool", pool, "--out", str(out), *args], tmp_path, PREFECT_API_URL=api
    )
    assert code == 0, text
    assert "prefect deployment run 'lalora-lineage/" in text and f"prefect worker start --pool '{pool}'" in text
    name = text.split("deployed ", 1)[1].split(" ", 1)[0]
    deployment_id = text.rsplit("(id ", 1)[1].split(")", 1)[0]
    return name, deployment_id


def _trigger(api: str, tmp_path: Path, name: str) -> None:
    proc = subprocess.run(
        [*PREFECT, "deployment", "run", name], env=_env(api, tmp_path), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _worker(api: str, tmp_path: Path, pool: str, log: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*PREFECT, "worker", "start", "--pool", pool, "--limit", "1"],
        env=_env(api, tmp_path, PREFECT_WORKER_QUERY_SECONDS="1"),
        stdout=open(tmp_path / log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait(api: str, deployment: str, n: int, states: set[str], timeout: float = 900) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = _flow_runs(api, deployment)
        if len(runs) >= n and all(r["state_type"] in states for r in runs[:n]):
            return runs
        time.sleep(2)
    raise AssertionError(f"flow runs not {states} after {timeout} s: {[(r['name'], r['state_type']) for r in runs]}")


def _versions(out: Path, model: str) -> list:
    uri = f"sqlite:///{out / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri).search_model_versions(f"name = '{model}'")


def test_deploy_refuses_bad_input_in_one_line(tmp_path, server):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny("one"))
    cases = [
        ({"PREFECT_API_URL": ""}, [], "set PREFECT_API_URL"),
        ({"PREFECT_API_URL": "http://127.0.0.1:9/api"}, [], "PREFECT_API_URL=http://127.0.0.1:9/api: no Prefect"),
        ({"PREFECT_API_URL": server}, ["--cron", "61 * * * *"], "not a valid cron schedule"),
        (
            {"PREFECT_API_URL": server},
            ["--cron", "0 3 * * 1", "--timezone", "Mars/Olympus"],
            "not a valid cron schedule",
        ),
    ]
    for env, args, fragment in cases:
        code, text = run_lalora(["deploy", str(cfg), "--pool", "p", *args], tmp_path, **env)
        lines = [line for line in text.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in text, (args, text)
    _api(server, "/work_pools/", {"name": "k8s-pool", "type": "kubernetes"})
    code, text = run_lalora(["deploy", str(cfg), "--pool", "k8s-pool"], tmp_path, PREFECT_API_URL=server)
    assert code == 2 and "work pool of type 'kubernetes'" in text and "Traceback" not in text, text


def test_a_worker_runs_the_deployment_and_runs_queue_one_at_a_time(tmp_path, server):
    """Two runs triggered at once: the second waits for the first (concurrency limit 1), then finds the lineage
    finished and registers nothing. Also measured: trigger to the worker starting the flow, and the per-stage
    overhead of a worker run against `lalora run` of the same lineage."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        tiny("one", "two", name="deployed", tracking={"experiment": "deployed", "registered_model": "deployed-adapter"})
    )
    out = tmp_path / "out"
    name, deployment = _deploy(server, tmp_path, cfg, "lineages", out)
    pools = _api(server, "/work_pools/filter", {})
    assert {"name": "lineages", "type": "process"}.items() <= next(p for p in pools if p["name"] == "lineages").items()
    t0 = time.time()
    _trigger(server, tmp_path, name)
    _trigger(server, tmp_path, name)
    worker = _worker(server, tmp_path, "lineages", "worker.log")
    try:
        runs = _wait(server, deployment, 2, {"COMPLETED"})
    finally:
        _stop(worker)
    first, second = runs[0], runs[1]
    assert second["start_time"] >= first["end_time"], (first, second)  # one after the other, never side by side
    assert sorted(v.tags["lalora.stage"] for v in _versions(out, "deployed-adapter")) == ["1", "2"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages_run"] == [] and metrics["stages_skipped"] == [1, 2]  # the second run's: nothing to do
    from datetime import datetime

    started = datetime.fromisoformat(first["start_time"]).timestamp() - t0
    code, text = run_lalora(["run", str(cfg), "--out", str(tmp_path / "local")], tmp_path)
    assert code == 0, text
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())
    for key in ("R", "R_nll"):  # the worker's lineage is the one lalora run makes
        for got, want in zip(local[key], metrics[key], strict=True):
            assert got == pytest.approx(want, abs=1e-6), key
    worker_overhead, local_overhead = _stage_overheads(out), _stage_overheads(tmp_path / "local")
    print(
        f"deployment run to the worker starting the flow: {started:.1f} s; per-stage overhead (wall less the "
        f"steps' work): worker {worker_overhead}, lalora run {local_overhead} (ratio "
        f"{sum(worker_overhead) / sum(local_overhead):.2f})"
    )


def _stage_overheads(out: Path) -> list[float]:
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`lalora.stage` != ''",
        order_by=["tags.`lalora.stage` ASC"],
    )
    return [
        round(r.data.metrics["stage/overhead_seconds"], 1) for r in runs if "stage/overhead_seconds" in r.data.metrics
    ]


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self):  # http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        return None


def test_a_rejected_promotion_and_a_failed_run_reach_the_webhook_and_the_event_feed(tmp_path, server):
    hook = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_port}/lalora"
    try:
        strict = tmp_path / "strict.yaml"  # no stage can gain 100: the gate refuses, the run completes
        strict.write_text(
            tiny(
                "one",
                name="strict",
                promotion={"min_learning": 100.0},
                notify={"webhook": url},
                tracking={"experiment": "strict", "registered_model": "strict-adapter"},
            )
        )
        code, text = run_lalora(
            ["run", str(strict), "--out", str(tmp_path / "strict"), "--set", "model.pretrain.steps=0"],
            tmp_path,
            PREFECT_API_URL=server,
        )
        assert code == 0, text
        (tmp_path / "q.jsonl").write_text(
            "".join(json.dumps({"question": "a", "solution": "b"}) + "\n" for _ in range(20))
        )
        broken = tmp_path / "broken.yaml"  # its domain's data lacks the columns it names: the run fails
        broken.write_text(
            tiny(
                {
                    "name": "one",
                    "data": {"kind": "local", "path": "q.jsonl"},
                    "eval_size": 4,
                    "prompt_field": "question",
                    "answer_field": "answer",
                },
                name="broken",
                notify={"webhook": url},
                tracking={"experiment": "broken", "registered_model": "broken-adapter"},
            )
        )
        code, text = run_lalora(
            ["run", str(broken), "--out", str(tmp_path / "broken")], tmp_path, PREFECT_API_URL=server
        )
        assert code == 2, text
    finally:
        hook.shutdown()
    by_event = {r["event"]: r for r in _Hook.received}
    assert set(by_event) == {"lalora.promotion.rejected", "lalora.lineage.failed"}, _Hook.received
    rejected = by_event["lalora.promotion.rejected"]
    assert rejected["lineage"] == "strict-adapter" and rejected["stage"] == 1 and rejected["version"] == "1"
    assert "learning" in rejected["reason"] and rejected["flow_run"]
    failed = by_event["lalora.lineage.failed"]
    assert failed["lineage"] == "broken-adapter" and "answer" in failed["reason"]

    deadline, events = time.time() + 60, []
    while time.time() < deadline:
        page = _api(server, "/events/filter", {"filter": {"event": {"prefix": ["lalora."]}}, "limit": 50})
        events = page["events"]
        if {e["event"] for e in events} >= {
            "lalora.version.registered",
            "lalora.promotion.rejected",
            "lalora.lineage.failed",
        }:
            break
        time.sleep(1)
    names = {e["event"]: e for e in events}
    assert {"lalora.version.registered", "lalora.promotion.rejected", "lalora.lineage.failed"} <= set(names), events
    assert names["lalora.promotion.rejected"]["resource"]["prefect.resource.id"] == "lalora.lineage.strict-adapter"
    assert names["lalora.promotion.rejected"]["payload"]["stage"] == 1
    runs = _api(server, "/flow_runs/filter", {"flow_runs": {}})
    strict_run = next(r for r in runs if r["id"] == rejected["flow_run"])
    assert strict_run["state_type"] == "COMPLETED" and "not promoted" in strict_run["state"]["message"]


def _latest_step(out: Path) -> int:
    from pipelines.runtime.engine import _latest_tag

    found = list((out / "stages" / "01-one" / "checkpoints").glob("*/latest"))
    tag = _latest_tag(found[0].parent) if found else None
    return int(tag.removeprefix("step")) if tag else 0


def _force_crashed(api: str, run_id: str) -> None:
    """What Prefect's zombie detection does to a run whose worker host died (an automation on missed flow-run
    heartbeats): the run is marked Crashed, which frees its deployment's concurrency slot."""
    _api(
        api,
        f"/flow_runs/{run_id}/set_state",
        {"state": {"type": "CRASHED", "message": "its worker was killed"}, "force": True},
    )


def test_a_worker_killed_mid_finetune_then_a_new_worker_and_run_resume_the_stage(tmp_path, server):
    """SIGKILL the worker's whole process group (the worker and the flow run it started) during the fine-tune;
    the run is marked Crashed; a new worker and a new run resume the stage from its checkpoint and end with the
    R of an uninterrupted run. A run whose config file is missing on the worker's host fails with one line."""
    cfg = tmp_path / "killed.yaml"
    cfg.write_text(
        tiny(
            "one",
            name="wkilled",
            model={"pretrain": {"steps": 10}},
            training={"steps": 48, "lr": 5.0e-3, "log_every": 4, "checkpoint_every": 4},
            tracking={"experiment": "wkilled", "registered_model": "wkilled-adapter"},
        )
    )
    out = tmp_path / "out"
    name, deployment = _deploy(server, tmp_path, cfg, "kill-pool", out)
    _trigger(server, tmp_path, name)
    worker = _worker(server, tmp_path, "kill-pool", "worker1.log")
    try:
        deadline = time.time() + 600
        while _latest_step(out) < 12 and worker.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert 12 <= _latest_step(out) < 48, (tmp_path / "worker1.log").read_text()[-2000:]
    finally:
        _stop(worker, signal.SIGKILL)
    killed_at = _latest_step(out)
    crashed = _flow_runs(server, deployment)[0]
    assert crashed["state_type"] == "RUNNING"  # nobody told the server: it still thinks the run is going
    _force_crashed(server, crashed["id"])
    _trigger(server, tmp_path, name)
    worker = _worker(server, tmp_path, "kill-pool", "worker2.log")
    try:
        runs = _wait(server, deployment, 2, {"COMPLETED", "CRASHED"})
    finally:
        _stop(worker)
    assert [r["state_type"] for r in runs] == ["CRASHED", "COMPLETED"]
    resumed = json.loads((out / "metrics.json").read_text())
    versions = _versions(out, "wkilled-adapter")
    assert resumed["stages_run"] == [1] and len(versions) == 1
    uri = f"sqlite:///{out / 'mlflow.db'}"
    history = MlflowClient(uri, registry_uri=uri).get_metric_history(versions[0].run_id, "train/loss")
    steps = [m.step for m in history]
    assert steps and min(steps) > killed_at and max(steps) == 48, (killed_at, steps)  # continued, not restarted
    code, text = run_lalora(["run", str(cfg), "--out", str(tmp_path / "reference")], tmp_path)
    assert code == 0, text
    reference = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    for key in ("R", "R_nll"):
        for got, want in zip(resumed[key], reference[key], strict=True):
            assert got == pytest.approx(want, abs=1e-6), (key, killed_at)

    cfg.unlink()  # the worker's host lacks the config the deployment names
    _trigger(server, tmp_path, name)
    worker = _worker(server, tmp_path, "kill-pool", "worker3.log")
    try:
        runs = _wait(server, deployment, 3, {"COMPLETED", "CRASHED", "FAILED"})
    finally:
        _stop(worker)
    failed = runs[2]
    assert failed["state_type"] == "FAILED"
    message = failed["state"]["message"]
    assert str(cfg) in message and "Traceback" not in message and "\n" not in message.strip(), message
