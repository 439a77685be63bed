"""Evaluation metrics for the ALL-vs-hem classifier, as plain JSON-ready values.

The positive class is "all" (a leukemic blast, encoded 1); "hem" (a normal cell) is 0. Every
function returns python floats/ints/lists so results can go straight into json.dumps, Parquet
metadata or a report without numpy types leaking through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from leukoflow import choices
from leukoflow.errors import LeukoflowError
from leukoflow.store.tables import CatalogRow
from leukoflow.vocabulary import Label

POSITIVE_LABEL = Label.ALL.value
NEGATIVE_LABEL = Label.HEM.value
_LABEL_TO_INT = {NEGATIVE_LABEL: 0, POSITIVE_LABEL: 1}


def labelled_rows(rows: Sequence[CatalogRow], what: str) -> list[CatalogRow]:
    """The catalogued images a classifier can learn from: status ok and labelled all or hem.
    None: a usage error saying what the images were for (`what`)."""
    labels = (POSITIVE_LABEL, NEGATIVE_LABEL)
    labelled = [r for r in rows if r.ok and r.label in labels]
    if not labelled:
        raise LeukoflowError(
            f"no labelled images to {what} (labels all/hem come from C-NMC names, class folders "
            "or a CSV manifest)"
        )
    return labelled


def labels_to_int(labels: Sequence[str]) -> np.ndarray:
    """Encode "all" -> 1 and "hem" -> 0; any other label (None included) raises ValueError."""
    out = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        code = _LABEL_TO_INT.get(label) if isinstance(label, str) else None
        if code is None:
            raise ValueError(
                f"unknown label {label!r} at position {i}; "
                f"expected {POSITIVE_LABEL!r} or {NEGATIVE_LABEL!r}"
            )
        out[i] = code
    return out


def targets(rows: Sequence[CatalogRow]) -> tuple[np.ndarray, list[str | None]]:
    """What a classifier learns from catalog rows: labels as 1 ALL / 0 normal, and the
    subject id of each row (what splits, folds and patient figures group by)."""
    return labels_to_int([r.label for r in rows]), [r.subject_id for r in rows]


def _as_binary(y: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(y).ravel()
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0 (hem) and 1 (all)")
    return arr.astype(np.int64)


def _scores_array(scores: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size != n:
        raise ValueError(f"scores has {arr.size} values for {n} cells")
    return arr


def _finite_list(values: np.ndarray) -> list[float | None]:
    # roc_curve's first threshold is +inf, which json.dumps would write as invalid "Infinity".
    return [float(v) if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def _counts(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[int, int, int, int]:
    # Counting directly keeps the matrix 2x2 even when a class is absent, and is fast enough to
    # call inside a 1000-resample bootstrap.
    tp = int(np.count_nonzero((y_true == 1) & (y_pred == 1)))
    fp = int(np.count_nonzero((y_true == 0) & (y_pred == 1)))
    fn = int(np.count_nonzero((y_true == 1) & (y_pred == 0)))
    tn = int(y_true.size - tp - fp - fn)
    return tn, fp, fn, tp


def _ratio(num: int, den: int) -> float:
    # zero_division=0, as in scikit-learn: an undefined precision/recall/F1 counts as 0.
    return float(num / den) if den else 0.0


def _count_metrics(tn: int, fp: int, fn: int, tp: int) -> dict[str, float]:
    """Metrics that depend only on the confusion matrix (same values as scikit-learn's)."""
    n = tn + fp + fn + tp
    n_pos, n_neg = tp + fn, tn + fp
    f1_pos = _ratio(2 * tp, 2 * tp + fp + fn)
    f1_neg = _ratio(2 * tn, 2 * tn + fn + fp)
    recall_pos, recall_neg = _ratio(tp, n_pos), _ratio(tn, n_neg)
    # Balanced accuracy averages recall over the classes present in y_true, so with one class
    # it reduces to that class's recall (scikit-learn does the same, with a warning).
    present = [r for r, support in ((recall_neg, n_neg), (recall_pos, n_pos)) if support]
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": _ratio(tp, tp + fp),
        "recall": recall_pos,
        "f1": f1_pos,
        "balanced_accuracy": float(sum(present) / len(present)) if present else 0.0,
        "f1_macro": (f1_pos + f1_neg) / 2,
        "f1_weighted": (f1_pos * n_pos + f1_neg * n_neg) / n if n else 0.0,
    }


