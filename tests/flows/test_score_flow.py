"""The nightly sweep for real, in-process (local Ray, the run's Prefect server): a model trained
once, nights of a growing inbox (copies of earlier images, unreadable files), a store held by
another sweep, recipe mismatches, drift, the model's own patient rule and the dashboard.

The module's store holds nights 1 and 2 (the `nights` fixture); every test that writes to a
store works on its own copy of it, so no test depends on another's order. Sweeps as processes
(killed, racing, timed out, waiting): tests/flows/test_score_nights_cli.py and
test_score_limits_cli.py.
"""

import json
import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukoflow.errors import LeukoflowError
from leukoflow.features.synthetic import make_synthetic_dataset
from leukoflow.recipe import FeatureRecipe
from leukoflow.scoring.score import SubjectRule, SweepSettings, summarise_subjects
from leukoflow.store import registry
from leukoflow.store.lease import SWEEP_LEASE, StoreLease, lease_location, read_lease
from leukoflow.store.pseudonym import subject_key, subject_salt
from leukoflow.store.storage import open_location
from leukoflow.store.tables import (
    featurised_ids,
    read_catalog,
    read_predictions,
    read_runs,
    write_run,
)

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


def sweep_state(world, date, inbox=None, rule=RULE, **options):
    """One in-process sweep; its final Prefect state (its flow run id is the state's)."""
    from leukoflow.flows.score import score_inbox

    flow_options = {k: options.pop(k) for k in ("model", "expected_recipe") if k in options}
    settings = SweepSettings(**{"chunk_size": 5, "drift_min_cells": 1000, **rule, **options})
    inbox = str(inbox or world["inbox"])
    return score_inbox(
        inbox=inbox,
        store=str(world["store"]),
        date=date,
        sweep=settings,
        return_state=True,
        **flow_options,
    )


def sweep(world, date, inbox=None, **options) -> dict:
    """One in-process sweep's summary (its error, raised, if it failed)."""
    return sweep_state(world, date, inbox, **options).result()


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
    later = {"third": work / "inbox-third", "odd": work / "inbox-odd"}
    night_cells(later["third"], "night-3", 3, work)
    night_cells(later["third"], "night-3b", 33, work)
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
    second_state = sweep_state(world, "2026-03-02")
    return {
        "first": first,
        "again": again,
        "second": second_state.result(),
        "second_flow_run_id": second_state.state_details.flow_run_id,
        "before": before,
        "after": after,
        "prefetch": prefetch,
        **later,
    }


@pytest.fixture
def own_world(world, nights, tmp_path):
    """A copy of the module's store after nights 1 and 2, for a test that writes to a store."""
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    return {**world, "store": store}


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
    expected = summarise_subjects(
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
    assert again["counts"]["skipped"] == 12 and again["extraction"]["computed"] == {}
    assert again["extraction"]["actors_ready_at"] is None  # Ray never entered
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


def test_prefect_shows_the_night_as_markdown_and_a_subject_table(nights):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    # The server is the whole run's: read the artifacts of night 2's own flow run, no other.
    own = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[nights["second_flow_run_id"]]))
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=own)}
    assert set(artifacts) == {"nightly-sweep", "nightly-subjects"}
    markdown = artifacts["nightly-sweep"].data
    assert "Nightly sweep 2026-03-02" in markdown and "Subjects flagged" in markdown
    assert nights["second"]["run_id"] in markdown
    table = artifacts["nightly-subjects"].data
    table = json.loads(table) if isinstance(table, str) else table
    subjects = {row["subject"] for row in table}
    # The UI shows pseudonymous subject keys, never the ids (store/pseudonym.py).
    assert subjects == {s["subject_id"] for s in nights["second"]["subjects"]}
    assert len(subjects) == 4 and all(key.startswith("S-") for key in subjects)


class LogLines(logging.Handler):
    """Prefect's flow-run log lines as they are emitted; `seen(text)` is set on a match."""

    def __init__(self, text: str):
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_a_sweep_exits_cleanly_while_the_store_is_held_or_waits_for_it(own_world):
    root = open_location(str(own_world["store"]))
    holder = StoreLease(lease_location(root, SWEEP_LEASE), "sweep", 60, "someone-else")
    holder.acquire()
    runs_before = read_runs(root).num_rows
    busy = sweep(own_world, "2026-03-02")
    assert busy["outcome"] == "busy" and "someone-else" in busy["message"]
    # It did nothing, and says so where ops look: a run row with its outcome.
    runs = read_runs(root).to_pylist()
    assert len(runs) == runs_before + 1
    assert {r["outcome"] for r in runs if r["run_id"] == busy["run_id"]} == {"busy"}

    # With a wait, the sweep says it waits while the lease is held, and runs once it is free.
    waiting = LogLines("waiting up to 120 s")
    flow_log = logging.getLogger("prefect.flow_runs")
    flow_log.addHandler(waiting)
    try:
        with ThreadPoolExecutor(1) as pool:
            waited = pool.submit(sweep, own_world, "2026-03-02", wait_s=120)
            assert waiting.seen.wait(120), "the sweep never said it waits for the lease"
            assert not waited.done(), waited.result()  # not busy: still waiting for the lease
            assert read_lease(lease_location(root, SWEEP_LEASE)).run_id == "someone-else"
            holder.release()
            waited = waited.result(timeout=120)
    finally:
        flow_log.removeHandler(waiting)
        holder.release()
    assert waited["outcome"] == "completed" and waited["counts"]["new"] == 0
    assert waited["counts"]["skipped"] == 24 and waited["lease"] is None  # nothing taken over
    assert read_lease(lease_location(root, SWEEP_LEASE)) is None


