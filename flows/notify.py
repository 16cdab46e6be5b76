"""Outcomes that reach people: a Prefect event for every registered version, rejected promotion and failed
run (a Prefect automation can notify on them), and an optional webhook (``notify.webhook``) that receives a
small JSON for a failure or a rejected promotion.

Event names: ``lalora.version.registered``, ``lalora.promotion.rejected``, ``lalora.lineage.failed``; their
resource is the lineage (``prefect.resource.id`` = ``lalora.lineage.<registered model>``), related to the
flow run; the payload (and the webhook's body) holds the event, lineage, stage, version, reason and flow run.
Neither ever fails the run: a webhook that does not answer is logged.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

EVENTS = {
    "registered": "lalora.version.registered",
    "rejected": "lalora.promotion.rejected",
    "failed": "lalora.lineage.failed",
}
POSTED = ("rejected", "failed")
"""The outcomes a webhook receives (a registered version is routine: its event is enough)."""


@dataclass(frozen=True)
class Outcome:
    kind: str
    """'registered', 'rejected' or 'failed'"""
    lineage: str
    """the registered model"""
    stage: int | None = None
    version: str | None = None
    reason: str = ""

    def payload(self) -> dict[str, object]:
        from prefect.runtime import flow_run

        return {"event": EVENTS[self.kind], **asdict(self), "flow_run": flow_run.id, "flow_run_name": flow_run.name}


def announce(outcome: Outcome, webhook: str | None = None, timeout: float = 10.0) -> None:
    """Emit the outcome's Prefect event; POST it to ``webhook`` when it is a failure or a rejection."""
    payload = outcome.payload()
    try:
        from prefect.events import emit_event

        related = (
            [{"prefect.resource.id": f"prefect.flow-run.{payload['flow_run']}", "prefect.resource.role": "flow-run"}]
            if payload["flow_run"]
            else []
        )
        emit_event(
            event=EVENTS[outcome.kind],
            payload=payload,
            related=related,
            resource={
                "prefect.resource.id": f"lalora.lineage.{outcome.lineage}",
                "prefect.resource.name": outcome.lineage,
            },
        )
    except Exception as e:  # the run's outcome stands whether or not the event went out
        log.warning("could not emit the Prefect event %s: %s", EVENTS[outcome.kind], e)
    if webhook and outcome.kind in POSTED:
        post(webhook, payload, timeout)


def post(url: str, payload: dict[str, object], timeout: float) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload, default=str).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "lalora"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except Exception as e:
        log.warning("notify.webhook %s did not take the %s notice: %s", url, payload.get("event"), e)
