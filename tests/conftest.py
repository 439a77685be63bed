"""Shared fixtures: real engines (local Ray, Prefect's test harness) started once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Set before Prefect, Ray or TensorFlow are imported anywhere in the session.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)

import pytest  # noqa: E402

# -- two workers (make test: pytest -n 2) ---------------------------------------------------
# xdist hands each worker one test file at a time (module fixtures are built once). A session
# fixture, though, is built once per worker that meets it: the files that share an expensive one
# go to the same worker as one unit, so it is built once. Minutes each: `messy_runs` makes two
# `leukoflow run`s, `real_cells_store` one run on real cells.
SHARED_SESSION_FIXTURES = {
    "messy_runs": (
        "tests/reliability/test_security.py",
        "tests/reliability/test_config_errors.py",
        "tests/reliability/test_bad_input_e2e.py",
    ),
    "real_cells_store": (
        "tests/tasks/test_explain.py",
        "tests/cli/test_status.py",
        "tests/cli/test_explain.py",
    ),
}
_UNIT_OF_FILE = {f: name for name, files in SHARED_SESSION_FIXTURES.items() for f in files}
# The longest units first, so that no worker is left with a two-minute file at the end while the
# other idles (longest-processing-time-first). Wall seconds from `pytest -n 2 --durations=40` on
# 2 cores, 2026-11-30: test_faults ~450; messy_runs, test_ray_cluster, test_training ~200; ...
# Only the suite's speed depends on this list; a file not in it runs after these.
LONGEST_FIRST = (
    "tests/reliability/test_faults.py",
    "messy_runs",
    "tests/integration/test_ray_cluster.py",
    "tests/cli/test_training.py",
    "tests/flows/test_run_flow.py",
    "tests/flows/test_score_flow.py",
    "tests/bench/test_bench_smoke.py",
    "tests/reliability/test_patient_ids.py",
    "real_cells_store",
    "tests/integration/test_prefect_deployments.py",
    "tests/flows/test_experiments_flow.py",
    "tests/integration/test_s3_store.py",
    "tests/flows/test_backfill_flow.py",
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


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray for the session (never a stale `ray start` cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's own test harness: a temporary database and API for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def synthetic_images(tmp_path_factory):
    """A small deterministic C-NMC-like dataset: 6 subjects (3 ALL, 3 normal) x 4 cells."""
    from leukoflow.tasks.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("images"), n_subjects=6, cells_per_subject=4, image_side=96
    )


# Real C-NMC cells for the explanation tests: the read-only shared copy, never the repository.
# It lies in shared/ beside the checkout (CI clones elsewhere and copies shared/ beside it).
CNMC_FOLDER = os.environ.setdefault(
    "LEUKOFLOW_CNMC", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cnmc")
)
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
        shutil.copyfile(Path(CNMC_FOLDER) / relative, folder / relative)
    return folder


@pytest.fixture(scope="session")
def real_cells_store(tmp_path_factory, real_cells, ray_local, prefect_harness):
    """A store whose current model is vgg16 (32 px, random init) + color_morphology, trained by
    the real `run` flow on the real cells; returns (store path, run summary)."""
    from leukoflow.flows.run import run_pipeline
    from leukoflow.tasks.recipe import FeatureRecipe

    store = tmp_path_factory.mktemp("real-store")
    summary = run_pipeline(
        images=str(real_cells),
        store=str(store),
        recipe=FeatureRecipe(("vgg16", "color_morphology"), weights="none", image_size=32),
    )
    return store, summary


# -- a real S3 endpoint (moto's server) ------------------------------------------------------
class S3Endpoint:
    """moto's S3 server on 127.0.0.1, and the AWS environment a client needs to reach it."""

    def __init__(self, url: str, secret: str) -> None:
        self.url = url
        # Recognisable fake credentials, so tests can prove they leak nowhere.
        self.env = {
            "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE1234",
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url,
            # Never a developer's real profile or credentials file.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.url,
            key=self.env["AWS_ACCESS_KEY_ID"],
            secret=self.env["AWS_SECRET_ACCESS_KEY"],
            skip_instance_cache=True,
        )

    def make_bucket(self, prefix: str = "leukoflow") -> str:
        """A new empty bucket (a fresh name per call, so tests never see each other's objects)."""
        import uuid

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.filesystem().mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server as its own process on a free 127.0.0.1 port, stopped after the session."""
    import secrets
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: ended whole at teardown
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start:\n{log.read_text()}") from None
                time.sleep(0.2)
        secret = f"leukoflow-test-secret-{secrets.token_hex(8)}"
        yield S3Endpoint(f"http://127.0.0.1:{port}", secret)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """s3_endpoint's AWS environment set in this test's process (for in-process s3:// access)."""
    for key, value in s3_endpoint.env.items():
        monkeypatch.setenv(key, value)
    return s3_endpoint
