"""The store's tables: one place that owns every Parquet schema and path layout.

Layout under the store root:
    catalog/dataset=<name>/catalog.parquet       one row per discovered image
    features/backbone=<name>/part-<id>.parquet   GAP vectors, keyed by image, weights, size
    features/backbone=<name>/compact-<id>.parquet    the same, many batches merged (see below)
    models/<model_id>/...                        see store/registry (model files)
    predictions/date=YYYY-MM-DD/part-<id>.parquet    one chunk of a sweep, with its lease token
    runs/run-<run_id>.parquet                    one row per run
Every writer goes through store/storage's atomic writes; readers skip hidden temporary files.
Readers return one row per key whatever the files hold: one vector per (image, weights, size)
and one prediction per (image, model), so counts are counts of distinct images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from leukoflow.store.storage import Location, create_if_absent, parquet_bytes, write_parquet_atomic
from leukoflow.vocabulary import ImageStatus, Label, Outcome, RunKind

log = logging.getLogger("leukoflow.tables")

# -- catalog ---------------------------------------------------------------------------------
# An image's status column holds leukoflow.vocabulary.ImageStatus values.

CATALOG_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # sha256 of the file's bytes
        ("uri", pa.string()),
        ("dataset", pa.string()),
        ("label", pa.string()),  # "all" (blast), "hem" (normal) or null when unknown
        ("subject_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("size_bytes", pa.int64()),
        ("status", pa.string()),  # ok | quarantined | duplicate
        ("reason", pa.string()),  # why quarantined, or what was converted / linked
        ("discovered_at", pa.timestamp("us", tz="UTC")),
        # The file's modification time when catalogued: with size_bytes and uri, it lets a re-run
        # reuse the row instead of re-hashing and re-decoding an unchanged file.
        ("modified_at", pa.timestamp("us", tz="UTC")),
    ]
)


def catalog_location(store: Location, dataset: str) -> Location:
    return store.child("catalog", f"dataset={dataset}", "catalog.parquet")


@dataclass(slots=True)
class CatalogRow:
    """One image file as the catalog knows it: a field per CATALOG_SCHEMA column, same order.

    `status` and `label` are the vocabulary's enums (equal to the strings the table stores).
    Rows outside the catalog (augmented copies) are CatalogRows too, with only what a flow
    needs to featurise them.
    """

    image_id: str
    uri: str
    dataset: str
    label: Label | None = None
    subject_id: str | None = None
    width: int | None = None
    height: int | None = None
    size_bytes: int | None = None
    status: ImageStatus = ImageStatus.QUARANTINED
    reason: str | None = None
    discovered_at: datetime | None = None
    modified_at: datetime | None = None

    @property
    def ok(self) -> bool:
        """Decoded, not a duplicate: an image every flow featurises unless told otherwise."""
        return self.status == ImageStatus.OK

    def quarantined(self, reason: str) -> CatalogRow:
        """This row set aside, with why."""
        return replace(self, status=ImageStatus.QUARANTINED, reason=reason)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in CATALOG_COLUMNS}

    @classmethod
    def from_dict(cls, row: dict) -> CatalogRow:
        """A row read back from the table (plain strings become the vocabulary's enums)."""
        label = Label(row["label"]) if row.get("label") else None
        return cls(**{**row, "status": ImageStatus(row["status"]), "label": label})


CATALOG_COLUMNS = tuple(f.name for f in fields(CatalogRow))


def write_catalog(store: Location, dataset: str, rows: Iterable[CatalogRow]) -> None:
    table = pa.Table.from_pylist([row.to_dict() for row in rows], schema=CATALOG_SCHEMA)
    write_parquet_atomic(catalog_location(store, dataset), table)


def read_catalog_rows(store: Location, dataset: str | None = None) -> list[CatalogRow]:
    """read_catalog, as typed rows."""
    return [CatalogRow.from_dict(row) for row in read_catalog(store, dataset).to_pylist()]


def read_catalog(store: Location, dataset: str | None = None) -> pa.Table:
    """The catalog of one dataset, or of all datasets; an empty table when there is none."""
    root = store.child("catalog")
    if dataset is not None:
        root = root.child(f"dataset={dataset}")
    if not root.fs.exists(root.path):
        return CATALOG_SCHEMA.empty_table()
    dataset_ = ds.dataset(root.path, filesystem=root.fs, format="parquet", schema=CATALOG_SCHEMA)
    return dataset_.to_table()


# -- features --------------------------------------------------------------------------------
def feature_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("weights_id", pa.string()),
            ("image_size", pa.int32()),
            ("feature", pa.list_(pa.float32(), dim)),
        ]
    )


