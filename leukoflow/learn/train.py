"""Classifiers, splits and model files. Plain scikit-learn; no orchestration here."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import (
    GridSearchCV,
    StratifiedGroupKFold,
    StratifiedKFold,
    train_test_split,
)
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.tree import DecisionTreeClassifier

from leukoflow import choices
from leukoflow.choices import CLASSIFIERS, SPLITS, TUNED_CLASSIFIER
from leukoflow.errors import LeukoflowError

log = logging.getLogger("leukoflow.train")


def _estimator(name: str, seed: int) -> ClassifierMixin:
    if name == "linear-svm":
        # The paper's classifier: C=1 with the plain hinge loss (scikit-learn's default is the
        # squared hinge); the hinge loss is only solved in the dual.
        return LinearSVC(C=1.0, loss="hinge", dual=True, max_iter=20_000, random_state=seed)
    if name == "rbf-svm":
        return SVC(C=1.0, kernel="rbf", gamma="scale", random_state=seed)
    if name == "knn":
        return KNeighborsClassifier(n_neighbors=5)
    if name == "tree":
        return DecisionTreeClassifier(random_state=seed)
    if name == "forest":
        return RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1)
    if name == "mlp":
        # The paper's "MLP 256-2": one hidden layer of 256 units, two outputs.
        return MLPClassifier(hidden_layer_sizes=(256,), max_iter=500, random_state=seed)
    raise LeukoflowError(f"unknown classifier {name!r}; choose from {', '.join(CLASSIFIERS)}")


def make_classifier(name: str, seed: int = choices.DEFAULT_SEED) -> Pipeline:
    """Standardise the features, then the named classifier."""
    return Pipeline([("scale", StandardScaler()), ("clf", _estimator(name, seed))])


def check_split(name: str) -> str:
    if name not in SPLITS:
        raise LeukoflowError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")
    return name


def choose_split(name: str | None, y: np.ndarray, subjects: list[str | None]) -> str:
    """The split to use: the user's, else `subject` when every image carries a subject id and
    each class has 2+ subjects (the honest default), else the paper's `random`."""
    if name is not None:
        return check_split(name)
    if any(s is None or s == "" for s in subjects) or len(y) == 0:
        return "random"
    groups = np.asarray(subjects)
    per_class = [len(set(groups[y == c])) for c in (0, 1)]
    return "subject" if min(per_class) >= 2 else "random"


@dataclass
class Split:
    train: np.ndarray  # row indices
    test: np.ndarray
    kind: str


def split_rows(
    y: np.ndarray,
    subjects: list[str | None],
    kind: str,
    test_fraction: float = 0.1,
    seed: int = choices.DEFAULT_SEED,
) -> Split:
    """`random`: the paper's stratified image split. `subject`: no subject on both sides."""
    check_split(kind)
    _check_two_classes(y, "the dataset")
    rows = np.arange(len(y))
    if kind == "random":
        counts = np.bincount(y, minlength=2)
        n_test = max(2, int(round(test_fraction * len(y))))
        if counts.min() < 2 or n_test >= len(y):
            raise LeukoflowError("too few images for a train/test split: need 2+ of each class")
        train, test = train_test_split(
            rows, test_size=n_test, stratify=y, random_state=seed, shuffle=True
        )
        return Split(np.sort(train), np.sort(test), kind)
    if any(s is None or s == "" for s in subjects):
        raise LeukoflowError(
            "--split subject needs a subject id for every image (C-NMC names or a subject_id "
            "column); use --split random otherwise"
        )
    groups = np.asarray(subjects)
    per_class = [len(set(groups[y == c])) for c in (0, 1)]
    if min(per_class) < 2:
        raise LeukoflowError(
            f"--split subject needs at least 2 subjects per class; found {per_class[1]} ALL "
            f"and {per_class[0]} normal"
        )
    n_splits = max(2, min(int(round(1 / test_fraction)), min(per_class)))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, test = next(folds.split(rows, y, groups))
    return Split(np.sort(train), np.sort(test), kind)


@dataclass
class Folds:
    """k train/test index pairs covering every row once as test, and how they were grouped."""

    indices: list[tuple[np.ndarray, np.ndarray]]
    grouping: str  # "subject": no subject on both sides of a fold; "image": cells split freely
    note: str | None = None  # why the folds are not subject-grouped, when they are not

    @property
    def k(self) -> int:
        return len(self.indices)


