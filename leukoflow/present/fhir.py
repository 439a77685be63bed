"""A night's subject-level results as FHIR R4 resources: NDJSON files and a transaction Bundle.

One `DiagnosticReport` per subject and night (status preliminary, the screening's code, the
conclusion "flagged for review" or "not flagged", the model and its feature recipe, the
non-clinical notice of a `--weights none` model) with one `Observation` per number (cells
scored, cells flagged, flagged fraction). Written as FHIR Bulk Data NDJSON, one file per
resource type, under exports/fhir/date=<night>/ of the store (or another folder), and, given a
server's base URL, sent as one transaction Bundle.

Privacy: a subject is named by the store's pseudonym (store/pseudonym) unless the user gives a
map of subject ids to patient references, kept outside the store. No raw subject id ever goes
into a resource.

Idempotence: every resource id is derived from the pseudonym, the night, the model and the
resource's role, and the Bundle PUTs each resource at its id ("update as create"), so sending
the same night twice (a retry, the next night resending a failed one) replaces, never
duplicates.

Validation: every resource is checked against the models of `fhir.resources` before it is
written. fhir.resources 8 has no plain-R4 package: its top level is R5 and `fhir.resources.R4B`
is FHIR 4.3.0 (R4B), which leaves DiagnosticReport, Observation and Bundle as R4 has them; that
is the package used here.

Framework-free: no Prefect, no Ray. The flow and the CLI only call `export_night`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from leukoflow import choices
from leukoflow.errors import LeukoflowError
from leukoflow.present import pages
from leukoflow.store.pseudonym import subject_key, subject_salt
from leukoflow.store.records import ModelRecord, non_clinical_note
from leukoflow.store.storage import (
    Location,
    exists,
    open_location,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from leukoflow.vocabulary import Outcome, RunKind

TOKEN_ENV = "LEUKOFLOW_FHIR_TOKEN"
EXPORT_PATH = ("exports", "fhir")
STATUS_FILE = "status.json"
RESOURCE_TYPES = ("DiagnosticReport", "Observation")

# Our own code system and extensions: no LOINC or SNOMED code names a machine-learning screen
# of blood-cell images, and inventing one would mislead the receiving system.
SYSTEM = "urn:leukoflow:fhir"
SCREENING_CODE = {
    "system": f"{SYSTEM}:code",
    "code": "all-cell-screen",
    "display": "Acute lymphoblastic leukaemia blood-cell image screen (leukoflow)",
}
HEMATOLOGY = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "HM",
    "display": "Hematology",
}
LABORATORY = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "laboratory",
    "display": "Laboratory",
}
FLAGGED, NOT_FLAGGED = "flagged for review", "not flagged"
# (role, code, display): one Observation per number of a subject's night.
MEASURES = (
    ("cells-scored", "Cells scored"),
    ("cells-flagged", "Cells flagged as ALL-like"),
    ("flagged-fraction", "Fraction of cells flagged"),
)
_REFERENCE = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}|https?://\S+/[A-Z][A-Za-z]+/\S+")

# Sending: a transaction is all-or-nothing on the server, so a retry after a lost answer is safe
# (the PUTs are idempotent). Bounded (the defaults are in choices.py): a night's sweep must not
# hang on a FHIR server.
SEND_BACKOFF_S = 1.0
_RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class FhirSendFailed(RuntimeError):
    """The FHIR server did not accept the Bundle (after the bounded retries); `reason` says why."""


@dataclass(frozen=True)
class SendSettings:
    """How a Bundle is sent: the per-request timeout, attempts and the first backoff."""

    timeout_s: float = choices.FHIR_SEND_TIMEOUT_S
    attempts: int = choices.FHIR_SEND_ATTEMPTS
    backoff_s: float = SEND_BACKOFF_S

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise LeukoflowError(f"the FHIR timeout wants a positive number, got {self.timeout_s}")
        if self.attempts < 1:
            raise LeukoflowError(f"the FHIR attempts want 1 or more, got {self.attempts}")


# -- targets and the subject map --------------------------------------------------------------
def is_url(target: str) -> bool:
    """Whether an --export-fhir target is a FHIR server's base URL (else a folder)."""
    return target.startswith(("http://", "https://"))


def check_url(url: str) -> str:
    """A FHIR base URL without a trailing slash; refused with credentials in it (use the token)."""
    if not is_url(url) or not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise LeukoflowError(f"--fhir-url wants http(s)://host/base, got {shown_url(url)!r}")
    if "@" in url.split("/", 3)[2]:
        raise LeukoflowError(
            f"--fhir-url must not carry credentials; put a bearer token in {TOKEN_ENV}"
        )
    return url.rstrip("/")


