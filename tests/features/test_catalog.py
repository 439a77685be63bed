"""Discovering images: every file gives exactly one row, bad files are quarantined, not dropped."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from datapaths import CNMC, CNMC_POOL
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from leukoflow.errors import LeukoflowError
from leukoflow.features import catalog
from leukoflow.features.catalog import (
    DEFAULT_LABELS,
    IMAGE_SUFFIXES,
    build_catalog,
    catalog_counts,
    parse_subject_id,
)
from leukoflow.features.synthetic import make_synthetic_dataset
from leukoflow.store.storage import Location, open_location
from leukoflow.store.tables import (
    CATALOG_SCHEMA,
    CatalogRow,
    read_catalog,
    read_catalog_rows,
    write_catalog,
)
from leukoflow.vocabulary import ImageStatus, Label

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def cell(seed: int, side: int = 32, fmt: str = "BMP") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels, mode="RGB"), fmt)


def put(root: Path, relative: str, data: bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def code(row: CatalogRow) -> str | None:
    return None if row.reason is None else catalog.reason_code(row.reason)


def assert_accounted(rows: list[CatalogRow]) -> None:
    counts = catalog_counts(rows)
    assert counts["found"] == len(rows)
    assert counts["found"] == counts["ok"] + counts["quarantined"] + counts["duplicate"]
    assert all(isinstance(row, CatalogRow) for row in rows)
    assert [row.uri for row in rows] == sorted(row.uri for row in rows)
    assert len({row.discovered_at for row in rows}) == 1
    pa.Table.from_pylist([r.to_dict() for r in rows], schema=CATALOG_SCHEMA)  # values fit


# -- names -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "subject"),
    [
        ("UID_11_1_1_all.bmp", "11"),
        ("UID_H5_2_1_hem.bmp", "H5"),
        ("fold_0/all/UID_3_12_4_all.bmp", "3"),
        ("UID_7_1_1_all.BMP", "7"),
        ("UID_H5_2_1_all.bmp", None),  # an H subject is a normal donor, never "all"
        ("UID_5_2_1_hem.bmp", None),
        ("UID_5_2_all.bmp", None),
        ("UID_5_2_1_all.txt", None),
        ("1.bmp", None),
        ("cell 12.png", None),
    ],
)
def test_parse_subject_id(name: str, subject: str | None) -> None:
    assert parse_subject_id(name) == subject


# -- the real C-NMC cells --------------------------------------------------------------------
def cnmc_manifest() -> list[dict]:
    with open(CNMC / "MANIFEST.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_cnmc_folder_and_manifest_give_the_same_catalog() -> None:
    expected = {str(CNMC / row["path"]): row for row in cnmc_manifest()}
    assert len(expected) == 103
    from_folder = build_catalog(str(CNMC), "cnmc")
    from_manifest = build_catalog(str(CNMC / "MANIFEST.csv"), "cnmc")
    for rows in (from_folder, from_manifest):
        assert_accounted(rows)
        assert catalog_counts(rows)["ok"] == 103
        assert {row.uri for row in rows} == set(expected)
        for row in rows:
            truth = expected[row.uri]
            assert row.image_id == truth["sha256"]
            assert row.label == truth["label"]
            assert row.subject_id == truth["subject_id"]
            assert (row.width, row.height) == (450, 450)
            assert row.size_bytes == (CNMC / truth["path"]).stat().st_size
            assert (row.status, row.reason, row.dataset) == ("ok", None, "cnmc")
    assert sum(row.label == "all" for row in from_folder) == 56
    strip = [replace(row, discovered_at=None) for row in from_folder]
    assert strip == [replace(row, discovered_at=None) for row in from_manifest]


def test_catalog_rows_round_trip_through_the_store(tmp_path: Path) -> None:
    rows = build_catalog(str(CNMC), "cnmc")
    store = open_location(str(tmp_path / "store"))
    write_catalog(store, "cnmc", rows)
    table = read_catalog(store, "cnmc")
    assert table.num_rows == 103
    assert table.column("uri").to_pylist() == [row.uri for row in rows]
    # Read back typed: the same rows, with the vocabulary's enums for status and label.
    again = read_catalog_rows(store, "cnmc")
    assert again == list(rows)
    assert {type(row.status) for row in again} == {ImageStatus}
    assert {type(row.label) for row in again} == {Label}


# -- a messy inbox ---------------------------------------------------------------------------
@pytest.fixture
def messy(tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str | None, str | None]]]:
    """A folder with one of every kind of trouble; expected (status, reason code, label)."""
    root = tmp_path / "inbox"
    root.mkdir()
    expected: dict[str, tuple[str, str | None, str | None]] = {}

    def add(relative: str, data: bytes, status: str, reason: str | None, label: str | None):
        put(root, relative, data)
        expected[relative] = (status, reason, label)

    add("all/good.bmp", cell(1), "ok", None, "all")
    add("all/UID_7_1_1_all.bmp", cell(2), "ok", None, "all")
    add("all/sub/deeper/nested.png", cell(3, fmt="PNG"), "ok", None, "all")
    add("all/gray.png", encode(Image.new("L", (20, 20), 90), "PNG"), "ok", "L->RGB", "all")
    add("all/same.bmp", cell(4), "ok", None, "all")
    add("hem/same_again.bmp", cell(4), "duplicate", "label_conflict", "hem")
    add("hem/UID_H3_2_1_hem.bmp", cell(5), "ok", None, "hem")
    add("hem/copy_1.bmp", cell(6), "ok", None, "hem")
    add("hem/copy_2.bmp", cell(6), "duplicate", "duplicate_of", "hem")
    rgba = Image.new("RGBA", (20, 20), (10, 20, 30, 128))
    add("hem/rgba.png", encode(rgba, "PNG"), "ok", "RGBA->RGB (alpha over black)", "hem")
    add(
        "other/cmyk.jpg",
        encode(Image.new("CMYK", (20, 20), (0, 9, 9, 0)), "JPEG"),
        "ok",
        "CMYK->RGB",
        None,
    )
    sixteen = Image.fromarray(np.full((20, 20), 40_000, dtype=np.uint16))
    add("other/sixteen.tif", encode(sixteen, "TIFF"), "ok", "I;16->RGB (scaled 16-bit)", None)
    exif = Image.Exif()
    exif[0x0112] = 6
    add(
        "other/rotated.JPEG",
        encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif),
        "ok",
        "exif-transposed",
        None,
    )
    add("inbox image.BMP", cell(7), "ok", None, None)
    add("ünïcødé 細胞.png", cell(8, fmt="PNG"), "ok", None, None)
    add("we$ird;name&(1)'`|*.bmp", cell(9), "ok", None, None)
    add("png_named.bmp", cell(10, fmt="PNG"), "ok", None, None)
    add("empty.bmp", b"", "quarantined", "empty_file", None)
    add("empty_too.png", b"", "quarantined", "empty_file", None)
    for fmt, suffix in (("BMP", "bmp"), ("PNG", "png"), ("JPEG", "jpg")):
        data = cell(11, side=64, fmt=fmt)
        add(f"truncated.{suffix}", data[: len(data) // 2], "quarantined", "truncated", None)
    add("notes.bmp", b"slide 4 was smudged, rescan\n", "quarantined", "not_an_image", None)
    add("report.png", b"%PDF-1.4\n%%EOF\n", "quarantined", "not_an_image", None)
    bomb = Image.new("1", (7_000, 7_000))
    add("bomb.png", encode(bomb, "PNG"), "quarantined", "too_large", None)
    add("tiny.bmp", encode(Image.new("RGB", (8, 8)), "BMP"), "quarantined", "too_small", None)
    # Unreadable, for real even as root: a FIFO (a read would block forever, so it is refused
    # as not a regular file), a link to nothing, and two links pointing at each other (ELOOP).
    os.mkfifo(root / "fifo.bmp")
    expected["fifo.bmp"] = ("quarantined", "unreadable", None)
    os.symlink(root / "gone.bmp", root / "dangling.bmp")
    expected["dangling.bmp"] = ("quarantined", "unreadable", None)
    os.symlink(root / "loop_b.tif", root / "loop_a.tif")
    os.symlink(root / "loop_a.tif", root / "loop_b.tif")
    expected["loop_a.tif"] = expected["loop_b.tif"] = ("quarantined", "unreadable", None)
    # Folder loops: walking must end, and files inside are seen once.
    add("looped/inside.png", cell(12, fmt="PNG"), "ok", None, None)
    os.symlink(root, root / "looped" / "back_to_root")
    os.symlink(root / "looped", root / "looped" / "self")
    # Not images: no rows, but listed as ignored (test_messy_inbox_counts).
    put(root, "MANIFEST.txt", b"path,label\n")
    put(root, "SOURCE.md", b"# where these came from\n")
    put(root, "all/Thumbs.db", b"\0" * 10)
    return root, expected


MESSY_IGNORED = ("MANIFEST.txt", "SOURCE.md", "all/Thumbs.db")


def test_messy_inbox_every_file_has_exactly_one_row(messy) -> None:
    root, expected = messy
    rows = build_catalog(str(root), "inbox")
    assert_accounted(rows)
    uris = [row.uri for row in rows]
    assert len(uris) == len(set(uris)) == len(expected)
    assert set(uris) == {str(root / name) for name in expected}
    for row in rows:
        name = os.path.relpath(row.uri, root)
        status, reason, label = expected[name]
        assert (row.status, row.label) == (status, label), name
        if reason is not None and ("->" in reason or reason == "exif-transposed"):
            assert row.reason == reason, name  # conversions are recorded verbatim
        else:
            assert code(row) == reason, (name, row.reason)
        assert row.dataset == "inbox"


def test_messy_inbox_row_details(messy) -> None:
    root, _ = messy
    rows = {os.path.relpath(row.uri, root): row for row in build_catalog(str(root), "inbox")}
    good = rows["all/good.bmp"]
    assert good.image_id == hashlib.sha256((root / "all/good.bmp").read_bytes()).hexdigest()
    assert (good.width, good.height, good.size_bytes) == (32, 32, len(cell(1)))
    assert rows["all/UID_7_1_1_all.bmp"].subject_id == "7"
    assert rows["hem/UID_H3_2_1_hem.bmp"].subject_id == "H3"
    assert rows["other/rotated.JPEG"].width == 20 and rows["other/rotated.JPEG"].height == 40

    first = rows["all/same.bmp"]
    conflict = rows["hem/same_again.bmp"]
    assert conflict.image_id == first.image_id
    assert conflict.reason == f"label_conflict:duplicate_of:{first.image_id} (all vs hem)"
    assert (conflict.width, conflict.height) == (32, 32)
    assert rows["hem/copy_2.bmp"].reason == f"duplicate_of:{rows['hem/copy_1.bmp'].image_id}"

    for name in ("empty.bmp", "notes.bmp", "tiny.bmp", "bomb.png", "truncated.jpg"):
        row = rows[name]
        assert row.width is None and row.height is None
        assert SHA256.match(row.image_id)  # read, so identified by content
        assert ": " in row.reason  # code, then the detail
    assert rows["fifo.bmp"].reason == "unreadable: not a regular file (fifo)"
    assert "No such file" in rows["dangling.bmp"].reason
    assert "symbolic links" in rows["loop_a.tif"].reason
    for name in ("fifo.bmp", "dangling.bmp", "loop_a.tif"):
        assert rows[name].image_id.startswith("path:") and rows[name].size_bytes is None


def test_messy_inbox_counts(messy) -> None:
    root, expected = messy
    counts = catalog_counts(build_catalog(str(root), "inbox"))
    assert counts["found"] == len(expected)
    assert counts["duplicate"] == 2
    assert counts["converted"] == 5
    assert counts["reasons"] == {
        "duplicate_of": 1,
        "empty_file": 2,
        "label_conflict": 1,
        "not_an_image": 2,
        "too_large": 1,
        "too_small": 1,
        "truncated": 3,
        "unreadable": 4,
    }
    assert counts["ignored"] == 3
    assert counts["ignored_files"] == sorted(str(root / name) for name in MESSY_IGNORED)


def test_permission_denied_is_unreadable(tmp_path: Path, monkeypatch) -> None:
    # Tests run as root, where chmod 000 does not stop a read; make the filesystem itself answer
    # EACCES for one file, as it would for any other user.
    put(tmp_path, "all/a.bmp", cell(1))
    locked = put(tmp_path, "all/locked.bmp", cell(2))
    real = LocalFileSystem.cat_file

    def cat_file(self, path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", cat_file)
    rows = build_catalog(str(tmp_path), "x")
    assert [(row.status, row.reason) for row in rows] == [
        ("ok", None),
        ("quarantined", "unreadable: Permission denied"),
    ]


def test_copies_prefer_the_labelled_one(tmp_path: Path) -> None:
    # The inbox copy sorts first ("a..." < "hem/"), but the labelled training copy is kept.
    put(tmp_path, "aaa_inbox.bmp", cell(1))
    put(tmp_path, "hem/x.bmp", cell(1))
    rows = build_catalog(str(tmp_path), "x")
    assert [(row.label, row.status) for row in rows] == [(None, "duplicate"), ("hem", "ok")]
    assert code(rows[0]) == "duplicate_of"  # unlabelled vs labelled is no conflict


# -- layouts and labels ----------------------------------------------------------------------
def test_cnmc_training_layout(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path / "syn", n_subjects=4, cells_per_subject=2, image_side=32
    )
    put(root, "fold_1/hem/UID_H9_1_1_hem.bmp", cell(1))
    rows = build_catalog(str(root), "syn")
    assert_accounted(rows)
    assert len(rows) == 9 and all(row.status == "ok" for row in rows)
    labels = {os.path.relpath(row.uri, root): (row.label, row.subject_id) for row in rows}
    assert labels["fold_0/all/UID_1_1_1_all.bmp"] == ("all", "1")
    assert labels["fold_0/hem/UID_H4_1_2_hem.bmp"] == ("hem", "H4")
    assert labels["fold_1/hem/UID_H9_1_1_hem.bmp"] == ("hem", "H9")


def test_user_label_mapping_replaces_the_default(tmp_path: Path) -> None:
    put(tmp_path, "Blast/a.bmp", cell(1))
    put(tmp_path, "normal/b.bmp", cell(2))
    put(tmp_path, "all/c.bmp", cell(3))
    rows = build_catalog(str(tmp_path), "x", labels={"blast": "all", "normal": "hem"})
    assert [row.label for row in rows] == ["all", None, "hem"]
    assert DEFAULT_LABELS == {"all": "all", "hem": "hem"}


def test_label_mapping_must_use_the_vocabulary(tmp_path: Path) -> None:
    put(tmp_path, "a.bmp", cell(1))
    with pytest.raises(LeukoflowError, match="'all' or 'hem'"):
        build_catalog(str(tmp_path), "x", labels={"blast": "leukemia"})


def test_suffixes_are_case_insensitive(tmp_path: Path) -> None:
    for index, suffix in enumerate(IMAGE_SUFFIXES):
        put(tmp_path, f"x{index}{suffix.upper()}", cell(index, fmt="PNG"))
    put(tmp_path, "x.TXT", b"a note, not an image")
    rows = build_catalog(str(tmp_path), "x")
    assert len(rows) == len(IMAGE_SUFFIXES)
    assert all(row.status == "ok" for row in rows)
    assert catalog_counts(rows)["ignored_files"] == [str(tmp_path / "x.TXT")]


# -- every file counted: any format Pillow decodes, probed by content; the rest ignored -------
def frames(fmt: str, n: int, side: int = 24) -> bytes:
    images = [Image.new("RGB", (side, side), (40 * i, 90, 200 - 40 * i)) for i in range(n)]
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt, save_all=True, append_images=images[1:])
    return buffer.getvalue()


def test_every_file_is_catalogued_or_ignored_never_dropped(tmp_path: Path) -> None:
    put(tmp_path, "all/a.bmp", cell(1))
    put(tmp_path, "all/b.webp", cell(2, fmt="WEBP"))
    put(tmp_path, "all/c.gif", cell(3, fmt="GIF"))
    put(tmp_path, "hem/animated.gif", frames("GIF", 3))
    put(tmp_path, "hem/stack.tif", frames("TIFF", 2))
    put(tmp_path, "hem/animated.webp", frames("WEBP", 4))
    put(tmp_path, "hem/portable.ppm", cell(4, fmt="PPM"))
    put(tmp_path, "inbox/cell.dat", cell(5, fmt="PNG"))  # an image by content, whatever its name
    put(tmp_path, "inbox/no_suffix", cell(6, fmt="JPEG"))
    put(tmp_path, "inbox/scan.jpg.part", cell(7, fmt="BMP"))
    not_images = {
        "README.txt": b"cells from ward 4\n",
        ".DS_Store": b"\x00\x00\x00\x01Bud1" + b"\x00" * 40,
        "MANIFEST.csv": b"path,label\nall/a.bmp,all\n",
        "all/notes.pdf": b"%PDF-1.4\n%%EOF\n",
        "hem/empty.dat": b"",
        "inbox/archive.zip": b"PK\x03\x04" + b"\x00" * 30,
    }
    for name, data in not_images.items():
        put(tmp_path, name, data)
    rows = build_catalog(str(tmp_path), "x")
    assert_accounted(rows)
    by_name = {os.path.relpath(row.uri, tmp_path): row for row in rows}
    assert sorted(by_name) == sorted([
        "all/a.bmp", "all/b.webp", "all/c.gif", "hem/animated.gif", "hem/stack.tif",
        "hem/animated.webp", "hem/portable.ppm", "inbox/cell.dat", "inbox/no_suffix",
        "inbox/scan.jpg.part",
    ])  # fmt: skip
    assert all(row.status == "ok" for row in rows), [r.reason for r in rows]
    # Multi-frame files: the first frame, said in the row.
    assert by_name["hem/animated.gif"].reason.startswith("first_frame_of_3")
    assert by_name["hem/stack.tif"].reason == "first_frame_of_2"
    assert by_name["hem/animated.webp"].reason.startswith("first_frame_of_4")
    assert by_name["all/b.webp"].reason is None and by_name["all/b.webp"].label == "all"
    assert by_name["inbox/cell.dat"].image_id == hashlib.sha256(cell(5, fmt="PNG")).hexdigest()
    counts = catalog_counts(rows)
    assert counts["found"] == 10 and counts["ok"] == 10
    assert counts["ignored"] == len(not_images)
    assert counts["ignored_files"] == sorted(str(tmp_path / name) for name in not_images)
    # A catalog read back from the store has no ignored files to report, and says 0.
    assert catalog_counts(list(rows))["ignored"] == 0


def test_an_unreadable_file_of_unknown_kind_is_quarantined_not_ignored(tmp_path: Path) -> None:
    put(tmp_path, "a.bmp", cell(1))
    os.mkfifo(tmp_path / "pipe")  # cannot be probed without blocking: it may be an image
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    rows = build_catalog(str(tmp_path), "x")
    by_name = {os.path.relpath(row.uri, tmp_path): row for row in rows}
    assert by_name["pipe"].reason == "unreadable: not a regular file (fifo)"
    assert code(by_name["dangling"]) == "unreadable"
    assert catalog_counts(rows)["ignored"] == 0


def test_a_folder_of_only_non_images_says_how_many_were_ignored(tmp_path: Path) -> None:
    put(tmp_path, "README.txt", b"nothing yet")
    with pytest.raises(LeukoflowError, match="no images found under .*1 other file"):
        build_catalog(str(tmp_path), "x")
    rows = build_catalog(str(tmp_path), "x", allow_empty=True)
    assert rows == [] and catalog_counts(rows)["ignored_files"] == [str(tmp_path / "README.txt")]


# -- nothing outside the images root is read --------------------------------------------------
@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every path the catalog reads whole or probes (fsspec reads and the header probe)."""
    seen: list[str] = []
    real_cat = LocalFileSystem.cat_file
    real_header = catalog._read_header

    def cat_file(self, path, *args, **kwargs):
        seen.append(os.path.realpath(str(path)))
        return real_cat(self, path, *args, **kwargs)

    def read_header(loc):
        seen.append(os.path.realpath(loc.path))
        return real_header(loc)

    monkeypatch.setattr(LocalFileSystem, "cat_file", cat_file)
    monkeypatch.setattr(catalog, "_read_header", read_header)
    return seen


