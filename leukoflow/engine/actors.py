"""Ray side of extraction: one actor per backbone, and the streaming driver that feeds them.

The driver decodes each batch once, puts it in Ray's object store, and every backbone actor
reads the same copy. At most `max_batches_in_flight` batches are outstanding, so memory stays
bounded however large the dataset; vectors are written to Parquet batch by batch as they arrive.
Actors restart and retry a batch if their process dies; the driver writes a batch only once its
vectors are back, so a retry never duplicates rows. At the end, each backbone's per-batch files
are merged into larger ones (store/tables.compact_features).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import ray

import leukoflow
from leukoflow.errors import LeukoflowError
from leukoflow.features import backbones as bb
from leukoflow.features.extract import ExtractionResult, load_pixels, make_featuriser
from leukoflow.recipe import Compute, FeatureRecipe
from leukoflow.store.storage import Location
from leukoflow.store.tables import compact_features, write_features

log = logging.getLogger("leukoflow.extract")

QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
# Environment of the actor processes: a GPU may be shared by several backbones, so TensorFlow
# takes its memory as needed (set before TensorFlow starts, whatever imports it first).
ACTOR_ENV = {**QUIET_TF, "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use an existing Ray session, connect to a cluster, or start a private local one."""
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    with ExitStack() as stack:
        if address and address != "local":
            _check_reachable(address)
            # The cluster's image carries the dependencies; this driver's own code travels with
            # the job so workers run exactly the version that submitted it. A folder, not module
            # objects: a Ray Client (ray://) driver must send the runtime env over the wire.
            staging = stack.enter_context(tempfile.TemporaryDirectory(prefix="leukoflow-code-"))
            _join_cluster(
                address,
                runtime_env={"py_modules": [stage_package(staging)], "env_vars": ACTOR_ENV},
            )
        else:
            # address="local": never attach to a stale `ray start` cluster left on this machine.
            ray.init(
                address="local",
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": ACTOR_ENV},
            )
        try:
            yield
        finally:
            ray.shutdown()


def stage_package(folder: str) -> str:
    """Copy the installed `leukoflow` package, its tasks and flows included, into `folder`.

    In the repository tasks/ and flows/ sit beside leukoflow/ and are mapped into it by the
    package-dir of pyproject.toml; a worker needs them nested, as one importable folder.
    """
    import leukoflow
    import leukoflow.flows
    import leukoflow.tasks

    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    target = os.path.join(folder, "leukoflow")
    shutil.copytree(os.path.dirname(leukoflow.__file__), target, ignore=skip, dirs_exist_ok=True)
    for sub in (leukoflow.tasks, leukoflow.flows):
        name = sub.__name__.rpartition(".")[2]
        shutil.copytree(
            os.path.dirname(sub.__file__), os.path.join(target, name), ignore=skip,
            dirs_exist_ok=True,
        )  # fmt: skip
    return target


# How often a ray:// driver asks the cluster's Ray Client server for a session. The server
# starts one process per driver; on a busy head that start sometimes fails ("Initialization
# failure from server") and the next request succeeds. Ray retries a dropped connection, not a
# failed start, so the retry is ours.
CLIENT_SESSION_ATTEMPTS = 3
CLIENT_RETRY_PAUSE_S = 2.0


