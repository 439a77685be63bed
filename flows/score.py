"""`leukoflow score`: the nightly sweep. Score what is new in an inbox with one model.

Wiring only: catalog the inbox (reusing rows of unchanged files), skip images this model already
scored, extract only missing vectors, score in chunks of atomic Parquet files, then summarise the
night per subject, measure drift and publish Prefect artifacts. A lease in the store makes sweeps
exclusive (see docs/nightly.md).
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger

from leukoflow.tasks import backbones as bb
from leukoflow.tasks import registry
from leukoflow.tasks import score as sc
from leukoflow.tasks.explain_tasks import explain_flagged_cells
from leukoflow.tasks.lease import DEFAULT_TTL_S, SWEEP_LEASE, LeaseBusy, StoreLease, lease_location
from leukoflow.tasks.score_tasks import (
    Compute,
    catalog_collection,
    featurise,
    missing_vectors,
    publish_sweep,
    score_new_images,
)
from leukoflow.tasks.storage import Location, open_location
from leukoflow.tasks.tables import read_predictions, scored_image_ids, write_run


@flow(name="leukoflow-score", log_prints=False)
def score_inbox(
    inbox: str,
    store: str,
    model: str = "current",
    date: str | None = None,
    dataset: str = "inbox",
    weights_dir: str | None = None,
    ray_address: str | None = None,
    batch_size: int = 32,
    chunk_size: int = 256,
    min_flagged_cells: int = 5,
    min_flagged_fraction: float = 0.5,
    feature_drift_threshold: float = sc.DriftThresholds.feature_shift,
    score_drift_threshold: float = sc.DriftThresholds.score_ks,
    drift_min_cells: int = sc.DriftThresholds.min_cells,
    expected_recipe: dict | None = None,
    wait_s: float = 0.0,
    lease_ttl_s: float = DEFAULT_TTL_S,
    explain_flagged: bool = False,
    explain_limit: int = 100,
    gpu_share: float | None = None,
    actor_cpus: float | None = None,
) -> dict:
    """One sweep of INBOX; its summary (outcome "busy": another sweep holds the lease).

    explain_flagged: also write activation-map PNGs of the night's flagged cells (at most
    `explain_limit` per sweep) under explanations/date=<night>/ (docs/explanations.md).
    """
    logger = get_run_logger()
    started = datetime.now(UTC)
    run_id = sc.new_run_id(started)
    night = sc.night_of(date, started)
    rule = sc.SubjectRule(min_flagged_cells, min_flagged_fraction)
    thresholds = sc.DriftThresholds(feature_drift_threshold, score_drift_threshold, drift_min_cells)
    sc.chunks([], chunk_size)  # validates the size before any work
    root = open_location(store)
    model_id = registry.resolve_model_id(root, model)
    record = registry.load_record(root, model_id)
    recipe = sc.model_recipe(record)
    sc.check_expected_recipe(recipe, model_id, expected_recipe or {})

    lease = StoreLease(lease_location(root, SWEEP_LEASE), "sweep", lease_ttl_s, run_id)
    try:
        lease.acquire(wait_s)
    except LeaseBusy as busy:
        logger.warning("%s; nothing done", busy)
        return {
            "run_id": run_id,
            "kind": "score",
            "outcome": "busy",
            "store": root.uri,
            "date": night,
            "model_id": model_id,
            "message": f"{busy}; nothing done",
        }
    if lease.took_over:
        logger.warning("lease: %s", lease.took_over)
    sweep = sc.Sweep(
        run_id,
        started,
        root.uri,
        inbox,
        dataset,
        night,
        model_id,
        record,
        rule,
        recipe.weights_id,
        lease_note=lease.took_over,
    )
    with lease.kept_alive():
        write_run(root, sweep.run_row("running", None))
        outcome = "failed"
        try:
            summary = _sweep(
                sweep,
                root,
                recipe,
                thresholds,
                lease,
                weights_dir,
                Compute(ray_address, batch_size, gpu_share, actor_cpus),
                chunk_size,
                explain_limit if explain_flagged else 0,
            )
            outcome = "completed"
        finally:
            # A failed sweep leaves its row too; a killed one stays "running" (dashboard:
            # interrupted) and the next sweep finishes its work.
            write_run(root, sweep.run_row(outcome, datetime.now(UTC)))
    return summary


def _sweep(
    sweep: sc.Sweep,
    root: Location,
    recipe: sc.FeatureRecipe,
    thresholds: sc.DriftThresholds,
    lease: StoreLease,
    weights_dir: str | None,
    compute: Compute,
    chunk_size: int,
    explain_limit: int = 0,
) -> dict:
    """Catalog, select, featurise, score, summarise; fills `sweep` as it goes."""
    catalog = catalog_collection(sweep.inbox, root, sweep.dataset, allow_empty=True)
    plan = sc.plan_sweep(catalog.rows, scored_image_ids(root, sweep.model_id))
    sweep.found, sweep.duplicate, sweep.skipped = plan.found, plan.duplicate, plan.already_scored
    sweep.quarantined, sweep.quarantined_new = plan.quarantined, catalog.quarantined_new
    sweep.new = len(plan.new_rows)
    scores, feature_mean = [], None
    if plan.new_rows:
        rows = _featurise_new(sweep, root, recipe, plan.new_rows, weights_dir, compute)
        scored = score_new_images(
            root,
            sweep.model_id,
            sweep.record,
            recipe,
            rows,
            sweep.night,
            sweep.run_id,
            chunk_size,
            lease,
        )
        sweep.scored, scores, feature_mean = (
            scored["scored"],
            scored["scores"],
            scored["feature_mean"],
        )
    columns = ["subject_id", "score", "predicted_label"]
    night = read_predictions(root, sweep.night, sweep.model_id, columns=columns)
    sweep.subjects = sc.summarize_subjects(
        night.column("subject_id").to_pylist(),
        night.column("score").to_pylist(),
        night.column("predicted_label").to_pylist(),
        sweep.rule,
    )
    sweep.drift = sc.drift_signal(sweep.scored, feature_mean, scores, sweep.record, thresholds)
    summary = sweep.summary("completed", datetime.now(UTC))
    if explain_limit > 0:
        summary["explanations"] = explain_flagged_cells(
            root, sweep.model_id, sweep.night, explain_limit, weights_dir
        )
    publish_sweep(summary)
    return summary


def _featurise_new(
    sweep: sc.Sweep,
    root: Location,
    recipe: sc.FeatureRecipe,
    rows: list[dict],
    weights_dir: str | None,
    compute: Compute,
) -> list[dict]:
    """Extract the vectors the new images lack; returns the rows that can be scored."""
    ids = [row["image_id"] for row in rows]
    todo = missing_vectors(root, ids, list(recipe.backbones), recipe.weights_ids, recipe.image_size)
    if not todo:
        return rows
    # Only now, with vectors to compute, must the weights here be the model's own.
    choice = sc.weights_choice(sweep.record, recipe, weights_dir)
    local = {name: bb.weights_id(bb.BACKBONES[name], choice) for name in todo}
    sc.check_local_weights(recipe, sweep.model_id, local)
    uris = {row["image_id"]: row["uri"] for row in rows}
    sweep.extraction = featurise(
        root,
        uris,
        todo,
        choice,
        recipe.weights_ids,
        recipe.image_size,
        compute,
        total_images=len(rows),
    )
    sweep.computed = max(sweep.extraction["computed"].values(), default=0)
    rejected = sweep.extraction["rejected"]  # files changed or unreadable since the catalog
    sweep.quarantined += len(rejected)
    sweep.quarantined_new += len(rejected)
    return [row for row in rows if row["image_id"] not in rejected]
