"""`leukoflow validate`: catalog -> featurise -> join -> subject-grouped cross-validation.

The fixed protocol of docs/results.md, as one command: the paper's linear SVM (or another
classifier by name) on one feature recipe, k folds grouped by subject, cell- and patient-level
metrics with intervals that resample whole subjects (learn/validate.py, learn/patient.py).
Vectors already in the store are reused, so several feature sets of the same images cost one
extraction per backbone. Several folders or manifests can be validated as one pool.
"""

from __future__ import annotations

from prefect import flow

from leukoflow import choices
from leukoflow.learn import evaluate
from leukoflow.learn.validate import validation_summary
from leukoflow.recipe import Compute, FeatureRecipe
from leukoflow.redact import install_secret_masking
from leukoflow.store import records
from leukoflow.store.pseudonym import subject_salt
from leukoflow.store.storage import open_location
from leukoflow.store.tables import CatalogRow
from leukoflow.tasks.stage_tasks import prepare_features
from leukoflow.tasks.validate_tasks import cross_validate
from leukoflow.vocabulary import Outcome, RunKind


@flow(name="leukoflow-validate", log_prints=False)
def run_validation(
    images: str | list[str],
    store: str,
    recipe: FeatureRecipe = FeatureRecipe(),  # noqa: B008 - frozen, validated once at import
    compute: Compute = Compute(),  # noqa: B008
    dataset: str = "default",
    classifier: str = choices.DEFAULT_CLASSIFIER,
    folds: int = choices.DEFAULT_FOLDS,
    seed: int = choices.DEFAULT_SEED,
    n_boot: int = choices.DEFAULT_BOOTSTRAP,
    labels: dict[str, str] | None = None,
) -> dict:
    """Cross-validated cell- and patient-level metrics of one feature recipe, subject-grouped.

    Every image found is accounted for in `counts`: catalogued (ok, quarantined, duplicate),
    unlabelled, set aside by the extractor, or without a vector at the join.
    """
    install_secret_masking()
    root = open_location(store)
    recorder = records.RunRecorder(root, RunKind.VALIDATE, dataset)
    prepared = prepare_features(
        root, dataset, recipe, compute, images=images, labels=labels, select=_labelled,
        join_rows=_labelled,
    )  # fmt: skip
    catalog, joined, features = prepared.catalog, prepared.joined, prepared.extraction
    by_id = {row.image_id: row for row in prepared.rows}
    y, subjects = evaluate.targets([by_id[i] for i in joined.image_ids])
    result = cross_validate(joined.matrix, y, subjects, classifier, folds, seed, n_boot)
    summary = validation_summary(
        result, salt=subject_salt(root), dataset=dataset, images=images, store=root.uri,
        recipe=recipe, catalog_counts=catalog.counts, n_labelled=len(_labelled(catalog.rows)),
        extraction=features, joined=joined,
    )  # fmt: skip
    recorder.record(
        Outcome.COMPLETED, **records.RunRecorder.extraction_columns(prepared.counts, features),
        weights_id=recipe.weights_id,
        details={"feature_recipe": recipe.to_record(), "classifier": classifier,
                 "metrics": {k: m["mean"] for k, m in result["metrics"].items()}},
    )  # fmt: skip
    summary["run_id"] = recorder.run_id
    return summary


def _labelled(rows: list[CatalogRow]) -> list[CatalogRow]:
    return evaluate.labelled_rows(rows, "validate")
