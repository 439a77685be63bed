"""A lease in the store: at most one holder at a time, and a dead holder never blocks the next
one for long.

The lease is one small JSON object, `leases/<name>.json`, naming its holder (host, pid, run id),
a token unique to this holding, the holder's ttl and a renewal count. Every change is a
compare-and-swap (the storage layer's, store/storage.py), so two processes can never both
believe they hold it:
- create: only when no lease exists (S3: PUT with If-None-Match: *; a local folder: a hard link
  of a fully written temporary file, refused when the name is taken);
- renew, take over a stale lease, release: only when the object is still the exact version this
  process last saw (S3: If-Match on its ETag; a local folder: compare the bytes and replace or
  remove them while holding a short fcntl lock on a hidden guard file beside the lease, which
  the kernel drops if the process dies).

A swap refused while the object holds exactly the bytes this process sent was its own write,
landed with its answer lost (on S3 a retried conditional PUT then meets 412): the token and
renewal count make those bytes unique to this write, so the lease takes the version read back
and goes on as if the swap had succeeded (as the model registry does with its pointer).

Staleness never compares the clocks of two hosts. A holder renews every (ttl - write budget) / 3
from a heartbeat thread, and every renewal changes the object (its renewal count goes up). A
waiting process takes the lease over only once it has itself seen the same version, unchanged,
for the holder's whole ttl on its own monotonic clock. The written expiry is only a hint: a
lease that looks expired makes `acquire` watch it for one ttl even with no wait asked for, so a
dead holder's lease is recovered; skewed clocks can then only delay that recovery, never let two
processes hold the lease. On a local folder a lease naming a process of this host that no longer
runs is stale at once (a kill -9 is recovered without waiting).

Fencing: `ensure_held` (called before every write) reads the lease from the store and fails if
its token is not ours, and fails once the last renewal sent is more than ttl - write budget ago,
where the write budget is the longest one write to the store can take within its retry budget
(store/storage.py). A write started after a passing check therefore ends before any other
process can see the lease stale. The readers of what the lease guards still keep one copy per
key (store/tables.read_predictions), so even a write the fence could not stop (a local disk that
hangs past its budget) is never counted twice.

No Prefect, no Ray: tested on its own against a local folder and an S3 server.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime

from leukoflow.errors import LeukoflowError
from leukoflow.store.storage import (
    S3_CONNECT_TIMEOUT_S,
    S3_READ_TIMEOUT_S,
    S3FS_TRIES,
    Location,
    create_versioned,
    delete_if_unchanged,
    first_line,
    read_versioned,
    replace_versioned,
    s3_retry_options,
    store_failures,
    supports_conditional_writes,
)

log = logging.getLogger("leukoflow.lease")

DEFAULT_TTL_S = 300.0
SWEEP_LEASE = "score"  # the lease nightly sweeps of one store share
# A local write has no retry budget; one that takes longer than this (a hung mount) is not
# fenced, though readers still keep one copy of each prediction.
LOCAL_WRITE_BUDGET_S = 10.0
# The default ttl leaves at least this long between a renewal and the write margin.
MIN_RENEW_WINDOW_S = 150.0
# botocore "standard" retries: a full-jitter backoff capped at 20 s before each retry, plus up to
# 5 s more when the server sends x-amz-retry-after.
_BOTO_MAX_BACKOFF_S = 20.0
_BOTO_RETRY_AFTER_EXTRA_S = 5.0


def store_write_budget_s(loc: Location) -> float:
    """The longest one write to this store can take before it fails (seconds).

    S3: s3fs tries a request S3FS_TRIES times; each try is one botocore call of up to
    LEUKOFLOW_S3_MAX_ATTEMPTS attempts, each bounded by the connect and read timeouts, with the
    backoffs between them (store/storage.py). Local folders: LOCAL_WRITE_BUDGET_S.
    """
    if loc.is_local:
        return LOCAL_WRITE_BUDGET_S
    attempts = s3_retry_options()["config_kwargs"]["retries"]["total_max_attempts"]
    backoffs = sum(
        min(2.0**k, _BOTO_MAX_BACKOFF_S) + _BOTO_RETRY_AFTER_EXTRA_S for k in range(attempts - 1)
    )
    per_call = attempts * (S3_CONNECT_TIMEOUT_S + S3_READ_TIMEOUT_S) + backoffs
    s3fs_sleeps = sum(min(1.7**i * 0.1, 15.0) for i in range(S3FS_TRIES))  # s3fs's own waits
    return S3FS_TRIES * per_call + s3fs_sleeps


def default_ttl_s(budget_s: float) -> float:
    """The ttl used when none is given: DEFAULT_TTL_S, longer where writes may take long (S3)."""
    return max(DEFAULT_TTL_S, round(budget_s + MIN_RENEW_WINDOW_S))


def lease_location(store: Location, name: str) -> Location:
    """Where the lease called `name` lives in the store."""
    return store.child("leases", f"{name}.json")


def read_lease(loc: Location) -> LeaseRecord | None:
    """The lease record at `loc` as it is now (None: no lease, or an unreadable one)."""
    try:
        return LeaseRecord.parse(loc.fs.cat_file(loc.path))
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class LeaseRecord:
    """Who holds the lease; times are the holder's wall clock (for people, and as a hint)."""

    token: str
    name: str
    host: str
    pid: int
    run_id: str | None
    acquired_at: float
    expires_at: float
    ttl_s: float | None = None  # the holder's ttl: how long a waiter watches before taking over
    renewals: int = 0  # bumped by every renewal, so that each one changes the object

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        """The record in `data`, or None when it is not one (a holder died while writing it)."""
        try:
            values = json.loads(data.decode("utf-8"))
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in values.items() if k in known})
        except (ValueError, TypeError, AttributeError):
            return None

    def describe(self, now: float | None = None) -> str:
        since = datetime.fromtimestamp(self.acquired_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        left = self.expires_at - (time.time() if now is None else now)
        run = f", run {self.run_id}" if self.run_id else ""
        return f"{self.host} pid {self.pid}{run}, since {since}, expires in {left:.0f}s"


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (a zombie counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class LeaseBusy(Exception):
    """Another live holder has the lease."""

    def __init__(self, holder: LeaseRecord | None, name: str):
        self.holder = holder
        who = holder.describe() if holder else "an unknown holder"
        super().__init__(f"another {name} holds the lease on this store ({who})")


class LeaseLost(Exception):
    """This process no longer holds the lease (it stalled past its expiry and was taken over)."""


# -- the lease -------------------------------------------------------------------------------
class StoreLease:
    """One process's claim on a named lease: acquire, keep alive, check before writes, release.

    ttl_s: how long others wait, watching an unchanged lease, before taking it over (None: the
    default for this store, see default_ttl_s). It must exceed the write budget
    (store_write_budget_s, unless `write_budget_s` is given). `clock` (wall time) writes the
    record's times; `monotonic` and `sleep` measure and spend waits: tests inject all three.
    """

    def __init__(
        self,
        loc: Location,
        name: str,
        ttl_s: float | None = None,
        run_id: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        write_budget_s: float | None = None,
    ):
        budget = store_write_budget_s(loc) if write_budget_s is None else float(write_budget_s)
        ttl = default_ttl_s(budget) if ttl_s is None else float(ttl_s)
        if budget < 0:
            raise LeukoflowError(f"the lease's write budget must be >= 0, got {budget}")
        if ttl <= budget:
            raise LeukoflowError(
                f"the lease ttl ({ttl:g} s) must exceed the longest write to {loc.uri} "
                f"({budget:.0f} s within the storage retry budget): raise the ttl "
                "(or lower LEUKOFLOW_S3_MAX_ATTEMPTS)"
            )
        self.loc = loc
        self.name = name
        self.ttl_s = ttl
        self.write_budget_s = budget
        # Three renewals fit in the time a write may still start after one: one late or failed
        # renewal does not stop the writer.
        self.renew_every_s = (ttl - budget) / 3
        self.run_id = run_id
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.took_over: str | None = None  # why a stale lease was taken over, if one was
        self.attempts = 0  # how many times the last acquire tried (create or take over)
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        if not supports_conditional_writes(loc):
            raise LeukoflowError(f"leases need a local folder or an s3:// store, not {loc.uri}")
        # A pid means something only on this host's own disk; on S3 only an unchanged lease does.
        self._process_alive = process_alive if loc.is_local else None
        self._record: LeaseRecord | None = None
        self._version: object | None = None
        self._renewed_at: float | None = None  # monotonic time the current version was sent
        self._lost: str | None = None
        self._mutex = threading.Lock()

    @property
    def token(self) -> str | None:
        """The token of this holding (written into what it guards); None when not held."""
        record = self._record
        return None if record is None else record.token

    def holder(self) -> LeaseRecord | None:
        """The current lease record, if there is one."""
        current = read_versioned(self.loc)
        return None if current is None else LeaseRecord.parse(current[0])

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> LeaseRecord:
        """Take the lease, waiting up to wait_s for a live holder; LeaseBusy if it stays held.

        Sleeps poll_s between attempts. A lease that looks expired by its own times is watched
        for the holder's ttl even past wait_s: taken over if it did not change, else LeaseBusy.
        """
        if poll_s <= 0:
            raise LeukoflowError(f"the lease poll interval must be positive, got {poll_s}")
        deadline = self._monotonic() + max(wait_s, 0.0)
        watched: tuple[object, float] | None = None  # a version and when this process first saw it
        extended = False
        looked_again = False
        holder: LeaseRecord | None = None
        self.attempts, self.took_over = 0, None
        while True:
            self.attempts += 1
            sent = self._monotonic()
            record = self._fresh_record()
            mine = record.to_bytes()
            version = create_versioned(self.loc, mine)
            if version is not None:
                return self._hold(record, version, sent)
            current = read_versioned(self.loc)
            if current is not None and current[0] == mine:
                # Our own create: it landed, its answer was lost, and the retry found it there.
                return self._hold(record, current[1], sent)
            raced = current is None  # released in between
            if current is not None:
                data, version = current
                holder = LeaseRecord.parse(data)
                now = self._monotonic()  # after the read: the version was there by then
                if watched is None or watched[0] != version:
                    watched = (version, now)
                ttl = self._holder_ttl(holder)
                reason = self._staleness(holder, now - watched[1], ttl)
                if reason is not None:
                    sent = self._monotonic()
                    record = self._fresh_record()
                    new_version = self._replace(record.to_bytes(), version)
                    if new_version is not None:
                        who = holder.describe(self._clock()) if holder else "unknown holder"
                        self.took_over = f"took over a stale lease ({who}): {reason}"
                        return self._hold(record, new_version, sent)
                    raced = True  # another process changed it first
                elif not extended and holder is not None and self._clock() >= holder.expires_at:
                    # Looks expired, but only by the holder's clock against ours: watch it for
                    # a whole ttl of our own time before believing it.
                    deadline = max(deadline, watched[1] + ttl)
                    extended = True
            if raced and not looked_again:
                looked_again = True  # the lease changed hands under us: look again at once
                continue
            now = self._monotonic()
            if now >= deadline:
                raise LeaseBusy(holder, self.name)
            self._sleep(min(poll_s, deadline - now))

    def renew(self) -> None:
        """Push the lease ahead by a ttl; LeaseLost if someone else holds it now."""
        with self._mutex:
            if self._record is None or self._lost:
                raise LeaseLost(self._lost or "the lease is not held")
            held, version = self._record, self._version
        # The store is written without the mutex: ensure_held must not wait on a hung renewal.
        sent = self._monotonic()
        record = replace(held, expires_at=self._clock() + self.ttl_s, renewals=held.renewals + 1)
        new_version = self._replace(record.to_bytes(), version)
        with self._mutex:
            if new_version is None:
                self._lost = (
                    self._lost or f"the {self.name} lease was taken over by another process"
                )
                raise LeaseLost(self._lost)
            if self._record is held:  # not released meanwhile
                self._record, self._version, self._renewed_at = record, new_version, sent

    def ensure_held(self) -> None:
        """Raise LeaseLost unless this process holds the lease in the store and a write started
        now ends before any other process may take it over (call before every write)."""
        with self._mutex:
            if self._lost:
                raise LeaseLost(self._lost)
            if self._record is None or self._renewed_at is None:
                raise LeaseLost("the lease is not held")
            token, renewed_at = self._record.token, self._renewed_at
        try:
            current = self.holder()
        except store_failures() as error:
            self._mark_lost(f"cannot confirm the {self.name} lease: {first_line(error)}")
            raise LeaseLost(self._lost) from None
        if current is None or current.token != token:
            who = current.describe(self._clock()) if current else "nobody"
            self._mark_lost(f"the {self.name} lease was taken over by another process ({who})")
            raise LeaseLost(self._lost)
        # Measured after the read: the check holds for a write that starts now.
        since = self._monotonic() - renewed_at
        if since >= self.ttl_s - self.write_budget_s:
            raise LeaseLost(
                f"the {self.name} lease was last renewed {since:.0f}s ago: a write now could "
                f"outlast it (ttl {self.ttl_s:g}s, writes may take {self.write_budget_s:.0f}s)"
            )

    def release(self) -> None:
        """Give the lease up (only if the store still holds this process's version of it)."""
        with self._mutex:
            version = self._version
            self._record, self._version, self._renewed_at = None, None, None
        if version is None:
            return
        try:
            delete_if_unchanged(self.loc, version)  # conditional: never another holder's lease
        except store_failures() as error:
            log.warning(
                "could not release the %s lease (%s); others take it over after its ttl",
                self.name,
                first_line(error),
            )

    @contextmanager
    def kept_alive(self, hold_limit_s: float | None = None) -> Iterator[StoreLease]:
        """Renew the (acquired) lease from a heartbeat thread; release it on the way out.

        hold_limit_s: stop renewing after this long, so that a holder hung past its own time
        limit does not block every later holder: its lease goes stale a ttl later, and its
        ensure_held fails from the moment renewals stop.
        """
        if hold_limit_s is not None and hold_limit_s <= 0:
            raise LeukoflowError(f"the lease's hold limit must be positive, got {hold_limit_s}")
        stop = threading.Event()
        until = None if hold_limit_s is None else self._monotonic() + hold_limit_s
        thread = threading.Thread(
            target=self._heartbeat, args=(stop, until), name=f"lease-{self.name}", daemon=True
        )
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.release()

    def _heartbeat(self, stop: threading.Event, until: float | None) -> None:
        while not stop.wait(self.renew_every_s):
            if until is not None and self._monotonic() >= until:
                self._mark_lost(
                    f"the {self.name} lease reached its hold limit and is no longer renewed"
                )
                log.error("%s: others may take it over after its ttl", self._lost)
                return
            try:
                self.renew()
            except LeaseLost as lost:
                log.warning(
                    "%s", lost
                )  # ensure_held reports it to the writer before its next write
                return
            except Exception as error:  # noqa: BLE001
                # Whatever failed (botocore's connection errors are not OSErrors), an exception
                # must not end this thread with a raw, unredacted traceback, and a lease that
                # could not be renewed can no longer be trusted: the writer stops at its next
                # ensure_held.
                why = first_line(error)
                if not isinstance(error, store_failures()):  # a bug: its type says most
                    why = f"{type(error).__name__}: {why}"
                self._mark_lost(f"the {self.name} lease could not be renewed: {why}")
                log.error("%s", self._lost)
                return

    def _replace(self, data: bytes, version: object) -> object | None:
        """Replace the lease object with `data` if it is still at `version`: its new version, or
        None when another process changed or removed it first.

        A refused swap is read back: when the object holds exactly `data` (unique to this write:
        its token and renewal count), the swap landed and its answer was lost (S3: botocore sent
        the PUT again and met 412), and the version read back is ours.
        """
        new_version = replace_versioned(self.loc, data, version)
        if new_version is not None:
            return new_version
        current = read_versioned(self.loc)
        if current is not None and current[0] == data:
            return current[1]
        return None

    def _mark_lost(self, why: str) -> None:
        with self._mutex:
            self._lost = self._lost or why

    def _holder_ttl(self, holder: LeaseRecord | None) -> float:
        # A record from before ttls were written: the ttl it was given, as far as it shows.
        if holder is None:
            return self.ttl_s
        if holder.ttl_s is not None:
            return float(holder.ttl_s)
        return max(self.ttl_s, holder.expires_at - holder.acquired_at)

    def _staleness(self, holder: LeaseRecord | None, unchanged_s: float, ttl: float) -> str | None:
        """Why the lease may be taken over, or None while its holder is entitled to it."""
        if holder is None:
            return "the lease object is unreadable (its writer died while writing it)"
        if unchanged_s >= ttl:
            expired = " (it had expired)" if self._clock() >= holder.expires_at else ""
            return f"it was not renewed for {unchanged_s:.0f}s, its whole ttl{expired}"
        alive = self._process_alive
        if alive is not None and holder.host == self.host and not alive(holder.pid):
            return f"its process {holder.pid} no longer runs on {self.host}"
        return None

    def _fresh_record(self) -> LeaseRecord:
        now = self._clock()
        return LeaseRecord(
            token=uuid.uuid4().hex,
            name=self.name,
            host=self.host,
            pid=self.pid,
            run_id=self.run_id,
            acquired_at=now,
            expires_at=now + self.ttl_s,
            ttl_s=self.ttl_s,
        )

    def _hold(self, record: LeaseRecord, version: object, sent: float) -> LeaseRecord:
        with self._mutex:
            self._record, self._version, self._lost = record, version, None
            self._renewed_at = sent
        return record
