"""`leukoflow score`, `backfill` and `dashboard`: the nightly sweep and what ops look at
(docs/nightly.md)."""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import typer
from rich.table import Table

from leukoflow import choices
from leukoflow.cli.boundary import before_flow
from leukoflow.cli.options import (
    COMPUTE,
    RECIPE,
    AsJson,
    ImagesList,
    Labels,
    ModelId,
    OptionGroup,
    Precision,
    Store,
    WeightsDir,
    check_images,
    check_store,
    parse_labels,
    shared_options,
)
from leukoflow.cli.output import console, print_json
from leukoflow.errors import LeukoflowError
from leukoflow.recipe import WEIGHTS_KINDS, Compute, FeatureRecipe


def _sweep_settings(
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", help="Images per predictions file (what a kill redoes)")
    ] = choices.SWEEP_CHUNK_SIZE,
    min_flagged_cells: Annotated[
        int | None,
        typer.Option(
            "--min-flagged-cells",
            help="Flag a subject with >= K flagged cells (0: off) "
            f"[default: the model's patient rule, else {choices.MIN_FLAGGED_CELLS}]",
            show_default=False,
        ),
    ] = None,
    min_flagged_fraction: Annotated[
        float | None,
        typer.Option(
            "--min-flagged-fraction",
            help="... or with more than F of its cells flagged (1: off) "
            f"[default: the model's patient rule, else {choices.MIN_FLAGGED_FRACTION}]",
            show_default=False,
        ),
    ] = None,
    feature_drift_threshold: Annotated[
        float,
        typer.Option("--feature-drift-threshold", help="Warn above this mean |z| of feature means"),
    ] = choices.FEATURE_DRIFT_THRESHOLD,
    score_drift_threshold: Annotated[
        float, typer.Option("--score-drift-threshold", help="Warn above this KS distance of scores")
    ] = choices.SCORE_DRIFT_THRESHOLD,
    drift_min_cells: Annotated[
        int,
        typer.Option("--drift-min-cells", help="Fewer new cells: drift is shown, never a warning"),
    ] = choices.DRIFT_MIN_CELLS,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait while another sweep holds the store (0: exit)")
    ] = 0.0,
    lease_ttl: Annotated[
        float | None,
        typer.Option(
            "--lease-ttl",
            help="Seconds a stalled sweep's unchanged lease is watched before another takes it "
            "over [default: 300 locally; on S3 longer than the slowest write, about 15 min]",
            show_default=False,
        ),
    ] = None,
):
    """How the sweep works (scoring/score.SweepSettings), validated before Prefect starts."""
    from leukoflow.scoring.score import SweepSettings

    return SweepSettings(
        chunk_size=chunk_size, min_flagged_cells=min_flagged_cells,
        min_flagged_fraction=min_flagged_fraction,
        feature_drift_threshold=feature_drift_threshold,
        score_drift_threshold=score_drift_threshold, drift_min_cells=drift_min_cells,
        wait_s=wait, lease_ttl_s=lease_ttl,
    )  # fmt: skip


SWEEP = OptionGroup(_sweep_settings)


@shared_options
def score(
    inbox: Annotated[str, typer.Argument(help="Folder or s3:// prefix where new images land")],
    store: Store,
    model: ModelId = "current",
    date: Annotated[
        str | None, typer.Option(help="Night YYYY-MM-DD of the predictions (default: today, UTC)")
    ] = None,
    dataset: Annotated[
        str, typer.Option("--dataset", help="Catalog name of the inbox")
    ] = choices.INBOX_DATASET,
    sweep=SWEEP,
    backbones: Annotated[
        str | None, typer.Option(help="Expected backbones, in order: refuse a model with others")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Expected image size: refuse others")
    ] = None,
    weights: Annotated[
        Literal[WEIGHTS_KINDS] | None,
        typer.Option(help="Expected weights kind: refuse a model with others"),
    ] = None,
    weights_dir: WeightsDir = None,
    precision: Precision = None,
    explain_flagged: Annotated[
        bool,
        typer.Option(
            "--explain-flagged",
            help="Write activation-map PNGs of flagged cells under STORE/explanations/",
        ),
    ] = False,
    explain_limit: Annotated[
        int, typer.Option("--explain-limit", help="At most this many PNGs per sweep")
    ] = choices.EXPLAIN_LIMIT,
    export_fhir: Annotated[
        str | None,
        typer.Option(
            "--export-fhir",
            help="Export the night as FHIR NDJSON to this folder, or POST it to this FHIR base "
            "URL (http(s)://; NDJSON kept in STORE/exports/fhir/)",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            help="Stop the sweep after this many seconds, with a timed_out run row [default: 6 h]",
            show_default=False,
        ),
    ] = None,
    compute: Compute = COMPUTE,
    as_json: AsJson = False,
) -> None:
    """The nightly sweep: score the images of INBOX that the model has not scored yet."""
    from datetime import UTC, datetime

    from leukoflow.features import backbones as bb
    from leukoflow.scoring import score as sc

    # Fail fast, before Prefect starts, on anything a user can get wrong.
    sc.night_of(date, datetime.now(UTC))
    expected = {
        "backbones": bb.parse_backbones(backbones) if backbones else None,
        "image_size": image_size,
        "weights": weights,
    }
    check_store(store)
    if export_fhir and export_fhir.startswith(("http://", "https://")):
        from leukoflow.present.fhir import check_url

        check_url(export_fhir)  # a bad URL is refused before the night, not after it

    from leukoflow.flows.score import score_inbox

    if timeout is not None:
        if timeout <= 0:
            raise LeukoflowError(f"--timeout wants a positive number of seconds, got {timeout}")
        score_inbox = score_inbox.with_options(timeout_seconds=timeout)
    before_flow()
    summary = score_inbox(
        inbox=inbox, store=store, model=model, compute=compute, sweep=sweep, date=date,
        dataset=dataset, weights_dir=weights_dir, expected_recipe=expected, precision=precision,
        explain_flagged=explain_flagged, explain_limit=explain_limit, export_fhir=export_fhir,
    )  # fmt: skip
    if summary["outcome"] == "busy":
        print(f"leukoflow: {summary['message']}", file=sys.stderr)
    if as_json:
        print_json(summary)
    elif summary["outcome"] != "busy":
        print_score_summary(summary)


