"""The local disk under the store: full in the middle of a run, or read-only. A real filesystem
(tmpfs) answers ENOSPC or EROFS; the run says so in one line and leaves nothing corrupt.

Both run the command's entry point in this process (its exit status and one line are the point,
not the process; the session's local Ray hosts the actors)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from cli import leukoflow_here

from leukoflow.features.synthetic import make_synthetic_dataset

from .harness import SMALL_RUN, assert_one_line_error

pytestmark = pytest.mark.integration

N_CELLS = 64
DISK = "100k"  # the catalog and a few batches of features fit; all 32 batches of 2 do not


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cells")
    return make_synthetic_dataset(root, n_subjects=8, cells_per_subject=8, image_side=32)


@pytest.fixture
def small_disk(tmp_path):
    """A real 100 KiB filesystem (tmpfs) for the store: the kernel answers ENOSPC when full.

    As root, chmod and quotas do not stop writes, and RLIMIT_FSIZE gives EFBIG per file rather
    than a full disk; a tiny mounted filesystem is the honest way to run out of space.
    """
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount_point)],
                   check=True)  # fmt: skip
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def run_args(images: Path, store: Path) -> tuple:
    return ("run", images, "--store", store, *SMALL_RUN, "--batch-size", 2, "--json")


def test_a_full_disk_fails_clearly_and_leaves_no_corrupt_parquet(
    small_disk, cells, ray_local, prefect_harness, capsys
):
    store = small_disk / "store"
    result = leukoflow_here(capsys, *run_args(cells, store))
    line = assert_one_line_error(result, "cannot write", "No space left on device")
    assert str(store) in line
    features = store / "features" / "backbone=vgg16"
    files = sorted(features.glob("part-*.parquet"))
    assert files, "the disk filled up during extraction, after some batches"
    ids = (
        ds.dataset([str(f) for f in files], format="parquet")
        .to_table(columns=["image_id"])
        .column("image_id")
        .to_pylist()
    )  # every visible file reads whole
    assert len(ids) == len(set(ids)) < N_CELLS
    assert not list(store.rglob(".tmp-*")), "temporary files are removed on failure"
    assert not (store / "runs").exists()


def test_a_read_only_store_is_refused_before_any_work(small_disk, cells, capsys):
    (small_disk / "store").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = leukoflow_here(capsys, *run_args(cells, small_disk / "store"))
    assert_one_line_error(result, "is not writable", str(small_disk / "store"))
