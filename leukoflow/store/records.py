"""The records a run leaves behind, each built in one place: image accounting (`account`), run
rows (`run_row`, written by `RunRecorder` once per run, whatever its outcome) and model records
(`ModelRecord`, built by `model_record`). Plain code: the flows call it and write what it returns.
"""

from __future__ import annotations

import platform
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from leukoflow.recipe import FeatureRecipe
from leukoflow.store.storage import Location
from leukoflow.store.tables import CatalogRow, RunRow, write_run
from leukoflow.vocabulary import NON_CLINICAL_NOTICE, ImageStatus, Outcome, RunKind, short_id

PACKAGES = ("leukoflow", "keras", "scikit-learn", "numpy", "pyarrow", "ray", "prefect", "skops")


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a model's numbers depend on (its lineage)."""
    versions = {"python": platform.python_version(), **{p: version(p) for p in PACKAGES}}
    for distribution in ("tensorflow", "tensorflow-cpu"):  # GPU images install the former
        try:
            versions["tensorflow"] = version(distribution)
            break
        except PackageNotFoundError:
            continue
    return versions


def non_clinical_note(non_clinical: bool) -> str | None:
    return NON_CLINICAL_NOTICE if non_clinical else None


# -- accounting ------------------------------------------------------------------------------
@dataclass
class Accounting:
    """Every file found, counted by measurement: each category comes from its own source.

    `done` are ok files whose image has what the run makes (vectors in the features table, or
    predictions in the predictions table), read back from the store; `quarantined` come from the
    catalog and from extraction; `duplicate` from the catalog. `missing` are ok files with
    neither: images lost on the way, named so that someone can look. A file counted twice (an
    image both set aside and stored) or not at all breaks `found == sum` and `accounted` says so.
    """

    found: int
    done: int
    quarantined: int
    duplicate: int
    missing_ids: list[str] = field(default_factory=list)
    double_counted_ids: list[str] = field(default_factory=list)
    already_done: int = 0  # of `done`: finished by an earlier run (sweeps: already scored)

    @property
    def missing(self) -> int:
        return len(self.missing_ids)

    @property
    def accounted(self) -> bool:
        total = self.done + self.quarantined + self.duplicate + self.missing
        return total == self.found and not self.missing_ids and not self.double_counted_ids


def account(
    rows: Sequence[CatalogRow],
    rejected: Iterable[str],
    done_ids: set[str],
    done_before: set[str] | None = None,
) -> Accounting:
    """Count catalog `rows` against what the store holds (`done_ids`, read from its table) and
    what extraction set aside (`rejected` image ids)."""
    rejected = set(rejected)
    done_before = done_before or set()
    quarantined = duplicate = done = already = 0
    missing, double = [], []
    for row in rows:
        status, image_id = row.status, row.image_id
        if status == ImageStatus.DUPLICATE:
            duplicate += 1
        elif status == ImageStatus.QUARANTINED:
            quarantined += 1
        elif status == ImageStatus.OK:
            set_aside, stored = image_id in rejected, image_id in done_ids
            quarantined += set_aside
            done += stored
            already += stored and image_id in done_before
            if set_aside and stored:
                double.append(image_id)
            elif not set_aside and not stored:
                missing.append(image_id)
    return Accounting(len(rows), done, quarantined, duplicate, missing, double, already)


def accounting_dict(counts: Accounting, done_name: str) -> dict:
    """The JSON form: `done_name` is what `done` means for this kind of run."""
    return {
        "found": counts.found,
        done_name: counts.done,
        "quarantined": counts.quarantined,
        "duplicate": counts.duplicate,
        "missing": counts.missing,
        "accounted": counts.accounted,
        # Named by short content id: a file name can carry a subject id. Capped for the row.
        "missing_images": [short_id(i) for i in counts.missing_ids[:100]],
        "double_counted_images": [short_id(i) for i in counts.double_counted_ids[:100]],
    }


