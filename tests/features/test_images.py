"""Decoding one image: every mode converted correctly, every bad file refused with its reason."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from leukoflow.features import images
from leukoflow.features.images import (
    DECODE_ERROR,
    EMPTY_FILE,
    MIN_SIDE,
    NOT_AN_IMAGE,
    TOO_LARGE,
    TOO_SMALL,
    TRUNCATED,
    DecodedImage,
    ImageRejected,
    decode_image,
    probe_image,
    resize_pixels,
    sniff_format,
)

MINIMAL_PDF = b"%PDF-1.4\n1 0 obj <</Type /Catalog>> endobj\ntrailer <</Root 1 0 R>>\n%%EOF\n"


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noisy_rgb(side: int = 64, seed: int = 0) -> Image.Image:
    # Noise does not compress, so cutting a file short really loses pixel data.
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def rejected(data: bytes) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_image(data)
    return info.value


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int, rows: int, height: int | None = None) -> bytes:
    """A 1-bit grayscale PNG declaring side x side (or side x height) pixels, with `rows` real
    rows of zeros."""
    header = struct.pack(">IIBBBBB", side, side if height is None else height, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    stream = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", stream)
        + png_chunk(b"IEND", b"")
    )


# -- plain files -----------------------------------------------------------------------------
def test_plain_rgb_bmp_is_returned_unchanged() -> None:
    source = noisy_rgb(32)
    decoded = decode_image(encode(source, "BMP"))
    assert isinstance(decoded, DecodedImage)
    assert decoded.format == "BMP"
    assert decoded.conversion is None
    assert (decoded.width, decoded.height) == (32, 32)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (32, 32, 3)
    np.testing.assert_array_equal(decoded.pixels, np.asarray(source))


def test_format_comes_from_content_not_name() -> None:
    # decode_image sees only bytes: a PNG is a PNG whatever the file was called.
    assert decode_image(encode(noisy_rgb(20), "PNG")).format == "PNG"
    assert decode_image(encode(noisy_rgb(20), "TIFF")).format == "TIFF"


def test_probe_gives_the_same_answer_as_decode() -> None:
    data = encode(Image.new("L", (20, 20), 7), "PNG")
    assert probe_image(data).conversion == decode_image(data).conversion == "L->RGB"
    with pytest.raises(ImageRejected):
        probe_image(b"")


def test_rejection_carries_reason_and_detail() -> None:
    error = ImageRejected(TOO_SMALL, "8x8 is tiny")
    assert (error.reason, error.detail, str(error)) == (
        TOO_SMALL,
        "8x8 is tiny",
        "too_small: 8x8 is tiny",
    )


# -- refusals --------------------------------------------------------------------------------
def test_empty_file() -> None:
    assert rejected(b"").reason == EMPTY_FILE


@pytest.mark.parametrize(
    "data",
    [
        b"Patient 12, slide 3: see attached\n" * 20,
        MINIMAL_PDF,
        b"\x00\x01\x02" * 100,
    ],
    ids=["text", "pdf", "binary-junk"],
)
def test_non_images_are_refused(data: bytes) -> None:
    assert rejected(data).reason == NOT_AN_IMAGE


@pytest.mark.parametrize("fmt", ["BMP", "PNG", "JPEG"])
def test_truncated_files_are_found_by_a_full_load(fmt: str) -> None:
    data = encode(noisy_rgb(64), fmt)
    cut = data[: int(len(data) * 0.6)]
    # The header is intact, so opening alone (what verify-style checks rely on) succeeds.
    assert Image.open(io.BytesIO(cut)).size == (64, 64)
    error = rejected(cut)
    assert error.reason == TRUNCATED, str(error)


def test_corrupt_data_is_a_decode_error() -> None:
    data = bytearray(encode(noisy_rgb(64), "PNG"))
    data[200:260] = bytes(b ^ 0xFF for b in data[200:260])  # garble the compressed stream
    assert rejected(bytes(data)).reason == DECODE_ERROR


@pytest.mark.parametrize(
    ("side", "rows"),
    [
        (7_000, 7_000),  # 49 Mpx: under Pillow's own limit, refused by MAX_PIXELS
        (10_000, 10),  # 100 Mpx: Pillow warns; the warning becomes the refusal
        (100_000, 10),  # 10 Gpx: Pillow's DecompressionBombError
    ],
)
def test_decompression_bombs_are_refused_before_decoding(
    side: int, rows: int, pixel_loads: list
) -> None:
    data = png_bomb(side, rows)
    assert len(data) < 100_000  # tiny on disk; as RGB the first one alone would be 147 MB
    error = rejected(data)
    assert error.reason == TOO_LARGE, str(error)
    assert f"{side * side}" in error.detail  # says what was declared
    assert pixel_loads == []  # refused from the header: no pixel was decoded


class _StopBeforeDecoding(Exception):
    pass


@pytest.fixture
def pixel_loads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Records each image whose pixels Pillow is asked to decode (ImageFile.load: every format
    plugin decodes through it), then lets it decode."""
    calls: list = []
    original = ImageFile.ImageFile.load

    def load(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def test_the_pixel_load_spy_sees_a_normal_decode(pixel_loads: list) -> None:
    decode_image(encode(noisy_rgb(20), "PNG"))
    assert pixel_loads and set(pixel_loads) == {(20, 20)}  # (load is called more than once)


def test_max_pixels_is_the_largest_image_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """8000x5000 (= MAX_PIXELS) passes the size check and reaches the decoder (stopped there: it
    would cost 40 MB); 8000x5001 is refused from its header."""
    assert 8000 * 5000 == images.MAX_PIXELS
    reached = []

    def stop(self):
        reached.append(self.size)
        raise _StopBeforeDecoding

    monkeypatch.setattr(ImageFile.ImageFile, "load", stop)
    at_limit = rejected(png_bomb(8000, 1, height=5000))
    assert reached == [(8000, 5000)] and at_limit.reason == DECODE_ERROR  # stopped, not refused
    over = rejected(png_bomb(8000, 1, height=5001))
    assert over.reason == TOO_LARGE and "declares 40008000 pixels (max 40000000)" in over.detail
    assert reached == [(8000, 5000)]  # the second never reached the decoder


def test_pillow_bomb_warning_filter_does_not_leak() -> None:
    before = list(warnings.filters)
    rejected(png_bomb(10_000, 1))
    assert warnings.filters == before


@pytest.mark.parametrize("size", [(8, 8), (8, 100), (100, MIN_SIDE - 1)])
def test_too_small(size: tuple[int, int]) -> None:
    assert rejected(encode(Image.new("RGB", size), "PNG")).reason == TOO_SMALL


def test_smallest_accepted_side() -> None:
    decoded = decode_image(encode(Image.new("RGB", (MIN_SIDE, MIN_SIDE)), "PNG"))
    assert (decoded.width, decoded.height) == (MIN_SIDE, MIN_SIDE)


def test_refuses_to_run_when_truncation_would_be_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(noisy_rgb(20), "PNG"))


