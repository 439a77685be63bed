"""`leukoflow backfill`: catalogue and featurise a whole collection, resumably, with progress.

Wiring only. Vectors are keyed by image content, backbone, weights and image size, and written
batch by batch, so a re-run (after a crash, or with one more backbone) computes only what the
store lacks; the catalog reuses the rows of files unchanged since the last pass.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from prefect import flow

from leukoflow.tasks import backbones as bb
from leukoflow.tasks import score as sc
from leukoflow.tasks.score_tasks import Compute, catalog_collection, featurise, missing_vectors
from leukoflow.tasks.storage import open_location
from leukoflow.tasks.tables import STATUS_DUPLICATE, STATUS_OK, STATUS_QUARANTINED, write_run


@flow(name="leukoflow-backfill", log_prints=False)
def backfill(
    images: str,
    store: str,
    dataset: str,
    backbones: list[str] | None = None,
    weights: str = "imagenet",
    weights_dir: str | None = None,
    image_size: int = 224,
    seed: int = 0,
    labels: dict[str, str] | None = None,
    ray_address: str | None = None,
    batch_size: int = 32,
    progress_bar: bool = True,
    gpu_share: float | None = None,
    actor_cpus: float | None = None,
) -> dict:
    """Catalog IMAGES as `dataset` and extract every missing vector; returns the summary."""
    started = datetime.now(UTC)
    run_id = sc.new_run_id(started)
    names = bb.parse_backbones(backbones or list(bb.DEFAULT_BACKBONES))
    bb.check_image_size(names, image_size)
    choice = bb.parse_weights(weights, weights_dir, seed)
    weight_ids = {name: bb.weights_id(bb.BACKBONES[name], choice) for name in names}
    root = open_location(store)

    catalog = catalog_collection(images, root, dataset, labels)
    ok = [row for row in catalog.rows if row["status"] == STATUS_OK]
    ids = [row["image_id"] for row in ok]
    todo = missing_vectors(root, ids, names, weight_ids, image_size)
    extraction = featurise(
        root, {row["image_id"]: row["uri"] for row in ok}, todo, choice, weight_ids, image_size,
        Compute(ray_address, batch_size, gpu_share, actor_cpus), total_images=len(ok),
        progress_bar=progress_bar,
    )  # fmt: skip
    rejected = extraction["rejected"]
    needing = {image_id for missing in todo.values() for image_id in missing}
    finished = datetime.now(UTC)
    counts = {
        "found": len(catalog.rows),
        "new_files": catalog.new_files,
        "ok": len(ok) - len(rejected),
        "quarantined": sum(r["status"] == STATUS_QUARANTINED for r in catalog.rows) + len(rejected),
        "duplicate": sum(r["status"] == STATUS_DUPLICATE for r in catalog.rows),
        "needing_vectors": len(needing),
        "already_featurised": len(ok) - len(needing),
        "computed": max(extraction["computed"].values(), default=0),
    }
    summary = {
        "run_id": run_id,
        "kind": "backfill",
        "outcome": "completed",
        "store": root.uri,
        "dataset": dataset,
        "backbones": names,
        "weights_id": ",".join(weight_ids[n] for n in names),
        "image_size": image_size,
        "non_clinical": bb.uses_random_weights(names, choice),
        "counts": counts,
        "extraction": extraction,
        "seconds": round((finished - started).total_seconds(), 2),
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
    }
    write_run(
        root,
        {
            "run_id": run_id,
            "kind": "backfill",
            "dataset": dataset,
            "started_at": started,
            "finished_at": finished,
            "outcome": "completed",
            "images_found": counts["found"],
            "images_new": counts["needing_vectors"],
            # ok images holding vectors, as for `run`: found = featurised + quarantined + dup.
            "images_featurised": counts["ok"],
            "images_quarantined": counts["quarantined"],
            "images_duplicate": counts["duplicate"],
            "images_scored": 0,
            "images_skipped": counts["already_featurised"],
            "images_per_second": extraction["images_per_second"],
            "model_id": None,
            "weights_id": summary["weights_id"],
            "details": json.dumps(
                {"extraction": extraction, "backbones": names, "image_size": image_size},
                default=str,
            ),
        },
    )
    return summary
