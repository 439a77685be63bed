"""The colour/morphology extractor: segmentation against drawn cells of known geometry, a pinned
feature list, determinism, finite output on degenerate and real C-NMC images; and the development
blocks bench/cm_validate.py compares (not shipped in cm-1): the colour normalisations' (per cell,
per subject) invariance to a global colour cast, N:C and chromatin features, contour descriptors
and their invariances."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from datapaths import CNMC
from skimage.draw import disk

from leukoflow.features.color_morphology import (
    BLOCK_CATALOGUES,
    FEATURE_DIM,
    FEATURE_NAMES,
    FEATURE_VERSION,
    SHIPPED_BLOCKS,
    SHIPPED_NORMALISE,
    Segmentation,
    colour_moments,
    describe_features,
    extract_features,
    feature_blocks,
    segment_cell,
)

SIDE = 300
CELL_CENTER, CELL_RADIUS = (150, 150), 90
NUC_CENTER, NUC_RADIUS = (142, 160), 55
LILAC = (200, 162, 220)  # Giemsa-stained cytoplasm: light
PURPLE = (110, 50, 150)  # nucleus: darker, more stained

BACKGROUNDS = {
    "black": (0, 0, 0),  # C-NMC crops
    "white": (245, 245, 245),  # an unsegmented bright-field field
    "smear": (232, 218, 226),  # pinkish smear background, close to the cytoplasm
}


def _drawn_cell(
    background: tuple[int, int, int], noise: float = 12.0, side: int = SIDE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A lilac disk cell with a darker purple disk nucleus, plus the true masks."""
    truth_cell = np.zeros((side, side), bool)
    truth_cell[disk(CELL_CENTER, CELL_RADIUS, shape=truth_cell.shape)] = True
    truth_nuc = np.zeros((side, side), bool)
    truth_nuc[disk(NUC_CENTER, NUC_RADIUS, shape=truth_nuc.shape)] = True
    image = np.empty((side, side, 3), np.float64)
    image[:] = background
    image[truth_cell] = LILAC
    image[truth_nuc] = PURPLE
    image += np.random.default_rng(7).normal(0.0, noise, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), truth_cell, truth_nuc


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _feature(vector: np.ndarray, name: str) -> float:
    return float(vector[FEATURE_NAMES.index(name)])


# -- feature list -------------------------------------------------------------------------------
def test_feature_list_is_pinned():
    # Changing the list means bumping FEATURE_VERSION and updating this pin and the docs.
    assert FEATURE_VERSION == "cm-1"
    assert FEATURE_DIM == len(FEATURE_NAMES) == 165
    assert len(set(FEATURE_NAMES)) == FEATURE_DIM
    assert FEATURE_NAMES[0] == "cell_lab_L_mean"
    assert FEATURE_NAMES[-1] == "nuc_lbp_9"
    digest = hashlib.sha256("\n".join(FEATURE_NAMES).encode()).hexdigest()
    assert digest == "8dbb3c91b5208ad458948a1740921ac3aa1e10985fd8f41544d613566d7475f5"


def test_describe_features_matches_names():
    rows = describe_features()
    assert [r["name"] for r in rows] == list(FEATURE_NAMES)
    assert {r["group"] for r in rows} == {"color", "morphology", "texture"}
    assert all(r["unit"] and r["meaning"] for r in rows)
    rows[0]["name"] = "changed"  # callers get copies
    assert describe_features()[0]["name"] == FEATURE_NAMES[0]


def test_docs_table_matches_feature_names():
    doc = Path(__file__).resolve().parents[2] / "docs" / "color_morphology.md"
    rows = re.findall(r"^\| (\d+) \| `([^`]+)` \|", doc.read_text(), flags=re.MULTILINE)
    assert [int(i) for i, _ in rows] == list(range(FEATURE_DIM))
    assert tuple(name for _, name in rows) == FEATURE_NAMES
    assert f"version `{FEATURE_VERSION}`" in doc.read_text()


# -- segmentation of drawn cells ---------------------------------------------------------------
@pytest.mark.parametrize("background", sorted(BACKGROUNDS))
def test_segment_cell_finds_the_drawn_nucleus(background: str):
    image, truth_cell, truth_nuc = _drawn_cell(BACKGROUNDS[background])
    seg = segment_cell(image)
    assert isinstance(seg, Segmentation)
    for mask in (seg.cell_mask, seg.nucleus_mask, seg.cytoplasm_mask):
        assert mask.dtype == bool and mask.shape == image.shape[:2]
    assert _iou(seg.cell_mask, truth_cell) > 0.95
    assert _iou(seg.nucleus_mask, truth_nuc) > 0.8
    assert _iou(seg.cytoplasm_mask, truth_cell & ~truth_nuc) > 0.8
    # nucleus and cytoplasm partition the cell
    assert not (seg.nucleus_mask & seg.cytoplasm_mask).any()
    assert np.array_equal(seg.nucleus_mask | seg.cytoplasm_mask, seg.cell_mask)


