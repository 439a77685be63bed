"""Compaction of feature files: fewer, larger files; readers never see a row twice or a gap.
On a local folder and on S3 (moto's server, the run's shared one): two compactions of one folder
at once must keep every key exactly once on both."""

import multiprocessing
import posixpath
import threading
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from leukoflow.store import storage, tables
from leukoflow.store.status import store_status
from leukoflow.store.storage import Location, open_location
from leukoflow.store.tables import compact_features, featurised_ids, read_features, write_features


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path) -> Location:
    if request.param == "local":
        return open_location(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_env")  # moto's server, its environment set here
    return open_location(f"s3://{endpoint.make_bucket('compaction')}/store")


def _write_batches(store, n_batches: int, per_batch: int = 3) -> list[str]:
    ids = []
    for b in range(n_batches):
        batch = [f"img-{b}-{k}" for k in range(per_batch)]
        write_features(store, "vgg16", "w", 32, batch, np.full((per_batch, 4), b, np.float32))
        ids += batch
    return ids


def _folder(store) -> Location:
    return tables.features_root(store, "vgg16")


def _files(store) -> list[str]:
    """The names of every file in the backbone's folder."""
    folder = _folder(store)
    return sorted(posixpath.basename(p) for p in folder.fs.ls(folder.path, refresh=True))


def _read(store, name: str, columns=None):
    folder = _folder(store).child(name)
    with folder.fs.open(folder.path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def test_many_batch_files_become_one_with_every_vector(store):
    ids = _write_batches(store, 10)
    before = read_features(store, "vgg16", "w", 32, ids)

    assert compact_features(store, "vgg16") == 10
    names = _files(store)
    assert len(names) == 1 and names[0].startswith("compact-")
    assert featurised_ids(store, "vgg16", "w", 32) == set(ids)
    after = read_features(store, "vgg16", "w", 32, ids)
    assert after.keys() == before.keys()
    for image_id in ids:
        np.testing.assert_array_equal(after[image_id], before[image_id])


def test_few_files_are_left_alone(store):
    _write_batches(store, 3)
    assert compact_features(store, "vgg16") == 0
    assert len(_files(store)) == 3


def test_a_copy_written_twice_is_kept_once(store):
    ids = _write_batches(store, 8)
    write_features(store, "vgg16", "w", 32, [ids[0]], np.full((1, 4), 99, np.float32))
    compact_features(store, "vgg16")
    (merged,) = _files(store)
    assert _read(store, merged).num_rows == len(ids)


def test_replaced_files_still_there_are_never_read_and_are_cleaned_up(store):
    # The moment between the merged file landing and the batch files' delete (or a crash there).
    ids = _write_batches(store, 8)
    folder = _folder(store)
    kept = {name: folder.fs.cat_file(folder.child(name).path) for name in _files(store)}
    compact_features(store, "vgg16")
    for name, data in kept.items():
        folder.fs.pipe_file(folder.child(name).path, data)
    assert len(_files(store)) == 9

    table_ids = read_features(store, "vgg16", "w", 32, ids)
    assert sorted(table_ids) == sorted(ids)
    assert featurised_ids(store, "vgg16", "w", 32) == set(ids)
    assert store_status(store)["features"] == {"vgg16": {"w@32px": len(ids)}}
    compact_features(store, "vgg16")  # the next compaction deletes the leftovers
    assert len(_files(store)) == 1


def test_files_of_other_recipes_keep_their_keys(store):
    ids = _write_batches(store, 8)
    write_features(store, "vgg16", "other", 64, ["x"], np.ones((1, 4), np.float32))
    compact_features(store, "vgg16")
    assert featurised_ids(store, "vgg16", "other", 64) == {"x"}
    assert featurised_ids(store, "vgg16", "w", 32) == set(ids)


# -- two compactions of one folder at once (two runs extracting the same backbone) -----------
def _live_key_counts(store) -> Counter:
    """How many live files hold each (image, backbone, weights, size) key, rows counted raw."""
    counts: Counter = Counter()
    for backbone in ("vgg16",):
        root = tables.features_root(store, backbone)
        for entry in tables._feature_files(root).live:
            with root.fs.open(entry["name"], "rb") as handle:
                table = pq.read_table(handle, columns=["image_id", "weights_id", "image_size"])
            for row in table.to_pylist():
                counts[(row["image_id"], backbone, row["weights_id"], row["image_size"])] += 1
    return counts


def _expected_keys(ids: list[str]) -> Counter:
    return Counter((image_id, "vgg16", "w", 32) for image_id in ids)


def _in_thread(name: str, work) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # the test reports it; a thread would swallow it
            outcome["error"] = error

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread, outcome


def test_a_file_merged_away_mid_merge_sends_the_compaction_back_to_its_listing(store, monkeypatch):
    ids = _write_batches(store, 10)
    first_read, other_done = threading.Event(), threading.Event()
    read = tables._read_parquet

    def slow_read(root, path):
        if threading.current_thread().name == "slow" and not other_done.is_set():
            first_read.set()
            assert other_done.wait(timeout=60)  # the other compaction runs from start to end
        return read(root, path)

    monkeypatch.setattr(tables, "_read_parquet", slow_read)
    thread, slow = _in_thread("slow", lambda: compact_features(store, "vgg16"))
    assert first_read.wait(timeout=60)
    assert compact_features(store, "vgg16") == 10
    other_done.set()
    thread.join(timeout=60)
    assert slow == {"result": 0}  # its files were gone: it looked again and found work done
    assert _live_key_counts(store) == _expected_keys(ids)
    assert len(_files(store)) == 1


def _slow_merged_write(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Hold the thread named "slow" just before it writes a merged file, until `other_done`."""
    about_to_write, other_done = threading.Event(), threading.Event()
    create = tables.create_if_absent

    def slow_create(loc, data):
        if threading.current_thread().name == "slow" and not other_done.is_set():
            about_to_write.set()
            assert other_done.wait(timeout=60)
        return create(loc, data)

    monkeypatch.setattr(tables, "create_if_absent", slow_create)
    return about_to_write, other_done


def test_a_merged_file_another_compaction_wrote_first_is_kept_not_rewritten(store, monkeypatch):
    # Two compactions merge the same ten files into the same name. The second must not write
    # over the first's file: a reader may be reading it (on S3, a ranged read across a rewrite).
    ids = _write_batches(store, 10)
    about_to_write, other_done = _slow_merged_write(monkeypatch)
    thread, slow = _in_thread("slow", lambda: compact_features(store, "vgg16"))
    assert about_to_write.wait(timeout=60)
    assert compact_features(store, "vgg16") == 10
    (merged,) = _files(store)
    # Mark the first one's file, as a reader would see it, with a key no compaction writes.
    table = _read(store, merged)
    marked = table.replace_schema_metadata({**table.schema.metadata, b"test.first": b"yes"})
    folder = _folder(store)
    folder.fs.pipe_file(folder.child(merged).path, storage.parquet_bytes(marked))
    other_done.set()
    thread.join(timeout=60)

    assert slow == {"result": 10}  # it merged the same ten files, and kept what it found
    assert _files(store) == [merged]
    assert _read(store, merged).schema.metadata[b"test.first"] == b"yes"
    assert _live_key_counts(store) == _expected_keys(ids)


def test_two_compactions_of_overlapping_groups_leave_each_key_in_one_file(store, monkeypatch):
    ids = _write_batches(store, 10)
    about_to_write, other_done = _slow_merged_write(monkeypatch)
    # The slow compaction has read the 10 files; a new batch lands; the other merges all 11.
    thread, slow = _in_thread("slow", lambda: compact_features(store, "vgg16"))
    assert about_to_write.wait(timeout=60)
    write_features(store, "vgg16", "w", 32, ["late"], np.full((1, 4), 7, np.float32))
    assert compact_features(store, "vgg16") == 11
    other_done.set()
    thread.join(timeout=60)
    # Its merged file replaces 10 of the other's 11: it merged the two once more.
    assert slow == {"result": 10 + 2}
    assert _live_key_counts(store) == _expected_keys([*ids, "late"])
    assert len(_files(store)) == 1
    assert featurised_ids(store, "vgg16", "w", 32) == {*ids, "late"}


def _compact_in_process(uri: str, start, results) -> None:
    start.wait(timeout=120)
    try:
        merged = compact_features(open_location(uri), "vgg16", min_files=2, target_bytes=12_000)
        results.put(("ok", merged))
    except BaseException as error:
        results.put(("error", repr(error)))


def test_two_compactions_at_once_in_two_processes_keep_every_key_exactly_once(store):
    ids = _write_batches(store, 48)
    before = read_features(store, "vgg16", "w", 32, ids)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_compact_in_process, args=(store.uri, start, results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=180) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [kind for kind, _ in outcomes] == ["ok", "ok"], outcomes
    assert sum(merged for _, merged in outcomes) >= 48  # between them, every batch was merged
    assert _live_key_counts(store) == _expected_keys(ids)
    after = read_features(store, "vgg16", "w", 32, ids)
    assert after.keys() == before.keys()
    for image_id in ids:
        np.testing.assert_array_equal(after[image_id], before[image_id])
    assert all(name.startswith("compact-") for name in _files(store))
