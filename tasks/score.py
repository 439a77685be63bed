"""Nightly scoring, framework-free: what is new, whether a model's recipe can be reproduced, the
scores, the per-subject summary a clinician reads first, and the drift signal ops watch.

Nothing here imports Prefect, Ray, TensorFlow or scikit-learn: a sweep that finds nothing new
must start and finish in seconds, and every function can be tested on small arrays.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import numpy as np

from leukoflow.errors import LeukoflowError
from leukoflow.tasks import backbones as bb
from leukoflow.tasks.tables import STATUS_DUPLICATE, STATUS_OK, STATUS_QUARANTINED

# tasks.evaluate's POSITIVE/NEGATIVE_LABEL (not imported: it loads scikit-learn, seconds at start).
FLAGGED_LABEL = "all"
NORMAL_LABEL = "hem"
# A cell is flagged when its score reaches the model's threshold (the rule tasks.calibration
# records with calibrated models; for an SVM's decision value the threshold is 0).
THRESHOLD_RULE = "score >= threshold means all"
SCORE_QUANTILES = 21  # points of the score reference's distribution kept in model.json


def new_run_id(started: datetime) -> str:
    """A sortable, unique run id: the start time and a random suffix."""
    return f"{started.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


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


# -- the model's feature recipe --------------------------------------------------------------
@dataclass(frozen=True)
class FeatureRecipe:
    """How a model's input vector is made: backbones in order, their weights, the image size."""

    backbones: tuple[str, ...]
    dims: tuple[int, ...]
    weights: str  # "imagenet" | "none"
    weights_ids: dict[str, str]
    image_size: int

    @property
    def feature_dim(self) -> int:
        return sum(self.dims)

    @property
    def weights_id(self) -> str:
        return ",".join(self.weights_ids[name] for name in self.backbones)


