"""The decode stage's own ceiling: leukoflow's extraction with the CNNs replaced by a trivial model.

What it answers: how many images/s can the driver read, hash, decode, ship to actors and write to
Parquet when the models cost nothing? That is the most any set of GPUs behind it can get. Three
numbers, each in this one child process:

- single core: read + sha256 + decode + resize, one image after another, pinned to one core (the
  rate per CPU second, so other work on the core does not count against it);
- decode threads: `features/extract.load_pixels` over the same files, all cores;
- pipeline: `engine/actors.extract_features` on a local Ray with one actor running `pixel_mean`
  (the per-image mean of the pixels) instead of a CNN: images -> Parquet, as `leukoflow run`
  extracts, timed from the loaded actor to the last file written (and compacted).

On S3 (moto's server on 127.0.0.1, when moto is installed): the same images as objects, read one
request at a time against one batched concurrent `cat` (what load_pixels does per batch); once
against moto directly, once with each request held 20 ms (bench/latency.py), the wait of a real
endpoint that concurrent reads exist to overlap.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

# The trivial "backbone": a hand-crafted extractor (full-resolution pixels in, 3 numbers out).
FEATURE_VERSION = "pixel-mean-1"


def pixel_mean(pixels: np.ndarray) -> np.ndarray:
    """The per-channel mean of one image: the cheapest model that still reads every pixel."""
    return pixels.reshape(-1, 3).mean(axis=0)


def _trivial_spec():
    from leukoflow.features import backbones as bb

    spec = bb.BACKBONES["color_morphology"]
    return replace(spec, name="pixel_mean", module="bench.decode", constructor="pixel_mean",
                   feature_dim=3, min_image_size=1)  # fmt: skip


def _image_uris(images: Path, n: int | None = None) -> dict[str, str]:
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".bmp", ".png"))[:n]
    return {hashlib.sha256(p.read_bytes()).hexdigest(): str(p) for p in files}


def single_core_rate(uris: dict[str, str], image_size: int) -> dict:
    """Read, hash, decode and resize one image at a time on one core (the unit of the goal)."""
    from leukoflow.features.extract import load_pixels

    keep = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {sorted(keep)[-1]})
    try:
        ids = list(uris)
        wall, cpu = time.perf_counter(), time.process_time()
        batch = load_pixels(uris, ids, image_size, workers=1)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        os.sched_setaffinity(0, keep)
    assert len(batch.image_ids) == len(ids), batch.rejected
    return {
        "images": len(ids),
        "images_per_second_wall": len(ids) / wall,
        "images_per_cpu_second": len(ids) / cpu,
    }


def threaded_rate(uris: dict[str, str], image_size: int, batch_size: int) -> dict:
    """load_pixels with its default thread pool, batch after batch (no Ray, no Parquet)."""
    from leukoflow.features.extract import decode_workers, load_pixels

    ids = list(uris)
    started = time.perf_counter()
    for start in range(0, len(ids), batch_size):
        load_pixels(uris, ids[start : start + batch_size], image_size)
    seconds = time.perf_counter() - started
    return {"threads": decode_workers(), "images_per_second": len(ids) / seconds}


def pipeline_rate(uris: dict[str, str], image_size: int, batch_size: int, store: Path) -> dict:
    """extract_features with one trivial actor: images -> Parquet, the driver's ceiling."""
    from leukoflow.engine.actors import BackbonePool, extract_features, ray_session
    from leukoflow.features import backbones as bb
    from leukoflow.recipe import Compute, FeatureRecipe
    from leukoflow.store.storage import open_location
    from leukoflow.store.tables import featurised_ids

    spec = _trivial_spec()
    bb.BACKBONES[spec.name] = spec  # this child process only: the registry's one extra entry
    recipe = FeatureRecipe((spec.name,), weights="none", image_size=image_size)
    compute = Compute(batch_size=batch_size)
    root = open_location(str(store))
    ids = list(uris)
    with ray_session("local"):
        pool = BackbonePool(recipe, compute)
        try:
            pool.actors([spec.name])  # started and loaded before the clock
            started = time.perf_counter()
            result = extract_features(root, uris, {spec.name: ids}, recipe, compute, pool=pool)
            seconds = time.perf_counter() - started
        finally:
            pool.close()
    written = featurised_ids(root, spec.name, *recipe.vector_key(spec.name))
    assert set(ids) == set(written) and not result.rejected, "every image must be accounted for"
    return {"images_per_second": len(ids) / seconds, "images": len(ids)}


