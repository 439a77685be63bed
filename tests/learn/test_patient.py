"""Patient-level decisions: scores from cell counts, a threshold from training patients only."""

import numpy as np
import pytest

from leukoflow.errors import LeukoflowError
from leukoflow.learn.patient import (
    PatientScore,
    choose_patient_threshold,
    decide,
    patient_labels,
    patient_metrics,
    patient_scores,
)


def test_patient_score_is_the_fraction_of_cells_at_or_above_the_cell_threshold():
    subjects = ["A", "A", "A", "A", "B", "B", None, ""]
    cells = [0.5, 0.0, -0.1, -2.0, 1.0, 3.0, 9.0, 9.0]
    scores = patient_scores(subjects, cells, cell_threshold=0.0)
    # 0.0 sits on the threshold and counts as flagged; cells without a subject form no patient.
    assert scores == {"A": PatientScore(0.5, 4, 2), "B": PatientScore(1.0, 2, 2)}
    assert patient_scores(subjects, cells, cell_threshold=2.0)["B"] == PatientScore(0.5, 2, 1)


def test_patient_scores_refuse_mismatched_lengths_and_non_finite_scores():
    with pytest.raises(ValueError, match="3 cell scores for 2"):
        patient_scores(["A", "B"], [0.1, 0.2, 0.3], 0.0)
    with pytest.raises(ValueError, match="finite"):
        patient_scores(["A"], [np.nan], 0.0)


def test_labels_come_from_the_cells_and_mixed_subjects_are_excluded_with_a_reason():
    known, excluded = patient_labels(
        ["1", "1", "H2", "H2", "X", "X", None], ["all", "all", "hem", "hem", "all", "hem", "all"]
    )
    assert known == {"1": 1, "H2": 0}
    assert set(excluded) == {"X", ""}
    assert "mixed labels" in excluded["X"] and "without a subject id" in excluded[""]
    assert patient_labels(["1", "H2"], [1, 0]) == ({"1": 1, "H2": 0}, {})


def test_threshold_is_the_midpoint_of_the_widest_optimal_interval():
    # ALL patients at 0.6 and 0.9, normal ones at 0.1 and 0.2: every t in (0.2, 0.6] separates
    # them perfectly; the midpoint is 0.4.
    scores = {"a": 0.6, "b": 0.9, "c": 0.1, "d": 0.2}
    labels = {"a": 1, "b": 1, "c": 0, "d": 0}
    assert choose_patient_threshold(scores, labels) == pytest.approx(0.4)
    # PatientScore values and string labels work the same way.
    as_records = {k: PatientScore(v, 10, int(v * 10)) for k, v in scores.items()}
    as_text = {k: "all" if v else "hem" for k, v in labels.items()}
    assert choose_patient_threshold(as_records, as_text) == pytest.approx(0.4)


def test_ties_between_equally_good_intervals_go_to_the_wider_then_the_lower():
    # Interleaved classes: scores 0.2 (hem), 0.4 (all), 0.6 (hem), 0.8 (all).
    scores = {"h1": 0.2, "a1": 0.4, "h2": 0.6, "a2": 0.8}
    labels = {"h1": 0, "a1": 1, "h2": 0, "a2": 1}
    # t in (0.2, 0.4]: sens 1, spec 0.5 -> 0.75; t in (0.6, 0.8]: sens 0.5, spec 1 -> 0.75.
    # Equal width 0.2: the lower one wins (screening prefers sensitivity).
    assert choose_patient_threshold(scores, labels) == pytest.approx(0.3)
    # Widen the upper gap: now it is the widest optimal interval and wins.
    scores["a2"] = 0.95
    assert choose_patient_threshold(scores, labels) == pytest.approx(0.775)


def test_the_threshold_depends_on_training_patients_only():
    # Training patients put the boundary at 0.5 (midpoint of (0.3, 0.7]). Test patients at 0.35
    # and 0.4 would move it if they were used; the function never sees them, and deciding them
    # with the training threshold gets one of them wrong, as it honestly should.
    train_scores = {"a1": 0.7, "a2": 0.9, "h1": 0.1, "h2": 0.3}
    train_labels = {"a1": 1, "a2": 1, "h1": 0, "h2": 0}
    test_scores = {"a3": PatientScore(0.4, 5, 2), "h3": PatientScore(0.35, 20, 7)}
    test_labels = {"a3": 1, "h3": 0}
    threshold = choose_patient_threshold(train_scores, train_labels)
    assert threshold == pytest.approx(0.5)
    leaked = choose_patient_threshold(
        {**train_scores, **{k: v.score for k, v in test_scores.items()}},
        {**train_labels, **test_labels},
    )
    assert leaked != pytest.approx(threshold)
    decisions = decide(test_scores, threshold)
    assert not decisions["a3"].flagged and not decisions["h3"].flagged
    result = patient_metrics(decisions, test_labels, n_boot=0)
    assert result["metrics"]["sensitivity"]["value"] == 0.0
    assert result["metrics"]["specificity"]["value"] == 1.0


