"""The store's tables: one place that owns every Parquet schema and path layout.

Layout under the store root:
    catalog/dataset=<name>/catalog.parquet       one row per discovered image
    features/backbone=<name>/part-<id>.parquet   GAP vectors, keyed by image, weights, size
    models/<model_id>/...                        see tasks/registry (model files)
    predictions/date=YYYY-MM-DD/part-<id>.parquet
    runs/run-<run_id>.parquet                    one row per run
Every writer goes through tasks.storage's atomic writes; readers skip hidden temporary files.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from tasks.storage import Location, write_parquet_atomic

# -- catalog ---------------------------------------------------------------------------------
STATUS_OK = "ok"
STATUS_QUARANTINED = "quarantined"
STATUS_DUPLICATE = "duplicate"

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
    ]
)


def catalog_location(store: Location, dataset: str) -> Location:
    return store.child("catalog", f"dataset={dataset}", "catalog.parquet")


def write_catalog(store: Location, dataset: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA)
    write_parquet_atomic(catalog_location(store, dataset), table)


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


def _feature_dataset(store: Location, backbone: str) -> ds.Dataset | None:
    root = features_root(store, backbone)
    if not root.fs.exists(root.path):
        return None
    return ds.dataset(root.path, filesystem=root.fs, format="parquet")


def _recipe_filter(weights_id: str, image_size: int) -> ds.Expression:
    return (pc.field("weights_id") == weights_id) & (pc.field("image_size") == image_size)


def featurised_ids(store: Location, backbone: str, weights_id: str, image_size: int) -> set[str]:
    """Image ids that already have features for this backbone, weights and size."""
    dataset = _feature_dataset(store, backbone)
    if dataset is None:
        return set()
    ids = dataset.to_table(columns=["image_id"], filter=_recipe_filter(weights_id, image_size))
    return set(ids.column("image_id").to_pylist())


def read_features(
    store: Location, backbone: str, weights_id: str, image_size: int, image_ids: Iterable[str]
) -> dict[str, np.ndarray]:
    """Vectors for the requested ids that exist (first copy wins if a retry wrote one twice)."""
    dataset = _feature_dataset(store, backbone)
    wanted = list(dict.fromkeys(image_ids))
    if dataset is None or not wanted:
        return {}
    keep = _recipe_filter(weights_id, image_size) & pc.field("image_id").isin(wanted)
    table = dataset.to_table(columns=["image_id", "feature"], filter=keep)
    if table.num_rows == 0:
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
    ]
)


def predictions_root(store: Location) -> Location:
    return store.child("predictions")


def write_predictions(store: Location, date: str, run_id: str, rows: list[dict]) -> Location:
    loc = predictions_root(store).child(f"date={date}", f"part-{run_id}-{uuid.uuid4().hex}.parquet")
    write_parquet_atomic(loc, pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA))
    return loc


def read_predictions(store: Location) -> pa.Table:
    root = predictions_root(store)
    if not root.fs.exists(root.path):
        return PREDICTION_SCHEMA.empty_table()
    return ds.dataset(
        root.path, filesystem=root.fs, format="parquet", schema=PREDICTION_SCHEMA
    ).to_table()


RUN_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("kind", pa.string()),  # run | score | backfill | experiments
        ("dataset", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("outcome", pa.string()),  # completed | failed
        ("images_found", pa.int64()),
        ("images_new", pa.int64()),
        ("images_featurised", pa.int64()),
        ("images_quarantined", pa.int64()),
        ("images_duplicate", pa.int64()),
        ("images_scored", pa.int64()),
        ("images_skipped", pa.int64()),
        ("images_per_second", pa.float64()),
        ("model_id", pa.string()),
        ("weights_id", pa.string()),
        ("details", pa.string()),  # JSON: metrics, drift, paths
    ]
)


def write_run(store: Location, row: dict) -> Location:
    loc = store.child("runs", f"run-{row['run_id']}.parquet")
    write_parquet_atomic(loc, pa.Table.from_pylist([row], schema=RUN_SCHEMA))
    return loc


def read_runs(store: Location) -> pa.Table:
    root = store.child("runs")
    if not root.fs.exists(root.path):
        return RUN_SCHEMA.empty_table()
    return ds.dataset(root.path, filesystem=root.fs, format="parquet", schema=RUN_SCHEMA).to_table()
