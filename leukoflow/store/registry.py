"""The model registry: immutable, verified folders under models/<model_id>/ and a current pointer
changed only by compare-and-swap.

models/<model_id>/model.skops     the fitted pipeline (skops; never pickle)
models/<model_id>/model.json      the record: recipe, lineage, parameters, threshold, metrics
models/<model_id>/integrity.json  {"model_id", "files": {name: sha256}, "signature"}: the sha256 of
                                  model.skops and of model.json's exact bytes, written at save time
models/<model_id>/metrics.json, report.md, report.html (derived reports; not used to score)
models/CURRENT.json               {"model_id", "promoted_at", "previous"}: the model scoring uses

Verification: `load_record` and `load_model` (and through them score, explain, `models show`
and `promote`) re-hash model.skops and model.json and refuse, with one line, any model whose
bytes differ from those saved (a changed threshold included) or that has no integrity.json.

Signing (optional): when LEUKOFLOW_MODEL_KEY is set (at least 16 characters), `save_model` adds
an HMAC-SHA256 of the model id and digests under that key, so someone who can write the store but
does not hold the key cannot re-hash altered files. The rules on load:
- signed, key set: the signature must verify under the key (another key is refused);
- unsigned, key set: refused (a stripped signature must not pass), so with a key configured
  every model must be saved under it;
- signed, no key set: refused, naming LEUKOFLOW_MODEL_KEY (a worker missing its key is a
  misconfiguration to surface, not a reason to skip the check);
- unsigned, no key set: the digests alone are checked.

Model ids match MODEL_ID_PATTERN (letters, digits, ".", "_", "-"; no separators, no ".."), so an
id can never name a path outside models/; a CURRENT.json naming an invalid or absent model is
refused. A non-clinical model (random weights) never replaces a clinical current one unless the
caller forces it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from leukoflow.errors import LeukoflowError
from leukoflow.store.records import ModelRecord
from leukoflow.store.storage import (
    Location,
    create_if_absent,
    exists,
    read_json,
    read_versioned,
    replace_if_unchanged,
    write_bytes_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:  # scikit-learn costs seconds to import; a sweep with no work never needs it
    from sklearn.pipeline import Pipeline

CURRENT = "CURRENT.json"
MODEL_FILE = "model.skops"
RECORD_FILE = "model.json"
INTEGRITY_FILE = "integrity.json"
KEY_ENV = "LEUKOFLOW_MODEL_KEY"
MIN_KEY_CHARS = 16
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SIGNATURE_PREFIX = "hmac-sha256:"


class ModelRefused(LeukoflowError):
    """A model whose files are not the ones saved (or cannot be verified): never loaded."""


def new_model_id(classifier: str, fingerprint: str) -> str:
    """A fresh id: UTC time to the microsecond, classifier, training-set fingerprint."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return check_model_id(f"{stamp}-{classifier}-{fingerprint[:8]}")


def check_model_id(model_id: object) -> str:
    """`model_id` if it is a valid id (so it names a folder inside models/), else LeukoflowError."""
    if (
        not isinstance(model_id, str)
        or MODEL_ID_PATTERN.fullmatch(model_id) is None
        or ".." in model_id
    ):
        shown = repr(model_id)[:80]
        raise LeukoflowError(
            f"{shown} is not a valid model id (letters, digits, '.', '_', '-'; no '/' or '..')"
        )
    return model_id


def model_folder(store: Location, model_id: str) -> Location:
    """models/<model_id>/ of the store (the id is validated first)."""
    return store.child("models", check_model_id(model_id))


def save_model(store: Location, model_id: str, model: Pipeline, record: ModelRecord) -> Location:
    """Write the model file, its digests (signed when LEUKOFLOW_MODEL_KEY is set), then its record
    (the record's presence marks a complete model)."""
    folder = model_folder(store, model_id)
    if exists(folder.child(RECORD_FILE)):
        raise LeukoflowError(
            f"model {model_id} already exists in {store.uri}; models are immutable"
        )
    from leukoflow.store.model_io import model_to_bytes

    key = _model_key()
    model_bytes = model_to_bytes(model)
    record_bytes = _json_bytes(record.to_dict())  # hashed as written, byte for byte
    files = {MODEL_FILE: _sha256(model_bytes), RECORD_FILE: _sha256(record_bytes)}
    integrity = {
        "model_id": model_id,
        "algorithm": "sha256",
        "files": files,
        "signature": None if key is None else _sign(key, model_id, files),
    }
    write_bytes_atomic(folder.child(MODEL_FILE), model_bytes)
    write_json_atomic(folder.child(INTEGRITY_FILE), integrity)
    write_bytes_atomic(folder.child(RECORD_FILE), record_bytes)
    return folder


