"""The paper's experiment grid, and the honest evaluation beside it. Plain functions, no engines.

A grid cell is one feature set (a backbone, a pair or the trio, concatenated in the user's
order) x one classifier x one evaluation. Two evaluations exist: the paper's random 90/10 image
split (one test set), and k folds grouped by subject (no patient on both sides), reported as
mean +- std over folds with a bootstrap 95% interval that resamples whole subjects. Augmented
copies of an image only ever join the training side of a fold its source image is in.
"""

from __future__ import annotations

import csv
import io
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np

from leukoflow import choices
from leukoflow.choices import CLASSIFIERS, EXPERIMENT_SPLITS
from leukoflow.errors import LeukoflowError
from leukoflow.features import augment
from leukoflow.features import backbones as bb
from leukoflow.features.join import join_features
from leukoflow.learn import folds, train
from leukoflow.learn.folds import Augmented
from leukoflow.recipe import FeatureRecipe
from leukoflow.store.records import non_clinical_note, package_versions
from leukoflow.store.registry import code_version
from leukoflow.store.storage import Location
from leukoflow.store.tables import CatalogRow

# The paper's table columns (Tables 5-6), then macro F1: its F1 values sit below accuracy on
# 68% ALL data, which fits a class-averaged F1 better than the ALL-class one.
TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "Test accuracy"),
    ("precision", "Precision"),
    ("recall", "Recall"),
    ("f1", "F1"),
    ("f1_macro", "Macro F1"),
)
RANKING_METRIC = "accuracy"  # how the paper ranks its cells; F1 breaks ties
SPLIT_GAP_EXPLANATION = (
    "The random split puts cells of the same patient on both sides, so a classifier can score "
    "by recognising the patient's staining and imaging rather than the disease, which inflates "
    "every number. The subject-grouped folds keep each patient on one side, so they estimate "
    "what happens on a new patient, and the spread over folds shows how much that varies."
)
NO_SUBJECTS_NOTE = (
    "Subject-grouped folds were not possible ({why}), so the honest evaluation fell back to "
    "image-level folds: these numbers are NOT subject-grouped and are inflated like the paper's."
)


# -- the grid --------------------------------------------------------------------------------
def check_split_choice(split: str) -> list[str]:
    """The evaluations `--split` asks for, in report order."""
    if split not in EXPERIMENT_SPLITS:
        raise LeukoflowError(f"unknown split {split!r}; choose from {', '.join(EXPERIMENT_SPLITS)}")
    return ["random", "subject"] if split == "both" else [split]


def parse_classifiers(text: str | Sequence[str]) -> list[str]:
    """Validate a comma list of classifier names, keeping order and refusing duplicates."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in CLASSIFIERS]
    if unknown or not names:
        raise LeukoflowError(
            f"unknown classifier {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(CLASSIFIERS)}"
        )
    if len(set(names)) != len(names):
        raise LeukoflowError(f"classifier listed twice: {','.join(names)}")
    return names


def pick_trio(backbones: list[str], trio: Sequence[str] | None = None) -> list[str]:
    """The three backbones whose pairs and trio are tried: the user's, the paper's, or the first."""
    if trio:
        chosen = bb.parse_backbones(list(trio))
        if len(chosen) != 3 or any(n not in backbones for n in chosen):
            raise LeukoflowError(f"--trio must name 3 of the chosen backbones, got {chosen}")
        return [n for n in backbones if n in chosen]
    if all(n in backbones for n in bb.DEFAULT_BACKBONES):
        return [n for n in backbones if n in bb.DEFAULT_BACKBONES]
    return backbones[:3]


def feature_sets(backbones: list[str], trio: Sequence[str] | None = None) -> list[tuple[str, ...]]:
    """Every single backbone, then the pairs of the trio, then the trio (as in Tables 3-5)."""
    chosen = pick_trio(backbones, trio)
    sets: list[tuple[str, ...]] = [(name,) for name in backbones]
    if len(chosen) >= 2:
        sets += list(itertools.combinations(chosen, 2))
    if len(chosen) == 3:
        sets.append(tuple(chosen))
    return sets


def set_name(feature_set: Sequence[str]) -> str:
    return "+".join(feature_set)


def feature_columns(
    feature_set: Sequence[str], backbones: Sequence[str], dims: Sequence[int]
) -> np.ndarray:
    """Column indices of `feature_set` in a matrix that concatenates `backbones` in order."""
    starts = np.concatenate([[0], np.cumsum(dims)[:-1]]).astype(int)
    where = {name: (int(s), int(d)) for name, s, d in zip(backbones, starts, dims, strict=True)}
    return np.concatenate([np.arange(where[n][0], sum(where[n])) for n in feature_set])


@dataclass(frozen=True)
class Cell:
    feature_set: tuple[str, ...]
    classifier: str
    evaluation: str  # "random" | "subject"


def grid(sets: list[tuple[str, ...]], classifiers: list[str], evaluations: list[str]) -> list[Cell]:
    """Every cell, evaluation-major so each table's cells sit together."""
    return [
        Cell(feature_set, classifier, evaluation)
        for evaluation in evaluations
        for feature_set in sets
        for classifier in classifiers
    ]


