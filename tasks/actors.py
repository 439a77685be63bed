"""Ray side of extraction: one actor per backbone, and the streaming driver that feeds them.

The driver decodes each batch once, puts it in Ray's object store, and every backbone actor
reads the same copy. At most `max_batches_in_flight` batches are outstanding, so memory stays
bounded however large the dataset; vectors are written to Parquet batch by batch as they arrive.
Actors restart and retry a batch if their process dies; the driver writes a batch only once its
vectors are back, so a retry never duplicates rows.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import ray

from tasks import backbones as bb
from tasks.extract import load_pixels, make_featurizer
from tasks.storage import Location
from tasks.tables import featurised_ids, write_features

log = logging.getLogger("leukoflow.extract")

QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use an existing Ray session, connect to a cluster, or start a private local one."""
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        import flows
        import leukoflow
        import tasks

        # The cluster's image carries the dependencies; this driver's own code travels with the
        # job so workers run exactly the version that submitted it.
        ray.init(
            address=address,
            runtime_env={"py_modules": [leukoflow, tasks, flows], "env_vars": QUIET_TF},
            log_to_driver=False,
        )
    else:
        # address="local": never attach to a stale `ray start` cluster left on this machine.
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": QUIET_TF},
        )
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote(max_restarts=2, max_task_retries=2)
class BackboneActor:
    """Hosts one backbone for the whole run (the model is loaded once per process)."""

    def __init__(self, spec: bb.BackboneSpec, image_size: int, weights: bb.WeightsChoice):
        self._args = (spec, image_size, weights)
        self._featurizer = None

    def _ensure_loaded(self):
        if self._featurizer is None:
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                # A card may be shared by several backbones: take memory as needed, not all.
                tf.config.experimental.set_memory_growth(gpu, True)
            self._featurizer = make_featurizer(*self._args)
        return self._featurizer

    def load(self) -> dict:
        self._ensure_loaded()
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "pid": os.getpid()}

    def featurize(self, pixels: np.ndarray | list[np.ndarray], rows: list[int]) -> np.ndarray:
        """Vectors for the given rows of a shared batch (resized array, or originals list)."""
        featurizer = self._ensure_loaded()
        if isinstance(pixels, list):
            return featurizer([pixels[k] for k in rows])
        return featurizer(pixels[rows])


@dataclass
class ActorPlan:
    """Resources each backbone actor asks Ray for."""

    num_cpus: float
    num_gpus: float

    @classmethod
    def for_cluster(cls, n_actors: int, gpu_share: float | None, cpus: float | None) -> ActorPlan:
        resources = ray.cluster_resources()
        if resources.get("GPU", 0) > 0:
            return cls(num_cpus=cpus or 1.0, num_gpus=gpu_share or round(1.0 / n_actors, 3))
        # CPU only: share one node's cores between the actors so they never oversubscribe it.
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        node_cpus = min(n["Resources"].get("CPU", 1.0) for n in nodes) if nodes else 1.0
        return cls(num_cpus=cpus or max(0.1, round(node_cpus / n_actors, 3) - 0.001), num_gpus=0)


@dataclass
class ExtractionResult:
    computed: dict[str, int] = field(default_factory=dict)  # backbone -> vectors written
    rejected: dict[str, str] = field(default_factory=dict)  # image_id -> reason
    actor_nodes: dict[str, str] = field(default_factory=dict)  # backbone -> node id
    seconds: float = 0.0

    @property
    def images_done(self) -> int:
        return max(self.computed.values(), default=0)


def missing_features(
    store: Location, names: list[str], weight_ids: dict[str, str], image_size: int, ids: list[str]
) -> dict[str, list[str]]:
    """For each backbone, the ids (in catalog order) that have no vector for this recipe yet."""
    todo = {}
    for name in names:
        size = bb.size_key(bb.BACKBONES[name], image_size)
        done = featurised_ids(store, name, weight_ids[name], size)
        todo[name] = [i for i in ids if i not in done]
    return todo


def extract_features(
    store: Location,
    uris: dict[str, str],
    todo: dict[str, list[str]],
    weights: bb.WeightsChoice,
    weight_ids: dict[str, str],
    image_size: int,
    batch_size: int = 32,
    max_batches_in_flight: int = 2,
    gpu_share: float | None = None,
    actor_cpus: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ExtractionResult:
    """Compute and store the missing vectors; needs a Ray session (see ray_session)."""
    result = ExtractionResult()
    names = [n for n, ids in todo.items() if ids]
    if not names:
        return result
    started = time.perf_counter()
    plan = ActorPlan.for_cluster(len(names), gpu_share, actor_cpus)
    actors = {
        name: BackboneActor.options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, scheduling_strategy="SPREAD"
        ).remote(bb.BACKBONES[name], image_size, weights)
        for name in names
    }
    loaded = ray.get([actors[n].load.remote() for n in names])
    result.actor_nodes = {n: info["node_id"] for n, info in zip(names, loaded, strict=True)}

    wanted = {name: set(todo[name]) for name in names}
    all_ids = list(dict.fromkeys(i for name in names for i in todo[name]))
    in_flight: deque = deque()
    done = 0

    def drain_one() -> None:
        nonlocal done
        batch_ids, futures = in_flight.popleft()
        for name, ids, future in futures:
            vectors = ray.get(future)
            size = bb.size_key(bb.BACKBONES[name], image_size)
            write_features(store, name, weight_ids[name], size, ids, vectors)
            result.computed[name] = result.computed.get(name, 0) + len(ids)
        done += batch_ids
        if on_progress:
            on_progress(done, len(all_ids))

    full_resolution = {n for n in names if bb.BACKBONES[n].full_resolution}
    for start in range(0, len(all_ids), batch_size):
        batch = load_pixels(
            uris, all_ids[start : start + batch_size], image_size, bool(full_resolution)
        )
        result.rejected.update(batch.rejected)
        pixels_ref = ray.put(batch.pixels)
        originals_ref = ray.put(batch.originals) if full_resolution else None
        futures = []
        for name in names:
            rows = [k for k, image_id in enumerate(batch.image_ids) if image_id in wanted[name]]
            if rows:
                ids = [batch.image_ids[k] for k in rows]
                source = originals_ref if name in full_resolution else pixels_ref
                futures.append((name, ids, actors[name].featurize.remote(source, rows)))
        in_flight.append((len(batch.image_ids) + len(batch.rejected), futures))
        while len(in_flight) > max_batches_in_flight:
            drain_one()
    while in_flight:
        drain_one()
    for actor in actors.values():
        ray.kill(actor)
    result.seconds = time.perf_counter() - started
    return result
