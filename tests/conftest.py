"""Shared fixtures: real engines (local Ray, Prefect's test harness) started once per session."""

from __future__ import annotations

import os

# Set before Prefect, Ray or TensorFlow are imported anywhere in the session.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)

import pytest  # noqa: E402


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
    from tasks.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("images"), n_subjects=6, cells_per_subject=4, image_side=96
    )
