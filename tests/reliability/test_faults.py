"""Faults, for real: processes killed with SIGKILL, an S3 endpoint stopped, a full or read-only
disk, a Ray node lost. The run finishes, or fails clearly, and nothing half-written is visible.

A run of 160 tiny cells (vgg16 at 32 px, random weights, 2 or 4 cells per batch) takes long
enough to be interrupted in the middle of its extraction: each test waits for the first feature
files to appear, then strikes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from leukoflow.tasks.synthetic import make_synthetic_dataset

from .harness import (
    SMALL_RUN,
    Background,
    assert_one_line_error,
    children_of,
    command_line,
    last_json,
    leukoflow,
)
from .proxy import StoppableEndpoint

pytestmark = pytest.mark.integration

N_CELLS = 160
BOTH = ("vgg16", "vgg19")  # two actors: SPREAD puts one on each node


@pytest.fixture(scope="module")
def many_cells(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many-cells")
    return make_synthetic_dataset(root, n_subjects=8, cells_per_subject=20, image_side=32)


def parts(folder: Path) -> list[Path]:
    """The feature files a reader sees (hidden temporary files excluded)."""
    return sorted(folder.glob("part-*.parquet")) if folder.exists() else []


def feature_ids(folder: Path) -> list[str]:
    """Image ids of every visible feature row; reading them proves every file is whole."""
    return (
        ds.dataset(str(folder), format="parquet")
        .to_table(columns=["image_id"])
        .column("image_id")
        .to_pylist()
    )


def run_args(images: Path, store: object, batch_size: int) -> tuple:
    return ("run", images, "--store", store, *SMALL_RUN, "--batch-size", batch_size, "--json")


# -- a whole run killed, restarted; an actor killed mid-batch --------------------------------
@pytest.fixture(scope="module")
def killed_then_resumed(many_cells, cli, tmp_path_factory):
    """Run 1 is killed whole (kill -9 of every process) after a few batches; run 2 resumes on
    the same store, and its backbone actor is killed (kill -9) while batches are in flight."""
    base = tmp_path_factory.mktemp("killed")
    store, env = base / "store", cli.env()
    features = store / "features" / "backbone=vgg16"

    first = Background(*run_args(many_cells, store, 2), env=env, workdir=base / "run-1")
    try:
        first.wait_for(lambda: len(parts(features)) >= 5, 240, "run 1's first feature files")
        first.kill_everything()
    finally:
        first.stop()
    rows_left_by_run_1 = feature_ids(features)
    run_records_after_kill = sorted((store / "runs").glob("*")) if (store / "runs").exists() else []

    second = Background(*run_args(many_cells, store, 2), env=env, workdir=base / "run-2")
    try:
        second.wait_for(lambda: len(parts(features)) > len(rows_left_by_run_1) // 2 + 3, 240,
                        "run 2's first feature files")  # fmt: skip
        (actor,) = second.wait_for(second.actor_pids, 30, "run 2's backbone actor")
        parts_when_killed = len(parts(features))
        killed_command = command_line(actor)
        os.kill(actor, signal.SIGKILL)
        restarted = second.wait_for(lambda: [p for p in second.actor_pids() if p != actor],
                                    120, "the actor to restart")  # fmt: skip
        result = second.finish()
    finally:
        second.stop()
    return {
        "rows_left_by_run_1": rows_left_by_run_1,
        "run_records_after_kill": run_records_after_kill,
        "result": result,
        "features": features,
        "store": store,
        "killed_command": killed_command,
        "restarted": restarted,
        "parts_when_killed": parts_when_killed,
    }


def test_a_killed_run_leaves_only_whole_files_and_no_run_record(killed_then_resumed):
    rows = killed_then_resumed["rows_left_by_run_1"]
    assert 10 <= len(rows) < N_CELLS  # killed after some batches, long before the end
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
    assert killed_then_resumed["parts_when_killed"] < N_CELLS // 2  # batches still to come
    assert killed_then_resumed["restarted"]  # Ray started a new actor process (max_restarts)
    ids = feature_ids(killed_then_resumed["features"])
    assert len(ids) == len(set(ids)) == N_CELLS  # no duplicate, no missing row


# -- the S3 endpoint goes away mid-run ------------------------------------------------------
@pytest.fixture(scope="module")
def endpoint(s3_endpoint):
    """A stoppable endpoint in front of the session's moto server."""
    proxy = StoppableEndpoint(s3_endpoint.url.removeprefix("http://"))
    proxy.start()
    yield proxy
    proxy.stop()


def test_the_s3_retry_budget_is_bounded_and_configurable(monkeypatch):
    from leukoflow.tasks.storage import S3FS_TRIES, open_location

    monkeypatch.setenv("LEUKOFLOW_S3_MAX_ATTEMPTS", "3")
    fs = open_location("s3://bucket/store").fs
    assert fs.config_kwargs["retries"] == {"mode": "standard", "max_attempts": 3}
    assert fs.config_kwargs["connect_timeout"] > 0 and fs.config_kwargs["read_timeout"] > 0
    assert fs.retries == S3FS_TRIES == 2


