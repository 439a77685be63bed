"""Prefect tasks of the nightly sweep: score new images, publish the night. Thin wrappers.

The shared stages (catalog, missing vectors, featurise, join) are in tasks/stage_tasks; stage
logic lives in scoring/score and features/join. scikit-learn and skops are imported inside the task
that needs them, so a sweep that finds nothing new never pays seconds of start-up for them.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from leukoflow.errors import LeukoflowError
from leukoflow.features.join import join_features
from leukoflow.recipe import FeatureRecipe
from leukoflow.scoring import score as sc
from leukoflow.store.lease import StoreLease
from leukoflow.store.records import ModelRecord
from leukoflow.store.storage import Location
from leukoflow.store.tables import CatalogRow, write_predictions


@task(name="score-new-images", cache_policy=NO_CACHE)
def score_new_images(
    store: Location,
    model_id: str,
    record: ModelRecord,
    recipe: FeatureRecipe,
    rows: list[CatalogRow],
    night: str,
    run_id: str,
    chunk_size: int,
    lease: StoreLease,
) -> dict:
    """Score `rows` chunk by chunk, each chunk one atomic predictions file (resumable)."""
    from leukoflow.learn import train
    from leukoflow.store import registry  # scikit-learn and skops: only with work to do

    logger = get_run_logger()
    model, _ = registry.load_model(store, model_id)
    sc.check_model_width(int(model.n_features_in_), recipe, model_id)
    moments, scores, missing = sc.FeatureMoments(), [], []
    for chunk in sc.chunks(rows, chunk_size):
        by_id = {row.image_id: row for row in chunk}
        joined = join_features(store, list(by_id), recipe)
        missing.extend(joined.missing)
        if not joined.image_ids:
            continue
        values, kind = train.decision_scores(model, joined.matrix)
        if kind != record.score_kind:
            raise LeukoflowError(
                f"model {model_id} gives {kind} scores but its record says "
                f"{record.score_kind}: the model file and its record disagree"
            )
        predictions = sc.prediction_rows(
            [by_id[i] for i in joined.image_ids], values, model_id, kind,
            float(record.threshold), run_id, datetime.now(UTC),
        )  # fmt: skip
        lease.ensure_held()  # never write after another sweep may have taken over
        write_predictions(store, night, run_id, predictions, lease_token=lease.token)
        moments.add(joined.matrix)
        scores.extend(np.asarray(values, dtype=np.float64).tolist())
        logger.info("scored %d/%d new images", len(scores), len(rows))
    if missing:
        logger.warning("%d image(s) lack features and were not scored", len(missing))
    return {"scored": moments.n, "missing": missing, "feature_mean": moments.mean(),
            "scores": scores}  # fmt: skip


@task(name="publish-sweep", cache_policy=NO_CACHE)
def publish_sweep(summary: dict) -> None:
    """The night at a glance in the Prefect UI: a markdown summary and the subject table."""
    description = f"{summary['date']}: model {summary['model_id']}, run {summary['run_id']}"
    create_markdown_artifact(
        markdown=sc.sweep_markdown(summary), key="nightly-sweep", description=description
    )
    # The summary's subjects are already keyed pseudonyms (flows/score): no raw id reaches here.
    create_table_artifact(
        table=sc.subject_table(summary["subjects"]), key="nightly-subjects",
        description=description,
    )  # fmt: skip