def s3_rates(images: Path, n: int, image_size: int, batch_size: int) -> dict:
    """One-at-a-time GETs against a batch's concurrent `cat`, on moto's server, same objects."""
    try:
        import moto  # noqa: F401
    except ImportError:
        return {"skipped": "moto is not installed"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    env = {
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _wait_for_port(port, server)
        return _measure_s3(images, n, image_size, batch_size)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _wait_for_port(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's server did not start") from None
            time.sleep(0.2)


# A real S3 endpoint's time to first byte is tens of milliseconds (the AWS documentation quotes
# 100-200 ms for small objects at the tail, tens at the median); 20 ms is taken as a typical
# same-region figure. Reads are measured against moto directly and with that wait put back.
S3_LATENCY_S = 0.020


def _measure_s3(images: Path, n: int, image_size: int, batch_size: int) -> dict:
    from bench.latency import DelayingForwarder
    from leukoflow.store.storage import open_location

    bucket = open_location("s3://bench-decode")
    bucket.fs.mkdir("bench-decode")
    local = _image_uris(images, n)
    uris = {}
    for image_id, path in local.items():
        key = f"bench-decode/{Path(path).name}"
        bucket.fs.pipe_file(key, Path(path).read_bytes())
        uris[image_id] = f"s3://{key}"
    result = {"images": len(uris), "local": _read_rates(uris, image_size, batch_size)}
    bare = os.environ["AWS_ENDPOINT_URL"]
    forwarder = DelayingForwarder(int(bare.rsplit(":", 1)[1]), S3_LATENCY_S)
    os.environ["AWS_ENDPOINT_URL"] = forwarder.url
    try:
        result["with_latency"] = {
            "latency_ms_per_request": S3_LATENCY_S * 1000,
            **_read_rates(uris, image_size, batch_size),
        }
    finally:
        os.environ["AWS_ENDPOINT_URL"] = bare
        forwarder.close()
    return result


def _read_rates(uris: dict[str, str], image_size: int, batch_size: int) -> dict:
    """Reads/s one GET at a time, then a batch's concurrent `cat`, then load_pixels (reads,
    hashes and decodes, as extraction does), over the same objects."""
    from leukoflow.features.extract import load_pixels
    from leukoflow.store.storage import open_location

    ids = list(uris)
    fs = open_location(uris[ids[0]]).fs
    paths = [uris[i].removeprefix("s3://") for i in ids]
    fs.cat_file(paths[0])  # the connection is set up before either clock
    started = time.perf_counter()
    for path in paths:
        fs.cat_file(path)
    serial = len(paths) / (time.perf_counter() - started)
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        fs.cat(paths[start : start + batch_size])
    concurrent = len(paths) / (time.perf_counter() - started)
    started = time.perf_counter()
    for start in range(0, len(ids), batch_size):
        batch = load_pixels(uris, ids[start : start + batch_size], image_size)
        assert not batch.rejected, batch.rejected
    decoded = len(ids) / (time.perf_counter() - started)
    return {
        "reads_per_second_one_at_a_time": serial,
        "reads_per_second_concurrent": concurrent,
        "concurrent_over_one_at_a_time": concurrent / serial,
        "load_pixels_images_per_second": decoded,
    }


def decode_stage(settings: dict) -> dict:
    """The section: single-core rate, threads, the trivial pipeline, S3; and the goal's ratio."""
    images = Path(settings["images"])
    size, batch = settings["image_size"], settings["batch_size"]
    uris = _image_uris(images)
    cores = len(os.sched_getaffinity(0))
    single = single_core_rate(uris, size)
    threads = threaded_rate(uris, size, batch)
    with tempfile.TemporaryDirectory(prefix="decode-store-", dir=settings["workdir"]) as store:
        pipeline = pipeline_rate(uris, size, batch, Path(store))
    # Wall-clock on both sides: on a shared machine the single core is slowed like the others.
    ideal = cores * single["images_per_second_wall"]
    return {
        "cores": cores,
        "single_core": single,
        "threads": threads,
        "pipeline": pipeline,
        "images_per_second": pipeline["images_per_second"],
        "pipeline_over_cores_x_single_core": pipeline["images_per_second"] / ideal,
        "threads_over_cores_x_single_core": threads["images_per_second"] / ideal,
        "s3": s3_rates(images, settings.get("s3_images", 128), size, batch),
    }
