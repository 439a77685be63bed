"""`leukoflow backfill`: catalogue and featurise a whole collection, resumably, with progress.

Wiring only. Vectors are keyed by image content, backbone, weights and image size, and written
batch by batch, so a re-run (after a crash, or with one more backbone) computes only what the
store lacks; the catalog reuses the rows of files unchanged since the last pass.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow

from leukoflow.redact import install_secret_masking
from leukoflow.tasks import records
from leukoflow.tasks import score as sc
from leukoflow.tasks.join import featurised_images
from leukoflow.tasks.recipe import Compute, FeatureRecipe
from leukoflow.tasks.stage_tasks import (
    catalog_images,
    featurise,
    missing_vectors,
    quarantine_rejects,
)
from leukoflow.tasks.storage import open_location
from leukoflow.tasks.tables import write_run
from leukoflow.vocabulary import ImageStatus


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
    started = datetime.now(UTC)
    run_id = sc.new_run_id(started)
    recipe.weights_ids  # noqa: B018 - checks the weights files (MD5) before any work
    root = open_location(store)

    catalog = catalog_images(images, root, dataset, labels)
    ok = [row for row in catalog.rows if row["status"] == ImageStatus.OK]
    ids = [row["image_id"] for row in ok]
    todo = missing_vectors(root, ids, recipe)
    extraction = featurise(
        root, {row["image_id"]: row["uri"] for row in ok}, todo, recipe, compute,
        total_images=len(ok), progress_bar=progress_bar,
    )  # fmt: skip
    needing = {image_id for missing in todo.values() for image_id in missing}
    rows = quarantine_rejects(root, dataset, catalog.rows, extraction["rejected"])
    counts = records.account(rows, extraction["rejected"], featurised_images(root, recipe))
    finished = datetime.now(UTC)
    summary = {
        "run_id": run_id,
        "kind": "backfill",
        "outcome": "completed",
        "store": root.uri,
        "dataset": dataset,
        "backbones": list(recipe.backbones),
        "weights_id": recipe.weights_id,
        "image_size": recipe.image_size,
        "precision": recipe.precision,
        "non_clinical": recipe.non_clinical,
        "counts": {
            **records.accounting_dict(counts, "featurised"),
            "new_files": catalog.new_files,
            "ignored": catalog.counts.get("ignored", 0),
            "ok": counts.done,  # ok images holding every vector (measured), as before
            "needing_vectors": len(needing),
            "already_featurised": len(ok) - len(needing),
            "computed": max(extraction["computed"].values(), default=0),
        },
        "extraction": extraction,
        "seconds": round((finished - started).total_seconds(), 2),
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
    }
    write_run(
        root,
        records.run_row(
            run_id, "backfill", dataset, started, finished, "completed",
            found=counts.found, new=len(needing), featurised=counts.done,
            quarantined=counts.quarantined, duplicate=counts.duplicate, missing=counts.missing,
            skipped=len(ok) - len(needing), images_per_second=extraction["images_per_second"],
            weights_id=recipe.weights_id,
            details={"extraction": extraction, "feature_recipe": recipe.to_record(),
                     "counts": summary["counts"]},
        ),
    )  # fmt: skip
    return summary
