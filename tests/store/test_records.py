"""Accounting by measurement, run rows and model records: plain functions on small inputs."""

from datetime import UTC, datetime

from leukoflow.store import records
from leukoflow.store.tables import RUN_SCHEMA, CatalogRow
from leukoflow.vocabulary import ImageStatus


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
    assert list(built) == RUN_SCHEMA.names
    assert built["images_missing"] == 2 and built["details"] == '{"x": 1}'
