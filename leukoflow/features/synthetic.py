"""A deterministic synthetic dataset in the C-NMC training layout, for the demo and the tests.

Each BMP shows one stained cell on a black background, like a C-NMC crop: a pale blue/lilac
cytoplasm around a purple nucleus. Leukemic blasts ("all") differ from normal cells ("hem") in
the ways a haematologist would look for, but with overlapping distributions so the task is not
trivial: a larger nucleus-to-cell ratio, finer and more even chromatin, an irregular nuclear
outline, faint nucleoli and a slightly larger cell. Each subject also gets its own staining
shade, so subject-wise splits matter as they do on real data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from leukoflow.errors import LeukoflowError
from leukoflow.vocabulary import Label

_CYTOPLASM = np.array([178.0, 172.0, 218.0])  # pale blue/lilac
_NUCLEUS = np.array([112.0, 62.0, 150.0])  # purple


def make_synthetic_dataset(
    out_dir: str | Path,
    n_subjects: int = 6,
    cells_per_subject: int = 8,
    image_side: int = 128,
    seed: int = 0,
) -> Path:
    """Write fold_0/all/UID_<s>_<i>_<c>_all.bmp and fold_0/hem/UID_H<s>_..._hem.bmp; return root.

    Subjects 1..ceil(n/2) are ALL patients, the rest normal donors; the same seed gives
    byte-identical files.
    """
    if n_subjects < 2:
        raise LeukoflowError("a synthetic dataset needs at least 2 subjects (one of each class).")
    if cells_per_subject < 1:
        raise LeukoflowError("cells_per_subject must be at least 1.")
    if image_side < 32:
        raise LeukoflowError("image_side must be at least 32 pixels.")
    root = Path(out_dir)
    n_all = (n_subjects + 1) // 2
    for subject in range(1, n_subjects + 1):
        blast = subject <= n_all
        label = Label.of(blast).value
        name = str(subject) if blast else f"H{subject}"
        folder = root / "fold_0" / label
        folder.mkdir(parents=True, exist_ok=True)
        # One generator per subject (stain) and per cell: files do not depend on the counts.
        stain = np.random.default_rng([seed, subject]).normal(0.0, 12.0, size=3)
        for cell in range(cells_per_subject):
            rng = np.random.default_rng([seed, subject, cell + 1])
            pixels = _draw_cell(rng, image_side, blast, stain)
            path = folder / f"UID_{name}_{cell // 2 + 1}_{cell % 2 + 1}_{label}.bmp"
            Image.fromarray(pixels, mode="RGB").save(path, format="BMP")
    return root


def _outline(
    rng: np.random.Generator, theta: np.ndarray, harmonics: range, amp: float
) -> np.ndarray:
    """1 + a sum of random low harmonics: a wobbly circle whose wobble grows with `amp`."""
    # Evaluated on a table of angles and interpolated: the grid-wide cosines were the slow part.
    table = np.linspace(-np.pi, np.pi, 721)
    shape = np.ones_like(table)
    for k in harmonics:
        shape += rng.uniform(0.0, amp) / k**0.5 * np.cos(k * table + rng.uniform(0, 2 * np.pi))
    return np.interp(theta, table, shape)


def _soft_mask(distance: np.ndarray, radius: np.ndarray) -> np.ndarray:
    # About one pixel of anti-aliasing, as a real segmented crop has.
    return np.clip(radius - distance + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """Noise with blobs about side/cells pixels wide, unit standard deviation."""
    coarse = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((side, side), Image.Resampling.BICUBIC)
    values = np.asarray(image, dtype=np.float64)
    return (values - values.mean()) / (values.std() + 1e-9)


def _draw_cell(rng: np.random.Generator, side: int, blast: bool, stain: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)

    # Cell body: blasts slightly larger; positions and shapes jitter for both classes.
    radius = np.clip(rng.normal(0.32 if blast else 0.30, 0.035), 0.22, 0.40) * side
    centre = side / 2 + rng.uniform(-0.08, 0.08, size=2) * side
    dy, dx = yy - centre[0], xx - centre[1]
    theta, dist = np.arctan2(dy, dx), np.hypot(dy, dx)
    cell = _soft_mask(dist, radius * _outline(rng, theta, range(2, 4), 0.08))

    # Nucleus: larger share of the cell in blasts, with a more irregular outline.
    ratio = np.clip(rng.normal(0.74 if blast else 0.65, 0.08), 0.4, 0.92)
    n_radius = ratio * radius
    shift = (1.0 - ratio) * radius * rng.uniform(0.0, 0.6)
    angle = rng.uniform(0.0, 2 * np.pi)
    ndy, ndx = dy - shift * np.sin(angle), dx - shift * np.cos(angle)
    n_theta, n_dist = np.arctan2(ndy, ndx), np.hypot(ndy, ndx)
    irregular = rng.uniform(0.05, 0.12) if blast else rng.uniform(0.0, 0.05)
    nucleus = _soft_mask(n_dist, n_radius * _outline(rng, n_theta, range(3, 7), irregular)) * cell

    # Chromatin: fine and even in blasts, coarse dark clumps in mature normal cells.
    if blast:
        texture = 7.0 * rng.normal(0.0, 1.0, size=(side, side)) + 5.0 * _smooth_noise(
            rng, side, max(side // 4, 2)
        )
        darkness = rng.normal(2.0, 8.0)
    else:
        texture = 14.0 * _smooth_noise(rng, side, max(side // 12, 2)) + 4.0 * rng.normal(
            0.0, 1.0, size=(side, side)
        )
        darkness = rng.normal(8.0, 8.0)
    chroma = _NUCLEUS + stain - darkness
    nucleus_rgb = chroma[None, None, :] + texture[..., None] * np.array([1.0, 0.8, 1.0])

    if blast:
        # Faint, lighter nucleoli.
        for _ in range(rng.integers(0, 3)):
            spot = rng.uniform(-0.4, 0.4, size=2) * n_radius
            spot_dist = np.hypot(ndy - spot[0], ndx - spot[1])
            nucleus_rgb += (
                18.0 * _soft_mask(spot_dist, np.full_like(spot_dist, 0.09 * n_radius))[..., None]
            )

    cytoplasm_rgb = (_CYTOPLASM + stain)[None, None, :] + 6.0 * rng.normal(
        0.0, 1.0, size=(side, side, 1)
    )
    rgb = cytoplasm_rgb * (cell - nucleus)[..., None] + nucleus_rgb * nucleus[..., None]
    rgb += rng.normal(0.0, 3.0, size=rgb.shape) * cell[..., None]  # camera noise, cell only
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
