"""Fit the model that `run` saves, and measure it the way it will be used.

Plain functions over a joined feature matrix (no Prefect, no Ray). One split of the labelled cells
(subject-grouped by default); on its training side the paper's classifier is wrapped in sigmoid
calibration, the cell threshold is chosen out of fold for the target sensitivity, and the
patient-level threshold is chosen on the same out-of-fold scores of training patients. The held-
out side then measures the saved model at that operating point, at cell and patient level, with
subject-bootstrap intervals. The plain classifier on the same split is kept for the comparison
with the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sklearn.pipeline import Pipeline

from leukoflow import choices
from leukoflow.learn import calibration, evaluate, patient, train
from leukoflow.learn.reference import score_reference
from leukoflow.recipe import FeatureRecipe
from leukoflow.store import records, registry
from leukoflow.store.records import ModelRecord
from leukoflow.store.tables import CatalogRow
from leukoflow.vocabulary import THRESHOLD_RULE
from leukoflow.vocabulary import flagged as flag_rule


@dataclass
class FittedModel:
    """The saved (calibrated) model, its operating point, and the paper's plain model."""

    model: Pipeline  # what is saved and what scoring uses
    threshold: float
    calibration: dict  # JSON-ready summary (learn/calibration)
    patient_rule: dict  # JSON-ready: how patients are decided (learn/patient)
    operating_point: dict  # JSON-ready: held-out sensitivity/specificity, cell and patient level
    test_probabilities: np.ndarray
    split: train.Split
    y_test: np.ndarray
    # The paper's classifier on the same split, for comparison.
    paper_model: Pipeline
    paper_predictions: np.ndarray
    paper_scores: np.ndarray
    paper_score_kind: str
    metrics: dict  # the paper's metrics of the plain classifier (held-out side)
    score_kind: str = "probability"

    def paper_params(self) -> dict:
        """The paper's classifier settings (JSON values only), e.g. C=1 and the hinge loss."""
        params = self.paper_model[-1].get_params()
        plain = (int, float, str, bool, type(None))
        return {k: v for k, v in params.items() if isinstance(v, plain)}


def trainable_rows(rows: Sequence[CatalogRow]) -> list[CatalogRow]:
    """The catalogued images `run` trains and tests on: decoded and labelled."""
    return evaluate.labelled_rows(rows, "train on")


def plan_split(rows: Sequence[CatalogRow], split: str | None, seed: int) -> str:
    """The split `run` will use (None: subject-grouped when every image has a subject id, else
    random), checked before any extraction: one class, or too few subjects for the split or
    its calibration folds, is a usage error now rather than after hours of work."""
    trainable = trainable_rows(rows)
    y, subjects = evaluate.targets(trainable)
    split = train.choose_split(split, y, subjects)
    planned = train.split_rows(y, subjects, split, seed=seed)
    train.kfold(
        y[planned.train],
        [subjects[i] for i in planned.train],
        calibration.DEFAULT_CALIBRATION_FOLDS,
        seed,
    )
    return split


def new_model_record(
    *,
    image_ids: Sequence[str],
    x: np.ndarray,
    fitted: FittedModel,
    recipe: FeatureRecipe,
    dataset: str,
    classifier: str,
    split: str,
    seed: int,
    target_sensitivity: float,
    created_at: datetime,
) -> ModelRecord:
    """The record of `fitted`, trained on the joined cells `image_ids` (the rows of `x`). Its id
    names the classifier and the fingerprint of its training cells."""
    train_ids = [image_ids[i] for i in fitted.split.train]
    test_ids = [image_ids[i] for i in fitted.split.test]
    fingerprint = train.fingerprint(train_ids)
    return records.model_record(
        model_id=registry.new_model_id(classifier, fingerprint), created_at=created_at,
        dataset=dataset, recipe=recipe, classifier=classifier, fitted=fitted, split=split,
        seed=seed, train_ids=train_ids, test_ids=test_ids, training_fingerprint=fingerprint,
        target_sensitivity=target_sensitivity, reference=drift_reference(fitted, x),
        code_version=registry.code_version(),
    )  # fmt: skip


def drift_reference(fitted: FittedModel, x: np.ndarray) -> dict:
    """What nightly drift compares against: the training side's feature moments, and the saved
    model's scores on held-out cells (training-set scores of a separating SVM are more extreme
    than new cells' ever are)."""
    held_out = x[fitted.split.test]
    return {
        "feature_mean": x[fitted.split.train].mean(axis=0).tolist(),
        "feature_std": x[fitted.split.train].std(axis=0).tolist(),
        "scores": score_reference(
            *train.decision_scores(fitted.model, held_out), split="held-out test"
        ),
    }


