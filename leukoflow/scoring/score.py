"""Nightly scoring, framework-free: what is new, whether a model's recipe can be reproduced, the
scores, the per-subject summary a clinician reads first, and the drift signal ops watch.

Nothing here imports Prefect, Ray, TensorFlow or scikit-learn: a sweep that finds nothing new
must start and finish in seconds, and every function can be tested on small arrays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import numpy as np

from leukoflow import choices
from leukoflow.errors import LeukoflowError
from leukoflow.recipe import FeatureRecipe
from leukoflow.store.pseudonym import subject_key, subject_salt
from leukoflow.store.records import (
    Accounting,
    ModelRecord,
    accounting_dict,
    non_clinical_note,
    run_row,
)
from leukoflow.store.storage import Location
from leukoflow.store.tables import CatalogRow, RunRow, read_predictions
from leukoflow.vocabulary import THRESHOLD_RULE, ImageStatus, Label, RunKind, flagged


def night_of(text: str | None, started: datetime) -> str:
    """The predictions partition of a sweep: --date, else the UTC date it started."""
    if text is None:
        return started.astimezone(UTC).date().isoformat()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise LeukoflowError(f"--date wants YYYY-MM-DD, got {text!r}")
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError as error:
        raise LeukoflowError(f"--date {text} is not a calendar date") from error


# -- the model's feature recipe (recipe rebuilds it; these are the sweep's checks) ----
def check_expected_recipe(recipe: FeatureRecipe, model_id: str, expected: dict) -> None:
    """Refuse a model whose recipe differs from the one a sweep was configured for."""
    actual = {
        "backbones": recipe.backbones,
        "image_size": recipe.image_size,
        "weights": recipe.weights,
        "precision": recipe.precision,
    }
    for key, value in expected.items():
        value = tuple(value) if isinstance(value, list) else value
        if value is not None and value != actual[key]:
            raise LeukoflowError(
                f"model {model_id} was trained on {key} {_show(actual[key])}, but this sweep "
                f"asks for {_show(value)}: refusing to score with a different feature recipe"
            )


def _show(value: object) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def check_model_width(n_features: int, recipe: FeatureRecipe, model_id: str) -> None:
    """Refuse a model file whose input width is not what its recipe makes."""
    if n_features != recipe.feature_dim:
        raise LeukoflowError(
            f"model {model_id} takes {n_features} features but its recipe makes "
            f"{recipe.feature_dim}: the model file and its record disagree"
        )


# -- what is new -----------------------------------------------------------------------------
@dataclass
class SweepPlan:
    """The inbox's catalog rows split by what a sweep does with them."""

    found: int
    quarantined: int
    duplicate: int
    already_scored: int
    new_rows: list[CatalogRow]  # one ok row per image the model has not scored yet


def plan_sweep(rows: Sequence[CatalogRow], scored_ids: set[str]) -> SweepPlan:
    """found = new + already scored + quarantined + duplicate (copies of another inbox file)."""
    ok = [r for r in rows if r.ok]
    new_rows = [r for r in ok if r.image_id not in scored_ids]
    return SweepPlan(
        found=len(rows),
        quarantined=sum(r.status == ImageStatus.QUARANTINED for r in rows),
        duplicate=sum(r.status == ImageStatus.DUPLICATE for r in rows),
        already_scored=len(ok) - len(new_rows),
        new_rows=new_rows,
    )


def chunks(items: Sequence, size: int) -> list[Sequence]:
    """`items` in consecutive slices of at most `size` (each one predictions file)."""
    if size < 1:
        raise LeukoflowError(f"--chunk-size must be at least 1, got {size}")
    return [items[start : start + size] for start in range(0, len(items), size)]


