"""Storage through fsspec: one root URI (local folder or s3://bucket/prefix), atomic writes.

Atomicity: every object is written whole in one step. Locally a file is written under a hidden
temporary name in the same folder and renamed into place (rename is atomic on POSIX); on S3 a
single PUT is atomic by itself. Readers (pyarrow datasets) skip names starting with '.' or '_', so
they never see a half-written file.
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

from leukoflow.errors import LeukoflowError


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
    else:
        uri = os.path.abspath(os.path.expanduser(uri))
    fs, path = url_to_fs(uri, **options)
    return Location(fs, path.rstrip("/") or "/")


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
        loc.fs.pipe_file(loc.path, data)


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
