"""Production's shape: a real `mlflow server` (loopback, proxied artifact store) that several workers share,
on SQLite and on PostgreSQL (a throwaway server started by the tests; .ci/run installs PostgreSQL if absent).

A lineage runs through it, a domain is appended from a second, empty output directory (another
machine), and the new champion loads through pyfunc from the server. Two workers started together
on one new domain (separate HOMEs: their host-local locks cannot see each other) register exactly
one version of the stage; a killed holder's lease is taken over once it expires."""

import os
import signal
import subprocess
import time

import mlflow
import pytest
from mlflow import MlflowClient

from pipelines.lineage.record import VersionRecord
from tests.configs import ONE_DOMAIN, TINY
from tests.conftest import child_env, lalora_script, run_lalora
from tests.flows.servers import create_database, mlflow_server, postgres, postgres_missing

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast

FAST = ["--set", "model.pretrain.steps=0"]


@pytest.fixture(scope="module")
def pg():
    """One throwaway PostgreSQL for the module's tests (each gets its own database)."""
    missing = postgres_missing()
    if missing:
        pytest.skip(f"MLflow on PostgreSQL not tested: {missing} (.ci/run installs it: apt-get install postgresql)")
    with postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path):
    backend = None
    if request.param == "postgresql":
        backend = create_database(request.getfixturevalue("pg"), f"mlflow_{tmp_path.name.lower()}")
    with mlflow_server(tmp_path / "server", backend) as url:
        yield url


def _config(tmp_path, text, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _versions(url):
    client = MlflowClient(url, registry_uri=url)
    return sorted(client.search_model_versions("name = 'tiny-adapter'"), key=lambda v: int(v.version))


def _worker_env(tmp_path, name, url):
    home = tmp_path / f"home-{name}"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "MLFLOW_TRACKING_URI": url, "LALORA_CACHE_DIR": str(home / "cache")}


def test_a_lineage_through_a_tracking_server_appended_from_another_machine(tmp_path, server, request):
    t0 = time.perf_counter()
    code, output = run_lalora(
        ["run", _config(tmp_path, ONE_DOMAIN), "--out", str(tmp_path / "a"), *FAST],
        tmp_path,
        **_worker_env(tmp_path, "a", server),
    )
    assert code == 0, output[-3000:]
    assert output.strip().splitlines()[-1] == f"MLflow UI:  {server}   (the tracking server's own UI)"
    assert not (tmp_path / "a" / "mlflow.db").exists()  # everything went to the server
    appended = TINY  # one, then two
    code, output = run_lalora(
        ["run", _config(tmp_path, appended, "appended.yaml"), "--out", str(tmp_path / "b"), *FAST],
        tmp_path,
        **_worker_env(tmp_path, "b", server),
    )
    assert code == 0, output[-3000:]
    print(f"{request.node.callspec.id}: both runs {time.perf_counter() - t0:.1f} s")  # the store's cost, for README
    assert "ran stage(s) 2" in output and "skipped finished stage(s) 1" in output
    assert [v.tags["lalora.stage"] for v in _versions(server)] == ["1", "2"]
    assert not (tmp_path / "b" / "stages" / "01-one").exists()  # stage 1 came from the server's record
    mlflow.set_tracking_uri(server)
    try:
        champion = mlflow.pyfunc.load_model("models:/tiny-adapter@champion")
    finally:
        mlflow.set_tracking_uri(None)
    completions = champion.predict(["increment 12=", "reverse 345="], params={"max_new_tokens": 4})
    assert len(completions) == 2 and all(isinstance(c, str) and len(c) <= 4 for c in completions)
    assert champion.metadata.flavors["python_function"]["config"]["base"]["location"].startswith("mlflow-artifacts:")


def _other_host(name: str) -> list[str]:
    """A command prefix that runs the command under hostname ``name`` (a UTS namespace), as on another host."""
    probe = subprocess.run(
        ["unshare", "-u", "sh", "-c", f"hostname {name} && hostname"], capture_output=True, text=True
    )
    if probe.returncode != 0 or probe.stdout.strip() != name:
        pytest.skip(f"cannot give a process another hostname here (unshare -u): {probe.stderr.strip()}")
    return ["unshare", "-u", "sh", "-c", f'hostname {name} && exec "$0" "$@"']