def model_recipe(record: dict) -> FeatureRecipe:
    """The recipe of a model record, refused when this code cannot reproduce its features."""
    model_id = record.get("model_id", "?")
    raw = record.get("feature_recipe") or {}
    try:
        recipe = FeatureRecipe(
            backbones=tuple(raw["backbones"]),
            dims=tuple(int(d) for d in raw["dims"]),
            weights=str(raw["weights"]),
            weights_ids={str(k): str(v) for k, v in raw["weights_ids"].items()},
            image_size=int(raw["image_size"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise LeukoflowError(f"model {model_id} has no usable feature recipe ({error})") from error
    names = bb.parse_backbones(list(recipe.backbones))
    expected_dims = tuple(bb.BACKBONES[name].feature_dim for name in names)
    if recipe.dims != expected_dims:
        raise LeukoflowError(
            f"model {model_id} expects {'+'.join(names)} vectors of sizes {list(recipe.dims)}, "
            f"but these backbones give {list(expected_dims)}: refusing to mis-score"
        )
    if set(recipe.weights_ids) != set(names):
        raise LeukoflowError(f"model {model_id}'s recipe lacks weights ids for some backbones")
    if recipe.weights not in ("imagenet", "none"):
        raise LeukoflowError(f"model {model_id} has unknown weights kind {recipe.weights!r}")
    bb.check_image_size(names, recipe.image_size)
    return recipe


def check_expected_recipe(recipe: FeatureRecipe, model_id: str, expected: dict) -> None:
    """Refuse a model whose recipe differs from the one a sweep was configured for."""
    actual = {
        "backbones": recipe.backbones,
        "image_size": recipe.image_size,
        "weights": recipe.weights,
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


def weights_choice(
    record: dict, recipe: FeatureRecipe, weights_dir: str | None
) -> bb.WeightsChoice:
    """The weights that reproduce the model's features here (random init: the model's seed)."""
    if recipe.weights == "none":
        return bb.WeightsChoice("none", seed=int(record.get("seed", 0)))
    return bb.WeightsChoice("imagenet", folder=weights_dir)


def check_local_weights(recipe: FeatureRecipe, model_id: str, local_ids: dict[str, str]) -> None:
    """Refuse to extract features with weights other than those the model was trained on."""
    for name, local in local_ids.items():
        if local != recipe.weights_ids[name]:
            raise LeukoflowError(
                f"model {model_id} was trained on {name} features from weights "
                f"{recipe.weights_ids[name]}, but the weights here are {local}: refusing to "
                "mis-score (copy the model's weights files or retrain)"
            )


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
    new_rows: list[dict]  # one ok row per image the model has not scored yet


def plan_sweep(rows: Sequence[dict], scored_ids: set[str]) -> SweepPlan:
    """found = new + already scored + quarantined + duplicate (copies of another inbox file)."""
    ok = [r for r in rows if r["status"] == STATUS_OK]
    new_rows = [r for r in ok if r["image_id"] not in scored_ids]
    return SweepPlan(
        found=len(rows),
        quarantined=sum(r["status"] == STATUS_QUARANTINED for r in rows),
        duplicate=sum(r["status"] == STATUS_DUPLICATE for r in rows),
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
    return np.asarray(scores, dtype=np.float64) >= threshold


def prediction_rows(
    rows: Sequence[dict],
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
            "image_id": row["image_id"],
            "uri": row["uri"],
            "subject_id": row["subject_id"],
            "model_id": model_id,
            "score": float(score),
            "score_kind": score_kind,
            "predicted_label": FLAGGED_LABEL if is_flagged else NORMAL_LABEL,
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

    min_flagged_cells: int = 5  # 0 turns this condition off
    min_flagged_fraction: float = 0.5  # 1 turns this condition off (no fraction is above 1)

    def __post_init__(self) -> None:
        if self.min_flagged_cells < 0:
            raise LeukoflowError("--min-flagged-cells must be 0 (off) or more")
        if not 0 <= self.min_flagged_fraction <= 1:
            raise LeukoflowError("--min-flagged-fraction must be in [0, 1] (1: off)")
        if self.min_flagged_cells == 0 and self.min_flagged_fraction >= 1:
            raise LeukoflowError("the subject rule needs at least one condition")

    def flags(self, cells_flagged: int, cells_scored: int) -> bool:
        by_count = 0 < self.min_flagged_cells <= cells_flagged
        by_fraction = cells_scored > 0 and cells_flagged / cells_scored > self.min_flagged_fraction
        return by_count or by_fraction

    def describe(self) -> str:
        parts = []
        if self.min_flagged_cells:
            parts.append(f"at least {self.min_flagged_cells} flagged cells")
        if self.min_flagged_fraction < 1:
            parts.append(f"more than {self.min_flagged_fraction:.0%} of its cells flagged")
        return " or ".join(parts)

    def as_dict(self) -> dict:
        return {
            "min_flagged_cells": self.min_flagged_cells,
            "min_flagged_fraction": self.min_flagged_fraction,
            "text": self.describe(),
        }


def summarize_subjects(
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
        groups.setdefault(subject or None, []).append((float(score), label == FLAGGED_LABEL))
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
def score_reference(scores: np.ndarray, score_kind: str, split: str) -> dict:
    """What model.json keeps of a score distribution: moments and quantiles."""
    values = np.asarray(scores, dtype=np.float64)
    return {
        "score_kind": score_kind,
        "split": split,
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "quantiles": np.quantile(values, np.linspace(0, 1, SCORE_QUANTILES)).tolist(),
    }


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

    feature_shift: float = 1.0  # mean |z| of the feature means against training
    score_ks: float = 0.5  # KS distance of the scores against the held-out reference
    min_cells: int = 20  # fewer cells than this: the signal is reported, never a warning

    def as_dict(self) -> dict:
        return {"feature_shift": self.feature_shift, "score_ks": self.score_ks,
                "min_cells": self.min_cells}  # fmt: skip


def drift_signal(
    n_cells: int,
    feature_mean: np.ndarray | None,
    scores: Sequence[float],
    record: dict,
    thresholds: DriftThresholds,
) -> dict:
    """How far tonight's cells are from the model's reference, and whether that is a warning."""
    reference = record.get("reference") or {}
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
    if score_ref and score_ref.get("score_kind") == record.get("score_kind"):
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
    """What one sweep did, filled in as it goes: the run row, the summary, the artifacts."""

    run_id: str
    started: datetime
    store: str
    inbox: str
    dataset: str
    night: str
    model_id: str
    record: dict
    rule: SubjectRule
    weights_id: str
    found: int = 0
    new: int = 0
    scored: int = 0
    quarantined: int = 0
    quarantined_new: int = 0
    duplicate: int = 0
    skipped: int = 0
    computed: int = 0  # images whose vectors this sweep extracted
    extraction: dict = field(default_factory=dict)
    drift: dict | None = None
    subjects: list[dict] = field(default_factory=list)
    lease_note: str | None = None
    catalog_written: bool = False

    def seconds(self, finished: datetime) -> float:
        return max((finished - self.started).total_seconds(), 1e-6)

    def images_per_second(self, finished: datetime) -> float | None:
        return round(self.scored / self.seconds(finished), 3) if self.scored else None

    def summary(self, outcome: str, finished: datetime) -> dict:
        """The JSON-ready summary the CLI prints and the artifacts show."""
        record = self.record
        non_clinical = bool(record.get("non_clinical"))
        return {
            "run_id": self.run_id,
            "kind": "score",
            "outcome": outcome,
            "store": self.store,
            "inbox": self.inbox,
            "dataset": self.dataset,
            "date": self.night,
            "model_id": self.model_id,
            "non_clinical": non_clinical,
            "note": NON_CLINICAL_NOTE if non_clinical else None,
            "score_kind": record.get("score_kind"),
            "threshold": record.get("threshold"),
            "threshold_rule": THRESHOLD_RULE,
            "counts": {
                "found": self.found,
                "new": self.new,
                "scored": self.scored,
                "quarantined": self.quarantined,
                "quarantined_new": self.quarantined_new,
                "duplicate": self.duplicate,
                "skipped": self.skipped,
                "computed": self.computed,
            },
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
        }

    def run_row(self, outcome: str, finished: datetime | None) -> dict:
        """The RUN_SCHEMA row; details carries the night, drift and subject summary as JSON."""
        done = finished or self.started
        summary = self.summary(outcome, done)
        details = {key: summary[key] for key in DETAIL_KEYS}
        return {
            "run_id": self.run_id,
            "kind": "score",
            "dataset": self.dataset,
            "started_at": self.started,
            "finished_at": finished,
            "outcome": outcome,
            "images_found": self.found,
            "images_new": self.new,
            # As for `run`: ok images holding vectors, so found = featurised + quarantined + dup.
            "images_featurised": self.found - self.quarantined - self.duplicate,
            "images_quarantined": self.quarantined,
            "images_duplicate": self.duplicate,
            "images_scored": self.scored,
            "images_skipped": self.skipped,
            "images_per_second": self.images_per_second(done),
            "model_id": self.model_id,
            "weights_id": self.weights_id,
            "details": json.dumps(details, default=str),
        }


NON_CLINICAL_NOTE = (
    "NOT CLINICALLY MEANINGFUL: the model uses features of random-initialised networks "
    "(--weights none)"
)
DETAIL_KEYS = (
    "date", "inbox", "score_kind", "threshold", "non_clinical", "counts", "seconds", "extraction",
    "drift", "subject_rule", "night", "subjects", "lease",
)  # fmt: skip


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