# -- evaluations -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    name: str  # "random" | "subject"
    label: str  # what a table's title says
    folds: train.Folds


def plan_evaluations(
    y: np.ndarray, subjects: list[str | None], names: list[str], n_folds: int, seed: int
) -> list[Evaluation]:
    """The folds every cell shares, so cells differ only by features and classifier."""
    plans = []
    for name in names:
        if name == "random":
            split = train.split_rows(y, subjects, "random", seed=seed)
            folds = train.Folds([(split.train, split.test)], "image")
            label = "random 90/10 image split (the paper's)"
        else:
            folds = train.kfold(y, subjects, n_folds, seed)
            label = (
                f"subject-grouped {folds.k}-fold cross-validation (no patient on both sides)"
                if folds.grouping == "subject"
                else f"image {folds.k}-fold cross-validation (NOT subject-grouped: {folds.note})"
            )
        plans.append(Evaluation(name, label, folds))
    return plans


def evaluate_cell(
    x: np.ndarray,
    y: np.ndarray,
    subjects: list[str | None],
    columns: np.ndarray,
    cell: Cell,
    evaluation: Evaluation,
    augmented: Augmented | None = None,
    seed: int = choices.DEFAULT_SEED,
    n_boot: int = choices.DEFAULT_BOOTSTRAP,
) -> dict:
    """Fit and score one cell on every fold (learn/folds.py); JSON-ready metrics with spread
    and intervals."""
    started = time.perf_counter()
    held_out = folds.out_of_fold(
        x, y, evaluation.folds, cell.classifier, seed, subjects, columns, augmented
    )
    rows = held_out.tested
    # Pooled predictions give the intervals; resampling subjects when the folds kept subjects
    # apart, since cells of one patient are not independent.
    groups = None
    if evaluation.folds.grouping == "subject":
        groups = [subjects[i] for i in rows]
    y_tested, flagged = np.asarray(y)[rows], held_out.flagged[rows]
    summary = {
        key: folds.summarise(
            [m[key] for m in held_out.per_fold], y_tested, flagged, None, key, groups, seed, n_boot
        )
        for key, _ in TABLE_METRICS
    }
    aucs = [m["roc_auc"] for m in held_out.per_fold]
    summary["roc_auc"] = folds.spread(aucs) | {"low": None, "high": None}
    return {
        "feature_set": set_name(cell.feature_set),
        "backbones": list(cell.feature_set),
        "classifier": cell.classifier,
        "evaluation": cell.evaluation,
        "folds": evaluation.folds.k,
        "grouping": evaluation.folds.grouping,
        "n_test": int(rows.size),
        "n_train_augmented": 0 if augmented is None else int(len(augmented.source_rows)),
        "metrics": summary,
        "per_fold": [
            {k: m[k] for k, _ in TABLE_METRICS} | {"n": m["n"]} for m in held_out.per_fold
        ],
        "seconds": round(time.perf_counter() - started, 3),
    }


def augmented_rows(labelled: list[CatalogRow], seed: int) -> list[CatalogRow]:
    """Rows for the augmented copies: the same file and row, id "<sha256>#<transform>"."""
    return [
        replace(row, image_id=image_id)
        for row in labelled
        for image_id in augment.augmented_ids([row.image_id], seed)
    ]


