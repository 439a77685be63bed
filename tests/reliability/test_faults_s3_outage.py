"""The S3 endpoint goes away in the middle of a run (tests/reliability/proxy.py stops it: the port
closes and every live connection is cut, while moto behind it keeps every object): within the
retry budget the run rides it out; past the budget it fails in one line with nothing
half-written. The outage starts once the run has written its first feature objects."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from leukoflow.features.synthetic import make_synthetic_dataset

from .harness import SMALL_RUN, Background, children_of, command_line, freeze, thaw, wait_for
from .proxy import StoppableEndpoint

pytestmark = pytest.mark.integration

N_CELLS = 64  # 32 batches of 2: the outage starts after a few, long before the last


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cells")
    return make_synthetic_dataset(root, n_subjects=8, cells_per_subject=8, image_side=32)


@pytest.fixture
def endpoint(s3_endpoint):
    """A stoppable endpoint in front of the run's moto server."""
    proxy = StoppableEndpoint(s3_endpoint.url.removeprefix("http://"))
    proxy.start()
    yield proxy
    proxy.close()  # stops it and gives its port back


class CountingFront:
    """What the client talks to, in front of the stoppable endpoint: it forwards each connection,
    and while the endpoint is stopped it counts the connections it cannot forward and resets
    them (the client sees the connection fail, as it does against the closed port itself).
    The count is how a test knows the run met the outage and retried, without a clock."""

    def __init__(self, endpoint: StoppableEndpoint) -> None:
        self._endpoint = endpoint
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def refused(self) -> int:
        with self._lock:
            return self._refused

    def close(self) -> None:
        _close(self._listener)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                where = self._endpoint.url.removeprefix("http://").rpartition(":")
                upstream = socket.create_connection((where[0], int(where[2])), timeout=10)
            except OSError:
                with self._lock:
                    self._refused += 1
                # Reset, not a graceful close: the client's request fails at once.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            upstream.settimeout(None)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(sink)


def _close(end: socket.socket) -> None:
    try:
        end.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    end.close()


def s3_parts(s3_endpoint, prefix: str) -> list[str]:
    """Feature objects in the bucket, listed behind the proxy's back (straight from moto)."""
    fs = s3_endpoint.filesystem()
    return [p for p in fs.find(f"{prefix}/features") if p.endswith(".parquet")]


def test_the_s3_retry_budget_is_bounded_and_configurable(monkeypatch):
    from leukoflow.store.storage import S3FS_TRIES, open_location

    monkeypatch.setenv("LEUKOFLOW_S3_MAX_ATTEMPTS", "3")
    fs = open_location("s3://bucket/store").fs
    assert fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 3}
    assert fs.config_kwargs["connect_timeout"] > 0 and fs.config_kwargs["read_timeout"] > 0
    assert fs.retries == S3FS_TRIES == 2


REFUSED_DURING_OUTAGE = 3  # attempts the run makes while the endpoint is away (of 8 allowed)


def test_an_s3_outage_within_the_retry_budget_is_ridden_out(
    s3_env, endpoint, cells, ray_local, prefect_harness, monkeypatch
):
    """In this process (the run's answer is the point, not its process): the run writes through
    CountingFront -> the stoppable endpoint -> moto; a thread stops the endpoint once the first
    feature objects are in, and starts it again once the run has retried REFUSED_DURING_OUTAGE
    times against it."""
    from leukoflow.flows.run import run_pipeline
    from leukoflow.recipe import Compute, FeatureRecipe

    bucket = s3_env.make_bucket()
    front = CountingFront(endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.url)
    run_over = threading.Event()
    seen: dict = {}

    def outage() -> None:
        def until(condition, what):
            def check():
                if run_over.is_set():
                    raise AssertionError(f"the run ended before {what}")
                return condition()

            return wait_for(check, 240, what)

        try:
            until(lambda: len(s3_parts(s3_env, f"{bucket}/store")) >= 3, "its first objects")
            actors = [p for p in children_of(os.getpid())
                      if command_line(p).startswith("ray::BackboneActor")]  # fmt: skip
            assert actors, "the run's backbone actor (a process of this session's Ray)"
            freeze(*actors)  # no batch completes until the endpoint is down
            try:
                endpoint.stop()
                seen["written_before"] = len(s3_parts(s3_env, f"{bucket}/store"))
            finally:
                thaw(*actors)
            until(lambda: front.refused >= REFUSED_DURING_OUTAGE, "the run to retry")
            seen["written_during"] = len(s3_parts(s3_env, f"{bucket}/store"))
        except BaseException as error:  # reported by the test's thread
            seen["error"] = error
        finally:
            endpoint.start()

    striker = threading.Thread(target=outage, daemon=True)
    striker.start()
    try:
        summary = run_pipeline(
            images=str(cells), store=f"s3://{bucket}/store",
            recipe=FeatureRecipe(("vgg16",), weights="none", image_size=32),
            compute=Compute(batch_size=2), examples_per_kind=0,
        )  # fmt: skip
    finally:
        run_over.set()
        striker.join(timeout=60)
        front.close()
    if "error" in seen:
        raise seen["error"]
    assert seen["written_during"] == seen["written_before"]  # really cut off, not merely slow
    assert seen["written_before"] < N_CELLS // 2  # batches were still to come
    assert summary["counts"]["featurised"] == N_CELLS
    assert summary["extraction"]["computed"] == {"vgg16": N_CELLS}
    fs = s3_env.filesystem()
    ids = ds.dataset(f"{bucket}/store/features/backbone=vgg16", filesystem=fs).to_table(
        columns=["image_id"]
    )
    assert ids.num_rows == len(set(ids.column("image_id").to_pylist())) == N_CELLS
    assert fs.exists(f"{bucket}/store/runs/run-{summary['run_id']}.parquet")


def test_an_s3_outage_past_the_retry_budget_fails_clearly_with_nothing_half_written(
    s3_endpoint, endpoint, cells, cli, tmp_path
):
    """A real `leukoflow run` (its exit status and message are the point) with a budget of 2
    attempts, the endpoint stopped after its first feature objects and never started again."""
    bucket = s3_endpoint.make_bucket()
    env = cli.env(
        LEUKOFLOW_S3_MAX_ATTEMPTS="2", **{**s3_endpoint.env, "AWS_ENDPOINT_URL": endpoint.url}
    )
    run = Background(
        "run", cells, "--store", f"s3://{bucket}/store", *SMALL_RUN, "--batch-size", 2, "--json",
        env=env, workdir=tmp_path,
    )  # fmt: skip
    try:
        run.wait_for(
            lambda: len(s3_parts(s3_endpoint, f"{bucket}/store")) >= 3, 240, "the first objects"
        )
        actors = run.actor_pids()
        freeze(*actors)  # no batch completes until the endpoint is down
        endpoint.stop()
        thaw(*actors)
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
    features = [name for name in objects if "/features/" in name]
    assert 3 <= len(features) < N_CELLS // 2  # cut off mid-extraction
    for name in objects:
        data = fs.cat_file(name)
        if name.endswith(".parquet"):
            pq.read_table(pa.BufferReader(data))
        elif name.endswith(".json"):
            json.loads(data)
    assert not [name for name in objects if "/runs/" in name]
