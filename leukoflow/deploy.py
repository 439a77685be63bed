"""`leukoflow deploy`: register deployments/prefect.yaml with the Prefect server of PREFECT_API_URL.

Prefect's own `prefect deploy` reads the file; this module only fills in its {{ $LEUKOFLOW_* }}
values from the command line, makes sure the process work pool exists, and reads back what the
server now holds (deployments, schedules, upcoming nightly runs) for the summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zoneinfo
from datetime import timedelta
from pathlib import Path

from leukoflow.errors import LeukoflowError
from leukoflow.store.storage import open_location

WORK_POOL = "leukoflow"
# deployment name in deployments/prefect.yaml -> name of the flow it runs
DEPLOYMENTS = {
    "nightly": "leukoflow-score",
    "backfill": "leukoflow-backfill",
    "train": "leukoflow-run",
}


def project_dir() -> Path:
    """The folder holding flows/ and deployments/: $LEUKOFLOW_PROJECT_DIR (the image sets it to
    /opt/leukoflow), else the checkout this code runs from."""
    if os.environ.get("LEUKOFLOW_PROJECT_DIR"):
        return Path(os.environ["LEUKOFLOW_PROJECT_DIR"]).resolve()
    import leukoflow.flows as flows

    return Path(flows.__file__).resolve().parent.parent


def placeholder_values(store: str, inbox: str, timezone: str, project: Path) -> dict[str, str]:
    """The {{ $VAR }} values of prefect.yaml; local paths made absolute for the worker."""
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as error:
        raise LeukoflowError(
            f"--timezone wants an IANA name such as Europe/Berlin, got {timezone!r}"
        ) from error
    return {
        "LEUKOFLOW_STORE": _absolute(store),
        "LEUKOFLOW_INBOX": _absolute(inbox),
        "LEUKOFLOW_TIMEZONE": timezone,
        "LEUKOFLOW_PROJECT_DIR": str(project),
    }


def _absolute(location: str) -> str:
    # The worker runs flows from the project folder: a relative path would point there.
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def require_prefect_api() -> str:
    """The Prefect API that deployments are registered with; a server, never an ephemeral one."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise LeukoflowError(
            "leukoflow deploy registers deployments with a Prefect server: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api) and, if the server asks, PREFECT_API_AUTH_STRING"
        )
    return url


def ensure_work_pool(api: str, name: str = WORK_POOL) -> bool:
    """Create the process work pool `name` unless it exists; True when it was created."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    # The first call to the server: say plainly when it is away or refuses our credentials.
    try:
        with get_client(sync_client=True) as client:
            try:
                client.read_work_pool(name)
                return False
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                return True
    except httpx.HTTPStatusError as error:
        if error.response.status_code in (401, 403):
            raise LeukoflowError(
                f"the Prefect API at {api} refused the request: check PREFECT_API_AUTH_STRING"
            ) from error
        raise
    except httpx.TransportError as error:
        raise LeukoflowError(f"cannot reach the Prefect API at {api}: {error}") from error


def run_prefect_deploy(prefect_file: Path, values: dict[str, str], project: Path) -> None:
    """`prefect deploy --all` on the file, from the project folder (entrypoints are relative)."""
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    result = subprocess.run(
        [*command, "--prefect-file", str(prefect_file)],
        cwd=project,
        env={**os.environ, **values},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stdout + result.stderr).splitlines()]
        reason = next((line for line in reversed(lines) if line), "no output")
        raise LeukoflowError(f"prefect deploy failed: {reason}")


def registered_deployments(upcoming: int = 3) -> list[dict]:
    """What the server holds for each of our deployments: pool, parameters, schedules, next runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    found = []
    with get_client(sync_client=True) as client:
        for name, flow_name in DEPLOYMENTS.items():
            deployment = client.read_deployment_by_name(f"{flow_name}/{name}")
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=upcoming,
            )
            found.append(
                {
                    "name": f"{flow_name}/{name}",
                    "id": str(deployment.id),
                    "work_pool": deployment.work_pool_name,
                    "entrypoint": deployment.entrypoint,
                    "parameters": deployment.parameters,
                    "schedules": [_schedule(s) for s in deployment.schedules],
                    "upcoming_runs": [
                        run.expected_start_time.isoformat()
                        for run in runs
                        if run.expected_start_time is not None
                    ],
                }
            )
    return found


def _schedule(schedule) -> dict:
    cron = schedule.schedule
    return {
        "cron": getattr(cron, "cron", None),
        "timezone": getattr(cron, "timezone", None),
        "active": schedule.active,
    }


def deploy(
    store: str,
    inbox: str,
    timezone: str,
    prefect_file: str | None = None,
    notify: str | None = None,
    missed_within: timedelta | None = None,
) -> dict:
    """Register every deployment of prefect.yaml; returns what the server now holds.

    notify: a notification block ("<block-type>/<name>") the alerting automations send through
    (leukoflow/automations); missed_within: their missed-night window (default 26 h).
    """
    from leukoflow import automations

    project = project_dir()
    path = Path(prefect_file).resolve() if prefect_file else project / "deployments/prefect.yaml"
    if not path.is_file():
        raise LeukoflowError(f"no Prefect deployment file at {path}")
    values = placeholder_values(store, inbox, timezone, project)
    api = require_prefect_api()
    created = ensure_work_pool(api)
    # A block name that does not resolve is refused before anything is registered.
    block_id = automations.resolve_notification_block(notify) if notify else None
    run_prefect_deploy(path, values, project)
    alerts = None
    if block_id is not None:
        window = missed_within or automations.MISSED_AFTER
        # The sweeps name their store by its Location.uri (their events' leukoflow.store label).
        built = automations.alert_automations(block_id, open_location(store).uri, window)
        alerts = {"notify": notify, "automations": automations.apply_automations(built)}
    return {
        "api": api,
        "work_pool": WORK_POOL,
        "work_pool_created": created,
        "prefect_file": str(path),
        "deployments": registered_deployments(),
        "alerts": alerts,
    }