def fit_and_measure(
    x: np.ndarray,
    y: np.ndarray,
    subjects: list[str | None],
    classifier: str,
    split: str,
    seed: int,
    target_sensitivity: float = choices.DEFAULT_TARGET_SENSITIVITY,
    n_boot: int = choices.DEFAULT_BOOTSTRAP,
) -> FittedModel:
    """Split, fit the paper's classifier and the calibrated one, choose both thresholds on the
    training side only, and measure on the held-out side."""
    parts = train.split_rows(y, subjects, split, seed=seed)
    train_subjects = [subjects[i] for i in parts.train]
    test_subjects = [subjects[i] for i in parts.test]
    paper = train.fit(classifier, x[parts.train], y[parts.train], seed)
    paper_scores, paper_kind = train.decision_scores(paper, x[parts.test])
    paper_predictions = paper.predict(x[parts.test])
    metrics = evaluate.compute_metrics(y[parts.test], paper_predictions, paper_scores)

    calibrated = calibration.calibrate_and_choose_threshold(
        classifier, x[parts.train], y[parts.train], train_subjects, x[parts.test], y[parts.test],
        target_sensitivity, seed=seed,
    )  # fmt: skip
    threshold = calibrated.threshold
    rule = patient_rule(
        train_subjects, y[parts.train], calibrated.validation_probabilities, threshold
    )
    point = operating_point(
        y[parts.test], calibrated.test_probabilities, threshold, test_subjects, rule, split,
        n_boot, seed,
    )  # fmt: skip
    return FittedModel(
        model=calibrated.model,
        threshold=threshold,
        calibration=calibrated.summary,
        patient_rule=rule,
        operating_point=point,
        test_probabilities=calibrated.test_probabilities,
        split=parts,
        y_test=y[parts.test],
        paper_model=paper,
        paper_predictions=paper_predictions,
        paper_scores=paper_scores,
        paper_score_kind=paper_kind,
        metrics=metrics,
    )


def operating_point(
    y: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    subjects: list[str | None],
    rule: dict,
    split: str,
    n_boot: int = choices.DEFAULT_BOOTSTRAP,
    seed: int = choices.DEFAULT_SEED,
) -> dict:
    """Held-out sensitivity and specificity of the saved model at its threshold: per cell (with
    subject-bootstrap intervals) and per patient (learn/patient), each with its n."""
    flagged = flag_rule(np.asarray(probabilities), threshold).astype(np.int64)
    y = np.asarray(y, dtype=np.int64)
    groups = subjects if all(s not in (None, "") for s in subjects) else None
    cells = {
        "split": split,
        "n": int(y.size),
        "n_all": int(y.sum()),
        "n_hem": int((1 - y).sum()),
        "confusion_matrix": evaluate.compute_metrics(y, flagged, probabilities)["confusion_matrix"],
        **_rate_with_interval("sensitivity", y, flagged, groups, n_boot, seed),
        **_rate_with_interval("specificity", 1 - y, 1 - flagged, groups, n_boot, seed),
    }
    patients = None
    if groups is not None and rule.get("threshold") is not None:
        labels, excluded = patient.patient_labels(subjects, y)
        decisions = patient.decide(
            patient.patient_scores(subjects, probabilities, threshold), rule["threshold"]
        )
        patients = {
            "split": split,
            **patient.patient_metrics(decisions, labels, n_boot=n_boot, seed=seed),
            "excluded": excluded,
        }
    return {"threshold": threshold, "cells": cells, "patients": patients}


def patient_rule(
    subjects: list[str | None],
    y: np.ndarray,
    out_of_fold_probabilities: np.ndarray | None,
    cell_threshold: float,
) -> dict:
    """How this model decides a patient, fitted on training patients' out-of-fold scores only
    (learn/patient); JSON-ready. No rule (threshold None) without subject ids or without
    training patients of both classes."""
    rule = {
        "score": "fraction of the patient's cells flagged at the cell threshold",
        "decision": THRESHOLD_RULE,
        "cell_threshold": cell_threshold,
        "threshold": None,
        "chosen_on": "out-of-fold calibrated scores of the training patients",
    }
    if out_of_fold_probabilities is None or any(s in (None, "") for s in subjects):
        return {**rule, "why_none": "images without subject ids: no patients to decide"}
    labels, excluded = patient.patient_labels(subjects, y)
    if len(set(labels.values())) < 2:
        return {**rule, "why_none": "training patients of one class only"}
    scores = patient.patient_scores(subjects, out_of_fold_probabilities, cell_threshold)
    threshold = patient.choose_patient_threshold(scores, labels)
    return {**rule, "threshold": threshold, "n_training_patients": len(labels),
            "excluded": sorted(excluded)}  # fmt: skip


def _rate_with_interval(
    name: str,
    y: np.ndarray,
    predicted: np.ndarray,
    groups: list | None,
    n_boot: int,
    seed: int,
) -> dict:
    """Recall of class 1 of (y, predicted) — sensitivity, or specificity with classes swapped."""
    positives = int(y.sum())
    if positives == 0:
        return {name: None, f"{name}_ci": None, f"{name}_n": 0}
    value = float((predicted[y == 1] == 1).mean())
    try:
        low, high = evaluate.bootstrap_interval(
            y, predicted, None, "recall", n_boot=n_boot, seed=seed, groups=groups
        )
        interval = [float(low), float(high)]
    except ValueError:
        interval = None
    return {name: value, f"{name}_ci": interval, f"{name}_n": positives}
