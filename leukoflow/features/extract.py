"""Feature extraction, framework-free: decode a batch once, run one backbone over it.

`Featuriser` holds one loaded backbone; `load_pixels` decodes and resizes a batch of images the
backbones share (each then applies its own preprocessing). Ray actors host Featurisers
(engine/actors); tests use them directly.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from leukoflow.features import augment
from leukoflow.features import backbones as bb
from leukoflow.features.images import ImageRejected, decode_image, resize_pixels
from leukoflow.store.storage import Location, open_location


@dataclass
class ExtractionResult:
    """What one extraction did: vectors written per backbone, images set aside with why, where
    each backbone's actor ran, and how long it took."""

    computed: dict[str, int] = field(default_factory=dict)  # backbone -> vectors written
    rejected: dict[str, str] = field(default_factory=dict)  # image_id -> reason
    actor_nodes: dict[str, str] = field(default_factory=dict)  # backbone -> node id
    actor_code_dirs: dict[str, str] = field(default_factory=dict)  # backbone -> code imported from
    seconds: float = 0.0
    # Epoch seconds when every actor had its network loaded (None: no actor was needed): the
    # start of steady-state throughput, recorded for bench/ rather than parsed from a log line.
    actors_ready_at: float | None = None

    @property
    def images_done(self) -> int:
        """Images that got vectors (of the backbone that wrote the most)."""
        return max(self.computed.values(), default=0)

    @property
    def images_per_second(self) -> float | None:
        return self.images_done / self.seconds if self.seconds else None

    def to_dict(self) -> dict:
        """The JSON form that summaries and run rows carry."""
        rate = self.images_per_second
        return {
            "computed": self.computed,
            "rejected": self.rejected,
            "seconds": round(self.seconds, 2),
            "images_per_second": rate and round(rate, 3),
            "actor_nodes": self.actor_nodes,
            "actor_code_dirs": self.actor_code_dirs,
            "actors_ready_at": self.actors_ready_at,
        }


class HandcraftedFeaturiser:
    """A weight-free extractor applied to each full-resolution uint8 image."""

    def __init__(self, spec: bb.BackboneSpec):
        self.spec = spec
        self._extract = getattr(importlib.import_module(spec.module), spec.constructor)

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack([self._extract(image) for image in images]).astype(np.float32)


def make_featuriser(
    spec: bb.BackboneSpec, image_size: int, weights: bb.WeightsChoice, precision: str = "fp32"
):
    """The featuriser for `spec`: a Keras CNN on resized batches at `precision`, or a
    hand-crafted extractor (which has no precision: it ignores it)."""
    if spec.full_resolution:
        return HandcraftedFeaturiser(spec)
    return Featuriser(spec, image_size, weights, precision)


def load_backbone(
    spec: bb.BackboneSpec,
    image_size: int,
    weights: bb.WeightsChoice,
    pooling: str | None = "avg",
    precision: str = "fp32",
):
    """The Keras model of `spec` with the checked weights file or the seeded random init.

    pooling=None gives the last convolutional feature map (class activation maps, present/cam)
    from exactly the weights the GAP features came from.
    """
    weights_path = None
    if weights.kind == "imagenet":
        path, _ = bb.resolve_weights_file(spec, weights)
        weights_path = str(path)
    return bb.build_model(
        spec, image_size, weights_path, weights.seed, pooling=pooling, precision=precision
    )


def traced_forward(model, image_size: int):
    """The model's inference graph, traced once, now, for every batch size, and run once.

    Keras' predict_on_batch traces the network again for each new batch shape: a run's last,
    smaller batch cost seconds of tracing per backbone on CPU (see docs/benchmarks.md). The
    first call of a traced graph still picks kernels and lays out weights (0.3-1.1 s per
    backbone here); one image does that at load, while the other actors are still loading,
    instead of on the first batch that every backbone must finish before it is written.
    The output is cast to float32 in the graph: a bf16 model's vectors are stored as float32.
    """
    import tensorflow as tf

    signature = tf.TensorSpec((None, image_size, image_size, 3), tf.float32)
    forward = tf.function(
        lambda x: tf.cast(model(x, training=False), tf.float32), input_signature=[signature]
    )
    forward(tf.zeros((1, image_size, image_size, 3)))
    return forward


