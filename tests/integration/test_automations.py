"""Night events and alerting automations on the run's real Prefect server.

A sweep's events are read back from the server's events API; `leukoflow deploy --notify`'s
automations (leukoflow/automations.deploy_alerts: the CLI itself is run only for a block name it
refuses, since a full deploy would re-register the shared server's deployments) are created
twice (one of each remains) and deliver through a real webhook
notification block to a receiver on 127.0.0.1: a flagged night, a failed `leukoflow-score`
run and a missed night (a window of seconds instead of 26 hours) each send a message, and no
message names a subject. The server is shared with other tests: everything here is picked out by
this module's own run ids, flow run ids and message subjects, never "the latest" of anything.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cli import assert_user_error, leukoflow_here

from leukoflow import automations
from leukoflow.errors import LeukoflowError
from leukoflow.scoring import events
from leukoflow.scoring import score as sc
from leukoflow.store.pseudonym import subject_key
from leukoflow.store.records import ModelRecord
from leukoflow.vocabulary import Label, Outcome

pytestmark = pytest.mark.integration

MISSED_WINDOW = timedelta(seconds=10)  # Prefect's floor for a proactive trigger
# The store this module's automations watch. A missed-night automation watches one store: the
# nights of other stores (here night_summary's, and the other test worker's sweeps on the shared
# server) must not keep it quiet.
WATCHED_STORE = f"/stores/alerts-{uuid.uuid4().hex[:8]}"
MISSED_TEXT = f"no nightly sweep of {WATCHED_STORE} completed in the last 10 s"
SALT = b"t" * 32
RAW_IDS = ("MRN-0042-771", "MRN-0043-771")  # medical-record-like ids: never in an event


def night_summary(run_id: str, flagged_cells: tuple[int, int] = (5, 0)) -> dict:
    """A finished sweep's summary (flows/score): by default the first subject flagged by the
    subject rule, subjects keyed by their pseudonyms as the sweep keys them."""
    subject_ids, scores, labels = [], [], []
    for raw, n_flagged in zip(RAW_IDS, flagged_cells, strict=True):
        for cell in range(10):
            subject_ids.append(subject_key(raw, SALT))
            scores.append(1.0 if cell < n_flagged else -1.0)
            labels.append(Label.of(cell < n_flagged).value)
    rule = sc.SubjectRule(min_flagged_cells=3, min_flagged_fraction=1.0)
    started = datetime.now(UTC)
    state = sc.Sweep(
        run_id, started, "/stores/ward", "/inbox", "inbox", "2030-01-02", "model-a",
        ModelRecord("model-a", score_kind="decision", threshold=0.0), rule, "weights-a",
    )  # fmt: skip
    state.subjects = sc.summarise_subjects(subject_ids, scores, labels, rule)
    state.drift = {"cells": 20, "feature_shift": 0.1, "score_ks": 0.2, "warning": False,
                   "reasons": []}  # fmt: skip
    return state.summary(Outcome.COMPLETED, started)


def poll(condition, timeout_s: float, what: str):
    """`condition()` until truthy, with a deadline (a real condition, not a fixed wait)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Receiver:
    """A webhook receiver on 127.0.0.1 keeping every JSON body it is sent."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    receiver.messages.append(json.loads(body or b"{}"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def matching(self, *texts: str) -> list[dict]:
        """The messages whose subject and body hold every one of `texts`."""
        with self.lock:
            found = [m for m in self.messages
                     if all(t in f"{m['subject']} {m['body']}" for t in texts)]  # fmt: skip
        return found

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def alerting(prefect_server):
    """A webhook block posting to a loopback receiver, and the three automations sending to it
    (applied twice, as two deploys would); deleted afterwards so no other test feeds them."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    receiver = Receiver()
    name = f"oncall-{uuid.uuid4().hex[:8]}"
    CustomWebhookNotificationBlock(
        name="leukoflow-test", url=receiver.url,
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    ).save(name)  # fmt: skip
    block = f"custom-webhook/{name}"
    block_id = automations.resolve_notification_block(block)
    # What an earlier leukoflow deployed: one server-wide missed-night automation (disabled here).
    old = automations.alert_automations(block_id, WATCHED_STORE, MISSED_WINDOW)[2]
    with get_client(sync_client=True) as client:
        client.create_automation(
            old.model_copy(update={"name": automations.MISSED_NAME, "enabled": False})
        )
    first = automations.deploy_alerts(block, WATCHED_STORE, missed_after=MISSED_WINDOW)
    second = automations.deploy_alerts(block, WATCHED_STORE, missed_after=MISSED_WINDOW)
    yield receiver, block_id, first, second
    with get_client(sync_client=True) as client:
        for item in second:
            client.delete_automation(uuid.UUID(item["id"]))
    receiver.stop()


def server_events(prefect_server, name: str, run_id: str) -> list[dict]:
    answer = prefect_server.call(
        "POST", "events/filter", {"filter": {"event": {"name": [name]}}, "limit": 50}
    )
    return [e for e in answer["events"] if e["payload"].get("run_id") == run_id]


