"""Calibrated risk score, threshold for a target sensitivity, Brier, reliability, folds, report."""

import os
import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from leukoflow.errors import LeukoflowError
from leukoflow.learn import calibration, evaluate, train
from leukoflow.present.report import render_report
from leukoflow.store import model_io


def subject_data(n_subjects=12, cells=15, signal=1.0, dim=8, seed=0):
    """Cells of subjects (half ALL) whose features carry the label with the given strength."""
    rng = np.random.default_rng(seed)
    y = np.repeat([1 - s % 2 for s in range(n_subjects)], cells)
    subjects = [f"s{s}" for s in range(n_subjects) for _ in range(cells)]
    x = rng.normal(size=(len(y), dim)) + signal * y[:, None]
    return x, y, subjects


def test_the_threshold_is_the_highest_that_reaches_the_target_sensitivity():
    y = np.array([1] * 20 + [0] * 10)
    scores = np.concatenate([np.linspace(0.99, 0.40, 20), np.linspace(0.0, 0.9, 10)])
    chosen = calibration.choose_threshold(y, scores, 0.95)
    assert chosen["threshold"] == pytest.approx(scores[18])  # 19 of 20 ALL cells flagged
    assert chosen["sensitivity"] == pytest.approx(0.95)
    # Any higher threshold would miss a 2nd ALL cell and fall below the target.
    assert np.mean(scores[:20] >= np.nextafter(chosen["threshold"], 1)) < 0.95
    negatives_passed = np.mean(scores[20:] < chosen["threshold"])
    assert chosen["specificity"] == pytest.approx(negatives_passed)
    every_all = calibration.choose_threshold(y, scores, 1.0)
    assert every_all["threshold"] == pytest.approx(0.40) and every_all["sensitivity"] == 1.0


@pytest.mark.parametrize("target", [0.0, 1.5, -0.1])
def test_a_target_outside_0_1_is_a_user_error(target):
    with pytest.raises(LeukoflowError, match="--target-sensitivity"):
        calibration.check_target_sensitivity(target)


def test_no_all_cells_in_validation_is_a_user_error():
    with pytest.raises(LeukoflowError, match="no ALL cells"):
        calibration.choose_threshold(np.zeros(5, int), np.linspace(0, 1, 5), 0.9)


def test_brier_and_reliability_points():
    y = np.array([0, 0, 1, 1])
    assert calibration.brier_score(y, np.array([0.0, 0.0, 1.0, 1.0])) == 0.0
    assert calibration.brier_score(y, np.full(4, 0.5)) == pytest.approx(0.25)
    points = calibration.reliability(
        np.array([0, 1, 1, 1, 0]), np.array([0.05, 0.9, 1.0, 0.95, 0.08])
    )
    assert points["count"] == [2, 3]  # bins [0, 0.1) and [0.9, 1.0]; 1.0 joins the top bin
    assert points["fraction_all"] == [0.0, 1.0]
    assert points["mean_predicted"][1] == pytest.approx(0.95)


def test_subject_folds_never_split_a_subject_and_shrink_to_the_subjects_available():
    _, y, subjects = subject_data(n_subjects=6, cells=5)
    folds = train.kfold(y, subjects, n_folds=5, seed=0)
    assert folds.grouping == "subject" and folds.k == 3  # 3 subjects per class
    groups = np.asarray(subjects)
    seen = np.concatenate([test for _, test in folds.indices])
    assert sorted(seen.tolist()) == list(range(len(y)))
    for train_rows, test_rows in folds.indices:
        assert not set(groups[train_rows]) & set(groups[test_rows])


def test_without_subject_ids_the_folds_fall_back_to_images_and_say_why():
    _, y, _ = subject_data(n_subjects=4, cells=10)
    folds = train.kfold(y, [None] * len(y), n_folds=5, seed=0)
    assert folds.grouping == "image" and folds.k == 5 and "no subject id" in folds.note
    with pytest.raises(LeukoflowError, match="at least 2 folds"):
        train.kfold(y, [None] * len(y), n_folds=1)


def test_out_of_fold_probabilities_are_honest_where_in_sample_ones_are_not():
    # Pure noise with more features than cells: a linear SVM fits the training cells perfectly,
    # so only probabilities from held-out folds reveal that nothing was learnt.
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(80, 200)), np.tile([0, 1], 40)
    folds = train.kfold(y, [None] * 80, n_folds=5, seed=0)
    model = calibration.fit_calibrated("linear-svm", x, y, folds)
    held_out = calibration.out_of_fold_probabilities(model, x, folds)
    assert not np.isnan(held_out).any() and ((held_out >= 0) & (held_out <= 1)).all()
    assert roc_auc_score(y, held_out) < 0.75
    assert roc_auc_score(y, model.predict_proba(x)[:, 1]) > 0.9


