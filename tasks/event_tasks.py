"""Prefect task of the nightly sweep's events: emit what scoring/events builds. A thin wrapper."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from leukoflow.scoring.events import night_events


@task(name="emit-night-events", cache_policy=NO_CACHE)
def emit_night_events(summary: dict) -> list[str]:
    """Emit the night's events (scoring/events.night_events); the names of those emitted.

    An event that cannot be sent is logged, never raised: the night's predictions are stored
    and its run row written, and the missed-night automation tells ops if nothing arrives.
    """
    emitted = []
    for event in night_events(summary):
        try:
            sent = emit_event(**event)
        except Exception as error:  # noqa: BLE001 - an alert must not fail a scored night
            get_run_logger().warning("event %s not sent: %s", event["event"], error)
            continue
        if sent is not None:
            emitted.append(event["event"])
    return emitted
