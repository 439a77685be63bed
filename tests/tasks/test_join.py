import numpy as np

from leukoflow.tasks.join import concatenate, join_features
from leukoflow.tasks.storage import open_location
from leukoflow.tasks.tables import write_features


def test_vectors_are_concatenated_in_the_given_order():
    vectors = {
        "a": {"x": np.array([1.0, 2.0]), "y": np.array([3.0, 4.0])},
        "b": {"x": np.array([9.0]), "y": np.array([8.0])},
    }
    joined = concatenate(["y", "x"], vectors, ["b", "a"])
    assert joined.image_ids == ["y", "x"] and joined.dims == [1, 2]
    np.testing.assert_array_equal(joined.matrix, [[8, 3, 4], [9, 1, 2]])


def test_an_image_missing_a_backbone_is_reported_not_dropped_silently():
    vectors = {"a": {"x": np.ones(2), "y": np.ones(2)}, "b": {"x": np.ones(1)}}
    joined = concatenate(["x", "y"], vectors, ["a", "b"])
    assert joined.image_ids == ["x"]
    assert joined.missing == {"y": ["b"]}


def test_join_reads_the_store(tmp_path):
    store = open_location(str(tmp_path))
    write_features(store, "vgg16", "w", 32, ["x", "y"], np.ones((2, 3), np.float32))
    write_features(store, "color_morphology", "cm", 0, ["x", "y"], np.zeros((2, 5), np.float32))
    joined = join_features(
        store,
        ["x", "y"],
        ["vgg16", "color_morphology"],
        {"vgg16": "w", "color_morphology": "cm"},
        32,
    )
    assert joined.matrix.shape == (2, 8) and joined.matrix.dtype == np.float32
    np.testing.assert_array_equal(joined.matrix[0], [1, 1, 1, 0, 0, 0, 0, 0])
