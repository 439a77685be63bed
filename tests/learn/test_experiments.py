"""The experiment grid on synthetic feature matrices: combinations, folds, augmentation, tables."""

import csv
import io

import numpy as np
import pytest

from leukoflow import choices
from leukoflow.errors import LeukoflowError
from leukoflow.learn import experiments as ex
from leukoflow.learn import folds, train
from leukoflow.present.report import render_experiments_html

TRIO = ["vgg16", "densenet121", "inception_resnet_v2"]


def subject_matrix(n_subjects=12, cells=12, dim=6, signal=0.0, seed=0):
    """Each subject's cells sit around its own random centre; labels follow the subject.

    With signal=0 the centres say nothing about the label, so only memorising a subject helps.
    """
    rng = np.random.default_rng(seed)
    labels = np.array([s % 2 for s in range(n_subjects)])
    centres = rng.normal(scale=3.0, size=(n_subjects, dim)) + signal * labels[:, None]
    y = np.repeat(labels, cells)
    x = np.repeat(centres, cells, axis=0) + rng.normal(scale=0.3, size=(len(y), dim))
    subjects = [f"s{s}" for s in range(n_subjects) for _ in range(cells)]
    return x.astype(np.float32), y, subjects


def test_the_grid_has_singles_then_the_pairs_and_the_trio():
    assert ex.feature_sets(["vgg16", "densenet121"]) == [
        ("vgg16",),
        ("densenet121",),
        ("vgg16", "densenet121"),
    ]
    six = list(choices.PAPER_BACKBONES)
    sets = ex.feature_sets(six)
    assert sets[:6] == [(n,) for n in six]
    # The paper's trio, in the user's order: VGG16, InceptionResNetV2, DenseNet121.
    assert sets[6:] == [
        ("vgg16", "inception_resnet_v2"),
        ("vgg16", "densenet121"),
        ("inception_resnet_v2", "densenet121"),
        ("vgg16", "inception_resnet_v2", "densenet121"),
    ]
    assert ex.feature_sets(six, trio=["vgg19", "resnet101", "vgg16"])[-1] == (
        "vgg16",
        "vgg19",
        "resnet101",
    )
    cells = ex.grid(sets, ["knn", "mlp"], ["random", "subject"])
    assert len(cells) == 10 * 2 * 2 and cells[0].evaluation == "random"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ex.parse_classifiers("knn,xgboost"), "unknown classifier xgboost"),
        (lambda: ex.parse_classifiers("knn,knn"), "listed twice"),
        (lambda: ex.check_split_choice("time"), "unknown split"),
        (lambda: ex.feature_sets(TRIO, trio=["vgg16", "vgg19", "densenet121"]), "--trio"),
    ],
)
def test_bad_choices_are_user_errors(call, message):
    with pytest.raises(LeukoflowError, match=message):
        call()


def test_feature_columns_pick_each_backbone_block_in_set_order():
    columns = ex.feature_columns(("c", "a"), ["a", "b", "c"], [2, 3, 1])
    assert columns.tolist() == [5, 0, 1]


def test_augmented_copies_only_join_training_folds_of_their_source():
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    y = np.array([0, 1, 0, 1])
    copies = folds.Augmented(np.full((4, 2), 100.0, np.float32), np.array([0, 1, 2, 3]))
    subjects = np.array(["a", "b", "c", "d"], dtype=object)
    x_train, y_train, s_train = folds.training_side(
        x, y, subjects, np.array([0, 1]), np.array([0, 1]), copies
    )
    assert x_train.shape == (4, 2) and y_train.tolist() == [0, 1, 0, 1]
    assert s_train.tolist() == ["a", "b", "a", "b"]  # a copy belongs to its source's subject
    assert (x_train[2:] == 100).all()  # the copies of rows 0 and 1, never of test rows 2 and 3


def test_the_random_split_inflates_what_subject_folds_reveal():
    # Labels cannot be learnt from the features, but a subject can be recognised: the paper's
    # random split rewards that, subject-grouped folds do not.
    x, y, subjects = subject_matrix()
    plans = ex.plan_evaluations(y, subjects, ["random", "subject"], n_folds=4, seed=0)
    assert [p.folds.k for p in plans] == [1, 4] and plans[1].folds.grouping == "subject"
    columns = np.arange(x.shape[1])
    results = {
        plan.name: ex.evaluate_cell(
            x, y, subjects, columns, ex.Cell(("a",), "knn", plan.name), plan, n_boot=200
        )
        for plan in plans
    }
    assert results["random"]["metrics"]["accuracy"]["mean"] > 0.95
    assert results["subject"]["metrics"]["accuracy"]["mean"] < 0.8
    honest = results["subject"]
    assert honest["n_test"] == len(y) and len(honest["per_fold"]) == 4
    accuracy = honest["metrics"]["accuracy"]
    assert accuracy["std"] > 0 and accuracy["low"] <= accuracy["high"]
    assert results["random"]["metrics"]["accuracy"]["std"] is None  # one test set