class Featuriser:
    """One backbone, loaded once, turning (N, S, S, 3) pixels in 0..255 into GAP vectors."""

    def __init__(
        self,
        spec: bb.BackboneSpec,
        image_size: int,
        weights: bb.WeightsChoice,
        precision: str = "fp32",
    ):
        self.spec = spec
        self.image_size = image_size
        self.precision = precision
        self.model = load_backbone(spec, image_size, weights, precision=precision)
        self._forward = traced_forward(self.model, image_size)
        self._map_forward = None

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        batch = bb.preprocess(self.spec, pixels)
        vectors = np.asarray(self._forward(batch), dtype=np.float32)
        if vectors.shape != (len(pixels), self.spec.feature_dim):
            raise RuntimeError(f"{self.spec.name} returned shape {vectors.shape}")
        return vectors

    def feature_maps(self, pixels: np.ndarray) -> np.ndarray:
        """The last convolutional feature maps (N, h, w, C) as float32, from the same model.

        The GAP layer is the model's last layer, so its input is the map: a second model over
        the same layers shares every weight (no rebuild, no second copy), and the map's spatial
        mean is exactly the stored vector. Traced on first use only (explanations are rare).
        """
        if self._map_forward is None:
            import keras
            import tensorflow as tf

            maps = keras.Model(self.model.input, self.model.layers[-1].input)
            signature = tf.TensorSpec((None, self.image_size, self.image_size, 3), tf.float32)
            self._map_forward = tf.function(
                lambda x: tf.cast(maps(x, training=False), tf.float32),
                input_signature=[signature],
            )
        batch = bb.preprocess(self.spec, pixels)
        return np.asarray(self._map_forward(batch), dtype=np.float32)


@dataclass
class PixelBatch:
    image_ids: list[str]  # the images that decoded, in order of `pixels`
    pixels: np.ndarray  # (N, S, S, 3) float32, 0..255
    rejected: dict[str, str]  # image_id -> reason, for files that changed since cataloguing
    originals: list[np.ndarray] | None = None  # full-resolution uint8, when an extractor needs it


