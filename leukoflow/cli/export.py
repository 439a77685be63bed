"""`leukoflow export fhir`: a night's subject-level results as FHIR R4 resources (present/fhir,
docs/nightly.md "FHIR")."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from leukoflow import choices
from leukoflow.cli.options import AsJson, Store
from leukoflow.cli.output import print_json
from leukoflow.errors import LeukoflowError


def export_fhir(
    store: Store,
    date: Annotated[str, typer.Option("--date", help="The night YYYY-MM-DD to export")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model id, or current [default: the one model that scored the night]",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            help="Write the NDJSON files to this folder or s3:// prefix "
            "[default: STORE/exports/fhir/date=DATE/]",
            show_default=False,
        ),
    ] = None,
    fhir_url: Annotated[
        str | None,
        typer.Option(
            "--fhir-url",
            help="Also POST a transaction Bundle to this FHIR server base URL (bearer token "
            "from LEUKOFLOW_FHIR_TOKEN)",
        ),
    ] = None,
    subject_map: Annotated[
        str | None,
        typer.Option(
            "--subject-map",
            help="CSV subject_id,patient_reference outside the store [default: subjects are "
            "named by the store's pseudonyms]",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the FHIR server per attempt")
    ] = choices.FHIR_SEND_TIMEOUT_S,
    attempts: Annotated[
        int,
        typer.Option(
            "--attempts", help="Tries of the POST (timeouts, lost connections, 408/429/5xx)"
        ),
    ] = choices.FHIR_SEND_ATTEMPTS,
    as_json: AsJson = False,
) -> None:
    """Write the night's DiagnosticReports and Observations as FHIR NDJSON, and send them."""
    from datetime import UTC, datetime

    from leukoflow.present import fhir
    from leukoflow.scoring import score as sc
    from leukoflow.store import registry
    from leukoflow.store.status import open_existing_store

    night = sc.night_of(date, datetime.now(UTC))
    if out and fhir_url:
        raise LeukoflowError(
            "give --out or --fhir-url, not both (a send keeps its NDJSON in the store)"
        )
    if fhir_url:
        fhir.check_url(fhir_url)
    send = fhir.SendSettings(timeout_s=timeout, attempts=attempts)
    root = open_existing_store(store)
    model_id = _night_model(root, night, model)
    record = registry.load_record(root, model_id)
    mapping = fhir.read_subject_map(subject_map, root) if subject_map else None
    summary = fhir.export_night(
        root, night, model_id, record, out=out, fhir_url=fhir_url, subject_map=mapping, send=send
    )
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary)
    if summary["status"] == "failed":
        where = summary["folder"]
        print(
            f"leukoflow: run failed: the FHIR server did not take the export: {summary['reason']}; "
            f"the NDJSON stays in {where} and the next export sends it again",
            file=sys.stderr,
        )
        raise typer.Exit(1)


def _night_model(root, night: str, model: str | None) -> str:
    """The model whose predictions to export: the one asked for, else the night's only one."""
    from leukoflow.store import registry
    from leukoflow.store.tables import read_predictions

    scored = set(read_predictions(root, night, columns=["model_id"]).column("model_id").to_pylist())
    if model is not None:
        model_id = registry.resolve_model_id(root, model)
        if model_id not in scored:
            raise LeukoflowError(f"model {model_id} scored nothing on the night {night}")
        return model_id
    if not scored:
        raise LeukoflowError(f"no predictions for the night {night} in {root.uri}")
    if len(scored) > 1:
        raise LeukoflowError(
            f"several models scored the night {night} ({', '.join(sorted(scored))}): "
            "choose one with --model"
        )
    return scored.pop()


def _print_summary(summary: dict) -> None:
    counts = summary["resources"]
    print(
        f"FHIR export of {summary['date']} (model {summary['model_id']}): "
        f"{summary['subjects']} subject(s), {summary['subjects_flagged']} flagged; "
        f"{counts['DiagnosticReport']} DiagnosticReport, {counts['Observation']} Observation "
        f"-> {summary['folder']}"
    )
    if summary["non_clinical"]:
        from leukoflow.vocabulary import NON_CLINICAL_NOTICE

        print(NON_CLINICAL_NOTICE)
    if summary["cells_without_subject"]:
        print(f"{summary['cells_without_subject']} cell(s) without a subject id: not exported")
    if summary["status"] == "sent":
        print(f"sent to {summary['url']} ({summary['sent']['entries']} entries)")
    for night in summary["resent"]:
        print(f"night {night['date']} sent again: {night['status']}")
