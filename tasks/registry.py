"""The model registry: immutable folders under models/<model_id>/ and an atomic current pointer.

models/<model_id>/model.skops    the fitted pipeline (skops; never pickle)
models/<model_id>/model.json     the record: feature recipe, lineage, parameters, metrics
models/<model_id>/metrics.json, report.md, report.html
models/CURRENT.json              {"model_id", "promoted_at", "previous"}: the model scoring uses
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from leukoflow.errors import LeukoflowError
from leukoflow.tasks.storage import (
    Location,
    exists,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:  # scikit-learn costs seconds to import; a sweep with no work never needs it
    from sklearn.pipeline import Pipeline

CURRENT = "CURRENT.json"


def new_model_id(classifier: str, fingerprint: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{classifier}-{fingerprint[:8]}"


def model_folder(store: Location, model_id: str) -> Location:
    return store.child("models", model_id)


def save_model(store: Location, model_id: str, model: Pipeline, record: dict) -> Location:
    """Write the model file, then its record (the record's presence marks a complete model)."""
    folder = model_folder(store, model_id)
    if exists(folder.child("model.json")):
        raise LeukoflowError(
            f"model {model_id} already exists in {store.uri}; models are immutable"
        )
    from leukoflow.tasks.train import model_to_bytes

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


def promote(store: Location, model_id: str) -> dict:
    """Point CURRENT.json at `model_id` in one atomic write; returns the new pointer."""
    load_record(store, model_id)  # refuses an unknown id
    pointer = {
        "model_id": model_id,
        "promoted_at": datetime.now(UTC).isoformat(),
        "previous": current_model_id(store),
    }
    write_json_atomic(store.child("models", CURRENT), pointer)
    return pointer


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
    from leukoflow.tasks.train import model_from_bytes

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


# -- lineage and listings --------------------------------------------------------------------
def code_version() -> str:
    """The git commit of this code ("+dirty" with uncommitted edits), else the package version."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists():  # a Ray worker's copy of the code, or an install, has none
        git = ["git", "--no-optional-locks", "-C", str(repo)]
        try:
            commit = _git(git + ["rev-parse", "HEAD"])
            dirty = _git(git + ["status", "--porcelain", "--untracked-files=no"])
            return f"git:{commit}{'+dirty' if dirty else ''}"
        except (OSError, subprocess.SubprocessError):
            pass  # no git binary, or not a usable repository: fall back to the version
    try:
        return f"leukoflow=={version('leukoflow')}"
    except PackageNotFoundError:
        return "unknown"


def _git(command: list[str]) -> str:
    return subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def model_row(record: dict, current: str | None = None) -> dict:
    """The one-line view of a model record that `models list` shows."""
    metrics = record.get("metrics") or {}
    return {
        "model_id": record.get("model_id"),
        "current": record.get("model_id") == current,
        "created_at": record.get("created_at"),
        "dataset": record.get("dataset"),
        "classifier": record.get("classifier"),
        "backbones": "+".join((record.get("feature_recipe") or {}).get("backbones") or []),
        "split": record.get("split"),
        "accuracy": metrics.get("accuracy"),
        "f1": metrics.get("f1"),
        "score_kind": record.get("score_kind"),
        "threshold": record.get("threshold"),
        "non_clinical": record.get("non_clinical"),
    }


# Bulky fields kept in model.json for scoring (drift reference, test ids) but not worth printing.
_BULKY = ("reference", "test_image_ids")


def describe(record: dict) -> dict:
    """The record `models show` prints: everything but the bulky arrays, which are counted."""
    shown = {k: v for k, v in record.items() if k not in _BULKY}
    if "test_image_ids" in record:
        shown["test_image_ids"] = f"{len(record['test_image_ids'])} ids (in model.json)"
    return shown


def model_sections(record: dict, current: str | None = None) -> list[tuple[str, list[tuple]]]:
    """What `models show` prints, as titled (name, value) lists: identity, lineage, metrics."""
    metrics = record.get("metrics") or {}
    calibration = record.get("calibration") or {}
    test, validation = calibration.get("test") or {}, calibration.get("validation") or {}
    recipe = record.get("feature_recipe") or {}
    return [
        ("Model", [
            ("model id", record.get("model_id")),
            ("current", record.get("model_id") == current),
            ("created at", record.get("created_at")),
            ("dataset", record.get("dataset")),
            ("classifier", record.get("classifier")),
            ("classifier parameters", record.get("classifier_params")),
            ("non-clinical (random weights)", record.get("non_clinical")),
        ]),
        ("Lineage", [
            ("feature recipe", {k: recipe.get(k) for k in ("backbones", "dims", "weights_ids",
                                                           "image_size")}),
            ("training images", record.get("n_train")),
            ("training image set fingerprint", record.get("training_fingerprint")),
            ("test images", record.get("n_test")),
            ("split", record.get("split")),
            ("seed", record.get("seed")),
            ("code version", record.get("code_version")),
            ("package versions", record.get("package_versions")),
        ]),
        ("Headline metrics (paper's classifier, test split)", [
            (key, metrics.get(key))
            for key in ("accuracy", "precision", "recall", "f1", "f1_macro", "roc_auc")
        ]),
        ("Risk score and operating point", [
            ("score kind", record.get("score_kind")),
            ("threshold", record.get("threshold")),
            ("rule", calibration.get("threshold_rule")),
            ("target sensitivity", record.get("target_sensitivity")),
            ("calibration", f"{calibration.get('method')}, {calibration.get('folds')} "
                            f"{calibration.get('grouping')} folds" if calibration else None),
            ("validation sensitivity / specificity",
             (validation.get("sensitivity"), validation.get("specificity"))),
            ("test sensitivity / specificity", (test.get("sensitivity"), test.get("specificity"))),
            ("test Brier score", test.get("brier")),
        ]),
    ]  # fmt: skip
