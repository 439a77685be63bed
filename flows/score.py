"""`leukoflow score`: the nightly sweep. Score what is new in an inbox with one model.

Wiring only: catalog the inbox (reusing rows of unchanged files), skip images this model already
scored, extract only missing vectors, score in chunks of atomic Parquet files, then count every
image against the tables, summarise the night per subject (pseudonymised), measure drift and
publish Prefect artifacts. A lease in the store makes sweeps exclusive (docs/nightly.md); a sweep
that finds it held, fails or runs out of time still leaves a run row saying so.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.context import get_run_context

from leukoflow import choices
from leukoflow.present.fhir import export_after_sweep
from leukoflow.recipe import Compute, FeatureRecipe, recipe_from_record
from leukoflow.redact import install_secret_masking
from leukoflow.scoring import score as sc
from leukoflow.store import records, registry
from leukoflow.store.lease import SWEEP_LEASE, LeaseBusy, StoreLease, lease_location
from leukoflow.store.storage import Location, open_location
from leukoflow.store.tables import scored_image_ids
from leukoflow.tasks.event_tasks import emit_night_events
from leukoflow.tasks.explain_tasks import explain_flagged_cells
from leukoflow.tasks.score_tasks import publish_sweep, score_new_images
from leukoflow.tasks.stage_tasks import PreparedFeatures, catalog_images, prepare_features
from leukoflow.vocabulary import Outcome, RunKind, short_id

# A night's sweep must end well inside the night, so the next one is not blocked by a hung one
# (its lease would be renewed for as long as it runs). `leukoflow score --timeout` changes it.
SWEEP_TIMEOUT_S = 6 * 3600
# The longest a sweep waits for one batch's vectors when --batch-timeout is not given: a stuck
# actor fails the night in minutes instead of holding it until the flow's timeout.
SWEEP_BATCH_TIMEOUT_S = 1800.0


@flow(name="leukoflow-score", log_prints=False, timeout_seconds=SWEEP_TIMEOUT_S)
def score_inbox(
    inbox: str,
    store: str,
    model: str = "current",
    compute: Compute = Compute(),
    sweep: sc.SweepSettings = sc.SweepSettings(),
    date: str | None = None,
    dataset: str = choices.INBOX_DATASET,
    weights_dir: str | None = None,
    expected_recipe: dict | None = None,
    precision: str | None = None,
    explain_flagged: bool = False,
    explain_limit: int = choices.EXPLAIN_LIMIT,
    export_fhir: str | None = None,
) -> dict:
    """One sweep of INBOX; its summary (outcome "busy": another sweep holds the lease).

    `precision` None: the model's own. explain_flagged: also write activation-map PNGs of the
    night's flagged cells (at most `explain_limit` per sweep) under explanations/date=<night>/.
    export_fhir: a folder or FHIR base URL for the night's results as FHIR (present/fhir).
    """
    install_secret_masking()
    logger = get_run_logger()
    started = datetime.now(UTC)
    run_id = records.new_run_id(started)
    # The sweep's time limit (its flow timeout, `with_options` or the decorator's).
    time_limit_s = get_run_context().flow.timeout_seconds or SWEEP_TIMEOUT_S
    # A wait for a batch's vectors blocks inside Ray, where the flow's timeout cannot interrupt
    # it: no batch waits longer than the sweep may run.
    batch_timeout_s = min(compute.batch_timeout_s or SWEEP_BATCH_TIMEOUT_S, time_limit_s)
    compute = dataclasses.replace(compute, batch_timeout_s=batch_timeout_s)
    night = sc.night_of(date, started)
    root = open_location(store)
    recorder = records.RunRecorder(root, RunKind.SCORE, dataset, started, run_id)
    model_id = registry.resolve_model_id(root, model)
    record = registry.load_record(root, model_id)
    recipe = recipe_from_record(record, weights_dir)
    sc.check_expected_recipe(recipe, model_id, expected_recipe or {})
    recipe, precision_note = sc.scoring_recipe(recipe, precision)
    if precision_note:
        logger.warning(precision_note)
    state = sc.Sweep(
        run_id, started, root.uri, inbox, dataset, night, model_id, record,
        sweep.subject_rule(record), recipe.weights_id,
    )  # fmt: skip

    lease = StoreLease(lease_location(root, SWEEP_LEASE), "sweep", sweep.lease_ttl_s, run_id)
    if sweep.wait_s > 0:
        # A sweep waiting for the lease says so: otherwise it looks hung for up to --wait.
        holder = lease.holder()
        if holder is not None:
            logger.warning(
                "another sweep holds the lease on this store (%s): waiting up to %g s for it",
                holder.describe(), sweep.wait_s,
            )  # fmt: skip
    try:
        lease.acquire(sweep.wait_s)
    except LeaseBusy as busy:
        # Ops must see a night that did nothing: a row with its outcome, not silence.
        state.message = f"{busy}; nothing done"
        logger.warning(state.message)
        recorder.record(Outcome.BUSY, **state.run_columns(Outcome.BUSY, datetime.now(UTC)))
        return state.summary(Outcome.BUSY, datetime.now(UTC))
    state.lease_note = lease.took_over
    if lease.took_over:
        logger.warning("lease: %s", lease.took_over)
    # Renewed no longer than the sweep may run: a hung sweep's lease then goes stale and the
    # next night can take over.
    hold_limit_s = time_limit_s
    with lease.kept_alive(hold_limit_s=hold_limit_s):
        recorder.record(Outcome.RUNNING, **state.run_columns(Outcome.RUNNING, None))
        outcome = Outcome.FAILED
        try:
            summary = _sweep(state, root, recipe, sweep, lease, compute, explain_flagged,
                             explain_limit)  # fmt: skip
            if export_fhir:  # the predictions are stored; its outcome goes in the final row
                state.fhir = export_after_sweep(root, night, model_id, record, state.rule,
                                                export_fhir)  # fmt: skip
                summary["fhir"] = state.fhir
                if state.fhir["status"] == "failed":
                    logger.warning("FHIR export not done: %s", state.fhir["reason"])
            outcome = Outcome.COMPLETED
        except BaseException as error:
            if sc.stopped_by_timeout(error, started, hold_limit_s):
                outcome = Outcome.TIMED_OUT
                state.message = f"stopped after its timeout of {hold_limit_s} s"
                raise sc.SweepTimedOut(
                    f"the sweep stopped after its timeout of {hold_limit_s:g} s (--timeout); "
                    "its run row says timed_out, and the next sweep scores what is left"
                ) from error
            if sc.batch_timed_out(error):
                state.message = (
                    f"no vectors came back for a batch within the --batch-timeout of "
                    f"{compute.batch_timeout_s:g} s (a backbone actor is stuck or too slow): "
                    "the night is not done; the next sweep scores what is left"
                )
                raise sc.BatchTimedOut(state.message) from error
            raise
        finally:
            # A failed sweep leaves its row too; a killed one stays "running" (dashboard:
            # interrupted) and the next sweep finishes its work.
            recorder.record(outcome, **state.run_columns(outcome, datetime.now(UTC)))
    # After the row: alerts (leukoflow/automations) react to these, never to a half-done night.
    emit_night_events(summary)
    return summary


def _sweep(
    state: sc.Sweep,
    root: Location,
    recipe: FeatureRecipe,
    settings: sc.SweepSettings,
    lease: StoreLease,
    compute: Compute,
    explain_flagged: bool,
    explain_limit: int,
) -> dict:
    """Catalog, select, featurise, score, count, summarise; fills `state` as it goes."""
    catalog = catalog_images(state.inbox, root, state.dataset, allow_empty=True)
    state.quarantined_new, state.ignored = catalog.quarantined_new, catalog.counts.get("ignored", 0)
    scored_before = scored_image_ids(root, state.model_id)
    plan = sc.plan_sweep(catalog.rows, scored_before)
    state.new = len(plan.new_rows)
    from leukoflow.engine.actors import backbone_pool  # Ray: started only if the pool is used

    # One set of actors for the new images' vectors and the flagged cells' explanations.
    with backbone_pool(recipe, compute) as pool:
        prepared = prepare_features(
            root, state.dataset, recipe, compute, rows=catalog.rows, pool=pool, count=False,
            select=lambda rows: sc.plan_sweep(rows, scored_before).new_rows,
        )  # fmt: skip
        summary = _score_and_summarise(state, root, recipe, settings, lease, prepared,
                                       scored_before)  # fmt: skip
        if explain_flagged and explain_limit > 0:
            summary["explanations"] = explain_flagged_cells(
                root, state.model_id, state.night, explain_limit, recipe.weights_dir, maps=pool
            )
    publish_sweep(summary)
    return summary


def _score_and_summarise(
    state: sc.Sweep,
    root: Location,
    recipe: FeatureRecipe,
    settings: sc.SweepSettings,
    lease: StoreLease,
    prepared: PreparedFeatures,
    scored_before: set[str],
) -> dict:
    """Score the new images that have their vectors, count every image, summarise the night."""
    extraction, rows = prepared.extraction, prepared.rows
    state.extraction, state.computed = extraction.to_dict(), extraction.images_done
    rejected = extraction.rejected  # files changed or unreadable since the catalog
    scores, feature_mean = [], None
    if prepared.selected:
        scored = score_new_images(
            root, state.model_id, state.record, recipe, prepared.selected, state.night,
            state.run_id, settings.chunk_size, lease,
        )  # fmt: skip
        scores, feature_mean = scored["scores"], scored["feature_mean"]
    # Counted against the predictions table, not from what this process believes it wrote.
    state.accounting = records.account(
        rows, rejected, scored_image_ids(root, state.model_id), scored_before
    )
    if not state.accounting.accounted:
        get_run_logger().warning(
            "accounting: %d image(s) neither scored nor quarantined, %d counted twice: %s",
            state.accounting.missing, len(state.accounting.double_counted_ids),
            ", ".join(short_id(i) for i in state.accounting.missing_ids[:10]),
        )  # fmt: skip
    sc.summarise_night(state, root, scores, feature_mean, settings.drift())
    summary = state.summary(Outcome.COMPLETED, datetime.now(UTC))
    return summary