def s3_parts(s3_endpoint, prefix: str) -> list[str]:
    """Feature objects in the bucket, listed behind the proxy's back (straight from moto)."""
    fs = s3_endpoint.filesystem()
    return [p for p in fs.find(f"{prefix}/features") if p.endswith(".parquet")]


def test_an_s3_outage_within_the_retry_budget_is_ridden_out(
    s3_endpoint, endpoint, many_cells, cli, tmp_path
):
    bucket = s3_endpoint.make_bucket()
    env = cli.env(**{**s3_endpoint.env, "AWS_ENDPOINT_URL": endpoint.url})
    run = Background(*run_args(many_cells, f"s3://{bucket}/store", 4), env=env, workdir=tmp_path)
    try:
        run.wait_for(
            lambda: len(s3_parts(s3_endpoint, f"{bucket}/store")) >= 3, 240, "the first objects"
        )
        endpoint.stop()
        written_before = len(s3_parts(s3_endpoint, f"{bucket}/store"))
        time.sleep(3)  # the run keeps trying: its writes are refused and retried with backoff
        written_during = len(s3_parts(s3_endpoint, f"{bucket}/store"))
        endpoint.start()
        result = run.finish()
    finally:
        endpoint.start()
        run.stop()
    assert written_during == written_before  # really cut off, not merely slow
    assert result.returncode == 0, result.stderr[-4000:]
    summary = last_json(result.stdout)
    assert summary["counts"]["featurised"] == N_CELLS
    fs = s3_endpoint.filesystem()
    ids = ds.dataset(f"{bucket}/store/features/backbone=vgg16", filesystem=fs).to_table(
        columns=["image_id"]
    )
    assert ids.num_rows == len(set(ids.column("image_id").to_pylist())) == N_CELLS
    assert fs.exists(f"{bucket}/store/runs/run-{summary['run_id']}.parquet")


def test_an_s3_outage_past_the_retry_budget_fails_clearly_with_nothing_half_written(
    s3_endpoint, endpoint, many_cells, cli, tmp_path
):
    bucket = s3_endpoint.make_bucket()
    env = cli.env(
        LEUKOFLOW_S3_MAX_ATTEMPTS="2", **{**s3_endpoint.env, "AWS_ENDPOINT_URL": endpoint.url}
    )
    run = Background(*run_args(many_cells, f"s3://{bucket}/store", 4), env=env, workdir=tmp_path)
    try:
        run.wait_for(
            lambda: len(s3_parts(s3_endpoint, f"{bucket}/store")) >= 3, 240, "the first objects"
        )
        endpoint.stop()
        result = run.finish(timeout=120)
    finally:
        endpoint.start()
        run.stop()
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    failure = [line for line in result.stderr.splitlines() if line.startswith("leukoflow: ")]
    assert len(failure) == 1 and failure[0].startswith("leukoflow: run failed:"), failure
    assert f"cannot write s3://{bucket}/store/features/" in failure[0]
    assert "Could not connect to the endpoint URL" in failure[0]
    # Every object a reader can list is whole; the failed run left no run record.
    fs = s3_endpoint.filesystem()
    objects = fs.find(f"{bucket}/store")
    assert any("/features/" in name for name in objects)
    for name in objects:
        data = fs.cat_file(name)
        if name.endswith(".parquet"):
            pq.read_table(pa.BufferReader(data))
        elif name.endswith(".json"):
            json.loads(data)
    assert not [name for name in objects if "/runs/" in name]