# -- predictions -----------------------------------------------------------------------------
def flag(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Which cells are flagged as ALL-like (THRESHOLD_RULE)."""
    return flagged(np.asarray(scores, dtype=np.float64), threshold)


def prediction_rows(
    rows: Sequence[CatalogRow],
    scores: np.ndarray,
    model_id: str,
    score_kind: str,
    threshold: float,
    run_id: str,
    scored_at: datetime,
) -> list[dict]:
    """PREDICTION_SCHEMA rows for catalog `rows` and their scores, in the same order."""
    flagged = flag(scores, threshold)
    return [
        {
            "image_id": row.image_id,
            "uri": row.uri,
            "subject_id": row.subject_id,
            "model_id": model_id,
            "score": float(score),
            "score_kind": score_kind,
            "predicted_label": Label.of(is_flagged).value,
            "threshold": float(threshold),
            "scored_at": scored_at,
            "run_id": run_id,
        }
        for row, score, is_flagged in zip(rows, scores, flagged, strict=True)
    ]


# -- per-subject summary ---------------------------------------------------------------------
@dataclass(frozen=True)
class SubjectRule:
    """A subject is flagged with at least k flagged cells or a flagged fraction above f."""

    min_flagged_cells: int = choices.MIN_FLAGGED_CELLS  # 0 turns this condition off
    # 1 turns this condition off (no fraction is above 1)
    min_flagged_fraction: float = choices.MIN_FLAGGED_FRACTION
    # The model's patient rule flags a fraction at or above its threshold (learn/patient).
    inclusive: bool = False

    def __post_init__(self) -> None:
        if self.min_flagged_cells < 0:
            raise LeukoflowError("--min-flagged-cells must be 0 (off) or more")
        if not 0 <= self.min_flagged_fraction <= 1:
            raise LeukoflowError("--min-flagged-fraction must be in [0, 1] (1: off)")
        if self.min_flagged_cells == 0 and self.min_flagged_fraction >= 1 and not self.inclusive:
            raise LeukoflowError("the subject rule needs at least one condition")

    def flags(self, cells_flagged: int, cells_scored: int) -> bool:
        by_count = 0 < self.min_flagged_cells <= cells_flagged
        fraction = cells_flagged / cells_scored if cells_scored else None
        if fraction is None:
            return by_count
        if self.inclusive:
            return by_count or fraction >= self.min_flagged_fraction
        return by_count or fraction > self.min_flagged_fraction

    def describe(self) -> str:
        parts = []
        if self.min_flagged_cells:
            parts.append(f"at least {self.min_flagged_cells} flagged cells")
        if self.inclusive:
            parts.append(
                f"at least {self.min_flagged_fraction:.1%} of its cells flagged (the model's "
                "patient rule, chosen on its training patients)"
            )
        elif self.min_flagged_fraction < 1:
            parts.append(f"more than {self.min_flagged_fraction:.0%} of its cells flagged")
        return " or ".join(parts)

    def as_dict(self) -> dict:
        return {
            "min_flagged_cells": self.min_flagged_cells,
            "min_flagged_fraction": self.min_flagged_fraction,
            "inclusive": self.inclusive,
            "text": self.describe(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> SubjectRule:
        """The rule `as_dict` wrote (rows before `inclusive` existed lack it: False)."""
        return cls(
            int(data["min_flagged_cells"]),
            float(data["min_flagged_fraction"]),
            inclusive=bool(data.get("inclusive")),
        )


@dataclass(frozen=True)
class SweepSettings:
    """How a sweep works: chunk size, the subject rule, drift thresholds, the lease.

    `min_flagged_cells` / `min_flagged_fraction` None: the model's own patient rule (a fraction
    of flagged cells chosen on its training patients, learn/patient) where it has one, else 5
    cells / 50%. Frozen and JSON-valued, so Prefect validates it as a flow parameter.
    """

    chunk_size: int = choices.SWEEP_CHUNK_SIZE
    min_flagged_cells: int | None = None
    min_flagged_fraction: float | None = None
    feature_drift_threshold: float = choices.FEATURE_DRIFT_THRESHOLD
    score_drift_threshold: float = choices.SCORE_DRIFT_THRESHOLD
    drift_min_cells: int = choices.DRIFT_MIN_CELLS
    wait_s: float = 0.0
    lease_ttl_s: float | None = None  # None: the store's default (store/lease.default_ttl_s)

    def __post_init__(self) -> None:
        chunks([], self.chunk_size)  # validates the size
        self.drift()
        if self.wait_s < 0:
            raise LeukoflowError(f"--wait wants 0 or more seconds, got {self.wait_s}")
        if self.lease_ttl_s is not None and self.lease_ttl_s <= 0:
            raise LeukoflowError(f"--lease-ttl wants a positive number, got {self.lease_ttl_s}")

    def drift(self) -> DriftThresholds:
        return DriftThresholds(
            self.feature_drift_threshold, self.score_drift_threshold, self.drift_min_cells
        )

    def subject_rule(self, record: ModelRecord) -> SubjectRule:
        """The user's rule where given, else the model's patient rule, else the defaults."""
        patient_rule = record.patient_rule or {}
        if self.min_flagged_cells is None and self.min_flagged_fraction is None:
            if patient_rule.get("threshold") is not None:
                return SubjectRule(0, float(patient_rule["threshold"]), inclusive=True)
        cells, fraction = self.min_flagged_cells, self.min_flagged_fraction
        return SubjectRule(
            choices.MIN_FLAGGED_CELLS if cells is None else cells,
            choices.MIN_FLAGGED_FRACTION if fraction is None else fraction,
        )


def summarise_subjects(
    subject_ids: Sequence[str | None],
    scores: Sequence[float],
    predicted_labels: Sequence[str],
    rule: SubjectRule,
) -> list[dict]:
    """One row per subject: cells scored and flagged, flagged fraction, mean score, the flag.

    Flagged subjects come first. Cells without a subject id are pooled in one row that is never
    flagged: they may come from different people.
    """
    groups: dict[str | None, list[tuple[float, bool]]] = {}
    for subject, score, label in zip(subject_ids, scores, predicted_labels, strict=True):
        groups.setdefault(subject or None, []).append((float(score), label == Label.ALL))
    summary = []
    for subject, cells in groups.items():
        scored = len(cells)
        flagged = sum(is_flagged for _, is_flagged in cells)
        summary.append(
            {
                "subject_id": subject,
                "cells_scored": scored,
                "cells_flagged": flagged,
                "flagged_fraction": round(flagged / scored, 4),
                "mean_score": round(sum(score for score, _ in cells) / scored, 4),
                "subject_flagged": None if subject is None else rule.flags(flagged, scored),
            }
        )
    summary.sort(
        key=lambda r: (
            r["subject_id"] is None,
            not r["subject_flagged"],
            -r["flagged_fraction"],
            r["subject_id"] or "",
        )
    )
    return summary


def night_totals(subjects: Sequence[dict]) -> dict:
    """The night at a glance: cells scored and flagged, subjects seen and flagged."""
    return {
        "cells_scored": sum(s["cells_scored"] for s in subjects),
        "cells_flagged": sum(s["cells_flagged"] for s in subjects),
        "subjects": sum(s["subject_id"] is not None for s in subjects),
        "subjects_flagged": sum(bool(s["subject_flagged"]) for s in subjects),
    }


# -- drift -----------------------------------------------------------------------------------
@dataclass
class FeatureMoments:
    """Running per-feature sums, so a sweep scored in chunks can still give tonight's means."""

    n: int = 0
    total: np.ndarray | None = None

    def add(self, matrix: np.ndarray) -> None:
        batch = np.asarray(matrix, dtype=np.float64).sum(axis=0)
        self.total = batch if self.total is None else self.total + batch
        self.n += len(matrix)

    def mean(self) -> np.ndarray | None:
        return None if self.total is None or self.n == 0 else self.total / self.n