def write_model_file(store: Location, model_id: str, name: str, content: str | dict) -> Location:
    """Write a derived file (metrics, report) into the model's folder; never a verified file."""
    if "/" in name or name in (MODEL_FILE, RECORD_FILE, INTEGRITY_FILE) or name.startswith("."):
        raise ValueError(f"{name!r} is not a report file name")
    loc = model_folder(store, model_id).child(name)
    if isinstance(content, dict):
        write_json_atomic(loc, content)
    else:
        write_bytes_atomic(loc, content.encode("utf-8"))
    return loc


_ANY = object()  # promote(): no expectation given, swap against whatever pointer was read


def promote(
    store: Location,
    model_id: str,
    expected_current: str | None | object = _ANY,
    force: bool = False,
) -> dict:
    """Point CURRENT.json at `model_id` by compare-and-swap; returns the new pointer.

    expected_current: the model id the caller believes is current (None: no current model);
    the swap is refused if another promotion changed it. Without it, the swap is against the
    pointer as read here, so two promotions at once never both succeed from the same value.
    A non-clinical model replaces a clinical current model only with force=True.
    """
    record = load_record(store, model_id)  # refuses an unknown, invalid or altered model
    loc = store.child("models", CURRENT)
    seen = read_versioned(loc)
    current = None if seen is None else _pointer_model_id(store, seen[0], strict=False)
    if expected_current is not _ANY and current != expected_current:
        raise LeukoflowError(
            f"the current model is {current or 'none'}, not {expected_current or 'none'} "
            "as expected (another promotion came first); nothing changed"
        )
    if current == model_id:
        return json.loads(seen[0])  # already current: nothing to swap
    if record.non_clinical and not force and _is_clinical(store, current):
        raise LeukoflowError(
            f"model {model_id} is non-clinical (random weights) and would replace the clinical "
            f"model {current}; pass --force to promote it anyway"
        )
    pointer = {
        "model_id": model_id,
        "promoted_at": datetime.now(UTC).isoformat(),
        "previous": current,
    }
    data = _json_bytes(pointer)
    swapped = (
        create_if_absent(loc, data) if seen is None else replace_if_unchanged(loc, data, seen[1])
    )
    if not swapped:
        now = read_versioned(loc)
        if now is not None and now[0] == data:
            # Our own write: it landed, its answer was lost, and the retry found it in place.
            return pointer
        raise LeukoflowError(
            f"another promotion changed the current model of {store.uri} at the same time; "
            f"{model_id} was not promoted (check `leukoflow models list` and retry)"
        )
    return pointer


def current_model_id(store: Location) -> str | None:
    """The current model's id (None: nothing promoted yet); a pointer naming an invalid id or a
    model that does not exist is refused."""
    pointer = store.child("models", CURRENT)
    if not exists(pointer):
        return None
    return _pointer_model_id(store, pointer.fs.cat_file(pointer.path), strict=True)


def _pointer_model_id(store: Location, data: bytes, strict: bool) -> str | None:
    """The model id CURRENT.json names. strict: refuse a pointer that is broken; otherwise
    (promote, about to replace it) a broken pointer reads as its raw value or None."""
    where = f"{store.child('models', CURRENT).uri}"
    try:
        model_id = json.loads(data.decode("utf-8"))["model_id"]
    except (ValueError, KeyError, TypeError) as error:
        if strict:
            raise LeukoflowError(f"{where} is damaged (no model_id); promote a model") from error
        return None
    try:
        check_model_id(model_id)
    except LeukoflowError as error:
        if strict:
            raise LeukoflowError(f"{where} names an invalid model id; refusing it") from error
        return None
    if strict and not exists(model_folder(store, model_id).child(RECORD_FILE)):
        raise LeukoflowError(f"{where} names model {model_id}, which is not in {store.uri}")
    return model_id


def current_model_kept(store: Location, non_clinical: bool, force: bool) -> str | None:
    """The current model that a new model (`non_clinical` or not) would not replace, None when
    it may be promoted: a non-clinical model never replaces a clinical one unless forced."""
    return None if force or not non_clinical else clinical_current_model(store)


def clinical_current_model(store: Location) -> str | None:
    """The current model's id when it is a clinical model (else None): what a non-clinical model
    must not replace unless forced."""
    pointer = store.child("models", CURRENT)
    seen = read_versioned(pointer)
    current = None if seen is None else _pointer_model_id(store, seen[0], strict=False)
    return current if _is_clinical(store, current) else None


def _is_clinical(store: Location, model_id: str | None) -> bool:
    """Whether `model_id` is a clinical model (read unverified: only the flag is needed, and an
    altered current model is refused when it is used)."""
    if model_id is None:
        return False
    loc = model_folder(store, model_id).child(RECORD_FILE)
    if not exists(loc):
        return False
    return not _listed_record(loc, model_id).non_clinical


