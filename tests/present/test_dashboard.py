"""The ops dashboard: built from a store's sweep rows, then opened in a real headless Chromium."""

import json
import math
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import matplotlib.dates as mdates
import pytest

from leukoflow.present.dashboard import (
    dashboard_view,
    load_sweeps,
    night_series,
    nightly_series,
    plot_counts,
    plot_flagged,
    render_dashboard,
    write_dashboard,
)
from leukoflow.scoring import score as sc
from leukoflow.store.lease import SWEEP_LEASE, StoreLease, lease_location
from leukoflow.store.pseudonym import subject_key, subject_salt
from leukoflow.store.records import run_row
from leukoflow.store.storage import open_location
from leukoflow.store.tables import write_run

CHROMIUM = "/usr/bin/chromium"
PLOTS = ("images-scored", "flagged", "quarantined", "throughput", "drift")
MRN = "MRN-0048213-77"  # what a hospital manifest's subject id can look like
START = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


def sweep_row(
    night: str,
    started: datetime,
    run_id: str,
    scored: int,
    warning: bool = False,
    outcome: str = "completed",
    subject: str = MRN,
    model_id: str = "model-1",
    rule_text: str = ">= 2 flagged cells or > 50% of a subject's cells",
) -> dict:
    """A sweep's run row as the nightly flow writes it: `scored` cells of one flagged subject
    (`subject`) and two cells of a passed one."""
    rule = sc.SubjectRule(2, 0.5)
    subjects = sc.summarise_subjects(
        [subject] * scored + ["H3"] * 2,
        [0.9] * scored + [0.1, 0.2],
        ["all"] * scored + ["hem"] * 2,
        rule,
    )
    finished = started + timedelta(seconds=20) if outcome != "running" else None
    details = {
        "date": night,
        "score_kind": "probability",
        "threshold": 0.5,
        "non_clinical": True,
        "counts": {"found": scored + 2, "quarantined_new": 1, "missing": 0},
        "seconds": 20.0,
        "drift": {
            "cells": scored,
            "feature_shift": 1.8 if warning else 0.3,
            "score_ks": 0.2,
            "warning": warning,
            "reasons": [],
            "thresholds": sc.DriftThresholds().as_dict(),
        },
        "subject_rule": {**rule.as_dict(), "text": rule_text},
        "night": sc.night_totals(subjects),
        "subjects": subjects,
    }
    return run_row(
        run_id, "score", "inbox", started, finished, outcome,
        found=scored + 2, new=scored, featurised=scored, quarantined=1, duplicate=1,
        scored=scored, images_per_second=round(scored / 20, 3) if scored else None,
        model_id=model_id, weights_id="random-seed0", details=details,
    )  # fmt: skip


def busy_row(night: str, started: datetime, run_id: str, outcome: str) -> dict:
    """A sweep that found another one holding the lease (busy) or ran out of time."""
    details = {"date": night, "counts": {}, "message": outcome}
    finished = started + timedelta(seconds=2)
    return run_row(run_id, "score", "inbox", started, finished, outcome, details=details)


@pytest.fixture
def store(tmp_path):
    root = open_location(str(tmp_path / "store"))
    for day in range(3):
        night = (START + timedelta(days=day)).date().isoformat()
        started = START + timedelta(days=day)
        write_run(root, sweep_row(night, started, f"run-{day}", 4 + day, warning=day == 2))
    # A sweep killed on night 3 (its row still says running, its lease is gone) and one running.
    killed = START + timedelta(days=2, hours=1)
    write_run(root, sweep_row("2026-03-03", killed, "run-killed", 0, outcome="running"))
    live = START + timedelta(days=3)
    write_run(root, sweep_row("2026-03-04", live, "run-live", 0, outcome="running"))
    StoreLease(lease_location(root, SWEEP_LEASE), "sweep", 60, "run-live").acquire()
    return root


def test_nights_aggregate_their_sweeps(store):
    nights = nightly_series(load_sweeps(store), limit=60)
    assert [n["date"] for n in nights] == ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"]
    third = nights[2]
    assert third["runs"] == 2 and third["cells_scored"] == 8 and third["subjects_flagged"] == 1
    assert third["drift_warning"] is True and third["feature_shift"] == 1.8
    assert nights[0]["quarantined_new"] == 1 and nights[0]["images_per_second"] == 0.2
    assert nights[3]["cells_scored"] == 0 and nights[3]["images_per_second"] is None
    assert [n["completed"] for n in nights] == [True, True, True, False]
    assert [n["date"] for n in nightly_series(load_sweeps(store), limit=2)] == [
        "2026-03-03",
        "2026-03-04",
    ]


