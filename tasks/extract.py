"""Feature extraction, framework-free: decode a batch once, run one backbone over it.

`Featurizer` holds one loaded backbone; `load_pixels` decodes and resizes a batch of images the
backbones share (each then applies its own preprocessing). Ray actors host Featurizers
(tasks.actors); tests use them directly.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, replace

import numpy as np

from leukoflow.tasks import augment
from leukoflow.tasks import backbones as bb
from leukoflow.tasks.images import ImageRejected, decode_image, resize_pixels
from leukoflow.tasks.storage import open_location


class HandcraftedFeaturizer:
    """A weight-free extractor applied to each full-resolution uint8 image."""

    def __init__(self, spec: bb.BackboneSpec):
        self.spec = spec
        self._extract = getattr(importlib.import_module(spec.module), spec.constructor)

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack([self._extract(image) for image in images]).astype(np.float32)


def make_featurizer(spec: bb.BackboneSpec, image_size: int, weights: bb.WeightsChoice):
    """The featurizer for `spec`: a Keras CNN on resized batches, or a hand-crafted extractor."""
    if spec.full_resolution:
        return HandcraftedFeaturizer(spec)
    return Featurizer(spec, image_size, weights)


def load_backbone(
    spec: bb.BackboneSpec, image_size: int, weights: bb.WeightsChoice, pooling: str | None = "avg"
):
    """The Keras model of `spec` with the checked weights file or the seeded random init.

    pooling=None gives the last convolutional feature map (class activation maps, tasks/cam)
    from exactly the weights the GAP features came from.
    """
    weights_path = None
    if weights.kind == "imagenet":
        path, _ = bb.resolve_weights_file(spec, weights)
        weights_path = str(path)
    return bb.build_model(spec, image_size, weights_path, weights.seed, pooling=pooling)


def traced_forward(model, image_size: int):
    """The model's inference graph, traced once, now, for every batch size, and run once.

    Keras' predict_on_batch traces the network again for each new batch shape: a run's last,
    smaller batch cost seconds of tracing per backbone on CPU (see docs/benchmarks.md). The
    first call of a traced graph still picks kernels and lays out weights (0.3-1.1 s per
    backbone here); one image does that at load, while the other actors are still loading,
    instead of on the first batch that every backbone must finish before it is written.
    """
    import tensorflow as tf

    signature = tf.TensorSpec((None, image_size, image_size, 3), tf.float32)
    forward = tf.function(lambda x: model(x, training=False), input_signature=[signature])
    forward(tf.zeros((1, image_size, image_size, 3)))
    return forward


class Featurizer:
    """One backbone, loaded once, turning (N, S, S, 3) pixels in 0..255 into GAP vectors."""

    def __init__(self, spec: bb.BackboneSpec, image_size: int, weights: bb.WeightsChoice):
        self.spec = spec
        self.image_size = image_size
        self.model = load_backbone(spec, image_size, weights)
        self._forward = traced_forward(self.model, image_size)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        batch = bb.preprocess(self.spec, pixels)
        vectors = np.asarray(self._forward(batch), dtype=np.float32)
        if vectors.shape != (len(pixels), self.spec.feature_dim):
            raise RuntimeError(f"{self.spec.name} returned shape {vectors.shape}")
        return vectors


@dataclass
class PixelBatch:
    image_ids: list[str]  # the images that decoded, in order of `pixels`
    pixels: np.ndarray  # (N, S, S, 3) float32, 0..255
    rejected: dict[str, str]  # image_id -> reason, for files that changed since cataloguing
    originals: list[np.ndarray] | None = None  # full-resolution uint8, when an extractor needs it


def load_pixels(
    uris: dict[str, str], image_ids: list[str], image_size: int, keep_originals: bool = False
) -> PixelBatch:
    """Read, decode and resize each image once; the batch is shared by every backbone."""
    kept, arrays, rejected, originals = [], [], {}, []
    for image_id in image_ids:
        # An augmented id ("<sha256>#hflip") names its source file's bytes seen through a transform.
        source_id, transform = augment.parse_image_id(image_id)
        loc = open_location(uris[image_id])
        try:
            data = loc.fs.cat_file(loc.path)
            if hashlib.sha256(data).hexdigest() != source_id:
                rejected[image_id] = "changed_since_catalog: the file's bytes changed"
                continue
            decoded = decode_image(data)
            if transform is not None:
                turned = augment.apply_transform(decoded.pixels, transform)
                decoded = replace(decoded, pixels=turned)
        except ImageRejected as error:
            rejected[image_id] = str(error)
            continue
        except OSError as error:
            # strerror, not str(error): the latter names the file, and reasons reach the logs.
            rejected[image_id] = f"unreadable: {error.strerror or type(error).__name__}"
            continue
        kept.append(image_id)
        arrays.append(resize_pixels(decoded.pixels, image_size))
        if keep_originals:
            originals.append(decoded.pixels)
    pixels = np.stack(arrays) if arrays else np.zeros((0, image_size, image_size, 3), np.float32)
    return PixelBatch(kept, pixels, rejected, originals if keep_originals else None)
