"""Shared fixtures: real engines started once: one Prefect server and one moto S3 server for the
whole run (both workers), a local Ray and a two-node Ray cluster per session."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Set before Prefect, Ray or TensorFlow are imported anywhere in the session.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)

import pytest  # noqa: E402
from datapaths import CNMC  # noqa: E402
from prefect_console import prefect_console_on_this_tests_stderr  # noqa: E402, F401

# -- two workers (make test: pytest -n 2) ---------------------------------------------------
# xdist hands each worker one test file at a time (module fixtures are built once). A session
# fixture, though, is built once per worker that meets it: the files that share an expensive one
# go to the same worker as one unit, so it is built once. Minutes each: `messy_runs` makes two
# `leukoflow run`s, `real_cells_store` one run on real cells, `ray_cluster` starts two Ray nodes.
# (The Prefect and moto servers are the run's, shared by both workers: see below.)
SHARED_SESSION_FIXTURES = {
    "messy_runs": (
        "tests/reliability/test_security.py",
        "tests/reliability/test_config_errors.py",
        "tests/reliability/test_bad_input_e2e.py",
    ),
    "ray_cluster": (
        "tests/integration/test_ray_cluster.py",
        "tests/reliability/test_faults_ray_node.py",
    ),
    "real_cells_store": (
        "tests/present/test_explain.py",
        "tests/cli/test_status.py",
        "tests/cli/test_explain.py",
    ),
}
_UNIT_OF_FILE = {f: name for name, files in SHARED_SESSION_FIXTURES.items() for f in files}
# The longest units first, so that no worker is left with a two-minute file at the end while the
# other idles (longest-processing-time-first), by wall seconds on one worker of `make test` on 2
# cores (docs/testing.md). Only the suite's speed depends on this list; a file not in it runs
# after these.
LONGEST_FIRST = (
    "messy_runs",
    "tests/cli/test_training.py",
    "tests/reliability/test_patient_ids.py",
    "tests/flows/test_run_flow.py",
    "tests/flows/test_score_limits_cli.py",
    "tests/bench/test_bench_smoke.py",
    "tests/reliability/test_faults_kill.py",
    "tests/reliability/test_faults_s3_outage.py",
    "ray_cluster",
    "tests/integration/test_prefect_deployments.py",
    "tests/flows/test_score_nights_cli.py",
    "real_cells_store",
    "tests/reliability/test_s3_failures.py",
    "tests/flows/test_score_flow.py",
    "tests/integration/test_s3_store.py",
    "tests/flows/test_bf16.py",
    "tests/cli/test_demo.py",
    "tests/flows/test_experiments_flow.py",
    "tests/flows/test_backfill_flow.py",
    "tests/integration/test_automations.py",
    "tests/flows/test_validate_flow.py",
    "tests/cli/test_signed_models.py",
    "tests/engine/test_actor_threads.py",
    "tests/reliability/test_faults_disk.py",
    "tests/present/test_dashboard.py",
    "tests/bench/test_cm_validate.py",
    "tests/cli/test_export_fhir.py",
)


def _unit(nodeid: str) -> str:
    """What one worker runs as a whole: a test file, or the files of a shared session fixture."""
    file = nodeid.split("::", 1)[0]
    return _UNIT_OF_FILE.get(file, file)


def pytest_collection_modifyitems(config, items):
    """Collect the LONGEST_FIRST units first (a stable sort: files stay whole, in order)."""
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))


def pytest_xdist_make_scheduler(config, log):
    """xdist's file-by-file scheduling, with the files of SHARED_SESSION_FIXTURES kept together
    (xdist's own grouping marks, loadgroup, would split every other file test by test), handed
    out in collection order (xdist would otherwise order them by their number of tests)."""
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False
    return SharedFixtureScheduling(config, log)


# -- servers shared by the whole run -----------------------------------------------------------
# One Prefect server and one moto S3 server for the whole run, both workers and every CLI
# subprocess included (tests/servers.py): the controller starts them before the workers exist,
# so the workers inherit PREFECT_API_URL and the server's auth string from its environment.
_SHARED: dict = {}


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: the controller started them
        return
    from servers import SERVERS_STATE, SharedServers

    shared, processes = SharedServers.start()
    _SHARED.update(shared=shared, processes=processes)
    os.environ[SERVERS_STATE] = str(shared.folder)
    os.environ.update(shared.prefect.env)


def pytest_unconfigure(config):
    if _SHARED:
        # Without xdist the controller ran flows itself: send their last logs and events while
        # the server still answers (Prefect would retry at exit for a minute). Prefect has no
        # public call for this; its exit hook uses the same one.
        services = sys.modules.get("prefect._internal.concurrency.services")
        if services is not None:
            services.QueueService.drain_all(timeout=30)
        for process in _SHARED["processes"]:
            process.stop(grace_s=1)  # their data is thrown away with their folder
        shutil.rmtree(_SHARED["shared"].folder, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_servers():
    from servers import SharedServers

    return SharedServers.find()


@pytest.fixture(scope="session")
def prefect_server(shared_servers):
    """The run's Prefect server (basic auth on), already named in this process's environment."""
    shared_servers.wait("prefect-server", shared_servers.prefect.healthy)
    return shared_servers.prefect


@pytest.fixture(scope="session")
def prefect_harness(prefect_server):
    """What in-process flows report to: the run's one Prefect server (a temporary database for
    the run, as Prefect's own test harness would give, without a server per worker)."""
    return prefect_server


@pytest.fixture(scope="session")
def s3_endpoint(shared_servers):
    """The run's moto S3 server on 127.0.0.1."""
    shared_servers.wait("moto", shared_servers.s3.healthy)
    return shared_servers.s3


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """s3_endpoint's AWS environment set in this test's process (for in-process s3:// access)."""
    for key, value in s3_endpoint.env.items():
        monkeypatch.setenv(key, value)
    return s3_endpoint


@pytest.fixture(scope="session")
def ray_cluster():
    """One two-node Ray cluster per session (tests/servers.RayCluster); the files using it run on
    one worker (SHARED_SESSION_FIXTURES). A test that kills its second node restarts it."""
    import tempfile

    from servers import RayCluster

    cluster = RayCluster(Path(tempfile.mkdtemp(prefix="lf-ray-", dir="/tmp")))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray for the session (never a stale `ray start` cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_images(tmp_path_factory):
    """A small deterministic C-NMC-like dataset: 6 subjects (3 ALL, 3 normal) x 4 cells."""
    from leukoflow.features.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("images"), n_subjects=6, cells_per_subject=4, image_side=96
    )


# Real C-NMC cells for the explanation tests: the read-only shared copy (tests/datapaths.py),
# never the repository.
REAL_CELLS = (
    *(f"all/UID_{s}_1_1_all.bmp" for s in (1, 4, 5, 11, 24, 25)),
    "hem/UID_H10_100_1_hem.bmp",
    "hem/UID_H11_10_1_hem.bmp",
    "hem/UID_H12_1_1_hem.bmp",
    "hem/UID_H22_1_1_hem.bmp",
    "hem/UID_H23_16_8_hem.bmp",
    "hem/UID_H24_23_8_hem.bmp",
)


@pytest.fixture(scope="session")
def real_cells(tmp_path_factory):
    """12 real cells of 12 subjects in class folders (copies: a link to the shared folder points
    outside the images root, and the catalog refuses to follow it)."""
    folder = tmp_path_factory.mktemp("real-cells")
    for relative in REAL_CELLS:
        (folder / relative).parent.mkdir(exist_ok=True)
        shutil.copyfile(CNMC / relative, folder / relative)
    return folder


@pytest.fixture(scope="session")
def real_cells_store(tmp_path_factory, real_cells, ray_local, prefect_harness):
    """A store whose current model is vgg16 (32 px, random init) + color_morphology, trained by
    the real `run` flow on the real cells; returns (store path, run summary)."""
    from leukoflow.flows.run import run_pipeline
    from leukoflow.recipe import FeatureRecipe

    store = tmp_path_factory.mktemp("real-store")
    summary = run_pipeline(
        images=str(real_cells),
        store=str(store),
        recipe=FeatureRecipe(("vgg16", "color_morphology"), weights="none", image_size=32),
    )
    return store, summary