def resolve_model_id(store: Location, model: str) -> str:
    """The id MODEL stands for ("current" or an id), validated."""
    model_id = current_model_id(store) if model == "current" else check_model_id(model)
    if model_id is None:
        raise LeukoflowError(f"no current model in {store.uri}; run `leukoflow run` first")
    return model_id


def load_record(store: Location, model_id: str) -> ModelRecord:
    """The model's record, after verifying every model file (ModelRefused on any change)."""
    return _verified(store, model_id)[0]


def load_model(store: Location, model_id: str) -> tuple[Pipeline, ModelRecord]:
    """The fitted pipeline and its record, both verified against the saved digests first."""
    record, model_bytes = _verified(store, model_id)
    from leukoflow.store.model_io import model_from_bytes

    return model_from_bytes(model_bytes), record


def verify_model(store: Location, model_id: str) -> dict:
    """Check a model's files against its integrity record; returns that record."""
    _verified(store, model_id)
    return read_json(model_folder(store, model_id).child(INTEGRITY_FILE))


def _verified(store: Location, model_id: str) -> tuple[ModelRecord, bytes]:
    folder = model_folder(store, model_id)
    record_loc = folder.child(RECORD_FILE)
    if not exists(record_loc):
        raise LeukoflowError(f"no model {model_id} in {store.uri}")
    refused = f"model file refused: model {model_id} in {store.uri}"
    integrity_loc = folder.child(INTEGRITY_FILE)
    if not exists(integrity_loc):
        raise ModelRefused(
            f"{refused} has no {INTEGRITY_FILE}, so its files cannot be verified "
            "(saved by an older leukoflow, or altered); retrain it"
        )
    try:
        integrity = read_json(integrity_loc)
        files = dict(integrity["files"])
        signature = integrity.get("signature")
        named = integrity["model_id"]
    except (ValueError, KeyError, TypeError) as error:
        raise ModelRefused(f"{refused}: its {INTEGRITY_FILE} is damaged") from error
    if named != model_id:
        raise ModelRefused(f"{refused}: its {INTEGRITY_FILE} belongs to model {named!r}")
    _check_signature(refused, model_id, files, signature)
    record_bytes = record_loc.fs.cat_file(record_loc.path)
    if _sha256(record_bytes) != files.get(RECORD_FILE):
        raise ModelRefused(
            f"{refused}: {RECORD_FILE} is not the file that was saved (sha256 differs; "
            "its threshold or lineage may have been changed)"
        )
    model_loc = folder.child(MODEL_FILE)
    if not exists(model_loc):
        raise ModelRefused(f"{refused}: {MODEL_FILE} is missing")
    model_bytes = model_loc.fs.cat_file(model_loc.path)
    if _sha256(model_bytes) != files.get(MODEL_FILE):
        raise ModelRefused(
            f"{refused}: {MODEL_FILE} is not the file that was saved (sha256 differs)"
            + _untrusted_note(model_bytes)
        )
    try:
        record = ModelRecord.from_dict(json.loads(record_bytes.decode("utf-8")))
    except ValueError as error:  # signed and hashed, yet no record: saved that way
        raise ModelRefused(f"{refused}: its {RECORD_FILE} is not a model record") from error
    if record.model_id != model_id:
        raise ModelRefused(f"{refused}: its record names model {record.model_id!r}")
    return record, model_bytes


def _check_signature(refused: str, model_id: str, files: dict, signature: object) -> None:
    key = _model_key()
    if key is None:
        if signature:
            raise ModelRefused(
                f"{refused} is signed, but {KEY_ENV} is not set here; set it to verify the model"
            )
        return
    if not signature:
        raise ModelRefused(
            f"{refused} is not signed, and {KEY_ENV} is set: only models signed with that key "
            "are used"
        )
    if not hmac.compare_digest(str(signature), _sign(key, model_id, files)):
        raise ModelRefused(
            f"{refused}: its signature does not match {KEY_ENV} (signed with another key, or "
            "its digests were rewritten)"
        )


def _untrusted_note(model_bytes: bytes) -> str:
    """What an altered skops file would make a loader call, for the refusal line (never loaded:
    skops lists the types without building any object)."""
    from leukoflow.store.model_io import TRUSTED_TYPES

    try:
        import skops.io as sio

        untrusted = [t for t in sio.get_untrusted_types(data=model_bytes) if t not in TRUSTED_TYPES]
    except Exception:  # not even a skops file: the sha256 mismatch says enough
        return ""
    return f"; it contains untrusted types {untrusted}" if untrusted else ""


def _model_key() -> bytes | None:
    text = os.environ.get(KEY_ENV, "")
    if not text:
        return None
    if len(text) < MIN_KEY_CHARS:
        raise LeukoflowError(f"{KEY_ENV} must be at least {MIN_KEY_CHARS} characters long")
    return text.encode("utf-8")