@pytest.mark.parametrize("background", ["black", "white"])
def test_features_measure_the_drawn_geometry(background: str):
    image, truth_cell, truth_nuc = _drawn_cell(BACKGROUNDS[background])
    v = extract_features(image)
    true_ratio = truth_nuc.sum() / truth_cell.sum()  # (55/90)^2 ~ 0.37
    assert _feature(v, "nuc_cell_area_ratio") == pytest.approx(true_ratio, abs=0.03)
    assert _feature(v, "cell_area") == pytest.approx(truth_cell.sum(), rel=0.03)
    assert _feature(v, "nuc_area") == pytest.approx(truth_nuc.sum(), rel=0.05)
    assert _feature(v, "cell_major_axis") == pytest.approx(2 * CELL_RADIUS, rel=0.05)
    assert _feature(v, "cell_eccentricity") < 0.3  # a disk
    assert _feature(v, "cell_solidity") > 0.95
    assert _feature(v, "nuc_n_components") == 1
    # the nucleus is the darker (lower L*) segment; the cell is purple (hue ~0.78)
    assert _feature(v, "nuc_cyto_delta_L") < -15
    assert _feature(v, "nuc_lab_L_mean") < _feature(v, "cyto_lab_L_mean")
    assert 0.7 < _feature(v, "cell_hsv_h_cmean") < 0.9
    lbp = v[[FEATURE_NAMES.index(f"nuc_lbp_{i}") for i in range(10)]]
    assert lbp.sum() == pytest.approx(1.0, abs=1e-5)


def test_a_uniform_cell_is_all_nucleus():
    image = np.zeros((120, 120, 3), np.uint8)
    image[disk((60, 60), 40, shape=(120, 120))] = LILAC
    seg = segment_cell(image)
    assert seg.cell_mask.sum() == pytest.approx(np.pi * 40**2, rel=0.05)
    assert np.array_equal(seg.nucleus_mask, seg.cell_mask)
    assert not seg.cytoplasm_mask.any()
    v = extract_features(image)
    assert np.isfinite(v).all()
    assert _feature(v, "nuc_cell_area_ratio") == 1.0
    assert _feature(v, "cyto_lab_L_mean") == 0.0  # empty segment -> zeros


# -- determinism and degenerate input -----------------------------------------------------------
def test_extract_features_is_deterministic():
    image, _, _ = _drawn_cell(BACKGROUNDS["black"])
    first = extract_features(image)
    second = extract_features(image.copy())
    assert first.dtype == np.float32 and first.shape == (FEATURE_DIM,)
    assert np.array_equal(first, second)


def _tiny_cell() -> np.ndarray:
    image = np.zeros((20, 20, 3), np.uint8)
    image[disk((10, 10), 6, shape=(20, 20))] = LILAC
    image[disk((10, 10), 3, shape=(20, 20))] = PURPLE
    return image


DEGENERATE = {
    "all_black": lambda: np.zeros((450, 450, 3), np.uint8),
    "uniform_grey": lambda: np.full((450, 450, 3), 128, np.uint8),
    "tiny_20x20_cell": _tiny_cell,
    "tiny_20x20_noise": lambda: np.random.default_rng(1).integers(0, 256, (20, 20, 3), np.uint8),
    "single_pixel": lambda: np.pad(np.full((1, 1, 3), 200, np.uint8), ((9, 10), (9, 10), (0, 0))),
    "one_by_one": lambda: np.full((1, 1, 3), 90, np.uint8),
    "thin_line": lambda: np.pad(np.full((1, 30, 3), 180, np.uint8), ((15, 15), (5, 5), (0, 0))),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_images_give_finite_features(case: str):
    image = DEGENERATE[case]()
    seg = segment_cell(image)
    assert seg.cell_mask.shape == image.shape[:2]
    v = extract_features(image)
    assert v.dtype == np.float32 and v.shape == (FEATURE_DIM,)
    assert np.isfinite(v).all()


@pytest.mark.parametrize("case", ["all_black", "uniform_grey"])
def test_blank_images_have_no_cell_and_zero_features(case: str):
    image = DEGENERATE[case]()
    assert not segment_cell(image).cell_mask.any()
    assert not extract_features(image).any()


@pytest.mark.parametrize(
    "bad",
    [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3))],
)
def test_rejects_anything_but_hxwx3_uint8(bad: np.ndarray):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        extract_features(bad)


