"""Image checks for PNG, GIF, JPEG and WebP, on images built by hand here.

The builders make complete images: the PNG, GIF and JPEG ones decode (checked with
Pillow when they were written: pixels of one value, all colour types, bit depths and
Adam7 for PNG, a baseline greyscale JPEG); the WebP ones have a real structure around
bitstreams that are not.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poc_api.server._images import image_size, placeholder_count

# PNG's numbers spelled out here, not imported from _images: the tests build
# their images from their own reading of the spec, so a wrong table there fails.
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


# -- what a decoder would refuse is refused (PROTOCOL.md §2) ------------------

IEND = chunk(b"IEND", b"")
IMAGES = Path(__file__).parent / "images"
# Real encoders' output (Pillow 13, pypng 0.20220715): name -> (mime, size).
REAL = {
    "pillow-rgb.png": ("image/png", (7, 3)),
    "pillow-grey-alpha.png": ("image/png", (7, 3)),
    "pillow-grey16.png": ("image/png", (7, 3)),
    "pypng-palette-interlaced.png": ("image/png", (7, 3)),
    "pypng-grey-alpha16-interlaced.png": ("image/png", (7, 3)),
    "pypng-1bit-interlaced.png": ("image/png", (33, 17)),
    "pillow-baseline.jpg": ("image/jpeg", (7, 3)),
    "pillow-progressive.jpg": ("image/jpeg", (7, 3)),
    "pillow-grey.jpg": ("image/jpeg", (7, 3)),
    "pillow-cmyk.jpg": ("image/jpeg", (7, 3)),
    "pillow.gif": ("image/gif", (7, 3)),
    "pillow-animated.gif": ("image/gif", (7, 3)),
    "pillow-lossy.webp": ("image/webp", (7, 3)),
    "pillow-lossless.webp": ("image/webp", (7, 3)),
    "pillow-lossy-alpha.webp": ("image/webp", (7, 3)),
    "pillow-animated.webp": ("image/webp", (7, 3)),
}


def real(name: str) -> bytes:
    return (IMAGES / name).read_bytes()


def png_of(*chunks: bytes) -> bytes:
    return PNG_SIGNATURE + b"".join(chunks)


def png_data(raw: bytes, **ihdr_fields: int) -> bytes:
    """A 10x10 PNG (IHDR from ``ihdr_fields``) whose IDAT holds ``raw`` deflated."""
    return png_of(ihdr(10, 10, **ihdr_fields), chunk(b"IDAT", zlib.compress(raw)), IEND)


# The header-only leniency's audit: each of these had 4 placeholders.
IHDR_STUB = PNG_SIGNATURE + ihdr(56, 56)
GARBAGE_IDAT = png_of(ihdr(56, 56), chunk(b"IDAT", b"garbage, not deflate"), IEND)
# The old jpeg() of this file: tables, a frame header, an empty scan header, EOI.
JPEG_HEADERS_ONLY = (
    b"\xff\xd8"
    + b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    + b"\xff\xdb\x00\x43\x00"
    + bytes(64)
    + b"\xff\xc2\x00\x0b\x08\x00\x38\x00\x38\x01\x01\x11\x00"
    + b"\xff\xda\x00\x02"
    + b"\xff\xd9"
)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_encoders_images_are_accepted(name: str) -> None:
    mime, size = REAL[name]
    assert image_size(real(name), mime) == size


@pytest.mark.parametrize("name", sorted(REAL))
def test_every_truncation_of_a_real_image_is_refused(name: str) -> None:
    data, mime = real(name), REAL[name][0]
    for n in range(len(data)):
        with pytest.raises(ValueError):
            image_size(data[:n], mime)


@pytest.mark.parametrize("name", [n for n in sorted(REAL) if n.endswith(".png")])
def test_every_changed_byte_of_a_real_png_is_refused(name: str) -> None:
    data = real(name)
    for i in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            changed = data[:i] + bytes([data[i] ^ flip]) + data[i + 1 :]
            with pytest.raises(ValueError):
                image_size(changed, "image/png")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (IHDR_STUB, "cut short at byte 33, before its IEND"),
        (GARBAGE_IDAT, "does not inflate"),
        (png_of(ihdr(10, 10), IEND), "without an IDAT"),
        (png(10, 10)[:-12], "before its IEND"),
        (png_of(chunk(b"tEXt", b"a\x00b"), ihdr(10, 10)), "starts with chunk tEXt, not IHDR"),
        (png_of(ihdr(10, 10), ihdr(10, 10)), "second PNG IHDR"),
        (png_of(chunk(b"IHDR", b"\x00" * 12)), "IHDR of 12 bytes"),
        (png_data(png_rows(10, 10), depth=4), "bit depth 4 for colour type 2"),
        (png_data(png_rows(10, 10), colour=5), "colour type 5"),
        (png_data(png_rows(10, 10), interlace=2), "interlace method 2"),
        (png_of(ihdr(0, 10), IEND), "width 0"),
        (png_of(ihdr(10, 2**31), IEND), "height 2147483648"),
        (png_data(png_rows(10, 9)), "inflates to 279 bytes; its IHDR implies 310"),
        (png_data(png_rows(10, 11)), "more than the 310 bytes"),
        (png_data(png_rows(10, 10)[:-1]), "309 bytes; its IHDR implies 310"),
        (png_data(png_rows(10, 10, interlace=1, fill=0)), "more than the 310 bytes"),
        (png_data(png_rows(10, 10, fill=0), interlace=1), "310 bytes; its IHDR implies 320"),
        (png_data(b"\x05" + png_rows(10, 10)[1:]), "row 0 has filter type 5"),
        (png_data(png_rows(10, 10)[:-31] + b"\x07" + bytes(30)), "row 9 has filter type 7"),
        (
            png_data(png_rows(10, 10, interlace=1).replace(b"\x00\x80", b"\x09\x80"), interlace=1),
            "row 0 of Adam7 pass 1 has filter type 9",
        ),
        (
            png_of(ihdr(10, 10), chunk(b"IDAT", zlib.compress(png_rows(10, 10))[:-6]), IEND),
            "cut short: its zlib stream stops unfinished",
        ),
        (
            png_of(ihdr(10, 10), chunk(b"IDAT", zlib.compress(png_rows(10, 10))[:-1] + b"?"), IEND),
            "incorrect data check",  # the Adler-32
        ),
        (
            png_of(ihdr(10, 10), chunk(b"IDAT", zlib.compress(png_rows(10, 10)) + b"\x00"), IEND),
            "goes on after its zlib stream ends",
        ),
        (
            png_of(
                ihdr(10, 10),
                chunk(b"IDAT", zlib.compress(png_rows(10, 10))),
                chunk(b"tEXt", b"a\x00b"),
                chunk(b"IDAT", b""),
                IEND,
            ),
            "is not next to the other IDATs",
        ),
        (png_data(png_rows(10, 10, colour=3, depth=8, fill=0), colour=3), "without a PLTE"),
        (
            png_of(ihdr(10, 10, colour=3), chunk(b"PLTE", b"\x00\x00"), IEND),
            "bad PNG PLTE of 2 bytes",
        ),
        (png_of(ihdr(10, 10), chunk(b"CRIT", b""), IEND), "unknown critical PNG chunk CRIT"),
        (png_of(ihdr(10, 10), chunk(b"12ab", b""), IEND), "bad PNG chunk type b'12ab'"),
        (png(10, 10)[:-12] + chunk(b"IEND", b"x"), "IEND with 1 bytes of data"),
        (png(10, 10) + b"\x00", "1 bytes follow the PNG's IEND chunk"),
        (png_of(ihdr(30_000, 30_000, depth=16, colour=6)), "over the reference server's limit"),
    ],
    ids=[
        "ihdr-stub",
        "garbage-idat",
        "no-idat",
        "no-iend",
        "ihdr-not-first",
        "second-ihdr",
        "short-ihdr",
        "bad-depth",
        "bad-colour-type",
        "bad-interlace",
        "zero-width",
        "height-over-2**31",
        "a-row-short",
        "a-row-long",
        "a-byte-short",
        "adam7-data-as-plain",
        "plain-data-as-adam7",
        "filter-type-first-row",
        "filter-type-last-row",
        "filter-type-adam7",
        "zlib-cut-short",
        "adler32",
        "data-after-zlib",
        "idats-apart",
        "palette-without-plte",
        "short-plte",
        "unknown-critical-chunk",
        "bad-chunk-type",
        "iend-with-data",
        "bytes-after-iend",
        "decompression-bomb",
    ],
)
def test_undecodable_png_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        image_size(data, "image/png")


def test_a_png_changed_inside_a_chunk_fails_its_crc() -> None:
    data = bytearray(png(10, 10))
    data[33 + 8 + 5] ^= 0x40  # a byte of the IDAT's data
    with pytest.raises(ValueError, match="chunk IDAT at byte 33 fails its CRC check"):
        image_size(bytes(data), "image/png")
    data = bytearray(png(10, 10))
    data[-1] ^= 0x01  # IEND's CRC
    with pytest.raises(ValueError, match=r"chunk IEND at byte \d+ fails its CRC check"):
        image_size(bytes(data), "image/png")


def test_ancillary_chunks_and_split_idats_are_fine() -> None:
    z = zlib.compress(png_rows(10, 10, interlace=1))
    data = png_of(
        ihdr(10, 10, interlace=1),
        chunk(b"tEXt", b"Comment\x00hi"),
        chunk(b"IDAT", z[:5]),
        chunk(b"IDAT", b""),
        chunk(b"IDAT", z[5:]),
        chunk(b"zzZz", b"private ancillary"),
        IEND,
    )
    assert image_size(data, "image/png") == (10, 10)


PNG_FORMATS = st.sampled_from(
    [(0, d) for d in (1, 2, 4, 8, 16)]
    + [(2, 8), (2, 16), (4, 8), (4, 16), (6, 8), (6, 16)]
    + [(3, d) for d in (1, 2, 4, 8)]
)


@st.composite
def png_images(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """A PNG of any size, colour type, bit depth and interlace, with its (w, h)."""
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    colour, depth = draw(PNG_FORMATS)
    interlace = draw(st.integers(0, 1))
    fields = {"depth": depth, "colour": colour, "interlace": interlace}
    raw = png_rows(w, h, **fields, fill=0 if colour == 3 else 0x55)
    plte = chunk(b"PLTE", bytes(3 << depth)) if colour == 3 else b""
    data = png_of(ihdr(w, h, **fields), plte, chunk(b"IDAT", zlib.compress(raw)), IEND)
    return data, w, h


@given(image=png_images())
def test_any_png_layout_is_accepted(image: tuple[bytes, int, int]) -> None:
    data, w, h = image
    assert image_size(data, "image/png") == (w, h)


@given(image=png_images(), data=st.data())
def test_any_truncation_or_changed_byte_of_a_png_is_refused(
    image: tuple[bytes, int, int], data: st.DataObject
) -> None:
    png_bytes = image[0]
    cut = data.draw(st.integers(0, len(png_bytes) - 1), label="cut")
    with pytest.raises(ValueError):
        image_size(png_bytes[:cut], "image/png")
    i = data.draw(st.integers(0, len(png_bytes) - 1), label="at")
    flip = data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(ValueError):
        image_size(png_bytes[:i] + bytes([png_bytes[i] ^ flip]) + png_bytes[i + 1 :], "image/png")


@given(
    w=st.integers(1, 40),
    h=st.integers(1, 40),
    interlace=st.integers(0, 1),
    change=st.sampled_from([-2, -1, 1, 2]),
)
def test_png_data_a_byte_off_its_ihdr_size_is_refused(
    w: int, h: int, interlace: int, change: int
) -> None:
    raw = png_rows(w, h, interlace=interlace)
    raw = raw[:change] if change < 0 else raw + b"\x00" * change
    data = png_of(ihdr(w, h, interlace=interlace), chunk(b"IDAT", zlib.compress(raw)), IEND)
    with pytest.raises(ValueError, match="inflates to"):
        image_size(data, "image/png")


def jpeg_segments(data: bytes) -> list[bytes]:
    """The marker segments of a JPEG from ``jpeg()``, scan data with its SOS."""
    out, i = [], 2
    while i < len(data) - 2:
        if data[i + 1] == 0xDA:
            out.append(data[i:-2])
            break
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        out.append(data[i:end])
        i = end
    return out


J = jpeg_segments(jpeg(16, 16))  # APP0, DQT, SOF0, DHT, DHT, SOS + data
SOI, EOI = b"\xff\xd8", b"\xff\xd9"
JPEG_NO_SCAN_DATA = SOI + b"".join(J[:5]) + J[5][:10] + EOI


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (JPEG_HEADERS_ONLY, "bad JPEG scan header"),
        (JPEG_NO_SCAN_DATA, "has no entropy-coded data"),
        (SOI + b"".join(J[:5]) + EOI, "without a scan (SOS) before its EOI"),
        (b"\xff\xd8\xff\xd9", "without a scan"),
        (SOI + b"".join(J), "cut short in entropy-coded data"),
        (SOI + b"".join(J[:-1]), "cut short: no EOI"),
        (SOI + J[0] + J[1] + J[3] + J[4] + J[5] + EOI, "before any frame header"),
        (SOI + J[0] + b"".join(J[2:]) + EOI, "quantization table 0, never defined"),
        (
            SOI + b"".join(J[:5]) + J[5].replace(b"\x01\x01\x00", b"\x01\x02\x00", 1) + EOI,
            "unknown component",
        ),
        (SOI + J[0] + J[1][:-1] + b"".join(J[2:]) + EOI, "where a marker belongs"),
        (
            SOI + J[0] + J[1][:3] + b"\x42" + J[1][4:] + b"".join(J[2:]) + EOI,
            "does not match its length",
        ),
        (SOI + J[0] + J[1] + J[2] + J[3][:-1] + b"".join(J[4:]) + EOI, "where a marker belongs"),
        (SOI + J[0] + J[1] + J[2] + J[3] + b"".join(J[2:]) + EOI, "second JPEG frame header"),
        (SOI + J[0] + J[1] + b"\xff\xc5" + J[2][2:] + b"".join(J[3:]) + EOI, "hierarchical"),
        (SOI + b"\xff\xe0\x00\x40JFIF" + EOI, "runs past the data"),
        (SOI + SOI + b"".join(J) + EOI, "bad JPEG marker 0xffd8"),
        (
            SOI + J[0] + J[1] + J[2][:9] + b"\x02" + J[2][10:] + b"".join(J[3:]) + EOI,
            "bad JPEG frame header",
        ),
        (
            SOI + J[0] + J[1] + J[2][:5] + b"\x00\x00" + J[2][7:] + b"".join(J[3:]) + EOI,
            "bad image size 16x0",
        ),
    ],
    ids=[
        "headers-only",
        "sos-without-data",
        "no-sos",
        "soi-eoi",
        "no-eoi",
        "cut-before-data-ends",
        "sos-before-sof",
        "no-dqt",
        "scan-of-unknown-component",
        "dqt-one-byte-short",
        "dqt-length-wrong",
        "dht-one-byte-short",
        "second-sof",
        "hierarchical-sof5",
        "segment-past-the-end",
        "second-soi",
        "sof-component-count",
        "zero-height",
    ],
)
def test_undecodable_jpeg_is_refused(data: bytes, match: str) -> None:
    assert image_size(SOI + b"".join(J) + EOI, "image/jpeg") == (16, 16)
    with pytest.raises(ValueError, match=re.escape(match)):
        image_size(data, "image/jpeg")


def test_jpeg_bytes_after_eoi_are_not_the_images() -> None:
    # An MPF camera picture: a second JPEG after the first one's EOI.
    assert image_size(jpeg(640, 480) + jpeg(160, 120), "image/jpeg") == (640, 480)


G = gif(5, 3)
G_IMAGE = G.index(b"\x2c")  # after the header, screen descriptor and colour table


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"GIF89a" + struct.pack("<HH", 56, 56) + b"\x00\x00\x00;", "GIF without an image"),
        (G[: G_IMAGE + 11] + b"\x00;", "has no LZW data"),
        (G[:-1], "no trailer"),
        (G + b"\x00", "1 bytes follow the GIF's trailer"),
        (G[:G_IMAGE] + b"\x99" + G[G_IMAGE:], "bad GIF block type 0x99"),
        (G[: G_IMAGE + 10] + b"\x09" + G[G_IMAGE + 11 :], "LZW minimum code size 9"),
        (G[: G_IMAGE + 11] + b"\xff" + G[G_IMAGE + 12 :], "cut short inside a block's data"),
        (G[:11], "cut short in its logical screen descriptor"),
        (G[:G_IMAGE] + b"\x21\xf9\x04\x00\x00\x00", "cut short inside a block's data"),
    ],
    ids=[
        "header-only",
        "image-without-data",
        "no-trailer",
        "bytes-after-trailer",
        "bad-block",
        "bad-code-size",
        "sub-block-past-the-end",
        "short-screen-descriptor",
        "unterminated-extension",
    ],
)
def test_undecodable_gif_is_refused(data: bytes, match: str) -> None:
    assert image_size(G, "image/gif") == (5, 3)
    with pytest.raises(ValueError, match=re.escape(match)):
        image_size(data, "image/gif")


def riff(*chunks: bytes) -> bytes:
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def vp8(w: int, h: int, *, tag: int = 0x30, start: bytes = b"\x9d\x01\x2a", tail: int = 2) -> bytes:
    return riff_chunk(
        b"VP8 ", tag.to_bytes(3, "little") + start + struct.pack("<HH", w, h) + bytes(tail)
    )


def vp8l(w: int, h: int, *, version: int = 0, tail: int = 10) -> bytes:
    bits = (w - 1) | ((h - 1) << 14) | (version << 29)
    return riff_chunk(b"VP8L", b"\x2f" + bits.to_bytes(4, "little") + bytes(tail))


def vp8x(w: int, h: int, flags: int = 0) -> bytes:
    size = (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return riff_chunk(b"VP8X", bytes([flags, 0, 0, 0]) + size)


def anmf(x: int, y: int, frame: bytes, w: int, h: int) -> bytes:
    head = b"".join(v.to_bytes(3, "little") for v in (x // 2, y // 2, w - 1, h - 1))
    return riff_chunk(b"ANMF", head + b"\x00\x00\x00\x00" + frame)


ANIM = riff_chunk(b"ANIM", bytes(6))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (webp("VP8L", 10, 10)[:-1], "RIFF header gives 36 bytes, the data has 35"),
        (webp("VP8L", 10, 10) + b"\x00\x00", "RIFF header gives 36 bytes, the data has 38"),
        (riff(vp8(10, 10, tag=0x31)), "not a key frame"),
        (riff(vp8(10, 10, tail=1)), "first partition of 1 bytes leaves no data"),
        (riff(vp8(10, 10, tag=0x20)), "not shown"),
        (riff(vp8(10, 10, tag=0x1E)), "VP8 version 7"),
        (riff(vp8(10, 10, tag=0x10 | 2 << 5)), "first partition of 2 bytes"),
        (riff(vp8(10, 10, start=b"\x9d\x01\x2b")), "bad VP8 start code"),
        (riff(vp8l(10, 10, version=1)), "VP8L version 1"),
        (riff(vp8l(10, 10, tail=0)), "has no image data"),
        (riff(vp8x(10, 10)), "WebP (VP8X) without a VP8 or VP8L bitstream"),
        (riff(vp8x(10, 10), vp8l(10, 11)), "bitstream of 10x11 on a VP8X canvas of 10x10"),
        (riff(vp8x(10, 10, flags=2), ANIM), "animated WebP without frames"),
        (riff(vp8x(10, 10, flags=2), ANIM, anmf(2, 0, vp8l(9, 10), 9, 10)), "does not fit"),
        (riff(vp8x(10, 10, flags=2), ANIM, anmf(0, 0, vp8l(9, 10), 10, 10)), "another size"),
        (riff(vp8x(10, 10, flags=2), ANIM, anmf(0, 0, b"", 10, 10)), "without a VP8 or VP8L"),
        (riff(riff_chunk(b"ICCP", b"..")), "starts with chunk b'ICCP'"),
        (riff(), "WebP without chunks"),
        (riff(b"VP8L\x20\x00\x00\x00\x2f"), "runs past the data"),
    ],
    ids=[
        "cut-short",
        "bytes-after-riff",
        "vp8-not-a-key-frame",
        "vp8-no-data",
        "vp8-not-shown",
        "vp8-version",
        "vp8-partition-past-the-chunk",
        "vp8-start-code",
        "vp8l-version",
        "vp8l-no-data",
        "vp8x-without-bitstream",
        "vp8x-canvas-size",
        "animation-without-frames",
        "frame-off-the-canvas",
        "frame-size",
        "frame-without-bitstream",
        "unknown-first-chunk",
        "no-chunks",
        "chunk-past-the-end",
    ],
)
def test_undecodable_webp_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        image_size(data, "image/webp")


def test_webp_extended_formats_are_accepted() -> None:
    alpha = riff_chunk(b"ALPH", b"\x00alpha")
    assert image_size(riff(vp8x(10, 10, flags=0x10), alpha, vp8(10, 10)), "image/webp") == (
        10,
        10,
    )
    frames = anmf(0, 0, vp8l(10, 10), 10, 10) + anmf(4, 2, alpha + vp8(6, 8), 6, 8)
    assert image_size(riff(vp8x(10, 10, flags=2), ANIM, frames), "image/webp") == (10, 10)


@pytest.mark.parametrize(
    ("data", "mime", "match"),
    [
        (gif(10, 10), "image/png", "the data is a GIF image, not the PNG that 'image/png' says"),
        (png(10, 10), "image/jpeg", "a PNG image, not the JPEG"),
        (jpeg(10, 10), "image/gif", "a JPEG image, not the GIF"),
        (webp("VP8L", 10, 10), "image/png", "a WebP image, not the PNG"),
        (png(10, 10), "image/webp", "a PNG image, not the WebP"),
        (png(10, 10), "image/bmp", "unsupported mime type 'image/bmp'"),
        (b"BM" + bytes(60), "image/png", "not a PNG, GIF, JPEG or WebP image"),
    ],
    ids=[
        "gif-as-png",
        "png-as-jpeg",
        "jpeg-as-gif",
        "webp-as-png",
        "png-as-webp",
        "bmp",
        "bmp-bytes",
    ],
)
def test_the_mime_type_must_name_the_datas_format(data: bytes, mime: str, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        image_size(data, mime)


def test_mime_aliases_and_parameters_are_accepted() -> None:
    assert image_size(jpeg(10, 10), "image/jpg") == (10, 10)
    assert image_size(png(10, 10), "Image/PNG; name=x.png") == (10, 10)
