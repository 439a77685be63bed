"""`leukoflow status`: what the store holds, and every image found accounted for (exit 1 when
one is not: the images are named)."""

from __future__ import annotations

import typer
from rich.table import Table

from leukoflow.cli.options import AsJson, Store
from leukoflow.cli.output import console, print_json

NAMED_AT_MOST = 20  # images named per dataset in the text output (--json names them all)


def status(store: Store, as_json: AsJson = False) -> None:
    """What the store holds: catalog, features, models, predictions, runs; exit 1 when an image
    found is neither featurised, quarantined nor a duplicate."""
    from leukoflow.store.status import open_existing_store, store_status

    report = store_status(open_existing_store(store))
    if as_json:
        print_json(report)
    else:
        print_status(report)
    if not report["accounted"]:
        raise typer.Exit(1)


def print_status(report: dict) -> None:
    from leukoflow.vocabulary import short_id

    out = console()
    out.print(f"[bold]store[/] {report['store']}")
    table = Table(title="catalog (found = ok + quarantined + duplicate)")
    for column in ("dataset", "found", "ok", "quarantined", "duplicate"):
        table.add_column(column, justify="left" if column == "dataset" else "right", no_wrap=True)
    for dataset, counts in report["datasets"].items():
        row = (str(counts.get(k, 0)) for k in ("found", "ok", "quarantined", "duplicate"))
        table.add_row(dataset, *row)
    out.print(table)

    accounting = report["accounting"]
    headline = (
        "every image accounted for" if report["accounted"] else "NOT every image accounted for"
    )
    out.print(f"[bold{'' if report['accounted'] else ' red'}]{headline}[/]")
    for dataset, c in accounting["datasets"].items():
        done = f"{c['scored']} scored" if "scored" in c else f"{c['featurised']} featurised"
        out.print(
            f"  dataset {dataset}: {c['found']} found = {done} + "
            f"{c['missing']} missing + {c['quarantined']} quarantined + {c['duplicate']} "
            f"duplicate {_check(c['accounted'])}"
        )
        out.print(f"    {done.split()[1]} per {c['basis']}", highlight=False)
        for kind, ids in (("missing", c["missing_images"]),
                          ("unknown status", c["unknown_status_images"])):  # fmt: skip
            if ids:
                shown = " ".join(short_id(i) for i in ids[:NAMED_AT_MOST])
                more = f" and {len(ids) - NAMED_AT_MOST} more" if len(ids) > NAMED_AT_MOST else ""
                out.print(f"    {kind}: {shown}{more}", highlight=False)
    for c in accounting["runs"]:
        if c["kind"] == "score":
            done = f"{c['new']} new + {c['skipped']} already scored"
        else:
            done = f"{c['featurised']} featurised"
        out.print(
            f"  last {c['kind']} of {c['dataset']} ({c['run_id']}, {c['outcome']}): "
            f"{c['found']} found = {done} + {c['missing']} missing + {c['quarantined']} "
            f"quarantined + {c['duplicate']} duplicate {_check(c['accounted'])}"
        )
    for backbone, keys in report["features"].items():
        out.print(f"features {backbone}: " + ", ".join(f"{n} x {k}" for k, n in keys.items()))
    out.print(f"models: {len(report['models'])}, current: {report['current_model']}")
    out.print(f"predictions: {report['predictions']} rows; runs: {report['runs']}")


def _check(accounted: bool | None) -> str:
    if accounted is None:
        return "(not checked: the run did not complete)"
    return "[green]ok[/]" if accounted else "[bold red]MISMATCH[/]"
