"""The fixed protocol of docs/results.md: subject-grouped folds, the paper's SVM, intervals."""

import numpy as np
import pytest

from leukoflow.errors import LeukoflowError
from leukoflow.learn.train import kfold
from leukoflow.learn.validate import METRICS, cross_validate, markdown_row, patient_markdown_row


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


def test_patient_level_counts_every_subject_once_with_its_cells():
    x, y, subjects = _cells(14, 5, signal=1.0, seed=3)
    result = cross_validate(x, y, subjects, n_boot=200)
    level = result["patient_level"]
    assert level["n_patients"] == len(set(subjects)) == 14
    assert level["n_cells"] == len(y) == sum(p["n_cells"] for p in level["patients"])
    assert sorted(p["subject_id"] for p in level["patients"]) == sorted(set(subjects))
    assert sum(f["n_patients"] for f in level["per_fold"]) == 14
    assert level["support"] == {"all": 7, "hem": 7} and level["excluded"] == {}
    (tn, fp), (fn, tp) = level["confusion_matrix"]["matrix"]
    assert tn + fp + fn + tp == 14
    for key in ("sensitivity", "specificity", "balanced_accuracy"):
        m = level["metrics"][key]
        assert m["low"] <= m["pooled"] <= m["high"]
    for p in level["patients"]:
        assert p["score"] == p["n_flagged"] / p["n_cells"]
        assert p["flagged"] == (p["score"] >= p["threshold"])
    assert "pooled" in patient_markdown_row("x", result)


def test_separable_patients_are_all_decided_correctly():
    x, y, subjects = _cells(12, 4, signal=20.0)
    level = cross_validate(x, y, subjects, n_boot=100)["patient_level"]
    assert all(p["correct"] for p in level["patients"])
    assert level["metrics"]["balanced_accuracy"]["pooled"] == 1.0


def test_a_folds_patient_threshold_never_sees_its_held_out_cells():
    x, y, subjects = _cells(15, 4, signal=0.8, seed=5)
    first = cross_validate(x, y, subjects, n_boot=1)
    folds = kfold(y, subjects, 5, 0)
    _, held_out = folds.indices[0]
    # Change only fold 0's held-out cells (the folds depend on labels and subjects alone).
    changed = x.copy()
    changed[held_out] = np.random.default_rng(9).normal(size=changed[held_out].shape) * 5
    second = cross_validate(changed, y, subjects, n_boot=1)
    before = [f["patient_threshold"] for f in first["patient_level"]["per_fold"]]
    after = [f["patient_threshold"] for f in second["patient_level"]["per_fold"]]
    assert after[0] == before[0]  # fold 0 trains on the same cells
    assert after[1:] != before[1:]  # the other folds train on the changed cells