def test_folder_walks_do_not_follow_links_out_of_the_root(tmp_path: Path, reads) -> None:
    outside = tmp_path / "elsewhere"
    put(outside, "secret.bmp", cell(1))
    put(outside, "deeper/more.bmp", cell(2))
    put(outside, "notes.txt", b"not an image")
    root = tmp_path / "inbox"
    put(root, "all/own.bmp", cell(3))
    put(root, "shared/in_root.bmp", cell(4))
    os.symlink(outside / "secret.bmp", root / "all" / "file_link.bmp")  # a file link out
    os.symlink(outside, root / "folder_link")  # a folder link out
    os.symlink(outside / "notes.txt", root / "notes_link")  # out, whatever it holds
    os.symlink(outside / "nowhere.bmp", root / "dangling_out.bmp")  # out, and dangling
    os.symlink(root / "shared", root / "hem")  # in-root folder link: followed
    os.symlink(root / "all" / "own.bmp", root / "own_link.bmp")  # in-root file link: read
    rows = build_catalog(str(root), "x")
    assert_accounted(rows)
    by_name = {os.path.relpath(row.uri, root): row for row in rows}
    escaping = ("all/file_link.bmp", "folder_link", "notes_link", "dangling_out.bmp")
    for name in escaping:
        row = by_name[name]
        assert (row.status, code(row)) == ("quarantined", "outside_root"), name
        assert row.image_id.startswith("path:") and row.size_bytes is None
        assert str(outside) not in row.reason  # reasons reach reports: no paths in them
    assert not [path for path in reads if path.startswith(str(outside))]
    assert not [name for name in by_name if name.startswith("folder_link/")]  # never listed
    assert by_name["hem/in_root.bmp"].label == "hem"  # through the in-root folder link
    assert by_name["hem/in_root.bmp"].status == "ok"
    assert "shared/in_root.bmp" not in by_name  # one folder, reached twice, walked once
    assert by_name["own_link.bmp"].status == "duplicate"
    assert catalog_counts(rows)["reasons"]["outside_root"] == 4


