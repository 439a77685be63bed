"""The benchmark's images: N distinct cells in the C-NMC training layout, made from a few sources.

Every copy gets one corner pixel of its own, so each file has its own sha256 (leukoflow keys work
by content: identical bytes would be featurised once) while the cost of decoding and featurising
stays that of the source cell. Sources are real cells (`--source DIR` with all/ and hem/ folders)
or, by default, synthetic 450 px cells from leukoflow.features.synthetic.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from leukoflow.errors import LeukoflowError
from leukoflow.features.synthetic import make_synthetic_dataset

SOURCE_SIDE = 450  # C-NMC crops are 450 x 450
SOURCE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
SUBJECTS_PER_CLASS = 10


def source_cells(source: Path | None, scratch: Path) -> list[tuple[str, np.ndarray]]:
    """(label, RGB uint8 pixels) of the source cells: the files under `source`, or synthetic."""
    if source is None:
        source = make_synthetic_dataset(
            scratch, n_subjects=4, cells_per_subject=4, image_side=SOURCE_SIDE, seed=0
        )
    cells = []
    for path in sorted(Path(source).rglob("*")):
        label = path.parent.name.lower()
        if path.suffix.lower() in SOURCE_SUFFIXES and label in ("all", "hem"):
            with Image.open(path) as image:
                cells.append((label, np.asarray(image.convert("RGB"), dtype=np.uint8)))
    blasts = [cell for cell in cells if cell[0] == "all"]
    normals = [cell for cell in cells if cell[0] == "hem"]
    if not blasts or not normals:
        raise LeukoflowError(f"--source {source} needs images in both all/ and hem/ folders")
    # Alternate the classes, so that any first n copies hold both (training needs two classes).
    alternating = [cell for pair in zip(blasts, normals, strict=False) for cell in pair]
    longer = blasts if len(blasts) > len(normals) else normals
    return alternating + longer[min(len(blasts), len(normals)) :]


def write_cells(folder: Path, cells: list[tuple[str, np.ndarray]], first: int, count: int) -> Path:
    """Write copies number first..first+count-1 as BMPs under folder/fold_0/<label>/; return folder.

    Copy i is source cell i mod len(cells) with a corner pixel encoding i, under a C-NMC name
    (`UID_<subject>_<i>_1_<label>.bmp`) so labels and subjects parse as they do on real data.
    """
    for i in range(first, first + count):
        label, pixels = cells[i % len(cells)]
        stamped = pixels.copy()
        stamped[-1, 0] = (i & 255, (i >> 8) & 255, (i >> 16) & 255)
        subject = 1 + (i // len(cells)) % SUBJECTS_PER_CLASS
        name = f"UID_{'' if label == 'all' else 'H'}{subject}_{i + 1}_1_{label}.bmp"
        target = folder / "fold_0" / label / name
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(stamped, mode="RGB").save(buffer, format="BMP")
        target.write_bytes(buffer.getvalue())
    return folder


def image_files(folder: Path) -> list[Path]:
    """The benchmark images under `folder`, in a stable order."""
    return sorted(p for p in folder.rglob("*.bmp"))
