"""Accounting by measurement, run rows and model records: plain functions on small inputs."""

from dataclasses import replace
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from leukoflow.store import records
from leukoflow.store.storage import open_location
from leukoflow.store.tables import RUN_SCHEMA, CatalogRow, RunRow, read_run_rows, write_run
from leukoflow.vocabulary import ImageStatus, Outcome, RunKind


def row(image_id: str, status: str = "ok", uri: str | None = None) -> CatalogRow:
    return CatalogRow(image_id, uri or f"/in/{image_id}.bmp", "d", status=ImageStatus(status))


ROWS = [row("a"), row("b"), row("c"), row("a", "duplicate", "/in/a-copy.bmp"),
        row("q", "quarantined")]  # fmt: skip


def test_every_file_is_in_exactly_one_measured_category():
    counts = records.account(ROWS, rejected=set(), done_ids={"a", "b", "c", "elsewhere"})
    assert (counts.found, counts.done, counts.quarantined, counts.duplicate) == (5, 3, 1, 1)
    assert counts.missing == 0 and counts.accounted


def test_an_image_lost_on_the_way_is_named_and_breaks_the_account():
    # "c" is ok in the catalog but its vector (or prediction) is not in the table.
    counts = records.account(ROWS, rejected=set(), done_ids={"a", "b"})
    assert counts.missing_ids == ["c"] and not counts.accounted
    assert counts.found == counts.done + counts.quarantined + counts.duplicate + counts.missing


def test_an_image_set_aside_by_extraction_is_quarantined_not_missing():
    counts = records.account(ROWS, rejected={"c"}, done_ids={"a", "b"})
    assert counts.quarantined == 2 and counts.missing == 0 and counts.accounted


def test_an_image_both_set_aside_and_stored_is_counted_twice_and_says_so():
    counts = records.account(ROWS, rejected={"c"}, done_ids={"a", "b", "c"})
    assert counts.double_counted_ids == ["c"] and not counts.accounted


def test_work_done_by_earlier_runs_is_told_apart():
    counts = records.account(ROWS, rejected=set(), done_ids={"a", "b", "c"}, done_before={"b"})
    assert counts.already_done == 1 and counts.done == 3


def test_a_run_row_has_every_column_of_the_runs_table():
    started = datetime(2026, 1, 1, tzinfo=UTC)
    built = records.run_row("r", "backfill", "d", started, started, "busy", missing=2,
                            details={"x": 1})  # fmt: skip
    assert list(built.to_dict()) == RUN_SCHEMA.names
    assert built.images_missing == 2 and built.to_dict()["details"] == '{"x": 1}'
    assert RunRow.from_dict(built.to_dict()) == built  # read back typed, details parsed


def test_a_run_row_reads_back_typed_and_keeps_what_it_cannot_parse(tmp_path):
    """The runs table read back: kinds and outcomes as the vocabulary's enums, details parsed;
    a kind of a newer leukoflow stays a string and damaged details are kept, not dropped."""
    store = open_location(str(tmp_path))
    started = datetime(2026, 1, 1, tzinfo=UTC)
    write_run(store, records.run_row("a", RunKind.SCORE, "d", started, None, Outcome.RUNNING))
    newer = records.run_row("b", "relabel", "d", started.replace(hour=1), started, "completed")
    write_run(store, replace(newer, details={}))
    table = pa.Table.from_pylist([{**newer.to_dict(), "details": "{not json"}], schema=RUN_SCHEMA)
    pq.write_table(table, f"{tmp_path}/runs/run-b.parquet")
    first, second = read_run_rows(store)
    assert (type(first.kind), type(first.outcome), first.details) == (RunKind, Outcome, {})
    assert (second.kind, second.outcome) == ("relabel", Outcome.COMPLETED)
    assert second.details == {"unreadable": "{not json"}
