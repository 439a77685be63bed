from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leukoflow.store.storage import open_location
from leukoflow.store.tables import (
    CATALOG_COLUMNS,
    CATALOG_SCHEMA,
    PREDICTION_SCHEMA,
    CatalogRow,
    feature_schema,
    featurised_ids,
    read_catalog,
    read_catalog_rows,
    read_features,
    read_predictions,
    scored_image_ids,
    write_catalog,
    write_features,
    write_predictions,
)
from leukoflow.vocabulary import ImageStatus, Label


def test_features_round_trip_as_fixed_size_float32_lists(tmp_path):
    store = open_location(str(tmp_path))
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    loc = write_features(store, "vgg16", "random-seed0", 32, ["a", "b", "c"], vectors)

    assert pq.read_schema(loc.path).equals(feature_schema(4))
    assert pq.read_schema(loc.path).field("feature").type == pa.list_(pa.float32(), 4)
    back = read_features(store, "vgg16", "random-seed0", 32, ["c", "a", "zz"])
    assert sorted(back) == ["a", "c"]
    np.testing.assert_array_equal(back["c"], vectors[2])


def test_features_are_keyed_by_weights_and_image_size(tmp_path):
    store = open_location(str(tmp_path))
    write_features(store, "vgg16", "random-seed0", 32, ["a"], np.ones((1, 4), np.float32))
    assert featurised_ids(store, "vgg16", "random-seed0", 32) == {"a"}
    assert featurised_ids(store, "vgg16", "random-seed0", 64) == set()
    assert featurised_ids(store, "vgg16", "imagenet-6d6bbae143d8", 32) == set()
    assert featurised_ids(store, "densenet121", "random-seed0", 32) == set()


def test_a_vector_written_twice_is_read_once(tmp_path):
    store = open_location(str(tmp_path))
    write_features(store, "vgg16", "w", 32, ["a"], np.ones((1, 2), np.float32))
    write_features(store, "vgg16", "w", 32, ["a"], np.zeros((1, 2), np.float32))
    back = read_features(store, "vgg16", "w", 32, ["a"])
    assert list(back) == ["a"] and back["a"].shape == (2,)


def test_writes_leave_no_temporary_files(tmp_path):
    store = open_location(str(tmp_path))
    write_features(store, "vgg16", "w", 32, ["a"], np.ones((1, 2), np.float32))
    names = [p.name for p in (tmp_path / "features" / "backbone=vgg16").iterdir()]
    assert len(names) == 1 and names[0].startswith("part-") and names[0].endswith(".parquet")


def test_catalog_round_trip_keeps_the_schema(tmp_path):
    store = open_location(str(tmp_path))
    assert read_catalog(store).num_rows == 0
    row = CatalogRow("x", "/a.bmp", "d", status=ImageStatus.OK)
    write_catalog(store, "d", [row])
    table = read_catalog(store, "d")
    assert table.schema.equals(CATALOG_SCHEMA)
    assert table.column("image_id").to_pylist() == ["x"]
    assert read_catalog_rows(store, "d") == [row]


def test_the_catalog_row_has_a_field_per_schema_column_in_order():
    """One owner of a catalog row's shape: the typed row and the Parquet schema cannot drift."""
    assert CATALOG_COLUMNS == tuple(CATALOG_SCHEMA.names)
    stored = {
        "image_id": "x",
        "uri": "/a.bmp",
        "dataset": "d",
        "label": "hem",
        "status": "duplicate",
    }
    row = CatalogRow.from_dict(stored)
    assert (row.label, row.status) == (Label.HEM, ImageStatus.DUPLICATE) and not row.ok
    assert row.to_dict() == {name: stored.get(name) for name in CATALOG_SCHEMA.names}
    set_aside = CatalogRow("y", "/b.bmp", "d", status=ImageStatus.OK).quarantined("unreadable: x")
    assert (set_aside.status, set_aside.reason) == (ImageStatus.QUARANTINED, "unreadable: x")


