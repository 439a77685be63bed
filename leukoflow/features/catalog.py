"""Discovering the images of a dataset: one catalog row per image file found, never a silent drop.

IMAGES is one source or a list of them, each a CSV manifest (`path,label[,subject_id,...]`) or a
folder in one of two layouts: the C-NMC training layout `fold_*/<class>/...` or plain class
folders `<class>/...`. Folders that are not a class (and files directly under the root) give
unlabelled rows: that is what a nightly inbox looks like. Every image is fully decoded once, so a
row with status "ok" is an image the feature step can read. Several sources give one catalog:
the same bytes found twice (in two sources or one) are marked duplicate, as within one source.

Every file under a folder is accounted for. A file with an image suffix (IMAGE_SUFFIXES) is
catalogued; any other file is probed by content (its first 16 bytes, against the signatures of
the formats Pillow decodes here), so `cell.dat` holding a PNG is catalogued too. Files that are
not images (README.txt, .DS_Store, a MANIFEST.csv beside the cells) get no row but are listed in
`catalog_counts(rows)["ignored_files"]` and counted under "ignored". A multi-frame file (GIF,
TIFF stack, animated WebP) is catalogued by its first frame, noted in the row's reason
(`first_frame_of_N`).

Nothing outside the images root is read (the folder given, or a manifest's folder). Locally,
real paths are compared: a manifest row whose path leaves the folder, lexically or through a
symbolic link, and a link found in a folder walk (to a file or a folder) whose target is outside
the root, are quarantined with reason `outside_root`, never read or listed. Links that stay
inside the root are followed (a folder reached twice, through a link loop, is walked once).
Object stores have no links; keys with "." or ".." segments are refused the same way.
"""

from __future__ import annotations

import csv
import errno
import fnmatch
import hashlib
import io
import os
import posixpath
import re
import stat
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from leukoflow.errors import LeukoflowError
from leukoflow.features.images import (
    HEADER_BYTES,
    TOO_LARGE,
    UNREADABLE,
    ImageRejected,
    decode_image,
    sniff_format,
)
from leukoflow.store.storage import Location, open_location
from leukoflow.store.tables import CatalogRow
from leukoflow.vocabulary import ImageStatus, Label

# Suffixes catalogued without a look at the content; other files are probed (sniff_format).
IMAGE_SUFFIXES = (
    ".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k", ".jpx",
)  # fmt: skip
LABELS = tuple(label.value for label in Label)  # leukemic blast (positive), normal
DEFAULT_LABELS = {label: label for label in LABELS}  # class folders named after the labels

# Catalog reason codes (the image reason codes live in features/images).
OUTSIDE_ROOT = "outside_root"
UNKNOWN_LABEL = "unknown_label"
MISSING_PATH = "missing_path"
DUPLICATE_OF = "duplicate_of"
LABEL_CONFLICT = "label_conflict"

# Whole-file reads: refuse anything bigger before reading it (a 40 Mpx 16-bit RGBA TIFF is 320 MB).
MAX_FILE_BYTES = 512 * 1024 * 1024

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_SUBJECT = re.compile(r"^UID_(\d+|H\d+)_\d+_\d+_(all|hem)\.[A-Za-z]+$")


def parse_subject_id(filename: str) -> str | None:
    """Subject of a C-NMC file name: UID_<s>_<i>_<c>_all -> "<s>", UID_H<s>_..._hem -> "H<s>"."""
    name = posixpath.basename(filename.replace("\\", "/"))
    match = _SUBJECT.match(name)
    if match is None or not name.lower().endswith(IMAGE_SUFFIXES):
        return None
    subject, kind = match.groups()
    # Normal donors are numbered separately with an "H"; a name mixing the two is not C-NMC.
    if subject.startswith("H") != (kind == Label.HEM):
        return None
    return subject


class CatalogRows(list[CatalogRow]):
    """build_catalog's rows, plus the uris of the files it looked at and ignored because they
    are not images (they get no row)."""

    def __init__(self, rows: list[CatalogRow], ignored_files: list[str] | None = None) -> None:
        super().__init__(rows)
        self.ignored_files = list(ignored_files or [])


