"""The storage layer: atomic writes, and conditional writes (create-if-absent, compare-and-swap)
on a local folder and on a real S3 endpoint (moto's server)."""

from __future__ import annotations

import multiprocessing
import os
import threading

import fsspec
import pytest

from leukoflow.errors import LeukoflowError, StoreUnavailable
from leukoflow.store.storage import (
    Location,
    create_if_absent,
    create_versioned,
    delete_if_unchanged,
    open_location,
    read_json,
    read_versioned,
    replace_if_unchanged,
    replace_versioned,
    write_bytes_atomic,
    write_json_atomic,
)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path) -> Location:
    if request.param == "local":
        return open_location(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_env")  # moto's server, its environment set here
    return open_location(f"s3://{endpoint.make_bucket('storage')}/store")


def read(loc: Location) -> bytes:
    loc.fs.invalidate_cache()
    return loc.fs.cat_file(loc.path)


def hidden_leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(".tmp-")]


# -- atomic writes ---------------------------------------------------------------------------
def test_atomic_write_replaces_whole_and_leaves_no_temporary_file(store) -> None:
    loc = store.child("runs", "a.json")
    write_json_atomic(loc, {"n": 1})
    write_json_atomic(loc, {"n": 2})
    assert read_json(loc) == {"n": 2}
    if store.is_local:
        assert hidden_leftovers(os.path.dirname(loc.path)) == []


def test_a_reader_never_sees_a_half_written_file(tmp_path) -> None:
    loc = open_location(str(tmp_path / "big.bin"))
    payloads = [bytes([n]) * 2_000_000 for n in range(4)]
    write_bytes_atomic(loc, payloads[0])
    stop = threading.Event()
    seen: list[bytes] = []

    def reader() -> None:
        while not stop.is_set():
            data = (tmp_path / "big.bin").read_bytes()
            seen.append(data[:1] + data[-1:] + len(data).to_bytes(4, "big"))

    thread = threading.Thread(target=reader)
    thread.start()
    for round_ in range(40):
        write_bytes_atomic(loc, payloads[round_ % 4])
    stop.set()
    thread.join()
    whole = {p[:1] + p[-1:] + len(p).to_bytes(4, "big") for p in payloads}
    assert seen and set(seen) <= whole  # every read was one payload, first byte to last
    assert hidden_leftovers(tmp_path) == []


def test_a_failed_local_write_says_why_and_leaves_nothing(tmp_path) -> None:
    (tmp_path / "runs").write_text("a file where a folder should be")
    with pytest.raises(LeukoflowError, match="cannot write"):
        write_bytes_atomic(open_location(str(tmp_path / "runs" / "a.json")), b"{}")
    assert hidden_leftovers(tmp_path) == []


# -- conditional writes ----------------------------------------------------------------------
def test_create_if_absent_creates_once(store) -> None:
    loc = store.child("keys", "salt")
    assert read_versioned(loc) is None
    assert create_if_absent(loc, b"first") is True
    assert create_if_absent(loc, b"second") is False
    assert read(loc) == b"first"
    if store.is_local:
        assert hidden_leftovers(os.path.dirname(loc.path)) == []


def test_replace_if_unchanged_is_a_compare_and_swap(store) -> None:
    loc = store.child("models", "CURRENT.json")
    assert create_if_absent(loc, b"v1")
    data, version = read_versioned(loc)
    assert data == b"v1"
    assert replace_if_unchanged(loc, b"v2", version) is True
    assert read(loc) == b"v2"
    # A second writer that read v1 too is refused: its version is stale.
    assert replace_if_unchanged(loc, b"v2-from-stale-reader", version) is False
    assert read(loc) == b"v2"
    data, version = read_versioned(loc)
    assert (data, replace_if_unchanged(loc, b"v3", version)) == (b"v2", True)
    assert read(loc) == b"v3"


def test_replace_of_a_removed_object_is_refused(store) -> None:
    loc = store.child("x.json")
    assert create_if_absent(loc, b"v1")
    _, version = read_versioned(loc)
    loc.fs.rm(loc.path)
    assert replace_if_unchanged(loc, b"v2", version) is False


