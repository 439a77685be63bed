"""Decoding one microscopy crop into RGB uint8 pixels, and refusing files that cannot be trusted.

Every refusal is an `ImageRejected` with a short reason code, so the catalog can quarantine the
file and count why. Sizes are checked from the header before any pixels are decoded, so a
decompression bomb costs a few hundred bytes of parsing, not gigabytes of memory.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Reason codes (the part of a catalog `reason` before the first ":").
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"
UNREADABLE = "unreadable"
DECODE_ERROR = "decode_error"

MAX_PIXELS = 40_000_000
MIN_SIDE = 16

# Formats recognised by content. Some Pillow plugins (TGA, for one) accept almost any bytes, so
# only the raster formats a microscope or a dataset export really produces are tried.
# (Camera JPEGs that Pillow reports as "MPO" are opened by the JPEG plugin.)
ACCEPTED_FORMATS = ("BMP", "PNG", "JPEG", "TIFF", "GIF", "WEBP", "PPM", "JPEG2000")

# What Image.open itself reads to pick a plugin; enough for sniff_format.
HEADER_BYTES = 16

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageRejected(Exception):
    """A file that is not a usable image; `reason` is a code, `detail` says what was seen."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedImage:
    """RGB pixels (H, W, 3) uint8 and what had to be done to get them (None: plain RGB)."""

    pixels: np.ndarray
    width: int
    height: int
    format: str
    conversion: str | None


def decode_image(data: bytes) -> DecodedImage:
    """Decode image bytes (format found from content) into RGB, or raise ImageRejected."""
    if not data:
        raise ImageRejected(EMPTY_FILE, "the file has 0 bytes")
    _require_strict_pillow()
    # Pillow warns (and past 2x its limit, raises) on huge images; as an error the warning stops
    # the open before any decoding. catch_warnings swaps a process-wide filter list: the only
    # thing another thread could see leak is this same "error" filter, which is harmless here.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageRejected(TOO_LARGE, str(error)) from error
        except UnidentifiedImageError as error:
            raise ImageRejected(NOT_AN_IMAGE, "content is not a supported image format") from error
        except EOFError as error:
            raise ImageRejected(TRUNCATED, "the header ends early") from error
        except Exception as error:  # any plugin failure is a bad file, not a bug
            raise _classify(error) from error
        with image:
            _check_size(image)
            image_format = image.format or "unknown"
            try:
                _load_fully(image)
                return _to_rgb(image, image_format)
            except (ImageRejected, MemoryError):
                raise
            except Exception as error:  # Pillow raises many types for corrupt data
                raise _classify(error) from error


def sniff_format(header: bytes) -> str | None:
    """The accepted format whose signature the first HEADER_BYTES of a file carry, else None.

    Pillow's own plugin checks, on the same prefix Image.open reads: a cheap way to tell an image
    with an unusual name (`cell.dat` holding a PNG) from a text or system file, without decoding.
    """
    Image.init()
    prefix = header[:HEADER_BYTES]
    for name in ACCEPTED_FORMATS:
        accept = Image.OPEN.get(name, (None, None))[1]
        if accept is not None and prefix and accept(prefix):
            return name
    return None


def probe_image(data: bytes) -> DecodedImage:
    """Check that bytes are a usable image: the same as decode_image, a full decode is the check."""
    return decode_image(data)


def resize_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of RGB uint8 pixels to (size, size, 3) float32 in 0..255 (not normalised)."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    # Non-square inputs are stretched, not cropped: C-NMC crops are square and cropping could
    # cut off part of the cell.
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _max_pixels() -> int:
    # Never accept more than Pillow itself would without complaint.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return MAX_PIXELS if pillow_limit is None else min(MAX_PIXELS, int(pillow_limit))