def decode_workers() -> int:
    """Threads that read, hash and decode: one per core (LEUKOFLOW_DECODE_THREADS overrides).

    Reading, sha256 and Pillow's decode and resize all release the GIL, so threads scale with
    cores (docs/benchmarks.md, "decode stage"); on S3 they also keep that many requests open.
    """
    configured = os.environ.get("LEUKOFLOW_DECODE_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, os.cpu_count() or 1)


_DECODE_POOL: ThreadPoolExecutor | None = None
_DECODE_POOL_LOCK = threading.Lock()


def _decode_pool() -> ThreadPoolExecutor:
    """One pool per process, made on first use (importing this module starts no thread)."""
    global _DECODE_POOL
    with _DECODE_POOL_LOCK:
        if _DECODE_POOL is None:
            _DECODE_POOL = ThreadPoolExecutor(decode_workers(), thread_name_prefix="decode")
        return _DECODE_POOL


@dataclass
class _Decoded:
    image_id: str
    pixels: np.ndarray | None = None  # resized float32, when accepted
    original: np.ndarray | None = None  # full-resolution uint8, when asked for
    reason: str | None = None  # why rejected, when rejected


def _locations(uris: list[str]) -> list[Location]:
    """A Location per uri, sharing one filesystem per S3 bucket: a new s3fs client per image
    would cost a connection set-up per read; one client serves every thread's requests."""
    shared: dict[str, Location] = {}
    found = []
    for uri in uris:
        scheme, _, rest = uri.partition("://")
        if not rest or scheme == "file":
            found.append(open_location(uri))
            continue
        bucket = f"{scheme}://{rest.split('/', 1)[0]}"
        if bucket not in shared:
            shared[bucket] = open_location(uri)
        fs = shared[bucket].fs
        found.append(Location(fs, fs._strip_protocol(uri)))
    return found


def _fetch_remote(locations: list[Location]) -> dict[int, bytes | Exception]:
    """The bytes of every object-store image of a batch, fetched concurrently: one `cat` per
    bucket runs all of the batch's GETs at once on fsspec's event loop (a thread per request
    would need far more threads than cores to hide S3's latency). Local files: not here."""
    groups: dict[int, list[int]] = {}
    for k, loc in enumerate(locations):
        if not loc.is_local:
            groups.setdefault(id(loc.fs), []).append(k)
    fetched: dict[int, bytes | Exception] = {}
    for rows in groups.values():
        fs = locations[rows[0]].fs
        answers = fs.cat(sorted({locations[k].path for k in rows}), on_error="return")
        for k in rows:
            fetched[k] = answers.get(locations[k].path, FileNotFoundError(2, "not found"))
    return fetched


def _read_one(
    loc: Location,
    image_id: str,
    image_size: int,
    keep_original: bool,
    data: bytes | Exception | None = None,
) -> _Decoded:
    """Read (unless `data` was fetched already), check, decode and resize one image; a bad one
    comes back with its reason."""
    # An augmented id ("<sha256>#hflip") names its source file's bytes seen through a transform.
    source_id, transform = augment.parse_image_id(image_id)
    try:
        if data is None:
            data = loc.fs.cat_file(loc.path)
        elif isinstance(data, Exception):
            raise data  # a failed fetch: the same reasons as a failed read
        if hashlib.sha256(data).hexdigest() != source_id:
            return _Decoded(image_id, reason="changed_since_catalog: the file's bytes changed")
        decoded = decode_image(data)
        if transform is not None:
            decoded = replace(decoded, pixels=augment.apply_transform(decoded.pixels, transform))
    except ImageRejected as error:
        return _Decoded(image_id, reason=str(error))
    except OSError as error:
        # strerror, not str(error): the latter names the file, and reasons reach the logs.
        return _Decoded(image_id, reason=f"unreadable: {error.strerror or type(error).__name__}")
    resized = resize_pixels(decoded.pixels, image_size)
    return _Decoded(image_id, resized, decoded.pixels if keep_original else None)


def load_pixels(
    uris: dict[str, str],
    image_ids: list[str],
    image_size: int,
    keep_originals: bool = False,
    workers: int | None = None,
) -> PixelBatch:
    """Read, decode and resize each image once; the batch is shared by every backbone.

    Images are decoded in parallel (`workers` threads, default decode_workers()), object-store
    images fetched concurrently first; memory stays bounded by the batch, and the result keeps
    the order of `image_ids` whatever order the threads finish in. Every id comes back either
    in `image_ids` or in `rejected`.
    """
    locations = _locations([uris[i] for i in image_ids])
    fetched = _fetch_remote(locations)

    def read(k: int) -> _Decoded:
        return _read_one(locations[k], image_ids[k], image_size, keep_originals, fetched.get(k))

    if workers == 1 or len(image_ids) <= 1:
        results = [read(k) for k in range(len(image_ids))]
    else:
        pool = _decode_pool() if workers is None else ThreadPoolExecutor(workers)
        try:
            results = list(pool.map(read, range(len(image_ids))))
        finally:
            if workers is not None:
                pool.shutdown()
    kept = [r for r in results if r.reason is None]
    rejected = {r.image_id: r.reason for r in results if r.reason is not None}
    pixels = (
        np.stack([r.pixels for r in kept])
        if kept
        else np.zeros((0, image_size, image_size, 3), np.float32)
    )
    originals = [r.original for r in kept] if keep_originals else None
    return PixelBatch([r.image_id for r in kept], pixels, rejected, originals)
