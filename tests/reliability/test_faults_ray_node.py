"""A Ray node lost in the middle of a run: the second node of the session's two-node cluster
(tests/conftest.py `ray_cluster`) is killed whole, kill -9 of every one of its processes at
once; its backbone actor restarts on the head and the run finishes with every vector once.

The node is started again afterwards, so the cluster is whole for any later test."""

from __future__ import annotations

import os
import signal

import pytest
from servers import SHARED_PREFECT_SETTINGS

from leukoflow.features.synthetic import make_synthetic_dataset

from .harness import Background, children_of, command_line, feature_ids, freeze, last_json, parts

pytestmark = pytest.mark.integration

N_CELLS = 48  # 24 batches of 2
BOTH = ("vgg16", "vgg19")  # two actors: SPREAD puts one on each node


def backbone_actors(node) -> list[int]:
    """Backbone actor processes of one Ray node (its `ray start` and every descendant)."""
    return [p for p in children_of(node.process.pid)
            if command_line(p).startswith("ray::BackboneActor")]  # fmt: skip


def test_a_lost_ray_node_moves_its_work_to_the_surviving_node(ray_cluster, tmp_path):
    images = make_synthetic_dataset(
        tmp_path / "images", n_subjects=6, cells_per_subject=8, image_side=32
    )
    nodes = {row["node_id"]: row for row in ray_cluster.alive_nodes()}
    (head_id,) = [n for n, row in nodes.items() if "leukoflow_head" in row["resources_total"]]
    (lost_id,) = [n for n, row in nodes.items() if "leukoflow_worker" in row["resources_total"]]
    head, worker = ray_cluster.head, ray_cluster.worker
    env = {
        **ray_cluster.env,
        **{k: os.environ[k] for k in SHARED_PREFECT_SETTINGS if k in os.environ},
    }
    store = tmp_path / "store"
    folders = {name: store / "features" / f"backbone={name}" for name in BOTH}
    run = Background(
        "run", images, "--store", store, "--weights", "none", "--backbones", ",".join(BOTH),
        "--image-size", "32", "--batch-size", "2", "--ray-address", ray_cluster.address,
        "--json", env=env, workdir=tmp_path / "driver",
    )  # fmt: skip
    try:
        (lost_pid,) = run.wait_for(lambda: backbone_actors(worker), 240, "an actor on node 2")
        (kept_pid,) = run.wait_for(lambda: backbone_actors(head), 60, "an actor on the head")
        run.wait_for(lambda: min(len(parts(f)) for f in folders.values()) >= 2, 240,
                     "the first batches of both backbones")  # fmt: skip
        freeze(lost_pid)  # its batch stays unfinished: the node dies with work in hand
        rows_before = {name: feature_ids(folder) for name, folder in folders.items()}
        alive_actors = ray_cluster.state("actors", class_name="BackboneActor", state="ALIVE")
        ours = {row["pid"]: row for row in alive_actors if row["pid"] in (lost_pid, kept_pid)}
        node_processes = [worker.process.pid, *children_of(worker.process.pid)]
        for pid in node_processes:  # the whole node at once: raylet, workers, agents
            os.kill(pid, signal.SIGKILL)
        run.wait_for(
            lambda: ray_cluster.state("nodes", node_id=lost_id)[0]["state"] == "DEAD",
            60, "Ray to declare the node dead",
        )  # fmt: skip
        run.wait_for(
            lambda: [p for p in backbone_actors(head) if p != kept_pid],
            180, "the lost node's actor to restart on the head",
        )  # fmt: skip
        result = run.finish()
    finally:
        run.stop()
        ray_cluster.restart_worker()
    assert result.returncode == 0, result.stderr[-4000:]
    summary = last_json(result.stdout)
    assert summary["extraction"]["computed"] == {name: N_CELLS for name in BOTH}
    # Where the actors were placed: one on each node; the lost one's vectors were unfinished.
    placed = summary["extraction"]["actor_nodes"]
    assert sorted(placed.values()) == sorted([head_id, lost_id])
    (lost_backbone,) = [name for name, node in placed.items() if node == lost_id]
    assert len(rows_before[lost_backbone]) < N_CELLS
    # Ray's own record of the run's two actors: the lost one restarted, on the head.
    assert set(ours) == {lost_pid, kept_pid}, ours
    (job_id,) = {row["job_id"] for row in ours.values()}
    actors = {row["actor_id"]: row for row in ray_cluster.state("actors", job_id=job_id)}
    lost, kept = actors[ours[lost_pid]["actor_id"]], actors[ours[kept_pid]["actor_id"]]
    # (The state API writes its 64-bit counters as strings.)
    assert int(lost["num_restarts"]) >= 1 and lost["node_id"] == head_id, lost
    assert int(kept["num_restarts"]) == 0 and kept["node_id"] == head_id, kept
    # Every vector once: the batch in flight on the lost node was redone, never written twice.
    for name, folder in folders.items():
        ids = feature_ids(folder)
        assert len(ids) == len(set(ids)) == N_CELLS
        assert set(rows_before[name]) <= set(ids)