def join_augmented(
    store: Location,
    image_ids: list[str],
    rejected: dict[str, str],
    recipe: FeatureRecipe,
    seed: int,
) -> folds.Augmented:
    """The augmented copies' vectors and, for each, the matrix row of its source image."""
    wanted = [i for i in augment.augmented_ids(image_ids, seed) if i not in rejected]
    joined = join_features(store, wanted, recipe)
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    sources = [row_of[augment.parse_image_id(i)[0]] for i in joined.image_ids]
    return folds.Augmented(joined.matrix, np.asarray(sources, dtype=np.int64))


# -- tables ----------------------------------------------------------------------------------
def best_cell(results: list[dict]) -> int | None:
    """Index of the best cell by the paper's ranking (accuracy, then F1); None when empty."""
    return folds.best(results, (RANKING_METRIC, "f1"))


def best_cells(results: list[dict], evaluation_names: list[str]) -> dict:
    """Per evaluation, the best cell's feature set, classifier, accuracy and F1."""
    best = {}
    for name in evaluation_names:
        cells = results_for(results, name)
        index = best_cell(cells)
        if index is not None:
            cell = cells[index]
            best[name] = {
                "feature_set": cell["feature_set"],
                "classifier": cell["classifier"],
                "accuracy": cell["metrics"]["accuracy"]["mean"],
                "f1": cell["metrics"]["f1"]["mean"],
            }
    return best


def experiment_summary(
    *,
    experiment_id: str,
    dataset: str,
    store: str,
    recipe: FeatureRecipe,
    dims: dict[str, int],
    sets: list[tuple[str, ...]],
    classifiers: list[str],
    split: str,
    evaluations: list[Evaluation],
    seed: int,
    augment: bool,
    image_ids: list[str],
    subjects: list[str | None],
    augmented: Augmented | None,
    extraction: dict,
    results: list[dict],
    started: datetime,
) -> dict:
    """What `leukoflow experiments` returns (its --json line) and saves: the grid's cells, the
    best cell per evaluation and how each evaluation was made."""
    evaluation_names = [e.name for e in evaluations]
    return {
        "experiment_id": experiment_id,
        "dataset": dataset,
        "store": store,
        "backbones": list(recipe.backbones),
        "dims": dims,
        "feature_sets": [set_name(s) for s in sets],
        "classifiers": classifiers,
        "split": split,
        "evaluations": [
            {
                "name": e.name,
                "label": e.label,
                "grouping": e.folds.grouping,
                "folds": e.folds.k,
                "note": e.folds.note,
            }
            for e in evaluations
        ],  # fmt: skip
        "weights_id": recipe.weights_id,
        "precision": recipe.precision,
        "non_clinical": recipe.non_clinical,
        "note": non_clinical_note(recipe.non_clinical),
        "image_size": recipe.image_size,
        "seed": seed,
        "augment": augment,
        "n_images": len(image_ids),
        "n_subjects": len({s for s in subjects if s}),
        "n_augmented": 0 if augmented is None else len(augmented.source_rows),
        "extraction": extraction,
        "cells": results,
        "best": best_cells(results, evaluation_names),
        "created_at": started.isoformat(),
        "code_version": code_version(),
        "package_versions": package_versions(),
    }


def table_rows(results: list[dict]) -> list[dict]:
    """Flat rows for CSV: one per cell, mean/std/low/high per metric, and the best cell marked."""
    best = best_cell(results)
    rows = []
    for i, result in enumerate(results):
        row = {
            "feature_set": result["feature_set"],
            "classifier": result["classifier"],
            "evaluation": result["evaluation"],
            "folds": result["folds"],
            "n_test": result["n_test"],
        }
        for key, _ in (*TABLE_METRICS, ("roc_auc", "")):
            for part in ("mean", "std", "low", "high"):
                row[f"{key}_{part}"] = result["metrics"][key][part]
        row["best"] = i == best
        rows.append(row)
    return rows


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_value(value: dict, with_spread: bool, with_interval: bool = True) -> str:
    """A cell's text: mean, then ± std over folds (cross-validation), then [95% interval]."""
    if value["mean"] is None:
        return "n/a"
    text = f"{value['mean']:.4f}"
    if with_spread and value["std"] is not None:
        text += f" ± {value['std']:.4f}"
    if with_interval and value["low"] is not None:
        text += f" [{value['low']:.4f}, {value['high']:.4f}]"
    return text


