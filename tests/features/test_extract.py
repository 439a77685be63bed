"""The decode stage: real cells read, hashed and decoded in parallel, in order, none lost."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from datapaths import CNMC

from leukoflow.features import augment
from leukoflow.features.extract import decode_workers, load_pixels


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> dict[str, str]:
    """12 real cells copied to a folder this test may damage: image id -> path."""
    folder = tmp_path_factory.mktemp("cells")
    uris = {}
    for source in sorted(CNMC.glob("*/*.bmp"))[:12]:
        target = folder / source.name
        shutil.copyfile(source, target)
        uris[hashlib.sha256(target.read_bytes()).hexdigest()] = str(target)
    assert len(uris) == 12
    return uris


def test_parallel_decoding_gives_the_serial_batch_in_the_callers_order(cells):
    ids = list(reversed(cells))  # not the folder's order: the caller's order must be kept
    flipped = augment.augmented_id(ids[0], augment.HFLIP)
    uris = {**cells, flipped: cells[ids[0]]}
    wanted = [*ids, flipped]
    serial = load_pixels(uris, wanted, 48, keep_originals=True, workers=1)
    parallel = load_pixels(uris, wanted, 48, keep_originals=True, workers=4)

    assert parallel.image_ids == serial.image_ids == wanted
    assert parallel.pixels.shape == (13, 48, 48, 3) and parallel.pixels.dtype == np.float32
    np.testing.assert_array_equal(parallel.pixels, serial.pixels)
    assert all(
        np.array_equal(a, b) for a, b in zip(parallel.originals, serial.originals, strict=True)
    )
    np.testing.assert_array_equal(parallel.originals[-1], parallel.originals[0][:, ::-1])
    assert parallel.rejected == {}


def test_every_image_is_accounted_for_with_its_reason(cells, tmp_path):
    ids = list(cells)
    changed, truncated, missing = ids[1], ids[4], ids[7]
    uris = dict(cells)
    for image_id, damage in [(changed, b"x"), (truncated, None)]:
        target = tmp_path / f"{image_id}.bmp"
        data = Path(cells[image_id]).read_bytes()
        target.write_bytes(data + damage if damage else data[:200])
        uris[image_id] = str(target)
    uris[missing] = str(tmp_path / "gone.bmp")
    # A truncated file whose hash still matches its id: only decoding can tell it is bad.
    truncated_bytes = Path(uris[truncated]).read_bytes()
    truncated_id = hashlib.sha256(truncated_bytes).hexdigest()
    uris[truncated_id] = uris.pop(truncated)
    ids[4] = truncated_id

    batch = load_pixels(uris, ids, 32, workers=3)

    assert set(batch.image_ids) | set(batch.rejected) == set(ids)
    assert not set(batch.image_ids) & set(batch.rejected)
    assert batch.image_ids == [i for i in ids if i not in batch.rejected]
    assert batch.rejected[changed].startswith("changed_since_catalog")
    assert batch.rejected[missing].startswith("unreadable")
    assert truncated_id in batch.rejected and truncated_id not in batch.image_ids
    assert len(batch.pixels) == 9


def test_the_decode_pool_has_one_thread_per_core_unless_configured(monkeypatch):
    monkeypatch.delenv("LEUKOFLOW_DECODE_THREADS", raising=False)
    assert decode_workers() == os.cpu_count()
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert decode_workers() == 7
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undetermined": one thread
    assert decode_workers() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    monkeypatch.setenv("LEUKOFLOW_DECODE_THREADS", "5")
    assert decode_workers() == 5
    # Anything but a positive whole number is ignored: one thread per core again.
    for ignored in ("zero", "0", "-3", "2.5", ""):
        monkeypatch.setenv("LEUKOFLOW_DECODE_THREADS", ignored)
        assert decode_workers() == 7, ignored