def features_root(store: Location, backbone: str) -> Location:
    return store.child("features", f"backbone={backbone}")


def write_features(
    store: Location,
    backbone: str,
    weights_id: str,
    image_size: int,
    image_ids: list[str],
    vectors: np.ndarray,
) -> Location:
    """Write one batch of vectors as its own Parquet file (atomic; never rewrites others)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "image_id": pa.array(image_ids, pa.string()),
            "weights_id": pa.array([weights_id] * len(image_ids), pa.string()),
            "image_size": pa.array([image_size] * len(image_ids), pa.int32()),
            "feature": pa.FixedSizeListArray.from_arrays(flat, dim),
        },
        schema=feature_schema(dim),
    )
    loc = features_root(store, backbone).child(f"part-{uuid.uuid4().hex}.parquet")
    write_parquet_atomic(loc, table)
    return loc


# Compaction. Extraction writes one small file per batch and backbone; compact_features merges
# a backbone's small files into files of about COMPACT_TARGET_BYTES. The merged file is written
# atomically and names, in its Parquet metadata, the files it replaces: from the moment it
# exists the readers below skip those files, so no row is ever seen twice, and the replaced files
# are deleted right after. A reader that listed the folder just before that delete re-lists.
# Two compactions of one folder may run at once (two runs extracting the same backbone): one
# that finds a file gone mid-merge looks again, and two merged files that replace some of the
# same files are merged once more by whichever wrote last (it sees the other's file), so each
# key ends up in exactly one live file.
# Every file here is written once and never changed: batch files have a fresh name, and a merged
# file is named after what it merges and written with the store's create-if-absent
# (store/storage), so of two compactions merging the same files one writes it and the other
# keeps it. A reader never has a file rewritten under it, and the deletes need no condition.
COMPACT_PREFIX = "compact-"
COMPACT_MIN_FILES = 8
COMPACT_TARGET_BYTES = 64 * 1024 * 1024
_REPLACES_KEY = b"leukoflow.replaces"
_READ_ATTEMPTS = 3
_COMPACT_ATTEMPTS = 8
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Listing:
    """A backbone folder's Parquet files (fsspec ls entries) as one listing saw them."""

    live: list[dict]  # what readers read
    stale: list[dict]  # replaced by a merged file but not deleted yet
    replaces: dict[str, frozenset[str]]  # merged file name -> the names it replaces

    def names(self) -> set[str]:
        return {posixpath.basename(e["name"]) for e in (*self.live, *self.stale)}


def _feature_files(root: Location) -> _Listing:
    """List the folder; FileNotFoundError if a merged file vanished while it was read."""
    entries = [
        entry
        for entry in root.fs.ls(root.path, detail=True, refresh=True)
        if entry["type"] == "file"
        and entry["name"].endswith(".parquet")
        and not posixpath.basename(entry["name"]).startswith((".", "_"))
    ]
    replaces: dict[str, frozenset[str]] = {}
    for entry in entries:
        name = posixpath.basename(entry["name"])
        if name.startswith(COMPACT_PREFIX):
            with root.fs.open(entry["name"], "rb") as handle:
                metadata = pq.read_metadata(handle).metadata or {}
            replaces[name] = frozenset(json.loads(metadata.get(_REPLACES_KEY, b"[]")))
    replaced = set().union(*replaces.values())
    live = [e for e in entries if posixpath.basename(e["name"]) not in replaced]
    stale = [e for e in entries if posixpath.basename(e["name"]) in replaced]
    return _Listing(live, stale, replaces)


