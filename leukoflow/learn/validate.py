"""Subject-grouped cross-validation of one feature set and one classifier.

The fixed protocol of docs/results.md: stratified k folds grouped by subject (no patient on both
sides), the linear SVM as the paper has it unless another classifier is named, at two levels:

* **cells**: accuracy, balanced accuracy, F1 and ROC AUC, each as the mean +- std over folds
  plus a 95% interval that resamples whole subjects of the pooled out-of-fold predictions;
* **patients** (learn/patient.py): a cell is flagged at the classifier's own threshold (decision
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

from collections.abc import Mapping
from datetime import UTC, datetime

import numpy as np

from leukoflow import choices
from leukoflow.features.extract import ExtractionResult
from leukoflow.features.join import JoinedFeatures
from leukoflow.learn import evaluate, folds, patient
from leukoflow.recipe import FeatureRecipe
from leukoflow.store.pseudonym import pseudonymise_subjects, subject_key
from leukoflow.store.records import non_clinical_note, package_versions

METRICS = ("accuracy", "balanced_accuracy", "f1", "roc_auc")
CELL_THRESHOLDS = folds.CELL_THRESHOLDS


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    subjects: list[str | None],
    classifier: str = choices.DEFAULT_CLASSIFIER,
    n_folds: int = choices.DEFAULT_FOLDS,
    seed: int = choices.DEFAULT_SEED,
    n_boot: int = choices.DEFAULT_BOOTSTRAP,
    min_cells: int = patient.DEFAULT_MIN_CELLS,
) -> dict:
    """Per-fold and pooled metrics, cell and patient level, with subject-bootstrap intervals;
    JSON-ready. `patient_level.patients` holds raw subject ids: pseudonymise before publishing."""
    outer = folds.subject_folds(y, subjects, n_folds, seed)
    y = np.asarray(y, dtype=np.int64)
    groups = np.asarray(subjects, dtype=object)
    labels_of, excluded = patient.patient_labels(subjects, y)
    held_out = folds.out_of_fold(x, y, outer, classifier, seed, subjects)
    scores, predicted, cell_threshold = held_out.scores, held_out.flagged, held_out.cell_threshold
    per_fold = [{key: m[key] for key in METRICS} | {"n": m["n"]} for m in held_out.per_fold]
    per_fold_patients, decisions = [], {}
    for train_rows, test_rows in outer.indices:
        threshold = folds.patient_threshold(
            x[train_rows], y[train_rows], list(groups[train_rows]), classifier, n_folds, seed
        )
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
                "n_training_patients": sum(s in labels_of for s in set(groups[train_rows])),
            }
        )
        decisions.update(fold_decisions)

    pooled = evaluate.compute_metrics(y, predicted, scores)
    summary = {
        key: folds.summarise(
            [fold[key] for fold in per_fold], y, predicted, scores, key, subjects, seed, n_boot
        )
        | {"pooled": pooled[key]}
        for key in METRICS
    }
    pooled_patients = patient.patient_metrics(decisions, labels_of, n_boot=n_boot, seed=seed)
    patient_summary = {}
    for key in patient.PATIENT_METRICS:
        m = pooled_patients["metrics"][key]
        values = [fold[key] for fold in per_fold_patients]
        patient_summary[key] = folds.spread(values) | {
            "pooled": m["value"],
            "low": m["low"],
            "high": m["high"],
        }
    return {
        "classifier": classifier,
        "folds": outer.k,
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


def validation_summary(
    result: dict,
    *,
    salt: bytes,
    dataset: str,
    images: str | list[str],
    store: str,
    recipe: FeatureRecipe,
    catalog_counts: Mapping,
    n_labelled: int,
    extraction: ExtractionResult,
    joined: JoinedFeatures,
) -> dict:
    """What `leukoflow validate` returns (its --json line): `cross_validate`'s result with every
    patient keyed by `salt` (raw subject ids stay in the store's tables, and this is printed),
    and every image found accounted for."""
    level = result["patient_level"]
    keyed = {
        **level,
        "patients": pseudonymise_subjects(level["patients"], salt),
        "excluded": [
            {"subject_id": subject_key(subject, salt), "reason": reason}
            for subject, reason in level["excluded"].items()
        ],
    }
    return {
        **result,
        "patient_level": keyed,
        "dataset": dataset,
        "images": images,
        "store": store,
        "counts": {
            # Counts only: the names of ignored files stay in the catalog pass's log.
            **{k: v for k, v in catalog_counts.items() if k not in ("reasons", "ignored_files")},
            "quarantine_reasons": catalog_counts.get("reasons", {}),
            "unlabelled": catalog_counts["ok"] - n_labelled,
            "rejected_by_extractor": len(extraction.rejected),
            "missing_vectors": len(joined.missing),
            "validated": len(joined.image_ids),
        },
        "featurise": {
            k: extraction.to_dict()[k] for k in ("computed", "seconds", "images_per_second")
        },
        "feature_recipe": recipe.to_record(),
        "backbones": list(recipe.backbones),
        "feature_dim": int(joined.matrix.shape[1]),
        "weights_id": recipe.weights_id,
        "image_size": recipe.image_size,
        "non_clinical": recipe.non_clinical,
        "note": non_clinical_note(recipe.non_clinical),
        "created_at": datetime.now(UTC).isoformat(),
        "package_versions": package_versions(),
    }


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
