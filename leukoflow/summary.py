"""What the CLI prints: a run's summary and the store's status, for people (rich) and scripts."""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc
import pyarrow.dataset as ds
from rich.console import Console
from rich.table import Table

from tasks import registry
from tasks.storage import Location
from tasks.tables import features_root, read_catalog, read_predictions, read_runs

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


def _feature_counts(store: Location) -> dict[str, dict[str, int]]:
    root = store.child("features")
    if not root.fs.exists(root.path):
        return {}
    counts = {}
    for path in sorted(root.fs.ls(root.path, detail=False)):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("backbone="):
            continue
        backbone = name.removeprefix("backbone=")
        loc = features_root(store, backbone)
        table = ds.dataset(loc.path, filesystem=loc.fs, format="parquet").to_table(
            columns=["image_id", "weights_id", "image_size"]
        )
        keys = Counter(
            f"{w}@{s}px"
            for w, s in zip(
                table.column("weights_id").to_pylist(),
                table.column("image_size").to_pylist(),
                strict=True,
            )
        )
        counts[backbone] = dict(keys)
    return counts


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
    last_run = None
    if runs.num_rows:
        latest = pc.max(runs.column("started_at")).as_py()
        row = runs.filter(pc.equal(runs.column("started_at"), latest)).slice(0, 1).to_pylist()[0]
        last_run = {k: row[k] for k in ("run_id", "kind", "outcome", "started_at", "model_id")}
    return {
        "store": store.uri,
        "datasets": datasets,
        "features": _feature_counts(store),
        "models": [m["model_id"] for m in registry.list_models(store)],
        "current_model": registry.current_model_id(store),
        "predictions": predictions.num_rows,
        "runs": runs.num_rows,
        "last_run": last_run,
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
    for backbone, keys in report["features"].items():
        console.print(f"features {backbone}: " + ", ".join(f"{n} x {k}" for k, n in keys.items()))
    console.print(f"models: {len(report['models'])}, current: {report['current_model']}")
    console.print(f"predictions: {report['predictions']} rows; runs: {report['runs']}")
