"""The synthetic C-NMC-like dataset: layout, look, determinism, speed and learnable classes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from leukoflow.errors import LeukoflowError
from leukoflow.features.catalog import build_catalog, catalog_counts, parse_subject_id
from leukoflow.features.synthetic import make_synthetic_dataset


def digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*.bmp"))
    }


def features(path: Path) -> list[float]:
    """Hand-made cell features: area, nucleus share, nucleus texture, nucleus colour."""
    pixels = np.asarray(Image.open(path), dtype=np.float64)
    brightness = pixels.mean(axis=2)
    cell = brightness > 20
    nucleus = cell & (brightness < 150)  # cytoplasm is pale (~190), nucleus dark (~110)
    return [
        cell.mean(),
        nucleus.sum() / max(cell.sum(), 1),
        brightness[nucleus].std(),
        *pixels[nucleus].mean(axis=0),
    ]


def test_layout_and_names(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "syn", n_subjects=5, cells_per_subject=3)
    assert root == tmp_path / "syn"
    names = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    assert len(names) == 15
    assert names[:3] == [
        "fold_0/all/UID_1_1_1_all.bmp",
        "fold_0/all/UID_1_1_2_all.bmp",
        "fold_0/all/UID_1_2_1_all.bmp",
    ]
    subjects = {parse_subject_id(name): name.split("/")[1] for name in names}
    # Odd count: the extra subject is an ALL patient; normal donors keep their "H".
    assert subjects == {"1": "all", "2": "all", "3": "all", "H4": "hem", "H5": "hem"}


def test_images_look_like_cnmc_crops(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path, n_subjects=2, cells_per_subject=4, image_side=96)
    for path in sorted(root.rglob("*.bmp")):
        image = Image.open(path)
        assert (image.format, image.mode, image.size) == ("BMP", "RGB", (96, 96))
        pixels = np.asarray(image, dtype=np.float64)
        for corner in (pixels[0, 0], pixels[0, -1], pixels[-1, 0], pixels[-1, -1]):
            assert tuple(corner) == (0, 0, 0)  # black background
        area, nucleus_share, _, red, green, blue = features(path)
        assert 0.1 < area < 0.6  # one cell, roughly centred, not touching everything
        assert 0.1 < nucleus_share < 0.95
        assert blue > red > green  # a purple nucleus
        cytoplasm = pixels[(pixels.mean(axis=2) > 150)]
        assert cytoplasm[:, 2].mean() > cytoplasm[:, 0].mean()  # pale blue/lilac


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = digests(make_synthetic_dataset(tmp_path / "a", n_subjects=2, cells_per_subject=3))
    again = digests(make_synthetic_dataset(tmp_path / "b", n_subjects=2, cells_per_subject=3))
    other = digests(
        make_synthetic_dataset(tmp_path / "c", n_subjects=2, cells_per_subject=3, seed=1)
    )
    assert first == again
    assert set(other) == set(first)
    assert all(other[name] != first[name] for name in first)


def test_a_hundred_images_are_written(tmp_path: Path) -> None:
    # No wall-clock bound here: timed tests fail on a loaded machine (speed lives in bench/).
    root = make_synthetic_dataset(tmp_path, n_subjects=10, cells_per_subject=10)
    assert len(list(root.rglob("*.bmp"))) == 100


def test_classes_are_learnable_but_not_trivial(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path, n_subjects=12, cells_per_subject=10, image_side=96)
    paths = sorted(root.rglob("*.bmp"))
    x = np.array([features(path) for path in paths])
    y = np.array([path.parent.name == "all" for path in paths])
    groups = [parse_subject_id(path.name) for path in paths]
    # Blasts: larger nucleus share, on average; the two classes still overlap.
    share = x[:, 1]
    assert share[y].mean() > share[~y].mean() + 0.05
    assert share[y].min() < share[~y].max()
    # Patient-wise cross-validation, as on real data: well above chance.
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    accuracy = cross_val_score(model, x, y, groups=groups, cv=GroupKFold(n_splits=4)).mean()
    assert accuracy > 0.7


def test_catalog_of_the_synthetic_dataset(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path, n_subjects=4, cells_per_subject=5)
    rows = build_catalog(str(root), "synthetic")
    counts = catalog_counts(rows)
    assert (counts["found"], counts["ok"]) == (20, 20)
    assert {row.label for row in rows} == {"all", "hem"}
    assert all(row.subject_id is not None for row in rows)
    assert all((row.width, row.height) == (128, 128) for row in rows)


@pytest.mark.parametrize(
    "options",
    [{"n_subjects": 1}, {"cells_per_subject": 0}, {"image_side": 16}],
)
def test_bad_parameters(tmp_path: Path, options: dict) -> None:
    with pytest.raises(LeukoflowError):
        make_synthetic_dataset(tmp_path, **options)
