import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leukoflow.tasks.storage import open_location
from leukoflow.tasks.tables import (
    CATALOG_SCHEMA,
    feature_schema,
    featurised_ids,
    read_catalog,
    read_features,
    write_catalog,
    write_features,
)


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
    row = {field.name: None for field in CATALOG_SCHEMA}
    row.update(image_id="x", uri="/a.bmp", dataset="d", status="ok")
    write_catalog(store, "d", [row])
    table = read_catalog(store, "d")
    assert table.schema.equals(CATALOG_SCHEMA)
    assert table.column("image_id").to_pylist() == ["x"]
