"""The `leukoflow` command line: a thin layer over the flows.

Exit status: 0 done (also when images were quarantined), 1 the run failed, 2 bad usage (click's
usage message) or configuration (one line on stderr, no traceback). With --json the last line of
stdout is one JSON object with the run's counts, metrics, ids and paths.

One module per group of commands; the options they share are defined once in `options`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from leukoflow import __version__
from leukoflow.cli import (
    demo,
    deploy,
    explain,
    export,
    metrics,
    models,
    nightly,
    status,
    training,
)
from leukoflow.cli.boundary import quiet_environment, redact, report_failure

__all__ = ["app", "main", "redact"]


def _help_when_bare(ctx: typer.Context) -> None:
    """A group run without a command prints its help and succeeds (click would exit 2)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"leukoflow {__version__}")
        raise typer.Exit(0)


app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    invoke_without_command=True,
    # Plain click help and usage errors: nothing folded into boxes, stable for scripts.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help=__doc__.split("\n")[0],
)


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    _help_when_bare(ctx)


app.command("run")(training.run)
app.command("validate")(training.validate)
app.command("experiments")(training.experiments)
app.command("score")(nightly.score)
app.command("backfill")(nightly.backfill)
app.command("dashboard")(nightly.dashboard)
app.command("status")(status.status)
app.command("metrics")(metrics.metrics)
app.command("explain")(explain.explain)
app.command("deploy")(deploy.deploy)
app.command("demo")(demo.demo)

models_app = typer.Typer(
    no_args_is_help=False,
    invoke_without_command=True,
    rich_markup_mode=None,
    help="The model registry: list, show, promote.",
)
models_app.callback()(_help_when_bare)
models_app.command("list")(models.models_list)
models_app.command("show")(models.models_show)
models_app.command("promote")(models.models_promote)
app.add_typer(models_app, name="models")

export_app = typer.Typer(
    no_args_is_help=False,
    invoke_without_command=True,
    rich_markup_mode=None,
    help="Export a night's results to other systems: fhir.",
)
export_app.callback()(_help_when_bare)
export_app.command("fhir")(export.export_fhir)
app.add_typer(export_app, name="export")


def main(args: Sequence[str] | None = None) -> None:
    """The `leukoflow` script: click handles usage errors (exit 2, its usage message); every
    other failure is turned into one line and an exit status here."""
    quiet_environment()
    command = typer.main.get_command(app)
    try:
        # standalone_mode: click shows usage errors and exits 2, and exits 0 after a command.
        command.main(args=args, prog_name="leukoflow", standalone_mode=True)
    except Exception as error:  # the CLI boundary: map every failure to an exit status
        sys.exit(report_failure(error))
