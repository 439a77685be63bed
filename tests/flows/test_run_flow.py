"""The real `run` flow: local Ray actors, the run's Prefect server, real Keras models at 75 px."""

import json

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from leukoflow.recipe import Compute, FeatureRecipe
from leukoflow.store import registry
from leukoflow.store.storage import open_location
from leukoflow.store.tables import CATALOG_SCHEMA, feature_schema, read_catalog, read_runs

pytestmark = pytest.mark.integration

TRIO = ["vgg16", "densenet121", "inception_resnet_v2"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, synthetic_images, ray_local, prefect_harness):
    from leukoflow.flows.run import run_pipeline

    store = tmp_path_factory.mktemp("store")
    summary = run_pipeline(
        images=str(synthetic_images),
        store=str(store),
        dataset="synthetic",
        recipe=FeatureRecipe(TRIO, weights="none", image_size=75),
        compute=Compute(batch_size=8),
        examples_per_kind=0,  # the report's explanation gallery: tests/present/test_explain.py
    )
    return store, summary


def own_run_rows(store, summary) -> list[dict]:
    """The run rows of this run (a later test adds a run of its own to the store)."""
    rows = read_runs(open_location(str(store))).to_pylist()
    return [row for row in rows if row["run_id"] == summary["run_id"]]


def test_the_catalog_accounts_for_every_image(first_run, synthetic_images):
    store, summary = first_run
    catalog = read_catalog(open_location(str(store)), "synthetic")
    assert catalog.schema.equals(CATALOG_SCHEMA)
    files = sorted(p for p in synthetic_images.rglob("*.bmp"))
    assert catalog.num_rows == len(files) == summary["counts"]["found"] == 24
    assert set(catalog.column("status").to_pylist()) == {"ok"}
    assert set(catalog.column("label").to_pylist()) == {"all", "hem"}
    assert None not in catalog.column("subject_id").to_pylist()


def test_features_are_partitioned_by_backbone_with_fixed_size_float32(first_run):
    store, _ = first_run
    for name, dim in zip(TRIO, (512, 1024, 1536), strict=True):
        table = ds.dataset(str(store / "features" / f"backbone={name}"), format="parquet")
        assert table.schema.equals(feature_schema(dim))
        data = table.to_table()
        assert data.num_rows == 24 and len(set(data.column("image_id").to_pylist())) == 24
        assert set(data.column("weights_id").to_pylist()) == {"random-seed0"}
        assert set(data.column("image_size").to_pylist()) == {75}
        assert data.schema.field("feature").type == pa.list_(pa.float32(), dim)


def test_the_joined_vector_is_3072_and_the_model_record_is_complete(first_run):
    store, summary = first_run
    assert summary["feature_dim"] == 3072
    root = open_location(str(store))
    assert registry.current_model_id(root) == summary["model_id"]
    model, record = registry.load_model(root, summary["model_id"])
    recipe = record.feature_recipe
    assert recipe["backbones"] == TRIO and recipe["dims"] == [512, 1024, 1536]
    assert recipe["weights_ids"] == {n: "random-seed0" for n in TRIO}
    assert recipe["image_size"] == 75 and record.non_clinical is True
    assert record.classifier == "linear-svm"
    assert record.classifier_params["loss"] == "hinge" and record.classifier_params["C"] == 1
    assert record.n_train + record.n_test == 24 and len(record.training_fingerprint) == 64
    assert {"tensorflow", "keras", "scikit-learn"} <= set(record.package_versions)
    assert model.n_features_in_ == 3072


def test_metrics_and_reports_are_written(first_run):
    store, summary = first_run
    folder = store / "models" / summary["model_id"]
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "f1", "f1_macro", "f1_weighted", "roc_auc"):
        assert key in metrics
    assert metrics["n"] == summary["n_test"]
    html = (folder / "report.html").read_text()
    assert "NOT CLINICALLY MEANINGFUL" in html and "data:image/png;base64" in html
    assert "NOT CLINICALLY MEANINGFUL" in (folder / "report.md").read_text()
    (row,) = own_run_rows(store, summary)
    assert row["outcome"] == "completed"


def test_a_second_run_does_no_feature_extraction(first_run, synthetic_images):
    from leukoflow.flows.run import run_pipeline

    store, summary = first_run
    again = run_pipeline(
        images=str(synthetic_images),
        store=str(store),
        dataset="synthetic",
        recipe=FeatureRecipe(TRIO, weights="none", image_size=75),
        examples_per_kind=0,
    )
    assert again["extraction"]["computed"] == {}
    assert again["feature_dim"] == 3072
    assert again["metrics"] == summary["metrics"]  # same features, split and seed
    rows = ds.dataset(str(store / "features" / "backbone=vgg16"), format="parquet").count_rows()
    assert rows == 24


def test_color_morphology_runs_in_the_same_machinery_at_full_resolution(
    tmp_path, synthetic_images, ray_local, prefect_harness
):
    from leukoflow.features.color_morphology import FEATURE_DIM, FEATURE_VERSION
    from leukoflow.flows.run import run_pipeline

    summary = run_pipeline(
        images=str(synthetic_images),
        store=str(tmp_path),
        recipe=FeatureRecipe(("color_morphology", "vgg16"), weights="none", image_size=32),
    )
    assert summary["feature_dim"] == FEATURE_DIM + 512
    table = ds.dataset(str(tmp_path / "features" / "backbone=color_morphology")).to_table()
    assert set(table.column("weights_id").to_pylist()) == {FEATURE_VERSION}
    assert set(table.column("image_size").to_pylist()) == {0}  # keyed as full resolution
    alone = run_pipeline(
        images=str(synthetic_images),
        store=str(tmp_path),
        # imagenet needs no weights file here: nothing to check, nothing random
        recipe=FeatureRecipe(("color_morphology",), weights="imagenet", image_size=224),
        promote=False,
    )
    assert alone["extraction"]["computed"] == {}  # reused although the image size changed
    assert alone["non_clinical"] is False and alone["feature_dim"] == FEATURE_DIM
    # --no-promote: the model is saved, the current one stays.
    root = open_location(str(tmp_path))
    assert alone["promoted"] is False and registry.current_model_id(root) == summary["model_id"]
    assert (tmp_path / "models" / alone["model_id"] / "model.skops").exists()


def test_the_split_defaults_to_subjects_and_every_image_is_counted_by_measurement(first_run):
    store, summary = first_run
    # C-NMC names carry subject ids: no patient's cells on both sides by default.
    assert summary["split"] == "subject"
    counts = summary["counts"]
    assert counts["accounted"] is True and counts["missing"] == 0
    assert counts["found"] == counts["featurised"] + counts["quarantined"] + counts["duplicate"]
    (row,) = own_run_rows(store, summary)
    assert row["images_missing"] == 0 and row["images_featurised"] == 24
    point = summary["operating_point"]
    assert point["cells"]["split"] == "subject" and point["cells"]["n"] == summary["n_test"]
    assert point["patients"]["n_patients"] >= 2
    assert point["patients"]["n_cells"] == point["cells"]["n"]
