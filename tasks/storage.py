"""Storage through fsspec: one root URI (local folder or s3://bucket/prefix), atomic writes.

Atomicity: every object is written whole in one step. Locally a file is written under a hidden
temporary name in the same folder and renamed into place (rename is atomic on POSIX); on S3 a
single PUT is atomic by itself. Readers (pyarrow datasets) skip names starting with '.' or '_', so
they never see a half-written file.

S3 retry budget (see docs/reliability.md): botocore's "standard" retry mode retries refused or
reset connections, timeouts, 5xx answers and throttling, waiting a random 0..2**k seconds (full
jitter, capped at 20 s) before attempt k+1. LEUKOFLOW_S3_MAX_ATTEMPTS (default 8) bounds every
request: an endpoint that is away for about 45 s (71 s at worst) is ridden out; past that the
request fails, and the run with it, with nothing half-written. s3fs repeats once more a request
whose answer broke off mid-body or timed out (S3FS_TRIES), so a timing-out endpoint gets at most
2 x 8 attempts.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from leukoflow.errors import LeukoflowError, StoreUnavailable


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
            "retries": {"mode": "standard", "max_attempts": int(text)},
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
    except (OSError, *_remote_errors()) as error:
        raise LeukoflowError(f"cannot reach the store {store.uri}: {_first_line(error)}") from error


def _remote_errors() -> tuple[type[BaseException], ...]:
    # botocore comes with s3fs; its connection errors are not OSErrors.
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return ()
    return (BotoCoreError,)


def _first_line(error: BaseException) -> str:
    return (str(error) or type(error).__name__).splitlines()[0]


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    """Write `data` to `loc` so that readers see either nothing or the whole object."""
    parent = posixpath.dirname(loc.path)
    if loc.is_local:
        loc.fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(loc.path)}")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, loc.path)
        except OSError as error:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise LeukoflowError(f"cannot write {loc.uri}: {error.strerror or error}") from error
    else:
        try:
            loc.fs.pipe_file(loc.path, data)  # one PUT: the object appears whole or not at all
        except (OSError, *_remote_errors()) as error:
            raise StoreUnavailable(
                f"cannot write {loc.uri} (retried within the budget): {_first_line(error)}"
            ) from error


def write_text_atomic(loc: Location, text: str) -> None:
    write_bytes_atomic(loc, text.encode("utf-8"))


def write_json_atomic(loc: Location, obj: object) -> None:
    write_text_atomic(loc, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(loc: Location) -> dict:
    with loc.fs.open(loc.path, "rb") as handle:
        return json.loads(handle.read().decode("utf-8"))


def write_parquet_atomic(loc: Location, table: pa.Table) -> None:
    """Serialise a table in memory and write it as one atomic object."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes_atomic(loc, buffer.getvalue())


def exists(loc: Location) -> bool:
    return loc.fs.exists(loc.path)