# -- conversions -----------------------------------------------------------------------------
def test_grayscale() -> None:
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1))
    decoded = decode_image(encode(Image.fromarray(gray, mode="L"), "PNG"))
    assert decoded.conversion == "L->RGB"
    for channel in range(3):
        np.testing.assert_array_equal(decoded.pixels[..., channel], gray)


def test_rgba_is_composited_over_black() -> None:
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[:10] = (200, 100, 50, 255)  # opaque
    rgba[10:15] = (200, 100, 50, 128)  # half transparent
    rgba[15:] = (255, 255, 255, 0)  # fully transparent white: must become black, not white
    decoded = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert decoded.conversion == "RGBA->RGB (alpha over black)"
    assert tuple(decoded.pixels[0, 0]) == (200, 100, 50)
    np.testing.assert_allclose(decoded.pixels[12, 0], (100, 50, 25), atol=1)
    assert tuple(decoded.pixels[19, 19]) == (0, 0, 0)


def test_gray_with_alpha() -> None:
    la = Image.merge("LA", (Image.new("L", (20, 20), 200), Image.new("L", (20, 20), 64)))
    decoded = decode_image(encode(la, "PNG"))
    assert decoded.conversion == "LA->RGB (alpha over black)"
    np.testing.assert_allclose(decoded.pixels[0, 0], (50, 50, 50), atol=1)


def test_palette_with_and_without_transparency() -> None:
    palette = [0, 0, 0, 250, 10, 20, 30, 40, 250] + [0] * (256 * 3 - 9)
    index = np.zeros((20, 20), dtype=np.uint8)
    index[:, 10:] = 1
    index[15:, :] = 2
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette)
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.conversion == "P->RGB"
    assert tuple(decoded.pixels[0, 0]) == (0, 0, 0)
    assert tuple(decoded.pixels[0, 15]) == (250, 10, 20)
    assert tuple(decoded.pixels[19, 0]) == (30, 40, 250)

    decoded = decode_image(encode(image, "PNG", transparency=2))
    assert decoded.conversion == "P->RGB (alpha over black)"
    assert tuple(decoded.pixels[19, 0]) == (0, 0, 0)
    assert tuple(decoded.pixels[0, 15]) == (250, 10, 20)


def test_16_bit_is_scaled_by_its_range_not_clipped() -> None:
    values = np.array([0, 1_000, 32_768, 65_535] * 5, dtype=np.uint16)
    image = Image.fromarray(np.tile(values, (20, 1)))
    assert image.mode == "I;16"
    for fmt in ("PNG", "TIFF"):
        decoded = decode_image(encode(image, fmt))
        assert decoded.conversion is not None and "scaled 16-bit" in decoded.conversion
        # 65535 -> 255 and 1000 -> 4: scaled by 257, not clipped at 255.
        np.testing.assert_array_equal(decoded.pixels[0, :4, 0], [0, 4, 128, 255])


