"""What the CLI prints: a run's summary and the store's status, for people (rich) and scripts."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from leukoflow.tasks import registry
from leukoflow.tasks.storage import Location
from leukoflow.tasks.tables import (
    STATUS_DUPLICATE,
    STATUS_OK,
    STATUS_QUARANTINED,
    feature_backbones,
    feature_keys,
    read_catalog,
    read_predictions,
    read_runs,
)

METRICS_SHOWN = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "roc_auc")


def render_run_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    if summary.get("note"):
        console.print(f"[bold red]{summary['note']}[/]")
    counts = summary["counts"]
    console.print(
        f"[bold]leukoflow run {summary['run_id']}[/] on dataset [cyan]{summary['dataset']}[/]: "
        f"{counts['found']} images found, {counts['featurised']} featurised, "
        f"{counts['quarantined']} quarantined, {counts['duplicate']} duplicates"
    )
    extraction = summary["extraction"]
    computed = extraction["computed"] or "none (all features were already in the store)"
    console.print(f"features: {' + '.join(summary['backbones'])} = {summary['feature_dim']} "
                  f"per image; computed now: {computed}")  # fmt: skip
    if extraction.get("images_per_second"):
        console.print(f"extraction: {extraction['images_per_second']} images/s")
    table = Table(title=f"{summary['classifier']} on a {summary['split']} split "
                        f"({summary['n_train']} train / {summary['n_test']} test)")  # fmt: skip
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in METRICS_SHOWN:
        value = summary["metrics"].get(name)
        table.add_row(name, "n/a" if value is None else f"{value:.4f}")
    console.print(table)
    console.print(f"model: {summary['model_id']} (current)")
    console.print(f"report: {summary['paths']['report_html']}")


def _stored_feature_keys(store: Location) -> dict[str, pa.Table]:
    """backbone -> its (image_id, weights_id, image_size) keys, read once for all of status."""
    return {backbone: feature_keys(store, backbone) for backbone in feature_backbones(store)}


def _feature_counts(keys: dict[str, pa.Table]) -> dict[str, dict[str, int]]:
    """backbone -> {"<weights_id>@<size>px": images with that vector}."""
    counts = {}
    for backbone, table in keys.items():
        weights, sizes = (table.column(c).to_pylist() for c in ("weights_id", "image_size"))
        counts[backbone] = dict(Counter(f"{w}@{s}px" for w, s in zip(weights, sizes, strict=True)))
    return counts


def _featurised_ids(keys: dict[str, pa.Table]) -> dict[str, set[str]]:
    """backbone -> the image ids holding a vector of it (any weights, any image size)."""
    return {backbone: set(table.column("image_id").to_pylist()) for backbone, table in keys.items()}


def dataset_accounting(catalog, vectors: dict[str, set[str]]) -> dict[str, dict]:
    """Per dataset: found = featurised + awaiting_features + quarantined + duplicate.

    An ok image counts as featurised when every backbone holding vectors for this dataset holds
    one for it; `awaiting_features` is what an interrupted run left to do (0 after a full run).
    """
    accounting: dict[str, dict] = {}
    columns = ("dataset", "image_id", "status")
    rows = zip(*(catalog.column(c).to_pylist() for c in columns), strict=True)
    by_dataset: dict[str, list[tuple[str, str]]] = {}
    for dataset, image_id, status in rows:
        by_dataset.setdefault(dataset, []).append((image_id, status))
    for dataset, entries in sorted(by_dataset.items()):
        statuses = Counter(status for _, status in entries)
        ok_ids = {image_id for image_id, status in entries if status == STATUS_OK}
        used = [ids for ids in vectors.values() if ids & ok_ids]
        featurised = set.intersection(ok_ids, *used) if used else set()
        counts = {
            "found": len(entries),
            "featurised": len(featurised),
            "awaiting_features": len(ok_ids - featurised),
            "quarantined": statuses[STATUS_QUARANTINED],
            "duplicate": statuses[STATUS_DUPLICATE],
        }
        parts = sum(v for k, v in counts.items() if k != "found")
        accounting[dataset] = {**counts, "accounted": counts["found"] == parts}
    return accounting


def runs_accounting(runs) -> list[dict]:
    """The latest run of each kind and dataset: found = featurised + quarantined + duplicate."""
    latest: dict[tuple[str, str], dict] = {}
    for row in sorted(runs.to_pylist(), key=lambda r: r["started_at"]):
        latest[(row["kind"], row["dataset"])] = row
    shown = []
    for row in latest.values():
        counts = {
            k: row[f"images_{k}"] or 0 for k in ("found", "featurised", "quarantined", "duplicate")
        }
        parts = counts["featurised"] + counts["quarantined"] + counts["duplicate"]
        shown.append(
            {
                "run_id": row["run_id"],
                "kind": row["kind"],
                "dataset": row["dataset"],
                "outcome": row["outcome"],
                **counts,
                "accounted": counts["found"] == parts,
            }
        )
    return shown


def store_status(store: Location) -> dict:
    """Counts per table: what a dashboard or a person checks first."""
    catalog = read_catalog(store)
    datasets: dict[str, dict[str, int]] = {}
    for dataset, status in zip(
        catalog.column("dataset").to_pylist(), catalog.column("status").to_pylist(), strict=True
    ):
        entry = datasets.setdefault(
            dataset, {"found": 0, "ok": 0, "quarantined": 0, "duplicate": 0}
        )
        entry["found"] += 1
        entry[status] += 1
    predictions = read_predictions(store)
    runs = read_runs(store)
    keys = _stored_feature_keys(store)
    last_run = None
    if runs.num_rows:
        latest = pc.max(runs.column("started_at")).as_py()
        row = runs.filter(pc.equal(runs.column("started_at"), latest)).slice(0, 1).to_pylist()[0]
        last_run = {k: row[k] for k in ("run_id", "kind", "outcome", "started_at", "model_id")}
    return {
        "store": store.uri,
        "datasets": datasets,
        "features": _feature_counts(keys),
        "models": [m["model_id"] for m in registry.list_models(store)],
        "current_model": registry.current_model_id(store),
        "predictions": predictions.num_rows,
        "runs": runs.num_rows,
        "last_run": last_run,
        # The invariant every run keeps: each image found is featurised, quarantined or a
        # duplicate linked to its first copy.
        "accounting": {
            "datasets": dataset_accounting(catalog, _featurised_ids(keys)),
            "runs": runs_accounting(runs),
        },
    }


def render_status(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]store[/] {report['store']}")
    table = Table(title="catalog (found = ok + quarantined + duplicate)")
    for column in ("dataset", "found", "ok", "quarantined", "duplicate"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for dataset, counts in report["datasets"].items():
        table.add_row(
            dataset, *(str(counts[k]) for k in ("found", "ok", "quarantined", "duplicate"))
        )
    console.print(table)
    _render_accounting(report.get("accounting", {}), console)
    for backbone, keys in report["features"].items():
        console.print(f"features {backbone}: " + ", ".join(f"{n} x {k}" for k, n in keys.items()))
    console.print(f"models: {len(report['models'])}, current: {report['current_model']}")
    console.print(f"predictions: {report['predictions']} rows; runs: {report['runs']}")


def _render_accounting(accounting: dict, console: Console) -> None:
    """One line per dataset and per dataset's last run: found = featurised + quarantined + dup."""
    console.print("[bold]every image accounted for[/]")
    for dataset, c in accounting.get("datasets", {}).items():
        console.print(
            f"  dataset {dataset}: {c['found']} found = {c['featurised']} featurised + "
            f"{c['awaiting_features']} awaiting features + {c['quarantined']} quarantined + "
            f"{c['duplicate']} duplicate {_check(c)}"
        )
    for c in accounting.get("runs", []):
        console.print(
            f"  last {c['kind']} of {c['dataset']} ({c['run_id']}, {c['outcome']}): "
            f"{c['found']} found = {c['featurised']} featurised + {c['quarantined']} quarantined "
            f"+ {c['duplicate']} duplicate {_check(c)}"
        )


