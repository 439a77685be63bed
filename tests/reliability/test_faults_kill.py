"""A whole run killed with SIGKILL, then restarted; a backbone actor killed mid-batch.

Each strike waits for a condition (the first feature files of the run), then freezes the
backbone actor (SIGSTOP) so the run cannot race past the point of the strike, and strikes: the
assertions then hold on every machine, however fast it extracts.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from leukoflow.features.synthetic import make_synthetic_dataset

from .harness import SMALL_RUN, Background, command_line, feature_ids, freeze, last_json, parts

pytestmark = pytest.mark.integration

N_CELLS = 64  # 32 batches of 2: the strikes land after a few and long before the last


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cells")
    return make_synthetic_dataset(root, n_subjects=8, cells_per_subject=8, image_side=32)


def run_args(images: Path, store: Path) -> tuple:
    return ("run", images, "--store", store, *SMALL_RUN, "--batch-size", 2, "--json")


@pytest.fixture(scope="module")
def killed_then_resumed(cells, cli, tmp_path_factory) -> dict:
    """Run 1 is killed whole (kill -9 of every process at once) after a few batches; run 2
    resumes on the same store, and its backbone actor is killed (kill -9) while batches are
    still to come."""
    base = tmp_path_factory.mktemp("killed")
    store, env = base / "store", cli.env()
    features = store / "features" / "backbone=vgg16"

    first = Background(*run_args(cells, store), env=env, workdir=base / "run-1")
    try:
        first.wait_for(lambda: len(parts(features)) >= 3, 240, "run 1's first feature files")
        freeze(*first.actor_pids())
        first.kill_everything()
        run_1_exit = first.process.returncode
    finally:
        first.stop()
    rows_left_by_run_1 = feature_ids(features)
    files_left_by_run_1 = len(parts(features))
    run_records_after_kill = sorted((store / "runs").glob("*")) if (store / "runs").exists() else []

    second = Background(*run_args(cells, store), env=env, workdir=base / "run-2")
    try:
        second.wait_for(lambda: len(parts(features)) >= files_left_by_run_1 + 2, 240,
                        "run 2's first feature files")  # fmt: skip
        (actor,) = second.wait_for(second.actor_pids, 30, "run 2's backbone actor")
        freeze(actor)  # the batch it holds stays unfinished
        rows_when_killed = feature_ids(features)
        killed_command = command_line(actor)
        os.kill(actor, signal.SIGKILL)
        # Ray must start a new process for the actor (max_restarts): fails here if it does not.
        second.wait_for(
            lambda: [p for p in second.actor_pids() if p != actor], 120, "the actor to restart"
        )
        result = second.finish()
    finally:
        second.stop()
    return {
        "run_1_exit": run_1_exit,
        "rows_left_by_run_1": rows_left_by_run_1,
        "run_records_after_kill": run_records_after_kill,
        "result": result,
        "features": features,
        "killed_command": killed_command,
        "rows_when_killed": rows_when_killed,
    }


def test_a_killed_run_leaves_only_whole_files_and_no_run_record(killed_then_resumed):
    assert killed_then_resumed["run_1_exit"] == -signal.SIGKILL
    rows = killed_then_resumed["rows_left_by_run_1"]  # read back: every visible file is whole
    assert 6 <= len(rows) < N_CELLS  # killed after some batches, before the end
    assert len(rows) == len(set(rows))
    assert killed_then_resumed["run_records_after_kill"] == []


def test_the_restarted_run_redoes_only_the_unfinished_batches(killed_then_resumed):
    result = killed_then_resumed["result"]
    assert result.returncode == 0, result.stderr[-4000:]
    summary = last_json(result.stdout)
    done_before = len(killed_then_resumed["rows_left_by_run_1"])
    assert summary["extraction"]["computed"] == {"vgg16": N_CELLS - done_before}
    assert summary["counts"]["found"] == summary["counts"]["featurised"] == N_CELLS


def test_an_actor_killed_mid_batch_is_restarted_and_nothing_is_lost_or_doubled(
    killed_then_resumed,
):
    assert killed_then_resumed["killed_command"].startswith("ray::BackboneActor")
    # Cells were still to come when it died: the restarted actor computed them, the batch it
    # held included (retried, max_task_retries), and no batch was written twice.
    rows_when_killed = killed_then_resumed["rows_when_killed"]
    assert len(rows_when_killed) < N_CELLS
    ids = feature_ids(killed_then_resumed["features"])
    assert len(ids) == len(set(ids)) == N_CELLS
    assert set(rows_when_killed) < set(ids)