def print_score_summary(summary: dict) -> None:
    """A nightly sweep: the subjects first (what a clinician reads), then the run's counts."""
    out = console()
    if summary.get("note"):
        out.print(f"[bold red]{summary['note']}[/]")
    night, counts = summary["night"], summary["counts"]
    out.print(
        f"[bold]leukoflow score {summary['run_id']}[/] night {summary['date']}, model "
        f"{summary['model_id']}: [bold]{night['subjects_flagged']} of {night['subjects']} "
        f"subjects flagged[/] ({summary['subject_rule']['text']})"
    )
    threshold = f"{summary['threshold']:.4g}"
    table = Table(title=f"subjects tonight ({summary['score_kind']} >= {threshold})")
    for column in ("subject", "flagged", "cells scored", "cells flagged", "flagged %", "mean"):
        table.add_column(column, justify="left" if column in ("subject", "flagged") else "right")
    for s in summary["subjects"]:
        flagged = {True: "[bold red]YES[/]", False: "no", None: "n/a"}[s["subject_flagged"]]
        table.add_row(
            s["subject_id"] or "(no subject id)", flagged, str(s["cells_scored"]),
            str(s["cells_flagged"]), f"{100 * s['flagged_fraction']:.1f}", f"{s['mean_score']:.4f}",
        )  # fmt: skip
    if summary["subjects"]:
        out.print(table)
    out.print(
        f"this run: {counts['found']} found, {counts['new']} new, {counts['scored']} scored, "
        f"{counts['quarantined']} quarantined ({counts['quarantined_new']} new), "
        f"{counts['duplicate']} duplicates, {counts['skipped']} already scored"
        + (f", [bold red]{counts['missing']} missing[/]" if counts.get("missing") else "")
        + f"; {summary['images_per_second'] or 0} images/s in {summary['seconds']} s"
    )
    drift = summary["drift"] or {}
    if drift.get("warning"):
        out.print(f"[bold red]drift warning:[/] {'; '.join(drift['reasons'])}")
    elif drift.get("cells"):
        out.print(
            f"drift: feature shift {drift['feature_shift']}, score KS {drift['score_ks']} (ok)"
        )
    if summary.get("lease"):
        out.print(f"lease: {summary['lease']}")
    fhir = summary.get("fhir")
    if fhir:
        why = f": {fhir['reason']}" if fhir.get("reason") else ""
        out.print(f"FHIR export to {fhir['target']}: {fhir['status']}{why}", highlight=False)


@shared_options
def backfill(
    images: ImagesList,
    store: Store,
    dataset: Annotated[str, typer.Option("--dataset", help="Dataset name recorded in the catalog")],
    recipe: FeatureRecipe = RECIPE,
    labels: Labels = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr")
    ] = True,
    compute: Compute = COMPUTE,
    as_json: AsJson = False,
) -> None:
    """Catalog and featurise a whole collection (one or more folders or manifests); a re-run
    computes only what the store lacks."""
    label_map = parse_labels(labels)
    check_store(store)
    check_images(images)

    from leukoflow.flows.backfill import backfill as backfill_flow

    before_flow()
    summary = backfill_flow(
        images=images, store=store, dataset=dataset, recipe=recipe, compute=compute,
        labels=label_map, progress_bar=progress,
    )  # fmt: skip
    if as_json:
        print_json(summary)
        return
    out = console()
    counts = summary["counts"]
    out.print(
        f"[bold]leukoflow backfill {summary['run_id']}[/] of dataset [cyan]{summary['dataset']}"
        f"[/]: {counts['found']} found, {counts['ok']} with vectors, {counts['quarantined']} "
        f"quarantined, {counts['duplicate']} duplicates"
        + (f", [bold red]{counts['missing']} missing[/]" if counts.get("missing") else "")
    )
    computed = summary["extraction"]["computed"] or "none (the store had every vector)"
    out.print(f"vectors computed now: {computed} ({' + '.join(summary['backbones'])})")


def dashboard(
    store: Store,
    out: Annotated[str, typer.Option(help="The HTML file to write (self-contained, offline)")],
    nights: Annotated[
        int, typer.Option(help="How many recent nights the plots show")
    ] = choices.DASHBOARD_NIGHTS,
    stale_after_hours: Annotated[
        float,
        typer.Option(help="Banner when the last completed sweep is older than this many hours"),
    ] = choices.STALE_AFTER_HOURS,
    as_json: AsJson = False,
) -> None:
    """One offline HTML page of the nightly sweeps: plots over nights, the last subject table."""
    from leukoflow.present.dashboard import write_dashboard
    from leukoflow.store.status import open_existing_store
    from leukoflow.store.storage import open_location

    facts = write_dashboard(
        open_existing_store(store), open_location(out), nights, stale_after_hours=stale_after_hours
    )
    if as_json:
        print_json(facts)
    else:
        print(f"dashboard: {facts['nights']} night(s), {facts['runs']} run(s) -> {facts['path']}")