def test_a_threshold_needs_both_classes():
    with pytest.raises(LeukoflowError, match="both classes"):
        choose_patient_threshold({"a": 0.5, "b": 0.7}, {"a": 1, "b": 1})


def test_decisions_carry_the_cell_counts_and_mark_thin_patients():
    scores = {"A": PatientScore(0.5, 4, 2), "B": PatientScore(1.0, 1, 1)}
    decisions = decide(scores, 0.5, min_cells=3)
    assert decisions["A"].flagged and decisions["A"].n_cells == 4 and not decisions["A"].thin
    assert decisions["B"].flagged and decisions["B"].thin and decisions["B"].threshold == 0.5
    with pytest.raises(LeukoflowError, match="min_cells"):
        decide(scores, 0.5, min_cells=0)


def test_metrics_count_patients_and_cells_and_give_patient_bootstrap_intervals():
    rng = np.random.default_rng(0)
    scores, labels = {}, {}
    for i in range(40):
        label = i % 2
        n = int(rng.integers(3, 30))
        flagged = int(rng.binomial(n, 0.7 if label else 0.3))
        scores[f"S{i}"] = PatientScore(flagged / n, n, flagged)
        labels[f"S{i}"] = label
    decisions = decide(scores, 0.5)
    result = patient_metrics(decisions, labels, n_boot=500, seed=1)
    assert result["n_patients"] == 40 and result["support"] == {"all": 20, "hem": 20}
    assert result["n_cells"] == sum(s.n_cells for s in scores.values())
    (tn, fp), (fn, tp) = result["confusion_matrix"]["matrix"]
    assert tn + fp + fn + tp == 40 and tp + fn == 20
    m = result["metrics"]
    assert m["sensitivity"]["value"] == tp / 20 and m["specificity"]["value"] == tn / 20
    assert m["balanced_accuracy"]["value"] == pytest.approx((tp / 20 + tn / 20) / 2)
    for key in ("sensitivity", "specificity", "balanced_accuracy"):
        assert m[key]["low"] <= m[key]["value"] <= m[key]["high"]
        # 20 patients per class: an interval of a proportion is wide, but not degenerate.
        assert 0.1 < m[key]["high"] - m[key]["low"] < 0.7
    rows = {row["subject_id"]: row for row in result["patients"]}
    assert rows["S0"]["n_cells"] == scores["S0"].n_cells
    assert rows["S0"]["correct"] == (rows["S0"]["flagged"] == bool(labels["S0"]))
    # Same seed, same intervals; no resamples, no intervals.
    assert patient_metrics(decisions, labels, n_boot=500, seed=1)["metrics"] == m
    assert patient_metrics(decisions, labels, n_boot=0)["metrics"]["sensitivity"]["low"] is None


def test_a_class_without_patients_has_no_metric_rather_than_zero():
    decisions = decide({"A": PatientScore(1.0, 3, 3)}, 0.5)
    result = patient_metrics(decisions, {"A": "all"}, n_boot=50)
    assert result["metrics"]["specificity"] == {"value": None, "low": None, "high": None}
    assert result["metrics"]["sensitivity"]["value"] == 1.0
    with pytest.raises(LeukoflowError, match="no labelled patient"):
        patient_metrics(decisions, {"B": 1}, n_boot=0)


def test_thresholds_stay_in_zero_one_and_a_useless_ranking_flags_everyone():
    # Inverted scores: every cut is worse than chance, so "everyone" and "no one" tie at 0.5,
    # both of zero width; the lower one (flag everyone, a screening tool's safe side) wins.
    assert choose_patient_threshold({"a": 0.0, "h": 1.0}, {"a": 1, "h": 0}) == 0.0
    # Everyone at 1.0: flagging everyone ([0, 1], width 1) beats flagging no one ((1, 1], width
    # 0) at equal balanced accuracy; its midpoint 0.5 indeed flags everyone.
    same = {"a": 1.0, "h": 1.0, "h2": 1.0}
    assert choose_patient_threshold(same, {"a": 1, "h": 0, "h2": 0}) == 0.5
    assert choose_patient_threshold({"a": 0.5, "h": 0.9}, {"a": 1, "h": 0}) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        choose_patient_threshold({"a": 1.5, "h": 0.0}, {"a": 1, "h": 0})
