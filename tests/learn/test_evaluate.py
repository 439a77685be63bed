"""Metrics for the ALL-vs-hem classifier, checked against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from leukoflow.learn.evaluate import (
    NEGATIVE_LABEL,
    POSITIVE_LABEL,
    bootstrap_interval,
    compute_metrics,
    labels_to_int,
    pr_points,
    roc_points,
)

# Hand-built example: 10 cells, tp=3, fn=1, fp=2, tn=4.
Y_TRUE = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
Y_PRED = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
# Scores: positives 0.9, 0.8, 0.7, 0.2; negatives 0.6, 0.75, 0.1, 0.3, 0.05, 0.4.
SCORES = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.75, 0.1, 0.3, 0.05, 0.4])


def test_labels_to_int_maps_all_and_hem() -> None:
    assert POSITIVE_LABEL == "all" and NEGATIVE_LABEL == "hem"
    out = labels_to_int(["all", "hem", "hem", "all"])
    assert out.tolist() == [1, 0, 0, 1]
    assert labels_to_int([]).tolist() == []


@pytest.mark.parametrize("bad", [["all", "ALL"], ["hem", None], ["blast"], ["all", ""]])
def test_labels_to_int_rejects_unknown(bad: list) -> None:
    with pytest.raises(ValueError, match="unknown label"):
        labels_to_int(bad)


def test_compute_metrics_hand_computed() -> None:
    m = compute_metrics(Y_TRUE, Y_PRED, SCORES)
    assert m["confusion_matrix"] == {"labels": ["hem", "all"], "matrix": [[4, 2], [1, 3]]}
    assert m["n"] == 10
    assert m["support"] == {"all": 4, "hem": 6}
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # 2/3
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    f1_hem = 2 * 4 / (2 * 4 + 1 + 2)
    assert m["f1_macro"] == pytest.approx((2 / 3 + f1_hem) / 2)
    assert m["f1_weighted"] == pytest.approx((2 / 3 * 4 + f1_hem * 6) / 10)
    # AUC by counting positive/negative pairs ranked correctly: 4 * 6 = 24 pairs.
    # 0.9, 0.8 beat all 6 negatives; 0.7 beats 5 (not 0.75); 0.2 beats 2 (0.1, 0.05) -> 19/24.
    assert m["roc_auc"] == pytest.approx(19 / 24)


def test_compute_metrics_matches_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 2, 200)
    y_pred = np.where(rng.random(200) < 0.8, y_true, 1 - y_true)
    m = compute_metrics(y_true, y_pred)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))


def test_roc_auc_none_without_scores_or_with_one_class() -> None:
    assert compute_metrics(Y_TRUE, Y_PRED, None)["roc_auc"] is None
    one_class = np.ones(5, dtype=int)
    m = compute_metrics(one_class, np.array([1, 1, 0, 1, 1]), np.linspace(0, 1, 5))
    assert m["roc_auc"] is None
    assert m["confusion_matrix"]["matrix"] == [[0, 0], [1, 4]]
    assert m["support"] == {"all": 5, "hem": 0}
    assert m["recall"] == pytest.approx(0.8)


def test_zero_division_gives_zero() -> None:
    # Nothing predicted as ALL: precision and F1 for ALL are undefined -> 0, no exception.
    m = compute_metrics(np.array([1, 0, 1, 0]), np.zeros(4, dtype=int))
    assert m["precision"] == 0.0
    assert m["f1"] == 0.0
    assert m["recall"] == 0.0
    assert m["accuracy"] == 0.5


def test_compute_metrics_is_plain_json() -> None:
    m = compute_metrics(Y_TRUE.astype(np.int32), Y_PRED.astype(np.int8), SCORES.astype(np.float32))
    round_tripped = json.loads(json.dumps(m))
    assert round_tripped == m

    def walk(value: object) -> None:
        assert value is None or type(value) in (int, float, str, bool, list, dict)
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(m)


def test_compute_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        compute_metrics(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError):
        compute_metrics(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError):
        compute_metrics(np.array([0, 1]), np.array([0, 1]), np.array([0.5]))


def test_roc_and_pr_points() -> None:
    roc = roc_points(Y_TRUE, SCORES)
    assert roc["fpr"][0] == 0.0 and roc["tpr"][0] == 0.0
    assert roc["fpr"][-1] == 1.0 and roc["tpr"][-1] == 1.0
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["thresholds"])
    assert np.all(np.diff(roc["fpr"]) >= 0)
    # Trapezoid area under the points is the AUC.
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(19 / 24)
    json.dumps(roc, allow_nan=False)  # the +inf threshold must not leak into JSON

    pr = pr_points(Y_TRUE, SCORES)
    assert len(pr["precision"]) == len(pr["recall"]) == len(pr["thresholds"]) + 1
    assert pr["recall"][0] == 1.0 and pr["precision"][-1] == 1.0
    json.dumps(pr, allow_nan=False)


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, n)
    scores = y_true + rng.normal(0, 0.8, n)
    return y_true, (scores > 0.5).astype(int), scores


@pytest.mark.parametrize("metric", ["accuracy", "f1", "balanced_accuracy", "roc_auc"])
def test_bootstrap_contains_point_and_narrows(metric: str) -> None:
    widths = []
    for n in (60, 2000):
        y_true, y_pred, scores = _synthetic(n, seed=1)
        point = compute_metrics(y_true, y_pred, scores)[metric]
        low, high = bootstrap_interval(y_true, y_pred, scores, metric, n_boot=300, seed=0)
        assert low <= point <= high
        assert 0.0 <= low < high <= 1.0
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_bootstrap_is_reproducible_and_alpha_matters() -> None:
    y_true, y_pred, scores = _synthetic(200, seed=2)
    a = bootstrap_interval(y_true, y_pred, scores, "accuracy", n_boot=200, seed=7)
    assert a == bootstrap_interval(y_true, y_pred, scores, "accuracy", n_boot=200, seed=7)
    wide = bootstrap_interval(y_true, y_pred, scores, "accuracy", n_boot=200, seed=7, alpha=0.01)
    narrow = bootstrap_interval(y_true, y_pred, scores, "accuracy", n_boot=200, seed=7, alpha=0.5)
    assert wide[0] <= a[0] <= narrow[0] and narrow[1] <= a[1] <= wide[1]
    assert all(isinstance(v, float) for v in a)


def test_bootstrap_roc_auc_skips_one_class_resamples() -> None:
    # One positive among 8 cells: many resamples miss it, but those are skipped, not crashed on.
    y_true = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.95])
    low, high = bootstrap_interval(y_true, y_true, scores, "roc_auc", n_boot=200)
    assert 0.0 <= low <= 6 / 7 <= high <= 1.0


def test_a_subject_bootstrap_skips_draws_without_the_class_it_measures() -> None:
    # Three test subjects, as a 90/10 subject split of the pool gives: two ALL patients whose
    # cells are all flagged, one normal donor. A third of all draws hold no ALL patient; scored
    # as sensitivity 0 they once gave this perfect sensitivity the interval [0, 1].
    y_true = np.array([1] * 10 + [0] * 5)
    y_pred = y_true.copy()
    subjects = ["a"] * 5 + ["b"] * 5 + ["n"] * 5
    assert bootstrap_interval(y_true, y_pred, None, "recall", 500, groups=subjects) == (1.0, 1.0)
    # Precision likewise skips the draws without a flagged cell (the normal donor alone).
    assert bootstrap_interval(y_true, y_pred, None, "precision", 500, groups=subjects) == (1.0, 1.0)
    # Nothing flagged at all: precision is 0 by convention, and so is its interval.
    nothing = np.zeros_like(y_true)
    assert bootstrap_interval(y_true, nothing, None, "precision", 50, groups=subjects) == (0, 0)


def test_bootstrap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_interval(Y_TRUE, Y_PRED, SCORES, "confusion_matrix")
    with pytest.raises(ValueError, match="scores"):
        bootstrap_interval(Y_TRUE, Y_PRED, None, "roc_auc")
    with pytest.raises(ValueError, match="undefined in every bootstrap resample"):
        bootstrap_interval(np.ones(4, int), np.ones(4, int), np.ones(4), "roc_auc", n_boot=10)
