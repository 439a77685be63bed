"""`leukoflow experiments`: the paper's grid (Tables 2-6) beside the honest evaluation, one flow.

Reads a dataset already catalogued in the store, extracts only the vectors that are missing
(augmented copies included, when asked), joins every chosen backbone once, and evaluates every
feature set x classifier x evaluation as its own Ray task.
"""

from __future__ import annotations

from prefect import flow

from leukoflow import choices
from leukoflow.engine.actors import ray_session
from leukoflow.learn import evaluate
from leukoflow.learn import experiments as ex
from leukoflow.recipe import Compute, FeatureRecipe
from leukoflow.redact import install_secret_masking
from leukoflow.store import records
from leukoflow.store.storage import open_location
from leukoflow.store.tables import CatalogRow
from leukoflow.tasks.experiment_tasks import evaluate_grid, save_experiment, stored_catalog
from leukoflow.tasks.stage_tasks import catalog_images, prepare_features
from leukoflow.vocabulary import Outcome, RunKind


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
    seed: int = choices.DEFAULT_SEED,
    n_boot: int = choices.DEFAULT_BOOTSTRAP,
    images: str | list[str] | None = None,
) -> dict:
    """Every backbone of `recipe`, the pairs and the trio x every classifier, per evaluation.

    `images`: folders or manifests to catalogue as `dataset` first; None: the dataset's stored
    catalog (from an earlier `run`, `backfill` or `validate`).
    """
    install_secret_masking()
    # Validate everything a user can get wrong before any work starts.
    backbones = list(recipe.backbones)
    classifiers = ex.parse_classifiers(classifiers or list(choices.PAPER_CLASSIFIERS))
    evaluation_names = ex.check_split_choice(split)
    sets = ex.feature_sets(backbones, trio)
    cells = ex.grid(sets, classifiers, evaluation_names)
    recipe.weights_ids  # noqa: B018 - checks the weights files (MD5) before any work
    root = open_location(store)
    recorder = records.RunRecorder(root, RunKind.EXPERIMENTS, dataset)
    experiment_id, started = recorder.run_id, recorder.started

    if images is not None:
        catalog_images(images, root, dataset)
    rows = stored_catalog(root, dataset)
    labelled = _labelled(rows)
    # Too few images or subjects for the folds: say so before hours of extraction.
    ex.plan_evaluations(*evaluate.targets(labelled), evaluation_names, folds, seed)
    copies = ex.augmented_rows(labelled, seed) if augment else []

    with ray_session(compute.ray_address):  # one session for extraction and the grid
        prepared = prepare_features(
            root, dataset, recipe, compute, rows=rows, select=_labelled, also=copies,
            join_rows=_labelled,
        )  # fmt: skip
        joined, features = prepared.joined, prepared.extraction
        by_id = {r.image_id: r for r in prepared.rows}
        y, subjects = evaluate.targets([by_id[i] for i in joined.image_ids])
        evaluations = ex.plan_evaluations(y, subjects, evaluation_names, folds, seed)
        augmented = None
        if augment:
            augmented = ex.join_augmented(root, joined.image_ids, features.rejected, recipe, seed)
        results = evaluate_grid(
            joined.matrix, y, subjects, augmented, backbones, joined.dims, cells, evaluations,
            seed, n_boot, compute.ray_address,
        )  # fmt: skip

    summary = ex.experiment_summary(
        experiment_id=experiment_id, dataset=dataset, store=root.uri, recipe=recipe,
        dims=joined.dims, sets=sets, classifiers=classifiers, split=split,
        evaluations=evaluations, seed=seed, augment=augment, image_ids=joined.image_ids,
        subjects=subjects, augmented=augmented, extraction=features.to_dict(), results=results,
        started=started,
    )  # fmt: skip
    summary["paths"] = save_experiment(root, experiment_id, summary)
    recorder.record(
        Outcome.COMPLETED, **records.RunRecorder.extraction_columns(prepared.counts, features),
        scored=len(joined.image_ids), weights_id=recipe.weights_id,
        details={"best": summary["best"], "paths": summary["paths"],
                 "feature_recipe": recipe.to_record()},
    )  # fmt: skip
    return summary


def _labelled(rows: list[CatalogRow]) -> list[CatalogRow]:
    return evaluate.labelled_rows(rows, "experiment on")
