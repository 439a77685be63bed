"""The store's accounting, measured from its tables: real Parquet files, no engines."""

import json
import shutil
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from leukoflow.errors import LeukoflowError
from leukoflow.store import records
from leukoflow.store.status import open_existing_store, store_status
from leukoflow.store.storage import open_location
from leukoflow.store.tables import (
    CatalogRow,
    write_catalog,
    write_features,
    write_predictions,
    write_run,
)
from leukoflow.vocabulary import ImageStatus, Label, short_id

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RECIPE = {"backbones": ["vgg16", "color_morphology"], "weights_ids": {"vgg16": "random-seed0",
          "color_morphology": "cm-1"}, "image_size": 32}  # fmt: skip


def image_id(n: int) -> str:
    return f"{n:064x}"


def catalog_row(n: int, status: str = "ok", dataset: str = "d") -> CatalogRow:
    return CatalogRow(
        image_id(n), f"/cells/UID_{n}_1_1_all.bmp", dataset, Label.ALL, f"MRN-{n:07d}-77",
        status=ImageStatus(status), reason=None if status == "ok" else "because", discovered_at=T0,
    )  # fmt: skip


def featurise(store, ids, backbone="vgg16", weights_id="random-seed0", size=32):
    write_features(store, backbone, weights_id, size, ids, np.ones((len(ids), 3), np.float32))


def completed_run(store, run_id="r1", recipe=RECIPE, when=T0, dataset="d", **counts):
    details = {"feature_recipe": recipe} if recipe else {}
    write_run(
        store,
        records.run_row(run_id, "backfill", dataset, when, when, "completed", details=details,
                        **counts),
    )  # fmt: skip


@pytest.fixture()
def store(tmp_path):
    """Six images: four ok with every vector of the recipe, one quarantined, one duplicate."""
    root = open_location(str(tmp_path))
    rows = [catalog_row(n) for n in range(4)]
    rows += [catalog_row(4, "quarantined"), catalog_row(5, "duplicate")]
    write_catalog(root, "d", rows)
    ok = [image_id(n) for n in range(4)]
    featurise(root, ok[:2])
    featurise(root, ok[2:])  # a second file: deleting one loses exactly these two
    featurise(root, ok, "color_morphology", "cm-1", 0)
    completed_run(root, found=6, featurised=4, quarantined=1, duplicate=1)
    return root


def test_a_complete_store_is_accounted_for_by_measurement(store):
    report = store_status(store)
    assert report["accounted"] is True
    d = report["accounting"]["datasets"]["d"]
    assert {k: d[k] for k in ("found", "featurised", "missing", "quarantined", "duplicate")} == {
        "found": 6, "featurised": 4, "missing": 0, "quarantined": 1, "duplicate": 1,
    }  # fmt: skip
    assert d["accounted"] is True and d["missing_images"] == []
    assert "recipe of run r1" in d["basis"] and "vgg16 random-seed0@32px" in d["basis"]
    assert report["datasets"]["d"] == {"found": 6, "ok": 4, "quarantined": 1, "duplicate": 1}
    assert report["features"] == {
        "color_morphology": {"cm-1@0px": 4},
        "vgg16": {"random-seed0@32px": 4},
    }
    (run,) = report["accounting"]["runs"]
    assert run["accounted"] is True and run["found"] == 6


def test_a_deleted_feature_file_names_exactly_its_images(store, tmp_path):
    folder = tmp_path / "features" / "backbone=vgg16"
    files = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    files[-1].unlink()  # the second batch: images 2 and 3
    report = store_status(store)
    d = report["accounting"]["datasets"]["d"]
    assert (d["featurised"], d["missing"]) == (2, 2)
    assert d["missing_images"] == [image_id(2), image_id(3)]
    assert d["accounted"] is False and report["accounted"] is False
    # found still equals the sum of its measured parts: the loss shows as missing, not as a gap.
    assert d["found"] == d["featurised"] + d["missing"] + d["quarantined"] + d["duplicate"]
    assert "MRN" not in json.dumps(report, default=str)
    assert "UID_" not in json.dumps(report, default=str)


