"""bench/cm_validate.py's feature cache, the record behind docs/color_morphology.md's rounds: the
raw vectors are the shipped ones, and the per-subject normalisation pools each subject's own
cells (round 4), on a handful of real cells."""

import os
from pathlib import Path

import numpy as np

from bench import cm_validate
from leukoflow.tasks.color_morphology import colour_moments, extract_features, feature_blocks

CNMC = Path(os.environ["LEUKOFLOW_CNMC"])  # set by tests/conftest.py


def _two_subjects() -> list[dict[str, str]]:
    """The cells of the first two subjects (one ALL, one normal) that have two or more."""
    rows = cm_validate.read_manifests([CNMC / "MANIFEST.csv"])
    chosen = []
    for label in ("all", "hem"):
        of_label = [r for r in rows if r["label"] == label]
        subject = next(
            r["subject"] for r in of_label if sum(o["subject"] == r["subject"] for o in rows) > 1
        )
        chosen += [r for r in of_label if r["subject"] == subject]
    return chosen


def test_the_cache_holds_the_shipped_vectors_and_per_subject_normalised_ones(tmp_path):
    rows = _two_subjects()
    assert len({r["subject"] for r in rows}) == 2 and len(rows) >= 4
    blocks = cm_validate.extract_all(rows, tmp_path, ("raw", "subject"))
    pixels = [cm_validate._pixels(r) for r in rows]
    raw = blocks["raw"]["base"].astype(np.float32)
    assert np.array_equal(raw, np.array([extract_features(p) for p in pixels]))

    for subject in {r["subject"] for r in rows}:
        mine = [i for i, r in enumerate(rows) if r["subject"] == subject]
        pooled = colour_moments(pixels[mine[0]])
        for i in mine[1:]:
            pooled = pooled + colour_moments(pixels[i])
        for i in mine:
            expected = feature_blocks(pixels[i], False, reference=pooled.reference())
            assert np.array_equal(blocks["subject"]["base"][i], expected["base"])
    # Not the same as normalising each cell on its own, nor as no normalisation.
    own = np.array([feature_blocks(p, True)["base"] for p in pixels])
    assert not np.allclose(blocks["subject"]["base"], own)
    assert not np.allclose(blocks["subject"]["base"], blocks["raw"]["base"])

    again = cm_validate.extract_all(rows, tmp_path, ("subject", "raw"))  # from the cache
    for mode in ("raw", "subject"):
        for name, values in blocks[mode].items():
            assert np.array_equal(again[mode][name], values)
