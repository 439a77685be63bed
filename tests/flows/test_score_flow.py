"""The nightly sweep for real: a model trained once, nights of a growing inbox (copies of earlier
images, unreadable files), a sweep killed with SIGKILL, two sweeps racing to finish its work,
recipe mismatches and drift. Sweeps run in-process (local Ray, Prefect's harness) and, where a
process must die or race, as `python -m leukoflow.cli score` subprocesses with their own Prefect.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoflow.errors import LeukoflowError
from leukoflow.tasks import registry
from leukoflow.tasks.lease import SWEEP_LEASE, StoreLease, lease_location, read_lease
from leukoflow.tasks.pseudonym import subject_key, subject_salt
from leukoflow.tasks.recipe import FeatureRecipe
from leukoflow.tasks.score import SubjectRule, SweepSettings, summarize_subjects
from leukoflow.tasks.storage import open_location
from leukoflow.tasks.synthetic import make_synthetic_dataset
from leukoflow.tasks.tables import featurised_ids, read_catalog, read_predictions, read_runs

pytestmark = pytest.mark.integration

RULE = {"min_flagged_cells": 2, "min_flagged_fraction": 0.5}


def night_cells(inbox: Path, name: str, seed: int, work: Path, invert: bool = False) -> list[Path]:
    """12 new cells (4 subjects x 3, C-NMC names) in inbox/<name>/, unlabelled as in an inbox."""
    source = make_synthetic_dataset(
        work / f"src-{name}", n_subjects=4, cells_per_subject=3, image_side=64, seed=seed
    )
    folder = inbox / name
    folder.mkdir(parents=True)
    for cell in sorted(source.rglob("*.bmp")):
        if invert:  # a stain or scanner gone wrong: what drift must notice
            pixels = 255 - np.asarray(Image.open(cell).convert("RGB"))
            Image.fromarray(pixels.astype(np.uint8)).save(folder / cell.name, format="BMP")
        else:
            shutil.copy(cell, folder / cell.name)
    return sorted(folder.iterdir())


def prediction_ids(store, date=None, model_id=None) -> list[str]:
    table = read_predictions(open_location(str(store)), date, model_id, columns=["image_id"])
    return table.column("image_id").to_pylist()


def leukoflow(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "leukoflow.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so the test can clean up after a kill
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local, prefect_harness):
    """A store with a model trained on 24 synthetic cells (vgg16 at 32 px, random weights)."""
    from leukoflow.flows.run import run_pipeline

    work = tmp_path_factory.mktemp("nightly")
    train = make_synthetic_dataset(
        work / "train", n_subjects=6, cells_per_subject=4, image_side=64, seed=0
    )
    store = work / "store"
    trained = run_pipeline(
        images=str(train),
        store=str(store),
        recipe=FeatureRecipe(("vgg16",), weights="none", image_size=32),
        examples_per_kind=0,
    )
    return {"work": work, "store": store, "inbox": work / "inbox", "model_id": trained["model_id"]}


def sweep(world, date, inbox=None, **options):
    from leukoflow.flows.score import score_inbox

    flow_options = {k: options.pop(k) for k in ("model", "expected_recipe") if k in options}
    settings = SweepSettings(**{"chunk_size": 5, "drift_min_cells": 1000, **RULE, **options})
    inbox = str(inbox or world["inbox"])
    return score_inbox(
        inbox=inbox, store=str(world["store"]), date=date, sweep=settings, **flow_options
    )


@pytest.fixture(scope="module")
def nights(world):
    """Night 1 (twice); the later nights' cells featurised ahead by one backfill; night 2."""
    from leukoflow.flows.backfill import backfill

    inbox, work = world["inbox"], world["work"]
    first_cells = night_cells(inbox, "night-1", 1, work)
    shutil.copy(first_cells[0], inbox / "night-1" / "copy-same-night.bmp")
    (inbox / "night-1" / "UID_9_1_1_all.bmp").write_bytes(first_cells[1].read_bytes()[:300])
    first = sweep(world, "2026-03-01")  # extracts its features itself
    store = world["store"]
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    again = sweep(world, "2026-03-01")
    after = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}

    night_cells(inbox, "night-2", 2, work)
    shutil.copy(first_cells[2], inbox / "night-2" / "copy-of-an-earlier-cell.bmp")
    (inbox / "night-2" / "empty.bmp").write_bytes(b"")
    later = {"killed": work / "inbox-killed", "odd": work / "inbox-odd"}
    night_cells(later["killed"], "night-3", 3, work)
    night_cells(later["killed"], "night-3b", 33, work)
    night_cells(later["odd"], "night-5", 5, work, invert=True)
    # One Ray session for every later night: a backfill over all of them. Night 1's cells are
    # in it too, and already have vectors: only what the store lacks is computed.
    collection = work / "collection"
    for source in (inbox, *later.values()):
        shutil.copytree(source, collection / source.name)
    prefetch = backfill(
        images=str(collection),
        store=str(store),
        dataset="collection",
        recipe=FeatureRecipe(("vgg16",), weights="none", image_size=32),
        progress_bar=False,
    )
    second = sweep(world, "2026-03-02")
    return {
        "first": first,
        "again": again,
        "second": second,
        "before": before,
        "after": after,
        "prefetch": prefetch,
        **later,
    }


