"""The one fold runner (learn/folds.py): `validate`, `experiments` and bench/cm_validate give the
same numbers for the same cells, and its shared rules hold."""

import numpy as np
import pytest

from bench import cm_validate
from leukoflow.errors import LeukoflowError
from leukoflow.learn import experiments as ex
from leukoflow.learn import folds, patient, train, validate


def _cells(seed: int = 3):
    """14 subjects of 6-10 cells, a weak label signal under subject-level offsets: folds
    disagree, patients are not all right, so equal numbers are not equal by accident."""
    rng = np.random.default_rng(seed)
    subjects, y, rows = [], [], []
    for s in range(14):
        label = s % 2
        centre = rng.normal(scale=1.0, size=5) + 0.8 * label
        for _ in range(int(rng.integers(6, 11))):
            subjects.append(f"P{s}")
            y.append(label)
            rows.append(centre + rng.normal(scale=1.0, size=5))
    return np.array(rows), np.array(y), subjects


@pytest.mark.parametrize("classifier", ["linear-svm", "rbf-svm"])
def test_validate_experiments_and_the_bench_give_the_same_numbers(classifier):
    x, y, subjects = _cells()
    result = validate.cross_validate(x, y, subjects, classifier, n_folds=4, n_boot=50)

    plan = ex.plan_evaluations(y, subjects, ["subject"], n_folds=4, seed=0)[0]
    cell = ex.Cell(("f",), classifier, "subject")
    grid = ex.evaluate_cell(x, y, subjects, np.arange(x.shape[1]), cell, plan, n_boot=50)
    for key in ("accuracy", "f1"):
        assert grid["metrics"][key]["mean"] == pytest.approx(result["metrics"][key]["mean"])
        assert grid["metrics"][key]["std"] == pytest.approx(result["metrics"][key]["std"])
    assert grid["metrics"]["roc_auc"]["mean"] == pytest.approx(result["metrics"]["roc_auc"]["mean"])
    assert grid["n_test"] == result["n_images"] and grid["folds"] == result["folds"]

    bench = cm_validate._patient_summary(result["patient_level"])
    level = result["patient_level"]
    assert bench["patients"] == level["n_patients"] == 14
    assert bench["correct"] == sum(p["correct"] for p in level["patients"])
    assert bench["balanced_accuracy"] == level["metrics"]["balanced_accuracy"]["pooled"]
    # The bench's patient decisions are the product's: score >= its fold's threshold.
    for d in bench["decisions"]:
        assert d["call"] == int(d["score"] >= d["threshold"])


def test_the_patient_threshold_comes_from_inner_folds_of_the_training_side_only():
    x, y, subjects = _cells()
    threshold = folds.patient_threshold(x, y, subjects, "linear-svm", n_folds=4)
    # By hand: inner folds' out-of-fold scores, the product's patient rule.
    inner = train.kfold(y, subjects, 4, 0)
    scores = np.zeros(len(y))
    for fit_rows, held_rows in inner.indices:
        model = train.fit("linear-svm", x[fit_rows], y[fit_rows], 0)
        scores[held_rows], _ = train.decision_scores(model, x[held_rows])
    labels, _ = patient.patient_labels(subjects, y)
    expected = patient.choose_patient_threshold(
        patient.patient_scores(subjects, scores, 0.0), labels
    )
    assert threshold == pytest.approx(expected)

    # A training side with one subject of a class has no inner subject-grouped folds: said so.
    keep = [i for i, s in enumerate(subjects) if s in {"P0", "P1", "P2", "P4"}]
    with pytest.raises(LeukoflowError, match="inside a training side"):
        folds.patient_threshold(x[keep], y[keep], [subjects[i] for i in keep], "linear-svm", 2)


def test_cells_are_flagged_at_the_classifiers_own_threshold_and_untested_rows_stay_unscored():
    x, y, subjects = _cells()
    split = train.split_rows(y, subjects, "subject", seed=0)
    held = folds.out_of_fold(x, y, train.Folds([(split.train, split.test)], "subject"), "knn")
    assert held.score_kind == "probability" and held.cell_threshold == 0.5
    assert np.isnan(held.scores[split.train]).all()
    assert (
        held.flagged[split.test].tolist() == (held.scores[split.test] >= 0.5).astype(int).tolist()
    )
    assert sorted(held.tested.tolist()) == sorted(split.test.tolist())


def test_spread_and_best_share_one_rule():
    assert folds.spread([0.5, None, 0.7]) == {
        "mean": pytest.approx(0.6),
        "std": pytest.approx(np.std([0.5, 0.7], ddof=1)),
    }
    assert folds.spread([None]) == {"mean": None, "std": None}
    results = [
        {"metrics": {"accuracy": {"mean": 0.8}, "f1": {"mean": 0.5}}},
        {"metrics": {"accuracy": {"mean": 0.8}, "f1": {"mean": 0.6}}},
        {"metrics": {"accuracy": {"mean": None}, "f1": {"mean": 0.9}}},
    ]
    assert folds.best(results, ("accuracy", "f1")) == 1
    assert ex.best_cell(results) == 1
    assert folds.best([], ("accuracy",)) is None