def backfill_summary(
    *,
    run_id: str,
    store: str,
    dataset: str,
    recipe: FeatureRecipe,
    counts: Accounting,
    extraction: dict,
    computed: int,
    new_files: int,
    ignored: int,
    n_ok: int,
    needing: int,
    started: datetime,
    finished: datetime,
) -> dict:
    """What `leukoflow backfill` returns (its --json line): what was catalogued and featurised.
    `n_ok`: the ok images; `needing`: those of them that lacked some vector before this run;
    `computed`: the images this run featurised."""
    return {
        "run_id": run_id,
        "kind": RunKind.BACKFILL,
        "outcome": Outcome.COMPLETED,
        "store": store,
        "dataset": dataset,
        "backbones": list(recipe.backbones),
        "weights_id": recipe.weights_id,
        "image_size": recipe.image_size,
        "precision": recipe.precision,
        "non_clinical": recipe.non_clinical,
        "counts": {
            **accounting_dict(counts, "featurised"),
            "new_files": new_files,
            "ignored": ignored,
            "ok": counts.done,  # ok images holding every vector (measured), as before
            "needing_vectors": needing,
            "already_featurised": n_ok - needing,
            "computed": computed,
        },
        "extraction": extraction,
        "seconds": round((finished - started).total_seconds(), 2),
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
    }


def quarantine_list(rows: Sequence[CatalogRow]) -> list[dict]:
    """The images set aside, by content id and reason (for reports; summaries count them)."""
    return [
        {"image_id": r.image_id, "reason": r.reason}
        for r in rows
        if r.status == ImageStatus.QUARANTINED
    ]


def not_promoted_note(kept_current: str) -> str:
    """Why a new non-clinical model was saved but not made current."""
    return (
        f"non-clinical model: the clinical model {kept_current} stays current "
        "(--force to promote it anyway)"
    )


# -- run rows --------------------------------------------------------------------------------
def new_run_id(started: datetime) -> str:
    """A run's id: its start (UTC, sortable) and 8 random hex digits (unique)."""
    return f"{started.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


@dataclass
class RunRecorder:
    """The one writer of run rows (`runs/run-<id>.parquet`, tables.RUN_SCHEMA): every kind of
    run mints its id, stamps its start and end and writes its row the same way. A run that
    writes `running` first and its outcome later replaces its own row (same file)."""

    store: Location
    kind: RunKind
    dataset: str
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    run_id: str = ""

    def __post_init__(self) -> None:
        self.run_id = self.run_id or new_run_id(self.started)

    def record(self, outcome: Outcome, **columns) -> RunRow:
        """Write the row (run_row's keyword columns); `finished_at` is now unless running."""
        finished = None if outcome == Outcome.RUNNING else datetime.now(UTC)
        row = run_row(self.run_id, self.kind, self.dataset, self.started, finished, outcome,
                      **columns)  # fmt: skip
        write_run(self.store, row)
        return row

    @staticmethod
    def extraction_columns(counts: Accounting, extraction) -> dict:
        """The image columns of a run that extracts: counts measured against the vectors, and
        `extraction` (features/extract.ExtractionResult)."""
        return {
            "found": counts.found,
            "new": extraction.images_done,
            "featurised": counts.done,
            "quarantined": counts.quarantined,
            "duplicate": counts.duplicate,
            "missing": counts.missing,
            "images_per_second": extraction.to_dict()["images_per_second"],
        }


def run_row(
    run_id: str,
    kind: RunKind,
    dataset: str,
    started: datetime,
    finished: datetime | None,
    outcome: Outcome,
    *,
    found: int = 0,
    new: int = 0,
    featurised: int = 0,
    quarantined: int = 0,
    duplicate: int = 0,
    scored: int = 0,
    skipped: int = 0,
    missing: int = 0,
    images_per_second: float | None = None,
    model_id: str | None = None,
    weights_id: str | None = None,
    details: dict | None = None,
) -> RunRow:
    """One run's row (tables.write_run): the same columns for every kind of run."""
    return RunRow(
        run_id=run_id,
        kind=kind,
        dataset=dataset,
        started_at=started,
        finished_at=finished,
        outcome=outcome,
        images_found=found,
        images_new=new,
        images_featurised=featurised,
        images_quarantined=quarantined,
        images_duplicate=duplicate,
        images_scored=scored,
        images_skipped=skipped,
        images_missing=missing,
        images_per_second=images_per_second,
        model_id=model_id,
        weights_id=weights_id,
        details=dict(details or {}),
    )


