"""`leukoflow experiments`: the paper's grid (Tables 2-6) beside the honest evaluation, one flow.

Reads a dataset already catalogued in the store, extracts only the vectors that are missing
(augmented copies included, when asked), joins every chosen backbone once, and evaluates every
feature set x classifier x evaluation as its own Ray task.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import numpy as np
from prefect import flow

from leukoflow.redact import install_secret_masking
from leukoflow.tasks import augment as aug
from leukoflow.tasks import choices, evaluate, folds, records, registry
from leukoflow.tasks import experiments as ex
from leukoflow.tasks.actors import ray_session
from leukoflow.tasks.experiment_tasks import evaluate_grid, read_catalog_rows, save_experiment
from leukoflow.tasks.join import featurised_images
from leukoflow.tasks.recipe import Compute, FeatureRecipe
from leukoflow.tasks.stage_tasks import (
    catalog_images,
    featurise,
    join,
    missing_vectors,
    quarantine_rejects,
)
from leukoflow.tasks.storage import Location, open_location
from leukoflow.tasks.tables import write_run
from leukoflow.vocabulary import ImageStatus


@flow(name="leukoflow-experiments", log_prints=False)
def run_experiments(
    store: str,
    recipe: FeatureRecipe = FeatureRecipe(backbones=choices.PAPER_BACKBONES),
    compute: Compute = Compute(),
    dataset: str = "default",
    classifiers: list[str] | None = None,
    split: str = "both",
    trio: list[str] | None = None,
    folds: int = choices.DEFAULT_FOLDS,
    augment: bool = False,
    seed: int = 0,
    n_boot: int = choices.DEFAULT_BOOTSTRAP,
    images: str | list[str] | None = None,
) -> dict:
    """Every backbone of `recipe`, the pairs and the trio x every classifier, per evaluation.

    `images`: folders or manifests to catalogue as `dataset` first; None: the dataset's stored
    catalog (from an earlier `run`, `backfill` or `validate`).
    """
    install_secret_masking()
    started = datetime.now(UTC)
    experiment_id = f"{started.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    # Validate everything a user can get wrong before any work starts.
    backbones = list(recipe.backbones)
    classifiers = ex.parse_classifiers(classifiers or list(choices.PAPER_CLASSIFIERS))
    evaluation_names = ex.check_split_choice(split)
    sets = ex.feature_sets(backbones, trio)
    cells = ex.grid(sets, classifiers, evaluation_names)
    recipe.weights_ids  # noqa: B018 - checks the weights files (MD5) before any work
    root = open_location(store)

    if images is not None:
        catalog_images(images, root, dataset)
    rows = read_catalog_rows(root, dataset)
    labelled = evaluate.labelled_rows(rows, "experiment on")
    # Too few images or subjects for the folds: say so before hours of extraction.
    ex.plan_evaluations(*_targets(labelled), evaluation_names, folds, seed)
    to_featurise = labelled + (_augmented_rows(labelled, seed) if augment else [])

    uris = {r["image_id"]: r["uri"] for r in to_featurise}
    with ray_session(compute.ray_address):  # one session for extraction and the grid
        todo = missing_vectors(root, list(uris), recipe)
        features = featurise(root, uris, todo, recipe, compute)
        usable = [r for r in labelled if r["image_id"] not in features["rejected"]]
        joined = join(root, [r["image_id"] for r in usable], recipe)
        by_id = {r["image_id"]: r for r in usable}
        y, subjects = _targets([by_id[i] for i in joined.image_ids])
        evaluations = ex.plan_evaluations(y, subjects, evaluation_names, folds, seed)
        augmented = None
        if augment:
            augmented = _join_augmented(root, joined.image_ids, features["rejected"], recipe, seed)
        results = evaluate_grid(
            joined.matrix, y, subjects, augmented, backbones, joined.dims, cells, evaluations,
            seed, n_boot, compute.ray_address,
        )  # fmt: skip

    non_clinical = recipe.non_clinical
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
        "weights_id": recipe.weights_id,
        "precision": recipe.precision,
        "non_clinical": non_clinical,
        "note": records.non_clinical_note(non_clinical),
        "image_size": recipe.image_size,
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
        "package_versions": records.package_versions(),
    }
    summary["paths"] = save_experiment(root, experiment_id, summary)
    rows = quarantine_rejects(root, dataset, rows, features["rejected"])
    counts = records.account(rows, features["rejected"], featurised_images(root, recipe))
    write_run(
        root,
        records.run_row(
            experiment_id, "experiments", dataset, started, datetime.now(UTC), "completed",
            found=counts.found, new=max(features["computed"].values(), default=0),
            featurised=counts.done, quarantined=counts.quarantined, duplicate=counts.duplicate,
            missing=counts.missing, scored=len(joined.image_ids),
            images_per_second=features["images_per_second"], weights_id=recipe.weights_id,
            details={"best": summary["best"], "paths": summary["paths"],
                     "feature_recipe": recipe.to_record()},
        ),
    )  # fmt: skip
    return summary


def _targets(rows: list[dict]) -> tuple[np.ndarray, list[str | None]]:
    return evaluate.labels_to_int([r["label"] for r in rows]), [r["subject_id"] for r in rows]


def _augmented_rows(labelled: list[dict], seed: int) -> list[dict]:
    """Catalog-like rows for the augmented copies: same file, id "<sha256>#<transform>"."""
    return [
        {"image_id": image_id, "uri": row["uri"], "status": ImageStatus.OK}
        for row in labelled
        for image_id in aug.augmented_ids([row["image_id"]], seed)
    ]


def _join_augmented(
    root: Location,
    image_ids: list[str],
    rejected: dict[str, str],
    recipe: FeatureRecipe,
    seed: int,
) -> folds.Augmented:
    """The augmented copies' vectors and, for each, the matrix row of its source image."""
    wanted = [i for i in aug.augmented_ids(image_ids, seed) if i not in rejected]
    joined = join(root, wanted, recipe)
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    sources = [row_of[aug.parse_image_id(i)[0]] for i in joined.image_ids]
    return folds.Augmented(joined.matrix, np.asarray(sources, dtype=np.int64))


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
