"""Image checking without an imaging library: is it decodable, and its (width, height).

PROTOCOL.md §2 refuses an image that cannot be decoded, so each format is walked
to its end with the standard library (``struct``, ``zlib``), not just its header:

- PNG: the signature; every chunk's length, type and CRC-32; IHDR first and
  valid (bit depth for the colour type, methods 0, interlace 0 or 1); a PLTE
  before the image data of a palette image; IDATs one after another; no unknown
  critical chunk; IEND last, with nothing after it. The IDAT data is inflated
  (``zlib``, so its Adler-32 is checked too) in bounded steps and must come to
  exactly the bytes IHDR implies: each row a filter type 0-4 and its packed
  samples, in the seven Adam7 passes when interlaced. Rows are not unfiltered:
  that arithmetic cannot fail once the sizes and filter types are right.
- JPEG: SOI; marker segments whose lengths fit; a frame header (SOFn) of a
  process decoders implement; quantization and Huffman table segments that
  parse; each scan header (SOS) naming the frame's components, with its
  quantization tables defined, and followed by entropy-coded data; EOI. The
  entropy-coded data itself is not decoded.
- GIF: header, logical screen descriptor, colour tables, extension and image
  blocks with their sub-blocks, at least one image with LZW data, the trailer
  last. The LZW codes are not decoded.
- WebP: the RIFF size equal to the data's; every chunk fits; a VP8 key frame
  (start code, frame tag, first partition inside the chunk, data after it) or
  a VP8L header (signature, version 0, data after it); in the extended format
  (VP8X), still images with a bitstream of the canvas's size and animations
  with frames that each hold one. The bitstreams are not decoded.

So a PNG is refused for a changed byte anywhere (CRC-32 and Adler-32 see every
byte), and every format when cut short. What still passes: damage inside
JPEG, GIF or WebP compressed data that leaves the structure whole (finding it
would take a full decoder), and bytes after a JPEG's EOI (cameras put MPF
pictures there, and decoders stop at EOI). Bytes after a PNG's IEND, a GIF's
trailer or a WebP's RIFF size are refused: no encoder writes them, and a client
sending them holds a buffer wrong. So is a PNG whose image data would inflate
to more than :data:`MAX_PNG_DATA`, before any inflating.

The declared mime type must name the format of the bytes (``image/jpg`` is taken
as ``image/jpeg``; parameters after ``;`` are ignored). Pure functions; errors are
``ValueError`` saying what is wrong and where.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from collections.abc import Iterator
from typing import Final

__all__ = [
    "MAX_PLACEHOLDERS",
    "MAX_PNG_DATA",
    "PATCH",
    "SUPPORTED_MIME",
    "image_size",
    "placeholder_count",
]

#: Pixels per placeholder side: one position per 28x28 patch.
PATCH: Final = 28
MAX_PLACEHOLDERS: Final = 1024
#: The format each supported mime type names.
_FORMAT: Final = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/gif": "GIF",
    "image/webp": "WebP",
}
SUPPORTED_MIME: Final = frozenset(_FORMAT)
#: The most bytes a PNG's image data may inflate to (256 MiB, e.g. 8192x8192 RGBA
#: at 8 bits): inflating is about a second per 256 MiB here, in the server's loop.
MAX_PNG_DATA: Final = 1 << 28
_INFLATE_IN: Final = 1 << 16  # compressed bytes fed to zlib at a time
_INFLATE_OUT: Final = 1 << 20  # most bytes one zlib call may produce

_PNG_SIG: Final = b"\x89PNG\r\n\x1a\n"
_PNG_MAX_SIDE: Final = 2**31 - 1
# Colour type: (samples per pixel, allowed bit depths), PNG spec §11.2.2.
_PNG_COLOUR: Final = {
    0: (1, (1, 2, 4, 8, 16)),  # greyscale
    2: (3, (8, 16)),  # truecolour
    3: (1, (1, 2, 4, 8)),  # indexed
    4: (2, (8, 16)),  # greyscale with alpha
    6: (4, (8, 16)),  # truecolour with alpha
}
# Adam7 passes: (first column, first row, column step, row step).
_ADAM7: Final = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)

# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Differential (hierarchical) frames: no common decoder implements them.
_SOF_HIERARCHICAL: Final = frozenset({0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF})
_SOF_LOSSLESS: Final = frozenset({0xC3, 0xCB})  # no quantization tables
_RST: Final = frozenset(range(0xD0, 0xD8))
# In entropy-coded data, 0xFF is followed by 0x00 (a stuffed 0xFF), a restart marker
# or a fill byte; anything else is the marker that ends it.
_SCAN_END: Final = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")

_VP8_START: Final = b"\x9d\x01\x2a"


# -- PNG ----------------------------------------------------------------------


def _png_passes(width: int, height: int, interlaced: bool) -> list[tuple[int, int]]:
    """(width, height) of each pass with pixels: the image, or its Adam7 passes."""
    if not interlaced:
        return [(width, height)]
    out = []
    for x0, y0, dx, dy in _ADAM7:
        w = (width - x0 + dx - 1) // dx if width > x0 else 0
        h = (height - y0 + dy - 1) // dy if height > y0 else 0
        if w and h:  # an empty pass has no rows, not even filter bytes
            out.append((w, h))
    return out


class _PngRows:
    """Counts the inflated image data and checks each row's filter type."""

    def __init__(self, passes: list[tuple[int, int]], bits_per_pixel: int) -> None:
        # (first byte, row length with its filter byte, end) of each pass.
        self.passes: list[tuple[int, int, int]] = []
        at = 0
        for w, h in passes:
            stride = 1 + (w * bits_per_pixel + 7) // 8
            self.passes.append((at, stride, at + stride * h))
            at += stride * h
        self.expected = at
        self.got = 0

    def take(self, out: bytes) -> None:
        lo, hi = self.got, self.got + len(out)
        if hi > self.expected:
            raise ValueError(
                f"PNG image data inflates to more than the {self.expected} bytes its IHDR implies"
            )
        for n, (begin, stride, end) in enumerate(self.passes):
            a, b = max(lo, begin), min(hi, end)
            if a >= b:
                continue
            first = begin + -(-(a - begin) // stride) * stride  # a row start >= a
            if first < b and max(out[first - lo : b - lo : stride]) > 4:
                at = next(i for i in range(first, b, stride) if out[i - lo] > 4)
                where = f" of Adam7 pass {n + 1}" if len(self.passes) > 1 else ""
                raise ValueError(
                    f"PNG row {(at - begin) // stride}{where} has filter type "
                    f"{out[at - lo]} (0-4 exist)"
                )
        self.got = hi


def _png_inflate(parts: list[memoryview], rows: _PngRows) -> None:
    """Inflate the IDAT data a bounded step at a time into ``rows``."""
    d = zlib.decompressobj()
    try:
        for part in parts:
            for i in range(0, len(part), _INFLATE_IN):
                buf: bytes | memoryview = part[i : i + _INFLATE_IN]
                while buf:
                    if d.eof:
                        raise ValueError("PNG image data goes on after its zlib stream ends")
                    rows.take(d.decompress(buf, _INFLATE_OUT))
                    buf = d.unconsumed_tail
        rows.take(d.flush())
    except zlib.error as e:
        raise ValueError(f"PNG image data does not inflate: {e}") from None
    if not d.eof:
        raise ValueError(
            f"PNG image data is cut short: its zlib stream stops unfinished after "
            f"{rows.got} of {rows.expected} bytes"
        )
    if d.unused_data:
        raise ValueError("PNG image data goes on after its zlib stream ends")
    if rows.got != rows.expected:
        raise ValueError(
            f"PNG image data inflates to {rows.got} bytes; its IHDR implies {rows.expected}"
        )


def _png_ihdr(body: memoryview) -> tuple[int, int, _PngRows, int]:
    """(width, height, rows to expect, colour type) from an IHDR's data."""
    if len(body) != 13:
        raise ValueError(f"PNG IHDR of {len(body)} bytes (13 expected)")
    w, h, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
    for name, side in (("width", w), ("height", h)):
        if not 1 <= side <= _PNG_MAX_SIDE:
            raise ValueError(f"bad PNG {name} {side}")
    if colour not in _PNG_COLOUR:
        raise ValueError(f"bad PNG colour type {colour}")
    samples, depths = _PNG_COLOUR[colour]
    if depth not in depths:
        raise ValueError(f"bad PNG bit depth {depth} for colour type {colour}")
    if compression or filtering:
        raise ValueError(f"unknown PNG compression or filter method ({compression}, {filtering})")
    if interlace not in (0, 1):
        raise ValueError(f"unknown PNG interlace method {interlace}")
    rows = _PngRows(_png_passes(w, h, interlace == 1), samples * depth)
    if rows.expected > MAX_PNG_DATA:
        raise ValueError(
            f"PNG of {w}x{h} (colour type {colour}, {depth}-bit) inflates to "
            f"{rows.expected} bytes, over the reference server's limit of {MAX_PNG_DATA}"
        )
    return w, h, rows, colour


def _png_chunks(data: bytes) -> Iterator[tuple[int, bytes, memoryview]]:
    """(offset, type, data) of each chunk up to IEND, lengths and CRCs checked."""
    view = memoryview(data)
    n, pos = len(data), len(_PNG_SIG)
    while True:
        if pos + 8 > n:
            raise ValueError(f"PNG is cut short at byte {pos}, before its IEND chunk")
        length, kind = struct.unpack_from(">I4s", data, pos)
        if not kind.isalpha():  # four ASCII letters
            raise ValueError(f"bad PNG chunk type {kind!r} at byte {pos}")
        name = kind.decode("ascii")
        if length > _PNG_MAX_SIDE:
            raise ValueError(f"bad PNG chunk length {length} ({name} at byte {pos})")
        end = pos + 8 + length
        if end + 4 > n:
            raise ValueError(
                f"PNG is cut short: chunk {name} at byte {pos} needs {length + 12} bytes, "
                f"{n - pos} are left"
            )
        if zlib.crc32(view[pos + 4 : end]) != int.from_bytes(view[end : end + 4], "big"):
            raise ValueError(f"PNG chunk {name} at byte {pos} fails its CRC check")
        yield pos, kind, view[pos + 8 : end]
        pos = end + 4
        if kind == b"IEND":
            if pos != n:
                raise ValueError(f"{n - pos} bytes follow the PNG's IEND chunk")
            return


def _png(data: bytes) -> tuple[int, int]:
    chunks = _png_chunks(data)
    _, kind, body = next(chunks)
    if kind != b"IHDR":
        raise ValueError(f"PNG starts with chunk {kind.decode()}, not IHDR")
    w, h, rows, colour = _png_ihdr(body)
    needs_plte = colour == 3  # a palette image, until its PLTE comes
    idat: list[memoryview] = []
    idat_ended = False
    for pos, kind, body in chunks:
        if kind == b"IDAT":
            if idat_ended:
                raise ValueError(f"PNG IDAT at byte {pos} is not next to the other IDATs")
            if needs_plte:
                raise ValueError("PNG palette image without a PLTE chunk before its IDAT")
            idat.append(body)
            continue
        idat_ended = bool(idat)
        if kind == b"IHDR":
            raise ValueError(f"second PNG IHDR at byte {pos}")
        if kind == b"PLTE" and needs_plte:
            if not (len(body) % 3 == 0 and 3 <= len(body) <= 3 * 256):
                raise ValueError(f"bad PNG PLTE of {len(body)} bytes")
            needs_plte = False
        elif kind == b"IEND" and body:
            raise ValueError(f"PNG IEND with {len(body)} bytes of data")
        elif not kind[0] & 0x20 and kind not in (b"PLTE", b"IEND"):
            raise ValueError(f"unknown critical PNG chunk {kind.decode()} at byte {pos}")
    if not idat:
        raise ValueError("PNG without an IDAT chunk")
    _png_inflate(idat, rows)
    return w, h


# -- GIF ----------------------------------------------------------------------


def _gif_sub_blocks(data: bytes, i: int) -> tuple[int, int]:
    """Skip data sub-blocks from ``i``: (offset after the terminator, data bytes)."""
    n, total = len(data), 0
    while True:
        if i >= n:
            raise ValueError("GIF is cut short inside a block's data")
        size = data[i]
        i += 1 + size
        if not size:
            return i, total
        total += size


def _gif(data: bytes) -> tuple[int, int]:
    n = len(data)
    if n < 13:
        raise ValueError("GIF is cut short in its logical screen descriptor")
    w, h, flags = struct.unpack_from("<HHB", data, 6)
    i = 13
    if flags & 0x80:  # global colour table
        i += 3 << ((flags & 7) + 1)
    images = 0
    while True:
        if i >= n:
            raise ValueError("GIF is cut short: no trailer")
        block = data[i]
        if block == 0x3B:  # trailer
            i += 1
            break
        if block == 0x2C:  # image descriptor
            if i + 10 > n:
                raise ValueError(f"GIF is cut short in the image descriptor at byte {i}")
            at = i
            flags = data[i + 9]
            i += 10
            if flags & 0x80:  # local colour table
                i += 3 << ((flags & 7) + 1)
            if i >= n:
                raise ValueError(f"GIF is cut short before the LZW data of the image at {at}")
            if not 1 <= data[i] <= 8:
                raise ValueError(f"bad GIF LZW minimum code size {data[i]} at byte {i}")
            i, size = _gif_sub_blocks(data, i + 1)
            if not size:
                raise ValueError(f"GIF image at byte {at} has no LZW data")
            images += 1
        elif block == 0x21:  # extension: label, then sub-blocks
            i, _ = _gif_sub_blocks(data, i + 2)
        else:
            raise ValueError(f"bad GIF block type 0x{block:02x} at byte {i}")
    if not images:
        raise ValueError("GIF without an image")
    if i != n:
        raise ValueError(f"{n - i} bytes follow the GIF's trailer")
    return int(w), int(h)


# -- JPEG ---------------------------------------------------------------------


def _jpeg_tables(marker: int, body: bytes, at: int, quant: set[int]) -> None:
    """Check a DQT (recording its table ids in ``quant``) or DHT segment's layout."""
    i, n = 0, len(body)
    while i < n:
        kind, table = body[i] >> 4, body[i] & 15
        if marker == 0xDB:  # DQT: precision, id, then 64 values of 8 or 16 bits
            if kind > 1 or table > 3:
                raise ValueError(f"bad JPEG quantization table 0x{body[i]:02x} at byte {at}")
            i += 1 + 64 * (kind + 1)
            quant.add(table)
        else:  # DHT: class, id, 16 code counts, then that many symbols
            if kind > 1 or table > 3 or i + 17 > n:
                raise ValueError(f"bad JPEG Huffman table at byte {at}")
            count = sum(body[i + 1 : i + 17])
            if count > 256:
                raise ValueError(f"bad JPEG Huffman table at byte {at}")
            i += 17 + count
    if i != n:
        raise ValueError(f"JPEG table segment at byte {at} does not match its length")


def _jpeg_scan_end(data: bytes, i: int) -> int:
    """The offset of the marker that ends the entropy-coded data starting at ``i``."""
    end = _SCAN_END.search(data, i)
    if end is None:
        raise ValueError("JPEG is cut short in entropy-coded data: no EOI")
    return end.start()


def _jpeg(data: bytes) -> tuple[int, int]:
    n = len(data)
    i = 2  # past SOI
    size: tuple[int, int] | None = None
    lossless = False
    components: dict[int, int] = {}  # component id -> quantization table id
    quant: set[int] = set()
    scans = 0
    while True:
        if i >= n:
            raise ValueError("JPEG is cut short: no EOI marker")
        if data[i] != 0xFF:
            raise ValueError(f"JPEG has 0x{data[i]:02x} at byte {i} where a marker belongs")
        at = i
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            raise ValueError("JPEG is cut short: no EOI marker")
        marker = data[i]
        i += 1
        if marker == 0xD9:  # EOI; any bytes after it are not the image's
            if not scans:
                raise ValueError("JPEG without a scan (SOS) before its EOI")
            assert size is not None
            return size
        if marker in (0x00, 0xD8):
            raise ValueError(f"bad JPEG marker 0xff{marker:02x} at byte {at}")
        if marker == 0x01 or marker in _RST:  # markers without a segment
            continue
        if i + 2 > n:
            raise ValueError(f"JPEG is cut short in the segment at byte {at}")
        end = i + int.from_bytes(data[i : i + 2], "big")
        if end < i + 2 or end > n:
            raise ValueError(f"JPEG segment 0xff{marker:02x} at byte {at} runs past the data")
        body = data[i + 2 : end]
        i = end
        if marker in _SOF:
            if size is not None:
                raise ValueError(f"second JPEG frame header at byte {at}")
            if marker in _SOF_HIERARCHICAL:
                raise ValueError(f"hierarchical JPEG (SOF 0xff{marker:02x}) is not supported")
            if len(body) < 6 or len(body) != 6 + 3 * body[5] or not body[5]:
                raise ValueError(f"bad JPEG frame header at byte {at}")
            h, w = struct.unpack_from(">HH", body, 1)
            size = (int(w), int(h))
            lossless = marker in _SOF_LOSSLESS
            components = {body[k]: body[k + 2] for k in range(6, len(body), 3)}
        elif marker in (0xDB, 0xC4):
            _jpeg_tables(marker, body, at, quant)
        elif marker == 0xDA:
            if size is None:
                raise ValueError(f"JPEG scan (SOS) at byte {at} before any frame header")
            if len(body) < 1 or not 1 <= body[0] <= 4 or len(body) != 4 + 2 * body[0]:
                raise ValueError(f"bad JPEG scan header at byte {at}")
            for k in range(1, 1 + 2 * body[0], 2):
                if body[k] not in components:
                    raise ValueError(f"JPEG scan at byte {at} names an unknown component")
                if not lossless and components[body[k]] not in quant:
                    raise ValueError(
                        f"JPEG scan at byte {at} uses quantization table "
                        f"{components[body[k]]}, never defined"
                    )
            i = _jpeg_scan_end(data, end)
            if i == end:
                raise ValueError(f"JPEG scan at byte {at} has no entropy-coded data")
            scans += 1


# -- WebP ---------------------------------------------------------------------


def _riff_chunks(data: bytes, start: int, what: str) -> list[tuple[bytes, int, bytes]]:
    """(FourCC, offset, data) of the RIFF chunks filling ``data[start:]``."""
    out = []
    n, i = len(data), start
    while i < n:
        if i + 8 > n:
            raise ValueError(f"{what} is cut short in the chunk header at byte {i}")
        kind, size = data[i : i + 4], int.from_bytes(data[i + 4 : i + 8], "little")
        end = i + 8 + size
        if end + (size & 1) > n:
            raise ValueError(f"{what} chunk {kind!r} at byte {i} runs past the data")
        out.append((kind, i, data[i + 8 : end]))
        i = end + (size & 1)  # chunks are padded to an even size
    return out


def _vp8(body: bytes, at: int) -> tuple[int, int]:
    if len(body) < 10:
        raise ValueError(f"WebP VP8 chunk at byte {at} is cut short")
    tag = int.from_bytes(body[:3], "little")
    if tag & 1:
        raise ValueError("WebP VP8 data is not a key frame")
    if (tag >> 1) & 7 > 3:
        raise ValueError(f"bad WebP VP8 version {(tag >> 1) & 7}")
    if not tag & 0x10:
        raise ValueError("WebP VP8 frame is not shown")
    if body[3:6] != _VP8_START:
        raise ValueError("bad VP8 start code")
    first_partition = tag >> 5
    if not first_partition or 10 + first_partition >= len(body):
        raise ValueError(
            f"WebP VP8 first partition of {first_partition} bytes leaves no data in "
            f"its chunk of {len(body)} at byte {at}"
        )
    w, h = struct.unpack_from("<HH", body, 6)
    return int(w) & 0x3FFF, int(h) & 0x3FFF


def _vp8l(body: bytes, at: int) -> tuple[int, int]:
    if len(body) < 5:
        raise ValueError(f"WebP VP8L chunk at byte {at} is cut short")
    if body[0] != 0x2F:
        raise ValueError("bad VP8L signature")
    bits = int.from_bytes(body[1:5], "little")
    if bits >> 29:
        raise ValueError(f"bad WebP VP8L version {bits >> 29}")
    if len(body) == 5:
        raise ValueError(f"WebP VP8L chunk at byte {at} has no image data")
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1


def _webp_bitstream(chunks: list[tuple[bytes, int, bytes]], what: str) -> tuple[int, int]:
    """The size of the first VP8 or VP8L bitstream among ``chunks``, checked."""
    for kind, at, body in chunks:
        if kind == b"VP8 ":
            return _vp8(body, at)
        if kind == b"VP8L":
            return _vp8l(body, at)
    raise ValueError(f"{what} without a VP8 or VP8L bitstream")


def _webp(data: bytes) -> tuple[int, int]:
    riff = int.from_bytes(data[4:8], "little")
    if riff + 8 != len(data):
        raise ValueError(f"WebP's RIFF header gives {riff + 8} bytes, the data has {len(data)}")
    chunks = _riff_chunks(data, 12, "WebP")
    if not chunks:
        raise ValueError("WebP without chunks")
    kind, at, body = chunks[0]
    if kind in (b"VP8 ", b"VP8L"):
        return _webp_bitstream(chunks[:1], "WebP")
    if kind != b"VP8X":
        raise ValueError(f"WebP starts with chunk {kind!r}, not VP8, VP8L or VP8X")
    if len(body) < 10:
        raise ValueError(f"WebP VP8X chunk at byte {at} is cut short")
    w = int.from_bytes(body[4:7], "little") + 1
    h = int.from_bytes(body[7:10], "little") + 1
    if not body[0] & 0x02:  # a still image: its bitstream has the canvas's size
        size = _webp_bitstream(chunks[1:], "WebP (VP8X)")
        if size != (w, h):
            raise ValueError(f"WebP bitstream of {size[0]}x{size[1]} on a VP8X canvas of {w}x{h}")
        return w, h
    frames = [(a, b) for k, a, b in chunks if k == b"ANMF"]
    if not frames:
        raise ValueError("animated WebP without frames")
    for at, body in frames:
        if len(body) < 16:
            raise ValueError(f"WebP ANMF chunk at byte {at} is cut short")
        x, y = 2 * int.from_bytes(body[0:3], "little"), 2 * int.from_bytes(body[3:6], "little")
        fw = int.from_bytes(body[6:9], "little") + 1
        fh = int.from_bytes(body[9:12], "little") + 1
        what = f"WebP frame at byte {at}"
        if x + fw > w or y + fh > h:
            raise ValueError(f"{what} does not fit the canvas")
        if _webp_bitstream(_riff_chunks(body, 16, what), what) != (fw, fh):
            raise ValueError(f"{what} has a bitstream of another size")
    return w, h


# -- all formats --------------------------------------------------------------


def _sniff(data: bytes) -> str | None:
    if data.startswith(_PNG_SIG):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


_CHECK: Final = {"PNG": _png, "GIF": _gif, "JPEG": _jpeg, "WebP": _webp}


def image_size(data: bytes, mime: str) -> tuple[int, int]:
    """(width, height) of an encoded image, once its whole structure checks out.

    ``mime`` must be a supported image type naming the format the bytes are in.
    Raises ``ValueError`` for an unknown mime type, bytes in another format or
    in none, data that is cut short, corrupt or does not decode (see the module
    docstring for how far each format is checked), or a zero dimension.
    """
    declared = _FORMAT.get(mime.split(";")[0].strip().lower())
    if declared is None:
        raise ValueError(f"unsupported mime type {mime!r}")
    found = _sniff(data)
    if found is None:
        raise ValueError("not a PNG, GIF, JPEG or WebP image")
    if found != declared:
        raise ValueError(f"the data is a {found} image, not the {declared} that {mime!r} says")
    w, h = _CHECK[found](data)
    if w <= 0 or h <= 0:
        raise ValueError(f"bad image size {w}x{h}")
    return w, h


def placeholder_count(width: int, height: int) -> int:
    """Positions an image takes: one per 28x28 patch, clamped to [1, 1024]."""
    n = math.ceil(width / PATCH) * math.ceil(height / PATCH)
    return max(1, min(MAX_PLACEHOLDERS, n))
