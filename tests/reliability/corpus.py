"""A generated corpus of bad input mixed with good synthetic cells, and what the catalog must say.

Each builder writes files and returns {uri: Expected}. `reason` is the reason code of a
quarantined or duplicate row, or the start of the recorded conversion of a decodable image that
needed one ("L->RGB", "exif-transposed"); None for a plain RGB image.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from leukoflow.features.synthetic import make_synthetic_dataset

# Distinctive enough to search logs and artifacts for: a real manifest would carry MRNs here.
SUBJECT_IDS = ("MRN-4471-DOE", "MRN-5820-ROE")


@dataclass(frozen=True)
class Expected:
    status: str  # ok | quarantined | duplicate
    reason: str | None


OK = Expected("ok", None)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise_cell(seed: int, side: int = 32, fmt: str = "BMP") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels, mode="RGB"), fmt)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 100-byte PNG whose header declares 10^10 pixels (30 GB decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a 48x24 file is a 24x48 cell
    return encode(Image.new("RGB", (48, 24), (120, 60, 150)), "JPEG", exif=exif)


def _bad_and_odd_files() -> dict[str, tuple[bytes, Expected]]:
    """Relative path -> (bytes, expected): one of each kind of trouble."""
    truncated = {fmt: noise_cell(40, side=64, fmt=fmt) for fmt in ("BMP", "PNG", "JPEG")}
    sixteen = Image.fromarray(np.full((24, 24), 40_000, dtype=np.uint16))
    palette = Image.new("RGB", (24, 24), (200, 100, 50)).convert("P", palette=Image.ADAPTIVE)
    return {
        "fold_0/all/empty.bmp": (b"", Expected("quarantined", "empty_file")),
        "fold_0/all/truncated.bmp": (
            truncated["BMP"][: len(truncated["BMP"]) // 2],
            Expected("quarantined", "truncated"),
        ),
        "fold_0/all/truncated.png": (
            truncated["PNG"][: len(truncated["PNG"]) // 2],
            Expected("quarantined", "truncated"),
        ),
        "fold_0/hem/truncated.jpg": (
            truncated["JPEG"][: len(truncated["JPEG"]) // 2],
            Expected("quarantined", "truncated"),
        ),
        "fold_0/hem/notes.bmp": (
            b"slide 4 smudged, rescan\n",
            Expected("quarantined", "not_an_image"),
        ),
        "fold_0/hem/report.png": (
            b"%PDF-1.4\n1 0 obj\n%%EOF\n",
            Expected("quarantined", "not_an_image"),
        ),
        "fold_0/all/png_named.jpg": (noise_cell(41, fmt="PNG"), OK),  # wrong extension
        "fold_0/all/gray.png": (
            encode(Image.new("L", (24, 24), 90), "PNG"),
            Expected("ok", "L->RGB"),
        ),
        "fold_0/hem/rgba.png": (
            encode(Image.new("RGBA", (24, 24), (10, 20, 30, 128)), "PNG"),
            Expected("ok", "RGBA->RGB"),
        ),
        "fold_0/hem/palette.png": (encode(palette, "PNG"), Expected("ok", "P->RGB")),
        "fold_0/all/sixteen.tif": (encode(sixteen, "TIFF"), Expected("ok", "I;16->RGB")),
        "fold_0/hem/cmyk.jpg": (
            encode(Image.new("CMYK", (24, 24), (0, 90, 90, 0)), "JPEG"),
            Expected("ok", "CMYK->RGB"),
        ),
        "fold_0/all/rotated.jpg": (exif_rotated_jpeg(), Expected("ok", "exif-transposed")),
        "fold_0/all/bomb.png": (png_bomb(), Expected("quarantined", "too_large")),
        "fold_0/hem/tiny.bmp": (
            encode(Image.new("RGB", (8, 8)), "BMP"),
            Expected("quarantined", "too_small"),
        ),
        "fold_0/all/cell with spaces.bmp": (noise_cell(42), OK),
        "fold_0/hem/ünïcødé 細胞.png": (noise_cell(43, fmt="PNG"), OK),
        # If anything ever handed a name to a shell, the $(...) would create `pwned`.
        "fold_0/all/we$ird;name&(1)'`|*$(touch pwned).bmp": (noise_cell(44), OK),
        # The same bytes under two labels: a conflict; under one label: a plain duplicate.
        "fold_0/all/twin.bmp": (noise_cell(45), OK),
        "fold_0/hem/twin_other_label.bmp": (
            noise_cell(45),
            Expected("duplicate", "label_conflict"),
        ),
        "fold_0/hem/copy_1.bmp": (noise_cell(46), OK),
        "fold_0/hem/copy_2.bmp": (noise_cell(46), Expected("duplicate", "duplicate_of")),
        "inbox/unlabelled.bmp": (noise_cell(47), OK),
    }


def make_messy_folder(root: Path) -> dict[str, Expected]:
    """Good synthetic cells (C-NMC layout, 32 px) plus every kind of bad file, as a folder."""
    make_synthetic_dataset(root, n_subjects=6, cells_per_subject=4, image_side=32)
    expected = {str(path): OK for path in sorted(root.rglob("*.bmp"))}
    for relative, (data, outcome) in _bad_and_odd_files().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[str(path)] = outcome
    unreadable = Expected("quarantined", "unreadable")
    # Permissions: real only for a process without CAP_DAC_OVERRIDE (see no_dac_override()).
    locked = root / "fold_0" / "all" / "locked.bmp"
    locked.write_bytes(noise_cell(48))
    locked.chmod(0)
    expected[str(locked)] = unreadable
    hidden = root / "inbox" / "closed_folder"
    (hidden / "inside.bmp").parent.mkdir(parents=True)
    (hidden / "inside.bmp").write_bytes(noise_cell(49))
    hidden.chmod(0)
    expected[str(hidden)] = unreadable  # the folder itself is recorded: it may hold images
    os.symlink(root / "nowhere.bmp", root / "inbox" / "dangling.bmp")
    os.symlink(root / "inbox" / "loop_b.bmp", root / "inbox" / "loop_a.bmp")
    os.symlink(root / "inbox" / "loop_a.bmp", root / "inbox" / "loop_b.bmp")
    for name in ("dangling.bmp", "loop_a.bmp", "loop_b.bmp"):
        expected[str(root / "inbox" / name)] = unreadable
    os.symlink(root, root / "inbox" / "back_to_root")  # a folder loop: walked once
    (root / "README.txt").write_text("not an image: no row\n")
    return expected


def make_messy_manifest(root: Path, outside: Path) -> tuple[Path, dict[str, Expected]]:
    """A CSV manifest inside a make_messy_folder root: its good cells, with subject ids, a broken
    and a missing file, and rows pointing outside the root (refused, never read)."""
    cells = sorted((root / "fold_0").rglob("UID_*.bmp"))
    lines = ["path,label,subject_id"]
    expected: dict[str, Expected] = {}
    for index, path in enumerate(cells):
        label = "all" if path.name.endswith("_all.bmp") else "hem"
        subject = f"{SUBJECT_IDS[index % 2]}-{label}"
        lines.append(f"{path.relative_to(root)},{label},{subject}")
        expected[str(path)] = OK
    lines.append(f"fold_0/all/truncated.png,all,{SUBJECT_IDS[0]}-all")
    expected[str(root / "fold_0/all/truncated.png")] = Expected("quarantined", "truncated")
    lines.append(f"fold_0/hem/missing.bmp,hem,{SUBJECT_IDS[1]}-hem")
    expected[str(root / "fold_0/hem/missing.bmp")] = Expected("quarantined", "unreadable")
    outside.write_bytes(noise_cell(51))
    escapes = [
        os.path.relpath(outside, root),  # ../
        str(outside),  # absolute
        "fold_0/../../" + os.path.relpath(outside, root.parent),  # escapes once normalised
        "file://" + str(outside),
    ]
    for raw in escapes:
        lines.append(f"{raw},all,{SUBJECT_IDS[0]}-all")
        expected[raw] = Expected("quarantined", "outside_root")
    manifest = root / "MANIFEST.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, expected