def test_16_bit_big_endian_tiff() -> None:
    values = np.tile(np.array([0, 25_700, 65_535, 0], dtype=">u2"), (20, 5))
    image = Image.frombytes("I;16B", (20, 20), values.tobytes())
    decoded = decode_image(encode(image, "TIFF"))
    assert decoded.conversion == "I;16B->RGB (scaled 16-bit)"
    np.testing.assert_array_equal(decoded.pixels[0, :3, 1], [0, 100, 255])


def test_32_bit_integer_holding_16_bit_data() -> None:
    image = Image.fromarray(np.full((20, 20), 25_700, dtype=np.int32), mode="I")
    decoded = decode_image(encode(image, "TIFF"))
    assert decoded.conversion == "I->RGB (scaled 16-bit)"
    assert tuple(decoded.pixels[0, 0]) == (100, 100, 100)


def test_float_image() -> None:
    values = np.tile(np.linspace(0.0, 1.0, 20, dtype=np.float32), (20, 1))
    decoded = decode_image(encode(Image.fromarray(values, mode="F"), "TIFF"))
    assert decoded.conversion == "F->RGB (scaled float 0..1)"
    assert decoded.pixels[0, 0, 0] == 0 and decoded.pixels[0, -1, 0] == 255


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(fmt: str) -> None:
    decoded = decode_image(encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), fmt))
    assert decoded.conversion == "CMYK->RGB"
    np.testing.assert_allclose(decoded.pixels[10, 10], (255, 0, 0), atol=8)


def test_one_bit() -> None:
    bits = Image.new("1", (20, 20), 0)
    bits.paste(1, (0, 0, 10, 20))
    decoded = decode_image(encode(bits, "BMP"))
    assert decoded.conversion == "1->RGB"
    assert tuple(decoded.pixels[0, 0]) == (255, 255, 255)
    assert tuple(decoded.pixels[0, 19]) == (0, 0, 0)


def test_exif_orientation_is_applied() -> None:
    # 40 wide, 20 high: left half red, right half blue. Orientation 6 = rotate 90 degrees
    # clockwise to display, so the result is 20 wide, 40 high, red on top.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=95))
    assert decoded.conversion == "exif-transposed"
    assert (decoded.width, decoded.height) == (20, 40)
    assert decoded.pixels.shape == (40, 20, 3)
    np.testing.assert_allclose(decoded.pixels[5, 10], (255, 0, 0), atol=20)
    np.testing.assert_allclose(decoded.pixels[35, 10], (0, 0, 255), atol=20)


def test_several_conversions_are_joined() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(Image.new("L", (40, 20), 90), "JPEG", exif=exif))
    assert decoded.conversion == "exif-transposed; L->RGB"
    assert (decoded.width, decoded.height) == (20, 40)


# -- multi-frame files and formats found by content ----------------------------------------
@pytest.mark.parametrize(("fmt", "n"), [("GIF", 3), ("TIFF", 2), ("WEBP", 4)])
def test_multi_frame_files_give_their_first_frame_and_say_so(fmt: str, n: int) -> None:
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90)][:n]
    frames = [Image.new("RGB", (24, 24), colour) for colour in colours]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    decoded = decode_image(data)
    assert decoded.conversion.split("; ")[0] == f"first_frame_of_{n}"
    np.testing.assert_allclose(decoded.pixels[12, 12], colours[0], atol=12)


@pytest.mark.parametrize("fmt", ["BMP", "PNG", "JPEG", "TIFF", "GIF", "WEBP", "PPM", "JPEG2000"])
def test_sniff_format_knows_every_accepted_format_from_16_bytes(fmt: str) -> None:
    data = encode(noisy_rgb(20), fmt)
    assert sniff_format(data[: images.HEADER_BYTES]) == fmt
    assert fmt in images.ACCEPTED_FORMATS


@pytest.mark.parametrize(
    "head",
    [b"", b"path,label\n", b"# notes", b"\x00\x00\x00\x01Bud1\x00", b"PK\x03\x04", MINIMAL_PDF],
)
def test_sniff_format_ignores_what_is_not_an_image(head: bytes) -> None:
    assert sniff_format(head) is None


# -- resize ----------------------------------------------------------------------------------
def test_resize_pixels() -> None:
    pixels = np.asarray(noisy_rgb(50))
    out = resize_pixels(pixels, 24)
    assert out.dtype == np.float32 and out.shape == (24, 24, 3)
    assert 0.0 <= out.min() and out.max() <= 255.0
    flat = resize_pixels(np.full((30, 50, 3), 77, dtype=np.uint8), 16)
    np.testing.assert_array_equal(flat, np.full((16, 16, 3), 77.0, dtype=np.float32))
    # Bilinear: a resize to the same size leaves pixels as they were.
    np.testing.assert_array_equal(resize_pixels(pixels, 50), pixels.astype(np.float32))


def test_resize_rejects_wrong_input() -> None:
    with pytest.raises(ValueError):
        resize_pixels(np.zeros((10, 10), dtype=np.uint8), 8)
    with pytest.raises(ValueError):
        resize_pixels(np.zeros((10, 10, 3), dtype=np.float32), 8)