def display_table(
    results: list[dict], intervals: bool = True
) -> tuple[list[str], list[list[str]], int | None]:
    """(header, rows of text, best row) of one evaluation's table, in the paper's form."""
    header = ["Features", "Classifier", *(name for _, name in TABLE_METRICS)]
    rows = []
    for result in results:
        spread = result["folds"] > 1
        values = [
            format_value(result["metrics"][key], spread, intervals) for key, _ in TABLE_METRICS
        ]
        rows.append([result["feature_set"], result["classifier"], *values])
    return header, rows, best_cell(results)


def markdown_table(results: list[dict]) -> str:
    """The table as Markdown, the best cell in bold with a star."""
    header, rows, best = display_table(results)
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for i, row in enumerate(rows):
        cells = [f"**{c}**" for c in row] if i == best else row
        if i == best:
            cells[0] = f"★ {cells[0]}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison(results: list[dict]) -> list[dict]:
    """Random-split vs. subject-split numbers of the same cell, side by side."""
    by_cell = {(r["feature_set"], r["classifier"], r["evaluation"]): r for r in results}
    rows = []
    for (feature_set, classifier, evaluation), random_result in by_cell.items():
        subject_result = by_cell.get((feature_set, classifier, "subject"))
        if evaluation != "random" or subject_result is None:
            continue
        row = {"feature_set": feature_set, "classifier": classifier}
        for key in ("accuracy", "f1"):
            random_value = random_result["metrics"][key]["mean"]
            subject_value = subject_result["metrics"][key]["mean"]
            row[f"{key}_random"] = random_value
            row[f"{key}_subject"] = subject_value
            row[f"{key}_subject_std"] = subject_result["metrics"][key]["std"]
            row[f"{key}_gap"] = (
                None if None in (random_value, subject_value) else random_value - subject_value
            )
        rows.append(row)
    return rows


def comparison_markdown(rows: list[dict]) -> str:
    lines = [
        "| Features | Classifier | Accuracy, random | Accuracy, subject | Gap "
        "| F1, random | F1, subject | Gap |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [row["feature_set"], row["classifier"]]
        for key in ("accuracy", "f1"):
            cells += [
                _number(row[f"{key}_random"]),
                _number(row[f"{key}_subject"], row[f"{key}_subject_std"]),
                _number(row[f"{key}_gap"], signed=True),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float | None, std: float | None = None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.4f}" if signed else f"{value:.4f}"
    return f"{text} ± {std:.4f}" if std is not None else text


def results_for(results: list[dict], evaluation: str) -> list[dict]:
    return [r for r in results if r["evaluation"] == evaluation]


def experiments_markdown(summary: dict) -> str:
    """The whole experiments report as Markdown: one table per evaluation, then the comparison."""
    lines = []
    if summary.get("note"):
        lines += [f"> **WARNING** {summary['note']}", ""]
    lines += [
        "# leukoflow experiments",
        "",
        f"Dataset `{summary['dataset']}`, {summary['n_images']} images, backbones "
        f"{', '.join(summary['backbones'])} at {summary['image_size']} px "
        f"(weights {summary['weights_id']}), seed {summary['seed']}, augmentation "
        f"{'on (hflip, vflip, rotation; training side only)' if summary['augment'] else 'off'}. "
        f"Best cell (★): highest {RANKING_METRIC}, then F1.",
        "",
    ]
    for evaluation in summary["evaluations"]:
        results = results_for(summary["cells"], evaluation["name"])
        lines += [f"## {evaluation['label'].capitalize()}", ""]
        if evaluation["name"] == "subject":
            lines += [
                "Mean ± std over folds, then [bootstrap 95% interval]"
                + (", resampling subjects." if evaluation["grouping"] == "subject" else "."),
                "",
            ]
            if evaluation["grouping"] != "subject":
                lines += [NO_SUBJECTS_NOTE.format(why=evaluation["note"]), ""]
        else:
            lines += ["Test-set value [bootstrap 95% interval, resampling cells].", ""]
        lines += [markdown_table(results), ""]
    rows = comparison(summary["cells"])
    if rows:
        lines += ["## Random split vs. subject split", "", SPLIT_GAP_EXPLANATION, ""]
        lines += [comparison_markdown(rows), ""]
    return "\n".join(lines)
