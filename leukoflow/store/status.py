"""What a store holds, and whether every image it found is accounted for, by measurement.

Plain functions over the store's tables (no Prefect, no Ray, no printing): `leukoflow status`
renders what `store_status` returns. Each category is read from its own table and never derived
by subtraction: `featurised` from the features table, `quarantined` and `duplicate` from the
catalog, `missing` are the catalog's ok images that the features table has no vector for. An
image counted in no category or in two breaks `found == featurised + missing + quarantined +
duplicate`, and so does any missing image: `accounted` is then false and the images are named by
their short content ids (never by subject id or file name, which can carry one).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from leukoflow.errors import LeukoflowError
from leukoflow.features import backbones as bb
from leukoflow.store import registry
from leukoflow.store.storage import Location, open_location
from leukoflow.store.tables import (
    RunRow,
    feature_backbones,
    feature_keys,
    read_catalog,
    read_predictions,
    read_run_rows,
)
from leukoflow.vocabulary import ImageStatus, Outcome, RunKind

# Run kinds whose rows count images against the features table (a sweep counts predictions).
EXTRACTING_KINDS = tuple(RunKind)  # every kind extracts what it lacks

KNOWN_STATUSES = tuple(ImageStatus)
RUN_COUNTS = ("found", "new", "skipped", "featurised", "quarantined", "duplicate", "missing")
VectorKey = tuple[str, str, int]  # (backbone, weights id, image size key)


def open_existing_store(uri: str) -> Location:
    """The store at `uri` for reading; a store that does not exist is a usage error, not an
    empty store (a mistyped path must not read as "nothing to report")."""
    store = open_location(uri)
    try:
        # An S3 "folder" exists while it holds objects; a local store is a folder.
        present = store.fs.isdir(store.path) if store.is_local else store.fs.exists(store.path)
    except PermissionError as error:
        raise LeukoflowError(f"access to the store {store.uri} was refused") from error
    except OSError as error:
        raise LeukoflowError(f"cannot read the store {store.uri}: {error}") from error
    if not present:
        raise LeukoflowError(f"no store at {store.uri}")
    return store


@dataclass(frozen=True)
class StoredVectors:
    """The features table's keys, read once: which images hold a vector under which key."""

    by_key: dict[VectorKey, set[str]]

    @classmethod
    def read(cls, store: Location) -> StoredVectors:
        by_key: dict[VectorKey, set[str]] = {}
        for backbone in feature_backbones(store):
            table = feature_keys(store, backbone)
            columns = (
                table.column(c).to_pylist() for c in ("image_id", "weights_id", "image_size")
            )
            for image_id, weights_id, size in zip(*columns, strict=True):
                by_key.setdefault((backbone, weights_id, size), set()).add(image_id)
        return cls(by_key)

    def counts(self) -> dict[str, dict[str, int]]:
        """backbone -> {"<weights_id>@<size>px": images with that vector}."""
        shown: dict[str, dict[str, int]] = {}
        for (backbone, weights_id, size), ids in sorted(self.by_key.items()):
            shown.setdefault(backbone, {})[f"{weights_id}@{size}px"] = len(ids)
        return shown

    def holding_all(self, keys: list[VectorKey]) -> set[str]:
        """The images holding a vector under every one of `keys`."""
        held = [self.by_key.get(key, set()) for key in keys]
        return set.intersection(*held) if held else set()

    def per_backbone(self) -> dict[str, set[str]]:
        """backbone -> the images holding a vector of it (any weights, any image size)."""
        merged: dict[str, set[str]] = {}
        for (backbone, _, _), ids in self.by_key.items():
            merged.setdefault(backbone, set()).update(ids)
        return merged


def recipe_keys(recipe: dict | None) -> list[VectorKey] | None:
    """The vector keys of a recorded feature recipe (FeatureRecipe.to_record's form); None when
    there is none this code can read."""
    try:
        names, ids, size = recipe["backbones"], recipe["weights_ids"], int(recipe["image_size"])
        return [(n, ids[n], bb.size_key(bb.BACKBONES[n], size)) for n in names]
    except (KeyError, TypeError, ValueError):
        return None


