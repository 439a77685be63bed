"""scoring/events: the payload of a night's Prefect events, built from a sweep summary."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from leukoflow.scoring import events
from leukoflow.scoring import score as sc
from leukoflow.store.pseudonym import subject_key
from leukoflow.store.records import ModelRecord
from leukoflow.vocabulary import Label, Outcome

SALT = b"s" * 32
RAW_IDS = ("MRN-0042-771", "MRN-0043-771", "MRN-0044-771")


def night_summary(flagged_cells: dict[str, int], cells: int = 10) -> dict:
    """A sweep summary as flows/score builds it: subjects keyed, flagged by the subject rule."""
    subject_ids, scores, labels = [], [], []
    for raw, n_flagged in flagged_cells.items():
        for cell in range(cells):
            subject_ids.append(subject_key(raw, SALT))
            is_flagged = cell < n_flagged
            scores.append(1.0 if is_flagged else -1.0)
            labels.append(Label.of(is_flagged).value)
    rule = sc.SubjectRule(min_flagged_cells=3, min_flagged_fraction=1.0)
    subjects = sc.summarise_subjects(subject_ids, scores, labels, rule)
    started = datetime(2030, 1, 2, 2, 0, tzinfo=UTC)
    state = sc.Sweep(
        "run-1", started, "/stores/ward", "/inbox", "inbox", "2030-01-02", "model-a",
        ModelRecord("model-a", score_kind="decision", threshold=0.0), rule, "weights-a",
    )  # fmt: skip
    state.subjects = subjects
    state.drift = {"cells": len(scores), "feature_shift": 0.2, "score_ks": 0.4, "warning": True,
                   "reasons": ["score KS 0.4 > 0.3"], "thresholds": {}}  # fmt: skip
    return state.summary(Outcome.COMPLETED, started)


def test_a_flagged_night_emits_completed_and_flagged_with_pseudonyms_only():
    summary = night_summary({RAW_IDS[0]: 5, RAW_IDS[1]: 1, RAW_IDS[2]: 0})
    emitted = events.night_events(summary)
    assert [e["event"] for e in emitted] == [events.NIGHT_COMPLETED, events.NIGHT_FLAGGED]
    payload = emitted[0]["payload"]
    # The product's subject rule (3 flagged cells) flags the first subject only.
    assert payload["subjects"] == 3 and payload["subjects_flagged"] == 1
    assert payload["flagged_subjects"] == [subject_key(RAW_IDS[0], SALT)]
    assert payload["cells_scored"] == 30 and payload["cells_flagged"] == 6
    assert payload["drift"]["warning"] is True and payload["drift"]["score_ks"] == 0.4
    assert payload["run_id"] == "run-1" and payload["date"] == "2030-01-02"
    resource = emitted[0]["resource"]
    assert resource["prefect.resource.id"] == "leukoflow.night.2030-01-02"
    text = json.dumps(emitted)
    assert not any(raw in text for raw in RAW_IDS), text


def test_a_quiet_night_emits_only_completed():
    summary = night_summary({RAW_IDS[0]: 2, RAW_IDS[1]: 0})
    emitted = events.night_events(summary)
    assert [e["event"] for e in emitted] == [events.NIGHT_COMPLETED]
    assert emitted[0]["payload"]["subjects_flagged"] == 0
    assert emitted[0]["payload"]["flagged_subjects"] == []


def test_an_empty_night_has_counts_and_no_drift():
    summary = night_summary({})
    summary["drift"] = None
    payload = events.night_payload(summary)
    assert payload["drift"] is None
    assert payload["counts"] == dict.fromkeys(events.EVENT_COUNTS, 0)
    json.dumps(payload)  # the event payload must be JSON as it is
