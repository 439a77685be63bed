"""Storage through fsspec: one root URI (local folder or s3://bucket/prefix), atomic writes.

Atomicity: every object is written whole in one step. Locally a file is written under a hidden
temporary name in the same folder and renamed into place (rename is atomic on POSIX); on S3 a
single PUT is atomic by itself. Readers (pyarrow datasets) skip names starting with '.' or '_', so
they never see a half-written file.

Conditional writes, the one compare-and-swap of the code base (the current-model pointer, the
subject salt, the sweep lease in store/lease.py, compaction's merged feature files):
`read_versioned` gives an object's bytes and version; `create_versioned` / `create_if_absent`
write only where nothing is, `replace_versioned` / `replace_if_unchanged` and
`delete_if_unchanged` act only on the version read. On S3 they are single requests conditional
on If-None-Match: * or If-Match: <ETag>.
Locally create-if-absent hard-links a fully written temporary file (the link fails if the name
exists, and readers never see a partial file); replace and delete compare the bytes and rename
or remove while holding an fcntl lock on a hidden guard file beside the object (the kernel drops
it if the process dies). Of two writers from one version, exactly one wins on both backends.

S3 retry budget (see docs/reliability.md): botocore's "standard" retry mode retries refused or
reset connections, timeouts, 5xx answers and throttling, waiting a random 0..2**k seconds (full
jitter, capped at 20 s) before attempt k+1. LEUKOFLOW_S3_MAX_ATTEMPTS (default 8) bounds every
request: an endpoint that is away for about 45 s (71 s at worst) is ridden out; past that the
request fails, and the run with it, with nothing half-written. s3fs repeats once more a request
whose answer broke off mid-body or timed out (S3FS_TRIES), so a timing-out endpoint gets at most
2 x 8 attempts.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from leukoflow.errors import LeukoflowError, StoreUnavailable
from leukoflow.redact import redact


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it; `uri` keeps the protocol so it can be shown and re-opened."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    @property
    def uri(self) -> str:
        return self.path if self.is_local else self.fs.unstrip_protocol(self.path)

    def child(self, *parts: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, *parts))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def open_location(uri: str) -> Location:
    """Resolve a local path or URL into a Location; S3 settings come from the AWS environment."""
    options = {}
    if uri.startswith(("s3://", "s3a://")):
        # s3fs reads AWS_* credentials itself; AWS_ENDPOINT_URL points it at MinIO/moto/Ceph.
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("LEUKOFLOW_S3_ENDPOINT")
        if endpoint:
            options["endpoint_url"] = endpoint
        options["skip_instance_cache"] = True
        options.update(s3_retry_options())
    else:
        uri = os.path.abspath(os.path.expanduser(uri))
    fs, path = url_to_fs(uri, **options)
    if "s3" in _protocols(fs):
        fs.retries = S3FS_TRIES  # s3fs's own loop, around botocore's (a class attribute)
    return Location(fs, path.rstrip("/") or "/")


S3_MAX_ATTEMPTS = 8
S3FS_TRIES = 2
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 30


def s3_retry_options() -> dict:
    """s3fs options with the bounded retry budget described at the top of this module."""
    text = os.environ.get("LEUKOFLOW_S3_MAX_ATTEMPTS", str(S3_MAX_ATTEMPTS))
    if not text.isdigit() or int(text) < 1:
        raise LeukoflowError(f"LEUKOFLOW_S3_MAX_ATTEMPTS wants a whole number >= 1, got {text!r}")
    return {
        "config_kwargs": {
            # total_max_attempts counts the first attempt; botocore's max_attempts would mean
            # that many retries, one attempt more than the budget says.
            "retries": {"mode": "standard", "total_max_attempts": int(text)},
            "connect_timeout": S3_CONNECT_TIMEOUT_S,
            "read_timeout": S3_READ_TIMEOUT_S,
        },
    }


def check_store(store: Location) -> None:
    """Fail in one line before any work when the store cannot be used (no folder, no bucket,
    no endpoint, no access); an S3 endpoint gets the whole retry budget first."""
    if store.is_local:
        try:
            os.makedirs(store.path, exist_ok=True)
        except OSError as error:
            raise LeukoflowError(
                f"cannot use the store {store.uri}: {error.strerror or error}"
            ) from error
        if not os.access(store.path, os.W_OK):  # a read-only mount says so even to root
            raise LeukoflowError(f"the store {store.uri} is not writable (read-only?)")
        return
    try:
        store.fs.ls(store.path.split("/", 1)[0], refresh=True)  # the bucket
    except FileNotFoundError as error:
        raise LeukoflowError(f"the store {store.uri} does not exist: no such bucket") from error
    except PermissionError as error:
        raise LeukoflowError(
            f"access to the store {store.uri} was refused: check the credentials"
        ) from error
    except _store_errors() as error:
        raise LeukoflowError(f"cannot reach the store {store.uri}: {first_line(error)}") from error


def _store_errors() -> tuple[type[BaseException], ...]:
    # What a store that cannot be used raises through fsspec: OSError, and botocore's own
    # errors (s3fs's dependency), which are not OSErrors.
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError)


def store_failures() -> tuple[type[BaseException], ...]:
    """Everything a failing store raises through this module (the errors it explains, and
    fsspec's and botocore's own from direct use of `Location.fs`): for callers that must
    survive any store failure, e.g. a heartbeat."""
    return (StoreUnavailable, LeukoflowError, *_store_errors())


def first_line(error: BaseException) -> str:
    """The error's first line with credentials masked: what a one-line message may show."""
    return redact((str(error) or type(error).__name__).splitlines()[0])


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    """Write `data` to `loc` so that readers see either nothing or the whole object."""
    parent = posixpath.dirname(loc.path)
    if loc.is_local:
        tmp = _write_tmp(parent, posixpath.basename(loc.path), data)
        try:
            os.replace(tmp, loc.path)
        except OSError as error:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise LeukoflowError(f"cannot write {loc.uri}: {error.strerror or error}") from error
    else:
        try:
            loc.fs.pipe_file(loc.path, data)  # one PUT: the object appears whole or not at all
        except _store_errors() as error:
            raise StoreUnavailable(
                f"cannot write {loc.uri} (retried within the budget): {first_line(error)}"
            ) from error


