"""The lineage flow as a deployment on a Prefect work pool: production's form, run by ``prefect worker start
--pool NAME`` on any host where this package is installed.

``deploy`` creates the pool (type ``process``) when it does not exist, refuses one of another type, and
registers the lineage flow on it with the parameters ``lalora serve`` passes (the config's path, the output
directory, the ``--set`` overrides), an optional cron schedule, and a concurrency limit of 1 whose extra runs
wait in the queue (never side by side). The flow's code is the installed package's (entrypoint
``flows.lineage_flow:lineage_flow`` by module path): no image, no remote storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import BadInput

FLOW_NAME = "lalora-lineage"


@dataclass(frozen=True)
class Deployed:
    name: str
    """FLOW/DEPLOYMENT, as ``prefect deployment run`` takes it"""
    pool: str
    pool_created: bool
    deployment_id: str
    schedule: str | None

    def commands(self) -> list[str]:
        return [f"prefect deployment run '{self.name}'", f"prefect worker start --pool '{self.pool}'"]


def api_url() -> str:
    """The Prefect API this process talks to; bad input when none is set or it does not answer."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise BadInput(
            "lalora deploy needs a Prefect server: set PREFECT_API_URL (e.g. "
            "PREFECT_API_URL=http://127.0.0.1:4200/api after `prefect server start --host 127.0.0.1`)"
        )
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # with the profile's credentials (PREFECT_API_KEY, auth string)
        error = client.api_healthcheck()
    if error is not None:
        raise BadInput(
            f"PREFECT_API_URL={url}: no Prefect server answers there ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); start one or set PREFECT_API_URL to "
            "the server's /api URL"
        )
    return url


def check_schedule(cron: str | None, timezone: str) -> None:
    if cron is None:
        return
    from zoneinfo import ZoneInfo

    from prefect.schedules import Cron

    try:
        ZoneInfo(timezone)
        Cron(cron, timezone=timezone)
    except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
        raise BadInput(
            f"--cron {cron!r} / --timezone {timezone!r}: not a valid cron schedule in a known time "
            'zone (e.g. --cron "0 3 * * 1" --timezone Europe/Berlin)'
        ) from None


def ensure_pool(pool: str) -> bool:
    """The work pool ``pool`` of type process; True when it was created now."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            return True
    if existing.type != "process":
        raise BadInput(
            f"--pool {pool!r} is a work pool of type {existing.type!r}; lalora deploys to a 'process' "
            "pool (its workers run the installed package): name another pool"
        )
    return False


def deploy(
    config: str, pool: str, out: str, overrides: list[str], *, name: str, cron: str | None = None, timezone: str = "UTC"
) -> Deployed:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType, RunnerDeployment
    from prefect.schedules import Cron

    from flows.lineage_flow import lineage_flow

    api_url()
    check_schedule(cron, timezone)
    created = ensure_pool(pool)
    deployment = RunnerDeployment.from_flow(
        lineage_flow,
        name=name,
        entrypoint_type=EntrypointType.MODULE_PATH,
        work_pool_name=pool,
        parameters={
            "config_path": str(Path(config).resolve()),
            "out_dir": str(Path(out).resolve()),
            "overrides": list(overrides),
        },
        schedules=[Cron(cron, timezone=timezone)] if cron else None,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        description=f"LaLoRA lineage of {Path(config).name}: adapts to every domain of the config the lineage has "
        "not seen; one run at a time (later runs wait in the queue)",
    )
    deployment_id = deployment.apply()
    return Deployed(f"{FLOW_NAME}/{name}", pool, created, str(deployment_id), cron)
