"""The ops dashboard: built from a store's sweep rows, then opened in a real headless Chromium."""

import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from leukoflow.tasks import score as sc
from leukoflow.tasks.dashboard import load_sweeps, nightly_series, write_dashboard
from leukoflow.tasks.lease import SWEEP_LEASE, StoreLease, lease_location
from leukoflow.tasks.storage import open_location
from leukoflow.tasks.tables import write_run

CHROMIUM = "/usr/bin/chromium"
PLOTS = ("images-scored", "flagged", "quarantined", "throughput", "drift")


def sweep(night: str, started: datetime, run_id: str, scored: int, warning: bool) -> sc.Sweep:
    rule = sc.SubjectRule(2, 0.5)
    model = {"score_kind": "probability", "threshold": 0.5, "non_clinical": True}
    done = sc.Sweep(
        run_id,
        started,
        "/store",
        "/inbox",
        "inbox",
        night,
        "model-1",
        model,
        rule,
        "random-seed0",
        found=scored + 2,
        new=scored,
        scored=scored,
        quarantined=1,
        quarantined_new=1,
        duplicate=1,
    )
    done.subjects = sc.summarize_subjects(
        ["7"] * scored + ["H3"] * 2,
        [0.9] * scored + [0.1, 0.2],
        ["all"] * scored + ["hem"] * 2,
        rule,
    )
    done.drift = {
        "cells": scored,
        "feature_shift": 1.8 if warning else 0.3,
        "score_ks": 0.2,
        "warning": warning,
        "reasons": [],
        "thresholds": sc.DriftThresholds().as_dict(),
    }
    return done


@pytest.fixture
def store(tmp_path):
    root = open_location(str(tmp_path / "store"))
    start = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
    for day in range(3):
        night = (start + timedelta(days=day)).date().isoformat()
        started = start + timedelta(days=day)
        row = sweep(night, started, f"run-{day}", 4 + day, warning=day == 2)
        write_run(root, row.run_row("completed", started + timedelta(seconds=20)))
    # A sweep killed on night 3 (its row still says running, its lease is gone) and one running.
    killed = sweep("2026-03-03", start + timedelta(days=2, hours=1), "run-killed", 0, False)
    write_run(root, killed.run_row("running", None))
    live = sweep("2026-03-04", start + timedelta(days=3), "run-live", 0, False)
    write_run(root, live.run_row("running", None))
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
    assert [n["date"] for n in nightly_series(load_sweeps(store), limit=2)] == [
        "2026-03-03",
        "2026-03-04",
    ]


def test_the_page_is_self_contained_and_names_interrupted_sweeps(store, tmp_path):
    out = tmp_path / "dashboard.html"
    facts = write_dashboard(store, open_location(str(out)))
    assert facts == {"path": str(out), "nights": 4, "runs": 5}
    page = out.read_text()
    for plot in PLOTS:
        assert f"id='plot-{plot}'" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "<link" not in page and "NOT CLINICALLY MEANINGFUL" in page
    assert page.count("data:image/png;base64,") == len(PLOTS)
    runs_table = page[page.index("id='runs'") :]
    assert "interrupted" in runs_table and "<td>running</td>" in runs_table
    subjects = page[page.index("id='subjects'") : page.index("id='runs'")]
    assert "<tr class='flagged'><td>7</td><td>YES</td>" in subjects


def test_an_empty_store_still_gives_a_page(tmp_path):
    out = tmp_path / "empty.html"
    assert write_dashboard(open_location(str(tmp_path / "s")), open_location(str(out)))["runs"] == 0
    assert "No nightly sweeps" in out.read_text()


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
