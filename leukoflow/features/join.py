"""Join: one feature vector per image, the backbones concatenated in a fixed, recorded order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leukoflow.recipe import FeatureRecipe
from leukoflow.store.storage import Location
from leukoflow.store.tables import featurised_ids, read_features


@dataclass
class JoinedFeatures:
    image_ids: list[str]
    matrix: np.ndarray  # (n_images, sum of the backbones' dims), float32
    backbones: list[str]  # concatenation order
    dims: list[int]
    missing: dict[str, list[str]]  # image_id -> backbones without a vector (left out, reported)


def concatenate(
    image_ids: list[str], vectors: dict[str, dict[str, np.ndarray]], backbones: list[str]
) -> JoinedFeatures:
    """Concatenate per-backbone vectors for images that have all of them; report the rest."""
    dims = []
    for name in backbones:
        sample = next(iter(vectors[name].values()), None)
        dims.append(0 if sample is None else len(sample))
    complete, missing = [], {}
    for image_id in image_ids:
        absent = [name for name in backbones if image_id not in vectors[name]]
        if absent:
            missing[image_id] = absent
        else:
            complete.append(image_id)
    if complete:
        matrix = np.hstack(
            [np.stack([vectors[name][i] for i in complete]) for name in backbones]
        ).astype(np.float32, copy=False)
    else:
        matrix = np.zeros((0, sum(dims)), np.float32)
    return JoinedFeatures(complete, matrix, list(backbones), dims, missing)


def join_features(store: Location, image_ids: list[str], recipe: FeatureRecipe) -> JoinedFeatures:
    """Read each backbone's vectors of `recipe` for `image_ids` and concatenate them."""
    vectors = {
        name: read_features(store, name, *recipe.vector_key(name), image_ids)
        for name in recipe.backbones
    }
    return concatenate(image_ids, vectors, list(recipe.backbones))


def featurised_images(store: Location, recipe: FeatureRecipe) -> set[str]:
    """The images holding a vector of every backbone of `recipe`, read from the features table."""
    held: set[str] | None = None
    for name in recipe.backbones:
        ids = featurised_ids(store, name, *recipe.vector_key(name))
        held = ids if held is None else held & ids
    return held or set()


def missing_vectors(
    store: Location, recipe: FeatureRecipe, image_ids: list[str]
) -> dict[str, list[str]]:
    """Per backbone with work, the ids (in the given order) without a vector of `recipe`."""
    todo = {}
    for name in recipe.backbones:
        done = featurised_ids(store, name, *recipe.vector_key(name))
        missing = [i for i in image_ids if i not in done]
        if missing:
            todo[name] = missing
    return todo