# -- predictions: one row per (image, model), whatever the files hold ------------------------
def _prediction(image_id: str, model_id: str = "m1", day: int = 1, score: float = 0.5) -> dict:
    return {
        "image_id": image_id, "uri": f"/inbox/{image_id}.bmp", "subject_id": "MRN-0048213-77",
        "model_id": model_id, "score": score, "score_kind": "probability",
        "predicted_label": "all" if score >= 0.6 else "hem", "threshold": 0.6,
        "scored_at": datetime(2026, 3, day, 2, 0, tzinfo=UTC), "run_id": f"run-{day}",
    }  # fmt: skip


def test_prediction_chunks_carry_the_lease_token_and_old_chunks_still_read(tmp_path):
    store = open_location(str(tmp_path))
    loc = write_predictions(store, "2026-03-01", "run-1", [_prediction("a")], lease_token="tok-1")
    assert pq.read_schema(loc.path).field("lease_token").nullable
    # A chunk written before the column existed.
    old_schema = pa.schema([f for f in PREDICTION_SCHEMA if f.name != "lease_token"])
    old = tmp_path / "predictions" / "date=2026-03-01" / "part-old.parquet"
    pq.write_table(pa.Table.from_pylist([_prediction("b")], schema=old_schema), old)
    table = read_predictions(store, "2026-03-01")
    assert table.schema.equals(PREDICTION_SCHEMA)
    rows = table.select(["image_id", "lease_token"]).to_pylist()
    assert sorted(rows, key=lambda r: r["image_id"]) == [
        {"image_id": "a", "lease_token": "tok-1"},
        {"image_id": "b", "lease_token": None},
    ]


def test_a_prediction_written_twice_is_read_and_counted_once(tmp_path):
    store = open_location(str(tmp_path))
    # A sweep's chunk; a stalled sweep writes two of its images again, on the next night too;
    # another model's prediction of the same image is a different key.
    write_predictions(store, "2026-03-01", "r1", [_prediction(i) for i in "abc"], "tok-1")
    write_predictions(store, "2026-03-01", "r2", [_prediction("a", day=2, score=0.9)], "tok-2")
    write_predictions(store, "2026-03-02", "r2", [_prediction("b", day=2, score=0.9)], "tok-2")
    write_predictions(store, "2026-03-02", "r3", [_prediction("a", model_id="m2", day=2)])

    every = read_predictions(store)
    keys = sorted((r["image_id"], r["model_id"]) for r in every.to_pylist())
    assert keys == [("a", "m1"), ("a", "m2"), ("b", "m1"), ("c", "m1")]
    first = read_predictions(
        store, "2026-03-01", "m1", columns=["image_id", "score", "lease_token"]
    )
    assert first.to_pylist() == [
        {"image_id": i, "score": 0.5, "lease_token": "tok-1"} for i in "abc"
    ]  # the copies written first, on the night they were first written
    assert read_predictions(store, "2026-03-02", "m1").num_rows == 0
    assert read_predictions(store, "2026-03-02").column("model_id").to_pylist() == ["m2"]
    # What counts rows sees distinct images: the subjects' cells, the flagged ones.
    night = read_predictions(store, "2026-03-01", "m1", columns=["subject_id", "predicted_label"])
    assert night.num_rows == 3 and night.column("predicted_label").to_pylist() == ["hem"] * 3
    assert scored_image_ids(store, "m1") == {"a", "b", "c"}
    assert scored_image_ids(store, "m2") == {"a"}


def test_reading_predictions_of_an_empty_store_keeps_the_columns_asked_for(tmp_path):
    store = open_location(str(tmp_path))
    assert read_predictions(store).schema.equals(PREDICTION_SCHEMA)
    empty = read_predictions(store, "2026-03-01", "m1", columns=["subject_id", "score"])
    assert empty.num_rows == 0 and empty.column_names == ["subject_id", "score"]