def _feature_dataset(store: Location, backbone: str) -> ds.Dataset | None:
    root = features_root(store, backbone)
    if not root.fs.exists(root.path):
        return None
    live = _feature_files(root).live
    if not live:
        return None
    return ds.dataset([e["name"] for e in live], filesystem=root.fs, format="parquet")


def _read_live(store: Location, backbone: str, read: Callable[[ds.Dataset], _T]) -> _T | None:
    """`read` over the backbone's live files; None when it has none. Re-lists if a compaction
    removed a file between listing and reading."""
    for attempt in range(_READ_ATTEMPTS):
        try:
            dataset = _feature_dataset(store, backbone)
            return None if dataset is None else read(dataset)
        except FileNotFoundError:
            if attempt == _READ_ATTEMPTS - 1:
                raise
    return None


def compact_features(
    store: Location,
    backbone: str,
    min_files: int = COMPACT_MIN_FILES,
    target_bytes: int = COMPACT_TARGET_BYTES,
) -> int:
    """Merge the backbone's small files (once there are `min_files`) into files of about
    `target_bytes`, one copy per (image, weights, size) kept; returns how many were merged.
    Safe while another process compacts the same folder (see the note above)."""
    root = features_root(store, backbone)
    if not root.fs.exists(root.path):
        return 0
    merged = 0
    for _ in range(_COMPACT_ATTEMPTS):
        try:
            listing = _feature_files(root)
            # Left by an interrupted compaction, or one still deleting what it merged.
            _remove_files(root, [e["name"] for e in listing.stale])
            small = sorted(
                (e for e in listing.live if e["size"] < target_bytes // 2), key=lambda e: e["name"]
            )
            if len(small) >= min_files:
                for group in _groups_by_size(small, target_bytes):
                    if len(group) > 1:
                        _merge_files(root, listing, [e["name"] for e in group])
                        merged += len(group)
            return merged + _merge_overlaps(root)
        except FileNotFoundError:
            continue  # another compaction merged and deleted a file we were reading: look again
    # Other compactions kept changing the folder: they do the work, and readers are unaffected.
    log.warning("compaction of %s left for another compaction to finish", root.uri)
    return merged


def _merge_overlaps(root: Location) -> int:
    """Merge live merged files that replace some of the same files (two compactions that
    merged overlapping groups at once); returns how many files were merged."""
    merged = 0
    for _ in range(_COMPACT_ATTEMPTS):
        listing = _feature_files(root)
        live = {posixpath.basename(e["name"]): e["name"] for e in listing.live}
        groups = _overlapping({n: listing.replaces[n] for n in live if n in listing.replaces})
        if not groups:
            return merged
        for group in groups:
            _merge_files(root, listing, [live[name] for name in group])
            merged += len(group)
    return merged


def _overlapping(replaces: dict[str, frozenset[str]]) -> list[list[str]]:
    """Groups (of two or more) of merged files linked by a replaced file they share."""
    groups: list[tuple[set[str], set[str]]] = []  # (merged files, the names they replace)
    for name in sorted(replaces):
        files, names = {name}, set(replaces[name])
        for group in [g for g in groups if g[1] & names]:
            groups.remove(group)
            files |= group[0]
            names |= group[1]
        groups.append((files, names))
    return [sorted(files) for files, _ in groups if len(files) > 1]


def _groups_by_size(entries: list[dict], target_bytes: int) -> list[list[dict]]:
    groups: list[list[dict]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry["size"] > target_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry["size"]
    return groups


def _read_parquet(root: Location, path: str) -> pa.Table:
    with root.fs.open(path, "rb") as handle:
        return pq.read_table(handle).replace_schema_metadata(None)


def _merge_files(root: Location, listing: _Listing, paths: list[str]) -> None:
    """Write `paths` as one merged file, then delete them; FileNotFoundError if one vanished."""
    names = sorted(posixpath.basename(p) for p in paths)
    table = _first_copy_per_key(pa.concat_tables([_read_parquet(root, p) for p in paths]))
    # What merged files among them replaced and is still there is replaced by the new file too:
    # deleting them must not bring those files back to life.
    present = listing.names()
    inherited = set().union(*(listing.replaces.get(n, frozenset()) for n in names)) & present
    replaces = sorted(set(names) | inherited)
    # Named after what it merges: two compactions of the same files write the same rows there,
    # and whichever comes second keeps the first one's file (it may be being read).
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:32]
    target = root.child(f"{COMPACT_PREFIX}{digest}.parquet")
    merged = table.replace_schema_metadata({_REPLACES_KEY: json.dumps(replaces)})
    if not create_if_absent(target, parquet_bytes(merged)):
        log.debug("%s was merged by another compaction first", target.uri)
    folder = posixpath.dirname(target.path)
    _remove_files(root, [*paths, *(posixpath.join(folder, n) for n in sorted(inherited))])


def _first_copy_per_key(table: pa.Table) -> pa.Table:
    keys = zip(
        table.column("image_id").to_pylist(),
        table.column("weights_id").to_pylist(),
        table.column("image_size").to_pylist(),
        strict=True,
    )
    first: dict[tuple, int] = {}
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    return table if len(first) == table.num_rows else table.take(sorted(first.values()))


def _remove_files(root: Location, paths: list[str]) -> None:
    for path in paths:
        try:
            root.fs.rm_file(path)
        except FileNotFoundError:
            continue  # another compaction removed it first


def _recipe_filter(weights_id: str, image_size: int) -> ds.Expression:
    return (pc.field("weights_id") == weights_id) & (pc.field("image_size") == image_size)


def featurised_ids(store: Location, backbone: str, weights_id: str, image_size: int) -> set[str]:
    """Image ids that already have features for this backbone, weights and size."""
    recipe = _recipe_filter(weights_id, image_size)
    ids = _read_live(store, backbone, lambda d: d.to_table(columns=["image_id"], filter=recipe))
    return set() if ids is None else set(ids.column("image_id").to_pylist())


def feature_backbones(store: Location) -> list[str]:
    """The backbones holding feature files in the store, by name."""
    root = store.child("features")
    if not root.fs.exists(root.path):
        return []
    names = (posixpath.basename(p.rstrip("/")) for p in root.fs.ls(root.path, detail=False))
    return sorted(n.removeprefix("backbone=") for n in names if n.startswith("backbone="))


def feature_keys(store: Location, backbone: str) -> pa.Table:
    """(image_id, weights_id, image_size) of every stored vector, each key once."""
    columns = ["image_id", "weights_id", "image_size"]
    table = _read_live(store, backbone, lambda d: d.to_table(columns=columns))
    if table is None:
        return feature_schema(1).empty_table().select(columns)
    return table.group_by(columns).aggregate([])


def read_features(
    store: Location, backbone: str, weights_id: str, image_size: int, image_ids: Iterable[str]
) -> dict[str, np.ndarray]:
    """Vectors for the requested ids that exist (first copy wins if a retry wrote one twice)."""
    wanted = list(dict.fromkeys(image_ids))
    if not wanted:
        return {}
    keep = _recipe_filter(weights_id, image_size) & pc.field("image_id").isin(wanted)
    table = _read_live(
        store, backbone, lambda d: d.to_table(columns=["image_id", "feature"], filter=keep)
    )
    if table is None or table.num_rows == 0:
        return {}
    column = table.column("feature").combine_chunks()
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    vectors: dict[str, np.ndarray] = {}
    for image_id, row in zip(table.column("image_id").to_pylist(), matrix, strict=True):
        vectors.setdefault(image_id, row)
    return vectors


# -- predictions and runs --------------------------------------------------------------------
PREDICTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("subject_id", pa.string()),
        ("model_id", pa.string()),
        ("score", pa.float64()),
        ("score_kind", pa.string()),  # "probability" or "decision_value"
        ("predicted_label", pa.string()),
        ("threshold", pa.float64()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
        # The sweep lease's token when the chunk was written (store/lease.py): which holding
        # wrote it. Null in files written before the column existed.
        ("lease_token", pa.string()),
    ]
)
# One prediction per image and model: a chunk written twice (a retry, a stalled sweep whose
# lease was taken over) is read once.
PREDICTION_KEY = ("image_id", "model_id")


