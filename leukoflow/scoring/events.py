"""The events a nightly sweep tells the orchestrator about, framework-free.

A finished sweep says `leukoflow.night.completed` (its counts, the subjects the product's subject
rule flagged and the drift signal); a night with a flagged subject also says
`leukoflow.night.flagged`, the event alerting automations (leukoflow/automations) react to.
Events leave the store for the Prefect server and whatever notifications it sends: they carry
counts and the summary's pseudonymised subject keys (flows/score keys them with
store/pseudonym), never a raw subject id. tasks/event_tasks emits what `night_events` builds.
"""

from __future__ import annotations

from collections.abc import Mapping

NIGHT_COMPLETED = "leukoflow.night.completed"
NIGHT_FLAGGED = "leukoflow.night.flagged"
# Every night event concerns a resource named like this, so one automation can match them all.
NIGHT_RESOURCE_PREFIX = "leukoflow.night."
# The resource label naming the store a night belongs to (its Location.uri, as the sweep opened it).
STORE_LABEL = "leukoflow.store"
# The counts of a sweep summary an alert is worth reading (the rest stays in the run row).
EVENT_COUNTS = ("found", "scored", "skipped", "quarantined", "duplicate", "missing")
DRIFT_KEYS = ("warning", "feature_shift", "score_ks", "cells", "reasons")


def flagged_subjects(summary: Mapping) -> list[str]:
    """The pseudonymised keys of the subjects the sweep's subject rule flagged, flagged first
    as the summary orders them (scoring/score.summarise_subjects decided the flag)."""
    return [
        s["subject_id"]
        for s in summary.get("subjects") or []
        if s.get("subject_flagged") and s.get("subject_id") is not None
    ]


def night_payload(summary: Mapping) -> dict:
    """The JSON payload of a night's events: counts, subjects flagged and drift; no raw ids."""
    counts = summary.get("counts") or {}
    night = summary.get("night") or {}
    drift = summary.get("drift") or {}
    return {
        "run_id": summary.get("run_id"),
        "date": summary.get("date"),
        "model_id": summary.get("model_id"),
        "outcome": str(summary.get("outcome")),
        "non_clinical": bool(summary.get("non_clinical")),
        "counts": {key: counts.get(key, 0) for key in EVENT_COUNTS},
        "cells_scored": night.get("cells_scored", 0),
        "cells_flagged": night.get("cells_flagged", 0),
        "subjects": night.get("subjects", 0),
        "subjects_flagged": night.get("subjects_flagged", 0),
        "flagged_subjects": flagged_subjects(summary),
        "drift": {key: drift.get(key) for key in DRIFT_KEYS} if drift else None,
    }


def night_resource(summary: Mapping) -> dict[str, str]:
    """The Prefect resource the night's events concern: the night of one store."""
    date = str(summary.get("date"))
    return {
        "prefect.resource.id": f"{NIGHT_RESOURCE_PREFIX}{date}",
        "prefect.resource.name": f"leukoflow night {date}",
        STORE_LABEL: str(summary.get("store")),
        "leukoflow.run-id": str(summary.get("run_id")),
    }


def night_events(summary: Mapping) -> list[dict]:
    """The events of one finished sweep, as `emit_event` keyword arguments: always
    NIGHT_COMPLETED, then NIGHT_FLAGGED when the night flagged at least one subject."""
    payload, resource = night_payload(summary), night_resource(summary)
    events = [{"event": NIGHT_COMPLETED, "resource": resource, "payload": payload}]
    if payload["subjects_flagged"] or payload["flagged_subjects"]:
        events.append({"event": NIGHT_FLAGGED, "resource": dict(resource), "payload": payload})
    return events
