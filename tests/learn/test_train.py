import logging
import warnings

import numpy as np
import pytest
import skops.io as sio
from sklearn.svm import LinearSVC

from leukoflow import choices
from leukoflow.errors import LeukoflowError
from leukoflow.learn import train
from leukoflow.store import model_io


def test_the_papers_classifier_is_pinned():
    """Standardisation + LinearSVC(C=1.0, hinge loss): scikit-learn's default is squared hinge."""
    model = train.make_classifier("linear-svm", seed=0)
    assert [name for name, _ in model.steps] == ["scale", "clf"]
    svm = model[-1]
    assert isinstance(svm, LinearSVC)
    assert (svm.C, svm.loss, svm.penalty) == (1.0, "hinge", "l2")
    assert choices.DEFAULT_CLASSIFIER == "linear-svm"


def test_mlp_has_one_hidden_layer_of_256():
    assert train.make_classifier("mlp")[-1].hidden_layer_sizes == (256,)


def test_unknown_classifier_or_split_is_a_usage_error():
    with pytest.raises(LeukoflowError, match="unknown classifier 'xgboost'"):
        train.make_classifier("xgboost")
    with pytest.raises(LeukoflowError, match="unknown split 'time'"):
        train.check_split("time")


def _dataset(n_subjects=10, cells=6):
    subjects = [f"{'H' if s % 2 else ''}{s}" for s in range(n_subjects) for _ in range(cells)]
    y = np.array([0 if s.startswith("H") else 1 for s in subjects])
    return y, subjects


def test_random_split_is_stratified_90_10_and_seeded():
    y, subjects = _dataset()
    split = train.split_rows(y, subjects, "random", seed=1)
    assert len(split.test) == 6 and len(split.train) == 54
    assert set(y[split.test]) == {0, 1}
    again = train.split_rows(y, subjects, "random", seed=1)
    np.testing.assert_array_equal(split.test, again.test)


def test_subject_split_keeps_every_subject_on_one_side():
    y, subjects = _dataset()
    split = train.split_rows(y, subjects, "subject", seed=0)
    groups = np.asarray(subjects)
    assert not set(groups[split.train]) & set(groups[split.test])
    assert set(y[split.test]) == {0, 1} and set(y[split.train]) == {0, 1}


def test_subject_split_needs_subject_ids_and_two_subjects_per_class():
    y, subjects = _dataset()
    with pytest.raises(LeukoflowError, match="needs a subject id"):
        train.split_rows(y, [None] * len(y), "subject")
    y2, subjects2 = _dataset(n_subjects=3)
    with pytest.raises(LeukoflowError, match="at least 2 subjects per class"):
        train.split_rows(y2, subjects2, "subject")


def test_one_class_is_refused():
    with pytest.raises(LeukoflowError, match="only one class"):
        train.split_rows(np.ones(10, int), ["1"] * 10, "random")


def test_model_files_round_trip_through_skops():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    y = (x[:, 0] > 0).astype(int)
    for name in train.CLASSIFIERS:
        model = train.fit(name, x, y)
        loaded = model_io.model_from_bytes(model_io.model_to_bytes(model))
        np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


class Payload:
    """Stands in for any object an attacker could smuggle into a model file."""


def test_a_model_file_carrying_an_unexpected_type_is_refused():
    model = train.fit("linear-svm", np.eye(4), np.array([0, 1, 0, 1]))
    model.steps[-1][1].smuggled = Payload()
    tampered = sio.dumps(model)
    assert any(t.endswith("Payload") for t in sio.get_untrusted_types(data=tampered))
    with pytest.raises(LeukoflowError, match="untrusted types"):
        model_io.model_from_bytes(tampered)


def test_scores_are_decision_values_for_the_svm_and_probabilities_otherwise():
    x = np.random.default_rng(0).normal(size=(30, 3))
    y = (x[:, 0] > 0).astype(int)
    _, kind = train.decision_scores(train.fit("linear-svm", x, y), x)
    assert kind == "decision_value"
    scores, kind = train.decision_scores(train.fit("forest", x, y), x)
    assert kind == "probability" and scores.min() >= 0 and scores.max() <= 1


def test_a_solver_stopped_at_its_limit_is_one_log_line_not_a_warning(caplog):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), np.tile([0, 1], 20)  # noise: the MLP cannot settle
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping fit() fails the test
        with caplog.at_level(logging.WARNING, logger="leukoflow.train"):
            model = train.fit("mlp", x, y)
    assert "mlp stopped at its iteration limit" in caplog.text and "40 cells x 5" in caplog.text
    assert model.predict(x).shape == (40,)


def test_the_tuned_rbf_svm_chooses_on_subject_folds_and_saves_as_a_plain_svm(caplog):
    """bench/cm_validate.py round 4's `rbf-svm-tuned`: C and gamma from its grid, chosen on
    subject-grouped inner folds when subjects are given; the result is the plain pipeline."""
    y, subjects = _dataset(n_subjects=10, cells=6)
    x = np.random.default_rng(0).normal(size=(len(y), 4)) + y[:, None]
    with caplog.at_level(logging.INFO, logger="leukoflow.train"):
        grouped = train.fit(train.TUNED, x, y, 0, subjects)
        ungrouped = train.fit(train.TUNED, x, y, 0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(train.TUNED)]
    assert "inner subject folds" in lines[0] and "inner image folds" in lines[1]
    for model in (grouped, ungrouped):
        assert [name for name, _ in model.steps] == ["scale", "clf"]
        assert model[-1].kernel == "rbf" and model[-1].C in train.TUNED_C
    loaded = model_io.model_from_bytes(model_io.model_to_bytes(grouped))
    assert np.array_equal(loaded.predict(x), grouped.predict(x))