def test_the_page_is_self_contained_and_names_interrupted_sweeps(store, tmp_path):
    out = tmp_path / "dashboard.html"
    now = START + timedelta(days=3, hours=1)
    facts = write_dashboard(store, open_location(str(out)), now=now)
    assert facts == {"path": str(out), "nights": 4, "runs": 5, "stale": False}
    page = out.read_text()
    for plot in PLOTS:
        assert f"id='plot-{plot}'" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # The page says where the nights' results go: FHIR, alerts, metrics.
    for command in ("leukoflow export fhir", "--notify BLOCK", "leukoflow metrics"):
        assert command in page
    assert "<link" not in page and "@import" not in page and "NOT CLINICALLY MEANINGFUL" in page
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert page.count("<img ") == len(PLOTS)  # every image is one of the inline plots
    runs_table = page[page.index("id='runs'") :]
    assert "interrupted" in runs_table and "<td>running</td>" in runs_table
    subjects = page[page.index("id='subjects'") : page.index("id='runs'")]
    key = subject_key(MRN, subject_salt(store))
    assert f"<tr class='flagged'><td>{key}</td><td>YES</td>" in subjects
    assert "id='stale'" not in page


def test_subjects_show_only_their_pseudonym(tmp_path):
    """The runs table of an older store holds raw ids; a newer sweep writes keys: the page
    shows keys for both, and the MRN-like id appears nowhere in it."""
    root = open_location(str(tmp_path / "store"))
    salt = subject_salt(root)
    write_run(root, sweep_row("2026-03-01", START, "run-old", 3, subject=MRN))
    out = tmp_path / "old.html"
    write_dashboard(root, open_location(str(out)), now=START)
    page = out.read_text()
    assert MRN not in page and "0048213" not in page
    assert subject_key(MRN, salt) in page and subject_key("H3", salt) in page
    # A row keyed already is shown as it is, not keyed a second time.
    keyed = subject_key(MRN, salt)
    later = START + timedelta(days=1)
    write_run(root, sweep_row("2026-03-02", later, "run-new", 3, subject=keyed))
    write_dashboard(root, open_location(str(out)), now=later)
    subjects = out.read_text().split("id='subjects'")[1].split("id='runs'")[0]
    assert f"<td>{keyed}</td>" in subjects and MRN not in subjects


def test_text_is_escaped(tmp_path):
    row = sweep_row(
        "2026-03-01", START, "run-0", 3, model_id="<script>alert(1)</script>",
        rule_text="<b>rule</b> & more",
    )  # fmt: skip
    sweeps = [row]
    page = render_dashboard(
        nightly_series(sweeps, 60), sweeps, None, "/store?<x>", START, pseudonym=lambda s: s
    )
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>rule</b>" not in page and "&lt;b&gt;rule&lt;/b&gt; &amp; more" in page
    assert "/store?&lt;x&gt;" in page


def test_a_stale_banner_when_the_last_completed_sweep_is_old(store):
    sweeps = load_sweeps(store)
    nights = nightly_series(sweeps, 60)
    last_done = START + timedelta(days=2, seconds=20)  # night 3's completed sweep finished

    def stale(now, **kwargs):
        kw = {"pseudonym": lambda s: s, **kwargs}
        return dashboard_view(nights, sweeps, "run-live", "/s", now, **kw).stale

    assert stale(last_done + timedelta(hours=35)) is None
    banner = stale(last_done + timedelta(hours=37))
    assert banner and "37 h ago" in banner and "2026-03-03" in banner and "36 h" in banner
    assert stale(last_done + timedelta(hours=13), stale_after_hours=12)
    assert stale(last_done + timedelta(hours=11), stale_after_hours=12) is None
    page = render_dashboard(
        nights, sweeps, "run-live", "/s", last_done + timedelta(days=3), pseudonym=lambda s: s
    )
    assert "id='stale'" in page and "72 h ago" in page


