"""The store lease, against a local folder and a real S3 API (moto's server, conditional writes)."""

import logging
import subprocess
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import pyarrow.dataset as ds
import pytest

from leukoflow.errors import LeukoflowError
from leukoflow.tasks.lease import (
    LeaseBusy,
    LeaseLost,
    LeaseRecord,
    StoreLease,
    default_ttl_s,
    lease_location,
    read_lease,
    store_write_budget_s,
)
from leukoflow.tasks.storage import (
    S3_CONNECT_TIMEOUT_S,
    S3_READ_TIMEOUT_S,
    S3FS_TRIES,
    open_location,
)
from leukoflow.tasks.tables import (
    predictions_root,
    read_predictions,
    scored_image_ids,
    write_predictions,
)

# Tests cannot wait out S3's real write budget (minutes): they give the lease a small one.
BUDGET_S = 0.05


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
    """A process's fake time: its wall clock (skewed as wanted) and its monotonic clock; sleeping
    advances both, so waits take no real time."""

    def __init__(self, skew: float = 0.0) -> None:
        self.now = 1_000_000.0
        self.skew = skew
        self.slept: list[float] = []

    def wall(self) -> float:
        return self.now + self.skew

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def lease(store, run_id, ttl=60.0, clock: Clock | None = None, skew=0.0, budget=BUDGET_S):
    times = {}
    if clock is not None:
        times = {"clock": clock.wall, "monotonic": clock.monotonic, "sleep": clock.sleep}
    elif skew:
        times = {"clock": lambda: time.time() + skew}
    loc = lease_location(store, "score")
    return StoreLease(loc, "sweep", ttl, run_id, write_budget_s=budget, **times)


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


def test_acquire_sleeps_between_attempts_and_keeps_its_deadline(store):
    holder = lease(store, "holder")
    holder.acquire()
    clock = Clock()
    waiter = lease(store, "waiter", clock=clock)
    with pytest.raises(LeaseBusy):
        waiter.acquire(wait_s=1.0, poll_s=0.25)
    assert clock.slept == [0.25] * 4 and waiter.attempts == 5  # one try per poll, no spinning
    with pytest.raises(LeaseBusy):
        waiter.acquire(wait_s=0)
    assert waiter.attempts == 1 and clock.slept == [0.25] * 4
    with pytest.raises(LeukoflowError, match="poll interval"):
        waiter.acquire(wait_s=1, poll_s=0)
    # On real time too: it gives up on time, having slept between its tries.
    waiter = lease(store, "waiter")
    started = time.monotonic()
    with pytest.raises(LeaseBusy):
        waiter.acquire(wait_s=1.0, poll_s=0.1)
    waited = time.monotonic() - started
    assert 1.0 <= waited < 1.8 and 2 <= waiter.attempts <= 11, (waited, waiter.attempts)
    holder.release()


def test_a_lease_not_renewed_for_its_ttl_is_taken_over_and_its_old_holder_stops_writing(store):
    stalled_clock, next_clock = Clock(), Clock()
    stalled = lease(store, "stalled", 10, stalled_clock)
    next_sweep = lease(store, "next", 10, next_clock)
    stalled.acquire()
    next_clock.now += 5
    with pytest.raises(LeaseBusy):
        next_sweep.acquire()  # neither changed for a ttl nor expired: no wait asked, none made
    next_clock.now += 6  # past its written expiry: watched for one ttl, though no wait was asked
    before = next_clock.now
    next_sweep.acquire(poll_s=2.5)
    assert (
        next_clock.slept == [2.5] * 4 and next_clock.now - before == 10
    )  # it watched the whole ttl, then took it
    assert "not renewed for 10s" in next_sweep.took_over and "stalled" in next_sweep.took_over
    # The stalled holder's own clock says it renewed just now: the store says otherwise.
    with pytest.raises(LeaseLost, match="taken over by another process"):
        stalled.ensure_held()
    with pytest.raises(LeaseLost):
        stalled.renew()
    stalled.release()  # must not delete the new holder's lease
    assert read_lease(lease_location(store, "score")).run_id == "next"
    next_sweep.ensure_held()
    next_sweep.release()


