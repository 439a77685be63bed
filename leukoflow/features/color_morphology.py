"""`color_morphology`: hand-crafted colour, morphology and chromatin-texture features of one cell.

A weight-free backbone next to the CNNs. Input is one single-cell crop (C-NMC 2019 style: the
segmented white cell on a black background, though any plain background works), output a fixed,
versioned float32 vector whose every entry has a name and a meaning (see `describe_features` and
docs/color_morphology.md).

Pipeline, all at full resolution:
1. cell mask: distance of every pixel from the background colour (estimated on the image border),
   thresholded (Otsu, pulled towards the background), largest connected component, holes filled;
2. nucleus / cytoplasm: K-means (k=2, deterministic start) on the L*a*b* values of the cell's
   pixels; the cluster with the lower L* (darker, more stained by Giemsa/Wright) is the nucleus;
3. features: colour statistics per segment (L*a*b*, HSV, RGB), morphology of cell and nucleus,
   GLCM and uniform-LBP texture of the nucleus.

Also here, for development (bench/cm_validate.py), and not in the shipped vector: a colour
normalisation per image or per subject, and two more blocks (nucleus-to-cytoplasm and chromatin;
contour shape).
They were compared with cm-1 on the development pool and did not beat it by the margin fixed in
advance (docs/color_morphology.md), so FEATURE_VERSION stays cm-1 and its vector is unchanged.

Every output is finite: empty segments and degenerate images give zeros, never NaN or inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.cluster.vq import ClusterError, kmeans2, vq
from scipy.spatial import ConvexHull, QhullError, cKDTree
from skimage import color, filters, measure, morphology
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

# Bump whenever FEATURE_NAMES or the meaning of a feature changes: stored vectors carry it.
FEATURE_VERSION = "cm-1"

# -- the feature list ---------------------------------------------------------------------------
SEGMENTS = ("cell", "nuc", "cyto")
# colour space -> (channel names, unit/meaning of the values)
_SPACES: dict[str, tuple[tuple[str, str, str], str]] = {
    "lab": (("L", "a", "b"), "CIE L*a*b* (D65): L* 0-100, a*/b* about -128..127"),
    "hsv": (("h", "s", "v"), "HSV, each channel 0-1 (hue as a fraction of the colour circle)"),
    "rgb": (("r", "g", "b"), "RGB, 0-255"),
}
_LINEAR_STATS = ("mean", "std", "p10", "p50", "p90")
# Hue is an angle: a linear mean of 0.95 and 0.05 would be 0.5 (green), so use circular stats.
_HUE_STATS = ("cmean", "cstd")
_STAT_MEANING = {
    "mean": "mean",
    "std": "standard deviation",
    "p10": "10th percentile",
    "p50": "median",
    "p90": "90th percentile",
    "cmean": "circular mean",
    "cstd": "circular standard deviation",
}
_SEGMENT_MEANING = {"cell": "whole cell", "nuc": "nucleus", "cyto": "cytoplasm"}

MORPH_OBJECTS = ("cell", "nuc")
_MORPH_PROPS: dict[str, tuple[str, str]] = {
    "area": ("px", "area in pixels"),
    "perimeter": ("px", "perimeter (skimage regionprops estimate)"),
    "circularity": ("ratio", "4*pi*area/perimeter^2; about 0.9 for a digitised disk"),
    "solidity": ("ratio", "area / area of the convex hull of the outline, at most 1"),
    "eccentricity": ("ratio", "eccentricity of the moment ellipse; 0 for a disk"),
    "major_axis": ("px", "major axis length of the moment ellipse"),
    "minor_axis": ("px", "minor axis length of the moment ellipse"),
    "radial_cv": ("ratio", "std / mean of outline-point distances to the centroid"),
    "hull_perimeter_deficit": (
        "ratio",
        "1 - convex-hull perimeter / outline length (sub-pixel outline of the filled shape), "
        "clipped to 0..1; near 0 when convex",
    ),
}
_SHAPE_EXTRA: dict[str, tuple[str, str]] = {
    "nuc_cell_area_ratio": ("ratio", "nucleus area / cell area (N:C area ratio)"),
    "nuc_n_components": ("count", "connected components of the nucleus mask (lobes)"),
    "nuc_centroid_offset": ("ratio", "nucleus-to-cell centroid distance / cell equivalent radius"),
}
_CONTRAST: dict[str, tuple[str, str]] = {
    f"nuc_cyto_delta_{ch}": ("L*a*b*", f"mean {ch}* of nucleus minus mean {ch}* of cytoplasm")
    for ch in ("L", "a", "b")
}
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")
GLCM_DISTANCES = (1, 2, 4)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_LEVELS = 32
LBP_P, LBP_R = 8, 1.0
# method="uniform" with P=8 gives codes 0..8 (uniform patterns, by number of set bits) and 9.
_LBP_BINS = LBP_P + 2
# cm-2: nucleus-to-cytoplasm and chromatin features of the nucleus (group, unit, meaning).
_NC_CHROMATIN: dict[str, tuple[str, str, str]] = {
    "nuc_cyto_log_area_ratio": (
        "morphology",
        "log ratio",
        "log((nucleus area + 1) / (cytoplasm area + 1)): N:C ratio, unbounded",
    ),
    "nuc_cell_diameter_ratio": (
        "morphology",
        "ratio",
        "sqrt(nucleus area / cell area): equivalent-diameter N:C ratio",
    ),
    "cyto_rim_mean": (
        "morphology",
        "ratio",
        "mean distance from the cell outline to the nucleus / cell equivalent radius "
        "(cytoplasm rim width)",
    ),
    "cyto_rim_std": (
        "morphology",
        "ratio",
        "std of the distance from the cell outline to the nucleus / cell equivalent radius "
        "(rim evenness)",
    ),
    "nuc_od_mean": (
        "texture",
        "OD",
        "mean optical density of the nucleus, -log10((v+1)/256) summed over R, G, B",
    ),
    "nuc_od_std": ("texture", "OD", "std of the optical density over the nucleus"),
    "nuc_od_share": (
        "texture",
        "fraction",
        "nucleus share of the cell's integrated optical density",
    ),
    "nuc_L_skewness": ("texture", "moment", "skewness of L* over the nucleus"),
    "nuc_L_kurtosis": ("texture", "moment", "excess kurtosis of L* over the nucleus"),
    "nuc_L_entropy": (
        "texture",
        "bits",
        "Shannon entropy of the 32-bin histogram of contrast-stretched nucleus L*",
    ),
    "nuc_dark_fraction": (
        "texture",
        "fraction",
        "share of nucleus pixels over 10 L* units darker than the nucleus median "
        "(dense chromatin clumps)",
    ),
    "nuc_light_fraction": (
        "texture",
        "fraction",
        "share of nucleus pixels over 10 L* units lighter than the nucleus median "
        "(open chromatin, nucleoli)",
    ),
    "nuc_light_spots": (
        "texture",
        "count",
        "light spots (over 10 L* units above the median, at least 10 px) inside the "
        "nucleus: nucleolus-like",
    ),
    "nuc_granularity_fine": (
        "texture",
        "L*",
        "std of L* minus its 1-px Gaussian blur inside the nucleus (fine chromatin grain)",
    ),
    "nuc_granularity_coarse": (
        "texture",
        "L*",
        "std of the 2-px minus 6-px Gaussian band of L* inside the nucleus "
        "(coarse chromatin pattern)",
    ),
}
_CHROMATIN_BINS = 32
_CHROMATIN_STEP = 10.0  # L* units: a clearly visible step in lightness
_MIN_SPOT = 10  # px: smaller light specks are noise
# cm-2: shape of the outline of the nucleus and the cell (unit, meaning).
_FD_HARMONICS = 8
_FD_POINTS = 128
_SMOOTH_PX = 3.0
_BENDING_HARMONICS = 16
_CONCAVITY_DEPTH = 0.1  # of the equivalent radius: a visible notch or cleft
_CONTOUR_PROPS: dict[str, tuple[str, str]] = {
    **{
        f"fd_{k}": (
            "ratio",
            f"Fourier descriptor {k}: magnitude of harmonic {k} of the centroid-distance "
            "signature (128 points at equal arc length) / its mean; invariant to size, "
            "rotation and starting point",
        )
        for k in range(1, _FD_HARMONICS + 1)
    },
    "roughness": (
        "ratio",
        "outline length / length of the outline smoothed over 3 px, minus 1; 0 for a smooth edge",
    ),
    "bending_energy": (
        "ratio",
        "mean squared curvature of the outline (first 16 harmonics) x (length / 2 pi)^2; "
        "1 for a circle",
    ),
    "concavities": (
        "count",
        "convex-hull edges under which the outline dips more than 0.1 equivalent radius "
        "(notches, clefts)",
    ),
    "max_concavity_depth": (
        "ratio",
        "deepest dip of the outline below its convex hull / equivalent radius",
    ),
    "inscribed_ratio": (
        "ratio",
        "radius of the largest inscribed circle / largest centroid-outline distance; 1 for a disk",
    ),
}
CONTOUR_OBJECTS = ("nuc", "cell")
# Colour columns per pixel, in vector order: L*, a*, b*, h, s, v, r, g, b.
_HUE_COLUMN = 3
_COLOR_PER_SEGMENT = 8 * len(_LINEAR_STATS) + len(_HUE_STATS)


def _color_names() -> list[tuple[str, str, str]]:
    out = []
    for seg in SEGMENTS:
        for space, (channels, unit) in _SPACES.items():
            for ch in channels:
                stats = _HUE_STATS if (space, ch) == ("hsv", "h") else _LINEAR_STATS
                for st in stats:
                    meaning = f"{_STAT_MEANING[st]} of {ch} over the {_SEGMENT_MEANING[seg]}"
                    out.append((f"{seg}_{space}_{ch}_{st}", unit, meaning))
    return out


def _build_base_catalogue() -> list[dict[str, str]]:
    rows = [{"name": n, "group": "color", "unit": u, "meaning": m} for n, u, m in _color_names()]
    rows += [
        {"name": n, "group": "color", "unit": u, "meaning": m} for n, (u, m) in _CONTRAST.items()
    ]
    for obj in MORPH_OBJECTS:
        for prop, (unit, meaning) in _MORPH_PROPS.items():
            rows.append(
                {
                    "name": f"{obj}_{prop}",
                    "group": "morphology",
                    "unit": unit,
                    "meaning": f"{_SEGMENT_MEANING[obj]}: {meaning}",
                }
            )
    rows += [
        {"name": n, "group": "morphology", "unit": u, "meaning": m}
        for n, (u, m) in _SHAPE_EXTRA.items()
    ]
    for prop in GLCM_PROPS:
        rows.append(
            {
                "name": f"nuc_glcm_{prop}",
                "group": "texture",
                "unit": "GLCM",
                "meaning": f"nucleus GLCM {prop} ({GLCM_LEVELS} grey levels of contrast-stretched "
                f"L*, distances {GLCM_DISTANCES}, 4 angles, averaged)",
            }
        )
    for code in range(_LBP_BINS):
        label = "non-uniform patterns" if code == _LBP_BINS - 1 else f"uniform code {code}"
        rows.append(
            {
                "name": f"nuc_lbp_{code}",
                "group": "texture",
                "unit": "fraction",
                "meaning": f"share of nucleus interior pixels with LBP (P=8, R=1) {label}",
            }
        )
    return rows


def _build_nc_catalogue() -> list[dict[str, str]]:
    return [
        {"name": n, "group": g, "unit": u, "meaning": m} for n, (g, u, m) in _NC_CHROMATIN.items()
    ]


def _build_contour_catalogue() -> list[dict[str, str]]:
    return [
        {
            "name": f"{obj}_contour_{prop}",
            "group": "contour",
            "unit": unit,
            "meaning": f"{_SEGMENT_MEANING[obj]} outline (largest component, filled): {meaning}",
        }
        for obj in CONTOUR_OBJECTS
        for prop, (unit, meaning) in _CONTOUR_PROPS.items()
    ]


# Feature blocks, in vector order; bench/cm_validate.py compares versions built from them.
BLOCK_CATALOGUES: dict[str, list[dict[str, str]]] = {
    "base": _build_base_catalogue(),  # the 165 features of cm-1
    "nc": _build_nc_catalogue(),
    "contour": _build_contour_catalogue(),
}
# What this FEATURE_VERSION ships: its blocks and whether colours are normalised first. The
# other blocks and the normalisation were compared on the development pool and did not beat
# cm-1 by the pre-declared margin (docs/color_morphology.md): they stay for bench/cm_validate.py.
SHIPPED_BLOCKS: tuple[str, ...] = ("base",)
SHIPPED_NORMALISE = False
_CATALOGUE = [row for block in SHIPPED_BLOCKS for row in BLOCK_CATALOGUES[block]]
FEATURE_NAMES: tuple[str, ...] = tuple(row["name"] for row in _CATALOGUE)
FEATURE_DIM = len(FEATURE_NAMES)


def describe_features() -> list[dict[str, str]]:
    """One dict per feature in vector order: name, group, unit and meaning."""
    return [dict(row) for row in _CATALOGUE]


# -- segmentation -------------------------------------------------------------------------------
# Below this RGB distance from the background nothing counts as a cell (uniform / blank images).
_MIN_CONTRAST = 12.0
# K-means is fit on at most this many cell pixels (fixed seed) and then assigns every pixel:
# fitting on all ~30k pixels of a C-NMC cell costs several times more for the same centres.
_KMEANS_SAMPLE = 4000
_KMEANS_ITER = 30
_SAMPLE_SEED = 0
# Nucleus clean-up, as fractions of the cell area: holes filled, specks removed.
_NUCLEUS_HOLE = 0.05
_NUCLEUS_SPECK = 0.005
# A cell whose L*a*b* values vary less than this (std, per channel) has no second compartment.
_MIN_COLOR_SPREAD = 1.0
# Colour statistics of a segment are estimated on a fixed-seed sample of at most this many of
# its pixels (all of them in smaller segments): the standard error of a mean is then ~1.4 % of
# the channel's std, while HSV conversion and percentiles of every pixel of every segment would
# cost ~20 ms of the 50 ms budget.
_COLOR_SAMPLE = 5_000
# Colour normalisation target (R, G, B) for the cell's pixels: the medians, over the 103 sample
# C-NMC cells, of each cell's own channel mean and std. Any fixed value would do for a
# standardised linear model; typical values keep clipping at 0/255 as rare as it is in the data.
_TARGET_MEAN = np.array([[67.0], [28.0], [78.0]], np.float32)
_TARGET_STD = np.array([[11.0], [9.0], [10.0]], np.float32)


@dataclass
class Segmentation:
    """Boolean HxW masks; nucleus and cytoplasm partition the cell (both empty if no cell)."""

    cell_mask: np.ndarray
    nucleus_mask: np.ndarray
    cytoplasm_mask: np.ndarray


def _check_pixels(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8 RGB, got shape {pixels.shape} {pixels.dtype}")
    return pixels


@dataclass
class _CellCrop:
    """The cell's padded bounding box and what segmentation already computed there; the features
    reuse it (colour conversion is the costliest step) and work on the crop, not the full image."""

    box: tuple[slice, slice]
    cell: np.ndarray  # bool, box-sized
    nucleus: np.ndarray  # bool, box-sized, subset of cell
    # Colours of the cell pixels (in cell-mask order) channel-first, 3 x N float32: reductions
    # over a trailing axis of length 3 are several times slower in numpy and skimage.
    rgb: np.ndarray  # 0-255
    lab: np.ndarray  # L*a*b*


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """The largest 8-connected component and its bounding box, or None if the mask is empty."""
    labels = measure.label(mask, connectivity=2)
    if labels.max() == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = int(np.argmax(sizes))
    box = ndi.find_objects(labels, max_label=keep)[keep - 1]
    return labels == keep, box


def _cell_mask(pixels: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """Full-size cell mask (largest foreground component, holes filled) and its padded box."""
    rgb = pixels.astype(np.float32).transpose(2, 0, 1)  # 3 x H x W, see _CellCrop
    border = np.concatenate([rgb[:, 0], rgb[:, -1], rgb[:, :, 0], rgb[:, :, -1]], axis=1)
    # The median of the border is the background colour as long as the cell covers less than
    # half of the border (black for C-NMC, white/grey for unsegmented smears).
    background = np.median(border, axis=1)
    diff = rgb - background[:, None, None]
    dist = np.sqrt(np.einsum("cij,cij->ij", diff, diff))
    if float(dist.max()) < _MIN_CONTRAST:
        return None
    border_dist = np.sqrt(((border - background[:, None]) ** 2).sum(axis=0))
    noise_floor = float(np.percentile(border_dist, 99)) + 2.0
    # Otsu on a histogram of whole distance units: same threshold, no float histogram pass.
    counts = np.bincount(np.rint(dist).astype(np.intp).ravel())
    otsu = float(filters.threshold_otsu(hist=(counts, np.arange(counts.size))))
    # The background is one narrow mode near 0 while the cell spreads from pale cytoplasm to dark
    # nucleus, so Otsu can land inside the cell; halve it (never below the border's noise).
    threshold = max(0.5 * otsu, noise_floor, _MIN_CONTRAST / 2)
    found = _largest_component(dist > threshold)
    if found is None:
        return None
    mask, (rows, cols) = found
    # 2 px of margin so that outlines and LBP neighbourhoods are not cut by the crop.
    box = (
        slice(max(rows.start - 2, 0), min(rows.stop + 2, mask.shape[0])),
        slice(max(cols.start - 2, 0), min(cols.stop + 2, mask.shape[1])),
    )
    mask[box] = ndi.binary_fill_holes(mask[box])  # on the crop: same result, ~7x less work
    return mask, box


def _sample_indices(n: int, limit: int) -> np.ndarray:
    """Sorted indices of a fixed-seed sample of `limit` out of n (all of them if n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(_SAMPLE_SEED).choice(n, limit, replace=False))