def test_each_write_returns_the_version_the_next_swap_needs(store) -> None:
    loc = store.child("leases", "score.json")
    first = create_versioned(loc, b"v1")
    assert first is not None and read_versioned(loc) == (b"v1", first)
    assert create_versioned(loc, b"v1-again") is None
    second = replace_versioned(loc, b"v2", first)
    assert second is not None and read_versioned(loc) == (b"v2", second)
    assert replace_versioned(loc, b"v3", first) is None  # the version it replaced is gone
    assert read(loc) == b"v2"
    if store.is_local:  # one hidden guard file beside the object, nothing else left over
        assert sorted(os.listdir(os.path.dirname(loc.path))) == [".score.json.guard", "score.json"]


def test_delete_if_unchanged_deletes_only_the_version_read(store) -> None:
    loc = store.child("leases", "score.json")
    old = create_versioned(loc, b"holder-1")
    current = replace_versioned(loc, b"holder-1 renewed", old)
    assert delete_if_unchanged(loc, old) is False  # someone renewed it since: kept
    assert read(loc) == b"holder-1 renewed"
    assert delete_if_unchanged(loc, current) is True
    assert read_versioned(loc) is None
    assert replace_versioned(loc, b"too late", current) is None  # nothing to replace
    assert read_versioned(loc) is None
    assert create_if_absent(loc, b"holder-2")  # free for the next one


@pytest.mark.parametrize("first", ["replace", "delete"])
def test_of_two_writers_from_one_version_exactly_one_wins(store, first: str) -> None:
    """Two writers read the same version; whichever acts first wins, the other is refused,
    whatever each of them does (replace or delete)."""
    loc = store.child("models", "CURRENT.json")
    assert create_if_absent(loc, b"start")
    (_, seen_by_a), (_, seen_by_b) = read_versioned(loc), read_versioned(loc)
    assert seen_by_a == seen_by_b
    if first == "replace":
        assert replace_if_unchanged(loc, b"a", seen_by_a) is True
        assert delete_if_unchanged(loc, seen_by_b) is False
        assert read(loc) == b"a"
    else:
        assert delete_if_unchanged(loc, seen_by_a) is True
        assert replace_if_unchanged(loc, b"b", seen_by_b) is False
        assert read_versioned(loc) is None


def test_conditional_writes_need_a_local_or_s3_store() -> None:
    memory = Location(fsspec.filesystem("memory"), "/somewhere/x")
    for call in (
        lambda: create_if_absent(memory, b"x"),
        lambda: read_versioned(memory),
        lambda: replace_if_unchanged(memory, b"x", b"x"),
        lambda: delete_if_unchanged(memory, b"x"),
    ):
        with pytest.raises(LeukoflowError, match="local folder or an s3://"):
            call()


@pytest.mark.integration
def test_a_missing_bucket_is_a_store_failure_not_a_lost_race(s3_env) -> None:
    loc = open_location("s3://no-such-bucket-for-cas/store/keys/subject-salt")
    with pytest.raises(StoreUnavailable, match="cannot write s3://no-such-bucket-for-cas"):
        create_if_absent(loc, b"salt")


def _create_racer(path: str, tag: int, barrier, results) -> None:
    barrier.wait()
    results.put((tag, create_if_absent(open_location(path), f"racer-{tag}".encode())))


def _swap_racer(path: str, tag: int, version: bytes, barrier, results) -> None:
    barrier.wait()
    won = replace_if_unchanged(open_location(path), f"racer-{tag}".encode(), version)
    results.put((tag, won))


@pytest.mark.parametrize("kind", ["create", "swap"])
def test_racing_processes_exactly_one_wins(tmp_path, kind: str) -> None:
    loc = open_location(str(tmp_path / "store" / "obj"))
    context = multiprocessing.get_context("fork")
    for _ in range(3):  # a few rounds: a race that is lost only now and then shows up
        if kind == "swap":
            write_bytes_atomic(loc, b"start")
        elif os.path.exists(loc.path):
            os.remove(loc.path)
        n = 6
        barrier, results = context.Barrier(n), context.Queue()
        if kind == "create":
            jobs = [(loc.path, tag, barrier, results) for tag in range(n)]
            target = _create_racer
        else:
            jobs = [(loc.path, tag, b"start", barrier, results) for tag in range(n)]
            target = _swap_racer
        processes = [context.Process(target=target, args=args) for args in jobs]
        for process in processes:
            process.start()
        outcome = dict(results.get(timeout=60) for _ in processes)
        for process in processes:
            process.join(timeout=60)
        winners = [tag for tag, won in outcome.items() if won]
        assert len(winners) == 1, outcome
        assert read(loc) == f"racer-{winners[0]}".encode()
