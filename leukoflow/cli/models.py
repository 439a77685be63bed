"""`leukoflow models list | show | promote`: the model registry (store/registry)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from leukoflow.cli.options import AsJson, Store
from leukoflow.cli.output import UNWRAPPED_WIDTH, console, number, print_json, text

ModelArgument = Annotated[str, typer.Argument(help="A model id, or current")]


def models_list(store: Store, as_json: AsJson = False) -> None:
    """Every model in the store, oldest first; the current one marked."""
    from leukoflow.store import registry
    from leukoflow.store.status import open_existing_store

    root = open_existing_store(store)
    current = registry.current_model_id(root)
    rows = [registry.model_row(record, current) for record in registry.list_models(root)]
    if as_json:
        print_json({"store": root.uri, "current": current, "models": rows})
        return
    out = console()
    table = Table(title=f"models in {root.uri} (* current)")
    columns = ("model_id", "dataset", "classifier", "backbones", "split")
    table.add_column("")
    table.add_column("model_id", no_wrap=True)
    for column in (*columns[1:], "accuracy", "f1", "threshold"):
        table.add_column(column, justify="right" if column in ("accuracy", "f1") else "left")
    for row in rows:
        numbers = [number(row[k]) for k in ("accuracy", "f1", "threshold")]
        table.add_row("*" if row["current"] else "", *(str(row[c]) for c in columns), *numbers)
    if out.measure(table, options=out.options.update_width(UNWRAPPED_WIDTH)).maximum <= out.width:
        out.print(table)
        return
    # A terminal too narrow for the table: one model per paragraph, its id alone on a line
    # (the id is what a user copies into `promote`; it is never folded or cut).
    out.print(f"models in {root.uri} (* current)", highlight=False)
    for row in rows:
        out.print(f"{'*' if row['current'] else ' '} {row['model_id']}", highlight=False)
        facts = [str(row[c]) for c in columns[1:]]
        facts += [f"{k} {number(row[k])}" for k in ("accuracy", "f1", "threshold")]
        out.print("    " + ", ".join(facts), highlight=False)


def models_show(model_id: ModelArgument, store: Store, as_json: AsJson = False) -> None:
    """One model's record: feature recipe, lineage, metrics and operating point."""
    from leukoflow.store import registry
    from leukoflow.store.status import open_existing_store

    root = open_existing_store(store)
    record = registry.load_record(root, registry.resolve_model_id(root, model_id))
    current = registry.current_model_id(root)
    if as_json:
        print_json({**registry.describe(record), "current": record.model_id == current})
        return
    out = console()
    for title, items in registry.model_sections(record, current):
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column("field", no_wrap=True)
        table.add_column("value")
        for name, value in items:
            table.add_row(name, number(value) if isinstance(value, float) else text(value))
        out.print(table)


def models_promote(
    model_id: Annotated[str, typer.Argument(help="The model id to make current")],
    store: Store,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Promote a non-clinical model (random weights) over a clinical current one",
        ),
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Make MODEL_ID the model that scoring uses (one atomic write of CURRENT.json)."""
    from leukoflow.store import registry
    from leukoflow.store.status import open_existing_store

    pointer = registry.promote(open_existing_store(store), model_id, force=force)
    if as_json:
        print_json(pointer)
    else:
        print(f"current model: {pointer['model_id']} (was {pointer['previous']})")
