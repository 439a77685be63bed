"""The fixed protocol of docs/results.md: subject-grouped folds, the paper's SVM, intervals."""

import numpy as np
import pytest

from leukoflow.errors import LeukoflowError
from leukoflow.tasks.validate import METRICS, cross_validate, markdown_row


def _cells(n_subjects: int, per_subject: int, signal: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    subjects = [f"S{s}" for s in range(n_subjects) for _ in range(per_subject)]
    y = np.array([s % 2 for s in range(n_subjects) for _ in range(per_subject)])
    x = rng.normal(size=(len(y), 6)) + signal * y[:, None]
    return x, y, subjects


def test_separable_cells_score_one_with_degenerate_intervals():
    x, y, subjects = _cells(12, 3, signal=20.0)
    result = cross_validate(x, y, subjects, n_boot=200)
    assert result["folds"] == 5 and len(result["per_fold"]) == 5
    assert sum(f["n"] for f in result["per_fold"]) == len(y)
    for key in METRICS:
        m = result["metrics"][key]
        assert m["mean"] == m["pooled"] == m["low"] == m["high"] == 1.0


def test_noise_gives_wide_intervals_around_chance():
    x, y, subjects = _cells(20, 4, signal=0.0)
    result = cross_validate(x, y, subjects, n_boot=300)
    for key in ("accuracy", "balanced_accuracy", "roc_auc"):
        m = result["metrics"][key]
        assert m["low"] < 0.6 and m["high"] > 0.4 and m["high"] - m["low"] > 0.1
        assert m["low"] <= m["pooled"] <= m["high"]
    assert "±" in markdown_row("noise", result)


def test_without_subject_ids_the_protocol_refuses():
    x, y, _ = _cells(12, 3, signal=1.0)
    with pytest.raises(LeukoflowError, match="subject-grouped"):
        cross_validate(x, y, [None] * len(y))