def _check_size(image: Image.Image) -> None:
    """Refuse by the size the header declares, before any pixel is decoded."""
    width, height = image.size
    if width * height > _max_pixels():
        raise ImageRejected(
            TOO_LARGE, f"{width}x{height} declares {width * height} pixels (max {_max_pixels()})"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageRejected(TOO_SMALL, f"{width}x{height} has a side below {MIN_SIDE} px")


def _load_fully(image: Image.Image) -> None:
    # verify() only checks chunk structure; load() decodes every pixel, which is what finds a
    # file cut short.
    image.load()


def _require_strict_pillow() -> None:
    # Pillow's global LOAD_TRUNCATED_IMAGES would turn truncated files into half-grey "good"
    # images; that is a configuration bug of the process, so fail loudly instead of quietly.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncation would be hidden")


def _classify(error: Exception) -> ImageRejected:
    """Map whatever Pillow raised while reading pixels to a reason code."""
    text = str(error) or type(error).__name__
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageRejected(TOO_LARGE, text)
    if isinstance(error, EOFError) or (isinstance(error, OSError) and "truncated" in text.lower()):
        return ImageRejected(TRUNCATED, text)
    return ImageRejected(DECODE_ERROR, f"{type(error).__name__}: {text}")


def _to_rgb(image: Image.Image, image_format: str) -> DecodedImage:
    steps: list[str] = []
    if getattr(image, "n_frames", 1) > 1:
        # Microscopes write one cell per file; a stack or animation is scored by its first frame.
        steps.append(f"first_frame_of_{image.n_frames}")
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # broken metadata must not cost a good image its pixels
        orientation = 1
        steps.append("exif unreadable (not transposed)")
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        # Microscope exports rarely carry it, but a phone photo of a slide does; the cell must
        # reach the network the way it was seen.
        image = ImageOps.exif_transpose(image)
        steps.append("exif-transposed")
    pixels, conversion = _mode_to_rgb(image)
    if conversion:
        steps.append(conversion)
    height, width = pixels.shape[:2]
    return DecodedImage(
        pixels=pixels,
        width=width,
        height=height,
        format=image_format,
        conversion="; ".join(steps) or None,
    )


def _mode_to_rgb(image: Image.Image) -> tuple[np.ndarray, str | None]:
    """RGB uint8 pixels of any Pillow mode, and a note of the conversion (None for plain RGB)."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy(), None
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        # C-NMC crops sit on black, so transparent pixels become black, not white.
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        rgb = np.rint(rgba[..., :3] * alpha).astype(np.uint8)
        return rgb, f"{mode}->RGB (alpha over black)"
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        return _gray_to_rgb(values / 257.0), f"{mode}->RGB (scaled 16-bit)"
    if mode == "I":
        values = np.asarray(image).astype(np.float64)
        # Mode I is 32-bit signed, but 16-bit data is often stored in it: scale by the 16-bit
        # range when every value fits, else by the full int32 range.
        if values.size and values.min() >= 0 and values.max() <= 65535:
            return _gray_to_rgb(values / 257.0), "I->RGB (scaled 16-bit)"
        scaled = (values + 2.0**31) / (2.0**32 - 1) * 255.0
        return _gray_to_rgb(scaled), "I->RGB (scaled 32-bit)"
    if mode == "F":
        return _float_to_rgb(np.asarray(image, dtype=np.float64))
    if mode == "1":
        return np.asarray(image.convert("L").convert("RGB"), dtype=np.uint8).copy(), "1->RGB"
    # L, P without transparency, CMYK, YCbCr, LAB, HSV, RGBX: Pillow's own conversion is right.
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy(), f"{mode}->RGB"


def _float_to_rgb(values: np.ndarray) -> tuple[np.ndarray, str]:
    # Float images carry no declared range: infer the usual conventions, else stretch min..max.
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0.0 and high <= 1.0:
        return _gray_to_rgb(values * 255.0), "F->RGB (scaled float 0..1)"
    if low >= 0.0 and high <= 255.0:
        return _gray_to_rgb(values), "F->RGB (float 0..255)"
    if low >= 0.0 and high <= 65535.0:
        return _gray_to_rgb(values / 257.0), "F->RGB (scaled float 0..65535)"
    span = high - low or 1.0
    return _gray_to_rgb((values - low) / span * 255.0), "F->RGB (min-max scaled float)"


def _gray_to_rgb(values: np.ndarray) -> np.ndarray:
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)
