"""Training-time augmentation as in the paper: horizontal flip, vertical flip, random rotation.

An augmented image is addressed as "<sha256>#<transform>" ("#hflip", "#vflip", "#rot<degrees>"),
so its features are stored, looked up and joined like any other image's and are computed once.
The rotation angle is drawn from the image id and a seed, so one image always gets the same
angle and a re-run finds its vectors in the store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
from PIL import Image

SEPARATOR = "#"
HFLIP = "hflip"
VFLIP = "vflip"
ROTATION_PREFIX = "rot"
# Keras' RandomRotation(0.125) range; wider turns push the cell into the crop's corners.
MAX_ROTATION_DEGREES = 45


def augmented_id(image_id: str, transform: str) -> str:
    """The id of `image_id` seen through `transform`, e.g. "<sha256>#hflip"."""
    return f"{image_id}{SEPARATOR}{transform}"


def parse_image_id(image_id: str) -> tuple[str, str | None]:
    """(source image id, transform) of an id; the transform is None for an original image."""
    source, sep, transform = image_id.partition(SEPARATOR)
    return source, (transform if sep else None)


def is_augmented(image_id: str) -> bool:
    return SEPARATOR in image_id


def rotation_degrees(image_id: str, seed: int) -> int:
    """A non-zero whole angle within +-MAX_ROTATION_DEGREES, fixed by the image id and seed."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") % (2 * MAX_ROTATION_DEGREES)
    degrees = draw - MAX_ROTATION_DEGREES
    return degrees + 1 if degrees >= 0 else degrees  # skip 0: that would be the original


def transforms_for(image_id: str, seed: int) -> list[str]:
    """The paper's three augmentations of one image."""
    return [HFLIP, VFLIP, f"{ROTATION_PREFIX}{rotation_degrees(image_id, seed)}"]


def augmented_ids(image_ids: Iterable[str], seed: int) -> list[str]:
    """Every augmented id of every image, grouped by image in the given order."""
    return [augmented_id(i, t) for i in image_ids for t in transforms_for(i, seed)]


def apply_transform(pixels: np.ndarray, transform: str) -> np.ndarray:
    """The transformed copy of (H, W, 3) uint8 pixels; rotation keeps the size, corners black."""
    if transform == HFLIP:
        return np.ascontiguousarray(pixels[:, ::-1])
    if transform == VFLIP:
        return np.ascontiguousarray(pixels[::-1])
    if transform.startswith(ROTATION_PREFIX):
        degrees = int(transform.removeprefix(ROTATION_PREFIX))
        # C-NMC crops sit on a black background, so black is what the uncovered corners show.
        image = Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="RGB")
        turned = image.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
        return np.asarray(turned, dtype=np.uint8)
    raise ValueError(f"unknown augmentation {transform!r}")