def build_catalog(
    images: str | Sequence[str],
    dataset: str,
    labels: dict[str, str] | None = None,
    known_rows: Mapping[str, CatalogRow] | None = None,
    allow_empty: bool = False,
) -> CatalogRows:
    """One CATALOG_SCHEMA row per image file under IMAGES (one folder or .csv manifest, or a list
    of them), by uri; `rows.ignored_files` lists the files that are not images.

    known_rows (uri -> an earlier catalog row) lets a re-run reuse the row of a file whose size
    and modification time are unchanged, without reading, hashing or decoding it again.
    allow_empty accepts a folder without images (a quiet night's inbox).
    """
    mapping = _check_labels(labels)
    sources = _sources(images)
    entries: list[_Entry] = []
    ignored: list[str] = []
    for source in sources:
        found, not_images = _source_entries(source, mapping, allow_empty)
        entries.extend(found)
        ignored.extend(not_images)
    entries = _one_entry_per_uri(entries)
    discovered_at = datetime.now(UTC)
    # Of several copies of the same bytes, the one kept as "ok" is the first labelled one by
    # uri, so an unlabelled inbox copy never hides a training label.
    entries.sort(key=lambda entry: (entry.label is None, entry.uri))
    rows = _rows(entries, dataset, discovered_at, known_rows or {})
    # A file a manifest lists is an image to account for, even where a folder walk ignored it.
    not_images = set(ignored) - {entry.uri for entry in entries}
    return CatalogRows(sorted(rows, key=lambda row: row.uri), sorted(not_images))


def catalog_counts(rows: list[CatalogRow]) -> dict:
    """Counts by status, conversions among ok rows, non-ok rows per reason code, and the files
    ignored as not images (known only for build_catalog's own result)."""
    statuses = Counter(row.status for row in rows)
    reasons = Counter(reason_code(row.reason) for row in rows if not row.ok and row.reason)
    ignored = list(getattr(rows, "ignored_files", []))
    return {
        "found": len(rows),
        "ok": statuses[ImageStatus.OK],
        "quarantined": statuses[ImageStatus.QUARANTINED],
        "duplicate": statuses[ImageStatus.DUPLICATE],
        "converted": sum(1 for row in rows if row.ok and row.reason),
        "reasons": dict(sorted(reasons.items())),
        "ignored": len(ignored),
        "ignored_files": ignored,
    }


def reason_code(reason: str) -> str:
    """The code of a reason text: what comes before the first ":"."""
    return reason.split(":", 1)[0].strip()


# -- discovery -------------------------------------------------------------------------------
def check_sources(images: str | Sequence[str]) -> None:
    """Each of IMAGES exists and is a folder or a .csv manifest: a command says so before it
    starts any engine (the catalog pass checks again, for flows called directly)."""
    for source in _sources(images):
        _is_folder(open_location(source))


def _sources(images: str | Sequence[str]) -> list[str]:
    sources = [images] if isinstance(images, str) else list(images)
    if not sources:
        raise LeukoflowError("no IMAGES given: name at least one folder or .csv manifest.")
    return sources


def _is_folder(root: Location) -> bool:
    """True for a folder, False for a .csv manifest; anything else is the user's error."""
    if not root.fs.exists(root.path):
        raise LeukoflowError(f"IMAGES {root.uri} does not exist.")
    if root.fs.isdir(root.path):
        return True
    if root.path.lower().endswith(".csv"):
        return False
    raise LeukoflowError(f"IMAGES {root.uri} must be a folder or a .csv manifest.")


def _source_entries(
    uri: str, mapping: dict[str, str], allow_empty: bool
) -> tuple[list[_Entry], list[str]]:
    """The entries of one source, and the uris of the files in it that are not images."""
    root = open_location(uri)
    if _is_folder(root):
        entries, ignored = _folder_entries(root, mapping)
        if not entries and not allow_empty:
            others = f"; {len(ignored)} other file(s) ignored" if ignored else ""
            raise LeukoflowError(
                f"no images found under {root.uri} (no file is an image Pillow decodes{others})."
            )
        return entries, ignored
    return _manifest_entries(root, mapping), []


