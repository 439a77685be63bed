import numpy as np

from leukoflow.features.join import concatenate, featurised_images, join_features
from leukoflow.recipe import FeatureRecipe
from leukoflow.store.storage import open_location
from leukoflow.store.tables import write_features


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
    recipe = FeatureRecipe(("vgg16", "color_morphology"), weights="none", image_size=32)
    cm = recipe.weights_ids["color_morphology"]
    vgg = np.ones((2, 512), np.float32)
    write_features(store, "vgg16", "random-seed0", 32, ["x", "y"], vgg)
    # The full-resolution extractor's vectors are keyed by size 0, whatever the recipe's size.
    cm_dim = recipe.dims[1]
    write_features(store, "color_morphology", cm, 0, ["x", "y"], np.zeros((2, cm_dim), np.float32))
    joined = join_features(store, ["x", "y"], recipe)
    assert joined.matrix.shape == (2, 512 + cm_dim) and joined.matrix.dtype == np.float32
    assert joined.matrix[0, :512].sum() == 512 and not joined.matrix[0, 512:].any()
    assert featurised_images(store, recipe) == {"x", "y"}
    # Vectors of another recipe (seed) are not this recipe's.
    other = FeatureRecipe(("vgg16",), weights="none", image_size=32, seed=1)
    assert featurised_images(store, other) == set()
