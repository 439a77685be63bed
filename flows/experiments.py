"""`leukoflow experiments`: the paper's grid (Tables 2-6) beside the honest evaluation, one flow.

Reads a dataset already catalogued in the store, extracts only the vectors that are missing
(augmented copies included, when asked), joins every chosen backbone once, and evaluates every
feature set x classifier x evaluation as its own Ray task.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import numpy as np
from prefect import flow

from leukoflow.errors import LeukoflowError
from leukoflow.flows.run import NON_CLINICAL_NOTE, package_versions
from leukoflow.tasks import augment as aug
from leukoflow.tasks import backbones as bb
from leukoflow.tasks import evaluate, registry
from leukoflow.tasks import experiments as ex
from leukoflow.tasks.actors import ray_session
from leukoflow.tasks.experiment_tasks import evaluate_grid, read_catalog_rows, save_experiment
from leukoflow.tasks.prefect_tasks import extract, join
from leukoflow.tasks.storage import Location, open_location
from leukoflow.tasks.tables import STATUS_DUPLICATE, STATUS_OK, STATUS_QUARANTINED, write_run


@flow(name="leukoflow-experiments", log_prints=False)
def run_experiments(
    store: str,
    dataset: str = "default",
    backbones: list[str] | None = None,
    classifiers: list[str] | None = None,
    split: str = "both",
    trio: list[str] | None = None,
    folds: int = ex.DEFAULT_FOLDS,
    augment: bool = False,
    weights: str = "imagenet",
    weights_dir: str | None = None,
    image_size: int = 224,
    seed: int = 0,
    ray_address: str | None = None,
    batch_size: int = 32,
    n_boot: int = ex.DEFAULT_BOOTSTRAP,
) -> dict:
    """Every backbone, pair and trio x every classifier, per evaluation; returns the summary."""
    started = datetime.now(UTC)
    experiment_id = f"{started.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    # Validate everything a user can get wrong before any work starts.
    backbones = bb.parse_backbones(backbones or list(ex.PAPER_BACKBONES))
    bb.check_image_size(backbones, image_size)
    classifiers = ex.parse_classifiers(classifiers or list(ex.PAPER_CLASSIFIERS))
    evaluation_names = ex.check_split_choice(split)
    sets = ex.feature_sets(backbones, trio)
    cells = ex.grid(sets, classifiers, evaluation_names)
    choice = bb.parse_weights(weights, weights_dir, seed)
    weight_ids = {name: bb.weights_id(bb.BACKBONES[name], choice) for name in backbones}
    root = open_location(store)

    rows = read_catalog_rows(root, dataset)
    labelled = _labelled(rows)
    # Too few images or subjects for the folds: say so before hours of extraction.
    ex.plan_evaluations(*_targets(labelled), evaluation_names, folds, seed)
    to_featurise = labelled + (_augmented_rows(labelled, seed) if augment else [])

    with ray_session(ray_address):  # one session for extraction and the grid
        features = extract(
            root, to_featurise, backbones, choice, weight_ids, image_size, batch_size, ray_address
        )
        usable = [r for r in labelled if r["image_id"] not in features["rejected"]]
        joined = join(root, [r["image_id"] for r in usable], backbones, weight_ids, image_size)
        by_id = {r["image_id"]: r for r in usable}
        y, subjects = _targets([by_id[i] for i in joined.image_ids])
        evaluations = ex.plan_evaluations(y, subjects, evaluation_names, folds, seed)
        augmented = None
        if augment:
            augmented = _join_augmented(
                root,
                joined.image_ids,
                features["rejected"],
                backbones,
                weight_ids,
                image_size,
                seed,
            )
        results = evaluate_grid(
            joined.matrix, y, subjects, augmented, backbones, joined.dims, cells, evaluations,
            seed, n_boot, ray_address,
        )  # fmt: skip

    non_clinical = bb.uses_random_weights(backbones, choice)
    summary = {
        "experiment_id": experiment_id,
        "dataset": dataset,
        "store": root.uri,
        "backbones": backbones,
        "dims": joined.dims,
        "feature_sets": [ex.set_name(s) for s in sets],
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
        "weights_id": ",".join(weight_ids[n] for n in backbones),
        "non_clinical": non_clinical,
        "note": NON_CLINICAL_NOTE if non_clinical else None,
        "image_size": image_size,
        "seed": seed,
        "augment": augment,
        "n_images": len(joined.image_ids),
        "n_subjects": len({s for s in subjects if s}),
        "n_augmented": 0 if augmented is None else len(augmented.source_rows),
        "extraction": features,
        "cells": results,
        "best": _best(results, evaluation_names),
        "created_at": started.isoformat(),
        "code_version": registry.code_version(),
        "package_versions": package_versions(),
    }
    summary["paths"] = save_experiment(root, experiment_id, summary)
    write_run(
        root,
        {
            "run_id": experiment_id,
            "kind": "experiments",
            "dataset": dataset,
            "started_at": started,
            "finished_at": datetime.now(UTC),
            "outcome": "completed",
            "images_found": len(rows),
            "images_new": max(features["computed"].values(), default=0),
            "images_featurised": len(joined.image_ids),
            "images_quarantined": sum(r["status"] == STATUS_QUARANTINED for r in rows)
            + len(features["rejected"]),
            "images_duplicate": sum(r["status"] == STATUS_DUPLICATE for r in rows),
            "images_scored": len(joined.image_ids),
            "images_skipped": 0,
            "images_per_second": features["images_per_second"],
            "model_id": None,
            "weights_id": summary["weights_id"],
            "details": json.dumps({"best": summary["best"], "paths": summary["paths"]}),
        },
    )
    return summary


def _labelled(rows: list[dict]) -> list[dict]:
    labels = (evaluate.POSITIVE_LABEL, evaluate.NEGATIVE_LABEL)
    labelled = [r for r in rows if r["status"] == STATUS_OK and r["label"] in labels]
    if not labelled:
        raise LeukoflowError("no labelled images in this dataset's catalog to experiment on")
    return labelled


def _targets(rows: list[dict]) -> tuple[np.ndarray, list[str | None]]:
    return evaluate.labels_to_int([r["label"] for r in rows]), [r["subject_id"] for r in rows]


def _augmented_rows(labelled: list[dict], seed: int) -> list[dict]:
    """Catalog-like rows for the augmented copies: same file, id "<sha256>#<transform>"."""
    return [
        {"image_id": image_id, "uri": row["uri"], "status": STATUS_OK}
        for row in labelled
        for image_id in aug.augmented_ids([row["image_id"]], seed)
    ]


def _join_augmented(
    root: Location,
    image_ids: list[str],
    rejected: dict[str, str],
    backbones: list[str],
    weight_ids: dict[str, str],
    image_size: int,
    seed: int,
) -> ex.Augmented:
    """The augmented copies' vectors and, for each, the matrix row of its source image."""
    wanted = [i for i in aug.augmented_ids(image_ids, seed) if i not in rejected]
    joined = join(root, wanted, backbones, weight_ids, image_size)
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    sources = [row_of[aug.parse_image_id(i)[0]] for i in joined.image_ids]
    return ex.Augmented(joined.matrix, np.asarray(sources, dtype=np.int64))


def _best(results: list[dict], evaluation_names: list[str]) -> dict:
    best = {}
    for name in evaluation_names:
        cells = ex.results_for(results, name)
        index = ex.best_cell(cells)
        if index is not None:
            cell = cells[index]
            best[name] = {
                "feature_set": cell["feature_set"],
                "classifier": cell["classifier"],
                "accuracy": cell["metrics"]["accuracy"]["mean"],
                "f1": cell["metrics"]["f1"]["mean"],
            }
    return best