def test_busy_and_timed_out_nights_are_not_good_nights_and_missing_nights_are_gaps(tmp_path):
    root = open_location(str(tmp_path / "store"))
    day = timedelta(days=1)
    write_run(root, sweep_row("2026-03-01", START, "run-1", 4))
    # 2026-03-02: no sweep at all. 2026-03-03: busy, then timed out. 2026-03-04: completed.
    write_run(root, busy_row("2026-03-03", START + 2 * day, "run-busy", "busy"))
    write_run(
        root, busy_row("2026-03-03", START + 2 * day + timedelta(hours=1), "run-t", "timed_out")
    )
    write_run(root, sweep_row("2026-03-04", START + 3 * day, "run-4", 6))
    sweeps = load_sweeps(root)
    nights = nightly_series(sweeps, 60)
    assert [n["date"] for n in nights] == ["2026-03-01", "2026-03-03", "2026-03-04"]
    assert nights[1]["completed"] is False and nights[1]["outcomes"] == ["busy", "timed_out"]

    series = night_series(nights)
    assert [d.isoformat() for d in series.days] == [
        "2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04",
    ]  # fmt: skip
    assert series.state == ("completed", "missing", "unhealthy", "completed")
    scored = series.values["cells_scored"]
    assert scored[0] == 6 and math.isnan(scored[1]) and math.isnan(scored[2]) and scored[3] == 8

    # Bars sit on a real date axis: one per completed night, none on the gap or the busy night.
    ax = plot_counts(series, "cells_scored", "scored", "#4f81bd").axes[0]
    bars = [p.get_x() + p.get_width() / 2 for bar in ax.containers for p in bar]
    assert bars == [mdates.date2num(series.days[0]), mdates.date2num(series.days[3])]
    assert isinstance(ax.xaxis.get_major_formatter(), mdates.ConciseDateFormatter)

    out = tmp_path / "page.html"
    write_dashboard(root, open_location(str(out)), now=START + 3 * day)
    runs_table = out.read_text().split("id='runs'")[1]
    assert "<tr class='unhealthy'><td>" in runs_table
    assert "<td>busy</td>" in runs_table and "<td>timed_out</td>" in runs_table


def test_subject_and_cell_counts_have_separate_axes(store):
    series = night_series(nightly_series(load_sweeps(store), 60))
    cells, subjects = plot_flagged(series).axes
    labels = {ax: ax.get_legend_handles_labels()[1] for ax in (cells, subjects)}
    # (Night 4's sweep is still running: hatched on both, "no completed sweep".)
    assert labels[cells] == ["no completed sweep", "flagged cells"]
    assert labels[subjects] == ["no completed sweep", "subjects seen", "subjects flagged"]
    # Night 3: 6 flagged cells, 1 of 2 subjects flagged; each on its own scale.
    assert max(p.get_height() for bar in cells.containers for p in bar) == 6
    assert max(p.get_height() for bar in subjects.containers for p in bar) == 2


def test_an_empty_store_still_gives_a_page(tmp_path):
    out = tmp_path / "empty.html"
    store = tmp_path / "s"
    facts = write_dashboard(open_location(str(store)), open_location(str(out)))
    assert facts["runs"] == 0 and facts["stale"] is False
    assert "No nightly sweeps" in out.read_text()
    assert not store.exists()  # reading a store writes nothing into it, not even a salt


# A probe appended to a copy of the page: in the load event (every image has loaded or failed by
# then) it writes what the browser made of each image into the DOM, which --dump-dom prints.
PROBE = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre');
  out.id = 'render-check';
  out.textContent = JSON.stringify([...document.images].map((img) => ({
    id: img.id, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight})));
  document.body.appendChild(out);
});
</script>"""


def test_headless_chromium_renders_every_plot(store, tmp_path):
    assert os.access(CHROMIUM, os.X_OK), "chromium is missing: `make test` installs it"
    page = tmp_path / "dashboard.html"
    write_dashboard(store, open_location(str(page)))
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "chromium-profile"
    try:
        result = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    found = re.search(r'<pre id="render-check">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the probe did not run: {result.stderr[-2000:]}"
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert [i["id"] for i in images] == [f"plot-{p}" for p in PLOTS]
    for image in images:
        assert image["complete"] and image["width"] > 200 and image["height"] > 100, image
