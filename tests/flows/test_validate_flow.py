"""The real `validate` flow on a handful of real C-NMC cells from two sources (a class folder and
a PNG manifest), with color_morphology (fast, full resolution): cell- and patient-level output."""

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from datapaths import CNMC, CNMC_POOL

from leukoflow.recipe import FeatureRecipe
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_catalog

pytestmark = pytest.mark.integration

# One BMP cell each of 12 subjects (6 ALL, 6 normal), as a C-NMC class folder.
BMP_CELLS = (
    *(f"all/UID_{s}_1_1_all.bmp" for s in (1, 4, 5, 11, 24, 25)),
    "hem/UID_H10_100_1_hem.bmp", "hem/UID_H11_10_1_hem.bmp", "hem/UID_H12_1_1_hem.bmp",
    "hem/UID_H22_1_1_hem.bmp", "hem/UID_H23_16_8_hem.bmp", "hem/UID_H24_23_8_hem.bmp",
)  # fmt: skip
# Two more cells each of six of those subjects, as PNGs in a manifest: those patients rest on
# three cells, the others on one.
POOL_CELLS = (
    "all/UID_4_1_3_all.png", "all/UID_4_2_1_all.png",
    "all/UID_5_1_3_all.png", "all/UID_5_1_4_all.png",
    "all/UID_11_2_1_all.png", "all/UID_11_2_2_all.png",
    "hem/UID_H10_3_1_hem.png", "hem/UID_H10_5_1_hem.png",
    "hem/UID_H12_1_3_hem.png", "hem/UID_H12_1_4_hem.png",
    "hem/UID_H22_1_3_hem.png", "hem/UID_H22_1_4_hem.png",
)  # fmt: skip


# Copies in temporary folders, never in the repository: the catalog refuses links that lead
# outside the folder or manifest it was given.
@pytest.fixture(scope="module")
def bmp_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bmp-cells")
    for relative in BMP_CELLS:
        (folder / relative).parent.mkdir(exist_ok=True)
        shutil.copyfile(CNMC / relative, folder / relative)
    return folder


@pytest.fixture(scope="module")
def png_manifest(tmp_path_factory) -> Path:
    """A manifest of 12 pool PNGs."""
    folder = tmp_path_factory.mktemp("pool-sample")
    with open(CNMC_POOL / "MANIFEST.csv", newline="") as source:
        listed = {row["path"]: row for row in csv.DictReader(source)}
    with open(folder / "MANIFEST.csv", "w", newline="") as sink:
        writer = csv.writer(sink)
        writer.writerow(["path", "label", "subject_id"])
        for relative in POOL_CELLS:
            (folder / relative).parent.mkdir(exist_ok=True)
            shutil.copyfile(CNMC_POOL / relative, folder / relative)
            row = listed[relative]
            writer.writerow([relative, row["label"], row["subject_id"]])
    return folder / "MANIFEST.csv"


@pytest.fixture(scope="module")
def validated(tmp_path_factory, bmp_folder, png_manifest, ray_local, prefect_harness):
    from leukoflow.flows.validate import run_validation

    store = tmp_path_factory.mktemp("validate-store")
    summary = run_validation(
        images=[str(bmp_folder), str(png_manifest)],
        store=str(store),
        recipe=FeatureRecipe(("color_morphology",), weights="none"),
        dataset="two-sources",
        folds=5,
        n_boot=200,
    )
    return store, summary


def test_both_sources_are_catalogued_and_every_cell_is_validated(validated):
    store, summary = validated
    catalog = read_catalog(open_location(str(store)), "two-sources").to_pylist()
    assert len(catalog) == summary["counts"]["found"] == 24
    assert sum(row["uri"].endswith(".png") for row in catalog) == 12
    assert summary["counts"]["ok"] == summary["counts"]["validated"] == summary["n_images"] == 24
    assert summary["counts"]["unlabelled"] == 0 and summary["counts"]["missing_vectors"] == 0
    assert summary["n_subjects"] == 12 and summary["feature_dim"] > 100
    assert summary["backbones"] == ["color_morphology"] and summary["non_clinical"] is False
    assert sum(fold["n"] for fold in summary["per_fold"]) == 24
    json.dumps(summary)  # the CLI prints it as is


def test_patient_level_decides_each_subject_once_on_its_cells(validated):
    store, summary = validated
    level = summary["patient_level"]
    catalog = read_catalog(open_location(str(store)), "two-sources").to_pylist()
    cells_per_subject = Counter(row["subject_id"] for row in catalog)
    assert level["n_patients"] == len(cells_per_subject) == summary["n_subjects"] == 12
    assert level["n_cells"] == 24 and level["support"] == {"all": 6, "hem": 6}
    assert sorted(p["n_cells"] for p in level["patients"]) == sorted(cells_per_subject.values())
    assert sum(f["n_patients"] for f in level["per_fold"]) == 12
    (tn, fp), (fn, tp) = level["confusion_matrix"]["matrix"]
    assert tn + fp + fn + tp == 12
    assert sum(p["correct"] for p in level["patients"]) == tn + tp
    for key in ("sensitivity", "specificity", "balanced_accuracy"):
        m = level["metrics"][key]
        assert m["low"] <= m["pooled"] <= m["high"]
    # What the flow returns is printed: pseudonyms, never the raw subject ids of the store.
    raw = set(cells_per_subject)
    assert all(p["subject_id"].startswith("S-") for p in level["patients"])
    assert not raw & {p["subject_id"] for p in level["patients"]}
    for fold in level["per_fold"]:
        assert 0.0 <= fold["patient_threshold"] <= 1.0


def test_validate_leaves_a_run_row_like_every_other_kind_of_run(validated):
    from leukoflow.store.tables import read_runs

    store, summary = validated
    (row,) = read_runs(open_location(str(store))).to_pylist()
    assert row["run_id"] == summary["run_id"]
    assert (row["kind"], row["outcome"], row["dataset"]) == ("validate", "completed", "two-sources")
    assert row["finished_at"] >= row["started_at"]
    assert row["images_found"] == 24 and row["images_featurised"] == 24
    assert row["images_quarantined"] == 0 and row["images_missing"] == 0
    details = json.loads(row["details"])
    assert details["feature_recipe"]["backbones"] == ["color_morphology"]
    assert (
        details["metrics"]["balanced_accuracy"] == summary["metrics"]["balanced_accuracy"]["mean"]
    )