def test_a_file_swapped_for_a_link_out_after_the_walk_is_not_read(
    tmp_path: Path, reads, monkeypatch
) -> None:
    put(tmp_path, "elsewhere/x.bmp", cell(1))
    root = tmp_path / "inbox"
    put(root, "a.bmp", cell(2))
    put(root, "b.bmp", cell(3))
    walk = catalog._folder_entries

    def walk_then_swap(*args):
        listed = walk(*args)
        (root / "b.bmp").unlink()
        os.symlink(tmp_path / "elsewhere" / "x.bmp", root / "b.bmp")
        return listed

    monkeypatch.setattr(catalog, "_folder_entries", walk_then_swap)
    rows = build_catalog(str(root), "x")
    assert [(row.status, code(row)) for row in rows] == [
        ("ok", None),
        ("quarantined", "outside_root"),
    ]
    assert not [path for path in reads if "elsewhere" in path]


def test_a_root_reached_through_a_link_is_still_its_own_root(tmp_path: Path) -> None:
    put(tmp_path, "real/all/a.bmp", cell(1))
    os.symlink(tmp_path / "real", tmp_path / "alias")
    os.symlink(tmp_path / "real" / "all" / "a.bmp", tmp_path / "real" / "again.bmp")
    rows = build_catalog(str(tmp_path / "alias"), "x")
    assert [(os.path.relpath(r.uri, tmp_path), r.status) for r in rows] == [
        ("alias/again.bmp", "duplicate"),
        ("alias/all/a.bmp", "ok"),
    ]