def test_night_one_scores_every_readable_cell_once(world, nights):
    first = nights["first"]
    assert first["outcome"] == "completed" and first["model_id"] == world["model_id"]
    assert first["counts"] == {
        "found": 14,
        "new": 12,
        "scored": 12,
        "quarantined": 1,
        "quarantined_new": 1,
        "duplicate": 1,
        "skipped": 0,
        "missing": 0,
        "accounted": True,
        "missing_images": [],
        "double_counted_images": [],
        "unscored_at_start": 12,
        "computed": 12,
        "ignored": 0,
    }
    root = open_location(str(world["store"]))
    rows = read_predictions(root, "2026-03-01").to_pylist()
    catalog = read_catalog(root, "inbox").to_pylist()  # as of night 2: keep night 1's folder
    ok = {r["image_id"]: r for r in catalog if r["status"] == "ok" and "/night-1/" in r["uri"]}
    assert sorted(r["image_id"] for r in rows) == sorted(ok) and len(rows) == 12
    for row in rows:
        assert row["uri"] == ok[row["image_id"]]["uri"] and "copy" not in row["uri"]
        assert row["subject_id"] == ok[row["image_id"]]["subject_id"] is not None
        assert row["model_id"] == world["model_id"] and row["score_kind"] == "probability"
        assert row["predicted_label"] == ("all" if row["score"] >= row["threshold"] else "hem")
        assert row["run_id"] == first["run_id"] and row["scored_at"] is not None
    # The subject table is exactly what the prediction rows say under the rule.
    # ... keyed by pseudonym: no raw subject id leaves the store.
    salt = subject_salt(root)
    expected = summarize_subjects(
        [subject_key(r["subject_id"], salt) for r in rows],
        [r["score"] for r in rows],
        [r["predicted_label"] for r in rows],
        SubjectRule(**RULE),
    )
    assert first["subjects"] == expected and first["night"]["cells_scored"] == 12
    assert first["night"]["subjects"] == 4 and first["drift"]["feature_shift"] is not None


def test_the_same_night_twice_writes_nothing_but_its_run_row(world, nights):
    again = nights["again"]
    assert again["counts"]["new"] == 0 and again["counts"]["scored"] == 0
    assert again["counts"]["skipped"] == 12 and again["extraction"] == {}  # Ray never entered
    assert again["seconds"] < 5  # the sweep's own work; start-up is Prefect's (docs/nightly.md)
    assert again["subjects"] == nights["first"]["subjects"]  # the night's table, unchanged
    changed = {p for p, t in nights["after"].items() if nights["before"].get(p) != t}
    assert len(changed) == 1  # no prediction, feature or catalog file: only its run row
    assert next(iter(changed)).name == f"run-{again['run_id']}.parquet"