def feature_shift(mean: np.ndarray, ref_mean: Sequence[float], ref_std: Sequence[float]) -> float:
    """Average |tonight's mean - training mean| in training standard deviations, per feature."""
    reference = np.asarray(ref_mean, dtype=np.float64)
    spread = np.asarray(ref_std, dtype=np.float64)
    # Features nearly constant in training (dead units) would divide by ~0: floor their spread.
    floor = max(0.01 * float(np.median(spread)), 1e-9) if spread.size else 1e-9
    return float(np.mean(np.abs(np.asarray(mean) - reference) / np.maximum(spread, floor)))


def score_ks(scores: Sequence[float], quantiles: Sequence[float]) -> float:
    """Kolmogorov-Smirnov distance between tonight's scores and the reference's quantiles."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    points = np.asarray(quantiles, dtype=np.float64)
    if values.size == 0 or points.size < 2:
        return float("nan")
    levels = np.linspace(0.0, 1.0, points.size)
    reference_cdf = np.interp(values, points, levels, left=0.0, right=1.0)
    above = np.arange(1, values.size + 1) / values.size  # the empirical CDF at each score
    below = np.arange(0, values.size) / values.size  # and just before it
    return float(max(np.max(np.abs(above - reference_cdf)), np.max(np.abs(below - reference_cdf))))


@dataclass(frozen=True)
class DriftThresholds:
    """When the drift signal becomes a warning."""

    feature_shift: float = choices.FEATURE_DRIFT_THRESHOLD  # mean |z| of feature means
    score_ks: float = choices.SCORE_DRIFT_THRESHOLD  # KS distance against the reference
    min_cells: int = choices.DRIFT_MIN_CELLS  # fewer: the signal is shown, never a warning

    def as_dict(self) -> dict:
        return {"feature_shift": self.feature_shift, "score_ks": self.score_ks,
                "min_cells": self.min_cells}  # fmt: skip


def drift_signal(
    n_cells: int,
    feature_mean: np.ndarray | None,
    scores: Sequence[float],
    record: ModelRecord,
    thresholds: DriftThresholds,
) -> dict:
    """How far tonight's cells are from the model's reference, and whether that is a warning."""
    reference = record.reference or {}
    signal: dict = {
        "cells": n_cells,
        "feature_shift": None,
        "score_ks": None,
        "warning": False,
        "reasons": [],
        "thresholds": thresholds.as_dict(),
    }
    if n_cells == 0:
        signal["reasons"].append("no cells scored")
        return signal
    if feature_mean is not None and reference.get("feature_mean") is not None:
        signal["feature_shift"] = round(
            feature_shift(feature_mean, reference["feature_mean"], reference["feature_std"]), 4
        )
    score_ref = reference.get("scores")
    if score_ref and score_ref.get("score_kind") == record.score_kind:
        signal["score_ks"] = round(score_ks(scores, score_ref["quantiles"]), 4)
    else:
        signal["reasons"].append("the model has no score reference of its score kind")
    exceeded = []
    if (signal["feature_shift"] or 0) > thresholds.feature_shift:
        exceeded.append(f"feature shift {signal['feature_shift']} > {thresholds.feature_shift}")
    if (signal["score_ks"] or 0) > thresholds.score_ks:
        exceeded.append(f"score KS {signal['score_ks']} > {thresholds.score_ks}")
    if exceeded and n_cells < thresholds.min_cells:
        signal["reasons"].append(f"only {n_cells} cells (< {thresholds.min_cells}): no warning")
    elif exceeded:
        signal["warning"] = True
        signal["reasons"].extend(exceeded)
    return signal


# -- the sweep's record ----------------------------------------------------------------------
@dataclass
class Sweep:
    """What one sweep did, filled in as it goes: the run row, the summary, the artifacts.

    Counts are measured (records.account): `scored` are images with a prediction of this run in
    the predictions table, `skipped` those scored by earlier runs, `missing` ok images with
    neither a prediction nor a quarantine record, so found = scored + skipped + quarantined +
    duplicate + missing holds only when nothing was lost. `subjects` are keyed by pseudonym:
    their `subject_id` holds store/pseudonym's key, never the raw id.
    """

    run_id: str
    started: datetime
    store: str
    inbox: str
    dataset: str
    night: str
    model_id: str
    record: ModelRecord
    rule: SubjectRule
    weights_id: str
    accounting: Accounting | None = None
    new: int = 0  # images this sweep found unscored by the model
    quarantined_new: int = 0
    computed: int = 0  # images whose vectors this sweep extracted
    ignored: int = 0  # files under the inbox that are not images
    extraction: dict = field(default_factory=dict)
    drift: dict | None = None
    subjects: list[dict] = field(default_factory=list)
    lease_note: str | None = None
    message: str | None = None
    fhir: dict | None = None  # the night's FHIR export, when the sweep made one (present/fhir)

    @property
    def scored(self) -> int:
        return self.accounting.done - self.accounting.already_done if self.accounting else 0

    def seconds(self, finished: datetime) -> float:
        return max((finished - self.started).total_seconds(), 1e-6)

    def images_per_second(self, finished: datetime) -> float | None:
        return round(self.scored / self.seconds(finished), 3) if self.scored else None

    def counts(self) -> dict:
        acc = self.accounting or Accounting(0, 0, 0, 0)
        measured = accounting_dict(acc, "done")
        del measured["done"]  # a sweep names what it did: scored now, skipped (scored before)
        return {
            **measured,
            # `new` as the row's images_new: images this sweep scored (measured).
            "new": self.scored,
            "scored": self.scored,
            "skipped": acc.already_done,
            "quarantined_new": self.quarantined_new,
            "unscored_at_start": self.new,
            "computed": self.computed,
            "ignored": self.ignored,
        }

    def summary(self, outcome: str, finished: datetime) -> dict:
        """The JSON-ready summary the CLI prints and the artifacts show."""
        record = self.record
        non_clinical = bool(record.non_clinical)
        return {
            "run_id": self.run_id,
            "kind": RunKind.SCORE,
            "outcome": outcome,
            "message": self.message,
            "store": self.store,
            "inbox": self.inbox,
            "dataset": self.dataset,
            "date": self.night,
            "model_id": self.model_id,
            "non_clinical": non_clinical,
            "note": non_clinical_note(non_clinical),
            "score_kind": record.score_kind,
            "threshold": record.threshold,
            "threshold_rule": THRESHOLD_RULE,
            "counts": self.counts(),
            "seconds": round(self.seconds(finished), 2),
            "images_per_second": self.images_per_second(finished),
            "extraction": self.extraction,
            "drift": self.drift,
            "subject_rule": self.rule.as_dict(),
            "night": night_totals(self.subjects),
            "subjects": self.subjects,
            "lease": self.lease_note,
            "started_at": self.started.isoformat(),
            "finished_at": finished.isoformat(),
            **({"fhir": self.fhir} if self.fhir else {}),
        }

    def run_columns(self, outcome: str, finished: datetime | None) -> dict:
        """The run row's columns (records.RunRecorder.record); details carries the night, drift
        and subject summary as JSON."""
        done = finished or self.started
        summary = self.summary(outcome, done)
        counts = summary["counts"]
        return dict(
            found=counts["found"], new=counts["new"], featurised=counts["scored"],
            quarantined=counts["quarantined"], duplicate=counts["duplicate"],
            scored=counts["scored"], skipped=counts["skipped"], missing=counts["missing"],
            images_per_second=self.images_per_second(done), model_id=self.model_id,
            weights_id=self.weights_id,
            details={key: summary[key] for key in DETAIL_KEYS if key in summary},
        )  # fmt: skip

    def run_row(self, outcome: str, finished: datetime | None) -> RunRow:
        """The RUN_SCHEMA row the recorder writes for this state."""
        return run_row(self.run_id, RunKind.SCORE, self.dataset, self.started, finished, outcome,
                       **self.run_columns(outcome, finished))  # fmt: skip


@dataclass(frozen=True)
class SweepDetails:
    """What a sweep's run row keeps of its summary in `details` (Sweep.run_columns), read back
    typed by the dashboard and the FHIR export. A row written by an older leukoflow may lack any
    of them: it reads back empty (None, {}, []), never as an error."""

    date: str | None = None  # the night
    inbox: str | None = None
    score_kind: str | None = None
    threshold: float | None = None
    non_clinical: bool = False
    counts: dict = field(default_factory=dict)  # Sweep.counts
    seconds: float | None = None
    extraction: dict = field(default_factory=dict)
    drift: dict = field(default_factory=dict)  # scoring/drift's summary; {}: none measured
    subject_rule: SubjectRule | None = None
    rule_text: str = ""  # the subject rule in the words the sweep wrote (its "text")
    night: dict[str, int] = field(default_factory=dict)  # night_totals
    subjects: list[dict] = field(default_factory=list)  # the subject rows
    lease: str | None = None
    message: str | None = None
    fhir: dict | None = None

    @classmethod
    def of(cls, row: RunRow) -> SweepDetails:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in row.details.items() if k in known and v is not None}
        values.pop("rule_text", None)
        rule = values.pop("subject_rule", None)
        try:
            subject_rule = SubjectRule.from_dict(rule) if rule else None
        except (AttributeError, KeyError, TypeError, ValueError, LeukoflowError):
            subject_rule = None  # a damaged rule: shown as none, the rest of the row still read
        text = rule.get("text") if isinstance(rule, dict) else None
        return cls(**values, subject_rule=subject_rule, rule_text=str(text or ""))


# The summary's keys a sweep's run row keeps (SweepDetails less what is read out of them).
DETAIL_KEYS = tuple(f.name for f in dataclasses.fields(SweepDetails) if f.name != "rule_text")


# -- what people read ------------------------------------------------------------------------
def subject_table(subjects: Sequence[dict]) -> list[dict]:
    """The subject rows as a clinician reads them (the Prefect table artifact)."""
    return [
        {
            "subject": s["subject_id"] or "(no subject id)",
            "flagged": {True: "YES", False: "no", None: "n/a"}[s["subject_flagged"]],
            "cells scored": s["cells_scored"],
            "cells flagged": s["cells_flagged"],
            "flagged %": round(100 * s["flagged_fraction"], 1),
            "mean score": s["mean_score"],
        }
        for s in subjects
    ]


def sweep_markdown(summary: dict) -> str:
    """The night at a glance, for the Prefect UI."""
    counts, night, drift = summary["counts"], summary["night"], summary["drift"] or {}
    lines = [f"# Nightly sweep {summary['date']} ({summary['outcome']})", ""]
    if summary["note"]:
        lines += [f"**{summary['note']}**", ""]
    lines += [
        f"- **Subjects flagged: {night['subjects_flagged']} of {night['subjects']}** "
        f"(rule: {summary['subject_rule']['text']})",
        f"- Cells tonight: {night['cells_scored']} scored, {night['cells_flagged']} flagged "
        f"({summary['score_kind']} >= {short(summary['threshold'])})",
        f"- This run: {counts['found']} images found, {counts['new']} new, {counts['scored']} "
        f"scored, {counts['quarantined']} quarantined ({counts['quarantined_new']} new), "
        f"{counts['duplicate']} duplicates, {counts['skipped']} already scored",
        f"- Throughput: {summary['images_per_second'] or 0} images/s over {summary['seconds']} s",
        f"- Drift: {_drift_text(drift)}",
        f"- Model `{summary['model_id']}`, run `{summary['run_id']}`",
    ]
    if summary["subjects"]:
        lines += ["", "| subject | flagged | cells scored | cells flagged | flagged % | mean |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for row in subject_table(summary["subjects"]):
            lines.append(
                f"| {row['subject']} | {row['flagged']} | {row['cells scored']} | "
                f"{row['cells flagged']} | {row['flagged %']} | {row['mean score']} |"
            )
    return "\n".join(lines) + "\n"


def short(value: object) -> str:
    """A threshold or score as people read it (4 significant digits)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _drift_text(drift: dict) -> str:
    if not drift or not drift.get("cells"):
        return "n/a (no cells scored in this run)"
    parts = [f"feature shift {_num(drift.get('feature_shift'))}",
             f"score KS {_num(drift.get('score_ks'))}"]  # fmt: skip
    state = "**WARNING**" if drift.get("warning") else "ok"
    reasons = "; ".join(drift.get("reasons") or [])
    return f"{state} ({', '.join(parts)}{'; ' + reasons if reasons else ''})"