def test_manifest_rows_through_links_out_of_the_folder_are_never_read(
    tmp_path: Path, reads
) -> None:
    outside = tmp_path / "elsewhere"
    put(outside, "x.bmp", cell(1))
    data = tmp_path / "data"
    put(data, "cells/a.bmp", cell(2))
    os.symlink(outside, data / "link")
    os.symlink(outside / "x.bmp", data / "cells" / "file_link.bmp")
    os.symlink(data / "cells", data / "inside_link")
    manifest = put(
        data,
        "MANIFEST.csv",
        b"path,label\nlink/x.bmp,all\ncells/file_link.bmp,all\ninside_link/a.bmp,hem\n",
    )
    rows = build_catalog(str(manifest), "m")
    assert_accounted(rows)
    by_name = {os.path.relpath(row.uri, data): row for row in rows}
    for name in ("link/x.bmp", "cells/file_link.bmp"):
        row = by_name[name]
        assert (row.status, code(row), row.label) == ("quarantined", "outside_root", "all")
        assert row.image_id == "path:" + hashlib.sha256(str(data / name).encode()).hexdigest()
    assert by_name["inside_link/a.bmp"].status == "ok"  # a link that stays inside is fine
    assert not [path for path in reads if path.startswith(str(outside))]


# -- several sources, one catalog ------------------------------------------------------------
def test_several_sources_give_one_catalog(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    put(first, "all/a.bmp", cell(1))
    put(first, "hem/b.bmp", cell(2))
    put(second, "all/copy_of_a.bmp", cell(1))  # the same bytes in another source
    put(second, "hem/c.png", cell(3, fmt="PNG"))
    put(second, "README.txt", b"notes")
    manifest = put(second, "MANIFEST.csv", b"path,label\nhem/c.png,hem\nall/d.bmp,all\n")
    put(second, "all/d.bmp", cell(4))
    rows = build_catalog([str(first), str(manifest), str(second)], "both")
    assert_accounted(rows)
    by_uri = {row.uri: row for row in rows}
    # A file named by two sources (the manifest and the folder) is one row.
    assert len(rows) == len(by_uri) == 5
    assert by_uri[str(first / "all/a.bmp")].status == "ok"
    copy = by_uri[str(second / "all/copy_of_a.bmp")]
    assert copy.status == "duplicate"
    assert copy.reason == f"duplicate_of:{by_uri[str(first / 'all/a.bmp')].image_id}"
    assert by_uri[str(second / "all/d.bmp")].label == "all"
    counts = catalog_counts(rows)
    assert (counts["ok"], counts["duplicate"], counts["ignored"]) == (4, 1, 2)  # README, CSV
    # The single-string call is unchanged.
    assert [r.uri for r in build_catalog(str(first), "one")] == [
        str(first / "all/a.bmp"),
        str(first / "hem/b.bmp"),
    ]


def test_a_file_a_manifest_lists_is_a_row_not_ignored(tmp_path: Path) -> None:
    put(tmp_path, "all/a.bmp", cell(1))
    put(tmp_path, "all/notes.txt", b"not an image")
    manifest = put(tmp_path, "m.csv", b"path,label\nall/notes.txt,all\n")
    rows = build_catalog([str(tmp_path), str(manifest)], "x")
    assert [(os.path.relpath(r.uri, tmp_path), code(r)) for r in rows] == [
        ("all/a.bmp", None),
        ("all/notes.txt", "not_an_image"),
    ]
    assert catalog_counts(rows)["ignored_files"] == [str(manifest)]


def test_sources_that_label_one_file_differently_quarantine_it(tmp_path: Path) -> None:
    put(tmp_path, "all/a.bmp", cell(1))
    manifest = put(tmp_path, "m.csv", b"path,label\nall/a.bmp,hem\n")
    rows = build_catalog([str(tmp_path), str(manifest)], "x")
    assert len(rows) == 1
    assert (rows[0].status, code(rows[0])) == ("quarantined", "label_conflict")
    assert "(all vs hem)" in rows[0].reason


def test_no_sources_is_a_usage_error() -> None:
    with pytest.raises(LeukoflowError, match="no IMAGES given"):
        build_catalog([], "x")


def test_the_two_real_manifests_give_the_development_pool() -> None:
    pool = CNMC_POOL / "MANIFEST.csv"
    if not pool.exists():
        pytest.fail(f"the development pool {pool} is missing")
    # Only the CSV parsing and path checks: reading 1,571 cells is the catalog's slow part, and
    # test_cnmc_folder_and_manifest_give_the_same_catalog already reads the real bytes.
    entries = [
        entry
        for source in (str(CNMC / "MANIFEST.csv"), str(pool))
        for entry in catalog._source_entries(source, DEFAULT_LABELS, allow_empty=False)[0]
    ]
    assert len(catalog._one_entry_per_uri(entries)) == 1571
    assert all(entry.refused is None for entry in entries)
    assert len({entry.subject_id for entry in entries}) == 46


# -- manifests -------------------------------------------------------------------------------
def test_manifest_rows(tmp_path: Path) -> None:
    data = tmp_path / "data"
    put(data, "cells/UID_4_1_1_all.bmp", cell(1))
    put(data, "cells/b.bmp", cell(2))
    put(data, "cells/c.bmp", cell(3))
    put(data, "cells/d.bmp", cell(4))
    put(tmp_path, "outside.bmp", cell(5))  # exists, yet must never be read through the manifest
    manifest = put(
        data,
        "MANIFEST.csv",
        (
            "path,label,subject_id,notes\n"
            "cells/UID_4_1_1_all.bmp,blast,,parsed subject\n"
            "cells/b.bmp,normal,S-9,column wins\n"
            "cells/../cells/c.bmp,,,unlabelled\n"
            "cells/d.bmp,lymphoma,,unknown label\n"
            "cells/missing.bmp,blast,,no such file\n"
            "../outside.bmp,blast,,escape\n"
            f"{tmp_path / 'outside.bmp'},blast,,absolute\n"
            "cells/../../outside.bmp,blast,,escape after normalising\n"
        ).encode(),
    )
    rows = build_catalog(str(manifest), "m", labels={"blast": "all", "normal": "hem"})
    assert_accounted(rows)
    assert len(rows) == 8
    by_uri = {row.uri: row for row in rows}

    parsed = by_uri[str(data / "cells/UID_4_1_1_all.bmp")]
    assert (parsed.status, parsed.label, parsed.subject_id) == ("ok", "all", "4")
    assert parsed.image_id == hashlib.sha256(cell(1)).hexdigest()
    column = by_uri[str(data / "cells/b.bmp")]
    assert (column.status, column.label, column.subject_id) == ("ok", "hem", "S-9")
    unlabelled = by_uri[str(data / "cells/c.bmp")]  # "cells/../cells" stays inside: allowed
    assert (unlabelled.status, unlabelled.label) == ("ok", None)
    assert code(by_uri[str(data / "cells/d.bmp")]) == "unknown_label"
    assert code(by_uri[str(data / "cells/missing.bmp")]) == "unreadable"
    for raw in ("../outside.bmp", str(tmp_path / "outside.bmp"), "cells/../../outside.bmp"):
        row = by_uri[raw]
        assert (row.status, code(row), row.label) == ("quarantined", "outside_root", "all")
        assert row.image_id == "path:" + hashlib.sha256(raw.encode()).hexdigest()
        assert row.size_bytes is None and row.width is None


def test_manifest_needs_path_and_label_columns(tmp_path: Path) -> None:
    put(tmp_path, "a.bmp", cell(1))
    manifest = put(tmp_path, "m.csv", b"file,label\na.bmp,all\n")
    with pytest.raises(LeukoflowError, match="lacks the path column"):
        build_catalog(str(manifest), "x")
    manifest = put(tmp_path, "m.csv", b"path,class\na.bmp,all\n")
    with pytest.raises(LeukoflowError, match="lacks the label column"):
        build_catalog(str(manifest), "x")


def test_manifest_with_no_rows(tmp_path: Path) -> None:
    manifest = put(tmp_path, "m.CSV", b"\xef\xbb\xbfpath,label\n")  # BOM from a spreadsheet
    with pytest.raises(LeukoflowError, match="lists no images"):
        build_catalog(str(manifest), "x")


# -- names and manifests that are not UTF-8 -------------------------------------------------
NOT_UTF8 = "unreadable: file name is not valid UTF-8"


def put_bytes(root: Path, relative: bytes, data: bytes) -> bytes:
    """Write a file whose path (relative to root) is raw bytes: a name no str can spell."""
    path = os.path.join(os.fsencode(root), relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def test_names_that_are_not_utf8_are_quarantined_with_their_reason(tmp_path: Path) -> None:
    """A file and a class folder named in Latin-1 (bytes no UTF-8 decoder accepts): each file
    gets a row, quarantined with a reason that says why, its uri showing the bytes escaped; never
    dropped, never read, and the rows still fit the catalog's Parquet schema."""
    put(tmp_path, "all/UID_1_1_1_all.bmp", cell(1))
    put_bytes(tmp_path, b"all/UID_2_1_1_all\xff.bmp", cell(2))
    put_bytes(tmp_path, b"h\xe9m/UID_H3_1_1_hem.bmp", cell(3))
    put_bytes(tmp_path, b"all/notes\xe9.txt", b"not an image, but unnamed: cannot be probed")
    rows = build_catalog(str(tmp_path), "inbox")
    assert_accounted(rows)
    by_uri = {row.uri: row for row in rows}
    assert set(by_uri) == {
        f"{tmp_path}/all/UID_1_1_1_all.bmp",
        f"{tmp_path}/all/UID_2_1_1_all\\xff.bmp",
        f"{tmp_path}/h\\xe9m/UID_H3_1_1_hem.bmp",
        f"{tmp_path}/all/notes\\xe9.txt",
    }
    assert by_uri[f"{tmp_path}/all/UID_1_1_1_all.bmp"].status == "ok"
    for uri, row in by_uri.items():
        if uri.endswith("UID_1_1_1_all.bmp"):
            continue
        assert (row.status, row.reason) == ("quarantined", NOT_UTF8), uri
        assert row.image_id.startswith("path:") and row.size_bytes is None  # not read
    assert by_uri[f"{tmp_path}/all/UID_2_1_1_all\\xff.bmp"].label == "all"
    assert by_uri[f"{tmp_path}/h\\xe9m/UID_H3_1_1_hem.bmp"].label is None  # not "hem"
    counts = catalog_counts(rows)
    assert (counts["ok"], counts["quarantined"], counts["reasons"]) == (1, 3, {"unreadable": 3})
    store = open_location(str(tmp_path / "store"))
    write_catalog(store, "inbox", rows)
    again = {row.uri: row.reason for row in read_catalog_rows(store)}
    assert again == {uri: row.reason for uri, row in by_uri.items()}


def test_a_manifest_naming_a_latin1_file_in_utf8_finds_no_such_file(tmp_path: Path) -> None:
    """The manifest (UTF-8) says café.bmp; the disk holds that name in Latin-1 bytes: the row is
    quarantined as unreadable, the file on disk is not silently taken for it."""
    put_bytes(tmp_path, b"all/caf\xe9.bmp", cell(1))
    manifest = put(tmp_path, "m.csv", "path,label\nall/café.bmp,all\n".encode())
    (row,) = build_catalog(str(manifest), "x")
    assert row.uri == f"{tmp_path}/all/café.bmp"
    assert (row.status, code(row)) == ("quarantined", "unreadable")
    assert "No such file" in row.reason


def test_a_latin1_manifest_is_refused_in_one_clear_line(tmp_path: Path) -> None:
    put(tmp_path, "all/café.bmp", cell(1))
    manifest = put(tmp_path, "m.csv", "path,label\nall/café.bmp,all\n".encode("latin-1"))
    with pytest.raises(LeukoflowError) as refused:
        build_catalog(str(manifest), "x")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"cannot read manifest {manifest}: ")
    assert "'utf-8' codec can't decode byte 0xe9 in position 18" in message


# -- errors ----------------------------------------------------------------------------------
def test_missing_images_folder(tmp_path: Path) -> None:
    with pytest.raises(LeukoflowError, match="does not exist"):
        build_catalog(str(tmp_path / "nope"), "x")


def test_folder_without_images(tmp_path: Path) -> None:
    put(tmp_path, "MANIFEST.csv", b"path,label\n")
    put(tmp_path, "sub/SOURCE.md", b"text")
    with pytest.raises(LeukoflowError, match="no images found under"):
        build_catalog(str(tmp_path), "x")


def test_images_must_be_folder_or_csv(tmp_path: Path) -> None:
    image = put(tmp_path, "a.bmp", cell(1))
    with pytest.raises(LeukoflowError, match="folder or a .csv"):
        build_catalog(str(image), "x")


# -- object stores ---------------------------------------------------------------------------
def test_remote_filesystem_goes_through_fsspec(monkeypatch) -> None:
    # fsspec's in-memory filesystem stands in for S3: not local, so listing is fs.find and
    # reading is fs.cat_file, the same calls s3fs answers.
    memory = fsspec.filesystem("memory")
    memory.pipe_file("/bucket/ds/all/a.bmp", cell(1))
    memory.pipe_file("/bucket/ds/hem/b.png", cell(2, fmt="PNG"))
    memory.pipe_file("/bucket/ds/hem/broken.png", cell(3, fmt="PNG")[:100])
    memory.pipe_file("/bucket/ds/notes.txt", b"not an image")
    memory.pipe_file("/bucket/ds/MANIFEST.csv", b"path,label\nall/a.bmp,all\n")
    memory.pipe_file("/bucket/ds/inbox/cell.dat", cell(4, fmt="PNG"))  # probed: a range read
    memory.pipe_file("/bucket/ds/inbox/../../elsewhere/x.bmp", cell(5))  # a key, not a path
    try:
        monkeypatch.setattr(
            catalog, "open_location", lambda uri: Location(memory, uri.split("://", 1)[1])
        )
        rows = build_catalog("memory:///bucket/ds", "remote")
        assert [(row.uri, row.label, row.status) for row in rows] == [
            ("memory:///bucket/ds/all/a.bmp", "all", "ok"),
            ("memory:///bucket/ds/hem/b.png", "hem", "ok"),
            ("memory:///bucket/ds/hem/broken.png", "hem", "quarantined"),
            ("memory:///bucket/ds/inbox/../../elsewhere/x.bmp", None, "quarantined"),
            ("memory:///bucket/ds/inbox/cell.dat", None, "ok"),
        ]
        assert code(rows[3]) == "outside_root" and rows[3].size_bytes is None
        assert rows[0].size_bytes == len(cell(1))
        assert catalog_counts(rows)["ignored_files"] == [
            "memory:///bucket/ds/MANIFEST.csv",
            "memory:///bucket/ds/notes.txt",
        ]
        via_manifest = build_catalog("memory:///bucket/ds/MANIFEST.csv", "remote")
        assert [(row.uri, row.status) for row in via_manifest] == [
            ("memory:///bucket/ds/all/a.bmp", "ok")
        ]
    finally:
        memory.rm("/bucket", recursive=True)