def test_a_lease_that_keeps_changing_is_never_taken_over_whatever_its_expiry_says(store):
    holder_clock, waiter_clock = Clock(), Clock(skew=3600)  # the waiter's clock is an hour ahead
    holder = lease(store, "alive", 10, holder_clock)
    waiter = lease(store, "skewed", 10, waiter_clock)
    holder.acquire()
    renewals = []

    def renew_while_waiting(seconds: float) -> None:
        Clock.sleep(waiter_clock, seconds)
        holder_clock.now += seconds
        if holder_clock.now - holder._renewed_at >= 3:  # the heartbeat, every ttl/3
            holder.renew()
            renewals.append(holder_clock.now)

    waiter._sleep = renew_while_waiting
    with pytest.raises(LeaseBusy):
        waiter.acquire(wait_s=0, poll_s=1)  # it looks an hour expired: watched for a ttl
    assert len(renewals) >= 3 and sum(waiter_clock.slept) == pytest.approx(10)
    holder.ensure_held()
    holder.release()


def test_ensure_held_fails_once_a_write_could_outlast_the_last_renewal(store):
    clock = Clock()
    holder = lease(store, "slow", 10, clock, budget=4)  # writes may take 4 s: 6 s of slack
    holder.acquire()
    clock.now += 5.9
    holder.ensure_held()
    clock.now += 0.2
    with pytest.raises(LeaseLost, match="last renewed 6s ago"):
        holder.ensure_held()
    holder.renew()
    holder.ensure_held()
    holder.release()


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
        # On S3 the holder may be another host: only an unchanged lease for a ttl frees it.
        with pytest.raises(LeaseBusy):
            resumed.acquire()


def test_racing_acquirers_get_exactly_one_winner_also_when_taking_over(store):
    lease(store, "dead", 10, Clock()).acquire()
    # Every racer sees it expired, watches it for a ttl on its own clock, and tries to take it.
    racers = [lease(store, f"racer-{i}", 10, Clock(skew=11)) for i in range(6)]
    start, winners, losers = threading.Barrier(len(racers)), [], []

    def race(candidate: StoreLease) -> None:
        start.wait()
        try:
            candidate.acquire(poll_s=2.5)
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
    holder, other = lease(store, "long-night", ttl=2.0), lease(store, "other", ttl=2.0)
    holder.acquire()
    with holder.kept_alive():
        time.sleep(4.2)  # more than twice the ttl
        holder.ensure_held()
        assert read_lease(lease_location(store, "score")).renewals >= 3
        with pytest.raises(LeaseBusy):
            other.acquire()
    assert read_lease(lease_location(store, "score")) is None
    other.acquire()
    other.release()


def test_a_holder_hung_past_its_hold_limit_stops_renewing_and_is_taken_over(store):
    hung = lease(store, "hung-night", ttl=2.0)
    hung.acquire()
    with hung.kept_alive(hold_limit_s=1.0):
        time.sleep(0.5)
        hung.ensure_held()  # renewing as usual within its limit
        nxt = lease(store, "next-night", ttl=2.0)
        nxt.acquire(wait_s=10, poll_s=0.1)  # renewals stop at 1 s; stale a ttl later
        assert "not renewed" in nxt.took_over
        with pytest.raises(LeaseLost):
            hung.ensure_held()
    assert read_lease(lease_location(store, "score")).run_id == "next-night"  # not released
    nxt.release()
    with pytest.raises(LeukoflowError, match="hold limit"), hung.kept_alive(hold_limit_s=0):
        pass


def _connection_error() -> Exception:
    from botocore.exceptions import EndpointConnectionError

    return EndpointConnectionError(endpoint_url="http://s3.internal:9000/?secret=s3cr3t-value")


@pytest.mark.parametrize(
    "failure", [_connection_error, lambda: RuntimeError("renewal broke: s3cr3t-value")]
)
def test_the_heartbeat_logs_any_failure_and_the_writer_stops(store, monkeypatch, caplog, failure):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    holder = lease(store, "flaky", ttl=0.5)
    holder.acquire()

    def broken(data, expected):
        raise failure()

    with caplog.at_level(logging.WARNING, logger="leukoflow.lease"), holder.kept_alive():
        monkeypatch.setattr(holder._backend, "replace", broken)
        deadline = time.monotonic() + 10
        while not [r for r in caplog.records if r.name == "leukoflow.lease"]:
            assert time.monotonic() < deadline, "the heartbeat never reported the failure"
            time.sleep(0.05)  # the next heartbeat, 0.15 s away
        with pytest.raises(LeaseLost, match="could not be renewed") as lost:
            holder.ensure_held()
    assert escaped == []  # nothing left the thread as an uncaught exception
    (record,) = [r for r in caplog.records if r.name == "leukoflow.lease"]
    assert record.levelno == logging.ERROR and record.exc_info is None
    assert "s3cr3t-value" not in record.getMessage() + str(lost.value)
    assert "***" in record.getMessage()
    # Its own version was still in the store: released on the way out, nobody has to wait.
    assert read_lease(lease_location(store, "score")) is None


