"""What the command-line sweep tests share: a store with a tiny trained model."""

from __future__ import annotations

import pytest

from leukoflow.features.synthetic import make_synthetic_dataset
from leukoflow.recipe import FeatureRecipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local, prefect_harness) -> dict:
    """A store with a model trained on 24 synthetic cells (vgg16 at 32 px, random weights), and
    those cells; per test module (a test copies the store before it changes it)."""
    from leukoflow.flows.run import run_pipeline

    work = tmp_path_factory.mktemp("trained")
    train = make_synthetic_dataset(
        work / "train", n_subjects=6, cells_per_subject=4, image_side=64, seed=0
    )
    store = work / "store"
    run_pipeline(
        images=str(train),
        store=str(store),
        recipe=FeatureRecipe(("vgg16",), weights="none", image_size=32),
        examples_per_kind=0,
    )
    return {"store": store, "train": train}