def test_a_sweeps_events_reach_the_server_without_subject_ids(prefect_server):
    from prefect.events.worker import EventsWorker

    from leukoflow.tasks.event_tasks import emit_night_events

    run_id = f"run-{uuid.uuid4().hex[:8]}"
    summary = night_summary(run_id)
    assert emit_night_events(summary) == [events.NIGHT_COMPLETED, events.NIGHT_FLAGGED]
    EventsWorker.drain_all(timeout=30)  # send now, not at this process's exit
    completed = poll(
        lambda: server_events(prefect_server, events.NIGHT_COMPLETED, run_id), 60,
        "the completed event on the server",
    )  # fmt: skip
    flagged = poll(
        lambda: server_events(prefect_server, events.NIGHT_FLAGGED, run_id), 60,
        "the flagged event on the server",
    )  # fmt: skip
    assert len(completed) == 1 and len(flagged) == 1
    payload = completed[0]["payload"]
    assert payload["subjects_flagged"] == 1 and payload["subjects"] == 2
    assert payload["flagged_subjects"] == [subject_key(RAW_IDS[0], SALT)]
    assert "warning" in payload["drift"]
    text = json.dumps(completed + flagged)
    assert not any(raw in text for raw in RAW_IDS)


def test_deploy_notify_keeps_one_of_each_automation(alerting):
    from prefect.automations import Automation

    _, block_id, first, second = alerting
    names = [a["name"] for a in second]
    missed_name = automations.missed_name(WATCHED_STORE)
    assert names == [automations.FLAGGED_NAME, automations.FAILED_NAME, missed_name]
    assert {a["action"] for a in second} == {"updated"}
    # The first deploy deleted the server-wide missed-night automation of an earlier leukoflow.
    retired, *made = first
    assert (retired["name"], retired["action"]) == (automations.MISSED_NAME, "deleted")
    assert [a["id"] for a in made] == [a["id"] for a in second]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name in names:
            assert len(client.read_automations_by_name(name)) == 1
        assert client.read_automations_by_name(automations.MISSED_NAME) == []
    missed = Automation.read(name=missed_name)
    assert missed.trigger.posture == "Proactive" and missed.trigger.within == MISSED_WINDOW
    assert missed.trigger.match.get(events.STORE_LABEL) in (WATCHED_STORE, [WATCHED_STORE])
    failed = Automation.read(name=automations.FAILED_NAME)
    assert failed.trigger.match_related.get("prefect.resource.name") in (
        "leukoflow-score", ["leukoflow-score"],
    )  # fmt: skip
    assert failed.actions[0].block_document_id == block_id


def test_deploy_refuses_a_notify_block_that_does_not_exist(prefect_server, capsys, tmp_path):
    with pytest.raises(LeukoflowError, match="no notification block 'custom-webhook/nobody-here'"):
        automations.resolve_notification_block("custom-webhook/nobody-here")
    result = leukoflow_here(
        capsys, "deploy", "--store", tmp_path / "store", "--inbox", tmp_path / "inbox",
        "--notify", "custom-webhook/nobody-here",
    )  # fmt: skip
    assert_user_error(result, "custom-webhook/nobody-here")
    result = leukoflow_here(
        capsys, "deploy", "--store", tmp_path, "--inbox", tmp_path, "--notify", "oncall"
    )
    assert_user_error(result, "TYPE/NAME", "'oncall'")


def test_flagged_failed_and_missed_nights_each_send_a_message(alerting, prefect_server, tmp_path):
    from prefect.events.worker import EventsWorker

    from leukoflow.flows.score import score_inbox
    from leukoflow.tasks.event_tasks import emit_night_events

    receiver = alerting[0]
    # The missed night: no completed night of the watched store within the window since the
    # automation started, while another store completes a night every 2 s (less than the window).
    sent_at = [0.0]

    def missed_while_another_store_sweeps():
        if time.monotonic() - sent_at[0] >= 2:
            other = night_summary(f"run-{uuid.uuid4().hex[:8]}", flagged_cells=(0, 0))
            assert other["store"] != WATCHED_STORE
            assert emit_night_events(other) == [events.NIGHT_COMPLETED]  # no flagged alert
            EventsWorker.drain_all(timeout=10)
            sent_at[0] = time.monotonic()
        return receiver.matching(MISSED_TEXT)

    missed = poll(missed_while_another_store_sweeps, 60, "the missed-night message")
    assert MISSED_TEXT in missed[0]["body"]

    run_id = f"run-{uuid.uuid4().hex[:8]}"
    summary = night_summary(run_id)
    emit_night_events(summary)
    EventsWorker.drain_all(timeout=30)
    flagged = poll(lambda: receiver.matching("flagged night", run_id), 60, "the flagged message")
    assert len(flagged) == 1
    assert "1 of 2 subject(s) flagged" in flagged[0]["body"]

    # A real sweep that fails at once: its store has no model.
    store, inbox = tmp_path / "store", tmp_path / "inbox"
    store.mkdir(), inbox.mkdir()
    state = score_inbox(str(inbox), str(store), return_state=True)
    assert state.is_failed()
    flow_run_id = str(state.state_details.flow_run_id)
    failed = poll(
        lambda: receiver.matching("sweep", "Failed", flow_run_id), 60,
        "the failed-sweep message",
    )  # fmt: skip
    assert len(failed) == 1 and "Failed" in failed[0]["body"]

    everything = json.dumps(receiver.messages)
    assert not any(raw in everything for raw in RAW_IDS), everything
    assert subject_key(RAW_IDS[0], SALT) not in everything