def _run_recipe(store: Location, row: RunRow) -> dict | None:
    """The feature recipe a run row records, else the one of the model it trained or used."""
    if row.details.get("feature_recipe"):
        return row.details["feature_recipe"]
    if row.model_id:
        try:
            return registry.load_record(store, row.model_id).feature_recipe
        except (LeukoflowError, OSError, ValueError):
            return None  # a model removed or refused: fall back to the backbones present
    return None


def dataset_recipes(store: Location, runs: list[RunRow]) -> dict[str, tuple[str, list[VectorKey]]]:
    """dataset -> (run id, vector keys) of its latest completed extracting run with a recipe."""
    chosen: dict[str, tuple[str, list[VectorKey]]] = {}
    for row in runs:  # oldest first
        if row.kind not in EXTRACTING_KINDS or row.outcome != Outcome.COMPLETED:
            continue
        keys = recipe_keys(_run_recipe(store, row))
        if keys:
            chosen[row.dataset] = (row.run_id, keys)
    return chosen


def dataset_sweeps(store: Location, runs: list[RunRow]) -> dict[str, tuple[str, set[str]]]:
    """dataset -> (model id, images that model has a prediction for) for every dataset whose
    latest completed run is a nightly sweep: its images must be scored, not only featurised."""
    latest: dict[str, RunRow] = {}
    for row in runs:  # oldest first
        if row.outcome == Outcome.COMPLETED:
            latest[row.dataset] = row
    models = {r.model_id for r in latest.values() if r.kind == RunKind.SCORE and r.model_id}
    if not models:
        return {}
    predictions = read_predictions(store, columns=["image_id", "model_id"])
    scored: dict[str, set[str]] = {model: set() for model in models}
    for image_id, model_id in zip(
        predictions.column("image_id").to_pylist(),
        predictions.column("model_id").to_pylist(),
        strict=True,
    ):
        if model_id in scored:
            scored[model_id].add(image_id)
    return {
        dataset: (row.model_id, scored[row.model_id])
        for dataset, row in latest.items()
        if row.kind == RunKind.SCORE and row.model_id
    }


def dataset_accounting(
    catalog: pa.Table,
    vectors: StoredVectors,
    recipes: dict[str, tuple[str, list[VectorKey]]] | None = None,
    sweeps: dict[str, tuple[str, set[str]]] | None = None,
) -> dict[str, dict]:
    """Per dataset: found, featurised, missing, quarantined, duplicate, each measured.

    An ok image is featurised when it holds a vector under every key of the recipe the dataset's
    latest run used (`recipes`); for a dataset without such a run, under every backbone that
    holds vectors of any of its images. A dataset a nightly sweep last ran on (`sweeps`) is
    counted by predictions instead: an ok image is done when the sweep's model scored it.
    `missing_images` names the rest (full content ids).
    """
    recipes, sweeps = recipes or {}, sweeps or {}
    per_backbone = vectors.per_backbone()
    columns = ("dataset", "image_id", "status")
    by_dataset: dict[str, list[tuple[str, str]]] = {}
    for dataset, image_id, status in zip(
        *(catalog.column(c).to_pylist() for c in columns), strict=True
    ):
        by_dataset.setdefault(dataset, []).append((image_id, status))
    accounting = {}
    for dataset, entries in sorted(by_dataset.items()):
        statuses = Counter(status for _, status in entries)
        ok_ids = {image_id for image_id, status in entries if status == ImageStatus.OK}
        if dataset in recipes:
            run_id, keys = recipes[dataset]
            featurised = vectors.holding_all(keys) & ok_ids
            shown = ", ".join(f"{n} {w}@{s}px" for n, w, s in keys)
            basis = f"the recipe of run {run_id}: {shown}"
        else:
            used = sorted(name for name, ids in per_backbone.items() if ids & ok_ids)
            held = [per_backbone[n] for n in used]
            featurised = set.intersection(ok_ids, *held) if held else set()
            basis = "backbones holding its vectors: " + (", ".join(used) or "none")
        done, done_name = featurised, "featurised"
        if dataset in sweeps:
            model_id, scored = sweeps[dataset]
            done, done_name = scored & ok_ids, "scored"
            basis = f"predictions of model {model_id} (the dataset's last sweep)"
        missing = sorted(ok_ids - done)
        unknown = sorted(i for i, s in entries if s not in KNOWN_STATUSES)
        counts = {
            "found": len(entries),
            "featurised": len(featurised),
            "missing": len(missing),
            "quarantined": statuses[ImageStatus.QUARANTINED],
            "duplicate": statuses[ImageStatus.DUPLICATE],
        }
        if done_name == "scored":
            counts["scored"] = len(done)
        parts = len(done) + counts["missing"] + counts["quarantined"] + counts["duplicate"]
        accounting[dataset] = {
            **counts,
            "accounted": parts == counts["found"] and not missing and not unknown,
            "basis": basis,
            "missing_images": missing,
            "unknown_status_images": unknown,
        }
    return accounting