def _shift_scale(rgb: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Cell pixels (3 x N, 0-255) with per-channel `mean`/`std` (3 x 1) moved to the target."""
    scale = np.where(std > 1e-3, _TARGET_STD / np.maximum(std, 1e-3), 1.0)
    return np.clip((rgb - mean) * scale + _TARGET_MEAN, 0.0, 255.0).astype(np.float32)


def _normalise_colors(rgb: np.ndarray) -> np.ndarray:
    """Per-image colour normalisation of the cell's pixels (3 x N, 0-255): each RGB channel is
    shifted and scaled to a fixed target mean and std (Reinhard-style, in RGB).

    Any global per-channel gain and offset (a colour cast, lamp brightness, stain strength of a
    batch) is removed by construction, so the features do not carry it: stain batches differ
    between patients, and a model should not learn a patient's batch instead of the cell.
    """
    return _shift_scale(rgb, rgb.mean(axis=1, keepdims=True), rgb.std(axis=1, keepdims=True))


@dataclass(frozen=True)
class ColourMoments:
    """Pixel count and per-channel RGB sums of one or more cells' masks, for a per-subject
    colour normalisation (development only): add the cells of a subject, then `.reference()`."""

    n: int
    total: np.ndarray  # (3,) float64: sum of R, G, B over the cell pixels
    squares: np.ndarray  # (3,) float64: sum of their squares

    def __add__(self, other: ColourMoments) -> ColourMoments:
        return ColourMoments(
            self.n + other.n, self.total + other.total, self.squares + other.squares
        )

    def reference(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The pooled (mean, std) per channel, or None when no cell pixel was seen."""
        if self.n == 0:
            return None
        mean = self.total / self.n
        std = np.sqrt(np.maximum(self.squares / self.n - mean**2, 0.0))
        return mean, std


def colour_moments(pixels: np.ndarray) -> ColourMoments:
    """The moments of one crop's cell pixels (the same cell mask the features use); an image
    with no cell adds nothing."""
    found = _cell_mask(_check_pixels(pixels))
    if found is None:
        return ColourMoments(0, np.zeros(3), np.zeros(3))
    mask, _ = found
    rgb = pixels[mask].astype(np.float64)  # N x 3
    return ColourMoments(int(rgb.shape[0]), rgb.sum(axis=0), (rgb**2).sum(axis=0))


def _split_nucleus(lab: np.ndarray) -> np.ndarray:
    """Boolean per cell pixel: True for the nucleus cluster. `lab` is N x 3 L*a*b*."""
    lab = np.ascontiguousarray(lab, dtype=np.float64)
    if lab.shape[0] < 2 or float(lab.std(axis=0).max()) < _MIN_COLOR_SPREAD:
        # One colour, one compartment: call it all nucleus (an ALL blast is mostly nucleus).
        return np.ones(lab.shape[0], dtype=bool)
    sample = lab[_sample_indices(lab.shape[0], _KMEANS_SAMPLE)]
    # Deterministic start, no random restarts needed: the mean colours of the darkest and the
    # lightest quarter of the pixels by L*.
    lo, hi = np.percentile(sample[:, 0], [25, 75])
    init = np.stack([sample[sample[:, 0] <= lo].mean(0), sample[sample[:, 0] >= hi].mean(0)])
    if np.allclose(init[0], init[1]):
        return np.ones(lab.shape[0], dtype=bool)
    # scipy's Lloyd k-means, single-threaded: bit-identical results on any machine (sklearn's
    # KMeans sums cluster centres across OpenMP threads in scheduling order).
    try:
        centres, _ = kmeans2(sample, init, iter=_KMEANS_ITER, minit="matrix", missing="raise")
    except ClusterError:  # a cluster emptied: no second compartment
        return np.ones(lab.shape[0], dtype=bool)
    labels, _ = vq(lab, centres)  # every cell pixel to its nearest centre
    return labels == int(np.argmin(centres[:, 0]))  # lower L* = more stained = nucleus


def _segment(
    pixels: np.ndarray, normalise: bool, reference: tuple[np.ndarray, np.ndarray] | None
) -> _CellCrop | None:
    found = _cell_mask(pixels)
    if found is None:
        return None
    mask, box = found
    cell = mask[box]
    rgb = pixels[box][cell].T.astype(np.float32)  # 3 x N
    if reference is not None:
        mean, std = (np.asarray(v, np.float32).reshape(3, 1) for v in reference)
        rgb = _shift_scale(rgb, mean, std)
    elif normalise:
        rgb = _normalise_colors(rgb)
    # float32 in 0-1: skimage keeps float32 (uint8 input is converted to float64, slower).
    lab = color.rgb2lab(rgb / 255.0, channel_axis=0)
    nucleus = np.zeros_like(cell)
    nucleus[cell] = _split_nucleus(lab.T)
    # Light chromatin spots inside the nucleus fall in the light cluster, yet cytoplasm cannot
    # be enclosed by the nucleus: give back holes up to _NUCLEUS_HOLE of the cell. Not every
    # hole: when the darker cluster is a ring along the cell edge (a basophilic rim), filling
    # would swallow the cytoplasm. Then drop specks (stain noise) up to _NUCLEUS_SPECK.
    area = int(cell.sum())
    nucleus = morphology.remove_small_holes(nucleus, max_size=max(1, int(area * _NUCLEUS_HOLE)))
    nucleus = morphology.remove_small_objects(nucleus, max_size=int(area * _NUCLEUS_SPECK))
    nucleus &= cell
    return _CellCrop(box=box, cell=cell, nucleus=nucleus, rgb=rgb, lab=lab)


def segment_cell(pixels: np.ndarray) -> Segmentation:
    """Cell mask from the background, then nucleus/cytoplasm by K-means on L*a*b* (k=2).

    Masks are HxW like `pixels`; all empty when no cell stands out from the background."""
    pixels = _check_pixels(pixels)
    shape = pixels.shape[:2]
    cell, nucleus = np.zeros(shape, bool), np.zeros(shape, bool)
    crop = _segment(pixels, SHIPPED_NORMALISE, None)
    if crop is not None:
        cell[crop.box], nucleus[crop.box] = crop.cell, crop.nucleus
    return Segmentation(cell_mask=cell, nucleus_mask=nucleus, cytoplasm_mask=cell & ~nucleus)


# -- features -----------------------------------------------------------------------------------
def _hue_stats(hue: np.ndarray) -> list[float]:
    angles = 2 * np.pi * hue.astype(np.float64)
    c, s = np.cos(angles).mean(), np.sin(angles).mean()
    r = float(np.clip(np.hypot(c, s), 1e-12, 1.0))
    cmean = (np.arctan2(s, c) / (2 * np.pi)) % 1.0
    cstd = np.sqrt(-2.0 * np.log(r)) / (2 * np.pi)
    return [float(cmean), float(cstd)]


def _segment_colors(crop: _CellCrop, members: np.ndarray) -> np.ndarray:
    """9 x k colour values (L*a*b*, HSV, RGB) of a sample of the given cell pixels (indices)."""
    chosen = members[_sample_indices(members.size, _COLOR_SAMPLE)]
    rgb = crop.rgb[:, chosen]
    hsv = color.rgb2hsv(rgb / 255.0, channel_axis=0)
    return np.concatenate([crop.lab[:, chosen], hsv, rgb], axis=0)


def _color_stats(values: np.ndarray | None) -> list[float]:
    """The colour features of one segment from its 9 x k values; zeros for an empty segment."""
    if values is None:
        return [0.0] * _COLOR_PER_SEGMENT
    rows = values.astype(np.float64)
    mean, std = rows.mean(axis=1), rows.std(axis=1)
    pct = np.percentile(rows, [10, 50, 90], axis=1)
    out: list[float] = []
    for i in range(rows.shape[0]):
        if i == _HUE_COLUMN:
            out += _hue_stats(rows[i])
        else:
            out += [mean[i], std[i], pct[0, i], pct[1, i], pct[2, i]]
    return [float(v) for v in out]


@dataclass
class _Outline:
    """Sub-pixel outlines (closed polygons, box coordinates) of a filled mask, and the mask."""

    contours: list[np.ndarray]
    filled: np.ndarray  # bool, the region's own bounding box (holes filled when asked)


def _morphology(mask: np.ndarray, has_holes: bool = True) -> tuple[list[float], _Outline | None]:
    """The _MORPH_PROPS of the union of the True pixels (zeros if empty), and its outline."""
    if not mask.any():
        return [0.0] * len(_MORPH_PROPS), None
    region = measure.regionprops(mask.astype(np.uint8))[0]
    area, perimeter = float(region.area), float(region.perimeter)
    circularity = 4 * np.pi * area / perimeter**2 if perimeter > 0 else 0.0
    # Outline(s) of the filled shape as sub-pixel polygons: their hull gives solidity and the
    # hull-perimeter deficit without rasterising the hull (convex_hull_image costs ~7 ms).
    filled = np.pad(region.image_filled if has_holes else region.image, 1).astype(np.float32)
    contours = [c - 1 for c in measure.find_contours(filled, 0.5)]
    points = np.concatenate(contours)
    outline = sum(float(np.linalg.norm(np.diff(c, axis=0), axis=1).sum()) for c in contours)
    try:
        hull = ConvexHull(points)
        hull_area, hull_perimeter = float(hull.volume), float(hull.area)  # 2-D: area, perimeter
    except QhullError:  # degenerate (collinear) outline
        hull_area, hull_perimeter = area, outline
    solidity = min(area / hull_area, 1.0) if hull_area > 0 else 0.0
    deficit = float(np.clip(1 - hull_perimeter / outline, 0, 1)) if outline > 0 else 0.0
    radii = np.linalg.norm(points - np.asarray(region.centroid_local), axis=1)
    radial_cv = float(radii.std() / radii.mean()) if radii.mean() > 0 else 0.0
    values = [
        area,
        perimeter,
        circularity,
        solidity,
        float(region.eccentricity),
        float(region.axis_major_length),
        float(region.axis_minor_length),
        radial_cv,
        deficit,
    ]
    offset = np.asarray(region.bbox[:2], np.float64)
    return values, _Outline([c + offset for c in contours], filled[1:-1, 1:-1] > 0)


def _shape_extra(cell: np.ndarray, nucleus: np.ndarray) -> list[float]:
    cell_area, nuc_area = int(cell.sum()), int(nucleus.sum())
    if cell_area == 0 or nuc_area == 0:
        return [0.0, 0.0, 0.0]
    n_components = int(measure.label(nucleus, connectivity=2).max())
    offset = np.linalg.norm(np.argwhere(nucleus).mean(0) - np.argwhere(cell).mean(0))
    radius = np.sqrt(cell_area / np.pi)
    return [nuc_area / cell_area, float(n_components), float(offset / radius)]


def _stretch(values: np.ndarray) -> np.ndarray:
    """Robust 0..1 stretch (1st-99th percentile): texture should not depend on stain intensity,
    which the colour features already carry."""
    lo, hi = np.percentile(values, [1, 99])
    if hi - lo < 1e-6:
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _texture(nuc_lightness: np.ndarray, nucleus: np.ndarray) -> list[float]:
    """GLCM + uniform-LBP features of the nucleus; nuc_lightness: L* of the nucleus pixels."""
    if nucleus.sum() < 16:  # too few pixel pairs for a co-occurrence matrix
        return [0.0] * (len(GLCM_PROPS) + _LBP_BINS)
    level = _stretch(nuc_lightness.astype(np.float64))
    # Level 0 marks "not nucleus"; its row and column are dropped from the GLCM below, so only
    # nucleus-nucleus pixel pairs count.
    quantized = np.zeros(nucleus.shape, dtype=np.uint8)
    quantized[nucleus] = 1 + np.minimum((level * GLCM_LEVELS).astype(np.uint8), GLCM_LEVELS - 1)
    glcm = graycomatrix(
        quantized, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS + 1, symmetric=True
    )[1:, 1:]
    # (distance, angle) pairs with no nucleus-nucleus pixel pair (thin nuclei) would divide by 0.
    valid = glcm.sum(axis=(0, 1)) > 0
    glcm_feats = []
    for prop in GLCM_PROPS:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = graycoprops(glcm, prop)[valid]
        glcm_feats.append(float(np.nan_to_num(values.mean())) if values.size else 0.0)

    grey = np.zeros(nucleus.shape, dtype=np.uint8)
    grey[nucleus] = np.round(level * 255).astype(np.uint8)
    lbp = local_binary_pattern(grey, LBP_P, LBP_R, method="uniform")
    # Only pixels whose 8 neighbours are all nucleus: at the edge LBP would describe the outline.
    interior = ndi.binary_erosion(nucleus, structure=np.ones((3, 3), bool))
    if not interior.any():
        return glcm_feats + [0.0] * _LBP_BINS
    hist = np.bincount(lbp[interior].astype(np.intp), minlength=_LBP_BINS)[:_LBP_BINS]
    return glcm_feats + (hist / hist.sum()).tolist()


# -- cm-2 blocks: nucleus-to-cytoplasm and chromatin; contour shape ----------------------------
def _nc_chromatin(
    crop: _CellCrop,
    in_nucleus: np.ndarray,
    cell_outline: _Outline | None,
    nuc_outline: _Outline | None,
) -> list[float]:
    """The _NC_CHROMATIN features (zeros when the nucleus is empty or tiny)."""
    cell, nucleus = crop.cell, crop.nucleus
    cell_area, nuc_area = int(cell.sum()), int(nucleus.sum())
    if nuc_area < 16:
        return [0.0] * len(_NC_CHROMATIN)
    radius = np.sqrt(cell_area / np.pi)
    cyto_area = cell_area - nuc_area
    # Cytoplasm rim: distance from each point of the cell's outline to the nucleus outline.
    rim = np.zeros(0)
    if cell_outline is not None and nuc_outline is not None:
        tree = cKDTree(np.concatenate(nuc_outline.contours))
        rim = tree.query(np.concatenate(cell_outline.contours))[0] / radius
    # Optical density (Beer-Lambert, summed over R, G, B): how much stain a pixel holds.
    od = -np.log10((crop.rgb.astype(np.float64) + 1.0) / 256.0).sum(axis=0)
    nuc_od = od[in_nucleus]
    lightness = crop.lab[0, in_nucleus].astype(np.float64)
    mean, std = lightness.mean(), lightness.std()
    z = (lightness - mean) / std if std > 1e-6 else np.zeros_like(lightness)
    hist = np.histogram(_stretch(lightness), bins=_CHROMATIN_BINS, range=(0.0, 1.0))[0]
    p = hist[hist > 0] / lightness.size
    median = float(np.median(lightness))
    # Light spots in the chromatin (nucleoli, open chromatin) and dark clumps, in L* units.
    image = np.full(nucleus.shape, mean)
    image[nucleus] = lightness
    light = nucleus & (image > median + _CHROMATIN_STEP)
    spots = measure.label(light, connectivity=2)
    n_spots = int((np.bincount(spots.ravel())[1:] >= _MIN_SPOT).sum())
    # Granularity: fine (1 px) and coarse (2-6 px) band-pass energy of L* inside the nucleus,
    # away from its edge; the surroundings are set to the nucleus mean so the edge does not ring.
    inner = ndi.binary_erosion(nucleus, structure=np.ones((5, 5), bool))
    fine = coarse = 0.0
    if inner.any():
        smooth1, smooth2 = ndi.gaussian_filter(image, 1.0), ndi.gaussian_filter(image, 2.0)
        fine = float((image - smooth1)[inner].std())
        coarse = float((smooth2 - ndi.gaussian_filter(image, 6.0))[inner].std())
    return [
        float(np.log((nuc_area + 1) / (cyto_area + 1))),
        float(np.sqrt(nuc_area / cell_area)),
        float(rim.mean()) if rim.size else 0.0,
        float(rim.std()) if rim.size else 0.0,
        float(nuc_od.mean()),
        float(nuc_od.std()),
        float(nuc_od.sum() / od.sum()) if od.sum() > 0 else 0.0,
        float((z**3).mean()),
        float((z**4).mean() - 3.0),
        float(-(p * np.log2(p)).sum()),
        float((lightness < median - _CHROMATIN_STEP).mean()),
        float((lightness > median + _CHROMATIN_STEP).mean()),
        float(n_spots),
        fine,
        coarse,
    ]


def _contour_shape(outline: _Outline | None) -> list[float]:
    """The _CONTOUR_PROPS of the longest outline (zeros without a usable one)."""
    if outline is None or outline.filled.sum() < 16:
        return [0.0] * len(_CONTOUR_PROPS)
    points = max(outline.contours, key=len)
    if np.allclose(points[0], points[-1]):
        points = points[:-1]
    if len(points) < 8:
        return [0.0] * len(_CONTOUR_PROPS)
    closed = np.vstack([points, points[:1]])
    # Area and centroid of the polygon itself (shoelace), so a lobe is described on its own.
    cross = closed[:-1, 0] * closed[1:, 1] - closed[1:, 0] * closed[:-1, 1]
    area = 0.5 * float(cross.sum())
    if abs(area) < 8:
        return [0.0] * len(_CONTOUR_PROPS)
    centroid = ((closed[:-1] + closed[1:]) * cross[:, None]).sum(axis=0) / (6 * area)
    radius = np.sqrt(abs(area) / np.pi)
    steps = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    length = float(arc[-1])
    # The outline at _FD_POINTS equal arc-length steps: Fourier descriptors of its centroid
    # distances (magnitudes over the mean: invariant to size, rotation and starting point) and
    # its curvature (steps of a few px, so pixel staircase noise does not dominate).
    t = np.linspace(0.0, length, _FD_POINTS, endpoint=False)
    even = np.stack([np.interp(t, arc, closed[:, 0]), np.interp(t, arc, closed[:, 1])], axis=1)
    spectrum = np.abs(np.fft.rfft(np.hypot(*(even - centroid).T)))
    descriptors = spectrum[1 : _FD_HARMONICS + 1] / max(float(spectrum[0]), 1e-12)
    # Curvature from the outline's first _BENDING_HARMONICS harmonics (exact derivatives of a
    # smooth curve): finite differences of a digitised outline measure its pixel staircase.
    z = np.fft.fft(even[:, 0] + 1j * even[:, 1])
    k = np.fft.fftfreq(_FD_POINTS, 1.0 / _FD_POINTS)
    z[np.abs(k) > _BENDING_HARMONICS] = 0
    d1, d2 = np.fft.ifft(1j * k * z), np.fft.ifft(-(k**2) * z)
    speed = np.maximum(np.abs(d1), 1e-12)
    curvature = (np.conj(d1) * d2).imag / speed**3
    bending = float((curvature**2).mean() * (length / (2 * np.pi)) ** 2)
    # Roughness: the ~1 px outline against itself smoothed over _SMOOTH_PX.
    smooth = ndi.gaussian_filter1d(points, _SMOOTH_PX, axis=0, mode="wrap")
    smooth_length = float(np.linalg.norm(smooth - np.roll(smooth, 1, axis=0), axis=1).sum())
    roughness = length / smooth_length - 1.0 if smooth_length > 0 else 0.0
    # Concavities: how deep the outline dips below each edge of its convex hull.
    try:
        vertices = np.sort(ConvexHull(points).vertices)
    except QhullError:
        vertices = np.array([], np.intp)
    depths = [0.0]
    for start, stop in zip(vertices, np.roll(vertices, -1), strict=True):
        if stop > start:
            between = points[start : stop + 1]
        else:
            between = np.vstack([points[start:], points[: stop + 1]])
        chord = points[stop] - points[start]
        norm = float(np.hypot(*chord))
        if norm > 0 and len(between) > 2:
            rel = between - points[start]
            depths.append(float(np.abs(rel[:, 0] * chord[1] - rel[:, 1] * chord[0]).max() / norm))
    relative_depths = np.asarray(depths) / radius
    # Largest inscribed circle from the distance transform at half resolution (4x cheaper;
    # the radius is off by at most ~1 px).
    half = np.pad(outline.filled[::2, ::2], 1)
    inscribed = 2.0 * float(ndi.distance_transform_edt(half).max())
    circumscribed = float(np.hypot(*(points - centroid).T).max())
    return [float(v) for v in descriptors] + [
        float(roughness),
        bending,
        float((relative_depths > _CONCAVITY_DEPTH).sum()),
        float(relative_depths.max()),
        min(inscribed / circumscribed, 1.0) if circumscribed > 0 else 0.0,
    ]


def feature_blocks(
    pixels: np.ndarray,
    normalise: bool,
    blocks: tuple[str, ...] = tuple(BLOCK_CATALOGUES),
    reference: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The named blocks of BLOCK_CATALOGUES (float64, finite) of one crop, with or without colour
    normalisation: what extract_features assembles, and what bench/cm_validate.py compares.

    `reference`: a subject's pooled RGB (mean, std) (`ColourMoments.reference()` of all its
    cells): the cell is normalised with it instead of its own (per-subject normalisation)."""
    unknown = set(blocks) - set(BLOCK_CATALOGUES)
    if unknown:
        raise ValueError(f"unknown feature blocks {sorted(unknown)}")
    if normalise and reference is not None:
        raise ValueError("normalise per image or per subject (reference), not both")
    crop = _segment(_check_pixels(pixels), normalise, reference)
    if crop is None:
        return {name: np.zeros(len(BLOCK_CATALOGUES[name])) for name in blocks}
    cell, nucleus = crop.cell, crop.nucleus
    in_nucleus = nucleus[cell]  # per cell pixel, same order as crop.rgb / crop.lab
    members = {
        "cell": np.arange(in_nucleus.size),
        "nuc": np.flatnonzero(in_nucleus),
        "cyto": np.flatnonzero(~in_nucleus),
    }
    colors = {k: _segment_colors(crop, m) if m.size else None for k, m in members.items()}
    feats = [v for seg in SEGMENTS for v in _color_stats(colors[seg])]
    if colors["nuc"] is not None and colors["cyto"] is not None:
        delta = colors["nuc"][:3].mean(axis=1) - colors["cyto"][:3].mean(axis=1)
        feats += delta.astype(float).tolist()
    else:
        feats += [0.0] * len(_CONTRAST)
    # The cell mask is hole-free by construction; the nucleus may have holes (light chromatin).
    cell_morph, cell_outline = _morphology(cell, has_holes=False)
    nuc_morph, nuc_outline = _morphology(nucleus)
    feats += cell_morph + nuc_morph
    feats += _shape_extra(cell, nucleus)
    feats += _texture(crop.lab[0, in_nucleus], nucleus)
    builders = {
        "base": lambda: feats,
        "nc": lambda: _nc_chromatin(crop, in_nucleus, cell_outline, nuc_outline),
        "contour": lambda: _contour_shape(nuc_outline) + _contour_shape(cell_outline),
    }
    out = {}
    for name in blocks:
        values = builders[name]()
        vector = np.asarray(values, dtype=np.float64)
        if vector.shape != (len(BLOCK_CATALOGUES[name]),):  # a programming error
            raise AssertionError(f"block {name}: built {vector.shape[0]} features")
        # Last line of defence: never hand NaN/inf to the concatenated feature table.
        out[name] = np.nan_to_num(vector, nan=0.0, posinf=0.0, neginf=0.0)
    return out


def extract_features(pixels: np.ndarray) -> np.ndarray:
    """The FEATURE_NAMES vector (float32, finite, deterministic) of one HxWx3 uint8 RGB crop."""
    blocks = feature_blocks(pixels, SHIPPED_NORMALISE, SHIPPED_BLOCKS)
    return np.concatenate([blocks[name] for name in SHIPPED_BLOCKS]).astype(np.float32)