def _one_entry_per_uri(entries: list[_Entry]) -> list[_Entry]:
    """One entry per file named by several sources: the first labelled one wins; sources that
    label the same file differently quarantine it."""
    kept: dict[str, _Entry] = {}
    for entry in entries:
        first = kept.get(entry.uri)
        if first is None:
            kept[entry.uri] = entry
            continue
        if first.label is None and entry.label is not None:
            entry.subject_id = entry.subject_id or first.subject_id
            kept[entry.uri] = entry
        elif entry.label is not None and entry.label != first.label and first.refused is None:
            first.refused = (
                f"{LABEL_CONFLICT}: two sources give different labels ({first.label} vs "
                f"{entry.label})"
            )
        first = kept[entry.uri]
        first.subject_id = first.subject_id or entry.subject_id
    return list(kept.values())


@dataclass
class _Entry:
    """A file to catalog; `refused` is set when it must be quarantined without being read."""

    uri: str
    loc: Location | None
    label: str | None
    subject_id: str | None
    refused: str | None = None
    size: int | None = None
    image_id: str | None = None  # set for refused manifest rows, whose uri is not a file
    modified: datetime | None = None  # from an object store's listing (local files are stat'ed)
    root_real: str | None = None  # a local file's images root, resolved: it must stay inside


def _check_labels(labels: dict[str, str] | None) -> dict[str, str]:
    mapping = DEFAULT_LABELS if labels is None else labels
    if not mapping:
        raise LeukoflowError("the labels mapping is empty; give at least one folder: label pair.")
    wrong = sorted(value for value in mapping.values() if value not in LABELS)
    if wrong:
        raise LeukoflowError(f"labels must map to 'all' or 'hem', got {', '.join(wrong)}.")
    # Folder names and manifest label texts are matched case-insensitively (ALL/, Hem/ exist).
    return {key.strip().lower(): value for key, value in mapping.items()}


def _path_id(text: str) -> str:
    # Rows never read have no content hash; this id is unique per path yet cannot pass for one.
    return "path:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _folder_label(relative: str, mapping: dict[str, str]) -> str | None:
    parts = relative.split("/")[:-1]
    # C-NMC training layout: the class folder sits inside a top-level fold_* folder.
    if len(parts) >= 2 and fnmatch.fnmatch(parts[0], "fold_*"):
        parts = parts[1:]
    return mapping.get(parts[0].lower()) if parts else None


def _folder_entries(root: Location, mapping: dict[str, str]) -> tuple[list[_Entry], list[str]]:
    """Entries for the image files of a folder, and the uris of its files that are not images."""
    listing = _walk_local(root.path) if root.is_local else _walk_remote(root)
    root_real = os.path.realpath(root.path) if root.is_local else None
    entries, ignored = [], []
    for path, size, error, modified in listing:
        loc = Location(root.fs, path)
        utf8 = _is_utf8(path)
        uri = loc.uri if utf8 else os.fsencode(path).decode("utf-8", "backslashreplace")
        if error is None and utf8 and not path.lower().endswith(IMAGE_SUFFIXES):
            # Not named like an image: its first bytes decide (an unreadable one is kept as a
            # row: it may be an image we cannot see).
            try:
                if sniff_format(_read_header(loc)) is None:
                    ignored.append(uri)
                    continue
            except OSError as failure:
                error = f"{UNREADABLE}: {_describe(failure)}"
        relative = path[len(root.path) :].lstrip("/")  # listings only yield paths under root
        entry = _Entry(
            uri=uri,
            loc=loc,
            label=_folder_label(relative, mapping),
            subject_id=parse_subject_id(path),
            size=size,
            refused=error,
            modified=modified,
            root_real=root_real,
        )
        if not utf8:
            # The uri could not be stored or reopened; keep the file visible but never read it.
            entry.refused = f"{UNREADABLE}: file name is not valid UTF-8"
        entries.append(entry)
    return entries, ignored


