"""`leukoflow backfill`: catalogue and featurise a whole collection, resumably, with progress.

Wiring only. Vectors are keyed by image content, backbone, weights and image size, and written
batch by batch, so a re-run (after a crash, or with one more backbone) computes only what the
store lacks; the catalog reuses the rows of files unchanged since the last pass.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow

from leukoflow.recipe import Compute, FeatureRecipe
from leukoflow.redact import install_secret_masking
from leukoflow.store import records
from leukoflow.store.storage import open_location
from leukoflow.tasks.stage_tasks import ok_rows, prepare_features
from leukoflow.vocabulary import Outcome, RunKind


@flow(name="leukoflow-backfill", log_prints=False)
def backfill(
    images: str | list[str],
    store: str,
    dataset: str,
    recipe: FeatureRecipe = FeatureRecipe(),
    compute: Compute = Compute(),
    labels: dict[str, str] | None = None,
    progress_bar: bool = True,
) -> dict:
    """Catalog IMAGES as `dataset` and extract every missing vector; returns the summary."""
    install_secret_masking()
    recipe.weights_ids  # noqa: B018 - checks the weights files (MD5) before any work
    root = open_location(store)
    recorder = records.RunRecorder(root, RunKind.BACKFILL, dataset)
    prepared = prepare_features(
        root, dataset, recipe, compute, images=images, labels=labels, progress_bar=progress_bar
    )
    catalog, counts, extraction = prepared.catalog, prepared.counts, prepared.extraction
    ok = ok_rows(catalog.rows)
    needing = {image_id for missing in prepared.todo.values() for image_id in missing}
    summary = records.backfill_summary(
        run_id=recorder.run_id, store=root.uri, dataset=dataset, recipe=recipe, counts=counts,
        extraction=extraction.to_dict(), computed=extraction.images_done,
        new_files=catalog.new_files, ignored=catalog.counts.get("ignored", 0), n_ok=len(ok),
        needing=len(needing), started=recorder.started, finished=datetime.now(UTC),
    )  # fmt: skip
    columns = records.RunRecorder.extraction_columns(counts, extraction)
    recorder.record(
        Outcome.COMPLETED, **{**columns, "new": len(needing)}, skipped=len(ok) - len(needing),
        weights_id=recipe.weights_id,
        details={"extraction": summary["extraction"], "feature_recipe": recipe.to_record(),
                 "counts": summary["counts"]},
    )  # fmt: skip
    return summary