def test_an_unreadable_lease_object_is_replaced(store):
    loc = lease_location(store, "score")
    loc.fs.makedirs(loc.path.rsplit("/", 1)[0], exist_ok=True)
    loc.fs.pipe_file(loc.path, b'{"token": "cut sho')  # a holder killed while writing it
    assert read_lease(loc) is None
    taker = lease(store, "after-crash")
    taker.acquire()
    assert "unreadable" in taker.took_over
    taker.release()


# -- what the lease guards: nightly prediction chunks ---------------------------------------
IMAGES = [f"img-{i:02d}" for i in range(10)]


def _rows(image_ids: list[str]) -> list[dict]:
    now = datetime.now(UTC)
    return [
        {"image_id": i, "uri": f"/inbox/{i}.bmp", "subject_id": "s1", "model_id": "m1",
         "score": 0.5, "score_kind": "probability", "predicted_label": "hem", "threshold": 0.6,
         "scored_at": now, "run_id": "r"}
        for i in image_ids
    ]  # fmt: skip


def _sweep(store, holder: StoreLease, chunk_s: float, wait_s: float) -> str:
    """What a nightly sweep does with the lease: score what is not scored yet, two images a
    chunk, each chunk written only after ensure_held."""
    try:
        holder.acquire(wait_s=wait_s, poll_s=0.05)
    except LeaseBusy:
        return "busy"
    with holder.kept_alive():
        todo = [i for i in IMAGES if i not in scored_image_ids(store, "m1")]
        for start in range(0, len(todo), 2):
            time.sleep(chunk_s)  # scoring takes a while: the sweep outlives its ttl
            holder.ensure_held()
            write_predictions(store, "2026-03-01", holder.run_id, _rows(todo[start : start + 2]),
                              lease_token=holder.token)  # fmt: skip
    return f"completed {len(todo)}"


def _stored_rows(store) -> list[dict]:
    """Every prediction row in the files, copies included (no deduplication)."""
    root = predictions_root(store)
    dataset = ds.dataset(root.path, filesystem=root.fs, format="parquet")
    return dataset.to_table(columns=["image_id", "lease_token"]).to_pylist()