def _num(value: float | None) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "n/a" if missing else str(value)


# -- precision at scoring --------------------------------------------------------------------
# Backbones whose vectors were shown to give the model's decisions at either precision: only
# these may be scored at a precision other than the model's. color_morphology has no precision
# (same vectors). The CNNs are not here: on 72 real cells at 224 px (docs/benchmarks.md,
# "Precision parity") bf16 changed 2 decisions of the paper's SVM (97.2%, goal 99.5%).
PARITY_SHOWN = frozenset({"color_morphology"})


def scoring_recipe(
    recipe: FeatureRecipe, precision: str | None
) -> tuple[FeatureRecipe, str | None]:
    """The recipe a sweep extracts with: the model's own, or the same at another precision where
    parity was shown (with a note saying so); refused elsewhere."""
    if precision in (None, recipe.precision):
        return recipe, None
    swapped = dataclasses.replace(recipe, precision=precision)
    if swapped.precision == recipe.precision:  # "auto" resolved to the model's own
        return recipe, None
    unproven = [name for name in recipe.backbones if name not in PARITY_SHOWN]
    if unproven:
        raise LeukoflowError(
            f"the model was trained on {recipe.precision} vectors and {swapped.precision} parity "
            f"was never shown for {', '.join(unproven)}: score at --precision {recipe.precision}"
        )
    return swapped, (
        f"scoring a {recipe.precision} model with {swapped.precision} vectors: parity shown on "
        "real cells (docs/benchmarks.md, Precision parity)"
    )


