"""A calibrated ALL risk score and a screening threshold, chosen on validation data only.

The classifier is wrapped in scikit-learn's CalibratedClassifierCV: on each of k folds of the
training images it is fitted on the other folds and a sigmoid (Platt) map from its score to a
probability is fitted on the held-out fold; the saved model averages the k calibrated copies. The
same held-out folds give every training image an out-of-fold probability, on which the threshold
is chosen for a target sensitivity; the test split is never looked at until the final numbers.
Folds are grouped by subject when the catalog has subject ids, so the threshold is chosen on
patients the model has not seen, as in a real sweep.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics import brier_score_loss
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from leukoflow import choices
from leukoflow.errors import LeukoflowError
from leukoflow.learn import evaluate, train
from leukoflow.vocabulary import THRESHOLD_RULE
from leukoflow.vocabulary import flagged as flag_rule

DEFAULT_CALIBRATION_FOLDS = 5
METHOD = "sigmoid"  # Platt scaling: two parameters, stable on the few hundred cells of a fold
RELIABILITY_BINS = 10
# How a score is read against the threshold; recorded with the model so scoring applies the same.


def check_target_sensitivity(value: float) -> float:
    if not 0 < value <= 1:
        raise LeukoflowError(f"--target-sensitivity must be in (0, 1], got {value}")
    return float(value)


def fit_calibrated(
    classifier: str,
    x: np.ndarray,
    y: np.ndarray,
    folds: train.Folds,
    seed: int = choices.DEFAULT_SEED,
) -> Pipeline:
    """Standardise, then `classifier` calibrated on the held-out side of each fold."""
    estimator = train.make_classifier(classifier, seed).named_steps["clf"]
    calibrated = CalibratedClassifierCV(
        estimator, method=METHOD, cv=folds.indices, ensemble=True, n_jobs=_fold_workers(folds)
    )
    # Folds fit in joblib's worker processes, not threads: liblinear and libsvm draw from one
    # process-wide random generator and fit without the GIL, so folds fitted in threads race on
    # it and the same command gives a different model each time (by up to 6e-6 in probability).
    # joblib memory-maps `x` to the workers rather than copying it.
    return Pipeline([("scale", StandardScaler()), ("clf", calibrated)]).fit(x, y)


def _fold_workers(folds: train.Folds) -> int:
    return max(1, min(folds.k, os.cpu_count() or 1))


def out_of_fold_probabilities(model: Pipeline, x: np.ndarray, folds: train.Folds) -> np.ndarray:
    """Each training image's calibrated ALL probability from the fold copy that held it out."""
    scaled = model[:-1].transform(x)
    # calibrated_classifiers_ follows the order of the cv splits it was given.
    pairs = model[-1].calibrated_classifiers_
    probabilities = np.full(len(x), np.nan)
    for pair, (_, held_out) in zip(pairs, folds.indices, strict=True):
        probabilities[held_out] = pair.predict_proba(scaled[held_out])[:, 1]
    return probabilities


def choose_threshold(y: np.ndarray, scores: np.ndarray, target_sensitivity: float) -> dict:
    """The highest threshold that still flags `target_sensitivity` of the ALL cells given."""
    check_target_sensitivity(target_sensitivity)
    positives = np.sort(np.asarray(scores)[np.asarray(y) == 1])[::-1]
    if positives.size == 0:
        raise LeukoflowError("no ALL cells in the validation data: cannot choose a threshold")
    # The k-th highest ALL score flags at least k ALL cells; the small slack keeps 0.95 * 20
    # at 19 despite floating point.
    needed = max(1, math.ceil(target_sensitivity * positives.size - 1e-9))
    threshold = float(positives[needed - 1])
    return {"threshold": threshold, **operating_point(y, scores, threshold)}


def operating_point(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Sensitivity and specificity for ALL when `score >= threshold` flags a cell."""
    y = np.asarray(y)
    flagged = flag_rule(np.asarray(scores), threshold)
    positives, negatives = y == 1, y == 0
    return {
        "sensitivity": _rate(flagged[positives]),
        "specificity": _rate(~flagged[negatives]),
        "flagged_fraction": _rate(flagged),
        "n_all": int(positives.sum()),
        "n_hem": int(negatives.sum()),
    }


def _rate(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def reliability(y: np.ndarray, probabilities: np.ndarray, n_bins: int = RELIABILITY_BINS) -> dict:
    """Reliability-diagram points: per non-empty probability bin, mean prediction vs. ALL share."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)  # p == 1.0 goes in the top bin
    points = {"mean_predicted": [], "fraction_all": [], "count": []}
    for b in range(n_bins):
        members = bins == b
        if members.any():
            points["mean_predicted"].append(float(p[members].mean()))
            points["fraction_all"].append(float(y[members].mean()))
            points["count"].append(int(members.sum()))
    return points


def brier_score(y: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean squared error of the ALL probability (0 is perfect; 0.25 is a constant 0.5)."""
    return float(brier_score_loss(np.asarray(y), np.asarray(probabilities), pos_label=1))


@dataclass
class CalibratedModel:
    """The calibrated model to save, its threshold, and what a report needs to show them."""

    model: Pipeline
    threshold: float
    test_probabilities: np.ndarray
    summary: dict  # JSON-ready: method, folds, validation and test operating points, Brier
    # Out-of-fold probabilities of the training cells: what later choices (the patient-level
    # threshold) may be fitted on without touching the test side.
    validation_probabilities: np.ndarray | None = None


def calibrate_and_choose_threshold(
    classifier: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    subjects_train: list[str | None],
    x_test: np.ndarray,
    y_test: np.ndarray,
    target_sensitivity: float = choices.DEFAULT_TARGET_SENSITIVITY,
    n_folds: int = DEFAULT_CALIBRATION_FOLDS,
    seed: int = choices.DEFAULT_SEED,
) -> CalibratedModel:
    """Calibrate on training folds, choose the threshold out of fold, then measure on test."""
    check_target_sensitivity(target_sensitivity)
    folds = train.kfold(y_train, subjects_train, n_folds, seed)
    model = fit_calibrated(classifier, x_train, y_train, folds, seed)
    validation_probabilities = out_of_fold_probabilities(model, x_train, folds)
    chosen = choose_threshold(y_train, validation_probabilities, target_sensitivity)
    threshold = chosen.pop("threshold")
    test_probabilities = model.predict_proba(x_test)[:, 1]
    flagged = flag_rule(test_probabilities, threshold).astype(np.int64)
    summary = {
        "method": METHOD,
        "folds": folds.k,
        "grouping": folds.grouping,
        "grouping_note": folds.note,
        "target_sensitivity": target_sensitivity,
        "threshold": threshold,
        "threshold_rule": THRESHOLD_RULE,
        "validation": {
            **chosen,
            "brier": brier_score(y_train, validation_probabilities),
            "reliability": reliability(y_train, validation_probabilities),
        },
        "test": {
            **operating_point(y_test, test_probabilities, threshold),
            "brier": brier_score(y_test, test_probabilities),
            "reliability": reliability(y_test, test_probabilities),
            "metrics": evaluate.compute_metrics(y_test, flagged, test_probabilities),
        },
    }
    return CalibratedModel(model, threshold, test_probabilities, summary, validation_probabilities)