def test_a_backfill_computes_only_the_vectors_the_store_lacks(nights):
    prefetch = nights["prefetch"]
    # Night 1's 12 cells already had vectors (its sweep made them); nights 2, 3 and 5 did not.
    assert prefetch["extraction"]["computed"] == {"vgg16": 12 + 24 + 12}
    assert prefetch["counts"]["already_featurised"] == 12 and prefetch["counts"]["ok"] == 60


def test_night_two_scores_only_new_cells_and_skips_copies_of_earlier_ones(world, nights):
    second = nights["second"]
    counts = {k: v for k, v in second["counts"].items() if not k.endswith("_images")}
    assert counts == {
        "found": 28,
        "new": 12,
        "scored": 12,
        "quarantined": 2,
        "quarantined_new": 1,
        "duplicate": 2,
        "skipped": 12,
        "missing": 0,
        "accounted": True,
        "unscored_at_start": 12,
        "computed": 0,
        "ignored": 0,
    }
    first_night = prediction_ids(world["store"], "2026-03-01")
    second_night = prediction_ids(world["store"], "2026-03-02")
    assert len(second_night) == len(set(second_night)) == 12
    assert not set(first_night) & set(second_night)
    every = prediction_ids(world["store"], model_id=world["model_id"])
    assert len(every) == len(set(every)) == 24
    runs = {r["run_id"]: r for r in read_runs(open_location(str(world["store"]))).to_pylist()}
    row = runs[second["run_id"]]
    assert (row["outcome"], row["images_new"], row["images_scored"]) == ("completed", 12, 12)
    # found = new + skipped + quarantined + duplicate + missing, every term measured.
    assert row["images_found"] == (
        row["images_new"] + row["images_skipped"] + row["images_quarantined"]
        + row["images_duplicate"] + row["images_missing"]
    )  # fmt: skip


def test_prefect_shows_the_night_as_markdown_and_a_subject_table(world, nights):
    from prefect.artifacts import Artifact

    markdown = Artifact.get("nightly-sweep")
    assert "Nightly sweep 2026-03-02" in markdown.data and "Subjects flagged" in markdown.data
    table = Artifact.get("nightly-subjects")
    subjects = {row["subject"] for row in json.loads(table.data)}
    # The UI shows pseudonymous subject keys, never the ids (tasks/pseudonym.py).
    assert subjects == {s["subject_id"] for s in nights["second"]["subjects"]}
    assert all(key.startswith("S-") for key in subjects)


def test_a_sweep_exits_cleanly_while_the_store_is_held_or_waits_for_it(world, nights):
    root = open_location(str(world["store"]))
    holder = StoreLease(lease_location(root, SWEEP_LEASE), "sweep", 60, "someone-else")
    holder.acquire()
    runs_before = read_runs(root).num_rows
    busy = sweep(world, "2026-03-02")
    assert busy["outcome"] == "busy" and "someone-else" in busy["message"]
    # It did nothing, and says so where ops look: a run row with its outcome.
    runs = read_runs(root).to_pylist()
    assert len(runs) == runs_before + 1
    assert {r["outcome"] for r in runs if r["run_id"] == busy["run_id"]} == {"busy"}
    threading.Timer(1.0, holder.release).start()
    waited = sweep(world, "2026-03-02", wait_s=30)
    assert waited["outcome"] == "completed" and waited["counts"]["new"] == 0


def test_models_whose_recipe_cannot_be_reproduced_are_refused(world, nights):
    root = open_location(str(world["store"]))
    model, record = registry.load_model(root, world["model_id"])
    # Saved as models of their own (an edited model.json would be refused as altered).
    others = {
        "other-weights": {"weights_ids": {"vgg16": "random-seed7"}},
        "other-dims": {"dims": [256]},
    }
    for name, change in others.items():
        recipe = {**record["feature_recipe"], **change}
        registry.save_model(root, name, model, {**record, "model_id": name,
                                                "feature_recipe": recipe})  # fmt: skip
    with pytest.raises(LeukoflowError, match="random-seed7.*refusing to mis-score"):
        sweep(world, "2026-03-09", model="other-weights")
    with pytest.raises(LeukoflowError, match="sizes \\[256\\]"):
        sweep(world, "2026-03-09", model="other-dims")
    with pytest.raises(LeukoflowError, match="backbones vgg16.*asks for vgg19"):
        sweep(world, "2026-03-09", expected_recipe={"backbones": ["vgg19"]})
    assert prediction_ids(world["store"], "2026-03-09") == []
    assert featurised_ids(root, "vgg16", "random-seed7", 32) == set()  # nothing extracted
    assert read_lease(lease_location(root, SWEEP_LEASE)) is None  # released after the failure


