"""Subject-grouped cross-validation of one feature set and one classifier.

The fixed protocol of docs/results.md: stratified k folds grouped by subject (no patient on both
sides), the linear SVM as the paper has it unless another classifier is named, at two levels:

* **cells**: accuracy, balanced accuracy, F1 and ROC AUC, each as the mean +- std over folds
  plus a 95% interval that resamples whole subjects of the pooled out-of-fold predictions;
* **patients** (tasks/patient.py): a cell is flagged at the classifier's own threshold (decision
  value >= 0 for the SVMs, probability >= 0.5 otherwise); a patient's score is the fraction of
  its cells flagged. The patient threshold of each fold is chosen on that fold's training
  patients only, from out-of-fold cell scores of an inner subject-grouped k-fold on the training
  side (in-sample scores would be near-perfectly separated). Held-out patients of every fold are
  decided with their fold's threshold and pooled: sensitivity, specificity and balanced accuracy
  with the mean +- std over folds and a patient-bootstrap interval, and the cell counts behind
  every decision.

Plain functions, no engines.
"""

from __future__ import annotations

import numpy as np

from leukoflow.errors import LeukoflowError
from leukoflow.tasks import evaluate, patient, train

METRICS = ("accuracy", "balanced_accuracy", "f1", "roc_auc")
DEFAULT_FOLDS = 5
DEFAULT_BOOTSTRAP = 1000
# The classifier's own decision rule: an SVM's decision value is 0 on its boundary.
CELL_THRESHOLDS = {"decision_value": 0.0, "probability": 0.5}


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    subjects: list[str | None],
    classifier: str = train.DEFAULT_CLASSIFIER,
    n_folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    n_boot: int = DEFAULT_BOOTSTRAP,
    min_cells: int = patient.DEFAULT_MIN_CELLS,
) -> dict:
    """Per-fold and pooled metrics, cell and patient level, with subject-bootstrap intervals;
    JSON-ready. `patient_level.patients` holds raw subject ids: pseudonymise before publishing."""
    folds = _subject_folds(y, subjects, n_folds, seed, "")
    y = np.asarray(y, dtype=np.int64)
    groups = np.asarray(subjects, dtype=object)
    labels_of, excluded = patient.patient_labels(subjects, y)
    predicted = np.zeros(len(y), np.int64)
    scores = np.zeros(len(y), np.float64)
    per_fold, per_fold_patients, decisions = [], [], {}
    for train_rows, test_rows in folds.indices:
        model = train.fit(classifier, x[train_rows], y[train_rows], seed, groups[train_rows])
        scores[test_rows], kind = train.decision_scores(model, x[test_rows])
        cell_threshold = CELL_THRESHOLDS[kind]
        predicted[test_rows] = scores[test_rows] >= cell_threshold
        metrics = evaluate.compute_metrics(y[test_rows], predicted[test_rows], scores[test_rows])
        per_fold.append({key: metrics[key] for key in METRICS} | {"n": metrics["n"]})

        inner = _inner_scores(x[train_rows], y[train_rows], groups[train_rows], classifier,
                              n_folds, seed)  # fmt: skip
        train_patients = patient.patient_scores(list(groups[train_rows]), inner, cell_threshold)
        threshold = patient.choose_patient_threshold(train_patients, labels_of)
        fold_decisions = patient.decide(
            patient.patient_scores(list(groups[test_rows]), scores[test_rows], cell_threshold),
            threshold,
            min_cells,
        )
        fold_patients = patient.patient_metrics(fold_decisions, labels_of, n_boot=0)
        per_fold_patients.append(
            {key: fold_patients["metrics"][key]["value"] for key in patient.PATIENT_METRICS}
            | {
                "n_patients": fold_patients["n_patients"],
                "n_cells": fold_patients["n_cells"],
                "patient_threshold": threshold,
                "n_training_patients": sum(s in labels_of for s in train_patients),
            }
        )
        decisions.update(fold_decisions)

    pooled = evaluate.compute_metrics(y, predicted, scores)
    summary = {}
    for key in METRICS:
        low, high = evaluate.bootstrap_interval(
            y, predicted, scores, key, n_boot=n_boot, seed=seed, groups=subjects
        )
        values = [fold[key] for fold in per_fold if fold[key] is not None]
        summary[key] = {**_spread(values), "pooled": pooled[key], "low": low, "high": high}

    pooled_patients = patient.patient_metrics(decisions, labels_of, n_boot=n_boot, seed=seed)
    patient_summary = {}
    for key in patient.PATIENT_METRICS:
        m = pooled_patients["metrics"][key]
        values = [fold[key] for fold in per_fold_patients if fold[key] is not None]
        patient_summary[key] = {**_spread(values), "pooled": m["value"], "low": m["low"],
                                "high": m["high"]}  # fmt: skip
    return {
        "classifier": classifier,
        "folds": folds.k,
        "seed": seed,
        "n_boot": n_boot,
        "n_images": int(len(y)),
        "n_subjects": len(set(subjects)),
        "metrics": summary,
        "per_fold": per_fold,
        "confusion_matrix": pooled["confusion_matrix"],
        "patient_level": {
            "definition": (
                "patient score = fraction of the patient's cells with a cell score at or above "
                "the classifier's own threshold; patient threshold per fold maximises balanced "
                "accuracy over the training patients' out-of-fold scores (inner subject-grouped "
                "k-fold); held-out patients pooled over folds"
            ),
            "cell_threshold": cell_threshold,
            "min_cells": min_cells,
            "metrics": patient_summary,
            "per_fold": per_fold_patients,
            **{k: v for k, v in pooled_patients.items() if k != "metrics"},
            "excluded": excluded,
        },
    }