# -- real C-NMC cells ---------------------------------------------------------------------------
def _real_cells() -> list[Path]:
    return sorted(CNMC.glob("all/*.bmp"))[:3] + sorted(CNMC.glob("hem/*.bmp"))[:3]


def test_the_real_cell_sample_is_there():
    """The shared C-NMC copy is part of the test set-up: missing, it must fail, not skip."""
    assert len(_real_cells()) == 6, f"no C-NMC cells under {CNMC}"


@pytest.mark.parametrize("path", _real_cells(), ids=lambda p: p.name)
def test_real_cells(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))
    seg = segment_cell(image)
    # C-NMC cells are already segmented: the cell mask is the non-black region
    assert _iou(seg.cell_mask, image.max(axis=2) > 0) > 0.97
    assert seg.nucleus_mask.any() and not (seg.nucleus_mask & ~seg.cell_mask).any()
    v = extract_features(image)
    assert v.dtype == np.float32 and v.shape == (FEATURE_DIM,)
    assert np.isfinite(v).all()
    assert 0.0 < _feature(v, "nuc_cell_area_ratio") <= 1.0
    assert 5_000 < _feature(v, "cell_area") < 450 * 450 / 2


# -- cm-2: blocks, colour normalisation, N:C and chromatin, contour shape ---------------------
def _load(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _names(block: str) -> list[str]:
    return [row["name"] for row in BLOCK_CATALOGUES[block]]


def test_the_version_is_assembled_from_its_blocks():
    image, _, _ = _drawn_cell(BACKGROUNDS["black"])
    blocks = feature_blocks(image, SHIPPED_NORMALISE)
    assert list(blocks) == list(BLOCK_CATALOGUES)
    # cm-1 ships the base block only, without colour normalisation (see the docs for why).
    assert (SHIPPED_BLOCKS, SHIPPED_NORMALISE) == (("base",), False)
    shipped = np.concatenate([blocks[name] for name in SHIPPED_BLOCKS]).astype(np.float32)
    assert np.array_equal(extract_features(image), shipped)
    assert list(FEATURE_NAMES) == [n for name in SHIPPED_BLOCKS for n in _names(name)]


def test_unknown_blocks_are_refused():
    with pytest.raises(ValueError, match="unknown feature blocks"):
        feature_blocks(np.zeros((8, 8, 3), np.uint8), False, ("base", "cnn"))


# cm-1 on one real cell, stored in tests/features/cm1_reference.json. Floats differ in their last
# bits between CPUs (numpy's and scikit-image's SIMD paths, libm): a float32 vector is
# reproducible on one machine, not bit for bit across machines. Measured: the same cell with
# numpy's AVX-512 and AVX2 kernels switched off (NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4
# AVX512_ICL AVX512_SPR") moves 23 of the 165 values, by at most 1.5e-6 of themselves. So the
# stored values are compared at a relative tolerance of 1e-4 (60x that), plus 1e-6 absolute for
# values near 0; a change to what a feature measures moves it by far more.
CM1_REFERENCE = Path(__file__).with_name("cm1_reference.json")
CM1_RTOL, CM1_ATOL = 1e-4, 1e-6


def test_the_base_block_without_normalisation_is_cm1():
    """bench/cm_validate.py's `cm-1` variant (the base block, no colour normalisation) is the
    shipped vector; and cm-1 still measures what it measured when its values were stored."""
    reference = json.loads(CM1_REFERENCE.read_text())
    assert reference["feature_version"] == FEATURE_VERSION
    image = _load(CNMC / reference["cell"])
    base = feature_blocks(image, normalise=False)["base"].astype(np.float32)
    shipped = extract_features(image)
    # Two code paths, one process: the same arithmetic, so the same bits.
    np.testing.assert_array_equal(base, shipped)
    assert list(reference["values"]) == list(FEATURE_NAMES)
    stored = np.array(list(reference["values"].values()), np.float64)
    np.testing.assert_allclose(shipped, stored, rtol=CM1_RTOL, atol=CM1_ATOL)


def _cast(image: np.ndarray, gains=(0.8, 1.25, 0.9)) -> np.ndarray:
    """A global colour cast: per-channel gains on the cell (the black background stays black)."""
    out = np.clip(np.rint(image.astype(np.float64) * np.asarray(gains)), 0, 255)
    return out.astype(np.uint8)


def test_colour_normalisation_removes_a_global_colour_cast():
    """With normalisation the colour features of a real cell hardly move under a strong cast
    (median 0.04 of their cell-to-cell spread when measured); without it they move more than the
    spread. Not exactly zero: the cast is rounded to 8 bits and the mask edge moves a pixel."""
    cells = [_load(p) for p in _real_cells()]
    colour = [row["group"] == "color" for row in BLOCK_CATALOGUES["base"]]
    moved = {}
    for normalise in (True, False):
        plain = np.array([feature_blocks(c, normalise)["base"] for c in cells])[:, colour]
        cast = np.array([feature_blocks(_cast(c), normalise)["base"] for c in cells])[:, colour]
        spread = np.maximum(plain.std(axis=0), 0.05 * np.abs(plain).mean(axis=0))
        moved[normalise] = np.abs(cast - plain) / np.where(spread > 1e-9, spread, 1.0)
    assert np.median(moved[False]) > 1.0  # the cast is strong
    assert np.median(moved[True]) < 0.1
    assert moved[True].mean() < 0.05 * moved[False].mean()


def test_the_normalised_cell_colours_have_the_target_statistics():
    # Exact on the cell's own pixels: any per-channel gain and offset is gone.
    from leukoflow.features.color_morphology import _TARGET_MEAN, _TARGET_STD, _normalise_colors

    rgb = np.random.default_rng(3).normal(60.0, 12.0, (3, 5000)).astype(np.float32)
    shifted = rgb * np.array([[0.7], [1.3], [1.1]], np.float32) + np.float32(9.0)
    a, b = _normalise_colors(rgb), _normalise_colors(shifted)
    np.testing.assert_allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(a.mean(axis=1, keepdims=True), _TARGET_MEAN, atol=0.1)
    np.testing.assert_allclose(a.std(axis=1, keepdims=True), _TARGET_STD, rtol=0.05)


def test_a_subject_reference_removes_the_subjects_cast_and_keeps_its_cells_apart():
    """Per-subject normalisation (round 4): one transform from all of a subject's cells. A cast
    on the whole subject is removed as the per-cell normalisation removes it, while the cells'
    own brightness and colour, which the per-cell one erases, stay different from cell to cell."""
    cells = [_load(p) for p in _real_cells()]
    colour = [row["group"] == "color" for row in BLOCK_CATALOGUES["base"]]
    cell_means = [_names("base").index(f"cell_rgb_{c}_mean") for c in "rgb"]

    def subject_features(images):
        reference = sum((colour_moments(c) for c in images[1:]), colour_moments(images[0]))
        assert reference.n > 0
        return np.array(
            [feature_blocks(c, False, reference=reference.reference())["base"] for c in images]
        )

    plain, cast = subject_features(cells), subject_features([_cast(c) for c in cells])
    raw = np.array([feature_blocks(c, False)["base"] for c in cells])
    spread = np.maximum(raw[:, colour].std(axis=0), 0.05 * np.abs(raw[:, colour]).mean(axis=0))
    moved = np.abs(cast[:, colour] - plain[:, colour]) / np.where(spread > 1e-9, spread, 1.0)
    assert np.median(moved) < 0.1
    # The cells' own mean colours still differ (per-cell normalisation makes them ~equal).
    assert plain[:, cell_means].std(axis=0).min() > 1.0
    per_cell = np.array([feature_blocks(c, True)["base"] for c in cells])
    assert per_cell[:, cell_means].std(axis=0).max() < 0.5  # sampled, clipped at 0/255


def test_one_cells_own_reference_is_the_per_cell_normalisation():
    image = _load(_real_cells()[0])
    own = colour_moments(image).reference()
    np.testing.assert_allclose(
        feature_blocks(image, False, reference=own)["base"],
        feature_blocks(image, True)["base"],
        rtol=1e-3, atol=1e-3,
    )  # fmt: skip


def test_colour_moments_of_an_image_without_a_cell_add_nothing():
    empty = colour_moments(np.zeros((32, 32, 3), np.uint8))
    assert empty.n == 0 and empty.reference() is None
    image = _load(_real_cells()[0])
    one = colour_moments(image)
    both = one + empty
    assert both.n == one.n
    np.testing.assert_array_equal(both.reference()[0], one.reference()[0])
    with pytest.raises(ValueError, match="not both"):
        feature_blocks(image, True, reference=one.reference())


def test_nc_features_measure_the_drawn_geometry():
    image, truth_cell, truth_nuc = _drawn_cell(BACKGROUNDS["black"], noise=2.0)
    nc = dict(zip(_names("nc"), feature_blocks(image, normalise=False)["nc"], strict=True))
    n, c = truth_nuc.sum(), truth_cell.sum()
    assert nc["nuc_cell_diameter_ratio"] == pytest.approx(np.sqrt(n / c), abs=0.02)
    assert nc["nuc_cyto_log_area_ratio"] == pytest.approx(np.log(n / (c - n)), abs=0.08)
    # Mean distance from the cell's circle to the offset nucleus circle, over the cell radius.
    angles = np.linspace(0, 2 * np.pi, 3600, endpoint=False)
    edge = np.stack([np.cos(angles), np.sin(angles)], axis=1) * CELL_RADIUS + CELL_CENTER
    rim = (np.linalg.norm(edge - NUC_CENTER, axis=1) - NUC_RADIUS) / CELL_RADIUS
    assert nc["cyto_rim_mean"] == pytest.approx(rim.mean(), abs=0.03)
    assert nc["cyto_rim_std"] == pytest.approx(rim.std(), abs=0.03)
    assert 0.0 < nc["nuc_od_share"] < 1.0
    assert nc["nuc_light_spots"] == 0  # a flat nucleus has no nucleolus
    assert nc["nuc_light_fraction"] == nc["nuc_dark_fraction"] == 0.0


def test_a_light_spot_in_the_nucleus_counts_as_a_nucleolus():
    image, _, _ = _drawn_cell(BACKGROUNDS["black"], noise=2.0)
    image[disk((140, 165), 6, shape=image.shape[:2])] = (150, 100, 185)  # lighter, still nucleus
    nc = dict(zip(_names("nc"), feature_blocks(image, normalise=False)["nc"], strict=True))
    assert nc["nuc_light_spots"] == 1
    assert nc["nuc_light_fraction"] == pytest.approx(np.pi * 36 / (np.pi * NUC_RADIUS**2), rel=0.3)


def _shape_image(shape: np.ndarray) -> np.ndarray:
    """A uniformly lilac cell of the given shape on black: all nucleus, so both outlines are it."""
    image = np.zeros((*shape.shape, 3), np.uint8)
    image[shape] = LILAC
    return image


def _contour(image: np.ndarray) -> dict[str, float]:
    values = feature_blocks(image, normalise=False)["contour"]
    return dict(zip(_names("contour"), values, strict=True))


def _notched_ellipse(side: int = 300) -> np.ndarray:
    from skimage.draw import ellipse

    shape = np.zeros((side, side), bool)
    shape[ellipse(side // 2, side // 2, 60, 110, shape=shape.shape)] = True
    shape[side // 2 - 10 : side // 2 + 10, side // 2 + 60 :] = False  # a cleft
    return shape


def test_contour_descriptors_of_a_disk_and_of_a_notched_ellipse():
    round_cell = np.zeros((300, 300), bool)
    round_cell[disk((150, 150), 90, shape=round_cell.shape)] = True
    c = _contour(_shape_image(round_cell))
    assert all(c[f"cell_contour_fd_{k}"] < 0.01 for k in range(1, 9))
    assert c["cell_contour_bending_energy"] == pytest.approx(1.0, abs=0.25)
    assert c["cell_contour_concavities"] == 0
    assert c["cell_contour_inscribed_ratio"] > 0.95
    assert c["cell_contour_roughness"] < 0.1
    n = _contour(_shape_image(_notched_ellipse()))
    assert n["cell_contour_fd_2"] > 0.05  # elongated (a disk: below 0.01)
    assert n["cell_contour_concavities"] >= 1
    assert n["cell_contour_max_concavity_depth"] > 0.3  # the cleft is 50 px deep, radius ~81
    assert n["cell_contour_bending_energy"] > 3.0
    assert n["cell_contour_inscribed_ratio"] < 0.6
    assert n["nuc_contour_fd_2"] == pytest.approx(n["cell_contour_fd_2"])  # uniform: all nucleus


def test_fourier_descriptors_ignore_rotation_and_size():
    shape = _notched_ellipse()
    base = _contour(_shape_image(shape))
    turned = _contour(_shape_image(np.rot90(shape)))
    doubled = _contour(_shape_image(np.kron(shape, np.ones((2, 2), bool))))
    for k in range(1, 9):
        name = f"cell_contour_fd_{k}"
        assert turned[name] == pytest.approx(base[name], abs=0.005)
        assert doubled[name] == pytest.approx(base[name], abs=0.01)
    for name in ("cell_contour_concavities", "cell_contour_max_concavity_depth"):
        assert doubled[name] == pytest.approx(base[name], abs=0.05)
