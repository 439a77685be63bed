"""`leukoflow metrics` as a user meets it, in-process (typer's CliRunner; `main` where the error
boundary matters): the edges tests/present/test_metrics.py leaves out. A missing store is bad
usage (exit 2, one line); an empty store is not an error (zero sweeps, no hours-since sample);
only run rows of kind "score" count; an s3:// store (moto) reads the same as a local one;
--json's last line is one JSON object after the exposition."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from leukoflow.cli import app
from leukoflow.present import metrics
from leukoflow.scoring import score as sc
from leukoflow.store.records import run_row
from leukoflow.store.storage import Location, open_location
from leukoflow.store.tables import write_run

from . import assert_user_error, leukoflow_here

START = datetime(2026, 4, 1, 2, 0, tzinfo=UTC)
MRN = "MRN-0099123-45"  # a subject id as a hospital manifest may write it


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}, parsed by prometheus_client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def invoke(*args: str):
    # Typer's runner keeps stderr apart so the one error line can be counted.
    return CliRunner().invoke(app, ["metrics", *map(str, args)])


def a_sweep(store: Location, night: str, started: datetime, run_id: str, outcome: str) -> None:
    """One sweep row: three cells of one flagged subject (the scoring rule decides), or none."""
    rule = sc.SubjectRule(2, 0.5)
    cells = 3 if outcome == "completed" else 0
    subjects = sc.summarise_subjects([MRN] * cells, [0.9] * cells, ["all"] * cells, rule)
    details = {
        "date": night,
        "counts": {"found": cells, "quarantined_new": 0, "missing": 0},
        "seconds": 10.0,
        "night": sc.night_totals(subjects),
        "subjects": subjects,
    }
    finished = started + timedelta(seconds=10)
    write_run(
        store,
        run_row(
            run_id, "score", "inbox", started, finished, outcome,
            found=cells, new=cells, featurised=cells, scored=cells,
            images_per_second=0.3 if cells else None, details=details,
        ),
    )  # fmt: skip


def test_a_missing_store_is_bad_usage_in_one_line(tmp_path, capsys):
    # The error boundary lives in `main` (CliRunner on `app` would see the bare exception).
    result = leukoflow_here(capsys, "metrics", "--store", tmp_path / "no-such-store")
    assert_user_error(result, "no store")
    assert result.stdout == ""


def test_an_empty_store_prints_zero_nights_and_no_age(tmp_path):
    (tmp_path / "store").mkdir()
    result = invoke("--store", tmp_path / "store", "--json")
    assert result.exit_code == 0, result.stderr
    *exposition, last = result.stdout.strip().splitlines()
    summary = json.loads(last)
    assert summary["nights"] == 0 and summary["sweeps"] == {}
    assert summary["last_completed_at"] is None and summary["model_id"] is None
    got = samples("\n".join(exposition) + "\n")
    assert {v for (name, _), v in got.items() if name == "leukoflow_sweeps"} == {0}
    assert ("leukoflow_hours_since_last_completed_night", ()) not in got
    assert not [name for name, _ in got if name.startswith("leukoflow_night_")]


def test_only_sweeps_count_and_an_s3_store_reads_the_same(s3_env):
    store = open_location(f"s3://{s3_env.make_bucket('metrics')}/store")
    a_sweep(store, "2026-04-01", START, "sweep-1", "completed")
    a_sweep(store, "2026-04-02", START + timedelta(days=1), "sweep-2", "failed")
    # A training run in the same runs/ table is no night.
    train_finished = START + timedelta(days=1, hours=3)
    write_run(store, run_row("train-1", "run", "c-nmc", START, train_finished, "completed"))

    result = invoke("--store", store.uri)
    assert result.exit_code == 0, result.stderr
    got = samples(result.stdout)
    assert got[("leukoflow_sweeps", (("outcome", "completed"),))] == 1
    assert got[("leukoflow_sweeps", (("outcome", "failed"),))] == 1
    first, second = (("night", "2026-04-01"),), (("night", "2026-04-02"),)
    assert got[("leukoflow_night_images_scored", first)] == 3
    assert got[("leukoflow_night_subjects_flagged", first)] == 1
    assert got[("leukoflow_night_completed", first)] == 1
    assert got[("leukoflow_night_completed", second)] == 0
    # The age is of the completed sweep (the failed one and the training run do not reset it).
    hours = got[("leukoflow_hours_since_last_completed_night", ())]
    expected = (datetime.now(UTC) - (START + timedelta(seconds=10))).total_seconds() / 3600
    assert abs(hours - expected) < 1
    assert MRN not in result.stdout


def test_every_family_has_help_and_gauges_carry_no_counter_suffix():
    now = START
    text = metrics.exposition(metrics.StoreNights([], {}, None, "m-1"), now)
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    assert set(metrics.series_names()) == names
    for family in families:
        assert family.name.startswith("leukoflow_") and family.documentation.strip()
        assert family.type in {"gauge", "info"} and not family.name.endswith("_total")