def runs_accounting(runs: list[RunRow]) -> list[dict]:
    """The latest run of each kind and dataset, with the invariant its own row states.

    A sweep: found = new + skipped + quarantined + duplicate + missing; any other run: found =
    featurised + quarantined + duplicate + missing. Only completed runs are checked (a failed or
    busy run's counts are partial by nature); `accounted` is None for the others.
    """
    latest: dict[tuple[str, str], RunRow] = {}
    for row in runs:  # oldest first
        latest[(row.kind, row.dataset)] = row
    shown = []
    for row in latest.values():
        count = {k: getattr(row, f"images_{k}") or 0 for k in RUN_COUNTS}
        if row.kind == RunKind.SCORE:
            done = count["new"] + count["skipped"]
        else:
            done = count["featurised"]
        missing = count["missing"]
        total = done + count["quarantined"] + count["duplicate"] + missing
        checked = row.outcome == Outcome.COMPLETED
        shown.append(
            {
                "run_id": row.run_id,
                "kind": row.kind,
                "dataset": row.dataset,
                "outcome": row.outcome,
                **count,
                "accounted": None if not checked else total == count["found"] and not missing,
            }
        )
    return shown


def store_status(store: Location) -> dict:
    """Counts per table, and the accounting of every image found: what a person checks first."""
    catalog = read_catalog(store)
    datasets: dict[str, dict[str, int]] = {}
    for dataset, status in zip(
        catalog.column("dataset").to_pylist(), catalog.column("status").to_pylist(), strict=True
    ):
        entry = datasets.setdefault(
            dataset, {"found": 0, "ok": 0, "quarantined": 0, "duplicate": 0}
        )
        entry["found"] += 1
        entry[status] = entry.get(status, 0) + 1
    runs = read_run_rows(store)
    vectors = StoredVectors.read(store)
    by_dataset = dataset_accounting(
        catalog, vectors, dataset_recipes(store, runs), dataset_sweeps(store, runs)
    )
    by_run = runs_accounting(runs)
    last_run = None
    if runs:
        latest = max(runs, key=lambda row: row.started_at)  # the first of any tie
        last_run = {k: getattr(latest, k) for k in ("run_id", "kind", "outcome", "started_at",
                                                    "model_id")}  # fmt: skip
    return {
        "store": store.uri,
        "datasets": datasets,
        "features": vectors.counts(),
        "models": [m.model_id for m in registry.list_models(store)],
        "current_model": registry.current_model_id(store),
        "predictions": read_predictions(store, columns=["image_id"]).num_rows,
        "runs": len(runs),
        "last_run": last_run,
        "accounting": {"datasets": by_dataset, "runs": by_run},
        "accounted": all(d["accounted"] for d in by_dataset.values())
        and all(r["accounted"] is not False for r in by_run),
    }
