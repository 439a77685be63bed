"""The store lease, against a local folder and a real S3 API (moto's server, conditional writes)."""

import subprocess
import threading
import time
import uuid

import pytest

from leukoflow.tasks.lease import (
    LeaseBusy,
    LeaseLost,
    LeaseRecord,
    StoreLease,
    lease_location,
    read_lease,
)
from leukoflow.tasks.storage import open_location


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return open_location(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"lease-{uuid.uuid4().hex[:12]}"
    root = open_location(f"s3://{bucket}/store")
    root.fs.mkdir(bucket)
    return root


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def lease(store, run_id, ttl=60.0, clock=time.time):
    return StoreLease(lease_location(store, "score"), "sweep", ttl, run_id, clock=clock)


def test_one_holder_at_a_time_and_the_second_is_told_who(store):
    first, second = lease(store, "night-1"), lease(store, "night-1-again")
    first.acquire()
    with pytest.raises(LeaseBusy) as busy:
        second.acquire(wait_s=0)
    assert busy.value.holder.run_id == "night-1"
    assert "run night-1" in str(busy.value) and f"pid {first.pid}" in str(busy.value)
    first.release()
    assert read_lease(lease_location(store, "score")) is None
    assert second.acquire().run_id == "night-1-again"
    second.release()


def test_a_waiting_sweep_gets_the_lease_once_it_is_released(store):
    first, second = lease(store, "a"), lease(store, "b")
    first.acquire()
    releaser = threading.Timer(0.4, first.release)
    releaser.start()
    started = time.monotonic()
    second.acquire(wait_s=10, poll_s=0.05)
    releaser.join()
    assert 0.3 < time.monotonic() - started < 5
    assert read_lease(lease_location(store, "score")).run_id == "b"
    second.release()


def test_an_expired_lease_is_taken_over_and_its_old_holder_stops_writing(store):
    clock = Clock()
    stalled, next_sweep = lease(store, "stalled", 10, clock), lease(store, "next", 10, clock)
    stalled.acquire()
    clock.now += 5
    with pytest.raises(LeaseBusy):
        next_sweep.acquire()
    clock.now += 6  # past the expiry: the stalled holder never renewed
    next_sweep.acquire()
    assert "expired" in next_sweep.took_over and "stalled" in next_sweep.took_over
    with pytest.raises(LeaseLost):
        stalled.ensure_held()
    with pytest.raises(LeaseLost):
        stalled.renew()
    stalled.release()  # must not delete the new holder's lease
    assert read_lease(lease_location(store, "score")).run_id == "next"
    next_sweep.ensure_held()
    next_sweep.release()


def test_a_lease_of_a_dead_process_is_stale_at_once_only_on_a_local_store(store):
    probe = subprocess.Popen(["true"])  # its pid no longer runs once it is reaped
    probe.wait()
    holder = lease(store, "killed")
    holder.pid = probe.pid
    holder.acquire()  # recorded with the dead pid and an expiry a minute ahead
    resumed = lease(store, "resumed")
    if store.is_local:
        resumed.acquire()
        assert f"process {probe.pid} no longer runs" in resumed.took_over
        resumed.release()
    else:
        # On S3 the holder may be another host: only the expiry can free the lease.
        with pytest.raises(LeaseBusy):
            resumed.acquire()


def test_racing_acquirers_get_exactly_one_winner_also_when_taking_over(store):
    clock = Clock()
    lease(store, "dead", 10, clock).acquire()
    clock.now += 11  # expired: every racer sees it stale and tries to take it over
    racers = [lease(store, f"racer-{i}", 10, clock) for i in range(6)]
    start, winners, losers = threading.Barrier(len(racers)), [], []

    def race(candidate: StoreLease) -> None:
        start.wait()
        try:
            candidate.acquire()
            winners.append(candidate.run_id)
        except LeaseBusy:
            losers.append(candidate.run_id)

    threads = [threading.Thread(target=race, args=(racer,)) for racer in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and len(losers) == len(racers) - 1
    assert read_lease(lease_location(store, "score")).run_id == winners[0]


def test_the_heartbeat_keeps_a_short_lease_alive_and_release_frees_it(store):
    holder, other = lease(store, "long-night", ttl=0.5), lease(store, "other", ttl=0.5)
    holder.acquire()
    with holder.kept_alive():
        time.sleep(1.2)  # more than twice the ttl
        holder.ensure_held()
        with pytest.raises(LeaseBusy):
            other.acquire()
    assert read_lease(lease_location(store, "score")) is None
    other.acquire()
    other.release()


def test_an_unreadable_lease_object_is_replaced(store):
    loc = lease_location(store, "score")
    loc.fs.makedirs(loc.path.rsplit("/", 1)[0], exist_ok=True)
    loc.fs.pipe_file(loc.path, b'{"token": "cut sho')  # a holder killed while writing it
    assert read_lease(loc) is None
    taker = lease(store, "after-crash")
    taker.acquire()
    assert "unreadable" in taker.took_over
    taker.release()


def test_records_round_trip_and_refuse_garbage():
    record = LeaseRecord("t", "sweep", "host", 12, None, 1.0, 2.0)
    assert LeaseRecord.parse(record.to_bytes()) == record
    assert LeaseRecord.parse(b"[1, 2]") is None and LeaseRecord.parse(b"\xff") is None