def _sign(key: bytes, model_id: str, files: dict) -> str:
    # The id is signed with the digests, so a signed folder cannot be copied under another id.
    message = json.dumps({"model_id": model_id, "files": files}, sort_keys=True).encode("utf-8")
    return _SIGNATURE_PREFIX + hmac.new(key, message, hashlib.sha256).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(obj: object) -> bytes:
    # The same layout as storage.write_json_atomic.
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def list_models(store: Location) -> list[ModelRecord]:
    """Every model's record, unverified (a listing; anything that uses a model verifies it)."""
    root = store.child("models")
    if not root.fs.exists(root.path):
        return []
    records = []
    for path in sorted(root.fs.ls(root.path, detail=False)):
        if MODEL_ID_PATTERN.fullmatch(path.rsplit("/", 1)[-1]) is None:
            continue  # CURRENT.json, guard and temporary files
        record_loc = Location(root.fs, path).child(RECORD_FILE)
        if record_loc.fs.exists(record_loc.path):
            records.append(_listed_record(record_loc, path.rsplit("/", 1)[-1]))
    return records


def _listed_record(record_loc: Location, model_id: str) -> ModelRecord:
    """A record read for a listing: a damaged one is listed under its folder's name, saying so
    (`models show` and every use verify it, and refuse it)."""
    try:
        return ModelRecord.from_dict(read_json(record_loc))
    except ValueError as error:  # not JSON, or JSON that is no record
        return ModelRecord(model_id, extra={"damaged": f"{RECORD_FILE} unreadable: {error}"})


# -- lineage and listings --------------------------------------------------------------------
def code_version() -> str:
    """The git commit of this code ("+dirty" with uncommitted edits), else the package version."""
    repo = Path(__file__).resolve().parents[2]
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


def model_row(record: ModelRecord, current: str | None = None) -> dict:
    """The one-line view of a model record that `models list` shows."""
    metrics = record.metrics or {}
    return {
        "model_id": record.model_id,
        "current": record.model_id == current,
        "created_at": record.created_at,
        "dataset": record.dataset,
        "classifier": record.classifier,
        "backbones": "+".join((record.feature_recipe or {}).get("backbones") or []),
        "split": record.split,
        "accuracy": metrics.get("accuracy"),
        "f1": metrics.get("f1"),
        "score_kind": record.score_kind,
        "threshold": record.threshold,
        "non_clinical": record.non_clinical,
    }


# Bulky fields kept in model.json for scoring (drift reference, test ids) but not worth printing.
_BULKY = ("reference", "test_image_ids")


def describe(record: ModelRecord) -> dict:
    """The record `models show` prints: everything but the bulky arrays, which are counted."""
    shown = {k: v for k, v in record.to_dict().items() if k not in _BULKY}
    if record.test_image_ids is not None:
        shown["test_image_ids"] = f"{len(record.test_image_ids)} ids (in model.json)"
    return shown


def model_sections(
    record: ModelRecord, current: str | None = None
) -> list[tuple[str, list[tuple]]]:
    """What `models show` prints, as titled (name, value) lists: identity, lineage, metrics."""
    metrics = record.metrics or {}
    calibration = record.calibration or {}
    test, validation = calibration.get("test") or {}, calibration.get("validation") or {}
    recipe = record.feature_recipe or {}
    return [
        ("Model", [
            ("model id", record.model_id),
            ("current", record.model_id == current),
            ("created at", record.created_at),
            ("dataset", record.dataset),
            ("classifier", record.classifier),
            ("classifier parameters", record.classifier_params),
            ("non-clinical (random weights)", record.non_clinical),
        ]),
        ("Lineage", [
            ("feature recipe", {k: recipe.get(k) for k in ("backbones", "dims", "weights_ids",
                                                           "image_size")}),
            ("training images", record.n_train),
            ("training image set fingerprint", record.training_fingerprint),
            ("test images", record.n_test),
            ("split", record.split),
            ("seed", record.seed),
            ("code version", record.code_version),
            ("package versions", record.package_versions),
        ]),
        ("Headline metrics (paper's classifier, test split)", [
            (key, metrics.get(key))
            for key in ("accuracy", "precision", "recall", "f1", "f1_macro", "roc_auc")
        ]),
        ("Risk score and operating point", [
            ("score kind", record.score_kind),
            ("threshold", record.threshold),
            ("rule", calibration.get("threshold_rule")),
            ("target sensitivity", record.target_sensitivity),
            ("calibration", f"{calibration.get('method')}, {calibration.get('folds')} "
                            f"{calibration.get('grouping')} folds" if calibration else None),
            ("validation sensitivity / specificity",
             (validation.get("sensitivity"), validation.get("specificity"))),
            ("test sensitivity / specificity", (test.get("sensitivity"), test.get("specificity"))),
            ("test Brier score", test.get("brier")),
        ]),
    ]  # fmt: skip