def _subject_folds(y, subjects, n_folds: int, seed: int, where: str) -> train.Folds:
    folds = train.kfold(y, list(subjects), n_folds, seed)
    if folds.grouping != "subject":
        raise LeukoflowError(f"subject-grouped folds are not possible{where}: {folds.note}")
    return folds


def _inner_scores(
    x: np.ndarray, y: np.ndarray, subjects: np.ndarray, classifier: str, n_folds: int, seed: int
) -> np.ndarray:
    """Out-of-fold cell scores of one training side, from an inner subject-grouped k-fold."""
    why = " inside a training side (a patient threshold needs 2+ training subjects per class)"
    inner = _subject_folds(y, list(subjects), n_folds, seed, why)
    scores = np.zeros(len(y), np.float64)
    for train_rows, test_rows in inner.indices:
        model = train.fit(classifier, x[train_rows], y[train_rows], seed, subjects[train_rows])
        scores[test_rows], _ = train.decision_scores(model, x[test_rows])
    return scores


def _spread(values: list[float]) -> dict:
    """Mean and sample std over folds (std None with fewer than two values)."""
    if not values:
        return {"mean": None, "std": None}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std}


def _cell(m: dict, value: str) -> str:
    if m[value] is None:
        return "n/a"
    spread = "" if m.get("std") is None else f" ± {m['std']:.3f}"
    interval = "" if m["low"] is None else f" [{m['low']:.3f}, {m['high']:.3f}]"
    return f"{m[value]:.3f}{spread}{interval}"


def markdown_row(name: str, result: dict) -> str:
    """One cell-level results-table row: mean +- std over folds [95% subject-bootstrap interval]."""
    cells = [_cell(result["metrics"][key], "mean") for key in METRICS]
    return f"| {name} | " + " | ".join(cells) + " |"


def patient_markdown_row(name: str, result: dict) -> str:
    """One patient-level row: per metric the mean +- std over folds, then the pooled value with
    its 95% patient-bootstrap interval, and the patients and cells it rests on."""
    level = result["patient_level"]
    cells = []
    for key in patient.PATIENT_METRICS:
        m = level["metrics"][key]
        spread = "n/a" if m["mean"] is None else f"{m['mean']:.3f} ± {m['std'] or 0:.3f}"
        cells.append(f"{spread}; pooled {_cell(m | {'std': None}, 'pooled')}")
    matrix = level["confusion_matrix"]["matrix"]
    counts = f"{level['n_patients']} ({level['n_cells']} cells), {matrix}"
    return f"| {name} | " + " | ".join(cells) + f" | {counts} |"