def write_text_atomic(loc: Location, text: str) -> None:
    write_bytes_atomic(loc, text.encode("utf-8"))


def write_json_atomic(loc: Location, obj: object) -> None:
    write_text_atomic(loc, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(loc: Location) -> dict:
    with loc.fs.open(loc.path, "rb") as handle:
        return json.loads(handle.read().decode("utf-8"))


def parquet_bytes(table: pa.Table) -> bytes:
    """A table serialised in memory as one Parquet object (zstd), ready for one write."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_parquet_atomic(loc: Location, table: pa.Table) -> None:
    """Serialise a table in memory and write it as one atomic object."""
    write_bytes_atomic(loc, parquet_bytes(table))


def exists(loc: Location) -> bool:
    if loc.is_local:
        return loc.fs.exists(loc.path)
    try:
        return loc.fs.exists(loc.path)
    except _store_errors() as error:  # refused (403), or past the retry budget
        raise StoreUnavailable(f"cannot read {loc.uri}: {first_line(error)}") from error


# -- conditional writes (compare-and-swap) ------------------------------------------------------
# The one compare-and-swap of the code base: the registry's CURRENT.json, the subject salt,
# the sweep lease (store/lease.py) and compaction's merged files (store/tables.py) all go
# through these functions. A version is opaque to
# callers; on both backends it stands for the object's bytes (locally the bytes themselves, on
# S3 the ETag, an MD5 of them for a single PUT), so rewriting identical bytes does not count as
# a change: callers write unique content where that matters (a lease token, a timestamp).
def supports_conditional_writes(loc: Location) -> bool:
    """Whether `loc` is on a store with conditional writes: a local folder or S3."""
    return loc.is_local or "s3" in _protocols(loc.fs)


def read_versioned(loc: Location) -> tuple[bytes, object] | None:
    """The object's bytes and its version, for the *_if_unchanged calls (None: no object)."""
    _require_conditional(loc)
    if loc.is_local:
        # No lock: objects only ever appear whole (link, rename), so a read sees one version.
        data = _read_local(loc)
        return None if data is None else (data, data)
    loc.fs.invalidate_cache(loc.path)
    try:
        # ETag first: if the object changes before the GET, a swap conditional on this ETag
        # fails, so newer bytes are never paired with an older version.
        etag = loc.fs.info(loc.path)["ETag"]
        data = loc.fs.cat_file(loc.path)
    except FileNotFoundError:
        return None
    except _store_errors() as error:  # refused (403), or past the retry budget
        raise StoreUnavailable(f"cannot read {loc.uri}: {first_line(error)}") from error
    return data, etag


def create_versioned(loc: Location, data: bytes) -> object | None:
    """Write `data` only if nothing exists at `loc`: the new version, or None when something
    was there (including an object another writer created a moment before)."""
    _require_conditional(loc)
    if loc.is_local:
        parent = posixpath.dirname(loc.path)
        tmp = _write_tmp(parent, posixpath.basename(loc.path), data)
        try:
            # Atomic, refused with EEXIST when the name is taken, and readers never see a
            # partly written object (os.open with O_EXCL would show them one).
            os.link(tmp, loc.path)
        except FileExistsError:
            return None
        except OSError as error:
            raise LeukoflowError(f"cannot write {loc.uri}: {error.strerror or error}") from error
        finally:
            os.remove(tmp)
        return data
    try:
        response = loc.fs.pipe_file(loc.path, data, mode="create")  # If-None-Match: *
    except _store_errors() as error:
        if _precondition_failed(error, creating=True):
            return None
        raise StoreUnavailable(f"cannot write {loc.uri}: {first_line(error)}") from error
    return response["ETag"]


def replace_versioned(loc: Location, data: bytes, version: object) -> object | None:
    """Replace the object with `data` only if it is still at `version` (from read_versioned):
    the new version, or None when someone changed or removed it first."""
    _require_conditional(loc)
    if loc.is_local:
        parent = posixpath.dirname(loc.path)
        with _guarded(loc):
            if _read_local(loc) != version:
                return None
            tmp = _write_tmp(parent, posixpath.basename(loc.path), data)
            try:
                os.replace(tmp, loc.path)
            except OSError as error:
                os.remove(tmp)
                raise LeukoflowError(
                    f"cannot write {loc.uri}: {error.strerror or error}"
                ) from error
        return data
    try:
        response = loc.fs.pipe_file(loc.path, data, IfMatch=version)
    except _store_errors() as error:
        if _precondition_failed(error):
            return None
        raise StoreUnavailable(f"cannot write {loc.uri}: {first_line(error)}") from error
    return response["ETag"]


def create_if_absent(loc: Location, data: bytes) -> bool:
    """Write `data` only if nothing exists at `loc`; True when this call created it."""
    return create_versioned(loc, data) is not None


def replace_if_unchanged(loc: Location, data: bytes, version: object) -> bool:
    """Replace the object with `data` only if it is still at `version` (from read_versioned);
    True when this call replaced it, False when someone changed or removed it first."""
    return replace_versioned(loc, data, version) is not None


def delete_if_unchanged(loc: Location, version: object) -> bool:
    """Delete the object only if it is still at `version`; True when this call deleted it,
    False when someone changed it first (or, locally, it was already gone; S3 may answer an
    already deleted object as deleted)."""
    _require_conditional(loc)
    if loc.is_local:
        if not os.path.isdir(posixpath.dirname(loc.path)):
            return False  # nothing there, and no folder (or guard file) made for nothing
        with _guarded(loc):
            if _read_local(loc) != version:
                return False
            try:
                os.remove(loc.path)
            except OSError as error:
                raise LeukoflowError(
                    f"cannot delete {loc.uri}: {error.strerror or error}"
                ) from error
        return True
    bucket, key, _ = loc.fs.split_path(loc.path)
    try:
        loc.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
    except _store_errors() as error:
        if _precondition_failed(error):
            return False
        raise StoreUnavailable(f"cannot delete {loc.uri}: {first_line(error)}") from error
    finally:
        loc.fs.invalidate_cache(loc.path)
    return True


# S3 answers a condition that does not hold with 412 PreconditionFailed (s3fs: FileExistsError
# for If-None-Match, else an OSError with EINVAL), an If-Match on a missing object with 404
# NoSuchKey (FileNotFoundError), and a conditional write racing another one on the same key
# with 409 ConditionalRequestConflict: each means another writer came first. s3fs maps many
# other answers to EINVAL too, so botocore's answer, kept as the cause, decides where there
# is one.
_LOST_RACE_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_LOST_RACE_STATUSES = frozenset({412, 409})


def _precondition_failed(error: BaseException, *, creating: bool = False) -> bool:
    if isinstance(error, FileExistsError):
        return True
    response = getattr(error.__cause__, "response", None)
    answer = response if isinstance(response, dict) else {}
    code = answer.get("Error", {}).get("Code")
    status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if isinstance(error, FileNotFoundError):
        # The object went away under an If-Match; no bucket is no race, and neither is
        # anything missing when creating.
        return not creating and code != "NoSuchBucket"
    if answer:
        return code in _LOST_RACE_CODES or status in _LOST_RACE_STATUSES
    return isinstance(error, OSError) and error.errno == errno.EINVAL


def _require_conditional(loc: Location) -> None:
    if not supports_conditional_writes(loc):
        raise LeukoflowError(
            f"conditional writes need a local folder or an s3:// store, not {loc.uri}"
        )


@contextmanager
def _guarded(loc: Location) -> Iterator[None]:
    # The one lock discipline for local conditional writes: an exclusive fcntl lock on a hidden
    # guard file beside the object (`.<name>.guard`, skipped by readers like every hidden
    # name), held for the milliseconds of one compare and rename; the kernel drops it if the
    # process dies. The guard file is never deleted: a process could hold a lock on a deleted
    # one while another locks a new one.
    parent, name = posixpath.split(loc.path)
    try:
        os.makedirs(parent, exist_ok=True)
        fd = os.open(posixpath.join(parent, f".{name}.guard"), os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as error:
        raise LeukoflowError(f"cannot write {loc.uri}: {error.strerror or error}") from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_local(loc: Location) -> bytes | None:
    try:
        with open(loc.path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise LeukoflowError(f"cannot read {loc.uri}: {error.strerror or error}") from error


def _write_tmp(parent: str, name: str, data: bytes) -> str:
    """`data` in a new temporary file beside `name` in `parent`, flushed to disk; its path."""
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{name}")
    try:
        os.makedirs(parent, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise LeukoflowError(
            f"cannot write {posixpath.join(parent, name)}: {error.strerror or error}"
        ) from error
    return tmp
