"""Alerting automations on the Prefect server: `leukoflow deploy --notify BLOCK`.

Three automations send through one notification block the user names (webhook, Slack, Teams,
email: any block with the `notify` capability): a night that flagged a subject, a nightly sweep
flow run that failed or crashed, and no completed sweep of the deployed store within a window
(26 h by default, a proactive trigger evaluated by the server; one per store, named after it).
The triggers key on the events of scoring/events. Their messages carry counts, run ids and the
store only: a notification leaves the store, and subject ids may identify patients (not even
their pseudonyms are sent; the dashboard shows those). Prefect's automation engine runs in the
server's services, so nothing here needs a worker.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING
from uuid import UUID

from leukoflow.errors import LeukoflowError
from leukoflow.scoring.events import (
    NIGHT_COMPLETED,
    NIGHT_FLAGGED,
    NIGHT_RESOURCE_PREFIX,
    STORE_LABEL,
)

if TYPE_CHECKING:
    from prefect.events.schemas.automations import AutomationCore

SCORE_FLOW = "leukoflow-score"
MISSED_AFTER = timedelta(hours=26)  # a nightly cron plus slack for a long or late sweep
FLAGGED_NAME = "leukoflow: flagged night"
FAILED_NAME = "leukoflow: nightly sweep failed"
MISSED_NAME = "leukoflow: no nightly sweep completed"

FLAGGED_BODY = (
    "leukoflow night {{ event.payload.date }}: {{ event.payload.subjects_flagged }} of "
    "{{ event.payload.subjects }} subject(s) flagged ({{ event.payload.cells_flagged }} of "
    "{{ event.payload.cells_scored }} cells), model {{ event.payload.model_id }}, run "
    "{{ event.payload.run_id }}. The dashboard lists the flagged subjects."
)
# No state message: an exception's text may quote an image path or a subject id.
FAILED_BODY = (
    "leukoflow nightly sweep did not finish: {{ event.event }} for "
    "{{ event.resource.name }} ({{ event.resource.id }}). Its run row and the Prefect logs "
    "say why; the next sweep scores what is left."
)
MISSED_BODY = (
    "leukoflow: no nightly sweep of {store} completed in the last {window}. Check the worker "
    "(prefect worker start --pool leukoflow) and the nightly deployment's schedule."
)


def split_block_name(block: str) -> tuple[str, str]:
    """`TYPE-SLUG/NAME` (as `prefect block ls` shows it) -> (slug, name)."""
    slug, _, name = block.partition("/")
    if not slug or not name:
        raise LeukoflowError(
            "--notify wants a notification block as TYPE/NAME, e.g. "
            f"slack-webhook/oncall or custom-webhook/oncall (see `prefect block ls`), got {block!r}"
        )
    return slug, name


def resolve_notification_block(block: str) -> UUID:
    """The id of the notification block document `TYPE/NAME`; a LeukoflowError if it does not
    exist on the server or cannot send notifications."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    slug, name = split_block_name(block)
    try:
        with get_client(sync_client=True) as client:
            document = client.read_block_document_by_name(name, slug, include_secrets=False)
    except ObjectNotFound as error:
        raise LeukoflowError(
            f"no notification block {block!r} on the Prefect server: create it first "
            "(UI: Blocks, or `prefect block create`), then name it as TYPE/NAME"
        ) from error
    except httpx.HTTPStatusError as error:
        if error.response.status_code == 404:
            raise LeukoflowError(
                f"no notification block {block!r} on the Prefect server"
            ) from error
        raise
    capabilities = document.block_schema.capabilities if document.block_schema else []
    if "notify" not in capabilities:
        raise LeukoflowError(f"block {block!r} cannot send notifications (no notify capability)")
    return document.id


def _window_text(window: timedelta) -> str:
    seconds = window.total_seconds()
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


def missed_name(store: str) -> str:
    """The name of one store's missed-night automation: one per store, so that the nights of
    another store (another ward's sweeps on the same server) cannot hide a store gone silent."""
    return f"{MISSED_NAME}: {store}"


def alert_automations(
    block_document_id: UUID, store: str, missed_after: timedelta = MISSED_AFTER
) -> list[AutomationCore]:
    """The three alerting automations, notifying through `block_document_id`: a flagged night
    and a failed sweep of any store, and no night of `store` (its Location.uri) completed.

    missed_after: how long without a completed sweep before the missed-night alert (Prefect
    wants at least 10 s for a proactive trigger).
    """
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    def notify(subject: str, body: str) -> SendNotification:
        return SendNotification(block_document_id=block_document_id, subject=subject, body=body)

    night = {"prefect.resource.id": f"{NIGHT_RESOURCE_PREFIX}*"}
    window = _window_text(missed_after)
    return [
        AutomationCore(
            name=FLAGGED_NAME,
            description="A nightly sweep flagged at least one subject.",
            trigger=EventTrigger(
                match=night,
                expect={NIGHT_FLAGGED},
                posture=Posture.Reactive,
                threshold=1,
                within=timedelta(0),
            ),  # fmt: skip
            actions=[notify(FLAGGED_NAME, FLAGGED_BODY)],
        ),
        AutomationCore(
            name=FAILED_NAME,
            description=f"A {SCORE_FLOW} flow run ended Failed or Crashed.",
            trigger=EventTrigger(
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={
                    "prefect.resource.role": "flow",
                    "prefect.resource.name": SCORE_FLOW,
                },
                expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                posture=Posture.Reactive,
                threshold=1,
                within=timedelta(0),
            ),  # fmt: skip
            actions=[notify(FAILED_NAME, FAILED_BODY)],
        ),
        AutomationCore(
            name=missed_name(store),
            description=f"No {NIGHT_COMPLETED} event of {store} within {window}.",
            trigger=EventTrigger(
                match={**night, STORE_LABEL: store},
                expect={NIGHT_COMPLETED},
                posture=Posture.Proactive,
                threshold=1,
                within=missed_after,
            ),  # fmt: skip
            actions=[notify(MISSED_NAME, MISSED_BODY.format(store=store, window=window))],
        ),
    ]


# Automations an earlier leukoflow deployed and this one replaces: the server-wide missed-night
# automation, before there was one per store (it would go on firing only when every store is
# silent).
RETIRED_NAMES = (MISSED_NAME,)


def apply_automations(automations: list[AutomationCore]) -> list[dict]:
    """Create each automation, or replace the one of the same name (extra copies of a name are
    deleted), so running `deploy --notify` twice leaves one of each; and delete the retired ones.
    What was done per name."""
    from prefect.client.orchestration import get_client

    done = []
    with get_client(sync_client=True) as client:
        for name in RETIRED_NAMES:
            for retired in client.read_automations_by_name(name):
                client.delete_automation(retired.id)
                done.append({"name": name, "id": str(retired.id), "action": "deleted"})
        for automation in automations:
            existing = client.read_automations_by_name(automation.name)
            if existing:
                keep, *extra = existing
                client.update_automation(keep.id, automation)
                for duplicate in extra:
                    client.delete_automation(duplicate.id)
                done.append({"name": automation.name, "id": str(keep.id), "action": "updated"})
            else:
                created = client.create_automation(automation)
                done.append({"name": automation.name, "id": str(created), "action": "created"})
    return done


def deploy_alerts(block: str, store: str, missed_after: timedelta = MISSED_AFTER) -> list[dict]:
    """Resolve the notification block and create or update the three alerting automations of
    `store` (its Location.uri)."""
    block_id = resolve_notification_block(block)
    return apply_automations(alert_automations(block_id, store, missed_after))