# -- the night's summary and how a sweep ended ------------------------------------------------
def summarise_night(
    state: Sweep,
    store: Location,
    scores: Sequence[float],
    feature_mean: np.ndarray | None,
    thresholds: DriftThresholds,
) -> None:
    """The night's subjects (every prediction of the night, keyed pseudonyms only) and this
    sweep's drift signal, onto `state`."""
    columns = ["image_id", "subject_id", "score", "predicted_label"]
    night = read_predictions(store, state.night, state.model_id, columns=columns)
    salt = subject_salt(store)
    state.subjects = summarise_subjects(
        [subject_key(s, salt) for s in night.column("subject_id").to_pylist()],
        night.column("score").to_pylist(),
        night.column("predicted_label").to_pylist(),
        state.rule,
    )
    state.drift = drift_signal(state.scored, feature_mean, scores, state.record, thresholds)


class BatchTimedOut(RuntimeError):
    """A batch's vectors did not come back within the batch timeout (a stuck or lost actor)."""


class SweepTimedOut(TimeoutError):
    """The sweep ran out of its time (its flow timeout, `leukoflow score --timeout`)."""


def stopped_by_timeout(error: BaseException, started: datetime, limit_s: float) -> bool:
    """Whether the flow's timeout ended the sweep. Prefect raises CancelledError in the flow's
    thread; one that strikes while Ray waits surfaces only when the wait ends (cut to the time
    left, above), as the cause of Ray's own error."""
    seen: list[BaseException] = []
    while error is not None and error not in seen and len(seen) < 20:
        seen.append(error)
        error = error.__cause__ or error.__context__
    if any(isinstance(e, asyncio.CancelledError) for e in seen):
        return True
    spent = (datetime.now(UTC) - started).total_seconds() >= limit_s
    return spent and isinstance(seen[0], TimeoutError)


def batch_timed_out(error: BaseException) -> bool:
    """Whether `error` is Ray's answer to a batch that outlasted its timeout (Ray is imported
    only by sweeps with vectors to compute: without it, the error cannot be Ray's)."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    return ray_exceptions is not None and isinstance(error, ray_exceptions.GetTimeoutError)