@pytest.mark.parametrize("skews", [(0, 300), (300, 0)], ids=["waiter-ahead", "holder-ahead"])
def test_clock_skew_of_minutes_between_two_sweeps_loses_and_doubles_nothing(store, skews):
    first = lease(store, "first", ttl=2.0, skew=skews[0], budget=0.2)
    second = lease(store, "second", ttl=2.0, skew=skews[1], budget=0.2)
    outcomes = {}

    def run(name: str, holder: StoreLease, delay: float) -> None:
        time.sleep(delay)
        try:
            outcomes[name] = _sweep(store, holder, chunk_s=0.5, wait_s=15)
        except LeaseLost:
            outcomes[name] = "lost"  # a loaded machine delayed its renewals: it stopped writing

    threads = [
        threading.Thread(target=run, args=("first", first, 0)),
        threading.Thread(target=run, args=("second", second, 0.3)),  # arrives mid-sweep
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    night = read_predictions(store, "2026-03-01", "m1", columns=["image_id"])
    assert sorted(night.column("image_id").to_pylist()) == IMAGES  # nothing lost, each once
    if outcomes["first"] == "completed 10":
        # It ran past its ttl (5 chunks of 0.5 s), renewing: the skewed one waited it out, and
        # the files hold each image exactly once, all under the first sweep's lease.
        assert outcomes["second"] == "completed 0" and second.took_over is None
        stored = _stored_rows(store)
        assert Counter(r["image_id"] for r in stored) == Counter(IMAGES)
        (token,) = {r["lease_token"] for r in stored}
        assert token is not None
    else:  # a loaded machine starved its renewals: it stopped writing, the other finished
        assert outcomes["first"] == "lost" and outcomes["second"].startswith("completed")


def test_a_holder_that_stalls_past_its_ttl_and_then_writes_makes_no_second_copy(store):
    stalled = lease(store, "stalled", ttl=1.0, budget=0.1)
    stalled.acquire()
    stalled_token = stalled.token
    hang, stalled_at = threading.Event(), []
    real_replace = stalled._backend.replace

    def hung_renewal(data, expected):  # its heartbeat is stuck, e.g. in a hung connection
        stalled_at.append(time.monotonic())
        hang.wait()
        return real_replace(data, expected)

    with stalled.kept_alive():
        write_predictions(store, "2026-03-01", "stalled", _rows(IMAGES[:4]),
                          lease_token=stalled.token)  # fmt: skip
        stalled._backend.replace = hung_renewal
        # The next sweep: it watches the unchanged lease for a ttl, takes over, does the rest.
        taker = lease(store, "taker", ttl=2.0, budget=0.1)
        assert _sweep(store, taker, chunk_s=0, wait_s=5) == "completed 6"
        assert stalled_at  # taken over while the stalled sweep's renewal hung
        assert "not renewed" in taker.took_over
        # The stalled sweep wakes up and goes on with what it thinks is left to do.
        with pytest.raises(LeaseLost, match="taken over"):
            stalled.ensure_held()
        hang.set()
    stored = _stored_rows(store)
    assert Counter(r["image_id"] for r in stored) == Counter(IMAGES)
    assert {r["lease_token"] for r in stored if r["image_id"] in IMAGES[:4]} == {stalled_token}
    # Had its write slipped through all the same, the readers would still count it once.
    write_predictions(store, "2026-03-01", "stalled", _rows(IMAGES[4:]), lease_token=stalled_token)
    assert len(_stored_rows(store)) == len(IMAGES) + 6
    night = read_predictions(store, "2026-03-01", "m1", columns=["image_id", "lease_token"])
    assert sorted(night.column("image_id").to_pylist()) == IMAGES
    assert scored_image_ids(store, "m1") == set(IMAGES)


# -- the ttl against the store's write budget ------------------------------------------------
def test_the_ttl_must_exceed_the_longest_write_to_the_store(tmp_path, monkeypatch):
    local = open_location(str(tmp_path / "store"))
    with pytest.raises(LeukoflowError, match="must exceed the longest write"):
        StoreLease(lease_location(local, "score"), "sweep", ttl_s=5, write_budget_s=10)
    default = StoreLease(lease_location(local, "score"), "sweep")
    assert default.ttl_s == 300 and default.write_budget_s == store_write_budget_s(local)

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3 = open_location("s3://bucket/store")
    for attempts in (1, 8):
        monkeypatch.setenv("LEUKOFLOW_S3_MAX_ATTEMPTS", str(attempts))
        budget = store_write_budget_s(s3)
        # Every try of every s3fs attempt may wait out both timeouts, plus the backoffs.
        assert budget > S3FS_TRIES * attempts * (S3_CONNECT_TIMEOUT_S + S3_READ_TIMEOUT_S)
        assert default_ttl_s(budget) > budget
    assert budget > 560  # the default budget: 2 x 8 attempts of up to 35 s each
    with pytest.raises(LeukoflowError, match=r"\(772 s within the storage retry budget\)"):
        StoreLease(lease_location(s3, "score"), "sweep", ttl_s=300)
    held = StoreLease(lease_location(s3, "score"), "sweep")  # the default fits the budget
    assert held.ttl_s > held.write_budget_s and held.renew_every_s > 30


def test_records_round_trip_and_refuse_garbage():
    record = LeaseRecord("t", "sweep", "host", 12, None, 1.0, 2.0)
    assert LeaseRecord.parse(record.to_bytes()) == record
    assert LeaseRecord.parse(b"[1, 2]") is None and LeaseRecord.parse(b"\xff") is None
    # A record from an older or newer writer still parses (fields it lacks get defaults).
    newer = b'{"token": "t", "name": "sweep", "host": "h", "pid": 1, "run_id": null, ' \
        b'"acquired_at": 1.0, "expires_at": 301.0, "since": "later"}'  # fmt: skip
    assert LeaseRecord.parse(newer).ttl_s is None and LeaseRecord.parse(newer).renewals == 0
