"""The store lease, against a local folder and a real S3 API (moto's server, conditional writes;
the run's shared one, tests/conftest.py), with the S3 endpoint really going away (the TCP proxy
of tests/reliability/proxy.py).

No test here measures a speed or sleeps to wait for another thread: the fake Clock spends waits
without time passing, threading.Event orders what threads do, and where the real heartbeat
thread must act, the test polls for what it does (a renewal in the store, a log record) with a
deadline."""

import logging
import subprocess
import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime

import fsspec
import pyarrow.dataset as ds
import pytest

from leukoflow.errors import LeukoflowError
from leukoflow.store import lease as lease_module
from leukoflow.store.lease import (
    LeaseBusy,
    LeaseLost,
    LeaseRecord,
    StoreLease,
    default_ttl_s,
    lease_location,
    read_lease,
    store_write_budget_s,
)
from leukoflow.store.storage import (
    S3_CONNECT_TIMEOUT_S,
    S3_READ_TIMEOUT_S,
    S3FS_TRIES,
    Location,
    open_location,
)
from leukoflow.store.tables import (
    predictions_root,
    read_predictions,
    scored_image_ids,
    write_predictions,
)

# Tests cannot wait out S3's real write budget (minutes): they give the lease a small one.
BUDGET_S = 0.05


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path):
    if request.param == "local":
        return open_location(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_env")  # moto's server, its environment set here
    return open_location(f"s3://{endpoint.make_bucket('lease')}/store")


def wait_until(condition, what: str, timeout_s: float = 60.0):
    """Poll a real condition (what another thread does) until it holds, or fail naming it."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


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


def lease(store, run_id, ttl=60.0, clock: Clock | None = None, skew=0.0, budget=BUDGET_S, **times):
    if clock is not None:
        times = {"clock": clock.wall, "monotonic": clock.monotonic, "sleep": clock.sleep}
    elif skew:
        times = {"clock": lambda: time.time() + skew, **times}
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
    clock = Clock()
    first, second = lease(store, "a"), lease(store, "b", clock=clock)
    first.acquire()
    refused, released = threading.Event(), threading.Event()

    def poll_wait(seconds: float) -> None:  # the waiter's pause between tries
        clock.sleep(seconds)
        refused.set()
        assert released.wait(timeout=60)

    second._sleep = poll_wait
    outcome: dict = {}
    waiter = threading.Thread(
        target=lambda: outcome.update(got=second.acquire(wait_s=10, poll_s=0.05))
    )
    waiter.start()
    assert refused.wait(timeout=60)  # it tried, found the lease held, and is waiting
    assert read_lease(lease_location(store, "score")).run_id == "a"
    first.release()
    released.set()
    waiter.join(timeout=60)
    # One refused try, one pause, then the lease: taken only after it was released.
    assert outcome["got"].run_id == "b" and second.attempts == 2 and clock.slept == [0.05]
    assert second.took_over is None
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
    # A deadline that is not a whole number of polls: the last pause is cut to it.
    with pytest.raises(LeaseBusy) as busy:
        waiter.acquire(wait_s=0.6, poll_s=0.25)
    assert clock.slept[-3:] == [0.25, 0.25, pytest.approx(0.1)] and waiter.attempts == 4
    assert busy.value.holder.run_id == "holder"
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
    holder, other = lease(store, "long-night", ttl=1.0), lease(store, "other", ttl=1.0)
    holder.acquire()
    assert holder.renew_every_s == pytest.approx((1.0 - BUDGET_S) / 3)
    with holder.kept_alive():
        # Seven renewals a third of a ttl apart: the lease has lived more than twice its ttl.
        wait_until(
            lambda: read_lease(lease_location(store, "score")).renewals >= 7, "seven renewals"
        )
        holder.ensure_held()
        with pytest.raises(LeaseBusy):
            other.acquire()
    assert read_lease(lease_location(store, "score")) is None
    other.acquire()
    other.release()


class Monotonic:
    """The real monotonic clock, which a test can move ahead (a process hung for that long)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.ahead


def test_a_holder_hung_past_its_hold_limit_stops_renewing_and_is_taken_over(store, caplog):
    monotonic = Monotonic()
    hung = lease(store, "hung-night", ttl=1.0, monotonic=monotonic)
    hung.acquire()
    loc = lease_location(store, "score")
    with (
        caplog.at_level(logging.ERROR, logger="leukoflow.lease"),
        hung.kept_alive(hold_limit_s=600),
    ):
        wait_until(lambda: read_lease(loc).renewals >= 2, "two renewals")
        hung.ensure_held()  # renewing as usual within its limit
        monotonic.ahead = 601  # its hold limit has passed: the next heartbeat stops renewing
        wait_until(lambda: "hold limit" in caplog.text, "the heartbeat to give up")
        with pytest.raises(LeaseLost, match="hold limit"):
            hung.ensure_held()
        nxt = lease(store, "next-night", ttl=1.0)
        nxt.acquire(wait_s=30, poll_s=0.1)  # unchanged for a ttl: stale
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

    def broken(loc, data, expected):
        raise failure()

    with caplog.at_level(logging.WARNING, logger="leukoflow.lease"), holder.kept_alive():
        monkeypatch.setattr(lease_module, "replace_versioned", broken)
        wait_until(  # the next heartbeat, 0.15 s away
            lambda: [r for r in caplog.records if r.name == "leukoflow.lease"],
            "the heartbeat to report the failure",
        )
        with pytest.raises(LeaseLost, match="could not be renewed") as lost:
            holder.ensure_held()
    assert escaped == []  # nothing left the thread as an uncaught exception
    (record,) = [r for r in caplog.records if r.name == "leukoflow.lease"]
    assert record.levelno == logging.ERROR and record.exc_info is None
    assert "s3cr3t-value" not in record.getMessage() + str(lost.value)
    assert "***" in record.getMessage()
    # Its own version was still in the store: released on the way out, nobody has to wait.
    assert read_lease(lease_location(store, "score")) is None


@pytest.fixture
def endpoint(s3_env, monkeypatch):
    """A stoppable endpoint in front of moto, which this test's S3 clients talk to."""
    from reliability.proxy import StoppableEndpoint

    proxy = StoppableEndpoint(s3_env.url.removeprefix("http://"))
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()


@pytest.mark.integration
def test_the_heartbeat_fails_when_the_s3_endpoint_goes_away_and_the_writer_stops(
    s3_env, endpoint, monkeypatch, caplog
):
    """No injected exception: the endpoint really goes away (its port refuses connections)
    just as the heartbeat sends a renewal; the renewal fails, the lease is marked lost, and the
    sweep stops before its next chunk: nothing more is written."""
    monkeypatch.setenv("LEUKOFLOW_S3_MAX_ATTEMPTS", "1")  # fail fast: one attempt per try
    bucket = s3_env.make_bucket("lease")
    store = open_location(f"s3://{bucket}/store")
    holder = lease(store, "night", ttl=0.5)
    # A renewal: a PUT of the lease object conditional on its ETag (creating it is If-None-Match).
    outage = endpoint.stop_when(
        lambda r: r.method == "PUT" and r.path.endswith("/score.json") and "if-match" in r.headers
    )
    chunks_written, stopped = [], []
    with caplog.at_level(logging.WARNING, logger="leukoflow.lease"):
        token = holder.acquire().token  # created (If-None-Match); renewals: the next PUTs
        with holder.kept_alive():
            write_predictions(store, "2026-03-01", "night", _rows(IMAGES[:2]),
                              lease_token=holder.token)  # fmt: skip
            chunks_written.append(IMAGES[:2])
            assert outage.wait(timeout=60)  # the next renewal's PUT met a closed port
            wait_until(lambda: "could not be renewed" in caplog.text, "the renewal to fail")
            try:  # the sweep's next chunk
                holder.ensure_held()
                write_predictions(store, "2026-03-01", "night", _rows(IMAGES[2:4]),
                                  lease_token=holder.token)  # fmt: skip
                chunks_written.append(IMAGES[2:4])
            except LeaseLost as lost:
                stopped.append(str(lost))
    assert chunks_written == [IMAGES[:2]] and len(stopped) == 1
    assert "could not be renewed" in stopped[0] and "Could not connect" in stopped[0]
    (failure,) = [r for r in caplog.records if "could not be renewed" in r.getMessage()]
    assert failure.levelno == logging.ERROR and failure.exc_info is None
    assert not endpoint.listening
    # Straight from moto (the endpoint is still away): the one chunk written before the outage,
    # and the lease as last renewed (its release could not reach the store either).
    fs = s3_env.filesystem()
    parts = [p for p in fs.find(f"{bucket}/store/predictions") if p.endswith(".parquet")]
    assert len(parts) == 1
    record = LeaseRecord.parse(fs.cat_file(f"{bucket}/store/leases/score.json"))
    assert record.run_id == "night" and record.token == token


def test_an_unreadable_lease_object_is_replaced(store):
    loc = lease_location(store, "score")
    loc.fs.makedirs(loc.path.rsplit("/", 1)[0], exist_ok=True)
    loc.fs.pipe_file(loc.path, b'{"token": "cut sho')  # a holder killed while writing it
    assert read_lease(loc) is None
    taker = lease(store, "after-crash")
    taker.acquire()
    assert "unreadable" in taker.took_over
    taker.release()


# -- a swap that landed while its answer was lost --------------------------------------------
def _first_answer_lost(real):
    """`real` (create_versioned or replace_versioned) as it goes when its first write lands and
    the answer is lost: botocore sends the write again, and the retry's condition no longer
    holds (the object is already this write: S3 answers 412; locally the name is taken or the
    bytes changed), so the caller hears of a lost race. Later calls go through. Returns the
    wrapper and the retries' outcomes."""
    retries: list = []

    def swap(loc, data, *version):
        if retries:
            return real(loc, data, *version)
        assert real(loc, data, *version) is not None  # it landed
        retries.append(real(loc, data, *version))
        return retries[0]

    return swap, retries


def test_an_acquire_whose_create_landed_but_whose_answer_was_lost_holds_the_lease(
    store, monkeypatch
):
    create, retries = _first_answer_lost(lease_module.create_versioned)
    monkeypatch.setattr(lease_module, "create_versioned", create)
    loc = lease_location(store, "score")
    holder = lease(store, "night")
    record = holder.acquire()  # not LeaseBusy naming itself
    assert retries == [None]  # the retry was refused: the lease was already there, ours
    assert holder.attempts == 1 and holder.took_over is None
    assert read_lease(loc) == record and holder.token == record.token
    holder.ensure_held()
    holder.renew()  # conditional on the version read back: it is the one in the store
    assert read_lease(loc).renewals == 1
    with pytest.raises(LeaseBusy):
        lease(store, "other").acquire()
    holder.release()
    assert read_lease(loc) is None


def test_a_take_over_that_landed_but_whose_answer_was_lost_holds_the_lease(store, monkeypatch):
    loc = lease_location(store, "score")
    loc.fs.makedirs(loc.path.rsplit("/", 1)[0], exist_ok=True)
    loc.fs.pipe_file(loc.path, b'{"token": "cut sho')  # stale at once: unreadable
    swap, retries = _first_answer_lost(lease_module.replace_versioned)
    monkeypatch.setattr(lease_module, "replace_versioned", swap)
    taker = lease(store, "after-crash")
    record = taker.acquire()
    assert retries == [None] and "unreadable" in taker.took_over
    assert read_lease(loc) == record
    taker.renew()
    taker.ensure_held()
    taker.release()
    assert read_lease(loc) is None


def test_a_renewal_that_landed_but_whose_answer_was_lost_keeps_the_lease(store, monkeypatch):
    loc = lease_location(store, "score")
    holder = lease(store, "night")
    holder.acquire()
    swap, retries = _first_answer_lost(lease_module.replace_versioned)
    monkeypatch.setattr(lease_module, "replace_versioned", swap)
    holder.renew()  # not LeaseLost: the object is this renewal
    assert retries == [None] and read_lease(loc).renewals == 1
    holder.ensure_held()
    holder.renew()  # conditional on the version read back
    assert read_lease(loc).renewals == 2
    holder.release()
    assert read_lease(loc) is None


def _rival_first(real):
    """`real`, but another holder's write lands just before this one: the same record with
    another token (the bytes differ only there)."""

    def swap(loc, data, *version):
        rival = replace(LeaseRecord.parse(data), token="rival-token")
        assert real(loc, rival.to_bytes(), *version) is not None
        return real(loc, data, *version)

    return swap


def test_a_swap_refused_for_another_holders_write_is_still_a_lost_race(store, monkeypatch):
    """The read-back after a refused swap finds another holder's bytes: the race was lost."""
    loc = lease_location(store, "score")
    monkeypatch.setattr(
        lease_module, "create_versioned", _rival_first(lease_module.create_versioned)
    )
    loser = lease(store, "loser")
    with pytest.raises(LeaseBusy) as busy:
        loser.acquire()
    assert busy.value.holder.token == "rival-token" and loser.token is None
    monkeypatch.undo()
    loc.fs.rm(loc.path)

    holder = lease(store, "night")
    holder.acquire()
    monkeypatch.setattr(
        lease_module, "replace_versioned", _rival_first(lease_module.replace_versioned)
    )
    with pytest.raises(LeaseLost, match="taken over by another process"):
        holder.renew()
    with pytest.raises(LeaseLost):
        holder.ensure_held()
    holder.release()  # must not delete the rival's lease
    assert read_lease(loc).token == "rival-token"


@pytest.mark.integration
def test_lease_writes_whose_answers_are_cut_on_the_wire_still_hold_the_lease(s3_env, endpoint):
    """No injected function: the endpoint forwards the conditional PUT, moto applies it, and the
    connection is cut before the answer; botocore sends the PUT again and S3 answers 412, the
    object being already ours. Both the create (acquire) and a renewal hold on."""
    store = open_location(f"s3://{s3_env.make_bucket('lease')}/store")
    loc = lease_location(store, "score")
    holder = lease(store, "night")

    def put(condition: str):
        return lambda r: (
            r.method == "PUT" and r.path.endswith("/score.json") and (condition in r.headers)
        )

    for condition, write in (("if-none-match", holder.acquire), ("if-match", holder.renew)):
        cut = endpoint.cut_when(put(condition))
        write()
        assert cut.is_set() and endpoint.listening
        sent = [r for r in endpoint.requests if put(condition)(r)]
        assert len(sent) >= 2  # applied and unanswered, then the retry
        holder.ensure_held()
    assert endpoint.errors_answered() == 0  # the 412s came from moto itself
    assert read_lease(loc).renewals == 1 and read_lease(loc).token == holder.token
    holder.renew()
    holder.release()
    assert read_lease(loc) is None


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


def _sweep(store, holder: StoreLease, wait_s: float, scoring=None) -> str:
    """What a nightly sweep does with the lease: score what is not scored yet, two images a
    chunk, each chunk written only after ensure_held. scoring(chunk): the chunk's scoring, which
    a test holds as long as it wants."""
    try:
        holder.acquire(wait_s=wait_s, poll_s=0.05)
    except LeaseBusy:
        return "busy"
    with holder.kept_alive():
        todo = [i for i in IMAGES if i not in scored_image_ids(store, "m1")]
        for start in range(0, len(todo), 2):
            if scoring is not None:
                scoring(start // 2)
            holder.ensure_held()
            write_predictions(store, "2026-03-01", holder.run_id, _rows(todo[start : start + 2]),
                              lease_token=holder.token)  # fmt: skip
    return f"completed {len(todo)}"


def _stored_rows(store) -> list[dict]:
    """Every prediction row in the files, copies included (no deduplication)."""
    root = predictions_root(store)
    dataset = ds.dataset(root.path, filesystem=root.fs, format="parquet")
    return dataset.to_table(columns=["image_id", "lease_token"]).to_pylist()


SKEWS = pytest.mark.parametrize("skews", [(0, 300), (300, 0)], ids=["waiter-ahead", "holder-ahead"])


@SKEWS
def test_clock_skew_of_minutes_between_two_sweeps_loses_and_doubles_nothing(store, skews):
    """The first sweep is held in its first chunk until the second, its clock minutes off, has
    watched the lease for more than a ttl: the first's heartbeat keeps it, the second waits it
    out, then finds nothing left to score."""
    ttl = 2.0
    first = lease(store, "first", ttl=ttl, skew=skews[0], budget=0.2)
    began: list[float] = []
    watched_past_ttl = threading.Event()

    def poll_wait(seconds: float) -> None:  # the second's pause between its tries (real time)
        time.sleep(seconds)
        if time.monotonic() - began[0] > 1.5 * ttl:
            watched_past_ttl.set()

    second = lease(store, "second", ttl=ttl, skew=skews[1], budget=0.2, sleep=poll_wait)
    holding = threading.Event()

    def first_scoring(chunk: int) -> None:
        if chunk == 0:
            holding.set()
            assert watched_past_ttl.wait(timeout=120), "the second sweep never waited a ttl"

    outcomes: dict = {}

    def run(name: str, holder: StoreLease, **how) -> None:
        try:
            outcomes[name] = _sweep(store, holder, **how)
        except LeaseLost as lost:
            outcomes[name] = f"lost: {lost}"
        except BaseException as error:  # reported below; a thread would swallow it
            outcomes[name] = f"error: {error!r}"
        finally:
            watched_past_ttl.set()  # had the second taken over, the first would fail at once

    sweeps = [threading.Thread(target=run, args=("first", first),
                               kwargs={"wait_s": 0, "scoring": first_scoring})]  # fmt: skip
    sweeps[0].start()
    assert holding.wait(timeout=60)  # the first holds the lease, mid-chunk
    began.append(time.monotonic())
    sweeps.append(threading.Thread(target=run, args=("second", second), kwargs={"wait_s": 120}))
    sweeps[1].start()
    for sweep in sweeps:
        sweep.join(timeout=180)
    # The first ran past its ttl (held for more than one), renewing: the skewed one waited it
    # out without taking over, and the files hold each image exactly once, under one lease.
    assert outcomes == {"first": "completed 10", "second": "completed 0"}
    assert second.took_over is None and second.attempts > 1
    stored = _stored_rows(store)
    assert Counter(r["image_id"] for r in stored) == Counter(IMAGES)
    (token,) = {r["lease_token"] for r in stored}
    assert token is not None
    night = read_predictions(store, "2026-03-01", "m1", columns=["image_id"])
    assert sorted(night.column("image_id").to_pylist()) == IMAGES  # nothing lost, each once


@SKEWS
def test_a_holder_that_stalls_past_its_ttl_and_then_writes_makes_no_second_copy(
    store, skews, monkeypatch
):
    """The other case of two sweeps minutes apart: the first's renewals stop (hung), so the
    second takes over, and the first, waking up, is stopped before it writes again."""
    stalled = lease(store, "stalled", ttl=1.0, budget=0.1, skew=skews[0])
    stalled.acquire()
    stalled_token = stalled.token
    hang, stalled_at = threading.Event(), []
    real_replace = lease_module.replace_versioned

    def hung_renewal(loc, data, expected):  # its heartbeat is stuck, e.g. in a hung connection
        if LeaseRecord.parse(data).token == stalled_token:  # the taker's writes go through
            stalled_at.append(time.monotonic())
            hang.wait(timeout=60)  # bounded: a failing test must not hang on it
        return real_replace(loc, data, expected)

    with stalled.kept_alive():
        write_predictions(store, "2026-03-01", "stalled", _rows(IMAGES[:4]),
                          lease_token=stalled.token)  # fmt: skip
        monkeypatch.setattr(lease_module, "replace_versioned", hung_renewal)
        # The next sweep: it watches the unchanged lease for a ttl, takes over, does the rest.
        taker = lease(store, "taker", ttl=2.0, budget=0.1, skew=skews[1])
        assert _sweep(store, taker, wait_s=30) == "completed 6"
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


def test_a_lease_needs_a_store_with_conditional_writes():
    memory = Location(fsspec.filesystem("memory"), "/store/leases/score.json")
    with pytest.raises(LeukoflowError, match="leases need a local folder or an s3://"):
        StoreLease(memory, "sweep", ttl_s=60, write_budget_s=BUDGET_S)


def test_records_round_trip_and_refuse_garbage():
    record = LeaseRecord("t", "sweep", "host", 12, None, 1.0, 2.0)
    assert LeaseRecord.parse(record.to_bytes()) == record
    assert LeaseRecord.parse(b"[1, 2]") is None and LeaseRecord.parse(b"\xff") is None
    # A record from an older or newer writer still parses (fields it lacks get defaults).
    newer = b'{"token": "t", "name": "sweep", "host": "h", "pid": 1, "run_id": null, ' \
        b'"acquired_at": 1.0, "expires_at": 301.0, "since": "later"}'  # fmt: skip
    assert LeaseRecord.parse(newer).ttl_s is None and LeaseRecord.parse(newer).renewals == 0
