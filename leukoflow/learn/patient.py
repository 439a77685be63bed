"""Patient-level decisions from cell scores: a screening tool answers per patient, not per cell.

Definitions (the same for `validate`, the report of `run` and the nightly subject table):

* **Cell flag**: a cell is flagged when its score is >= the cell threshold (for the linear SVM:
  its decision value >= 0, the SVM's own decision rule).
* **Patient score**: the fraction of the patient's cells that are flagged, in [0, 1]. A patient
  with fewer than `min_cells` cells is still decided, but marked `thin` so a reader knows how
  little the decision rests on.
* **Patient decision**: ALL (flagged) when the patient score is >= the patient threshold.
* **Patient threshold**: chosen on training patients only, from cell scores the classifier did
  not see in training (out-of-fold scores; in-sample scores of a linear SVM on thousands of
  features are near-perfectly separated and would make any threshold look right). It is the
  threshold that maximises balanced accuracy over the training patients. Every threshold inside
  one gap between consecutive distinct patient scores makes the same decisions, so the optimum
  is a set of intervals: the threshold is the midpoint of the widest optimal interval (the
  largest margin on both sides), and of equally wide ones the lowest (a screening tool prefers
  the more sensitive choice).
* **Patient label**: the label of its cells. C-NMC has one label per subject; a subject whose
  cells carry both labels is a catalog error, so it is excluded from patient-level thresholds
  and metrics with the reason recorded (its cells still count at cell level), never silently
  averaged into one label. Cells without a subject id form no patient and are excluded too.

Labels are 1 for ALL ("all") and 0 for normal ("hem"), as in learn/evaluate.py; the strings are
accepted too. Plain numpy, no engines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from leukoflow import choices
from leukoflow.errors import LeukoflowError
from leukoflow.learn import evaluate
from leukoflow.vocabulary import flagged

PATIENT_METRICS = ("sensitivity", "specificity", "balanced_accuracy")
DEFAULT_MIN_CELLS = 1


class PatientScore(NamedTuple):
    """A patient's score and the cell counts behind it."""

    score: float  # n_flagged / n_cells
    n_cells: int
    n_flagged: int


class PatientDecision(NamedTuple):
    """A patient's decision at a threshold, with what it rests on."""

    score: float
    n_cells: int
    n_flagged: int
    threshold: float
    flagged: bool  # decided ALL
    thin: bool  # fewer than min_cells cells


def patient_scores(
    subjects: Sequence[str | None], cell_scores: Sequence[float] | np.ndarray, cell_threshold: float
) -> dict[str, PatientScore]:
    """Per subject: (fraction of its cells with score >= cell_threshold, n cells, n flagged).

    Cells without a subject id (None or "") belong to no patient and are left out.
    """
    scores = np.asarray(cell_scores, dtype=np.float64).ravel()
    if scores.size != len(subjects):
        raise ValueError(f"{scores.size} cell scores for {len(subjects)} subject ids")
    if not np.isfinite(scores).all():
        raise ValueError("cell scores must be finite")
    flagged = scores >= cell_threshold
    cells: dict[str, list[int]] = {}
    for subject, hit in zip(subjects, flagged, strict=True):
        if subject is None or subject == "":
            continue
        counts = cells.setdefault(str(subject), [0, 0])
        counts[0] += 1
        counts[1] += int(hit)
    return {s: PatientScore(f / n, n, f) for s, (n, f) in sorted(cells.items())}