def shown_url(url: str) -> str:
    """The URL as messages show it: user:password@ masked."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", url)


def read_subject_map(path: str, store: Location) -> dict[str, str]:
    """subject_id -> patient reference from a CSV (header subject_id,patient_reference), which
    must live outside the store: the store's readers must not get the key to the pseudonyms."""
    loc = open_location(path)
    inside = _real(loc) == _real(store) or _real(loc).startswith(_real(store).rstrip("/") + "/")
    if inside and _same_fs(loc, store):
        raise LeukoflowError(
            f"--subject-map {path} is inside the store {store.uri}: keep the map of patient "
            "references outside it"
        )
    try:
        text = loc.fs.cat_file(loc.path).decode("utf-8-sig")
    except FileNotFoundError as error:
        raise LeukoflowError(f"--subject-map {path}: no such file") from error
    except (OSError, UnicodeDecodeError) as error:
        raise LeukoflowError(f"--subject-map {path} cannot be read: {error}") from error
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or {"subject_id", "patient_reference"} - set(reader.fieldnames):
        raise LeukoflowError(
            f"--subject-map {path} wants a header line subject_id,patient_reference"
        )
    mapping: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        subject = (row.get("subject_id") or "").strip()
        reference = (row.get("patient_reference") or "").strip()
        if not subject or not _REFERENCE.fullmatch(reference):
            # The row's values are not echoed: the subject id may be a patient identifier.
            raise LeukoflowError(
                f"--subject-map {path} line {line}: wants a subject id and a reference such "
                "as Patient/123"
            )
        if mapping.setdefault(subject, reference) != reference:
            raise LeukoflowError(f"--subject-map {path} line {line}: a subject mapped twice")
    return mapping


def _same_fs(a: Location, b: Location) -> bool:
    return a.is_local == b.is_local and (a.is_local or a.fs.protocol == b.fs.protocol)


def _real(loc: Location) -> str:
    return os.path.realpath(loc.path) if loc.is_local else loc.path


# -- the night's subjects ---------------------------------------------------------------------
def night_subjects(
    store: Location,
    night: str,
    model_id: str,
    rule,
    subject_map: Mapping[str, str] | None = None,
) -> tuple[list[dict], int]:
    """The night's subjects as the sweep summarises them (scoring/score.summarise_subjects and
    its SubjectRule), keyed by pseudonym, with a patient reference where the map has one; and
    the number of cells without a subject id (no report can name whom they belong to)."""
    from leukoflow.scoring.score import summarise_subjects
    from leukoflow.store.tables import read_predictions

    table = read_predictions(store, night, model_id, ["subject_id", "score", "predicted_label"])
    raw_ids = table.column("subject_id").to_pylist()
    # The raw ids stay in this function: only keys and mapped references leave it.
    rows = summarise_subjects(
        raw_ids,
        table.column("score").to_pylist(),
        table.column("predicted_label").to_pylist(),
        rule,
    )
    salt = subject_salt(store)
    subjects, without_subject = [], 0
    for row in rows:
        raw = row["subject_id"]
        if raw is None:
            without_subject = row["cells_scored"]
            continue
        subjects.append(
            {
                **row,
                "subject_id": subject_key(raw, salt),
                "patient_reference": (subject_map or {}).get(raw),
            }
        )
    subjects.sort(key=lambda s: s["subject_id"])
    return subjects, without_subject


def night_rule(store: Location, night: str, model_id: str, record: ModelRecord):
    """The subject rule the night's last completed sweep of this model used (its run row), else
    the rule a sweep would use by default (the model's patient rule, else 5 cells / 50%)."""
    from leukoflow.scoring.score import SweepDetails, SweepSettings
    from leukoflow.store.tables import read_run_rows

    rule = None
    for row in read_run_rows(store):  # oldest first: the last match is the latest
        if (row.kind, row.model_id, row.outcome) != (RunKind.SCORE, model_id, Outcome.COMPLETED):
            continue
        details = SweepDetails.of(row)
        if details.date == night and details.subject_rule:
            rule = details.subject_rule
    return rule or SweepSettings().subject_rule(record)


# -- resources --------------------------------------------------------------------------------
def resource_id(role: str, key: str, night: str, model_id: str) -> str:
    """A FHIR id (<= 64 of [A-Za-z0-9-.]) for one resource of a subject's night: the same inputs
    always give the same id, so a resend replaces instead of adding."""
    digest = hashlib.sha256(f"{role}|{key}|{night}|{model_id}".encode()).hexdigest()
    return f"lf-{digest[:40]}"