def _read_header(loc: Location) -> bytes:
    """The first bytes of a file; OSError when it is not a regular file or cannot be read."""
    if loc.is_local:
        info = os.stat(loc.path)  # follows links: a dangling one fails here
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file ({_file_kind(info.st_mode)})")
        with open(loc.path, "rb") as handle:
            return handle.read(HEADER_BYTES)
    return loc.fs.cat_file(loc.path, start=0, end=HEADER_BYTES)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _walk_local(root: str) -> Iterator[tuple[str, int | None, str | None, datetime | None]]:
    """(path, None, error, None) for every file under root, following links that stay inside
    it (each folder once); a link whose target is outside comes with an outside_root error."""
    real_root = os.path.realpath(root)
    top = os.stat(root)
    visited = {(top.st_dev, top.st_ino)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            if folder == root:
                raise LeukoflowError(f"cannot list IMAGES {root}: {_describe(error)}.") from error
            # The folder may hold images we cannot see: record it rather than drop it silently.
            yield folder, None, f"{UNREADABLE}: cannot list folder: {_describe(error)}", None
            continue
        subfolders = []
        for entry in entries:
            # A plain entry of a folder inside the root is inside too; only a link can leave.
            if entry.is_symlink() and not _inside(os.path.realpath(entry.path), real_root):
                yield entry.path, None, f"{OUTSIDE_ROOT}: {_OUTSIDE_LINK}", None
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks
                info = entry.stat() if is_dir else None
            except OSError:
                is_dir, info = False, None  # a symlink loop or a link into nowhere: a "file"
            if is_dir and info is not None:
                # A folder reached twice (a symlink loop, two links to one folder) is walked once.
                key = (info.st_dev, info.st_ino)
                if key not in visited:
                    visited.add(key)
                    subfolders.append(entry.path)
            else:
                yield entry.path, None, None, None
        stack.extend(reversed(subfolders))


_OUTSIDE_LINK = "a symbolic link to a place outside the images root"
_OUTSIDE_PATH = "the path leads outside the images root (through a symbolic link)"


def _real_path(path: str, real_folders: dict[str, str]) -> str:
    """os.path.realpath(path), resolving each folder once per pass (a pass reads thousands of
    files from a few folders): only the file's own name is looked at per file."""
    folder, name = os.path.split(path)
    real_folder = real_folders.get(folder)
    if real_folder is None:
        real_folder = real_folders[folder] = os.path.realpath(folder)
    try:
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        is_link = False  # nothing there: the read reports it
    return os.path.realpath(path) if is_link else os.path.join(real_folder, name)


def _inside(path: str, real_root: str) -> bool:
    """Whether a real (resolved) path is the root or under it."""
    return os.path.commonpath([path, real_root]) == real_root


def _walk_remote(root: Location) -> Iterator[tuple[str, int | None, str | None, datetime | None]]:
    # Object stores have no links or special files: a flat recursive listing is the whole tree.
    found = root.fs.find(root.path, withdirs=False, detail=True)
    for path, info in sorted(found.items()):
        relative = path[len(root.path) :].lstrip("/")
        if any(part in (".", "..") for part in relative.split("/")):
            # A key such as "a/../../b" would name another prefix wherever a layer normalises it.
            yield path, None, f"{OUTSIDE_ROOT}: the key has '.' or '..' segments", None
            continue
        yield path, info.get("size"), None, _listed_mtime(info)


def _manifest_entries(manifest: Location, mapping: dict[str, str]) -> list[_Entry]:
    try:
        text = manifest.fs.cat_file(manifest.path).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise LeukoflowError(f"cannot read manifest {manifest.uri}: {error}.") from error
    reader = csv.DictReader(io.StringIO(text))
    columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
    missing = [column for column in ("path", "label") if column not in columns]
    if missing:
        raise LeukoflowError(
            f"manifest {manifest.uri} lacks the {' and '.join(missing)} column "
            f"(header: {', '.join(reader.fieldnames or []) or 'none'})."
        )
    folder = posixpath.dirname(manifest.path)
    entries = []
    try:
        for row in reader:
            cells = {key: (row.get(name) or "").strip() for key, name in columns.items()}
            where = f"{manifest.uri}#line={reader.line_num}"
            entries.append(_manifest_entry(where, manifest, folder, cells, mapping))
    except csv.Error as error:
        raise LeukoflowError(f"manifest {manifest.uri} is not valid CSV: {error}.") from error
    if not entries:
        raise LeukoflowError(f"manifest {manifest.uri} lists no images.")
    return entries


def _manifest_entry(
    where: str, manifest: Location, folder: str, cells: dict[str, str], mapping: dict[str, str]
) -> _Entry:
    raw = cells["path"]
    subject = cells.get("subject_id") or parse_subject_id(raw)
    label_text = cells["label"]
    label = mapping.get(label_text.lower()) if label_text else None
    if not raw:
        reason = f"{MISSING_PATH}: the manifest row has no path"
        return _Entry(where, None, label, subject, reason, image_id=_path_id(where))
    # Backslashes count as separators so "..\\x.bmp" cannot slip through on a POSIX host.
    relative = posixpath.normpath(raw.replace("\\", "/"))
    escapes = (
        relative.startswith("/")
        or re.match(r"^[A-Za-z]:", relative) is not None
        or "://" in raw
        or relative == ".."
        or relative.startswith("../")
    )
    if escapes:
        # The row's uri keeps the raw path; reasons reach reports and artifacts, paths must not.
        reason = f"{OUTSIDE_ROOT}: the path leaves the manifest's folder"
        return _Entry(raw, None, label, subject, reason, image_id=_path_id(raw))
    loc = Location(manifest.fs, posixpath.join(folder, relative))
    # Lexically inside; whether a link on the way leads out is checked right before reading.
    root_real = os.path.realpath(folder) if loc.is_local else None
    entry = _Entry(loc.uri, loc, label, subject, root_real=root_real)
    if label_text and label is None:
        entry.refused = f"{UNKNOWN_LABEL}: {label_text!r} is not one of {', '.join(mapping)}"
    return entry


# -- rows ------------------------------------------------------------------------------------
def _rows(
    entries: list[_Entry],
    dataset: str,
    discovered_at: datetime,
    known_rows: Mapping[str, CatalogRow],
) -> list[CatalogRow]:
    rows = []
    first_by_hash: dict[str, CatalogRow] = {}
    real_folders: dict[str, str] = {}
    for entry in entries:
        row = CatalogRow(
            # A path id until the bytes are read; then their sha256.
            image_id=entry.image_id or _path_id(entry.uri),
            uri=entry.uri,
            dataset=dataset,
            label=Label(entry.label) if entry.label else None,
            subject_id=entry.subject_id,
            status=ImageStatus.QUARANTINED,
            reason=entry.refused,
            discovered_at=discovered_at,
        )
        rows.append(row)
        if entry.refused is not None or entry.loc is None:
            continue
        if entry.root_real is not None and not _inside(
            _real_path(entry.loc.path, real_folders), entry.root_real
        ):
            # Checked here, just before any stat or read, so a file swapped for a link out of
            # the root after the walk is refused too (not stat'ed, not read).
            row.reason = f"{OUTSIDE_ROOT}: {_OUTSIDE_PATH}"
            continue
        # Stamp before reading: a file changed after the stamp is simply read again next time.
        size, row.modified_at = _stamp(entry)
        known = known_rows.get(entry.uri)
        if known is not None:
            row.discovered_at = known.discovered_at or discovered_at
            if _unchanged(known, size, row.modified_at):
                _reuse(row, known, first_by_hash)
                continue
        try:
            data = _read(entry.loc, entry.size)
        except ImageRejected as rejected:
            row.reason = str(rejected)
            continue
        except OSError as error:
            row.reason = f"{UNREADABLE}: {_describe(error)}"
            continue
        image_id = hashlib.sha256(data).hexdigest()
        row.image_id, row.size_bytes = image_id, len(data)
        first = first_by_hash.get(image_id)
        if first is not None:
            _mark_copy(row, first)
            continue
        first_by_hash[image_id] = row
        try:
            decoded = decode_image(data)
        except ImageRejected as rejected:
            row.reason = str(rejected)
            continue
        row.width, row.height = decoded.width, decoded.height
        row.status, row.reason = ImageStatus.OK, decoded.conversion
    return rows


def _stamp(entry: _Entry) -> tuple[int | None, datetime | None]:
    """(size, modification time) of a file, or Nones when they cannot be known."""
    if entry.loc is not None and entry.loc.is_local:
        try:
            info = os.stat(entry.loc.path)
        except OSError:
            return None, None  # _read reports why
        # Exact to the microsecond the catalog stores, with no float rounding in between.
        return info.st_size, _EPOCH + timedelta(microseconds=info.st_mtime_ns // 1000)
    return entry.size, entry.modified


def _listed_mtime(info: dict) -> datetime | None:
    """The modification time an fsspec listing gives (s3fs: LastModified), in UTC."""
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
    elif isinstance(value, (int, float)):
        moment = datetime.fromtimestamp(value, UTC)
    else:
        return None
    return moment.astimezone(UTC)


def _unchanged(known: CatalogRow, size: int | None, modified: datetime | None) -> bool:
    """Whether an earlier row still describes the file: same size and mtime, bytes were read."""
    return (
        size is not None
        and modified is not None
        and known.size_bytes == size
        and known.modified_at == modified
        # Rows of files that could not be read carry a path id: those are tried again.
        and not (known.image_id or "path:").startswith("path:")
    )


def _reuse(row: CatalogRow, known: CatalogRow, first_by_hash: dict[str, CatalogRow]) -> None:
    """Fill `row` from the earlier row of the same unchanged file: no read, hash or decode."""
    row.image_id, row.size_bytes = known.image_id, known.size_bytes
    first = first_by_hash.get(known.image_id)
    if first is not None:
        _mark_copy(row, first)
        return
    first_by_hash[known.image_id] = row
    if known.status == ImageStatus.QUARANTINED:
        row.reason = known.reason  # the same bytes fail to decode the same way
        return
    # A row that was a duplicate decoded fine too; its conversion note went with the first copy.
    row.width, row.height = known.width, known.height
    row.status, row.reason = ImageStatus.OK, known.reason if known.ok else None


def _mark_copy(row: CatalogRow, first: CatalogRow) -> None:
    """Second sighting of the same bytes: a duplicate if the first was good, else the same fault."""
    if not first.ok:
        # Same bytes fail the same way; five empty uploads read better as five empty files.
        row.reason = first.reason
        return
    reason = f"{DUPLICATE_OF}:{first.image_id}"
    if row.label and first.label and row.label != first.label:
        reason = f"{LABEL_CONFLICT}:{reason} ({first.label} vs {row.label})"
    row.status, row.reason = ImageStatus.DUPLICATE, reason
    row.width, row.height = first.width, first.height


def _read(loc: Location, size: int | None) -> bytes:
    """The file's bytes through fsspec; OSError when it cannot be read as a regular file."""
    if loc.is_local:
        # stat follows links: a dangling link or a link loop fails here with its own errno.
        info = os.stat(loc.path)
        if not stat.S_ISREG(info.st_mode):
            # A FIFO would block a read forever; a device or folder is no image file either.
            raise OSError(errno.EINVAL, f"not a regular file ({_file_kind(info.st_mode)})")
        size = info.st_size
    elif size is None:
        size = loc.fs.size(loc.path)
    if size is not None and size > MAX_FILE_BYTES:
        raise ImageRejected(TOO_LARGE, f"the file has {size} bytes (max {MAX_FILE_BYTES})")
    return loc.fs.cat_file(loc.path)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "device or special file")


def _describe(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__