def compute_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None = None
) -> dict:
    """Classification metrics for the "all" class plus class-balanced summaries.

    roc_auc is None when no scores are given or y_true holds a single class (AUC is undefined).
    """
    yt = _as_binary(y_true, "y_true")
    yp = _as_binary(y_pred, "y_pred")
    if yt.size != yp.size:
        raise ValueError(f"y_true has {yt.size} cells but y_pred has {yp.size}")
    if yt.size == 0:
        raise ValueError("cannot compute metrics on zero cells")

    tn, fp, fn, tp = _counts(yt, yp)
    roc_auc = None
    if scores is not None and np.unique(yt).size == 2:
        roc_auc = float(roc_auc_score(yt, _scores_array(scores, yt.size)))
    return {
        **_count_metrics(tn, fp, fn, tp),
        "roc_auc": roc_auc,
        "confusion_matrix": {
            "labels": [NEGATIVE_LABEL, POSITIVE_LABEL],
            "matrix": [[tn, fp], [fn, tp]],
        },
        "n": int(yt.size),
        "support": {POSITIVE_LABEL: tp + fn, NEGATIVE_LABEL: tn + fp},
    }


def roc_points(y_true: np.ndarray, scores: np.ndarray) -> dict:
    """ROC curve as lists: fpr, tpr, thresholds (the +inf first threshold becomes None)."""
    yt = _as_binary(y_true, "y_true")
    fpr, tpr, thresholds = roc_curve(yt, _scores_array(scores, yt.size), pos_label=1)
    return {
        "fpr": [float(v) for v in fpr],
        "tpr": [float(v) for v in tpr],
        "thresholds": _finite_list(thresholds),
    }


def pr_points(y_true: np.ndarray, scores: np.ndarray) -> dict:
    """Precision-recall curve as lists: precision, recall, thresholds (one fewer than points)."""
    yt = _as_binary(y_true, "y_true")
    precision, recall, thresholds = precision_recall_curve(
        yt, _scores_array(scores, yt.size), pos_label=1
    )
    return {
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "thresholds": _finite_list(thresholds),
    }


_BOOTSTRAP_METRICS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "balanced_accuracy",
    "f1_macro",
    "f1_weighted",
    "roc_auc",
)


def bootstrap_interval(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    scores: np.ndarray | None,
    metric: str,
    n_boot: int = choices.DEFAULT_BOOTSTRAP,
    seed: int = choices.DEFAULT_SEED,
    alpha: float = 0.05,
    groups: Sequence | np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of one compute_metrics value, resampling cells.

    With `groups` (one subject id per cell) whole subjects are resampled instead, so cells of one
    patient, which are not independent, move together. Resamples where the metric is undefined
    are skipped, not scored 0: recall without a positive cell, precision without a positive
    prediction, roc_auc with a single class (with few subjects such draws are common, and
    counting them as 0 would drag the interval down to 0 for a perfect result). Where recall or
    precision is undefined in every resample (no positive cell, or none predicted, at all), the
    interval is (0, 0), the zero-division convention of compute_metrics' own value; for roc_auc
    that case raises ValueError.
    """
    if metric not in _BOOTSTRAP_METRICS:
        raise ValueError(
            f"unknown metric {metric!r}; choose one of {', '.join(_BOOTSTRAP_METRICS)}"
        )
    if not 0 < alpha < 1:
        raise ValueError("alpha must be between 0 and 1")
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1")
    yt = _as_binary(y_true, "y_true")
    yp = _as_binary(y_pred, "y_pred")
    if yt.size != yp.size or yt.size == 0:
        raise ValueError("y_true and y_pred must be non-empty and of equal length")
    sc = None
    if metric == "roc_auc":
        if scores is None:
            raise ValueError("roc_auc needs scores")
        sc = _scores_array(scores, yt.size)

    rng = np.random.default_rng(seed)
    n = yt.size
    members = None if groups is None else _group_members(groups, n)
    values: list[float] = []
    for _ in range(n_boot):
        if members is None:
            idx = rng.integers(0, n, size=n)
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        yt_b, yp_b = yt[idx], yp[idx]
        if not _defined(metric, yt_b, yp_b):
            continue
        values.append(_single_metric(metric, yt_b, yp_b, None if sc is None else sc[idx]))
    if not values:
        if metric != "roc_auc":
            return 0.0, 0.0
        raise ValueError("roc_auc is undefined in every bootstrap resample; cannot bound it")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _defined(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> bool:
    """Whether `metric` has a value on this resample (see bootstrap_interval)."""
    if metric == "recall":
        return bool(y_true.any())
    if metric == "precision":
        return bool(y_pred.any())
    if metric == "roc_auc":
        return np.unique(y_true).size == 2
    return True


def _group_members(groups: Sequence | np.ndarray, n: int) -> list[np.ndarray]:
    """The cell indices of each group (groups sorted by id, so the draw is reproducible)."""
    labels = np.asarray(groups, dtype=object).ravel()
    if labels.size != n:
        raise ValueError(f"groups has {labels.size} values for {n} cells")
    _, codes = np.unique(labels.astype(str), return_inverse=True)
    return [np.flatnonzero(codes == c) for c in range(codes.max() + 1)]


def _single_metric(
    metric: str, y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None
) -> float:
    if metric == "roc_auc":
        return float(roc_auc_score(y_true, scores))
    return _count_metrics(*_counts(y_true, y_pred))[metric]
