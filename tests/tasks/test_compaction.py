"""Compaction of feature files: fewer, larger files; readers never see a row twice or a gap."""

import shutil

import numpy as np
import pyarrow.parquet as pq

from leukoflow.summary import store_status
from leukoflow.tasks.storage import open_location
from leukoflow.tasks.tables import compact_features, featurised_ids, read_features, write_features


def _write_batches(store, n_batches: int, per_batch: int = 3) -> list[str]:
    ids = []
    for b in range(n_batches):
        batch = [f"img-{b}-{k}" for k in range(per_batch)]
        write_features(store, "vgg16", "w", 32, batch, np.full((per_batch, 4), b, np.float32))
        ids += batch
    return ids


def _files(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "features" / "backbone=vgg16").iterdir())


def test_many_batch_files_become_one_with_every_vector(tmp_path):
    store = open_location(str(tmp_path))
    ids = _write_batches(store, 10)
    before = read_features(store, "vgg16", "w", 32, ids)

    assert compact_features(store, "vgg16") == 10
    names = _files(tmp_path)
    assert len(names) == 1 and names[0].startswith("compact-")
    assert featurised_ids(store, "vgg16", "w", 32) == set(ids)
    after = read_features(store, "vgg16", "w", 32, ids)
    assert after.keys() == before.keys()
    for image_id in ids:
        np.testing.assert_array_equal(after[image_id], before[image_id])


def test_few_files_are_left_alone(tmp_path):
    store = open_location(str(tmp_path))
    _write_batches(store, 3)
    assert compact_features(store, "vgg16") == 0
    assert len(_files(tmp_path)) == 3


def test_a_copy_written_twice_is_kept_once(tmp_path):
    store = open_location(str(tmp_path))
    ids = _write_batches(store, 8)
    write_features(store, "vgg16", "w", 32, [ids[0]], np.full((1, 4), 99, np.float32))
    compact_features(store, "vgg16")
    (merged,) = (tmp_path / "features" / "backbone=vgg16").iterdir()
    assert pq.read_table(merged).num_rows == len(ids)


def test_replaced_files_still_there_are_never_read_and_are_cleaned_up(tmp_path):
    # The moment between the merged file landing and the batch files' delete (or a crash there).
    store = open_location(str(tmp_path))
    ids = _write_batches(store, 8)
    folder = tmp_path / "features" / "backbone=vgg16"
    kept = tmp_path / "kept"
    shutil.copytree(folder, kept)
    compact_features(store, "vgg16")
    for part in kept.iterdir():
        shutil.copy(part, folder / part.name)
    assert len(_files(tmp_path)) == 9

    table_ids = read_features(store, "vgg16", "w", 32, ids)
    assert sorted(table_ids) == sorted(ids)
    assert featurised_ids(store, "vgg16", "w", 32) == set(ids)
    assert store_status(store)["features"] == {"vgg16": {"w@32px": len(ids)}}
    compact_features(store, "vgg16")  # the next compaction deletes the leftovers
    assert len(_files(tmp_path)) == 1


def test_files_of_other_recipes_keep_their_keys(tmp_path):
    store = open_location(str(tmp_path))
    ids = _write_batches(store, 8)
    write_features(store, "vgg16", "other", 64, ["x"], np.ones((1, 4), np.float32))
    compact_features(store, "vgg16")
    assert featurised_ids(store, "vgg16", "other", 64) == {"x"}
    assert featurised_ids(store, "vgg16", "w", 32) == set(ids)