def recipe_text(record: ModelRecord) -> str:
    """The model's feature recipe in one line."""
    recipe = record.feature_recipe or {}
    parts = [
        "+".join(recipe.get("backbones") or []) or "?",
        f"weights {recipe.get('weights', '?')}",
        f"{recipe.get('image_size', '?')} px",
        str(recipe.get("precision", "fp32")),
    ]
    return ", ".join(parts)


def build_resources(
    subjects: list[dict], night: str, model_id: str, record: ModelRecord, issued: datetime
) -> dict[str, list[dict]]:
    """The night's resources by type: a DiagnosticReport and its Observations per subject."""
    note = non_clinical_note(record.is_non_clinical)
    stamp = issued.astimezone(UTC).isoformat(timespec="seconds")
    recipe = recipe_text(record)
    out: dict[str, list[dict]] = {name: [] for name in RESOURCE_TYPES}
    for subject in subjects:
        key = subject["subject_id"]
        ref = _subject_reference(subject)
        values = {
            "cells-scored": {"valueInteger": int(subject["cells_scored"])},
            "cells-flagged": {"valueInteger": int(subject["cells_flagged"])},
            "flagged-fraction": {
                "valueQuantity": {
                    "value": round(float(subject["flagged_fraction"]), 4),
                    "unit": "1",
                    "system": "http://unitsofmeasure.org",
                    "code": "1",
                }
            },
        }
        observations = []
        for role, display in MEASURES:
            observation = {
                "resourceType": "Observation",
                "id": resource_id(role, key, night, model_id),
                "status": "preliminary",
                "category": [{"coding": [LABORATORY]}],
                "code": {
                    "coding": [{"system": f"{SYSTEM}:code", "code": role, "display": display}],
                    "text": display,
                },
                "subject": ref,
                "effectiveDateTime": night,
                "issued": stamp,
                "method": {"text": f"leukoflow model {model_id} ({recipe})"},
                **values[role],
            }
            if note:
                observation["note"] = [{"text": note}]
            observations.append(observation)
        conclusion = FLAGGED if subject["subject_flagged"] else NOT_FLAGGED
        report = {
            "resourceType": "DiagnosticReport",
            "id": resource_id("report", key, night, model_id),
            "text": {
                "status": "generated",
                "div": _narrative(subject, conclusion, model_id, recipe, note),
            },  # fmt: skip
            "extension": [
                {"url": f"{SYSTEM}:model-id", "valueString": model_id},
                {"url": f"{SYSTEM}:feature-recipe", "valueString": recipe},
                *([{"url": f"{SYSTEM}:non-clinical", "valueString": note}] if note else []),
            ],
            "identifier": [{"system": f"{SYSTEM}:report", "value": f"{key}/{night}/{model_id}"}],
            "status": "preliminary",
            "category": [{"coding": [HEMATOLOGY]}],
            "code": {"coding": [SCREENING_CODE], "text": SCREENING_CODE["display"]},
            "subject": ref,
            "effectiveDateTime": night,
            "issued": stamp,
            "result": [{"reference": f"Observation/{o['id']}"} for o in observations],
            # The notice travels with the conclusion: a system that shows one field shows it.
            "conclusion": f"{conclusion} ({note})" if note else conclusion,
        }
        out["DiagnosticReport"].append(report)
        out["Observation"].extend(observations)
    return out


def _subject_reference(subject: dict) -> dict:
    if subject.get("patient_reference"):
        return {"reference": subject["patient_reference"], "type": "Patient"}
    # A logical reference by pseudonym: the receiving system can match it, nobody else.
    key = subject["subject_id"]
    return {
        "type": "Patient",
        "identifier": {"system": f"{SYSTEM}:subject-key", "value": key},
        "display": key,
    }


def _narrative(subject: dict, conclusion: str, model_id: str, recipe: str, note: str | None) -> str:
    """The report's human-readable XHTML, from its template (present/templates)."""
    return pages.render(
        "fhir_narrative.html",
        note=note,
        conclusion=conclusion,
        scored=int(subject["cells_scored"]),
        flagged=int(subject["cells_flagged"]),
        percent=100 * float(subject["flagged_fraction"]),
        model_id=model_id,
        recipe=recipe,
    ).strip()


def validate_resource(resource: dict) -> None:
    """Check one resource against fhir.resources' FHIR 4.3 (R4B) model of its type."""
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    kind = resource.get("resourceType")
    try:
        get_fhir_model_class(str(kind)).model_validate(resource)
    except (KeyError, ValidationError) as error:
        # A bug here, not the user's: the resources are built by this module.
        raise ValueError(f"invalid FHIR {kind} {resource.get('id')}: {error}") from error


