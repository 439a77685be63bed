"""A lease in the store: at most one holder at a time, and an expiry so a dead holder never
blocks the next one for long.

The lease is one small JSON object, `leases/<name>.json`, naming its holder (host, pid, run id)
and when it expires. Every change is a compare-and-swap, so two processes can never both believe
they hold it:
- create: only when no lease exists (S3: PUT with If-None-Match: *; a local folder: os.open with
  O_CREAT | O_EXCL);
- renew, take over a stale lease, release: only when the object is still the exact version this
  process last saw (S3: If-Match on its ETag; a local folder: compare the bytes and replace them
  while holding a short fcntl lock on a guard file beside the lease, which the kernel drops if
  the process dies).
A holder renews its lease every ttl/3 from a heartbeat thread. A lease is stale once it has
expired, or at once when it names a process of this host that no longer runs (local folders only:
a kill -9 is then recovered without waiting for the expiry). Expiry compares the holder's clock
with the reader's, so hosts sharing an S3 lease need clocks within a small fraction of the ttl.

No Prefect, no Ray: tested on its own against a local folder and an S3 server.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Protocol

from leukoflow.errors import LeukoflowError
from leukoflow.tasks.storage import Location

DEFAULT_TTL_S = 300.0
SWEEP_LEASE = "score"  # the lease nightly sweeps of one store share


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
    """Who holds the lease and until when (seconds since the epoch, holder's clock)."""

    token: str
    name: str
    host: str
    pid: int
    run_id: str | None
    acquired_at: float
    expires_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        """The record in `data`, or None when it is not one (a holder died while writing it)."""
        try:
            return cls(**json.loads(data.decode("utf-8")))
        except (ValueError, TypeError):
            return None

    def describe(self, now: float | None = None) -> str:
        since = datetime.fromtimestamp(self.acquired_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        left = self.expires_at - (time.time() if now is None else now)
        run = f", run {self.run_id}" if self.run_id else ""
        return f"{self.host} pid {self.pid}{run}, since {since}, expires in {left:.0f}s"


def staleness(
    holder: LeaseRecord | None,
    now: float,
    host: str,
    process_alive: Callable[[int], bool] | None,
) -> str | None:
    """Why the lease may be taken over, or None while its holder is entitled to it."""
    if holder is None:
        return "the lease object is unreadable (its writer died while writing it)"
    if now >= holder.expires_at:
        return f"it expired {now - holder.expires_at:.0f}s ago"
    if process_alive is not None and holder.host == host and not process_alive(holder.pid):
        return f"its process {holder.pid} no longer runs on {host}"
    return None


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


# -- backends: compare-and-swap on one small object ------------------------------------------
class _Backend(Protocol):
    def read(self) -> tuple[bytes, object] | None: ...
    def create(self, data: bytes) -> object | None: ...
    def replace(self, data: bytes, expected: object) -> object | None: ...
    def delete(self, expected: object) -> bool: ...


class _LocalBackend:
    """A file in a local folder; a version is the file's bytes (they hold a unique token)."""

    def __init__(self, path: str):
        self.path = path
        self.guard = f"{path}.guard"
        os.makedirs(os.path.dirname(path), exist_ok=True)

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        # Held for a few milliseconds per operation; the kernel releases it if the process dies.
        fd = os.open(self.guard, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _current(self) -> bytes | None:
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[bytes, object] | None:
        with self._guarded():
            data = self._current()
        return None if data is None else (data, data)

    def create(self, data: bytes) -> object | None:
        with self._guarded():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        return data

    def replace(self, data: bytes, expected: object) -> object | None:
        with self._guarded():
            if self._current() != expected:
                return None
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        return data

    def delete(self, expected: object) -> bool:
        with self._guarded():
            if self._current() != expected:
                return False
            os.remove(self.path)
        return True


class _S3Backend:
    """An S3 object; a version is its ETag, and every write is conditional on it."""

    def __init__(self, loc: Location):
        self.fs = loc.fs
        self.path = loc.path

    def read(self) -> tuple[bytes, object] | None:
        self.fs.invalidate_cache(self.path)
        try:
            # The ETag is read first: if the object changes before the GET, a swap conditional
            # on this ETag fails and the caller looks again, so a newer body is never misjudged.
            etag = self.fs.info(self.path)["ETag"]
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, etag

    def create(self, data: bytes) -> object | None:
        try:
            response = self.fs.pipe_file(self.path, data, mode="create")  # If-None-Match: *
        except FileExistsError:
            return None
        return response["ETag"]

    def replace(self, data: bytes, expected: object) -> object | None:
        try:
            response = self.fs.pipe_file(self.path, data, IfMatch=expected)
        except OSError as error:
            if _precondition_failed(error):
                return None
            raise
        return response["ETag"]

    def delete(self, expected: object) -> bool:
        bucket, key, _ = self.fs.split_path(self.path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=expected)
        except OSError as error:
            if _precondition_failed(error):
                return False
            raise
        self.fs.invalidate_cache(self.path)
        return True


def _precondition_failed(error: OSError) -> bool:
    # s3fs maps HTTP 412 (If-Match failed) to EINVAL and a vanished object to FileNotFoundError.
    return isinstance(error, FileNotFoundError) or error.errno == errno.EINVAL


def _backend(loc: Location) -> _Backend:
    if loc.is_local:
        return _LocalBackend(loc.path)
    protocols = (loc.fs.protocol,) if isinstance(loc.fs.protocol, str) else loc.fs.protocol
    if "s3" in protocols:
        return _S3Backend(loc)
    raise LeukoflowError(f"leases need a local folder or an s3:// store, not {loc.uri}")


# -- the lease -------------------------------------------------------------------------------
class StoreLease:
    """One process's claim on a named lease: acquire, keep alive, release."""

    def __init__(
        self,
        loc: Location,
        name: str,
        ttl_s: float = DEFAULT_TTL_S,
        run_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if ttl_s <= 0:
            raise LeukoflowError(f"the lease ttl must be positive, got {ttl_s}")
        self.loc = loc
        self.name = name
        self.ttl_s = float(ttl_s)
        self.run_id = run_id
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.took_over: str | None = None  # why a stale lease was taken over, if one was
        self._clock = clock
        self._backend = _backend(loc)
        # A pid means something only on this host's own disk; on S3 only the expiry counts.
        self._process_alive = process_alive if loc.is_local else None
        self._record: LeaseRecord | None = None
        self._version: object | None = None
        self._lost: str | None = None
        self._mutex = threading.Lock()

    def holder(self) -> LeaseRecord | None:
        """The current lease record, if there is one."""
        current = self._backend.read()
        return None if current is None else LeaseRecord.parse(current[0])

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> LeaseRecord:
        """Take the lease, waiting up to wait_s for a live holder; LeaseBusy if it stays held."""
        deadline = self._clock() + max(wait_s, 0.0)
        while True:
            record = self._fresh_record()
            version = self._backend.create(record.to_bytes())
            if version is not None:
                return self._hold(record, version)
            current = self._backend.read()
            if current is None:
                continue  # released in between: try to create it again at once
            data, version = current
            holder = LeaseRecord.parse(data)
            reason = staleness(holder, self._clock(), self.host, self._process_alive)
            if reason is not None:
                record = self._fresh_record()
                new_version = self._backend.replace(record.to_bytes(), version)
                if new_version is not None:
                    who = holder.describe(self._clock()) if holder else "unknown holder"
                    self.took_over = f"took over a stale lease ({who}): {reason}"
                    return self._hold(record, new_version)
                continue  # another process changed it first: look again
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise LeaseBusy(holder, self.name)
            time.sleep(min(poll_s, remaining))

    def renew(self) -> None:
        """Push the expiry ttl seconds ahead; LeaseLost if someone else holds it now."""
        with self._mutex:
            if self._record is None or self._lost:
                raise LeaseLost(self._lost or "the lease is not held")
            record = replace(self._record, expires_at=self._clock() + self.ttl_s)
            version = self._backend.replace(record.to_bytes(), self._version)
            if version is None:
                self._lost = f"the {self.name} lease was taken over by another process"
                raise LeaseLost(self._lost)
            self._record, self._version = record, version

    def ensure_held(self) -> None:
        """Raise LeaseLost unless this process surely still holds the lease (call before writes)."""
        if self._lost:
            raise LeaseLost(self._lost)
        if self._record is None:
            raise LeaseLost("the lease is not held")
        # Keep a tenth of the ttl as margin: past that, another process may already see it stale.
        if self._clock() > self._record.expires_at - 0.1 * self.ttl_s:
            raise LeaseLost(f"the {self.name} lease was not renewed in time")

    def release(self) -> None:
        """Give the lease up (only if it is still ours)."""
        with self._mutex:
            if self._record is not None and not self._lost:
                self._backend.delete(self._version)
            self._record, self._version = None, None

    @contextmanager
    def kept_alive(self) -> Iterator[StoreLease]:
        """Renew the (acquired) lease from a heartbeat thread; release it on the way out."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self._heartbeat, args=(stop,), name=f"lease-{self.name}", daemon=True
        )
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.release()

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost:
                return  # ensure_held reports it to the worker before its next write
            except OSError:
                continue  # a network hiccup: try again next beat; ensure_held guards expiry

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
        )

    def _hold(self, record: LeaseRecord, version: object) -> LeaseRecord:
        with self._mutex:
            self._record, self._version, self._lost = record, version, None
        return record
