"""`leukoflow run --ray-address` on a real two-node Ray cluster started with `ray start`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

import pytest
from servers import http_status, kill_processes_naming, last_json_line, run_cli, server_env

from leukoflow.features.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.integration

BACKBONES = ["vgg16", "vgg19"]  # two actors, so SPREAD gives each node one


def backbone_actors(ray_cluster) -> dict[str, dict]:
    """The cluster's BackboneActor rows (alive or dead) by actor id: every test of the session
    on this cluster adds its own, so a test looks only at the ones its run added."""
    return {row["actor_id"]: row for row in ray_cluster.state("actors", class_name="BackboneActor")}


@pytest.fixture(scope="module")
def cluster_run(ray_cluster, prefect_server, tmp_path_factory):
    """One extraction through the cluster's address; the driver runs outside the source tree.
    Returns its summary and the actor rows it added to the cluster's state."""
    workdir = tmp_path_factory.mktemp("driver")
    images = make_synthetic_dataset(
        workdir / "images", n_subjects=4, cells_per_subject=2, image_side=48
    )
    before = backbone_actors(ray_cluster)
    result = run_cli(
        [
            "run", str(images), "--store", str(workdir / "store"),
            "--backbones", ",".join(BACKBONES), "--image-size", "32", "--weights", "none",
            "--batch-size", "4", "--ray-address", ray_cluster.address, "--json",
        ],
        env={**ray_cluster.env, **prefect_server.env},
        cwd=workdir,  # so workers cannot pick the code up from the driver's folder
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    added = [row for key, row in backbone_actors(ray_cluster).items() if key not in before]
    return {"summary": last_json_line(result.stdout), "actors": added}


def test_features_are_extracted_through_the_cluster(cluster_run):
    summary = cluster_run["summary"]
    assert summary["extraction"]["computed"] == {name: 8 for name in BACKBONES}
    assert summary["feature_dim"] == 1024
    assert summary["counts"]["trained_and_tested"] == 8


def test_the_state_api_shows_one_backbone_actor_on_each_node(ray_cluster, cluster_run):
    actors = cluster_run["actors"]
    # The run's own actors: one per backbone, all of one job, none restarted.
    assert len(actors) == len(BACKBONES), actors
    assert len({actor["job_id"] for actor in actors}) == 1
    assert [int(actor["num_restarts"]) for actor in actors] == [0] * len(BACKBONES)
    # Every node the cluster has known (a node lost by another test stays listed, dead).
    nodes = {node["node_id"]: node for node in ray_cluster.state("nodes")}
    carriers = {
        resource
        for actor in actors
        for resource in nodes[actor["node_id"]]["resources_total"]
        if resource in ray_cluster.node_resources
    }
    assert carriers == {"leukoflow_head", "leukoflow_worker"}
    placed = cluster_run["summary"]["extraction"]["actor_nodes"]
    assert sorted(placed.values()) == sorted(actor["node_id"] for actor in actors)
    for actor in actors:
        # Both actors would fit on one 1-CPU node: none oversubscribes it, and a lost node's
        # actor has room to restart on the other.
        assert 0 < actor["required_resources"]["CPU"] <= 0.5
        assert actor["required_resources"].get("GPU", 0) == 0


def test_workers_import_the_drivers_code_from_the_job_runtime_env(ray_cluster, cluster_run):
    code_dirs = cluster_run["summary"]["extraction"]["actor_code_dirs"]
    assert sorted(code_dirs) == sorted(BACKBONES)
    for code_dir in code_dirs.values():
        assert code_dir.startswith(str(ray_cluster.temp_dir)), code_dir
        assert "runtime_resources" in code_dir


def test_the_cluster_refuses_clients_without_the_token(ray_cluster, cluster_run):
    assert http_status(f"{ray_cluster.dashboard}/api/v0/nodes") == 401


def test_a_remote_driver_backfills_through_ray_client_from_ray_address(
    ray_cluster, prefect_server, tmp_path
):
    """How a Prefect worker outside the cluster (compose, Kubernetes) reaches it: ray://."""
    images = make_synthetic_dataset(
        tmp_path / "images", n_subjects=2, cells_per_subject=2, image_side=48
    )
    before = backbone_actors(ray_cluster)
    result = run_cli(
        [
            "backfill", str(images), "--store", str(tmp_path / "store"), "--dataset", "remote",
            "--backbones", "vgg16", "--image-size", "32", "--weights", "none", "--no-progress",
            "--json",
        ],
        env={**ray_cluster.env, **prefect_server.env, "RAY_ADDRESS": ray_cluster.client_address},
        cwd=tmp_path,
    )  # fmt: skip
    # The message (with the head's client-server logs) is only built when the assertion fails.
    assert result.returncode == 0, result.stderr[-4000:] + ray_cluster.log_tails(
        "*ray_client_server*", "runtime_env_agent.log"
    )
    assert last_json_line(result.stdout)["extraction"]["computed"] == {"vgg16": 4}
    # Its actor ran on the cluster (a local Ray would have left no trace there).
    added = [row for key, row in backbone_actors(ray_cluster).items() if key not in before]
    assert len(added) == 1, added


GPU_PLAN_PROBE = """
import json, os, ray
from leukoflow.engine.actors import ACTOR_ENV, ActorPlan

# A logical GPU: Ray schedules it like a real one (TensorFlow is not involved here).
ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
         runtime_env={"env_vars": ACTOR_ENV})
plan = ActorPlan.for_cluster(3, None, None)

@ray.remote
class Probe:
    def where(self):
        return {"gpus": ray.get_gpu_ids(), "growth": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH")}

probes = [Probe.options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus).remote() for _ in range(3)]
seen = ray.get([p.where.remote() for p in probes], timeout=60)
print(json.dumps({"plan": [plan.num_cpus, plan.num_gpus], "seen": seen}))
ray.shutdown()
"""


def test_three_backbones_share_one_gpu_by_default(tmp_path):
    scratch = tempfile.mkdtemp(prefix="lf-gpu-", dir="/tmp")  # Ray's sockets: a short path
    try:
        result = subprocess.run(
            [sys.executable, "-c", GPU_PLAN_PROBE],
            env=server_env(TMPDIR=scratch),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        kill_processes_naming(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = last_json_line(result.stdout)
    assert report["plan"] == [1.0, 0.333]
    assert [probe["gpus"] for probe in report["seen"]] == [[0], [0], [0]]  # all on the one card
    assert {probe["growth"] for probe in report["seen"]} == {"true"}
