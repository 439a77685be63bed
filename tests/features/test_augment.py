"""Augmented images: ids that key their features, transforms, and decoding through load_pixels."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from leukoflow.features import augment
from leukoflow.features.extract import load_pixels


def test_an_augmented_id_names_its_source_and_transform():
    image_id = "a" * 64
    assert augment.parse_image_id(augment.augmented_id(image_id, "hflip")) == (image_id, "hflip")
    assert augment.parse_image_id(image_id) == (image_id, None)
    assert augment.is_augmented(f"{image_id}#rot-12") and not augment.is_augmented(image_id)


def test_each_image_gets_the_papers_three_transforms_with_a_fixed_nonzero_angle():
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(200)]
    angles = [augment.rotation_degrees(i, seed=0) for i in ids]
    assert all(a != 0 and abs(a) <= augment.MAX_ROTATION_DEGREES for a in angles)
    assert len(set(angles)) > 30  # spread over the range, not one angle for all
    assert angles == [augment.rotation_degrees(i, seed=0) for i in ids]  # stable across runs
    assert angles != [augment.rotation_degrees(i, seed=1) for i in ids]  # but seeded
    transforms = augment.transforms_for(ids[0], seed=0)
    assert transforms == ["hflip", "vflip", f"rot{angles[0]}"]
    assert augment.augmented_ids(ids[:2], 0)[:3] == [f"{ids[0]}#{t}" for t in transforms]


def test_flips_mirror_the_pixels_and_rotation_keeps_size_with_black_corners():
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[2, 3] = (255, 10, 20)
    flipped = augment.apply_transform(pixels, "hflip")
    assert tuple(flipped[2, 30 - 1 - 3]) == (255, 10, 20)
    np.testing.assert_array_equal(augment.apply_transform(flipped, "hflip"), pixels)
    assert tuple(augment.apply_transform(pixels, "vflip")[20 - 1 - 2, 3]) == (255, 10, 20)
    white = np.full((40, 40, 3), 255, np.uint8)
    turned = augment.apply_transform(white, "rot30")
    assert turned.shape == white.shape and turned.dtype == np.uint8
    assert turned[0, 0].sum() == 0 and turned[20, 20].sum() == 3 * 255
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment.apply_transform(pixels, "shear")


def test_load_pixels_decodes_the_source_file_and_applies_the_transform(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    path = tmp_path / "cell.png"
    Image.fromarray(pixels).save(path)
    image_id = hashlib.sha256(path.read_bytes()).hexdigest()
    ids = [image_id, f"{image_id}#hflip", f"{image_id}#vflip"]
    batch = load_pixels({i: str(path) for i in ids}, ids, image_size=48)
    assert batch.image_ids == ids and not batch.rejected
    np.testing.assert_array_equal(batch.pixels[0], pixels.astype(np.float32))
    np.testing.assert_array_equal(batch.pixels[1], pixels[:, ::-1].astype(np.float32))
    np.testing.assert_array_equal(batch.pixels[2], pixels[::-1].astype(np.float32))

    path.write_bytes(path.read_bytes() + b"changed")  # the source changed since cataloguing
    batch = load_pixels({i: str(path) for i in ids}, ids, image_size=48)
    assert batch.image_ids == [] and set(batch.rejected) == set(ids)
