"""FHIR export, framework-free: a night's subjects become valid FHIR R4 resources (checked with
fhir.resources' R4B models), named by pseudonym or by a map kept outside the store, flagged by
the product's subject rule, with ids that do not change between exports."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from leukoflow.errors import LeukoflowError
from leukoflow.present import fhir
from leukoflow.store.pseudonym import subject_key, subject_salt
from leukoflow.store.records import ModelRecord
from leukoflow.store.storage import Location, open_location
from leukoflow.store.tables import RunRow, write_predictions, write_run
from leukoflow.vocabulary import NON_CLINICAL_NOTICE, Outcome, RunKind

NIGHT = "2026-03-02"
MODEL = "m-test"
RAW = ("MRN-0001", "MRN-0002")  # subject ids that look like patient identifiers
ISSUED = datetime(2026, 3, 3, 6, 0, tzinfo=UTC)
MODELS = {"DiagnosticReport": DiagnosticReport, "Observation": Observation}


def record_of(weights: str = "none", patient_rule: dict | None = None) -> ModelRecord:
    return ModelRecord.from_dict(
        {
            "model_id": MODEL,
            "feature_recipe": {
                "backbones": ["vgg16"],
                "weights": weights,
                "image_size": 32,
                "precision": "fp32",
            },  # fmt: skip
            "non_clinical": weights == "none",
            "score_kind": "probability",
            "threshold": 0.5,
            "patient_rule": patient_rule,
        }
    )


def night_rows(model_id: str = MODEL) -> list[dict]:
    """MRN-0001: 6 of 8 cells flagged; MRN-0002: 1 of 4; two cells without a subject."""
    cells = [("MRN-0001", i < 6) for i in range(8)] + [("MRN-0002", i < 1) for i in range(4)]
    cells += [(None, True), (None, False)]
    return [
        {
            "image_id": f"{model_id}-img-{n}",
            "subject_id": subject,
            "model_id": model_id,
            "score": 0.9 if flagged else 0.1,
            "score_kind": "probability",
            "predicted_label": "all" if flagged else "hem",
            "threshold": 0.5,
            "scored_at": ISSUED,
            "run_id": "r-1",
        }
        for n, (subject, flagged) in enumerate(cells)
    ]


def make_store(root: Location, model_id: str = MODEL, night: str = NIGHT) -> Location:
    write_predictions(root, night, "r-1", night_rows(model_id))
    return root


@pytest.fixture
def store(tmp_path) -> Location:
    return make_store(open_location(str(tmp_path / "store")))


def ndjson(folder: Location, kind: str) -> list[dict]:
    text = Path(folder.path, f"{kind}.ndjson").read_text()
    return [json.loads(line) for line in text.splitlines()]


def keys(store: Location) -> dict[str, str]:
    salt = subject_salt(store)
    return {raw: subject_key(raw, salt) for raw in RAW}


def test_each_subject_gets_a_valid_preliminary_report_with_its_counts(store) -> None:
    done = fhir.export_night(store, NIGHT, MODEL, record_of(), issued=ISSUED)
    folder = fhir.export_folder(store, NIGHT)
    assert done["folder"] == folder.uri and done["status"] == "written"
    assert done["resources"] == {"DiagnosticReport": 2, "Observation": 6}
    assert done["cells_without_subject"] == 2 and done["subjects_flagged"] == 1
    reports, observations = ndjson(folder, "DiagnosticReport"), ndjson(folder, "Observation")
    for resource in reports + observations:
        MODELS[resource["resourceType"]].model_validate(resource)  # FHIR R4(B), or it raises
        assert resource["status"] == "preliminary"
    by_subject = {r["subject"]["identifier"]["value"]: r for r in reports}
    key = keys(store)
    assert set(by_subject) == {key["MRN-0001"], key["MRN-0002"]}
    flagged, not_flagged = by_subject[key["MRN-0001"]], by_subject[key["MRN-0002"]]
    assert flagged["conclusion"].startswith("flagged for review")
    assert not_flagged["conclusion"].startswith("not flagged")
    assert flagged["code"]["coding"][0]["code"] == fhir.SCREENING_CODE["code"]
    extensions = {e["url"].rsplit(":", 1)[1]: e["valueString"] for e in flagged["extension"]}
    assert extensions["model-id"] == MODEL and "vgg16" in extensions["feature-recipe"]
    assert "weights none" in extensions["feature-recipe"]
    # Its results are the three Observations of the same subject, with the numbers.
    observed = {o["id"]: o for o in observations}
    values = {}
    for ref in flagged["result"]:
        observation = observed[ref["reference"].removeprefix("Observation/")]
        assert observation["subject"] == flagged["subject"]
        values[observation["code"]["coding"][0]["code"]] = observation.get(
            "valueInteger", observation.get("valueQuantity", {}).get("value")
        )
    assert values == {"cells-scored": 8, "cells-flagged": 6, "flagged-fraction": 0.75}


def test_a_random_weights_model_carries_the_notice_everywhere_and_a_clinical_one_none(tmp_path):
    store = make_store(open_location(str(tmp_path / "a")))
    fhir.export_night(store, NIGHT, MODEL, record_of("none"), issued=ISSUED)
    folder = fhir.export_folder(store, NIGHT)
    for report in ndjson(folder, "DiagnosticReport"):
        assert NON_CLINICAL_NOTICE in report["conclusion"]
        assert NON_CLINICAL_NOTICE in report["text"]["div"]
        assert {"url": f"{fhir.SYSTEM}:non-clinical", "valueString": NON_CLINICAL_NOTICE} in (
            report["extension"]
        )
    for observation in ndjson(folder, "Observation"):
        assert observation["note"] == [{"text": NON_CLINICAL_NOTICE}]

    clinical = make_store(open_location(str(tmp_path / "b")))
    fhir.export_night(clinical, NIGHT, MODEL, record_of("imagenet"), issued=ISSUED)
    folder = fhir.export_folder(clinical, NIGHT)
    text = Path(folder.path, "DiagnosticReport.ndjson").read_text()
    text += Path(folder.path, "Observation.ndjson").read_text()
    assert "CLINICALLY" not in text
    conclusions = {r["conclusion"] for r in ndjson(folder, "DiagnosticReport")}
    assert conclusions == {"flagged for review", "not flagged"}


def test_no_raw_subject_id_leaves_without_a_map_and_a_map_names_patients(store, tmp_path):
    fhir.export_night(store, NIGHT, MODEL, record_of(), issued=ISSUED)
    folder = fhir.export_folder(store, NIGHT)
    names = ("DiagnosticReport.ndjson", "Observation.ndjson")
    exported = "".join(Path(folder.path, name).read_text() for name in names)
    bundle = json.dumps(fhir.transaction_bundle(fhir.read_ndjson(folder), "http://x/fhir"))
    for raw in RAW:
        assert raw not in exported and raw not in bundle

    mapping = tmp_path / "map.csv"
    mapping.write_text("subject_id,patient_reference\nMRN-0001,Patient/p-17\n")
    out = tmp_path / "out"
    subject_map = fhir.read_subject_map(str(mapping), store)
    done = fhir.export_night(store, NIGHT, MODEL, record_of(), out=str(out),
                             subject_map=subject_map, issued=ISSUED)  # fmt: skip
    assert done["mapped"] == 1 and done["folder"] == str(out)
    reports = {r["subject"].get("reference"): r for r in ndjson(open_location(str(out)),
                                                                "DiagnosticReport")}  # fmt: skip
    assert reports["Patient/p-17"]["conclusion"].startswith("flagged for review")
    # The unmapped subject keeps its pseudonym; the ids do not depend on the map.
    assert reports[None]["subject"]["identifier"]["value"] == keys(store)["MRN-0002"]
    first = {r["id"] for r in ndjson(folder, "DiagnosticReport")}
    assert {r["id"] for r in reports.values()} == first
    assert not any(raw in Path(out, "DiagnosticReport.ndjson").read_text() for raw in RAW)


def test_a_map_inside_the_store_or_malformed_is_refused_without_echoing_ids(store, tmp_path):
    inside = Path(store.path, "map.csv")
    inside.write_text("subject_id,patient_reference\nMRN-0001,Patient/1\n")
    with pytest.raises(LeukoflowError, match="inside the store"):
        fhir.read_subject_map(str(inside), store)
    for text, words in (
        ("subject,patient\nMRN-0001,Patient/1\n", "header"),
        ("subject_id,patient_reference\nMRN-0001,not a reference\n", "line 2"),
        ("subject_id,patient_reference\nMRN-0001,Patient/1\nMRN-0001,Patient/2\n", "twice"),
    ):
        path = tmp_path / "bad.csv"
        path.write_text(text)
        with pytest.raises(LeukoflowError, match=words) as refused:
            fhir.read_subject_map(str(path), store)
        assert "MRN-0001" not in str(refused.value)
    with pytest.raises(LeukoflowError, match="no such file"):
        fhir.read_subject_map(str(tmp_path / "absent.csv"), store)


def test_ids_are_the_same_on_every_export_and_differ_by_night_and_model(store) -> None:
    def ids(night: str, model_id: str, issued: datetime) -> set[str]:
        rule = fhir.night_rule(store, night, model_id, record_of())
        subjects, _ = fhir.night_subjects(store, night, model_id, rule)
        built = fhir.build_resources(subjects, night, model_id, record_of(), issued)
        return {r["id"] for kind in fhir.RESOURCE_TYPES for r in built[kind]}

    make_store(store, model_id="m-other")
    make_store(store, night="2026-03-03")
    once = ids(NIGHT, MODEL, ISSUED)
    assert len(once) == 8 and once == ids(NIGHT, MODEL, datetime.now(UTC))
    assert once.isdisjoint(ids("2026-03-03", MODEL, ISSUED))
    assert once.isdisjoint(ids(NIGHT, "m-other", ISSUED))


def test_the_bundle_is_a_valid_transaction_of_puts_at_those_ids(store) -> None:
    fhir.export_night(store, NIGHT, MODEL, record_of(), issued=ISSUED)
    resources = fhir.read_ndjson(fhir.export_folder(store, NIGHT))
    bundle = fhir.transaction_bundle(resources, "https://fhir.example.org/r4")
    Bundle.model_validate(bundle)
    assert bundle["type"] == "transaction" and len(bundle["entry"]) == 8
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert entry["request"] == {
            "method": "PUT",
            "url": f"{resource['resourceType']}/{resource['id']}",
        }
        assert entry["fullUrl"].endswith(entry["request"]["url"])


def test_the_subject_rule_is_the_models_or_the_nights_sweeps(store) -> None:
    # The model's patient rule (a fraction at or above 0.25) flags MRN-0002's 1 of 4 cells too.
    done = fhir.export_night(store, NIGHT, MODEL, record_of(patient_rule={"threshold": 0.25}))
    assert done["subjects_flagged"] == 2
    # A sweep that ran with --min-flagged-cells 7 --min-flagged-fraction 1 wrote its rule in its
    # run row: the export follows the night's sweep (6 flagged cells: not flagged).
    rule = {"min_flagged_cells": 7, "min_flagged_fraction": 1.0, "inclusive": False}
    write_run(
        store,
        RunRow(
            "r-1",
            RunKind.SCORE,
            "inbox",
            ISSUED,
            ISSUED,
            Outcome.COMPLETED,
            model_id=MODEL,
            details={"date": NIGHT, "subject_rule": rule},
        ),
    )
    done = fhir.export_night(store, NIGHT, MODEL, record_of())
    assert done["subjects_flagged"] == 0


def test_an_s3_store_gets_its_ndjson_and_status(request) -> None:
    endpoint = request.getfixturevalue("s3_env")
    root = make_store(open_location(f"s3://{endpoint.make_bucket('fhir-export')}/store"))
    done = fhir.export_night(root, NIGHT, MODEL, record_of(), issued=ISSUED)
    folder = fhir.export_folder(root, NIGHT)
    assert done["folder"].startswith("s3://")
    resources = fhir.read_ndjson(folder)
    assert len(resources["DiagnosticReport"]) == 2 and len(resources["Observation"]) == 6
    status = json.loads(root.fs.cat_file(folder.child(fhir.STATUS_FILE).path))
    assert status["status"] == "written"
