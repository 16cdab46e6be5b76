"""One writer per lineage across hosts: a lease held in the tracking store itself.

Workers on several hosts that share one MLflow server cannot see each other's lock files. The
store arbitrates instead: the lease of lineage MODEL is the registered model
``MODEL.lalora-lease.N`` with the highest N. Creating a registered model succeeds only if the
name is free, and the store makes that atomic, so of two workers creating the same N exactly one
wins. The holder heartbeats a tag on its lease; a lease whose heartbeat is older than ``ttl``
seconds (or whose holder is a dead process on this host) is taken over by creating N + 1, which
again only one worker can do. Releasing deletes the lease. Before registering a version the
holder checks that its lease is still the lineage's (``check``); the registry's duplicate check
covers the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

from flows.lock import LockHeld, process_alive
from flows.runs import mlflow_client

log = logging.getLogger(__name__)

SUFFIX = ".lalora-lease."
HEARTBEAT = "lalora.heartbeat"
HOLDER = "lalora.lease_holder"


class LeaseLost(LockHeld):
    """This run's lease expired and another run took the lineage over."""


class StoreLease:
    """Exclusive hold of lineage ``model`` in the store at ``uri``; ``acquire`` raises LockHeld naming
    the holder unless ``wait``."""

    def __init__(self, uri: str, model: str, ttl: float = 120.0, poll: float = 1.0) -> None:
        self.uri, self.model, self.ttl, self.poll = uri, model, float(ttl), poll
        self.key = f"lease\n{uri}\n{model}"
        self.name: str | None = None
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "command": " ".join(sys.argv[:4]) or "python",
        }
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # --- reading the store ---------------------------------------------------------------------
    def _leases(self) -> list[tuple[int, Any]]:
        """(N, registered model) of every lease of the lineage, lowest N first."""
        prefix = f"{self.model}{SUFFIX}"
        found = mlflow_client(self.uri).search_registered_models(filter_string=f"name LIKE '{prefix}%'")
        out = [
            (int(m.name[len(prefix) :]), m)
            for m in found
            if m.name.startswith(prefix) and m.name[len(prefix) :].isdigit()
        ]
        return sorted(out, key=lambda x: x[0])

    def _stale(self, lease: Any) -> bool:
        tags = lease.tags
        try:
            holder = json.loads(tags.get(HOLDER, "{}"))
            beat = float(tags.get(HEARTBEAT, "0"))
        except ValueError:
            return True
        if holder.get("host") == socket.gethostname() and not process_alive(int(holder.get("pid", -1))):
            return True
        return time.time() - beat > self.ttl

    @staticmethod
    def _describe(lease: Any) -> str:
        holder = json.loads(lease.tags.get(HOLDER, "{}"))
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        age = time.time() - float(lease.tags.get(HEARTBEAT, "0"))
        return (
            f"pid {holder.get('pid')} on {holder.get('host')} since {when} ({holder.get('command', '')}; "
            f"last heartbeat {age:.0f} s ago)"
        )

    # --- holding ---------------------------------------------------------------------------------
    def _create(self, n: int) -> bool:
        from mlflow.exceptions import MlflowException

        name = f"{self.model}{SUFFIX}{n}"
        try:
            mlflow_client(self.uri).create_registered_model(
                name,
                tags={HOLDER: json.dumps(self.me), HEARTBEAT: str(time.time()), "lalora.lease_of": self.model},
                description=f"Lease of lineage {self.model}: the run named in its tags is writing it. Deleted when "
                "that run ends; taken over when its heartbeat stops.",
            )
        except MlflowException as e:
            if getattr(e, "error_code", "") == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(e):
                return False
            raise
        self.name = name
        return True

    def acquire(self, wait: bool = False, timeout: float | None = None) -> None:
        announced = False
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            leases = self._leases()
            top = leases[-1] if leases else None
            if top is None or self._stale(top[1]):
                if self._create(top[0] + 1 if top else 1):
                    if top is not None:
                        log.warning(
                            "took over the lease of lineage %s from a run that stopped (%s)",
                            self.model,
                            self._describe(top[1]),
                        )
                    self._drop(n for n, _ in leases)
                    self._start_heartbeat()
                    return
                continue  # another worker created it first: read again
            if not wait:
                raise LockHeld(
                    f"lineage {self.model} is held by another run: {self._describe(top[1])}; lease "
                    f"{top[1].name} in {self.uri} (wait for it with --wait)"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise LockHeld(
                    f"gave up after {timeout:g} s waiting for the run holding lineage {self.model}: "
                    f"{self._describe(top[1])} (orchestration.lock_timeout_seconds)"
                )
            if not announced:
                print(
                    f"lalora: waiting for the run holding lineage {self.model}: {self._describe(top[1])}",
                    file=sys.stderr,
                )
                announced = True
            time.sleep(self.poll)

    def _drop(self, numbers: Any) -> None:
        client = mlflow_client(self.uri)
        for n in numbers:
            with contextlib.suppress(Exception):  # already gone: another taker removed it
                client.delete_registered_model(f"{self.model}{SUFFIX}{n}")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        name, period = self.name, max(0.2, self.ttl / 4)

        def beat() -> None:
            while not self._stop.wait(period):
                try:
                    mlflow_client(self.uri).set_registered_model_tag(name, HEARTBEAT, str(time.time()))
                except Exception as e:  # the store is unreachable for a moment: the next beat retries
                    log.warning("lease heartbeat of %s failed: %s", name, e)

        self._beat = threading.Thread(target=beat, name=f"lease-heartbeat-{self.model}", daemon=True)
        self._beat.start()

    def check(self) -> None:
        """Raise LeaseLost unless this run's lease is still the lineage's."""
        leases = self._leases()
        if not leases or leases[-1][1].name != self.name:
            raise LeaseLost(
                f"this run's lease of lineage {self.model} expired and another run took it over "
                f"({self._describe(leases[-1][1]) if leases else 'no lease left'}); nothing more is "
                "recorded by this run"
            )

    def release(self) -> None:
        if self.name is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if any(m.name == self.name for _, m in self._leases()):
            self._drop([int(self.name.rsplit(".", 1)[1])])
        self.name = None