def predictions_root(store: Location) -> Location:
    return store.child("predictions")


def write_predictions(
    store: Location, date: str, run_id: str, rows: list[dict], lease_token: str | None = None
) -> Location:
    """Write one chunk of predictions as its own file of the night's partition (atomic)."""
    if lease_token is not None:
        rows = [{**row, "lease_token": lease_token} for row in rows]
    loc = predictions_root(store).child(f"date={date}", f"part-{run_id}-{uuid.uuid4().hex}.parquet")
    write_parquet_atomic(loc, pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA))
    return loc


def read_predictions(
    store: Location,
    date: str | None = None,
    model_id: str | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """All predictions, or one night's (date=YYYY-MM-DD), optionally of one model only: one row
    per (image_id, model_id), the first copy written if there are several (earliest scored_at,
    then file and row order). A copy belongs to the night of the kept one, so an image is
    counted once across nights too."""
    wanted = list(PREDICTION_SCHEMA.names if columns is None else columns)
    copies = _prediction_copies(store, model_id, wanted)
    first = _first_copies(copies)
    if date is not None:
        first = first.filter(pc.equal(first.column("_night"), date))
    return first.select(wanted)


def _prediction_copies(store: Location, model_id: str | None, wanted: list[str]) -> pa.Table:
    """Every stored prediction row of the model (copies included) with the columns wanted, the
    key and the order columns, plus its night (`_night`) and file (`_file`)."""
    root = predictions_root(store)
    extra = [c for c in (*PREDICTION_KEY, "scored_at") if c not in wanted]
    schema = (
        pa.schema([*(PREDICTION_SCHEMA.field(c) for c in [*wanted, *extra])])
        .append(pa.field("_night", pa.string()))
        .append(pa.field("_file", pa.string()))
    )
    if not root.fs.exists(root.path):
        return schema.empty_table()
    dataset = ds.dataset(root.path, filesystem=root.fs, format="parquet", schema=PREDICTION_SCHEMA)
    keep = None if model_id is None else pc.field("model_id") == model_id
    table = dataset.to_table(columns=[*wanted, *extra, "__filename"], filter=keep)
    files = table.column("__filename")
    nights = pc.extract_regex(files, r"(?:^|/)date=(?P<night>[^/]+)/")
    table = table.drop_columns(["__filename"])
    table = table.append_column("_night", pc.struct_field(nights, [0]))
    return table.append_column("_file", files).cast(schema)


def _first_copies(table: pa.Table) -> pa.Table:
    """One row per PREDICTION_KEY: the earliest scored_at, then the first by file and row."""
    if table.num_rows == 0:
        return table
    ranked = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    order = pc.sort_indices(
        ranked,
        sort_keys=[("scored_at", "ascending"), ("_file", "ascending"), ("_row", "ascending")],
    ).to_numpy()  # nulls last
    rank = np.empty(table.num_rows, dtype=np.int64)
    rank[order] = np.arange(table.num_rows, dtype=np.int64)
    keys = ranked.select(list(PREDICTION_KEY)).append_column("_rank", pa.array(rank))
    firsts = keys.group_by(list(PREDICTION_KEY)).aggregate([("_rank", "min")])
    if firsts.num_rows == table.num_rows:
        return table
    kept = np.sort(order[firsts.column("_rank_min").to_numpy()])  # back in file order
    return table.take(pa.array(kept))


def scored_image_ids(store: Location, model_id: str) -> set[str]:
    """Image ids that already have a prediction row from this model, on any night."""
    table = read_predictions(store, model_id=model_id, columns=["image_id"])
    return set(table.column("image_id").to_pylist())


def prediction_dates(store: Location) -> list[str]:
    """The nights (YYYY-MM-DD) that have a predictions partition, oldest first."""
    root = predictions_root(store)
    if not root.fs.exists(root.path):
        return []
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in root.fs.ls(root.path, detail=False))
    return sorted(n.removeprefix("date=") for n in names if n.startswith("date="))