def _join_cluster(address: str, runtime_env: dict) -> None:
    """ray.init on a running cluster; a clear error when it refuses this driver."""
    client = address.startswith("ray://")
    attempts = CLIENT_SESSION_ATTEMPTS if client else 1
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
            return
        except (ConnectionError, ray.exceptions.AuthenticationError) as error:
            ray.shutdown()
            if not (client and isinstance(error, ConnectionAbortedError)):
                # The port answered: most often the cluster wants a token this driver lacks.
                raise LeukoflowError(
                    f"cannot join the Ray cluster at {address} ({error}); with token "
                    "authentication set RAY_AUTH_MODE=token and the cluster's token in "
                    "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN"
                ) from error
            if attempt == attempts:  # the Ray Client server could not start a session
                raise LeukoflowError(
                    f"the Ray Client server at {address} could not start a session for this "
                    f"driver ({attempts} attempts; the last said: {error}); its logs are "
                    "ray_client_server_*.err in the head node's Ray log folder"
                ) from error
            log.warning(
                "the Ray Client server at %s could not start a session (attempt %d of %d); "
                "asking again in %.0f s",
                address, attempt, attempts, CLIENT_RETRY_PAUSE_S,
            )  # fmt: skip
            time.sleep(CLIENT_RETRY_PAUSE_S)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a wrong host:port; ray.init would retry for minutes."""
    if address == "auto":
        return  # auto-discovery of a cluster this machine belongs to: Ray's to resolve
    scheme, _, where = address.rpartition("://")
    if scheme not in ("", "ray"):
        raise LeukoflowError(f"--ray-address wants HOST:PORT or ray://HOST:PORT, got {address}")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        raise LeukoflowError(f"--ray-address wants HOST:PORT or ray://HOST:PORT, got {address}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise LeukoflowError(
            f"cannot reach the Ray cluster at {address}: {error.strerror or error}"
        ) from error


# A lost node makes its actor "unavailable" for as long as Ray takes to declare the node dead
# and restart the actor elsewhere; a bounded retry count runs out within that window. Unlimited
# retries cover only system failures (an error raised by featurise is never retried), and
# max_restarts still ends a run whose actor keeps dying.
@ray.remote(max_restarts=2, max_task_retries=-1)
class BackboneActor:
    """Hosts one backbone for the whole run (the model is loaded once per process)."""

    def __init__(
        self,
        spec: bb.BackboneSpec,
        image_size: int,
        weights: bb.WeightsChoice,
        precision: str = "fp32",
    ):
        self._args = (spec, image_size, weights, precision)
        self._featuriser = None

    def _ensure_loaded(self):
        if self._featuriser is None:
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                # A card may be shared by several backbones: take memory as needed, not all.
                tf.config.experimental.set_memory_growth(gpu, True)
            self._featuriser = make_featuriser(*self._args)
        return self._featuriser

    def load(self) -> dict:
        self._ensure_loaded()
        context = ray.get_runtime_context()
        # Where this process imported the project from: the job's runtime_env on a cluster.
        code_dir = os.path.dirname(os.path.dirname(os.path.abspath(leukoflow.__file__)))
        return {"node_id": context.get_node_id(), "pid": os.getpid(), "code_dir": code_dir}

    def featurise(self, pixels: np.ndarray | list[np.ndarray], rows: list[int]) -> np.ndarray:
        """Vectors for the given rows of a shared batch (resized array, or originals list)."""
        featuriser = self._ensure_loaded()
        if isinstance(pixels, list):
            return featuriser([pixels[k] for k in rows])
        return featuriser(pixels[rows])

    def feature_maps(self, pixels: np.ndarray) -> np.ndarray:
        """Last convolutional feature maps (N, h, w, C) of resized pixels, from the loaded model
        (explanations reuse the model that made the vectors instead of building another)."""
        return self._ensure_loaded().feature_maps(pixels)


@dataclass
class ActorPlan:
    """Resources each backbone actor asks Ray for."""

    num_cpus: float
    num_gpus: float

    @property
    def threads(self) -> int:
        """Math-library threads per actor: its CPU share rounded up, so that a node's actors
        together can use all of its cores (Ray rounds down: 3 actors on 4 cores used 3)."""
        return max(1, math.ceil(self.num_cpus))

    def env_vars(self) -> dict[str, str]:
        """OMP_NUM_THREADS for the actor (TensorFlow's oneDNN kernels honour it); a value set
        where the driver runs wins, so one can try others (docs/benchmarks.md)."""
        return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(self.threads))}

    @classmethod
    def for_cluster(cls, n_actors: int, gpu_share: float | None, cpus: float | None) -> ActorPlan:
        resources = ray.cluster_resources()
        if resources.get("GPU", 0) > 0:
            return cls(num_cpus=cpus or 1.0, num_gpus=gpu_share or round(1.0 / n_actors, 3))
        # CPU only: share one node's cores between the actors so they never oversubscribe it;
        # all of them then also fit on one node, so a lost node's actor can restart elsewhere.
        # Nodes without CPUs (a head started with --num-cpus 0) host no actor and do not count.
        cores = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        node_cpus = min((c for c in cores if c > 0), default=1.0)
        return cls(num_cpus=cpus or max(0.1, round(node_cpus / n_actors, 3) - 0.001), num_gpus=0)


class BackbonePool:
    """The backbone actors of one recipe, started on first use and kept until `close`.

    Extraction and the explanations that follow it (the report's examples, a sweep's flagged
    cells) share the actors, so each network is built once per run, in an actor: the driver
    never loads TensorFlow (whose log lines would reach the user's terminal). Needs a Ray
    cluster: inside a ray_session it uses that one; otherwise it joins `compute.ray_address`
    (or starts a private local Ray) on first use only, and leaves it at `close`, so a flow can
    hold a pool from its start and pay for Ray only when some vector or map is needed.
    """

    def __init__(self, recipe: FeatureRecipe, compute: Compute):
        self.recipe = recipe
        self.compute = compute
        self.plan: ActorPlan | None = None
        self._actors: dict[str, ray.actor.ActorHandle] = {}
        self.loaded: dict[str, dict] = {}
        self._session: ExitStack | None = None

    def actors(self, names: list[str]) -> dict[str, ray.actor.ActorHandle]:
        """Loaded actors for `names`, starting the missing ones.

        Actors are sized for the set they are started with; asking for a backbone the pool
        lacks restarts the pool for the new set, so the cores are never promised twice (Ray
        would wait forever for a share no actor gives back).
        """
        if self._actors and not ray.is_initialized():
            # The Ray session they lived in was closed by someone else: they went with it.
            self._actors, self.loaded = {}, {}
        if all(name in self._actors for name in names):
            return {name: self._actors[name] for name in names}
        self._stop_actors()
        if self._session is None:
            self._session = ExitStack()
            self._session.enter_context(ray_session(self.compute.ray_address))
        self.plan = ActorPlan.for_cluster(len(names), self.compute.gpu_share,
                                          self.compute.actor_cpus)  # fmt: skip
        recipe = self.recipe
        self._actors = {
            name: BackboneActor.options(
                num_cpus=self.plan.num_cpus,
                num_gpus=self.plan.num_gpus,
                scheduling_strategy="SPREAD",
                runtime_env={"env_vars": self.plan.env_vars()},
            ).remote(bb.BACKBONES[name], recipe.image_size, recipe.choice, recipe.precision)
            for name in names
        }
        infos = ray.get([self._actors[n].load.remote() for n in names])
        self.loaded = dict(zip(names, infos, strict=True))
        return dict(self._actors)

    def feature_maps(self, names: list[str], pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Each CNN's last feature maps (N, h, w, C) for resized pixels (N, S, S, 3)."""
        cnns = [n for n in names if not bb.BACKBONES[n].full_resolution]
        if not cnns:
            return {}
        actors = self.actors(cnns)
        pixels_ref = ray.put(np.asarray(pixels, np.float32))
        maps = ray.get([actors[n].feature_maps.remote(pixels_ref) for n in cnns],
                       timeout=self.compute.batch_timeout_s)  # fmt: skip
        return dict(zip(cnns, maps, strict=True))

    def _stop_actors(self) -> None:
        if ray.is_initialized():
            for actor in self._actors.values():
                ray.kill(actor)
        self._actors, self.loaded = {}, {}

    def close(self) -> None:
        """Stop the actors, and the Ray session if this pool started it."""
        try:
            self._stop_actors()
        finally:
            session, self._session = self._session, None
            if session is not None:
                session.close()


@contextmanager
def backbone_pool(recipe: FeatureRecipe, compute: Compute) -> Iterator[BackbonePool]:
    """A BackbonePool for the duration of the block; Ray starts only if the pool is used."""
    pool = BackbonePool(recipe, compute)
    try:
        yield pool
    finally:
        pool.close()


def extract_features(
    store: Location,
    uris: dict[str, str],
    todo: dict[str, list[str]],
    recipe: FeatureRecipe,
    compute: Compute,
    max_batches_in_flight: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
    pool: BackbonePool | None = None,
) -> ExtractionResult:
    """Compute and store the missing vectors on the current Ray session (see ray_session).

    With `pool`, the actors are taken from it and left running for later explanations (the
    pool starts Ray itself if no session is open); without, they are private to this call and
    stopped at its end.
    """
    result = ExtractionResult()
    names = [n for n, ids in todo.items() if ids]
    if not names:
        return result
    started = time.perf_counter()
    private = pool is None
    pool = pool or BackbonePool(recipe, compute)
    try:
        actors = pool.actors(names)
        result.actor_nodes = {n: pool.loaded[n]["node_id"] for n in names}
        result.actor_code_dirs = {n: pool.loaded[n]["code_dir"] for n in names}
        result.actors_ready_at = time.time()  # what bench/ times steady state from
        log.info("extract: actors %s, %s per actor", result.actor_nodes, pool.plan)
        _stream(store, uris, todo, recipe, compute, names, actors, result,
                max_batches_in_flight, on_progress)  # fmt: skip
    finally:
        if private:
            pool.close()
    for name in result.computed:
        # One file per batch is what streaming needs; readers want few, larger files.
        compact_features(store, name)
    result.seconds = time.perf_counter() - started
    return result


def _stream(store, uris, todo, recipe, compute, names, actors, result, max_in_flight, on_progress):
    """Decode batches in the driver and feed every actor; write each batch once it is back."""
    image_size, batch_size = recipe.image_size, compute.batch_size
    wanted = {name: set(todo[name]) for name in names}
    all_ids = list(dict.fromkeys(i for name in names for i in todo[name]))
    in_flight: deque = deque()
    done = 0

    def drain_one() -> None:
        nonlocal done
        batch_ids, futures = in_flight.popleft()
        for name, ids, future in futures:
            vectors = ray.get(future, timeout=compute.batch_timeout_s)
            write_features(store, name, *recipe.vector_key(name), ids, vectors)
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
                futures.append((name, ids, actors[name].featurise.remote(source, rows)))
        in_flight.append((len(batch.image_ids) + len(batch.rejected), futures))
        while len(in_flight) > max_in_flight:
            drain_one()
    while in_flight:
        drain_one()
