"""Bad input end to end: the real `leukoflow run` on a messy corpus mixed with good cells.

Every file found is featurised, quarantined with a reason code, or a duplicate linked to its
first copy, and the same counts appear in the catalog table, the run's JSON summary, the runs/
record and `leukoflow status`, per run and per dataset. See tests/reliability/conftest.py for
the runs and tests/reliability/corpus.py for the files.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pyarrow.dataset as ds
import pytest

from leukoflow.features.catalog import reason_code
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_catalog, read_runs

from .conftest import FOLDER_DATASET, MANIFEST_DATASET
from .harness import last_json

pytestmark = pytest.mark.integration

DATASETS = (FOLDER_DATASET, MANIFEST_DATASET)


def catalog_rows(messy_runs, dataset: str) -> dict[str, dict]:
    table = read_catalog(open_location(str(messy_runs.store)), dataset)
    rows = table.to_pylist()
    assert len(rows) == len({row["uri"] for row in rows}), "one row per file"
    return {row["uri"]: row for row in rows}


def vgg16_features(messy_runs):
    return ds.dataset(str(messy_runs.store / "features" / "backbone=vgg16")).to_table()


def test_both_runs_succeed_with_quarantined_images(messy_runs):
    for dataset, result in messy_runs.runs.items():
        assert result.returncode == 0, (dataset, result.stderr[-3000:])
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_file_has_the_expected_catalog_row(messy_runs, dataset):
    rows = catalog_rows(messy_runs, dataset)
    expected = messy_runs.expected[dataset]
    assert set(rows) == set(expected)
    for uri, outcome in expected.items():
        row = rows[uri]
        assert row["status"] == outcome.status, (uri, row["reason"])
        if outcome.status == "ok" and outcome.reason is not None:
            assert row["reason"].startswith(outcome.reason), (uri, row["reason"])  # conversion
        elif outcome.status == "ok":
            assert row["reason"] is None, (uri, row["reason"])
        else:
            assert reason_code(row["reason"]) == outcome.reason, (uri, row["reason"])
            assert ": " in row["reason"] or row["status"] == "duplicate"  # code, then detail


def test_conversions_and_refusals_are_recorded_with_their_details(messy_runs):
    rows = catalog_rows(messy_runs, FOLDER_DATASET)
    by_name = {uri.rsplit("/", 1)[-1]: row for uri, row in rows.items()}
    rotated = by_name["rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == (24, 48)  # the file is 48x24, turned upright
    bomb = by_name["bomb.png"]
    assert bomb["size_bytes"] < 200 and "10000000000 pixels" in bomb["reason"]
    assert bomb["width"] is None  # refused from the header, never decoded
    assert "Permission denied" in by_name["locked.bmp"]["reason"]
    assert "cannot list folder" in by_name["closed_folder"]["reason"]
    assert "No such file" in by_name["dangling.bmp"]["reason"]
    assert "symbolic links" in by_name["loop_a.bmp"]["reason"]
    twin, conflict = by_name["twin.bmp"], by_name["twin_other_label.bmp"]
    assert conflict["reason"] == (
        f"label_conflict:duplicate_of:{twin['image_id']} ({twin['label']} vs {conflict['label']})"
    )
    assert by_name["copy_2.bmp"]["reason"] == f"duplicate_of:{by_name['copy_1.bmp']['image_id']}"
    # A name full of shell syntax was never handed to a shell.
    assert not list(messy_runs.base.rglob("pwned"))


def test_manifest_rows_outside_the_images_root_are_never_read(messy_runs):
    rows = catalog_rows(messy_runs, MANIFEST_DATASET)
    outside_id = hashlib.sha256((messy_runs.base / "outside.bmp").read_bytes()).hexdigest()
    escapes = [row for row in rows.values() if (row["reason"] or "").startswith("outside_root")]
    assert len(escapes) == 4
    for row in escapes:
        assert row["image_id"].startswith("path:") and row["size_bytes"] is None
    assert outside_id not in {row["image_id"] for row in rows.values()}
    assert outside_id not in set(vgg16_features(messy_runs).column("image_id").to_pylist())


@pytest.mark.parametrize("dataset", DATASETS)
def test_found_equals_featurised_plus_quarantined_plus_duplicates(messy_runs, dataset):
    rows = catalog_rows(messy_runs, dataset)
    statuses = Counter(row["status"] for row in rows.values())
    assert set(statuses) <= {"ok", "quarantined", "duplicate"}
    found, ok = len(rows), statuses["ok"]
    assert found == ok + statuses["quarantined"] + statuses["duplicate"]

    # Catalog table: every ok image has exactly one vector for the run's recipe.
    features = vgg16_features(messy_runs).to_pylist()
    keys = Counter((f["image_id"], f["weights_id"], f["image_size"]) for f in features)
    assert max(keys.values()) == 1, "no duplicate feature rows"
    featurised = {image_id for image_id, weights, size in keys if (weights, size) == (
        "random-seed0", 32)}  # fmt: skip
    ok_ids = {row["image_id"] for row in rows.values() if row["status"] == "ok"}
    assert ok_ids <= featurised

    # The run's JSON summary says the same.
    counts = last_json(messy_runs.runs[dataset].stdout)["counts"]
    assert counts["found"] == found
    assert counts["featurised"] == ok
    assert counts["quarantined"] == statuses["quarantined"]
    assert counts["duplicate"] == statuses["duplicate"]

    # And the runs/ record.
    runs = read_runs(open_location(str(messy_runs.store))).to_pylist()
    record = next(r for r in runs if r["dataset"] == dataset)
    assert record["outcome"] == "completed"
    assert (record["images_found"], record["images_featurised"]) == (found, ok)
    assert record["images_quarantined"] == statuses["quarantined"]
    assert record["images_duplicate"] == statuses["duplicate"]


def test_features_are_computed_once_per_content_whatever_the_dataset(messy_runs):
    folder = last_json(messy_runs.runs[FOLDER_DATASET].stdout)
    manifest = last_json(messy_runs.runs[MANIFEST_DATASET].stdout)
    assert folder["extraction"]["computed"] == {"vgg16": folder["counts"]["featurised"]}
    assert manifest["extraction"]["computed"] == {}  # its good cells are the folder's bytes


def test_status_shows_the_invariant_per_dataset_and_per_run(messy_runs):
    assert messy_runs.status_json.returncode == 0, messy_runs.status_json.stderr
    report = last_json(messy_runs.status_json.stdout)
    accounting = report["accounting"]
    for dataset in DATASETS:
        rows = catalog_rows(messy_runs, dataset)
        statuses = Counter(row["status"] for row in rows.values())
        summary = last_json(messy_runs.runs[dataset].stdout)
        keys = ("found", "featurised", "missing", "quarantined", "duplicate", "accounted")
        assert {k: accounting["datasets"][dataset][k] for k in keys} == {
            "found": len(rows),
            "featurised": statuses["ok"],
            "missing": 0,
            "quarantined": statuses["quarantined"],
            "duplicate": statuses["duplicate"],
            "accounted": True,
        }
        run = next(r for r in accounting["runs"] if r["dataset"] == dataset)
        assert run["run_id"] == summary["run_id"] and run["accounted"] is True
        assert {k: run[k] for k in ("found", "featurised", "quarantined", "duplicate")} == {
            k: summary["counts"][k] for k in ("found", "featurised", "quarantined", "duplicate")
        }
        line = (
            f"dataset {dataset}: {len(rows)} found = {statuses['ok']} featurised + 0 missing "
            f"+ {statuses['quarantined']} quarantined + {statuses['duplicate']} duplicate"
        )
        assert line in messy_runs.status_text.stdout
    assert "MISMATCH" not in messy_runs.status_text.stdout
