"""Image header parsing without an imaging library: enough to know (width, height).

Supports PNG (IHDR), GIF (logical screen descriptor), JPEG (first SOFn marker)
and WebP (VP8, VP8L, VP8X). Pure functions; errors are ``ValueError``.
"""

from __future__ import annotations

import math
import struct
from typing import Final

__all__ = [
    "MAX_PLACEHOLDERS",
    "PATCH",
    "SUPPORTED_MIME",
    "image_size",
    "placeholder_count",
]

#: Pixels per placeholder side: one position per 28x28 patch.
PATCH: Final = 28
MAX_PLACEHOLDERS: Final = 1024
SUPPORTED_MIME: Final = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp"}
)

_PNG_SIG: Final = b"\x89PNG\r\n\x1a\n"
# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _png(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ValueError("PNG without IHDR")
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def _gif(data: bytes) -> tuple[int, int]:
    if len(data) < 10:
        raise ValueError("truncated GIF header")
    w, h = struct.unpack("<HH", data[6:10])
    return int(w), int(h)


def _jpeg(data: bytes) -> tuple[int, int]:
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError("bad JPEG marker")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            break  # end of image / start of scan before any frame header
        (seg_len,) = struct.unpack(">H", data[i + 2 : i + 4])
        if seg_len < 2:
            raise ValueError("bad JPEG segment length")
        if marker in _SOF:
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(w), int(h)
        i += 2 + seg_len
    raise ValueError("JPEG without a frame header")


def _webp(data: bytes) -> tuple[int, int]:
    if len(data) < 30:
        raise ValueError("truncated WebP header")
    chunk = data[12:16]
    body = data[20:]
    if chunk == b"VP8 ":
        if body[3:6] != b"\x9d\x01\x2a":
            raise ValueError("bad VP8 start code")
        w, h = struct.unpack("<HH", body[6:10])
        return int(w) & 0x3FFF, int(h) & 0x3FFF
    if chunk == b"VP8L":
        if body[0] != 0x2F:
            raise ValueError("bad VP8L signature")
        bits = int.from_bytes(body[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        w = int.from_bytes(body[4:7], "little") + 1
        h = int.from_bytes(body[7:10], "little") + 1
        return w, h
    raise ValueError("unknown WebP chunk")


def image_size(data: bytes, mime: str) -> tuple[int, int]:
    """(width, height) of an encoded image, from its header alone.

    The format is sniffed from the bytes; ``mime`` must be one of the supported
    image types but need not match exactly (clients often guess). Raises
    ``ValueError`` for an unknown mime type, unrecognised or truncated data, or a
    zero dimension.
    """
    if mime.split(";")[0].strip().lower() not in SUPPORTED_MIME:
        raise ValueError(f"unsupported mime type {mime!r}")
    if data.startswith(_PNG_SIG):
        w, h = _png(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        w, h = _gif(data)
    elif data[:3] == b"\xff\xd8\xff":
        w, h = _jpeg(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        w, h = _webp(data)
    else:
        raise ValueError("not a PNG, GIF, JPEG or WebP image")
    if w <= 0 or h <= 0:
        raise ValueError(f"bad image size {w}x{h}")
    return w, h


def placeholder_count(width: int, height: int) -> int:
    """Positions an image takes: one per 28x28 patch, clamped to [1, 1024]."""
    n = math.ceil(width / PATCH) * math.ceil(height / PATCH)
    return max(1, min(MAX_PLACEHOLDERS, n))
