"""A tiny PNG encoder (``zlib`` + ``struct``), for the demo and for tests.

It writes 8-bit truecolour (RGB) images with one IDAT chunk and no filtering:
enough to give a server a real, decodable image without an imaging library.

Example::

    >>> from poc_api._png import encode_png
    >>> encode_png(1, 1, b"\\xff\\x00\\x00")[:8]   # one red pixel
    b'\\x89PNG\\r\\n\\x1a\\n'
    >>> encode_png(56, 28) == encode_png(56, 28)   # a deterministic gradient
    True
"""

from __future__ import annotations

import operator
import struct
import zlib
from typing import Final, SupportsIndex

__all__ = ["encode_png"]

_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
# A PNG dimension is a 31-bit unsigned integer (PNG spec §11.2.2).
_MAX_SIDE: Final = 2**31 - 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _gradient(width: int, height: int, seed: int) -> bytes:
    pixels = bytearray()
    for y in range(height):
        for x in range(width):
            pixels += bytes(
                (
                    (x * 255 // max(width - 1, 1) + seed) % 256,
                    (y * 255 // max(height - 1, 1) + 2 * seed) % 256,
                    ((x + y) * 4 + 3 * seed) % 256,
                )
            )
    return bytes(pixels)


def encode_png(
    width: SupportsIndex, height: SupportsIndex, rgb: bytes | None = None, *, seed: int = 0
) -> bytes:
    """Encode RGB pixels (row-major, 3 bytes a pixel) as a PNG file.

    Without ``rgb``, draws a colourful diagonal gradient that ``seed`` shifts;
    the same arguments always give the same bytes.

    Raises:
        TypeError: a side that is not an integer (an int, a numpy integer).
        ValueError: a side outside ``[1, 2**31)``, or ``rgb`` not holding exactly
            ``width * height * 3`` bytes.
    """
    sides = []
    for name, side in (("width", width), ("height", height)):
        if isinstance(side, bool) or not hasattr(type(side), "__index__"):
            raise TypeError(f"{name} must be an int, not {type(side).__name__}")
        side = operator.index(side)  # (a numpy integer, as counts elsewhere may be)
        if not 1 <= side <= _MAX_SIDE:
            raise ValueError(f"{name} must be in [1, 2**31), got {side}")
        sides.append(side)
    width, height = sides
    if rgb is None:
        rgb = _gradient(width, height, seed)
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(
            f"expected {stride * height} bytes of RGB for {width}x{height}, got {len(rgb)}"
        )
    # Each scanline starts with its filter type; 0 = None.
    raw = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        _SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )
