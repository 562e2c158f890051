"""Image checks for PNG, GIF, JPEG and WebP, on images built by hand here.

The builders make complete images: the PNG, GIF and JPEG ones decode (checked with
Pillow when they were written: pixels of one value, all colour types, bit depths and
Adam7 for PNG, a baseline greyscale JPEG); the WebP ones have a real structure around
bitstreams that are not.
"""

from __future__ import annotations

import struct
import zlib

import pytest

from poc_api.server._images import image_size, placeholder_count

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Colour type: samples per pixel.
PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data and the CRC of type and data."""
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def ihdr(w: int, h: int, *, depth: int = 8, colour: int = 2, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace))


def png_rows(
    w: int, h: int, *, depth: int = 8, colour: int = 2, interlace: int = 0, fill: int = 0x80
) -> bytes:
    """Image data before compression: per row, filter type 0 then its packed samples
    (every byte ``fill``), row after row of each Adam7 pass when interlaced."""
    passes = [(0, 0, 1, 1)] if not interlace else ADAM7
    out = bytearray()
    for x0, y0, dx, dy in passes:
        cols, rows = len(range(x0, w, dx)), len(range(y0, h, dy))
        if cols and rows:
            row_bytes = -(-cols * PNG_SAMPLES[colour] * depth // 8)
            out += (b"\x00" + bytes([fill]) * row_bytes) * rows
    return bytes(out)


def png(w: int, h: int) -> bytes:
    """An RGB PNG of w x h (stored, uncompressed deflate)."""
    raw = png_rows(w, h)
    return PNG_SIGNATURE + ihdr(w, h) + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b"")


def gif(w: int, h: int) -> bytes:
    """A GIF of w x h pixels of colour 0 (of two), LZW-coded with 3-bit codes."""
    n = w * h
    # Clear code 4 before every two pixels keeps the table, and so the codes, small.
    codes = [c for i in range(0, n, 2) for c in [4, 0, 0][: 1 + min(2, n - i)]] + [5]
    bits = sum(c << (3 * i) for i, c in enumerate(codes))
    lzw = bits.to_bytes(-(-3 * len(codes) // 8), "little")
    blocks = b"".join(
        bytes([len(p)]) + p for p in (lzw[i : i + 255] for i in range(0, len(lzw), 255))
    )
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", w, h, 0x80, 0, 0)  # a global colour table of two
        + b"\x00\x00\x00\xff\xff\xff"
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, w, h, 0)
        + b"\x02"  # LZW minimum code size
        + blocks
        + b"\x00;"
    )


def jpeg(w: int, h: int) -> bytes:
    """A baseline greyscale JPEG of w x h, every 8x8 block flat grey."""

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", 2 + len(body)) + body

    blocks = -(-w // 8) * -(-h // 8)
    # Each block: DC difference 0 and end-of-block, each a one-bit Huffman code 0.
    scan = bytearray(-(-2 * blocks // 8))
    if 2 * blocks % 8:
        scan[-1] = (1 << (8 - 2 * blocks % 8)) - 1  # pad with one bits
    one_code = b"\x01" + bytes(15) + b"\x00"  # one code of length 1, for symbol 0
    return (
        b"\xff\xd8"
        + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + segment(0xDB, b"\x00" + b"\x01" * 64)
        + segment(0xC0, struct.pack(">BHHB", 8, h, w, 1) + b"\x01\x11\x00")
        + segment(0xC4, b"\x00" + one_code)
        + segment(0xC4, b"\x10" + one_code)
        + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
        + bytes(scan)
        + b"\xff\xd9"
    )


def riff_chunk(kind: bytes, body: bytes) -> bytes:
    """A RIFF chunk, padded to an even size."""
    return kind + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)


def webp(kind: str, w: int, h: int) -> bytes:
    """A WebP whose structure checks out (its bitstream's content is not real)."""
    if kind == "VP8 ":
        # A shown key frame, version 0, a first partition of 1 byte, then 1 more.
        body = b"\x30\x00\x00\x9d\x01\x2a" + struct.pack("<HH", w, h) + b"\x00\x00"
        chunks = riff_chunk(b"VP8 ", body)
    else:
        vp8l = riff_chunk(
            b"VP8L", b"\x2f" + ((w - 1) | ((h - 1) << 14)).to_bytes(4, "little") + bytes(10)
        )
        if kind == "VP8L":
            chunks = vp8l
        else:
            size = (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
            chunks = riff_chunk(b"VP8X", b"\x00\x00\x00\x00" + size) + vp8l
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


@pytest.mark.parametrize(
    ("data", "mime", "size"),
    [
        (png(100, 60), "image/png", (100, 60)),
        (gif(300, 20), "image/gif", (300, 20)),
        (jpeg(640, 480), "image/jpeg", (640, 480)),
        (webp("VP8 ", 57, 29), "image/webp", (57, 29)),
        (webp("VP8L", 1000, 3), "image/webp", (1000, 3)),
        (webp("VP8X", 4000, 5000), "image/webp", (4000, 5000)),
    ],
    ids=["png", "gif", "jpeg", "webp-vp8", "webp-vp8l", "webp-vp8x"],
)
def test_image_size_from_header(data: bytes, mime: str, size: tuple[int, int]) -> None:
    assert image_size(data, mime) == size


@pytest.mark.parametrize(
    ("w", "h", "n"),
    [(1, 1, 1), (28, 28, 1), (29, 28, 2), (100, 60, 12), (640, 480, 23 * 18), (4000, 5000, 1024)],
)
def test_placeholder_count_is_patches_clamped(w: int, h: int, n: int) -> None:
    assert placeholder_count(w, h) == n


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (b"", "image/png"),
        (b"not an image at all", "image/png"),
        (png(10, 10)[:20], "image/png"),
        (b"\xff\xd8\xff\xd9", "image/jpeg"),
        (gif(0, 5), "image/gif"),
        (png(10, 10), "image/bmp"),
        (png(10, 10), "text/plain"),
    ],
    ids=["empty", "garbage", "truncated-png", "jpeg-no-frame", "zero-size", "bmp", "text"],
)
def test_undecodable_or_unsupported_images_raise(data: bytes, mime: str) -> None:
    with pytest.raises(ValueError):
        image_size(data, mime)