def _check(counts: dict) -> str:
    return "[green]ok[/]" if counts["accounted"] else "[bold red]MISMATCH[/]"


def render_score_summary(summary: dict, console: Console | None = None) -> None:
    """A nightly sweep: the subjects first (what a clinician reads), then the run's counts."""
    console = console or Console()
    if summary.get("note"):
        console.print(f"[bold red]{summary['note']}[/]")
    night, counts = summary["night"], summary["counts"]
    console.print(
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
        console.print(table)
    console.print(
        f"this run: {counts['found']} found, {counts['new']} new, {counts['scored']} scored, "
        f"{counts['quarantined']} quarantined ({counts['quarantined_new']} new), "
        f"{counts['duplicate']} duplicates, {counts['skipped']} already scored; "
        f"{summary['images_per_second'] or 0} images/s in {summary['seconds']} s"
    )
    drift = summary["drift"] or {}
    if drift.get("warning"):
        console.print(f"[bold red]drift warning:[/] {'; '.join(drift['reasons'])}")
    elif drift.get("cells"):
        console.print(
            f"drift: feature shift {drift['feature_shift']}, score KS {drift['score_ks']} (ok)"
        )
    if summary.get("lease"):
        console.print(f"lease: {summary['lease']}")


def render_backfill_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    counts = summary["counts"]
    console.print(
        f"[bold]leukoflow backfill {summary['run_id']}[/] of dataset [cyan]{summary['dataset']}"
        f"[/]: {counts['found']} found, {counts['ok']} with vectors, {counts['quarantined']} "
        f"quarantined, {counts['duplicate']} duplicates"
    )
    computed = summary["extraction"]["computed"] or "none (the store had every vector)"
    console.print(f"vectors computed now: {computed} ({' + '.join(summary['backbones'])})")