def test_vectors_of_another_recipe_do_not_count(store):
    # The dataset's recipe is vgg16 at 32 px; the same images at 64 px are not its vectors.
    completed_run(store, "r2", {**RECIPE, "image_size": 64}, T0 + timedelta(hours=1))
    d = store_status(store)["accounting"]["datasets"]["d"]
    assert d["missing"] == 4 and d["featurised"] == 0 and "run r2" in d["basis"]


def test_without_a_recorded_recipe_every_backbone_present_counts(tmp_path):
    root = open_location(str(tmp_path))
    write_catalog(root, "d", [catalog_row(n) for n in range(3)])
    featurise(root, [image_id(0), image_id(1), image_id(2)])
    featurise(root, [image_id(0), image_id(1)], "color_morphology", "cm-1", 0)
    d = store_status(root)["accounting"]["datasets"]["d"]
    assert d["basis"] == "backbones holding its vectors: color_morphology, vgg16"
    assert d["missing_images"] == [image_id(2)] and d["featurised"] == 2


def test_a_catalogued_dataset_without_vectors_is_missing_not_featurised(tmp_path):
    root = open_location(str(tmp_path))
    write_catalog(root, "fresh", [catalog_row(n, dataset="fresh") for n in range(2)])
    d = store_status(root)["accounting"]["datasets"]["fresh"]
    assert (d["featurised"], d["missing"], d["accounted"]) == (0, 2, False)


def test_a_run_row_whose_counts_do_not_add_up_is_not_accounted(store):
    completed_run(store, "r3", when=T0 + timedelta(hours=2), found=6, featurised=3,
                  quarantined=1, duplicate=1)  # fmt: skip
    (run,) = store_status(store)["accounting"]["runs"]
    assert run["run_id"] == "r3" and run["accounted"] is False


def test_a_store_that_does_not_exist_is_a_usage_error(tmp_path):
    with pytest.raises(LeukoflowError, match="no store at"):
        open_existing_store(str(tmp_path / "nope"))
    assert open_existing_store(str(tmp_path)).uri == str(tmp_path)


def test_an_empty_store_is_accounted(tmp_path):
    report = store_status(open_location(str(tmp_path)))
    assert report["accounted"] is True and report["datasets"] == {}


def test_short_ids_name_images_without_subject_ids():
    assert short_id(image_id(7)) == image_id(7)[:12] and len(short_id(image_id(7))) == 12


def test_compaction_leftovers_are_counted_once(store, tmp_path):
    # A feature file copied back after compaction (a crash between merge and delete).
    folder = tmp_path / "features" / "backbone=vgg16"
    spare = tmp_path / "spare"
    shutil.copytree(folder, spare)
    for part in spare.iterdir():
        shutil.copy(part, folder / f"again-{part.name}")
    assert store_status(store)["features"]["vgg16"] == {"random-seed0@32px": 4}


def test_a_deleted_predictions_chunk_names_exactly_its_images(store, tmp_path):
    """A dataset a sweep last ran on is counted by its predictions: a lost chunk shows."""

    def prediction(n: int) -> dict:
        return {
            "image_id": image_id(n), "uri": f"/cells/{n}.bmp", "subject_id": None,
            "model_id": "m1", "score": 0.9, "score_kind": "probability", "predicted_label": "all",
            "threshold": 0.5, "scored_at": T0, "run_id": "s1",
        }  # fmt: skip

    first = write_predictions(store, "2026-01-02", "s1", [prediction(0), prediction(1)])
    write_predictions(store, "2026-01-02", "s1b", [prediction(2), prediction(3)])
    write_run(store, records.run_row(
        "s1", "score", "d", T0 + timedelta(days=1), T0 + timedelta(days=1), "completed",
        found=6, new=4, scored=4, quarantined=1, duplicate=1, model_id="m1",
    ))  # fmt: skip
    d = store_status(store)["accounting"]["datasets"]["d"]
    assert (d["scored"], d["missing"], d["accounted"]) == (4, 0, True)
    assert "predictions of model m1" in d["basis"]
    first.fs.rm(first.path)  # the chunk holding images 0 and 1
    d = store_status(store)["accounting"]["datasets"]["d"]
    assert (d["scored"], d["missing"]) == (2, 2) and d["accounted"] is False
    assert d["missing_images"] == [image_id(0), image_id(1)]
    assert d["found"] == d["scored"] + d["missing"] + d["quarantined"] + d["duplicate"]