def _start(tmp_path, name, config, url, *extra, host=None):
    prefix = _other_host(host) if host else []
    with open(tmp_path / f"{name}.log", "w") as log:  # the child writes to its own copy
        proc = subprocess.Popen(
            [*prefix, lalora_script(), "run", config, "--out", str(tmp_path / name), *FAST, *extra],
            env=child_env(PREFECT_HOME=str(tmp_path / f"prefect-{name}"), **_worker_env(tmp_path, name, url)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, tmp_path / f"{name}.log"


def _lineage_versions_only(url):
    """Every alias points at a version of the lineage; one version per stage."""
    client = MlflowClient(url, registry_uri=url)
    versions = _versions(url)
    stages = [v.tags["lalora.stage"] for v in versions]
    assert len(stages) == len(set(stages)), stages
    aliases = {a: str(v) for a, v in client.get_registered_model("tiny-adapter").aliases.items()}
    assert set(aliases.values()) <= {str(v.version) for v in versions}
    assert all(VersionRecord.from_tags(v.tags) is not None and "lalora.duplicate_of" not in v.tags for v in versions)
    return stages, aliases


def test_two_workers_started_together_register_the_new_stage_once(tmp_path, server):
    code, output = run_lalora(
        ["run", _config(tmp_path, ONE_DOMAIN), "--out", str(tmp_path / "first"), *FAST],
        tmp_path,
        **_worker_env(tmp_path, "first", server),
    )
    assert code == 0, output[-3000:]
    config = _config(tmp_path, TINY, "appended.yaml")  # one, then the new domain two
    workers = [_start(tmp_path, name, config, server, "--wait") for name in ("w1", "w2")]
    outputs = []
    for proc, log in workers:
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        outputs.append(log.read_text())
    stages, aliases = _lineage_versions_only(server)
    assert stages == ["1", "2"] and aliases == {"newest": "2", "champion": "2"}
    ran = [o for o in outputs if "ran stage(s) 2" in o]
    assert len(ran) == 1  # the other waited for the lease, then found the stage recorded
    other = outputs[1 - outputs.index(ran[0])]
    assert "lalora: waiting for the run holding lineage tiny-adapter: pid" in other
    assert "is up to date: 2 stages recorded, nothing run" in other


def test_a_killed_holders_lease_is_taken_over_once_it_expires(tmp_path, server):
    """The holder runs as another host (its pid means nothing here), so only its stopped heartbeat can free it."""
    config = _config(tmp_path, ONE_DOMAIN)
    ttl = [
        "--set",
        "orchestration.lease_ttl_seconds=6",
        "--set",
        "training.steps=400",
        "--set",
        "training.checkpoint_every=0",
    ]
    holder, log = _start(tmp_path, "holder", config, server, *ttl, host="worker-b")
    client = MlflowClient(server, registry_uri=server)
    deadline = time.time() + 300
    while time.time() < deadline and not client.search_registered_models("name LIKE 'tiny-adapter.lalora-lease.%'"):
        assert holder.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    (lease,) = client.search_registered_models("name LIKE 'tiny-adapter.lalora-lease.%'")
    assert '"host": "worker-b"' in lease.tags["lalora.lease_holder"]
    code, output = run_lalora(
        ["run", config, "--out", str(tmp_path / "taker"), *FAST, *ttl[:2]],
        tmp_path,
        **_worker_env(tmp_path, "taker", server),
    )
    if code == 4:  # refused while the heartbeat was fresh: the lease is held, not yet expired
        assert "lineage tiny-adapter is held by another run: pid" in output and "on worker-b" in output
        time.sleep(7)
        code, output = run_lalora(
            ["run", config, "--out", str(tmp_path / "taker"), *FAST, *ttl[:2]],
            tmp_path,
            **_worker_env(tmp_path, "taker", server),
        )
    assert code == 0, output[-3000:]
    assert "took over the lease of lineage tiny-adapter from a run that stopped (pid" in output and "worker-b" in output
    assert [v.tags["lalora.stage"] for v in _versions(server)] == ["1"]
    assert not client.search_registered_models("name LIKE 'tiny-adapter.lalora-lease.%'")  # released at the end
