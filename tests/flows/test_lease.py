"""The store's lease on a lineage (flows/lease.py) and the registry's duplicate check, on a real MLflow store."""

import json
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from flows.lease import HEARTBEAT, HOLDER, SUFFIX, LeaseLost, StoreLease
from flows.lock import LockHeld
from tests.conftest import ROOT, child_env

pytestmark = pytest.mark.slow  # a real flow, DeepSpeed engine or subprocess: make test, not test-fast


@pytest.fixture
def store(tmp_path):
    from flows.runs import ensure_sqlite_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_sqlite_store(uri)
    return uri


def _leases(uri, model="m"):
    return sorted(
        m.name
        for m in MlflowClient(uri, registry_uri=uri).search_registered_models(
            filter_string=f"name LIKE '{model}{SUFFIX}%'"
        )
    )


def _foreign(uri, n, age, model="m"):
    """A lease held from another host whose last heartbeat was ``age`` seconds ago."""
    holder = {"host": "elsewhere", "pid": 1, "started": time.time() - age, "command": "lalora run"}
    MlflowClient(uri, registry_uri=uri).create_registered_model(
        f"{model}{SUFFIX}{n}", tags={HOLDER: json.dumps(holder), HEARTBEAT: str(time.time() - age)}
    )


def test_one_holder_the_other_refused_naming_it_then_free(store):
    a, b = StoreLease(store, "m", ttl=30), StoreLease(store, "m", ttl=30)
    a.acquire()
    assert _leases(store) == [f"m{SUFFIX}1"]
    with pytest.raises(LockHeld, match=r"lineage m is held by another run: pid \d+ on .* last heartbeat"):
        b.acquire()
    a.check()
    a.release()
    assert _leases(store) == []
    b.acquire()
    b.release()


def test_a_fresh_foreign_lease_holds_and_an_expired_one_is_taken_over(store):
    _foreign(store, 3, age=1)
    with pytest.raises(LockHeld, match="pid 1 on elsewhere"):
        StoreLease(store, "m", ttl=30).acquire()
    _foreign(store, 4, age=60)  # a later lease whose holder stopped heartbeating a minute ago
    taker = StoreLease(store, "m", ttl=30)
    taker.acquire()
    assert _leases(store) == [f"m{SUFFIX}5"]  # N + 1, the stale ones gone
    taker.release()


def test_the_heartbeat_keeps_a_lease_alive_past_its_ttl(store):
    lease = StoreLease(store, "m", ttl=1.0)
    lease.acquire()
    time.sleep(2.5)
    with pytest.raises(LockHeld):
        StoreLease(store, "m", ttl=1.0).acquire()
    lease.release()


def test_a_run_whose_lease_was_taken_over_may_not_register(store):
    slow = StoreLease(store, "m", ttl=0.5)
    slow.acquire()
    slow._stop.set()  # its heartbeat stops (a stalled process)
    time.sleep(1.5)
    StoreLease(store, "m", ttl=0.5).acquire()
    with pytest.raises(LeaseLost, match="expired and another run took it over"):
        slow.check()


RACE = """
import sys, time
from flows.lease import StoreLease
from flows.lock import LockHeld
lease = StoreLease(sys.argv[1], "m", ttl=60)
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
try:
    lease.acquire()
    print("won", flush=True)
    time.sleep(3)
except LockHeld:
    print("refused", flush=True)
"""


def test_of_several_processes_starting_together_exactly_one_holds(store):
    start = time.time() + 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, store, str(start)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=child_env(),
        )
        for _ in range(4)
    ]
    results = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert results == ["refused", "refused", "refused", "won"]


def test_a_second_version_of_a_stage_is_a_duplicate_and_moves_no_alias(store, tmp_path):
    from flows.registry import LineageRegistry, StageTaken
    from flows.runs import start_run
    from pipelines.lineage.record import VersionRecord

    registry = LineageRegistry(store, "m", tmp_path / "cache")
    registry.describe("test lineage")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    record = VersionRecord(
        "m",
        1,
        "one",
        "c",
        "d",
        adapter_uri="runs:/x/a",
        rows_uri="runs:/x/r",
        config_uri="runs:/x/c",
        base_uri="runs:/x/b",
    )
    first = registry.register(start_run(store, "e", tmp_path / "art", "w1"), model_dir, record, "w1", ["newest"])
    with pytest.raises(
        StageTaken, match="registered stage 1 of m as version 1 while this one ran; this run's version 2"
    ):
        registry.register(start_run(store, "e", tmp_path / "art", "w2"), model_dir, record, "w2", ["newest"])
    client = MlflowClient(store, registry_uri=store)
    assert client.get_model_version("m", "2").tags["lalora.duplicate_of"] == "1"
    assert str(client.get_registered_model("m").aliases["newest"]) == first == "1"
    assert [r.version for r in registry.stages()] == ["1"]
    assert registry.reconcile_aliases("newest", "champion") == {"newest": "1", "champion": "1"}
