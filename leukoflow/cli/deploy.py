"""`leukoflow deploy`: register the nightly, backfill and train deployments with Prefect."""

from __future__ import annotations

from typing import Annotated

import typer

from leukoflow.cli.options import AsJson, Store
from leukoflow.cli.output import print_json


def deploy(
    store: Store,
    inbox: Annotated[str, typer.Option(help="Folder or s3:// prefix the nightly sweep scores")],
    timezone: Annotated[str, typer.Option(help="IANA time zone of the 02:00 nightly cron")] = "UTC",
    prefect_file: Annotated[
        str | None, typer.Option("--prefect-file", help="Default: deployments/prefect.yaml")
    ] = None,
    notify: Annotated[
        str | None,
        typer.Option(
            "--notify",
            help="Notification block (<block-type>/<name>, e.g. custom-webhook/oncall) that "
            "alerts on a flagged night, a failed sweep and no sweep completed in 26 h",
        ),
    ] = None,
    # Test-only: the missed-night window in seconds (Prefect's floor is 10 s).
    missed_within_s: Annotated[float | None, typer.Option("--missed-within", hidden=True)] = None,
    as_json: AsJson = False,
) -> None:
    """Register the nightly, backfill and train deployments with the Prefect server at
    $PREFECT_API_URL (and create the `leukoflow` process work pool if missing)."""
    from datetime import timedelta

    from leukoflow.deploy import deploy as register

    window = timedelta(seconds=missed_within_s) if missed_within_s is not None else None
    report = register(store, inbox, timezone, prefect_file, notify, window)
    if as_json:
        print_json(report)
        return
    pool = f"{report['work_pool']} ({'created' if report['work_pool_created'] else 'exists'})"
    print(f"Prefect API {report['api']}: work pool {pool}")
    for item in report["deployments"]:
        schedules = ", ".join(f"{s['cron']} {s['timezone']}" for s in item["schedules"])
        print(f"  {item['name']}: {item['entrypoint']} [{schedules or 'on demand'}]")
    for alert in (report.get("alerts") or {}).get("automations", []):
        sends = "" if alert["action"] == "deleted" else f" (notifies {notify})"
        print(f"  automation {alert['name']!r}: {alert['action']}{sends}")
    print("Start a worker: prefect worker start --pool leukoflow")