@pytest.mark.parametrize("classifier", ["linear-svm", "forest"])
def test_folds_fitted_in_parallel_give_the_model_fitted_one_fold_at_a_time(classifier):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, subjects = subject_data(signal=0.8)
    folds = train.kfold(y, subjects, 5, seed=0)
    estimator = train.make_classifier(classifier, 0).named_steps["clf"]
    serial = CalibratedClassifierCV(
        estimator, method=calibration.METHOD, cv=folds.indices, ensemble=True
    )
    serial = Pipeline([("scale", StandardScaler()), ("clf", serial)]).fit(x, y)
    # Folds fitted in threads raced on liblinear's one random generator and differed here by up
    # to 6e-6 in about half the fits; repeated fits make such a race show.
    for _ in range(3):
        model = calibration.fit_calibrated(classifier, x, y, folds, seed=0)
        assert model[-1].n_jobs == min(5, os.cpu_count())
        np.testing.assert_allclose(
            model.predict_proba(x), serial.predict_proba(x), rtol=0, atol=1e-12
        )
        np.testing.assert_allclose(
            calibration.out_of_fold_probabilities(model, x, folds),
            calibration.out_of_fold_probabilities(serial, x, folds),
            rtol=0,
            atol=1e-12,
        )


def test_the_calibrated_model_is_a_probability_pipeline_that_survives_skops():
    x, y, subjects = subject_data()
    result = calibration.calibrate_and_choose_threshold(
        "linear-svm", x[:150], y[:150], subjects[:150], x[150:], y[150:], 0.9, seed=0
    )
    summary = result.summary
    assert summary["grouping"] == "subject" and summary["method"] == "sigmoid"
    assert summary["validation"]["sensitivity"] >= 0.9
    assert summary["threshold"] == result.threshold and 0 < result.threshold < 1
    assert summary["threshold_rule"] == "score >= threshold means all"
    loaded = model_io.model_from_bytes(model_io.model_to_bytes(result.model))
    scores, kind = train.decision_scores(loaded, x[150:])
    assert kind == "probability"
    np.testing.assert_allclose(scores, result.test_probabilities)
    flagged = (scores >= result.threshold).astype(int)
    assert summary["test"]["metrics"] == evaluate.compute_metrics(y[150:], flagged, scores)
    assert summary["test"]["brier"] < 0.25  # better than a constant 0.5 on learnable data


def test_subject_bootstrap_is_wider_than_cell_bootstrap_when_subjects_cluster():
    # Each subject is either all right or all wrong: cells are not independent.
    y_true = np.ones(100, int)
    y_pred = np.repeat([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], 10)
    groups = np.repeat([f"s{i}" for i in range(10)], 10)
    cells = evaluate.bootstrap_interval(y_true, y_pred, None, "accuracy", n_boot=500)
    subjects = evaluate.bootstrap_interval(
        y_true, y_pred, None, "accuracy", n_boot=500, groups=groups
    )
    assert subjects[1] - subjects[0] > 2 * (cells[1] - cells[0])
    with pytest.raises(ValueError, match="groups has 3 values"):
        evaluate.bootstrap_interval(y_true, y_pred, None, "accuracy", groups=["a", "b", "c"])


def test_the_report_shows_the_operating_point_with_its_plots():
    x, y, subjects = subject_data()
    result = calibration.calibrate_and_choose_threshold(
        "linear-svm", x[:150], y[:150], subjects[:150], x[150:], y[150:], 0.95
    )
    y_test = y[150:]
    risk = {"summary": result.summary, "y_true": y_test, "probabilities": result.test_probabilities}
    summary = {"metrics": evaluate.compute_metrics(y_test, y_test, None), "split": "subject"}
    markdown, html_text = render_report(summary, y_test, y_test, None, risk=risk)
    assert "## Risk score and operating point" in markdown
    assert f"{result.threshold:.4f}" in markdown and "Brier" in markdown
    captions = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', html_text)
    # The saved model's plots lead; the paper's plain classifier's confusion matrix follows.
    assert captions == [
        f"Confusion matrix at threshold {result.threshold:.4f}",
        f"Calibration (test Brier {result.summary['test']['brier']:.4f})",
        "ROC of the calibrated score, operating point marked",
        "Precision-recall of the calibrated score, operating point",
        "Confusion matrix",
    ]