# -- model records ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRecord:
    """model.json, typed: what the model is, how it was made, its operating point, its lineage.

    Written by `model_record` at training and read back by store/registry (verified first).
    Only `model_id` is required: a record of an older leukoflow lacks some fields (None here),
    and keys of a newer one are kept in `extra`, so `to_dict` gives back what was stored.
    """

    model_id: str
    created_at: str | None = None  # ISO 8601, as stored
    dataset: str | None = None
    feature_recipe: dict | None = None  # recipe.FeatureRecipe.to_record()
    non_clinical: bool | None = None
    classifier: str | None = None
    classifier_params: dict | None = None  # the paper's settings; the model adds calibration
    score_kind: str | None = None  # what the model's scores are (train.decision_scores)
    threshold: float | None = None  # flag a cell when its score is at least this
    target_sensitivity: float | None = None
    calibration: dict | None = None
    patient_rule: dict | None = None
    split: str | None = None
    seed: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    training_fingerprint: str | None = None
    test_image_ids: list[str] | None = None
    reference: dict | None = None  # the held-out distribution nightly drift compares against
    metrics: dict | None = None
    package_versions: dict | None = None
    code_version: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_non_clinical(self) -> bool:
        """Random-init weights: the model's outputs mean nothing clinically."""
        return bool(self.non_clinical) or (self.feature_recipe or {}).get("weights") == "none"

    def to_dict(self) -> dict:
        """The JSON form (model.json)."""
        stored = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**stored, **self.extra}

    @classmethod
    def from_dict(cls, data: object) -> ModelRecord:
        """A stored record; ValueError when it is not one (not an object, or no model id)."""
        if not isinstance(data, dict) or not isinstance(data.get("model_id"), str):
            raise ValueError("a model record is a JSON object with a model_id string")
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**{k: v for k, v in data.items() if k in known}, extra=extra)


def model_record(
    *,
    model_id: str,
    created_at: datetime,
    dataset: str,
    recipe: FeatureRecipe,
    classifier: str,
    fitted,
    split: str,
    seed: int,
    train_ids: list[str],
    test_ids: list[str],
    training_fingerprint: str,
    target_sensitivity: float,
    reference: dict,
    code_version: str,
) -> ModelRecord:
    """A new model's record. `fitted` is a train.FittedModel; `reference` the held-out
    distribution that nightly drift compares against."""
    return ModelRecord(
        model_id=model_id,
        created_at=created_at.isoformat(),
        dataset=dataset,
        feature_recipe=recipe.to_record(),
        non_clinical=recipe.non_clinical,
        classifier=classifier,
        classifier_params=fitted.paper_params(),
        score_kind=fitted.score_kind,
        threshold=fitted.threshold,
        target_sensitivity=target_sensitivity,
        calibration=fitted.calibration,
        patient_rule=fitted.patient_rule,
        split=split,
        seed=seed,
        n_train=len(train_ids),
        n_test=len(test_ids),
        training_fingerprint=training_fingerprint,
        test_image_ids=list(test_ids),
        reference=reference,
        metrics=fitted.metrics,
        package_versions=package_versions(),
        code_version=code_version,
    )


def run_summary(
    *,
    run_id: str,
    record: ModelRecord,
    store: str,
    fitted,
    counts: Accounting,
    extraction: dict,
    trained_and_tested: int,
    ignored: int,
) -> dict:
    """What `leukoflow run` returns (its --json line): the model, its numbers, the accounting."""
    recipe = record.feature_recipe
    return {
        "run_id": run_id,
        "model_id": record.model_id,
        "dataset": record.dataset,
        "store": store,
        "backbones": recipe["backbones"],
        "feature_dim": recipe["feature_dim"],
        "weights_id": ",".join(recipe["weights_ids"][n] for n in recipe["backbones"]),
        "precision": recipe["precision"],
        "non_clinical": record.non_clinical,
        "note": non_clinical_note(record.non_clinical),
        "image_size": recipe["image_size"],
        "classifier": record.classifier,
        "classifier_params": record.classifier_params,
        "split": record.split,
        "seed": record.seed,
        "n_train": record.n_train,
        "n_test": record.n_test,
        "counts": {
            **accounting_dict(counts, "featurised"),
            "trained_and_tested": trained_and_tested,
            "ignored": ignored,
        },
        "extraction": extraction,
        "metrics": fitted.metrics,
        "operating_point": fitted.operating_point,
        "patient_rule": fitted.patient_rule,
        "score_kind": fitted.score_kind,
        "threshold": fitted.threshold,
        "calibration": fitted.calibration,
        "created_at": record.created_at,
        "code_version": record.code_version,
        "package_versions": record.package_versions,
    }
