"""The real experiments flow, then a run on its features: local Ray, Prefect's harness, 32 px."""

import csv
import json
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pytest

from leukoflow.features.catalog import build_catalog
from leukoflow.learn import train
from leukoflow.present.explain import stored_vector
from leukoflow.recipe import FeatureRecipe
from leukoflow.store import registry
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_catalog, read_runs, write_catalog

pytestmark = pytest.mark.integration

PAIR = ["vgg16", "densenet121"]
PAIR_RECIPE = FeatureRecipe(tuple(PAIR), weights="none", image_size=32)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, synthetic_images, ray_local, prefect_harness):
    from leukoflow.flows.experiments import run_experiments

    store = tmp_path_factory.mktemp("store")
    # Experiments read a catalogued dataset; cataloguing alone needs no engine.
    write_catalog(
        open_location(str(store)), "synthetic", build_catalog(str(synthetic_images), "synthetic")
    )
    summary = run_experiments(
        store=str(store), dataset="synthetic", recipe=PAIR_RECIPE,
        classifiers=["linear-svm", "knn"], augment=True, n_boot=200,
    )  # fmt: skip
    return store, summary


def test_a_run_on_the_same_images_reuses_the_features_and_saves_a_calibrated_model(
    experiment, synthetic_images
):
    from leukoflow.flows.run import run_pipeline

    store, _ = experiment
    run = run_pipeline(
        images=str(synthetic_images), store=str(store), dataset="synthetic", recipe=PAIR_RECIPE,
        split="subject",
    )  # fmt: skip
    assert run["extraction"]["computed"] == {}  # the experiments stored every original vector
    model, record = registry.load_model(open_location(str(store)), run["model_id"])
    assert record.score_kind == "probability" and 0 < record.threshold < 1
    assert record.target_sensitivity == 0.95
    assert record.calibration["grouping"] == "subject"
    assert record.calibration["validation"]["sensitivity"] >= 0.95
    assert record.classifier_params["loss"] == "hinge"  # the paper's classifier, calibrated
    assert record.code_version.startswith(("git:", "leukoflow=="))
    folder = store / "models" / run["model_id"]
    metrics = json.loads((folder / "metrics.json").read_text())
    # The saved model, on the held-out cells' stored vectors (the experiments' own), at its
    # threshold: exactly the operating point metrics.json reports.
    root = open_location(str(store))
    test_ids = record.test_image_ids
    x = np.stack([stored_vector(root, record.feature_recipe, i) for i in test_ids])
    assert x.shape == (len(test_ids), 512 + 1024)
    scores, kind = train.decision_scores(model, x)
    assert kind == "probability"
    labels = {r["image_id"]: r["label"] for r in read_catalog(root, "synthetic").to_pylist()}
    y = np.array([int(labels[i] == "all") for i in test_ids])
    flagged = (scores >= record.threshold).astype(int)
    confusion = [
        [int(((y == 0) & (flagged == 0)).sum()), int(((y == 0) & (flagged == 1)).sum())],
        [int(((y == 1) & (flagged == 0)).sum()), int(((y == 1) & (flagged == 1)).sum())],
    ]
    cells = metrics["operating_point"]["cells"]
    assert cells["confusion_matrix"]["matrix"] == confusion and cells["n"] == len(test_ids)
    assert metrics["calibrated"]["threshold"] == record.threshold
    # The headline is the paper's plain classifier on the same held-out cells.
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["matrix"]
    assert tn + fp + fn + tp == len(test_ids) and tp + fn == y.sum()
    assert metrics["accuracy"] == pytest.approx((tp + tn) / len(test_ids))
    assert "Risk score and operating point" in (folder / "report.html").read_text()


def test_augmented_copies_are_featurised_once_and_originals_reused(experiment):
    store, summary = experiment
    # 24 originals and 3 copies of each, every vector computed once.
    assert summary["extraction"]["computed"] == {"vgg16": 96, "densenet121": 96}
    ids = ds.dataset(str(store / "features" / "backbone=vgg16")).to_table().column("image_id")
    ids = ids.to_pylist()
    assert len(ids) == len(set(ids)) == 96 and sum("#" in i for i in ids) == 72
    assert summary["n_images"] == 24 and summary["n_augmented"] == 72


def test_every_cell_of_the_grid_is_evaluated_on_shared_folds(experiment):
    _, summary = experiment
    cells = summary["cells"]
    keys = {(c["feature_set"], c["classifier"], c["evaluation"]) for c in cells}
    assert len(cells) == len(keys) == 3 * 2 * 2
    assert {c["feature_set"] for c in cells} == {"vgg16", "densenet121", "vgg16+densenet121"}
    honest = [c for c in cells if c["evaluation"] == "subject"]
    assert {(c["folds"], c["grouping"], c["n_test"]) for c in honest} == {(3, "subject", 24)}
    assert all(c["n_train_augmented"] == 72 for c in cells)
    assert summary["evaluations"][1]["label"].startswith("subject-grouped 3-fold")


def test_tables_reports_and_the_run_row_are_written(experiment):
    store, summary = experiment
    folder = store / "experiments" / summary["experiment_id"]
    for name in ("random", "subject"):
        rows = list(csv.DictReader((folder / f"grid_{name}.csv").open()))
        assert len(rows) == 6 and [r["best"] for r in rows].count("True") == 1
    html_text = (folder / "report.html").read_text()
    assert "Random split vs. subject split" in html_text and "NOT CLINICALLY" in html_text
    assert "★" in (folder / "report.md").read_text()
    # results.json names, per split, the grid cell its CSV marks best: the highest accuracy.
    best = json.loads((folder / "results.json").read_text())["best"]
    assert set(best) == {"random", "subject"}
    for name in ("random", "subject"):
        rows = list(csv.DictReader((folder / f"grid_{name}.csv").open()))
        (marked,) = [r for r in rows if r["best"] == "True"]
        assert (best[name]["feature_set"], best[name]["classifier"]) == (
            marked["feature_set"],
            marked["classifier"],
        )
        assert best[name]["accuracy"] == pytest.approx(float(marked["accuracy_mean"]))
        assert best[name]["accuracy"] == pytest.approx(max(float(r["accuracy_mean"]) for r in rows))
    runs = read_runs(open_location(str(store))).to_pylist()
    assert [r["kind"] for r in runs if r["run_id"] == summary["experiment_id"]] == ["experiments"]


def test_a_second_experiment_extracts_nothing(experiment):
    from leukoflow.flows.experiments import run_experiments

    store, _ = experiment
    again = run_experiments(
        store=str(store), dataset="synthetic", recipe=PAIR_RECIPE, classifiers=["linear-svm"],
        split="subject", augment=True, n_boot=50,
    )  # fmt: skip
    assert again["extraction"]["computed"] == {} and len(again["cells"]) == 3


def test_a_bad_grid_choice_exits_2_before_any_engine_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "leukoflow.cli", "experiments", "--store", str(tmp_path),
         "--classifiers", "knn,xgboost", "--weights", "none"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown classifier xgboost" in result.stderr
