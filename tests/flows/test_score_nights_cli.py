"""A nightly sweep killed with SIGKILL, finished by the next sweep while a third finds the store
busy, and the dashboard's account of it: `python -m leukoflow.cli score` processes, since the
process dying and the processes overlapping are the point. They report to the run's Prefect
server (PREFECT_API_URL, inherited from the test's environment).
"""

import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from reliability.harness import Background, last_json

from leukoflow.features.synthetic import make_synthetic_dataset
from leukoflow.store.lease import SWEEP_LEASE, lease_location, read_lease
from leukoflow.store.storage import open_location
from leukoflow.store.tables import read_predictions, read_runs

pytestmark = pytest.mark.integration

DATE = "2026-03-03"


def cli_env() -> dict[str, str]:
    """The test's environment (the run's Prefect server included), without a stray cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LEUKOFLOW_DEBUG")}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_USAGE_STATS_ENABLED": "0"}


def prediction_ids(store: Path, date: str) -> list[str]:
    table = read_predictions(open_location(str(store)), date, columns=["image_id"])
    return table.column("image_id").to_pylist()


def lease_pid(store: Path) -> int | None:
    record = read_lease(lease_location(open_location(str(store)), SWEEP_LEASE))
    return None if record is None else record.pid


def poll(condition, timeout_s: float, what: str, run: Background | None = None):
    """Poll `condition` every 5 ms (a chunk file can follow the last within milliseconds)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if run is not None and run.process.poll() is not None:
            raise AssertionError(f"the sweep exited before {what}: {run.finish().stderr[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    return value


def test_a_killed_sweep_is_finished_by_the_next_while_a_third_finds_the_store_busy(
    trained, tmp_path
):
    from leukoflow.present.dashboard import write_dashboard

    store = tmp_path / "store"
    shutil.copytree(trained["store"], store)
    inbox = tmp_path / "inbox"
    for name, seed in (("night-3", 3), ("night-3b", 33)):  # 24 new cells: 4 subjects x 6
        cells = make_synthetic_dataset(
            tmp_path / f"src-{name}", n_subjects=4, cells_per_subject=3, image_side=64, seed=seed
        )
        (inbox / name).mkdir(parents=True)
        for cell in cells.rglob("*.bmp"):
            shutil.copy(cell, inbox / name / cell.name)
    args = ("score", inbox, "--store", store, "--date", DATE, "--chunk-size", "1", "--json")
    night, env = store / "predictions" / f"date={DATE}", cli_env()

    # 1. A sweep extracts the 24 vectors, then is killed (kill -9) between two chunk files.
    victim = Background(*args, env=env, workdir=tmp_path / "victim")
    try:
        poll(lambda: night.exists() and any(night.glob("part-*.parquet")), 300,
             "the sweep's first prediction file", victim)  # fmt: skip
        victim.process.send_signal(signal.SIGKILL)
        assert victim.process.wait(timeout=30) == -signal.SIGKILL
    finally:
        victim.stop()  # its Ray processes, left behind
    at_kill = prediction_ids(store, DATE)
    assert 0 < len(at_kill) < 24  # killed between two chunk files
    assert lease_pid(store) == victim.process.pid  # the dead sweep's lease stays behind

    # 2. The next sweep takes the dead sweep's lease over at once. It is frozen (SIGSTOP) while
    # it holds the lease, so a third sweep started now must find the store busy.
    finisher = Background(*args, env=env, workdir=tmp_path / "finisher")
    try:
        poll(lambda: lease_pid(store) == finisher.process.pid, 300,
             "the next sweep to take the dead sweep's lease", finisher)  # fmt: skip
        os.kill(finisher.process.pid, signal.SIGSTOP)
        assert lease_pid(store) == finisher.process.pid, "it finished before it was frozen"
        rows_before_third = prediction_ids(store, DATE)
        third = Background(*args, env=env, workdir=tmp_path / "third").finish(timeout=300)
        rows_after_third = prediction_ids(store, DATE)
        os.kill(finisher.process.pid, signal.SIGCONT)
        finished = finisher.finish(timeout=300)
    finally:
        finisher.stop()

    # The third exits cleanly (status 0), saying why, and did nothing.
    assert third.returncode == 0, third.stderr[-3000:]
    busy = last_json(third.stdout)
    assert busy["outcome"] == "busy" and "another sweep holds the lease" in busy["message"]
    assert f"pid {finisher.process.pid}" in busy["message"]  # it names the holder
    assert "leukoflow: another sweep holds the lease" in third.stderr
    assert sorted(rows_after_third) == sorted(rows_before_third)
    # The finisher scored exactly what the killed sweep had left, each row once.
    assert finished.returncode == 0, finished.stderr[-3000:]
    done = last_json(finished.stdout)
    assert done["outcome"] == "completed" and "no longer runs" in done["lease"]
    assert done["counts"]["new"] == done["counts"]["scored"] == 24 - len(at_kill)
    assert done["counts"]["skipped"] == len(at_kill) and done["counts"]["computed"] == 0
    rows = prediction_ids(store, DATE)
    assert len(rows) == len(set(rows)) == 24 and set(at_kill) <= set(rows)
    assert lease_pid(store) is None  # released

    # The runs table tells the night's story: one killed ("running"), one busy, one completed.
    root = open_location(str(store))
    tonight = [
        r
        for r in read_runs(root).to_pylist()
        if r["kind"] == "score" and json.loads(r["details"])["date"] == DATE
    ]
    assert Counter(r["outcome"] for r in tonight) == {"running": 1, "busy": 1, "completed": 1}
    killed = next(r for r in tonight if r["outcome"] == "running")
    assert killed["finished_at"] is None
    # ... and the dashboard shows the killed sweep as interrupted, the night as completed.
    out = tmp_path / "dashboard.html"
    facts = write_dashboard(root, open_location(str(out)))
    page = out.read_text()
    assert facts["nights"] == 1 and page.count("<td>interrupted</td>") == 1
    assert page.count("<td>busy</td>") == 1 and page.count("<td>completed</td>") == 1