RUN_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("kind", pa.string()),  # vocabulary.RunKind
        ("dataset", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("outcome", pa.string()),  # vocabulary.Outcome
        ("images_found", pa.int64()),
        ("images_new", pa.int64()),
        ("images_featurised", pa.int64()),
        ("images_quarantined", pa.int64()),
        ("images_duplicate", pa.int64()),
        ("images_scored", pa.int64()),
        ("images_skipped", pa.int64()),
        # Found and ok, yet neither featurised/scored nor quarantined: a loss to investigate.
        # Null in rows written before this column existed.
        ("images_missing", pa.int64()),
        ("images_per_second", pa.float64()),
        ("model_id", pa.string()),
        ("weights_id", pa.string()),
        ("details", pa.string()),  # JSON: metrics, drift, paths
    ]
)


@dataclass(frozen=True)
class RunRow:
    """One run of any kind, as the runs table holds it: a field per RUN_SCHEMA column, same
    order, with `details` parsed. Built by store/records.run_row, read back by read_run_rows.

    `kind` and `outcome` are the vocabulary's enums when they are one of its members (a row of
    a newer leukoflow keeps its plain string).
    """

    run_id: str
    kind: RunKind | str
    dataset: str
    started_at: datetime
    finished_at: datetime | None
    outcome: Outcome | str
    images_found: int | None = 0
    images_new: int | None = 0
    images_featurised: int | None = 0
    images_quarantined: int | None = 0
    images_duplicate: int | None = 0
    images_scored: int | None = 0
    images_skipped: int | None = 0
    # Found and ok, yet neither featurised/scored nor quarantined. None in older rows.
    images_missing: int | None = 0
    images_per_second: float | None = None
    model_id: str | None = None
    weights_id: str | None = None
    details: dict = field(default_factory=dict)  # metrics, drift, paths: JSON in the table

    def to_dict(self) -> dict:
        """The row as the table stores it (`details` as JSON text)."""
        row = {name: getattr(self, name) for name in RUN_COLUMNS}
        return {**row, "details": json.dumps(self.details, default=str)}

    @classmethod
    def from_dict(cls, row: dict) -> RunRow:
        """A row read back from the table."""
        return cls(
            **{
                **row,
                "kind": _member(RunKind, row["kind"]),
                "outcome": _member(Outcome, row["outcome"]),
                "details": _details(row.get("details")),
            }
        )


