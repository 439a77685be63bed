"""`leukoflow metrics`: the store's nights in the Prometheus text format, for ops dashboards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from leukoflow.cli.options import AsJson, Store
from leukoflow.cli.output import print_json


def metrics(
    store: Store,
    textfile: Annotated[
        Path | None,
        typer.Option(
            "--textfile",
            help="Write atomically to this .prom file (node_exporter's textfile collector) "
            "instead of printing",
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Print the store's nights as Prometheus metrics: sweeps by outcome, per night the images
    scored, flagged and quarantined, subjects flagged, images/s and drift, hours since the
    last completed night, the current model (infra/grafana has a dashboard over them)."""
    from datetime import UTC, datetime

    from leukoflow.errors import LeukoflowError
    from leukoflow.present import metrics as m
    from leukoflow.store.status import open_existing_store

    if textfile is not None and not textfile.parent.is_dir():
        raise LeukoflowError(f"--textfile: no folder {textfile.parent}")
    data = m.read_store_nights(open_existing_store(store))
    now = datetime.now(UTC)
    if textfile is not None:
        m.write_textfile(data, now, str(textfile))
    else:
        print(m.exposition(data, now), end="")
    if as_json:
        print_json(
            {
                "store": store,
                "textfile": None if textfile is None else str(textfile),
                "nights": len(data.nights),
                "sweeps": data.outcomes,
                "model_id": data.model_id,
                "last_completed_at": data.last_completed_at and data.last_completed_at.isoformat(),
            }
        )
