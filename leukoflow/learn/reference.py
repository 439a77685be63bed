"""The reference a model keeps of its own scores, which nightly drift compares against.

Written by training (learn/fit.py, into model.json) and read by the sweep (scoring/score.py): one
owner of its shape, in neither room. Plain numpy.
"""

from __future__ import annotations

import numpy as np

SCORE_QUANTILES = 21  # points of the score reference's distribution kept in model.json


def score_reference(scores: np.ndarray, score_kind: str, split: str) -> dict:
    """What model.json keeps of a score distribution: moments and quantiles."""
    values = np.asarray(scores, dtype=np.float64)
    return {
        "score_kind": score_kind,
        "split": split,
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "quantiles": np.quantile(values, np.linspace(0, 1, SCORE_QUANTILES)).tolist(),
    }