def patient_labels(
    subjects: Sequence[str | None], labels: Sequence[int | str]
) -> tuple[dict[str, int], dict[str, str]]:
    """Each subject's label (1 ALL, 0 normal) from its cells, and the subjects excluded, with why.

    A subject whose cells carry both labels is excluded (reason recorded); so are cells without
    a subject id, under the key "" (they form no patient).
    """
    codes = _codes(labels)
    if codes.size != len(subjects):
        raise ValueError(f"{codes.size} labels for {len(subjects)} subject ids")
    seen: dict[str, set[int]] = {}
    unassigned = 0
    for subject, code in zip(subjects, codes, strict=True):
        if subject is None or subject == "":
            unassigned += 1
            continue
        seen.setdefault(str(subject), set()).add(int(code))
    known, excluded = {}, {}
    for subject, found in sorted(seen.items()):
        if len(found) == 1:
            known[subject] = found.pop()
        else:
            excluded[subject] = "mixed labels: the subject has both ALL and normal cells"
    if unassigned:
        excluded[""] = f"{unassigned} cell(s) without a subject id belong to no patient"
    return known, excluded


def choose_patient_threshold(
    scores: Mapping[str, PatientScore | float], labels: Mapping[str, int | str]
) -> float:
    """The patient threshold maximising balanced accuracy over these (training) patients.

    Midpoint of the widest optimal interval of thresholds, the lowest of equally wide ones (see
    the module docstring). Patients without a label in `labels` are ignored. Needs patients of
    both classes.
    """
    shared = sorted(s for s in scores if s in labels)
    values = np.array([_score(scores[s]) for s in shared], dtype=np.float64)
    y = _codes([labels[s] for s in shared])
    if len(np.unique(y)) < 2:
        raise LeukoflowError(
            "a patient threshold needs training patients of both classes (ALL and normal); "
            f"found {int(y.sum())} ALL and {int((y == 0).sum())} normal"
        )
    if values.min() < 0 or values.max() > 1:
        raise ValueError("patient scores are fractions of cells, in [0, 1]")
    # Candidate intervals of thresholds t in [0, 1] (a patient is flagged when score >= t):
    # [0, lowest] flags everyone, each gap (a, b] between consecutive distinct scores flags the
    # patients scoring >= b, and (highest, 1] flags no one.
    distinct = np.unique(values)
    cuts = [(0.0, distinct[0]), *zip(distinct[:-1], distinct[1:], strict=True), (distinct[-1], 1.0)]
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    best: tuple[float, float, float] | None = None  # (balanced accuracy, width, -low)
    chosen = 0.0
    for i, (low, high) in enumerate(cuts):
        last = i == len(cuts) - 1
        flagged = np.zeros_like(values, dtype=bool) if last else values >= high
        sensitivity = np.count_nonzero(flagged & (y == 1)) / n_pos
        specificity = np.count_nonzero(~flagged & (y == 0)) / n_neg
        # Rounded so that float noise (0.8 - 0.6 > 0.4 - 0.2) cannot break a tie.
        key = (round((sensitivity + specificity) / 2, 12), round(high - low, 12), -low)
        if best is None or key > best:
            best, chosen = key, (low + high) / 2
            if last and chosen <= distinct[-1]:  # highest score 1: "no one" needs t just above 1
                chosen = float(np.nextafter(1.0, 2.0))
    return float(chosen)


def decide(
    scores: Mapping[str, PatientScore],
    threshold: float,
    min_cells: int = DEFAULT_MIN_CELLS,
) -> dict[str, PatientDecision]:
    """Each patient's decision at `threshold` (flagged when score >= threshold), marked thin
    when it rests on fewer than `min_cells` cells."""
    if min_cells < 1:
        raise LeukoflowError(f"min_cells must be at least 1, got {min_cells}")
    return {
        subject: PatientDecision(
            p.score,
            p.n_cells,
            p.n_flagged,
            float(threshold),
            bool(flagged(p.score, threshold)),
            p.n_cells < min_cells,
        )  # fmt: skip
        for subject, p in scores.items()
    }