RUN_COLUMNS = tuple(f.name for f in fields(RunRow))


def _member(enum: type[RunKind] | type[Outcome], value: str) -> RunKind | Outcome | str:
    try:
        return enum(value)
    except ValueError:
        return value


def _details(text: str | None) -> dict:
    """A row's details; a text that is not a JSON object is kept under "unreadable", not lost."""
    try:
        details = json.loads(text or "{}")
    except ValueError:
        return {"unreadable": text}
    return details if isinstance(details, dict) else {"unreadable": text}


def write_run(store: Location, row: RunRow) -> Location:
    loc = store.child("runs", f"run-{row.run_id}.parquet")
    write_parquet_atomic(loc, pa.Table.from_pylist([row.to_dict()], schema=RUN_SCHEMA))
    return loc


def read_run_rows(store: Location) -> list[RunRow]:
    """Every run's row, typed, oldest first."""
    rows = [RunRow.from_dict(row) for row in read_runs(store).to_pylist()]
    return sorted(rows, key=lambda row: row.started_at)


def read_runs(store: Location) -> pa.Table:
    root = store.child("runs")
    if not root.fs.exists(root.path):
        return RUN_SCHEMA.empty_table()
    return ds.dataset(root.path, filesystem=root.fs, format="parquet", schema=RUN_SCHEMA).to_table()