def test_a_night_of_very_different_cells_raises_a_drift_warning(world, nights):
    odd = sweep(world, "2026-03-05", inbox=nights["odd"], drift_min_cells=5)
    usual = nights["second"]["drift"]
    assert odd["drift"]["warning"] is True, odd["drift"]
    assert odd["drift"]["feature_shift"] > 3 * usual["feature_shift"]
    assert usual["warning"] is False  # 12 cells, below drift_min_cells=1000: never a warning


def kill_sweep(process: subprocess.Popen) -> None:
    """kill -9 of the sweep process; then, as test hygiene, of what it started (its group)."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its Prefect server, left orphaned
    except ProcessLookupError:
        pass


def test_a_killed_sweep_is_finished_by_two_racing_sweeps_with_each_row_once(world, nights):
    store, date = world["store"], "2026-03-03"
    args = [
        "score",
        str(nights["killed"]),
        "--store",
        str(store),
        "--date",
        date,
        "--chunk-size",
        "1",
        "--json",
    ]
    night = store / "predictions" / f"date={date}"
    victim = leukoflow(*args)
    deadline = time.monotonic() + 240
    while not (night.exists() and any(night.glob("part-*.parquet"))):
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline, "the sweep never wrote a prediction"
        time.sleep(0.005)
    kill_sweep(victim)
    at_kill = prediction_ids(store, date)
    assert 0 < len(at_kill) < 24  # killed between two chunk files

    # Two sweeps at once: one takes over the dead sweep's lease and finishes; the other exits
    # cleanly saying why (or, if they did not overlap, finds the work done).
    racers = [leukoflow(*args), leukoflow(*args)]
    results = [racer.communicate(timeout=300) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], results
    summaries = [last_json(out) for out, _ in results]
    finisher = next(s for s in summaries if s["outcome"] == "completed" and s["counts"]["new"])
    other = next(s for s in summaries if s is not finisher)
    assert "no longer runs" in finisher["lease"]  # the killed sweep's lease did not block
    assert finisher["counts"]["new"] == finisher["counts"]["scored"] == 24 - len(at_kill)
    if other["outcome"] == "busy":
        assert "another sweep holds the lease" in other["message"]
        assert "another sweep holds the lease" in results[summaries.index(other)][1]
    else:
        assert other["outcome"] == "completed" and other["counts"]["new"] == 0
    rows = prediction_ids(store, date)
    assert len(rows) == len(set(rows)) == 24 and set(at_kill) <= set(rows)
    tonight = [
        r
        for r in read_runs(open_location(str(store))).to_pylist()
        if r["kind"] == "score" and json.loads(r["details"])["date"] == date
    ]
    outcomes = Counter(r["outcome"] for r in tonight)
    assert outcomes["running"] == 1  # the killed one, shown as interrupted on the dashboard


def test_the_dashboard_of_this_store_shows_its_nights_and_the_interrupted_sweep(world, nights):
    from leukoflow.tasks.dashboard import write_dashboard

    out = world["work"] / "dashboard.html"
    facts = write_dashboard(open_location(str(world["store"])), open_location(str(out)))
    page = out.read_text()
    assert facts["nights"] >= 3 and page.count("data:image/png;base64,") == 5
    assert "NOT CLINICALLY MEANINGFUL" in page and "id='subjects'" in page
    if (world["store"] / "predictions" / "date=2026-03-03").exists():  # after the kill test
        assert "<td>interrupted</td>" in page