def kfold(
    y: np.ndarray,
    subjects: list[str | None],
    n_folds: int = choices.DEFAULT_FOLDS,
    seed: int = choices.DEFAULT_SEED,
) -> Folds:
    """Stratified k folds grouped by subject when every image has one; else image folds, noted.

    k shrinks to the number of subjects (or images) of the rarer class when that is smaller.
    """
    _check_two_classes(y, "the data")
    if n_folds < 2:
        raise LeukoflowError(f"cross-validation needs at least 2 folds, got {n_folds}")
    rows = np.arange(len(y))
    note = "the catalog has no subject id for some images"
    if all(s not in (None, "") for s in subjects):
        groups = np.asarray(subjects)
        per_class = min(len(set(groups[y == c])) for c in (0, 1))
        if per_class >= 2:
            k = min(n_folds, per_class)
            folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            pairs = _sorted_pairs(folds.split(rows, y, groups))
            # Subjects of very unequal sizes can leave a class out of a training side.
            if any(len(np.unique(y[train])) < 2 for train, _ in pairs):
                raise LeukoflowError(
                    f"{k} subject-grouped folds leave a training side with one class; "
                    "use fewer folds"
                )
            return Folds(pairs, "subject")
        note = f"only {per_class} subject(s) in the rarer class"
    smallest = int(np.bincount(y, minlength=2).min())
    if smallest < 2:
        raise LeukoflowError("too few images for cross-validation: need 2+ of each class")
    folds = StratifiedKFold(n_splits=min(n_folds, smallest), shuffle=True, random_state=seed)
    return Folds(_sorted_pairs(folds.split(rows, y)), "image", note)


def _sorted_pairs(pairs) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.sort(train), np.sort(test)) for train, test in pairs]


def _check_two_classes(y: np.ndarray, what: str) -> None:
    if len(np.unique(y)) < 2:
        raise LeukoflowError(f"{what} has only one class; training needs both ALL and normal")


# `rbf-svm-tuned` (development, bench/cm_validate.py round 4; not a user choice): the RBF SVM
# with C and gamma chosen by inner folds of the training side, subject-grouped where subjects
# are given, by balanced accuracy. Gamma is a multiple of scikit-learn's "scale" value.
TUNED = TUNED_CLASSIFIER
TUNED_C = (0.1, 1.0, 10.0, 100.0)
TUNED_GAMMA = (0.1, 0.3, 1.0, 3.0)
TUNING_FOLDS = 5


def _fit_tuned(x: np.ndarray, y: np.ndarray, groups: Sequence | None, seed: int) -> Pipeline:
    """The best grid point's plain scale + RBF SVM pipeline, refitted on all of x."""
    spread = float(StandardScaler().fit_transform(x).var())
    scale = 1.0 / (x.shape[1] * spread) if spread > 0 else 1.0
    subjects = list(groups) if groups is not None else [None] * len(y)
    folds = kfold(y, subjects, TUNING_FOLDS, seed)
    grid = {"clf__C": list(TUNED_C), "clf__gamma": [f * scale for f in TUNED_GAMMA]}
    search = GridSearchCV(
        make_classifier("rbf-svm", seed), grid, scoring="balanced_accuracy",
        cv=folds.indices, n_jobs=1, error_score="raise",
    )  # fmt: skip
    search.fit(x, y)
    best = search.best_params_
    log.info(
        "%s: C=%g, gamma=%.3g x scale (inner %s folds, balanced accuracy %.3f)",
        TUNED, best["clf__C"], best["clf__gamma"] / scale, folds.grouping, search.best_score_,
    )  # fmt: skip
    return search.best_estimator_


def fit(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    seed: int = choices.DEFAULT_SEED,
    groups: Sequence | None = None,
) -> Pipeline:
    """The named classifier fitted; one log line, not scikit-learn's warning text, where its
    solver stopped at the iteration limit (the linear SVM on thousands of near-collinear
    random-init features can): the model is then the last iterate, still usable.

    `groups`: the subject of each row, used only by `rbf-svm-tuned`'s inner folds."""
    _check_two_classes(y, "the training set")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        if name == TUNED:
            model = _fit_tuned(x, y, groups, seed)
        else:
            model = make_classifier(name, seed).fit(x, y)
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            log.warning(
                "%s stopped at its iteration limit before converging (%d cells x %d features);"
                " its decisions are those of the last iterate",
                name, x.shape[0], x.shape[1],
            )  # fmt: skip
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return model


def decision_scores(model: Pipeline, x: np.ndarray) -> tuple[np.ndarray, str]:
    """A score per cell where higher means more ALL-like, and what kind of score it is."""
    if hasattr(model, "predict_proba"):  # False for the SVMs, which have no calibration
        return model.predict_proba(x)[:, 1], "probability"
    return model.decision_function(x), "decision_value"


def fingerprint(image_ids: list[str]) -> str:
    """Order-free fingerprint of a set of training images."""
    return hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()
