"""`leukoflow status` on a store made by the real `run` flow: every image accounted for, and
when a feature file is lost, the exact images named and exit status 1."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_catalog

from . import leukoflow, leukoflow_here

pytestmark = pytest.mark.integration  # the store comes from the real run flow (Ray, Prefect)


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture()
def store(real_cells_store, tmp_path):
    """A private copy of the session's store: this test damages it."""
    source, _ = real_cells_store
    return shutil.copytree(source, tmp_path / "store")


def test_a_lost_feature_file_names_its_images_and_exits_1(store, capsys):
    # --json in this process; the text report as a real process (its exit status 1).
    intact = leukoflow_here(capsys, "status", "--store", store, "--json")
    assert intact.returncode == 0, intact.stderr
    report = last_json(intact)
    dataset = report["accounting"]["datasets"]["default"]
    assert report["accounted"] is True and dataset["missing"] == 0
    assert dataset["featurised"] == report["datasets"]["default"]["ok"] > 0
    assert "recipe of run" in dataset["basis"] and "vgg16 random-seed0@32px" in dataset["basis"]

    lost_file = sorted((store / "features" / "backbone=vgg16").glob("*.parquet"))[0]
    lost = set(pq.read_table(lost_file, columns=["image_id"]).column("image_id").to_pylist())
    lost_file.unlink()
    catalog = read_catalog(open_location(str(store))).to_pylist()
    ok = {row["image_id"] for row in catalog if row["status"] == "ok"}
    expected = sorted(lost & ok)
    assert expected

    damaged = leukoflow_here(capsys, "status", "--store", store, "--json")
    assert damaged.returncode == 1, damaged.stderr
    report = last_json(damaged)
    dataset = report["accounting"]["datasets"]["default"]
    assert report["accounted"] is False and dataset["accounted"] is False
    assert dataset["missing_images"] == expected and dataset["missing"] == len(expected)
    assert dataset["found"] == sum(
        dataset[k] for k in ("featurised", "missing", "quarantined", "duplicate")
    )

    text = leukoflow("status", "--store", store)
    assert text.returncode == 1 and "Traceback" not in text.stderr
    assert "NOT every image accounted for" in text.stdout and "MISMATCH" in text.stdout
    named = [line for line in text.stdout.splitlines() if line.strip().startswith("missing:")]
    assert len(named) == 1
    assert sorted(named[0].split()[1:]) == sorted(i[:12] for i in expected)[:20]
    # Images are named by content id: no file name (C-NMC names carry the subject id).
    for row in catalog:
        assert row["uri"].rsplit("/", 1)[-1] not in text.stdout + damaged.stdout
