"""Backfills for real (local Ray, the run's Prefect server): progress, resuming, a new backbone."""

import os

import pyarrow.dataset as ds
import pytest
from cli import leukoflow_here

from leukoflow.features.synthetic import make_synthetic_dataset
from leukoflow.recipe import FeatureRecipe
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_catalog, read_runs

pytestmark = pytest.mark.integration


def vectors(store, backbone: str) -> list[str]:
    table = ds.dataset(str(store / "features" / f"backbone={backbone}"), format="parquet")
    return table.to_table(columns=["image_id"]).column("image_id").to_pylist()


def test_a_backfill_shows_progress_and_a_new_backbone_extracts_only_itself(
    tmp_path, ray_local, prefect_harness, capsys
):
    from leukoflow.flows.backfill import backfill

    images = make_synthetic_dataset(
        tmp_path / "collection", n_subjects=2, cells_per_subject=3, image_side=64, seed=9
    )
    (images / "fold_0" / "all" / "UID_1_9_9_all.bmp").write_bytes(b"BM not really")
    store = tmp_path / "store"
    options = {
        "images": str(images),
        "store": str(store),
        "dataset": "collection-2026",
    }
    vgg16 = FeatureRecipe(("vgg16",), weights="none", image_size=32)
    both = FeatureRecipe(("vgg16", "vgg19"), weights="none", image_size=32)

    first = backfill(recipe=vgg16, progress_bar=True, **options)
    progress = capsys.readouterr().err
    assert "featurising: 6/6 images" in progress and "images/s" in progress
    assert "ETA" in progress
    assert first["extraction"]["computed"] == {"vgg16": 6}
    assert first["counts"]["found"] == 7 and first["counts"]["quarantined"] == 1
    catalog = read_catalog(open_location(str(store)), "collection-2026")
    assert catalog.num_rows == 7

    second = backfill(recipe=both, progress_bar=False, **options)
    assert second["extraction"]["computed"] == {"vgg19": 6}  # vgg16 had every vector already
    assert second["counts"]["already_featurised"] == 0 and second["counts"]["new_files"] == 0
    assert sorted(vectors(store, "vgg16")) == sorted(vectors(store, "vgg19"))
    assert len(vectors(store, "vgg16")) == len(set(vectors(store, "vgg16"))) == 6

    third = backfill(recipe=both, progress_bar=False, **options)
    assert third["extraction"]["computed"] == {}  # nothing to do: Ray is not even started
    runs = read_runs(open_location(str(store))).to_pylist()
    assert [r["kind"] for r in runs] == ["backfill"] * 3
    for run in runs:
        found = run["images_featurised"] + run["images_quarantined"] + run["images_duplicate"]
        assert run["images_found"] == found == 7 and run["images_missing"] == 0

    # An image that became undecodable after it was catalogued (same size and times, so the
    # catalog reuses its row): extraction sets it aside and the catalog records it by name.
    victim = next(iter(sorted((images / "fold_0" / "hem").glob("*.bmp"))))
    stat = victim.stat()
    victim.write_bytes(b"\0" * stat.st_size)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fourth = backfill(recipe=FeatureRecipe(("vgg16",), weights="none", image_size=48),
                      progress_bar=False, **options)  # fmt: skip
    assert fourth["counts"]["quarantined"] == 2 and fourth["counts"]["accounted"] is True
    rows = read_catalog(open_location(str(store)), "collection-2026").to_pylist()
    (row,) = [r for r in rows if r["uri"].endswith(victim.name)]
    assert row["status"] == "quarantined" and row["reason"]


def test_a_second_backfill_with_a_full_resolution_extractor_computes_nothing(
    tmp_path, real_cells, ray_local, prefect_harness
):
    """Regression: the sweep/backfill once keyed color_morphology vectors by the image size
    instead of its size key (0), so every backfill and night extracted it again."""
    from leukoflow.flows.backfill import backfill

    options = {"images": str(real_cells), "store": str(tmp_path), "dataset": "cells"}
    recipe = FeatureRecipe(("color_morphology", "vgg16"), weights="none", image_size=32)
    first = backfill(recipe=recipe, progress_bar=False, **options)
    assert first["counts"]["computed"] == 12 and first["counts"]["accounted"] is True
    second = backfill(recipe=recipe, progress_bar=False, **options)
    assert second["counts"]["needing_vectors"] == 0 and second["counts"]["computed"] == 0
    assert second["counts"]["already_featurised"] == 12 and second["extraction"]["computed"] == {}


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["score", "INBOX", "--date", "2026-02-30"], "not a calendar date"),
        (["backfill", "IMAGES", "--dataset", "d", "--backbones", "alexnet"], "unknown backbone"),
    ],
)
def test_usage_errors_exit_2_with_one_line_before_any_engine_starts(tmp_path, capsys, args, words):
    # In-process: tests/cli/test_main.py proves the exit status of a real process.
    result = leukoflow_here(capsys, *args, "--store", tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "prefect" not in result.stderr.lower()
    lines = [line for line in result.stderr.splitlines() if "leukoflow: error" in line]
    assert len(lines) == 1 and words in lines[0]
    assert not (tmp_path / "catalog").exists()  # refused before any work