def patient_metrics(
    decisions: Mapping[str, PatientDecision],
    labels: Mapping[str, int | str],
    n_boot: int = choices.DEFAULT_BOOTSTRAP,
    seed: int = choices.DEFAULT_SEED,
    alpha: float = 0.05,
) -> dict:
    """Sensitivity, specificity and balanced accuracy over patients, JSON-ready.

    Each metric is {"value", "low", "high"}: a (1 - alpha) percentile bootstrap that resamples
    patients (one row each, so this is the subject bootstrap); low/high are None when n_boot is
    0, and a metric is None when its class has no patient. Also the patient confusion matrix,
    the counts of patients and cells behind it, and one row per patient (subject id as given:
    pseudonymise before publishing). Patients absent from `labels` are left out.
    """
    subjects = sorted(s for s in decisions if s in labels)
    if not subjects:
        raise LeukoflowError("no labelled patient to evaluate")
    y = _codes([labels[s] for s in subjects])
    flagged = np.array([decisions[s].flagged for s in subjects], dtype=np.int64)
    tn, fp, fn, tp = (int(v) for v in _confusion(y, flagged))
    values = {
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
    }
    present = [v for v in values.values() if v is not None]
    values["balanced_accuracy"] = float(np.mean(present))
    metrics = {}
    for key in PATIENT_METRICS:
        low = high = None
        if n_boot and values[key] is not None:
            low, high = _patient_interval(key, y, flagged, n_boot, seed, alpha)
        metrics[key] = {"value": values[key], "low": low, "high": high}
    cells = [decisions[s].n_cells for s in subjects]
    return {
        "metrics": metrics,
        "n_patients": len(subjects),
        "support": {
            evaluate.POSITIVE_LABEL: int(y.sum()),
            evaluate.NEGATIVE_LABEL: int((y == 0).sum()),
        },
        "n_cells": int(sum(cells)),
        "cells_per_patient": {
            "min": int(min(cells)),
            "median": float(np.median(cells)),
            "max": int(max(cells)),
        },  # fmt: skip
        "n_thin": sum(decisions[s].thin for s in subjects),
        "confusion_matrix": {
            "labels": [evaluate.NEGATIVE_LABEL, evaluate.POSITIVE_LABEL],
            "matrix": [[tn, fp], [fn, tp]],
        },
        "patients": [
            {
                "subject_id": s,
                "label": evaluate.POSITIVE_LABEL if code else evaluate.NEGATIVE_LABEL,
                **decisions[s]._asdict(),
                "correct": bool(decisions[s].flagged) == bool(code),
            }
            for s, code in zip(subjects, y, strict=True)
        ],
    }


def _patient_interval(
    key: str, y: np.ndarray, flagged: np.ndarray, n_boot: int, seed: int, alpha: float
) -> tuple[float, float]:
    # evaluate's bootstrap draws patients with replacement (one row per patient). Specificity is
    # the recall of the normal class, so it is the recall of the flipped labels: same seed, same
    # resamples as the other two metrics.
    if key == "sensitivity":
        return evaluate.bootstrap_interval(y, flagged, None, "recall", n_boot, seed, alpha)
    if key == "specificity":
        return evaluate.bootstrap_interval(1 - y, 1 - flagged, None, "recall", n_boot, seed, alpha)
    return evaluate.bootstrap_interval(y, flagged, None, "balanced_accuracy", n_boot, seed, alpha)


def _confusion(y: np.ndarray, flagged: np.ndarray) -> tuple[int, int, int, int]:
    tp = np.count_nonzero((y == 1) & (flagged == 1))
    fp = np.count_nonzero((y == 0) & (flagged == 1))
    fn = np.count_nonzero((y == 1) & (flagged == 0))
    return y.size - tp - fp - fn, fp, fn, tp


def _score(value: PatientScore | float) -> float:
    return float(value.score if isinstance(value, PatientScore) else value)


def _codes(labels: Sequence[int | str] | np.ndarray) -> np.ndarray:
    """1 for ALL, 0 for normal, from strings ("all"/"hem") or 0/1."""
    items = list(labels)
    if all(isinstance(v, str) for v in items):
        return evaluate.labels_to_int(items)
    codes = np.asarray(items, dtype=np.int64)
    if codes.size and not np.isin(codes, (0, 1)).all():
        raise ValueError("patient labels must be 0 (normal) / 1 (ALL) or 'hem' / 'all'")
    return codes
