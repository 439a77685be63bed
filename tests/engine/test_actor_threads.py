"""Threads per backbone actor: the actors of a node together can use all of its cores."""

import pytest
from datapaths import CNMC

from leukoflow.engine.actors import ActorPlan


@pytest.mark.parametrize(
    ("num_cpus", "threads"), [(0.666, 1), (0.999, 1), (1.332, 2), (1.999, 2), (5.332, 6)]
)
def test_the_cpu_share_is_rounded_up(num_cpus, threads):
    # 3 actors on 2, 3, 4, 6 and 16 cores (ActorPlan leaves 0.001 of each share free).
    assert ActorPlan(num_cpus=num_cpus, num_gpus=0).threads == threads


def test_the_actor_gets_its_threads_unless_the_driver_set_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert ActorPlan(1.332, 0).env_vars() == {"OMP_NUM_THREADS": "2"}
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert ActorPlan(1.332, 0).env_vars() == {"OMP_NUM_THREADS": "4"}


@pytest.mark.integration
def test_the_pool_extracts_then_gives_maps_from_the_same_actor(ray_local, tmp_path):
    """Explanations reuse the extraction's actor (no second network), and its bf16 maps average
    to the vectors it stored."""
    import hashlib

    import numpy as np

    from leukoflow.engine.actors import BackbonePool, extract_features
    from leukoflow.features.images import decode_image, resize_pixels
    from leukoflow.recipe import Compute, FeatureRecipe
    from leukoflow.store.storage import open_location
    from leukoflow.store.tables import read_features

    files = sorted(CNMC.glob("*/*.bmp"))[:3]
    uris = {hashlib.sha256(f.read_bytes()).hexdigest(): str(f) for f in files}
    ids = list(uris)
    recipe = FeatureRecipe(("vgg16",), weights="none", image_size=32, precision="bf16")
    compute = Compute(batch_size=2)
    store = open_location(str(tmp_path / "store"))
    pool = BackbonePool(recipe, compute)
    try:
        result = extract_features(store, uris, {"vgg16": ids}, recipe, compute, pool=pool)
        pid = pool.loaded["vgg16"]["pid"]
        pixels = np.stack([resize_pixels(decode_image(f.read_bytes()).pixels, 32) for f in files])
        maps = pool.feature_maps(["vgg16", "color_morphology"], pixels)
        assert pool.loaded["vgg16"]["pid"] == pid  # the same process: nothing was rebuilt
    finally:
        pool.close()
    assert result.computed == {"vgg16": 3} and result.rejected == {}
    assert list(maps) == ["vgg16"]  # a hand-crafted extractor has no map
    assert maps["vgg16"].shape == (3, 1, 1, 512)  # 32 px through VGG16's five poolings
    assert recipe.vector_key("vgg16")[0] == "random-seed0+bf16"
    stored = read_features(store, "vgg16", *recipe.vector_key("vgg16"), ids)
    vectors = np.stack([stored[i] for i in ids])
    np.testing.assert_allclose(maps["vgg16"].mean(axis=(1, 2)), vectors, rtol=1e-6)