# -- NDJSON -----------------------------------------------------------------------------------
def export_folder(store: Location, night: str) -> Location:
    """exports/fhir/date=<night>/ of the store."""
    return store.child(*EXPORT_PATH, f"date={night}")


def write_ndjson(folder: Location, resources: Mapping[str, list[dict]]) -> dict[str, str]:
    """One <Type>.ndjson per resource type (written atomically, even when empty: a night with no
    subjects replaces an older export); their URIs."""
    written = {}
    for kind in RESOURCE_TYPES:
        lines = [json.dumps(r, sort_keys=True, separators=(",", ":")) for r in resources[kind]]
        loc = folder.child(f"{kind}.ndjson")
        write_bytes_atomic(loc, "".join(line + "\n" for line in lines).encode("utf-8"))
        written[kind] = loc.uri
    return written


def read_ndjson(folder: Location) -> dict[str, list[dict]]:
    """The resources of an NDJSON export folder, by type."""
    out = {}
    for kind in RESOURCE_TYPES:
        loc = folder.child(f"{kind}.ndjson")
        text = loc.fs.cat_file(loc.path).decode("utf-8") if exists(loc) else ""
        out[kind] = [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


# -- sending ----------------------------------------------------------------------------------
def transaction_bundle(resources: Mapping[str, list[dict]], base_url: str) -> dict:
    """A transaction Bundle that PUTs every resource at its own id: idempotent."""
    entries = [
        {
            "fullUrl": f"{base_url}/{r['resourceType']}/{r['id']}",
            "resource": r,
            "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
        }
        # Observations first: the reports refer to them.
        for kind in ("Observation", "DiagnosticReport")
        for r in resources.get(kind, [])
    ]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def post_bundle(
    url: str, bundle: dict, settings: SendSettings = SendSettings(), token: str | None = None
) -> dict:
    """POST the transaction Bundle to the server's base URL, retrying timeouts, lost
    connections and 408/429/5xx answers a bounded number of times; what the server said.
    FhirSendFailed when it never accepted it. The bearer token (default: $LEUKOFLOW_FHIR_TOKEN)
    goes in a header only: never in a message."""
    import httpx

    token = os.environ.get(TOKEN_ENV) if token is None else token
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps(bundle, separators=(",", ":")).encode("utf-8")
    reason = "not sent"
    with httpx.Client(timeout=settings.timeout_s, follow_redirects=False) as client:
        for attempt in range(1, settings.attempts + 1):
            try:
                response = client.post(url, content=body, headers=headers)
            except httpx.TimeoutException:
                reason = f"no answer from {shown_url(url)} within {settings.timeout_s:g} s"
            except httpx.HTTPError as error:
                reason = f"cannot reach {shown_url(url)}: {type(error).__name__}: {error}"
            else:
                if 200 <= response.status_code < 300:
                    return {
                        "http_status": response.status_code,
                        "attempts": attempt,
                        "entries": _accepted_entries(response, len(bundle["entry"])),
                    }
                reason = f"{shown_url(url)} answered HTTP {response.status_code}"
                if response.status_code not in _RETRIED_STATUSES:
                    break  # refused as sent: sending it again would be refused again
            if attempt < settings.attempts:
                time.sleep(settings.backoff_s * 2 ** (attempt - 1))  # a retry's backoff
    raise FhirSendFailed(_masked(f"{reason} (after {attempt} attempt(s))", token))


def _accepted_entries(response, sent: int) -> int:
    """Entries the transaction-response confirms with a 2xx status (all, if it has no body)."""
    try:
        answer = response.json()
    except ValueError:
        return sent
    entries = answer.get("entry") if isinstance(answer, dict) else None
    if not isinstance(entries, list):
        return sent
    bad = [
        e
        for e in entries
        if not str((e.get("response") or {}).get("status", "200")).startswith("2")
    ]
    if bad:
        raise FhirSendFailed(f"the server refused {len(bad)} of {sent} entries of the transaction")
    return len(entries)


def _masked(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token and len(token) >= 4 else text


# -- one night's export -----------------------------------------------------------------------
def export_night(
    store: Location,
    night: str,
    model_id: str,
    record: ModelRecord,
    *,
    rule=None,
    out: str | None = None,
    fhir_url: str | None = None,
    subject_map: Mapping[str, str] | None = None,
    send: SendSettings = SendSettings(),
    issued: datetime | None = None,
) -> dict:
    """Build, validate and write one night's resources (to `out`, else into the store), and with
    `fhir_url` send them; its summary. A failed send is recorded, not raised: the summary's
    `sent.status` is "failed" with the reason, and the store's export folder keeps the NDJSON
    and a status.json saying so, for the next export to send again."""
    rule = rule or night_rule(store, night, model_id, record)
    subjects, without_subject = night_subjects(store, night, model_id, rule, subject_map)
    resources = build_resources(subjects, night, model_id, record, issued or datetime.now(UTC))
    for kind in RESOURCE_TYPES:
        for resource in resources[kind]:
            validate_resource(resource)
    folder = open_location(out) if out else export_folder(store, night)
    files = write_ndjson(folder, resources)
    summary = {
        "date": night,
        "model_id": model_id,
        "folder": folder.uri,
        "files": files,
        "resources": {kind: len(resources[kind]) for kind in RESOURCE_TYPES},
        "subjects": len(subjects),
        "subjects_flagged": sum(bool(s["subject_flagged"]) for s in subjects),
        "mapped": sum(s["patient_reference"] is not None for s in subjects),
        "cells_without_subject": without_subject,
        "non_clinical": record.is_non_clinical,
        "status": "written",
        "reason": None,
        "resent": [],
    }
    if fhir_url is None:
        if not out:
            _write_status(folder, summary, None)
        return summary
    url = check_url(fhir_url)
    summary["url"] = shown_url(url)
    try:
        sent = post_bundle(url, transaction_bundle(resources, url), send)
        summary.update(status="sent", sent=sent)
    except FhirSendFailed as error:
        summary.update(status="failed", reason=str(error))
    if not out:
        _write_status(folder, summary, url)
    if summary["status"] == "sent":
        # The server answers again: nights whose send failed before go now (same ids: no
        # duplicates).
        summary["resent"] = resend_failed(store, url, send, skip=night)
    return summary


def resend_failed(
    store: Location, url: str, send: SendSettings = SendSettings(), skip: str | None = None
) -> list[dict]:
    """Send again every night of the store's exports whose last send failed; what each did."""
    root = store.child(*EXPORT_PATH)
    if not exists(root):
        return []
    done = []
    for path in sorted(root.fs.ls(root.path, detail=False)):
        name = posixpath.basename(path.rstrip("/"))
        if not name.startswith("date=") or name == f"date={skip}":
            continue
        folder = root.child(name)
        status_loc = folder.child(STATUS_FILE)
        if not exists(status_loc) or read_json(status_loc).get("status") != "failed":
            continue
        night = name.removeprefix("date=")
        status = read_json(status_loc)
        try:
            post_bundle(url, transaction_bundle(read_ndjson(folder), url), send)
            status.update(status="sent", reason=None)
        except FhirSendFailed as error:
            status.update(status="failed", reason=str(error))
        status.update(url=shown_url(url), at=datetime.now(UTC).isoformat())
        write_json_atomic(status_loc, status)
        done.append({"date": night, "status": status["status"], "reason": status["reason"]})
        if status["status"] == "failed":
            break  # the server stopped answering: the rest wait for the next export
    return done


def _write_status(folder: Location, summary: dict, url: str | None) -> None:
    status = {
        "date": summary["date"],
        "model_id": summary["model_id"],
        "status": summary["status"],
        "reason": summary["reason"],
        "url": shown_url(url) if url else None,
        "resources": summary["resources"],
        "at": datetime.now(UTC).isoformat(),
    }
    write_json_atomic(folder.child(STATUS_FILE), status)


def export_after_sweep(
    store: Location, night: str, model_id: str, record: ModelRecord, rule, target: str
) -> dict:
    """The sweep's export to `target` (a folder or a FHIR base URL; NDJSON kept in the store
    for a URL): what the run row records under details.fhir. Never raises: an export that fails
    must not fail the night's scoring, which is done and stored by now."""
    try:
        if is_url(target):
            done = export_night(store, night, model_id, record, rule=rule, fhir_url=target)
        else:
            done = export_night(store, night, model_id, record, rule=rule, out=target)
    except Exception as error:  # recorded in the run row; the predictions are already stored
        token = os.environ.get(TOKEN_ENV)
        first = str(error).splitlines()[0] if str(error) else ""
        reason = _masked(f"{type(error).__name__}: {first}", token)
        return {"status": "failed", "reason": reason, "target": _target_shown(target)}
    return {
        "status": done["status"],
        "reason": done["reason"],
        "target": _target_shown(target),
        "folder": done["folder"],
        "resources": done["resources"],
        "resent": done["resent"],
    }


def _target_shown(target: str) -> str:
    return shown_url(target) if is_url(target) else target
