"""`leukoflow score` against its limits, as a process: `--timeout` (the flow's own),
`--batch-timeout` with a backbone actor that is stuck (SIGSTOP), and `--wait` while another holder
keeps the store's lease. A stopped actor cannot finish its batch whatever the machine's speed,
so each outcome is forced, not raced. The processes report to the run's Prefect server
(PREFECT_API_URL).
"""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from reliability.harness import Background, last_json

from leukoflow.features.synthetic import make_synthetic_dataset
from leukoflow.store.lease import SWEEP_LEASE, StoreLease, lease_location, read_lease
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_predictions, read_runs

pytestmark = pytest.mark.integration


@pytest.fixture
def store(trained, tmp_path) -> Path:
    """This test's own copy of the trained store."""
    shutil.copytree(trained["store"], tmp_path / "store")
    return tmp_path / "store"


def new_cells(folder: Path, n_subjects: int, cells_per_subject: int, seed: int) -> Path:
    """Cells the model has never seen (the sweep must extract their vectors with Ray)."""
    return make_synthetic_dataset(
        folder, n_subjects=n_subjects, cells_per_subject=cells_per_subject, image_side=32,
        seed=seed,
    )  # fmt: skip


def cli_env() -> dict[str, str]:
    """The test's environment (the run's Prefect server included), without a stray cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LEUKOFLOW_DEBUG")}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_USAGE_STATS_ENABLED": "0"}


def runs_of(store: Path, date: str) -> list[dict]:
    return [
        r
        for r in read_runs(open_location(str(store))).to_pylist()
        if r["kind"] == "score" and json.loads(r["details"])["date"] == date
    ]


def prediction_ids(store: Path, date: str) -> list[str]:
    table = read_predictions(open_location(str(store)), date, columns=["image_id"])
    return table.column("image_id").to_pylist()


def lease_held(store: Path) -> bool:
    return read_lease(lease_location(open_location(str(store)), SWEEP_LEASE)) is not None


def feature_files(store: Path) -> int:
    folder = store / "features" / "backbone=vgg16"
    return len(list(folder.glob("part-*.parquet"))) if folder.exists() else 0


def run_failure_line(stderr: str) -> str:
    """The one `leukoflow: run failed:` line of a failed run (exit 1), its last line. (Prefect's
    log above it may show the traceback: the CLI keeps those only for user and store errors.)"""
    lines = [line for line in stderr.splitlines() if line.startswith("leukoflow: ")]
    assert len(lines) == 1 and lines[0] == stderr.strip().splitlines()[-1], stderr[-3000:]
    assert lines[0].startswith("leukoflow: run failed:"), lines[0]
    return lines[0]


def freeze_actors(run: Background, ready) -> list[int]:
    """SIGSTOP the run's backbone actors as soon as `ready()`; the pids stopped (none if the run
    ended first). The run is ended, stopped actors included, by run.finish / run.stop."""
    deadline = time.monotonic() + 600
    while run.process.poll() is None and time.monotonic() < deadline:
        if ready() and (actors := run.actor_pids()):
            for pid in actors:
                os.kill(pid, signal.SIGSTOP)
            return actors
        time.sleep(0.01)
    return []


def test_a_sweep_stopped_by_its_timeout_leaves_a_timed_out_row_and_a_free_store(store, tmp_path):
    inbox = new_cells(tmp_path / "inbox", 4, 6, seed=41)  # 24 batches of one cell
    date = "2026-04-01"
    before = feature_files(store)
    run = Background(
        "score", inbox, "--store", store, "--date", date, "--timeout", "20", "--batch-size", "1",
        "--json", env=cli_env(), workdir=tmp_path / "sweep",
    )  # fmt: skip
    try:
        # Its backbone actor is stopped once its first batch is written: the sweep cannot
        # finish, whatever the machine's speed, and only its 20 s timeout ends it (no
        # --batch-timeout given: 30 min).
        # (On a slow machine the timeout may strike before the first batch: timed out all the
        # same.)
        freeze_actors(run, lambda: feature_files(store) > before)
        result = run.finish(timeout=300)
    finally:
        run.stop()
    assert result.returncode == 1, result.stderr[-3000:]
    line = run_failure_line(result.stderr)
    assert "SweepTimedOut" in line and "timeout of 20 s (--timeout)" in line, line
    (row,) = runs_of(store, date)
    assert row["outcome"] == "timed_out" and row["finished_at"] is not None
    assert json.loads(row["details"])["message"] == "stopped after its timeout of 20.0 s"
    assert prediction_ids(store, date) == []  # no vector came back: nothing was scored
    assert not lease_held(store)  # the next night is not blocked


def test_a_stuck_actor_fails_the_night_after_the_batch_timeout(store, tmp_path):
    inbox = new_cells(tmp_path / "inbox", 8, 6, seed=42)  # 48 batches of one cell
    date = "2026-04-02"
    before = feature_files(store)
    run = Background(
        "score", inbox, "--store", store, "--date", date, "--batch-timeout", "5",
        "--batch-size", "1", "--timeout", "600", "--json",
        env=cli_env(), workdir=tmp_path / "sweep",
    )  # fmt: skip
    try:
        # Stopped once its first batch is written (the actor is loaded and working): a batch in
        # flight then never comes back.
        frozen = freeze_actors(run, lambda: feature_files(store) > before)
        result = run.finish(timeout=300)
    finally:
        run.stop()
    assert frozen, "the sweep never wrote a vector"
    assert result.returncode == 1, result.stderr[-3000:]
    line = run_failure_line(result.stderr)
    assert "BatchTimedOut" in line and "--batch-timeout of 5 s" in line, line
    (row,) = runs_of(store, date)
    # A failed night, not a timed-out one: the sweep's own 600 s were far from spent.
    assert row["outcome"] == "failed" and row["finished_at"] is not None, row
    assert "--batch-timeout of 5" in json.loads(row["details"])["message"]
    assert 0 < feature_files(store) - before < 48 and prediction_ids(store, date) == []
    assert not lease_held(store)


def test_score_wait_waits_for_the_lease_and_then_sweeps(trained, store, tmp_path):
    date = "2026-04-03"
    root = open_location(str(store))
    holder = StoreLease(lease_location(root, SWEEP_LEASE), "sweep", 300, "nightly-backfill")
    holder.acquire()
    # The training cells as tonight's inbox: their vectors are in the store (no Ray needed).
    run = Background(
        "score", trained["train"], "--store", store, "--date", date, "--wait", "300", "--json",
        env=cli_env(), workdir=tmp_path / "sweep",
    )  # fmt: skip
    try:
        stderr = tmp_path / "sweep" / "stderr.txt"
        run.wait_for(lambda: "waiting up to 300 s" in stderr.read_text(), 300,
                     "the sweep to say it waits for the lease")  # fmt: skip
        assert read_lease(lease_location(root, SWEEP_LEASE)).run_id == "nightly-backfill"
        assert runs_of(store, date) == []  # waiting: nothing done yet, not even a busy row
        holder.release()
        result = run.finish(timeout=300)
    finally:
        holder.release()
        run.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert summary["outcome"] == "completed" and summary["lease"] is None
    assert summary["counts"]["scored"] == 24 and summary["counts"]["computed"] == 0
    assert "nightly-backfill" in result.stderr  # the waiting line named the holder
    (row,) = runs_of(store, date)
    assert row["outcome"] == "completed" and row["run_id"] == summary["run_id"]
    assert not lease_held(store)
