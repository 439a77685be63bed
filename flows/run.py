"""`leukoflow run`: catalog -> featurise -> join -> fit -> report -> promote, as one flow.

Wiring only: the stages are tasks/stage_tasks (shared by every flow) and tasks/train_tasks; the
records come from store/records.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from leukoflow import choices
from leukoflow.learn import calibration, evaluate, train
from leukoflow.learn.fit import new_model_record, plan_split, trainable_rows
from leukoflow.recipe import Compute, FeatureRecipe
from leukoflow.redact import install_secret_masking
from leukoflow.store import records, registry
from leukoflow.store.pseudonym import subject_key, subject_salt
from leukoflow.store.storage import open_location
from leukoflow.tasks.explain_tasks import explain_examples
from leukoflow.tasks.stage_tasks import catalog_images, prepare_features
from leukoflow.tasks.train_tasks import fit_model, promote_model, save_model
from leukoflow.vocabulary import Outcome, RunKind


@flow(name="leukoflow-run", log_prints=False)
def run_pipeline(
    images: str | list[str],
    store: str,
    recipe: FeatureRecipe = FeatureRecipe(),
    compute: Compute = Compute(),
    dataset: str = "default",
    classifier: str = choices.DEFAULT_CLASSIFIER,
    split: str | None = None,
    seed: int = choices.DEFAULT_SEED,
    labels: dict[str, str] | None = None,
    target_sensitivity: float = choices.DEFAULT_TARGET_SENSITIVITY,
    examples_per_kind: int = choices.REPORT_EXAMPLES_PER_KIND,
    promote: bool = True,
    force: bool = False,
) -> dict:
    """The whole pipeline on one collection of images; returns the run's summary.

    `split` None: subject-grouped when every image carries a subject id, else the paper's random
    split. The report shows up to `examples_per_kind` true/false positives and false negatives of
    the held-out cells with their activation maps (0: none). `promote`: make the model current
    (a non-clinical model never replaces a clinical one unless `force`).
    """
    install_secret_masking()
    # Validate everything a user can get wrong before any work starts.
    train.make_classifier(classifier)
    calibration.check_target_sensitivity(target_sensitivity)
    recipe.weights_ids  # noqa: B018 - checks the weights files (MD5) now, not after cataloguing
    root = open_location(store)
    recorder = records.RunRecorder(root, RunKind.RUN, dataset)
    # Decided now, shown at the end: a non-clinical model never silently replaces a clinical one.
    kept_current = registry.current_model_kept(root, recipe.non_clinical, force)
    catalog = catalog_images(images, root, dataset, labels)
    # One class, or too few subjects for the split or its calibration folds: say so before
    # hours of extraction.
    split = plan_split(catalog.rows, split, seed)
    from leukoflow.engine.actors import backbone_pool  # Ray: started only if the pool is used

    # One set of backbone actors for extraction and the report's explanations: each network is
    # built once, in its actor, never in the driver.
    with backbone_pool(recipe, compute) as pool:
        prepared = prepare_features(
            root, dataset, recipe, compute, rows=catalog.rows, pool=pool,
            join_rows=trainable_rows,
        )  # fmt: skip
        joined, extraction = prepared.joined, prepared.extraction
        by_id = {r.image_id: r for r in prepared.rows}
        y, raw_subjects = evaluate.targets([by_id[i] for i in joined.image_ids])
        # Subjects only group cells (splits, folds, patients): their keyed pseudonyms group the
        # same, and nothing fitted, reported or printed can then carry a raw subject id.
        salt = subject_salt(root)
        subjects = [subject_key(subject, salt) for subject in raw_subjects]
        fitted = fit_model(joined.matrix, y, subjects, classifier, split, seed, target_sensitivity)

        record = new_model_record(
            image_ids=joined.image_ids, x=joined.matrix, fitted=fitted, recipe=recipe,
            dataset=dataset, classifier=classifier, split=split, seed=seed,
            target_sensitivity=target_sensitivity, created_at=recorder.started,
        )  # fmt: skip
        model_id, test_ids = record.model_id, record.test_image_ids
        counts = prepared.counts
        summary = records.run_summary(
            run_id=recorder.run_id, record=record, store=root.uri, fitted=fitted, counts=counts,
            extraction=extraction.to_dict(), trained_and_tested=len(joined.image_ids),
            ignored=catalog.counts.get("ignored", 0),
        )  # fmt: skip
        examples = []
        if examples_per_kind > 0:
            examples = explain_examples(
                fitted.model, record, test_ids, fitted.y_test, fitted.test_probabilities,
                {i: by_id[i].uri for i in test_ids},
                {i: joined.matrix[k] for k, i in zip(fitted.split.test, test_ids, strict=True)},
                recipe.weights_dir, examples_per_kind, maps=pool,
                subject_keys=dict(zip(joined.image_ids, subjects, strict=True)),
            )  # fmt: skip
    # The report lists the images set aside (by content id and reason); the summary does not.
    report_summary = {**summary, "quarantined": records.quarantine_list(prepared.rows)}
    summary["paths"] = save_model(root, model_id, fitted, record, report_summary, examples)
    summary["promoted"] = False
    if promote and kept_current:
        summary["not_promoted"] = records.not_promoted_note(kept_current)
        get_run_logger().warning(summary["not_promoted"])
    elif promote:
        summary["promoted"] = bool(promote_model(root, model_id, force))
    recorder.record(
        Outcome.COMPLETED, **records.RunRecorder.extraction_columns(counts, extraction),
        scored=len(test_ids), model_id=model_id, weights_id=recipe.weights_id,
        details={"metrics": fitted.metrics, "operating_point": fitted.operating_point,
                 "paths": summary["paths"], "promoted": summary["promoted"],
                 "feature_recipe": recipe.to_record()},
    )  # fmt: skip
    return summary
