"""Subject-grouped cross-validation of one feature set with the paper's classifier.

The fixed protocol of docs/results.md: stratified k folds grouped by subject (no patient on both
sides), the linear SVM as the paper has it, and for accuracy, balanced accuracy, F1 and ROC AUC
the mean +- std over folds plus a 95% interval that resamples whole subjects of the pooled
out-of-fold predictions. Plain functions, no engines.
"""

from __future__ import annotations

import numpy as np

from leukoflow.errors import LeukoflowError
from leukoflow.tasks import evaluate, train

METRICS = ("accuracy", "balanced_accuracy", "f1", "roc_auc")
DEFAULT_FOLDS = 5
DEFAULT_BOOTSTRAP = 1000


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    subjects: list[str | None],
    classifier: str = train.DEFAULT_CLASSIFIER,
    n_folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    n_boot: int = DEFAULT_BOOTSTRAP,
) -> dict:
    """Per-fold and pooled metrics with subject-bootstrap intervals; JSON-ready."""
    folds = train.kfold(y, subjects, n_folds, seed)
    if folds.grouping != "subject":
        raise LeukoflowError(f"subject-grouped folds are not possible here: {folds.note}")
    predicted = np.zeros(len(y), np.int64)
    scores = np.zeros(len(y), np.float64)
    per_fold = []
    for train_rows, test_rows in folds.indices:
        model = train.fit(classifier, x[train_rows], y[train_rows], seed)
        predicted[test_rows] = model.predict(x[test_rows])
        scores[test_rows], _ = train.decision_scores(model, x[test_rows])
        metrics = evaluate.compute_metrics(y[test_rows], predicted[test_rows], scores[test_rows])
        per_fold.append({key: metrics[key] for key in METRICS} | {"n": metrics["n"]})
    pooled = evaluate.compute_metrics(y, predicted, scores)
    summary = {}
    for key in METRICS:
        low, high = evaluate.bootstrap_interval(
            y, predicted, scores, key, n_boot=n_boot, seed=seed, groups=subjects
        )
        values = [fold[key] for fold in per_fold if fold[key] is not None]
        summary[key] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)),
            "pooled": pooled[key],
            "low": low,
            "high": high,
        }
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
    }


def markdown_row(name: str, result: dict) -> str:
    """One results-table row: mean +- std over folds [95% subject-bootstrap interval]."""
    cells = []
    for key in METRICS:
        m = result["metrics"][key]
        cells.append(f"{m['mean']:.3f} ± {m['std']:.3f} [{m['low']:.3f}, {m['high']:.3f}]")
    return f"| {name} | " + " | ".join(cells) + " |"