# -- the local disk: full, read-only ---------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 100 KiB filesystem (tmpfs) for the store: the kernel answers ENOSPC when full.

    As root, chmod and quotas do not stop writes, and RLIMIT_FSIZE gives EFBIG per file rather
    than a full disk; a tiny mounted filesystem is the honest way to run out of space.
    """
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount_point)],
                   check=True)  # fmt: skip
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_fails_clearly_and_leaves_no_corrupt_parquet(small_disk, many_cells, cli):
    store = small_disk / "store"
    result = leukoflow(*run_args(many_cells, store, 2), env=cli.env())
    line = assert_one_line_error(result, "cannot write", "No space left on device")
    assert str(store) in line
    features = store / "features" / "backbone=vgg16"
    assert parts(features), "the disk filled up during extraction, after some batches"
    ids = feature_ids(features)  # every visible file reads whole
    assert len(ids) == len(set(ids)) < N_CELLS
    assert not list(store.rglob(".tmp-*")), "temporary files are removed on failure"
    assert not (store / "runs").exists()


def test_a_read_only_store_is_refused_before_any_work(small_disk, many_cells, cli):
    (small_disk / "store").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = leukoflow(*run_args(many_cells, small_disk / "store", 2), env=cli.env())
    assert_one_line_error(result, "is not writable")


# -- a Ray node lost mid-run -----------------------------------------------------------------
def integration_servers():
    """The process helpers of the other integration tests (tests/integration/servers.py)."""
    folder = str(Path(__file__).resolve().parents[1] / "integration")
    if folder not in sys.path:
        sys.path.append(folder)
    import servers

    return servers


@pytest.fixture
def two_nodes(tmp_path_factory):
    """A head and a second node (1 CPU each, token auth, 127.0.0.1, a private --temp-dir),
    health-checked every second so a lost node is declared dead in seconds, not 15 s."""
    import secrets
    import shutil
    import tempfile

    servers = integration_servers()
    temp_dir = Path(tempfile.mkdtemp(prefix="lf-rel-", dir="/tmp"))  # Unix socket paths: short
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = servers.server_env(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
        RAY_health_check_failure_threshold="3",
    )  # fmt: skip
    gcs_port, dashboard_port = servers.free_port(), servers.free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", str(temp_dir)]
    ray = str(servers.BIN / "ray")
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    auth = {"Authorization": f"Bearer {token}"}

    def alive_nodes() -> list[dict]:
        answer = servers.http_json(f"{dashboard}/api/v0/nodes?detail=1", auth) or {}
        rows = ((answer.get("data") or {}).get("result") or {}).get("result") or []
        return [row for row in rows if row["state"] == "ALIVE"]

    nodes = []
    try:
        head = servers.Server(
            "ray-head",
            [ray, "start", "--head", "--block", *common, "--port", str(gcs_port),
             "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard_port),
             "--dashboard-agent-listen-port", str(servers.free_port()),
             "--ray-client-server-port", str(servers.free_port()), "--disable-usage-stats"],
            env, temp_dir, marker=str(temp_dir),
        )  # fmt: skip
        nodes.append(head)
        servers.wait_until(lambda: servers.port_open(gcs_port), 60, "the head's GCS", head)
        worker = servers.Server(
            "ray-worker",
            [ray, "start", "--block", *common, "--address", f"127.0.0.1:{gcs_port}",
             "--dashboard-agent-listen-port", str(servers.free_port())],
            env, temp_dir, marker=str(temp_dir),
        )  # fmt: skip
        nodes.append(worker)
        servers.wait_until(lambda: len(alive_nodes()) == 2, 90, "both nodes alive", worker)
        yield {
            "address": f"127.0.0.1:{gcs_port}",
            "env": env,
            "head": head,
            "worker": worker,
            "alive_nodes": alive_nodes,
        }
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_lost_ray_node_moves_its_work_to_the_surviving_node(two_nodes, many_cells, cli, tmp_path):
    worker = two_nodes["worker"]
    env = {**two_nodes["env"], "PREFECT_API_URL": cli.api_url, "PREFECT_HOME": str(cli.home)}
    store = tmp_path / "store"
    run = Background(
        "run", many_cells, "--store", store, "--weights", "none", "--backbones", "vgg16,vgg19",
        "--image-size", "32", "--batch-size", "4", "--ray-address", two_nodes["address"],
        "--json", env=env, workdir=tmp_path / "driver",
    )  # fmt: skip

    def worker_actor() -> list[int]:
        return [p for p in children_of(worker.process.pid)
                if command_line(p).startswith("ray::BackboneActor")]  # fmt: skip

    try:
        run.wait_for(lambda: parts(store / "features" / "backbone=vgg19"), 240, "first batches")
        (actor,) = run.wait_for(worker_actor, 30, "a backbone actor on the second node")
        done_before = {name: len(parts(store / "features" / f"backbone={name}")) for name in BOTH}
        node_processes = [worker.process.pid, *children_of(worker.process.pid)]
        for pid in node_processes:  # the whole node at once: raylet, workers, agents
            os.kill(pid, signal.SIGKILL)
        head = two_nodes["head"].process.pid
        moved = run.wait_for(
            lambda: len([p for p in children_of(head)
                         if command_line(p).startswith("ray::BackboneActor")]) == 2,
            120, "the lost node's actor to restart on the head",
        )  # fmt: skip
        result = run.finish()
    finally:
        run.stop()
    assert actor in node_processes and moved
    assert len(two_nodes["alive_nodes"]()) == 1  # Ray saw the node die
    assert result.returncode == 0, result.stderr[-4000:]
    summary = last_json(result.stdout)
    assert summary["extraction"]["computed"] == {"vgg16": N_CELLS, "vgg19": N_CELLS}
    assert len(set(summary["extraction"]["actor_nodes"].values())) == 2  # one on each node
    for name in BOTH:
        ids = feature_ids(store / "features" / f"backbone={name}")
        assert len(ids) == len(set(ids)) == N_CELLS
    assert min(done_before.values()) < N_CELLS // 4 // 2  # lost before half of the batches
