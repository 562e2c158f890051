"""Image header parsing for PNG, GIF, JPEG and WebP, built by hand in the tests."""

from __future__ import annotations

import struct
import zlib

import pytest

from poc_api.server._images import image_size, placeholder_count


def png(w: int, h: int, *, pixels: bool = True) -> bytes:
    """A valid RGB PNG (stored, uncompressed deflate) of size w x h."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + b"\x80" * (3 * w) for _ in range(h)) if pixels else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 0))
        + chunk(b"IEND", b"")
    )


def gif(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00" + b";"


def jpeg(w: int, h: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes(64)
    sof = b"\xff\xc2" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + dqt + sof + b"\xff\xda\x00\x02" + b"\xff\xd9"


def webp(kind: str, w: int, h: int) -> bytes:
    if kind == "VP8 ":
        body = b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", w, h) + bytes(10)
    elif kind == "VP8L":
        bits = (w - 1) | ((h - 1) << 14)
        body = b"\x2f" + bits.to_bytes(4, "little") + bytes(10)
    else:
        body = b"\x00\x00\x00\x00" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
        body += bytes(8)
    chunk = kind.encode() + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


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