def test_the_random_evaluation_is_the_same_split_as_leukoflow_run():
    x, y, subjects = subject_matrix(n_subjects=6)
    (plan,) = ex.plan_evaluations(y, subjects, ["random"], n_folds=5, seed=3)
    split = train.split_rows(y, subjects, "random", seed=3)
    train_rows, test_rows = plan.folds.indices[0]
    assert train_rows.tolist() == split.train.tolist() and test_rows.tolist() == split.test.tolist()


def grid_results():
    x, y, subjects = subject_matrix(signal=4.0)
    plans = ex.plan_evaluations(y, subjects, ["random", "subject"], n_folds=3, seed=0)
    results = []
    for plan in plans:
        for classifier in ("linear-svm", "tree"):
            cell = ex.Cell(("a",), classifier, plan.name)
            results.append(
                ex.evaluate_cell(x, y, subjects, np.arange(x.shape[1]), cell, plan, n_boot=100)
            )
    summary = {
        "experiment_id": "e1",
        "dataset": "synthetic",
        "backbones": ["a"],
        "classifiers": ["linear-svm", "tree"],
        "image_size": 32,
        "weights_id": "random-seed0",
        "seed": 0,
        "augment": False,
        "n_images": len(y),
        "note": None,
        "evaluations": [
            {"name": p.name, "label": p.label, "grouping": p.folds.grouping, "note": None}
            for p in plans
        ],
        "cells": results,
    }
    return summary


def test_tables_mark_one_best_cell_and_round_trip_as_csv():
    summary = grid_results()
    subject = ex.results_for(summary["cells"], "subject")
    rows = ex.table_rows(subject)
    assert sum(r["best"] for r in rows) == 1
    best = max(subject, key=lambda r: r["metrics"]["accuracy"]["mean"])
    assert next(r for r in rows if r["best"])["classifier"] == best["classifier"]
    parsed = list(csv.DictReader(io.StringIO(ex.to_csv(rows))))
    assert len(parsed) == 2 and float(parsed[0]["accuracy_mean"]) == rows[0]["accuracy_mean"]
    table = ex.markdown_table(subject)
    starred = [line for line in table.splitlines() if "★" in line]
    assert len(starred) == 1 and best["classifier"] in starred[0] and " ± " in starred[0]


def test_the_report_puts_both_splits_side_by_side_and_explains_the_gap():
    summary = grid_results()
    gap = ex.comparison(summary["cells"])
    # One row per classifier, its numbers taken from the matching cells of the grid.
    assert [(r["feature_set"], r["classifier"]) for r in gap] == [
        ("a", "linear-svm"),
        ("a", "tree"),
    ]
    cell = {(c["classifier"], c["evaluation"]): c["metrics"] for c in summary["cells"]}
    markdown = ex.experiments_markdown(summary)
    for row in gap:
        for key in ("accuracy", "f1"):
            random_mean = cell[row["classifier"], "random"][key]["mean"]
            subject = cell[row["classifier"], "subject"][key]
            assert row[f"{key}_random"] == random_mean
            assert (row[f"{key}_subject"], row[f"{key}_subject_std"]) == (
                subject["mean"],
                subject["std"],
            )
            assert row[f"{key}_gap"] == pytest.approx(random_mean - subject["mean"])
            assert f"{random_mean - subject['mean']:+.4f}" in markdown  # shown signed
    assert "## Random split vs. subject split" in markdown and ex.SPLIT_GAP_EXPLANATION in markdown
    assert markdown.count("| ★ ") == 2  # one best cell per table
    html_text = render_experiments_html(summary)
    assert html_text.count('<tr class="best">') == 2
    assert html_text.count("data:image/png;base64,") == 1  # the random-vs-subject plot
    assert "http" not in html_text.replace("http-equiv", "")


def test_without_subject_ids_the_honest_table_says_it_fell_back():
    x, y, _ = subject_matrix(n_subjects=4)
    (plan,) = ex.plan_evaluations(y, [None] * len(y), ["subject"], n_folds=3, seed=0)
    assert plan.folds.grouping == "image" and "NOT subject-grouped" in plan.label
    summary = grid_results()
    summary["evaluations"][1] |= {"grouping": "image", "note": plan.folds.note}
    assert "fell back to image-level folds" in ex.experiments_markdown(summary)
    assert "fell back to image-level folds" in render_experiments_html(summary)
