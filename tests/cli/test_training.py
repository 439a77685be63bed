"""`leukoflow run`, `validate` and `experiments`: configuration errors before any engine starts
(exit 2, one line), and real runs through the flows (--json, status, --no-promote)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_catalog

from . import assert_click_usage, assert_user_error, leukoflow_here


def last_json(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--backbones", "vgg16,alexnet"], ["unknown backbone alexnet"]),
        (["--image-size", "40", "--backbones", "inception_resnet_v2"], ["accepts (>= 75)"]),
        (["--labels", "blast"], ["--labels"]),
        (["--target-sensitivity", "1.5"], ["sensitivity"]),
    ],
)
def test_configuration_errors_exit_2_with_one_line(
    tmp_path, synthetic_images, capsys, extra, words
):
    result = leukoflow_here(
        capsys, "run", synthetic_images, "--store", tmp_path, "--weights", "none", *extra
    )
    assert_user_error(result, *words)


@pytest.mark.parametrize(
    ("extra", "words"),
    [(["--classifier", "xgboost"], ["--classifier"]), (["--split", "time"], ["--split"])],
)
def test_unknown_choices_are_usage_errors(tmp_path, synthetic_images, capsys, extra, words):
    result = leukoflow_here(capsys, "run", synthetic_images, "--store", tmp_path, *extra)
    assert_click_usage(result, *words)


def test_missing_imagenet_weights_exit_2_naming_the_file(
    tmp_path, synthetic_images, capsys, monkeypatch
):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    result = leukoflow_here(
        capsys, "run", synthetic_images, "--store", tmp_path, "--backbones", "densenet121"
    )
    assert_user_error(
        result, "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", "--weights none"
    )


# The flow each command would start: none may start on a configuration error.
FLOWS = {
    "run": ("leukoflow.flows.run", "run_pipeline"),
    "validate": ("leukoflow.flows.validate", "run_validation"),
    "backfill": ("leukoflow.flows.backfill", "backfill"),
}


@pytest.mark.parametrize("command", sorted(FLOWS))
def test_a_missing_images_folder_exits_2_before_any_engine_starts(
    tmp_path, capsys, monkeypatch, command
):
    import importlib

    module, name = FLOWS[command]
    started = []
    monkeypatch.setattr(importlib.import_module(module), name, lambda **kw: started.append(kw))
    extra = ["--dataset", "d"] if command == "backfill" else []
    result = leukoflow_here(
        capsys, command, tmp_path, tmp_path / "nope", "--store", tmp_path / "s",
        "--weights", "none", *extra,
    )  # fmt: skip
    assert_user_error(result, "IMAGES", "nope", "does not exist")
    # Said before Prefect or Ray start: the command never called its flow, catalogued nothing.
    assert started == [] and not (tmp_path / "s" / "catalog").exists()


@pytest.mark.integration
def test_one_class_only_exits_2_before_extraction(
    tmp_path, synthetic_images, capsys, prefect_harness
):
    # Only the ALL cells, in their class folder: every image is labelled, all of one class.
    images = tmp_path / "images"
    shutil.copytree(synthetic_images / "fold_0" / "all", images / "all")
    store = tmp_path / "s"
    result = leukoflow_here(
        capsys, "run", images, "--store", store,
        "--weights", "none", "--backbones", "vgg16", "--image-size", "32",
    )  # fmt: skip
    assert_user_error(result, "only one class", "needs both ALL and normal")
    # Refused after cataloguing, before extraction: the catalog is there, no vector is.
    assert (store / "catalog").exists() and not (store / "features").exists()


def split_in_two(images: Path, tmp_path: Path) -> list[Path]:
    """The cells of `images` in two collections of class folders, subjects split between them."""
    folders = [tmp_path / "first", tmp_path / "second"]
    for n, cell in enumerate(sorted(images.rglob("*.bmp"))):
        target = folders[n % 2] / cell.parent.name / cell.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cell, target)
    return folders


@pytest.mark.integration
def test_run_json_then_status_then_a_run_that_does_not_promote(
    tmp_path, synthetic_images, capsys, ray_local, prefect_harness
):
    store = tmp_path / "store"
    recipe = ["--weights", "none", "--backbones", "vgg16", "--image-size", "32"]
    # One collection in two folders (as the development pool is): one catalog, one model.
    folders = split_in_two(synthetic_images, tmp_path)
    summary = last_json(
        leukoflow_here(capsys, "run", *folders, "--store", store, *recipe, "--json")
    )
    assert summary["counts"]["found"] == 24 and summary["feature_dim"] == 512
    assert summary["non_clinical"] is True and "NOT CLINICALLY" in summary["note"]
    assert 0 <= summary["metrics"]["accuracy"] <= 1
    assert os.path.exists(summary["paths"]["report_html"])
    # Every synthetic image carries its subject id: the default split keeps patients apart.
    assert summary["split"] == "subject"

    status = leukoflow_here(capsys, "status", "--store", store, "--json")
    report = last_json(status)
    assert report["datasets"]["default"] == {
        "found": 24,
        "ok": 24,
        "quarantined": 0,
        "duplicate": 0,
    }
    assert report["features"]["vgg16"] == {"random-seed0@32px": 24}
    assert report["current_model"] == summary["model_id"]
    assert report["accounted"] is True
    assert report["accounting"]["datasets"]["default"]["featurised"] == 24

    again = leukoflow_here(
        capsys, "run", *folders, "--store", store, *recipe, "--split", "random",
        "--no-promote", "--json",
    )  # fmt: skip
    second = last_json(again)
    assert second["model_id"] != summary["model_id"] and second["promoted"] is False
    assert second["split"] == "random" and second["extraction"]["computed"] == {}
    listing = leukoflow_here(capsys, "models", "list", "--store", store, "--json")
    current = last_json(listing)["current"]
    assert current == summary["model_id"]


@pytest.mark.integration
def test_validate_takes_several_image_folders(
    tmp_path, synthetic_images, capsys, ray_local, prefect_harness
):
    folders = split_in_two(synthetic_images, tmp_path)
    result = leukoflow_here(
        capsys, "validate", *folders, "--store", tmp_path / "store",
        "--backbones", "color_morphology", "--classifier", "rbf-svm", "--folds", "3",
        "--n-boot", "50", "--json",
    )  # fmt: skip
    summary = last_json(result)
    # One collection: every cell of both folders, each subject once (its cells are in both).
    assert summary["n_images"] == 24 and summary["n_subjects"] == 6 and summary["folds"] == 3
    assert summary["patient_level"]["n_patients"] == 6
    catalog = read_catalog(open_location(str(tmp_path / "store")), "default")
    assert catalog.num_rows == 24
    assert {Path(uri).parent.parent.name for uri in catalog.column("uri").to_pylist()} == {
        "first",
        "second",
    }
