"""One fold runner: fit on each training side, score its test side, pool what was held out.

Shared by `validate` (learn/validate.py), `experiments` (learn/experiments.py) and the colour-
morphology bench (bench/cm_validate.py), so the same cells, folds and classifier give the same
numbers through all three. The rules they share, written once here:

* a cell is flagged at the classifier's own threshold (CELL_THRESHOLDS: an SVM's decision value
  >= 0, a probability >= 0.5);
* a patient's threshold is chosen on a training side only, from out-of-fold cell scores of inner
  subject-grouped folds, by learn/patient.py's rule (`patient_threshold`);
* a metric is reported as the mean +- std over folds (`spread`) and a bootstrap interval of the
  pooled out-of-fold predictions that resamples whole subjects when the folds kept them apart
  (`summarise`);
* the best of several results is the highest mean of one metric, ties to the next (`best`).

Plain numpy, no engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leukoflow import choices
from leukoflow.errors import LeukoflowError
from leukoflow.learn import evaluate, patient, train

# The classifier's own decision rule: an SVM's decision value is 0 on its boundary.
CELL_THRESHOLDS = {"decision_value": 0.0, "probability": 0.5}


@dataclass
class Augmented:
    """Feature rows of augmented images and, for each, the row of its source image."""

    matrix: np.ndarray
    source_rows: np.ndarray


@dataclass
class OutOfFold:
    """Every tested row's score and flag from the fold that held it out, and each fold's metrics."""

    scores: np.ndarray  # one per row of the data; rows no fold tested hold NaN
    flagged: np.ndarray  # 1 where the score is at or above the cell threshold (untested: 0)
    tested: np.ndarray  # the rows tested, fold after fold
    score_kind: str  # "decision_value" or "probability"
    per_fold: list[dict]  # learn/evaluate.compute_metrics of each fold's test side

    @property
    def cell_threshold(self) -> float:
        return CELL_THRESHOLDS[self.score_kind]


def subject_folds(
    y: np.ndarray, subjects: Sequence[str | None], n_folds: int, seed: int, where: str = ""
) -> train.Folds:
    """Stratified subject-grouped folds, or a clear error saying why they are not possible."""
    folds = train.kfold(y, list(subjects), n_folds, seed)
    if folds.grouping != "subject":
        raise LeukoflowError(f"subject-grouped folds are not possible{where}: {folds.note}")
    return folds


def out_of_fold(
    x: np.ndarray,
    y: np.ndarray,
    folds: train.Folds,
    classifier: str,
    seed: int = choices.DEFAULT_SEED,
    subjects: Sequence[str | None] | None = None,
    columns: np.ndarray | None = None,
    augmented: Augmented | None = None,
) -> OutOfFold:
    """Fit `classifier` on each fold's training side (its augmented copies included, `columns`
    of x only) and score the fold's test side. `subjects` reach the fit (rbf-svm-tuned's inner
    folds group by them)."""
    y = np.asarray(y, dtype=np.int64)
    groups = None if subjects is None else np.asarray(subjects, dtype=object)
    columns = np.arange(x.shape[1]) if columns is None else columns
    scores = np.full(len(y), np.nan)
    flagged = np.zeros(len(y), np.int64)
    per_fold, tested, kind = [], [], "decision_value"
    for train_rows, test_rows in folds.indices:
        x_train, y_train, g_train = training_side(x, y, groups, train_rows, columns, augmented)
        model = train.fit(classifier, x_train, y_train, seed, g_train)
        fold_scores, kind = train.decision_scores(model, x[np.ix_(test_rows, columns)])
        scores[test_rows] = fold_scores
        flagged[test_rows] = fold_scores >= CELL_THRESHOLDS[kind]
        per_fold.append(evaluate.compute_metrics(y[test_rows], flagged[test_rows], fold_scores))
        tested.append(test_rows)
    return OutOfFold(scores, flagged, np.concatenate(tested), kind, per_fold)


def training_side(x, y, groups, train_rows, columns, augmented=None):
    """One fold's training matrix, labels and subjects: its images plus their augmented copies."""
    x_train, y_train = x[np.ix_(train_rows, columns)], y[train_rows]
    g_train = None if groups is None else groups[train_rows]
    if augmented is None or not len(augmented.source_rows):
        return x_train, y_train, g_train
    copies = np.isin(augmented.source_rows, train_rows)
    sources = augmented.source_rows[copies]
    x_extra = augmented.matrix[np.ix_(np.flatnonzero(copies), columns)]
    g_extra = None if groups is None else groups[sources]
    return (
        np.vstack([x_train, x_extra]),
        np.concatenate([y_train, y[sources]]),
        None if groups is None else np.concatenate([g_train, g_extra]),
    )


def patient_threshold(
    x: np.ndarray,
    y: np.ndarray,
    subjects: Sequence[str],
    classifier: str,
    n_folds: int = choices.DEFAULT_FOLDS,
    seed: int = choices.DEFAULT_SEED,
) -> float:
    """The patient threshold of one training side (learn/patient.py's rule), chosen on out-of-
    fold cell scores of inner subject-grouped folds: in-sample scores of a separating classifier
    would make any threshold look right."""
    why = " inside a training side (a patient threshold needs 2+ training subjects per class)"
    inner = subject_folds(y, subjects, n_folds, seed, why)
    held_out = out_of_fold(x, y, inner, classifier, seed, subjects)
    labels, _ = patient.patient_labels(list(subjects), y)
    scores = patient.patient_scores(list(subjects), held_out.scores, held_out.cell_threshold)
    return patient.choose_patient_threshold(scores, labels)


def spread(values: Sequence[float | None]) -> dict:
    """Mean and sample std over folds, folds without a value left out (std None under two)."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None}
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return {"mean": float(np.mean(present)), "std": std}


def summarise(
    fold_values: Sequence[float | None],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray | None,
    metric: str,
    groups: Sequence | None,
    seed: int = choices.DEFAULT_SEED,
    n_boot: int = choices.DEFAULT_BOOTSTRAP,
) -> dict:
    """A metric over folds: mean, std, and the (subject-)bootstrap 95% interval of the pooled
    out-of-fold predictions."""
    low, high = evaluate.bootstrap_interval(
        y_true, y_pred, scores, metric, n_boot=n_boot, seed=seed, groups=groups
    )
    return spread(fold_values) | {"low": low, "high": high}


def best(results: Sequence[dict], ranking: Sequence[str]) -> int | None:
    """Index of the best result by the mean of `ranking[0]`, ties broken by the next ones (a
    missing mean counts as 0); None when there is no result."""
    if not results:
        return None

    def key(i: int) -> tuple[float, ...]:
        return tuple(results[i]["metrics"][name]["mean"] or 0.0 for name in ranking)

    return max(range(len(results)), key=key)