def test_models_whose_recipe_cannot_be_reproduced_are_refused(own_world):
    root = open_location(str(own_world["store"]))
    model, record = registry.load_model(root, own_world["model_id"])
    # Saved as models of their own (an edited model.json would be refused as altered).
    others = {
        "other-weights": {"weights_ids": {"vgg16": "random-seed7"}},
        "other-dims": {"dims": [256]},
    }
    for name, change in others.items():
        recipe = {**record.feature_recipe, **change}
        registry.save_model(root, name, model, replace(record, model_id=name,
                                                       feature_recipe=recipe))  # fmt: skip
    with pytest.raises(LeukoflowError, match="random-seed7.*refusing to mis-score"):
        sweep(own_world, "2026-03-09", model="other-weights")
    with pytest.raises(LeukoflowError, match="sizes \\[256\\]"):
        sweep(own_world, "2026-03-09", model="other-dims")
    with pytest.raises(LeukoflowError, match="backbones vgg16.*asks for vgg19"):
        sweep(own_world, "2026-03-09", expected_recipe={"backbones": ["vgg19"]})
    assert prediction_ids(own_world["store"], "2026-03-09") == []
    assert featurised_ids(root, "vgg16", "random-seed7", 32) == set()  # nothing extracted
    assert read_lease(lease_location(root, SWEEP_LEASE)) is None  # released after the failure


def test_a_night_of_very_different_cells_raises_a_drift_warning(own_world, nights):
    odd = sweep(own_world, "2026-03-05", inbox=nights["odd"], drift_min_cells=5)
    usual = nights["second"]["drift"]
    assert odd["counts"]["scored"] == 12 and odd["counts"]["computed"] == 0  # prefetched
    assert odd["drift"]["warning"] is True, odd["drift"]
    assert odd["drift"]["feature_shift"] > 3 * usual["feature_shift"]
    assert usual["warning"] is False  # 12 cells, below drift_min_cells=1000: never a warning


def test_without_a_rule_the_sweep_flags_subjects_by_the_models_patient_rule(own_world, nights):
    root = open_location(str(own_world["store"]))
    recorded = registry.load_record(root, own_world["model_id"]).patient_rule
    threshold = recorded["threshold"]
    assert threshold is not None, recorded  # 6 training subjects of both classes: a rule
    # No --min-flagged-cells / --min-flagged-fraction: the model's own rule decides.
    night = sweep(own_world, "2026-03-04", inbox=nights["third"], rule={})
    assert night["outcome"] == "completed" and night["counts"]["scored"] == 24
    assert night["subject_rule"]["min_flagged_cells"] == 0
    assert night["subject_rule"]["min_flagged_fraction"] == threshold
    assert night["subject_rule"]["inclusive"] is True
    assert "patient rule" in night["subject_rule"]["text"]
    # Each subject flagged exactly when its fraction of flagged cells reaches the threshold,
    # counted here from the prediction rows (learn/patient: a patient is ALL at score >= t).
    salt = subject_salt(root)
    cells: dict[str, list[bool]] = {}
    for row in read_predictions(root, "2026-03-04").to_pylist():
        flagged = row["score"] >= row["threshold"]
        assert row["predicted_label"] == ("all" if flagged else "hem")
        cells.setdefault(subject_key(row["subject_id"], salt), []).append(flagged)
    expected = {key: sum(f) / len(f) >= threshold for key, f in cells.items()}
    assert {s["subject_id"]: s["subject_flagged"] for s in night["subjects"]} == expected
    assert len(expected) == 4 and all(len(f) == 6 for f in cells.values())
    # The rule stays in the night's run row, for whoever reads the night later.
    rows = [r for r in read_runs(root).to_pylist() if r["run_id"] == night["run_id"]]
    assert json.loads(rows[0]["details"])["subject_rule"] == night["subject_rule"]


def test_the_dashboard_shows_the_nights_and_an_interrupted_sweep(own_world, nights):
    from leukoflow.present.dashboard import write_dashboard
    from leukoflow.scoring import score as sc

    root = open_location(str(own_world["store"]))
    record = registry.load_record(root, own_world["model_id"])

    def left_running(run_id: str, date: str) -> None:
        """The row a sweep writes as it starts: what a sweep killed mid-way leaves behind."""
        started = datetime.now(UTC)
        state = sc.Sweep(
            run_id, started, root.uri, str(nights["third"]), "inbox", date, record.model_id,
            record, SubjectRule(**RULE), "random",
        )  # fmt: skip
        write_run(root, state.run_row("running", None))

    left_running("killed-mid-sweep", "2026-03-03")
    left_running("running-now", "2026-03-03")
    # The second still holds the lease: running, not interrupted.
    live = StoreLease(lease_location(root, SWEEP_LEASE), "sweep", 60, "running-now")
    live.acquire()
    try:
        out = own_world["store"].parent / "dashboard.html"
        facts = write_dashboard(root, open_location(str(out)))
    finally:
        live.release()
    page = out.read_text()
    assert facts["nights"] == 3  # 2026-03-01, -02 and the interrupted -03
    assert page.count("data:image/png;base64,") == 5
    assert "NOT CLINICALLY MEANINGFUL" in page and "id='subjects'" in page
    assert page.count("<td>interrupted</td>") == 1 and page.count("<td>running</td>") == 1
