"""The model registry: immutable folders under models/<model_id>/ and an atomic current pointer.

models/<model_id>/model.skops    the fitted pipeline (skops; never pickle)
models/<model_id>/model.json     the record: feature recipe, lineage, parameters, metrics
models/<model_id>/metrics.json, report.md, report.html
models/CURRENT.json              {"model_id": ...}: the model that scoring uses
"""

from __future__ import annotations

from datetime import UTC, datetime

from sklearn.pipeline import Pipeline

from leukoflow.errors import LeukoflowError
from tasks.storage import Location, read_json, write_bytes_atomic, write_json_atomic
from tasks.train import model_from_bytes, model_to_bytes

CURRENT = "CURRENT.json"


def new_model_id(classifier: str, fingerprint: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{classifier}-{fingerprint[:8]}"


def model_folder(store: Location, model_id: str) -> Location:
    return store.child("models", model_id)


def save_model(store: Location, model_id: str, model: Pipeline, record: dict) -> Location:
    """Write the model file, then its record (the record's presence marks a complete model)."""
    folder = model_folder(store, model_id)
    write_bytes_atomic(folder.child("model.skops"), model_to_bytes(model))
    write_json_atomic(folder.child("model.json"), record)
    return folder


def write_model_file(store: Location, model_id: str, name: str, content: str | dict) -> Location:
    loc = model_folder(store, model_id).child(name)
    if isinstance(content, dict):
        write_json_atomic(loc, content)
    else:
        write_bytes_atomic(loc, content.encode("utf-8"))
    return loc


def promote(store: Location, model_id: str) -> None:
    load_record(store, model_id)  # refuses an unknown id
    write_json_atomic(store.child("models", CURRENT), {"model_id": model_id})


def current_model_id(store: Location) -> str | None:
    pointer = store.child("models", CURRENT)
    if not pointer.fs.exists(pointer.path):
        return None
    return read_json(pointer)["model_id"]


def resolve_model_id(store: Location, model: str) -> str:
    model_id = current_model_id(store) if model == "current" else model
    if model_id is None:
        raise LeukoflowError(f"no current model in {store.uri}; run `leukoflow run` first")
    return model_id


def load_record(store: Location, model_id: str) -> dict:
    loc = model_folder(store, model_id).child("model.json")
    if not loc.fs.exists(loc.path):
        raise LeukoflowError(f"no model {model_id} in {store.uri}")
    return read_json(loc)


def load_model(store: Location, model_id: str) -> tuple[Pipeline, dict]:
    record = load_record(store, model_id)
    loc = model_folder(store, model_id).child("model.skops")
    return model_from_bytes(loc.fs.cat_file(loc.path)), record


def list_models(store: Location) -> list[dict]:
    root = store.child("models")
    if not root.fs.exists(root.path):
        return []
    records = []
    for path in sorted(root.fs.ls(root.path, detail=False)):
        record_loc = Location(root.fs, path).child("model.json")
        if record_loc.fs.exists(record_loc.path):
            records.append(read_json(record_loc))
    return records
