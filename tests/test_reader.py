"""Tests of the transport's message reader (``_transport._Reader``).

The reader cuts gRPC's length-prefixed messages out of whole DATA chunks taken
from a real grpclib stream buffer (``grpclib.protocol.Buffer``), so these tests
feed such a buffer exactly as grpclib's connection does (``add`` per DATA
frame, ``eof`` at the end of the stream) and check what comes out: every
message, in order, however the chunks split them; the window returned for every
chunk; a clear error for a stream that ends inside a message or announces one
too large; and a read interrupted anywhere resumes without losing a byte.
End to end, every stream test of the suite reads through it too.
"""

from __future__ import annotations

import asyncio
import itertools
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from grpclib.protocol import Buffer
from hypothesis import given
from hypothesis import strategies as st

from poc_api._errors import LimitExceeded, ProtocolViolation
from poc_api._transport import _Reader


def frame(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4, "big") + message


class ListSink:
    """Collects messages; reports itself full every ``every`` pushes."""

    def __init__(self, every: int | None = None) -> None:
        self.items: list[bytes] = []
        self.every = every
        self.waits = 0

    def push(self, item: bytes) -> bool:
        self.items.append(item)
        return self.every is not None and len(self.items) % self.every == 0

    async def wait_space(self) -> None:
        self.waits += 1
        await asyncio.sleep(0)


def new_reader(
    max_size: int = 1 << 20, headers: list[tuple[str, str]] | None = None
) -> tuple[_Reader, Buffer, list[int]]:
    acks: list[int] = []
    buffer = Buffer(acks.append)
    # grpclib's Stream, as far as _Reader looks
    raw = types.SimpleNamespace(buffer=buffer, headers=headers)
    return _Reader(raw, max_size, "/salience.Salience/Generate"), buffer, acks


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(fn(), 10)

    return asyncio.run(bounded())


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


messages_st = st.lists(
    st.one_of(st.binary(max_size=40), st.binary(min_size=200, max_size=3000)), max_size=30
)


@given(
    messages=messages_st,
    cuts=st.lists(st.integers(min_value=0), max_size=40),
    padding=st.lists(st.integers(min_value=0, max_value=255), min_size=1),
    empty_frames=st.lists(st.integers(min_value=0), max_size=3),
    every=st.one_of(st.none(), st.integers(min_value=1, max_value=7)),
    trickle=st.booleans(),
)
def test_every_message_comes_out_in_order_however_the_chunks_split_them(
    messages: list[bytes],
    cuts: list[int],
    padding: list[int],
    empty_frames: list[int],
    every: int | None,
    trickle: bool,
) -> None:
    chunks = split(b"".join(frame(m) for m in messages), cuts)
    for at in empty_frames:  # DATA frames without data (maybe padded) may come too
        chunks.insert(at % (len(chunks) + 1), b"")
    windows = [len(c) + padding[i % len(padding)] for i, c in enumerate(chunks)]
    reader, buffer, acks = new_reader()
    sink = ListSink(every)

    async def main() -> None:
        if not trickle:
            for c, w in zip(chunks, windows, strict=True):
                buffer.add(c, w)
            buffer.eof()
            await reader.pump(sink)
            return

        async def feed() -> None:  # frames arrive while the reader waits for them
            for c, w in zip(chunks, windows, strict=True):
                await asyncio.sleep(0)
                buffer.add(c, w)
            buffer.eof()

        await asyncio.gather(reader.pump(sink), feed())

    run(main)
    assert sink.items == messages
    assert reader.count == len(messages)
    # Every frame's whole window goes back, once: as a frame's messages are cut
    # (what the sink took when it filled) and the rest once the next is needed.
    assert sum(acks) == sum(windows) and all(a > 0 for a in acks)
    if every is not None:
        assert sink.waits == len(messages) // every


@given(
    messages=st.lists(st.binary(max_size=300), min_size=1, max_size=10),
    end=st.integers(min_value=0),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_a_stream_that_ends_inside_a_message_is_a_protocol_violation(
    messages: list[bytes], end: int, cuts: list[int]
) -> None:
    data = b"".join(frame(m) for m in messages)
    end %= len(data) + 1
    boundaries = {0}
    for m in messages:
        boundaries.add(max(boundaries) + 5 + len(m))
    reader, buffer, _ = new_reader()
    for c in split(data[:end], cuts):
        buffer.add(c, len(c))
    buffer.eof()
    sink = ListSink()
    if end in boundaries:
        run(lambda: reader.pump(sink))
        assert len(sink.items) == sorted(boundaries).index(end)
    else:
        with pytest.raises(ProtocolViolation, match="ended inside a message"):
            run(lambda: reader.pump(sink))


@pytest.mark.parametrize("first_chunk", [3, 5, 40])
def test_an_oversized_message_is_refused_before_its_body_arrives(first_chunk: int) -> None:
    # The body never comes (nor the end of the stream): the prefix alone must do.
    reader, buffer, _ = new_reader(max_size=100)
    data = frame(b"x" * 10) + frame(b"y" * 1000)
    split_at = 15 + first_chunk
    buffer.add(data[:15], 15)
    buffer.add(data[15:split_at], first_chunk)
    if first_chunk < 5:
        buffer.add(data[split_at:20], 20 - split_at)  # the rest of the prefix
    sink = ListSink()
    with pytest.raises(LimitExceeded, match="1000-byte message; max_message_size is 100"):
        run(lambda: reader.pump(sink))
    assert sink.items == [b"x" * 10]


@pytest.mark.parametrize("headers", [None, [("grpc-encoding", "snappy")]])
def test_a_compressed_message_without_a_known_encoding_is_refused(
    headers: list[tuple[str, str]] | None,
) -> None:
    reader, buffer, _ = new_reader(headers=headers)
    buffer.add(b"\1\0\0\0\1x", 6)
    buffer.eof()
    with pytest.raises(ProtocolViolation, match="compressed"):
        run(lambda: reader.pump(ListSink()))


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_message_is_inflated(encoding: str) -> None:
    # What a C-core server with compression=grpc.Compression.Gzip sends, whatever
    # the client's grpc-accept-encoding: flag 1, grpc-encoding: gzip.
    import gzip
    import zlib

    pack = gzip.compress if encoding == "gzip" else zlib.compress
    body = pack(b"abc" * 100)
    reader, buffer, _ = new_reader(headers=[("grpc-encoding", encoding)])
    data = frame(b"plain") + b"\1" + len(body).to_bytes(4, "big") + body
    buffer.add(data, len(data))
    buffer.eof()
    sink = ListSink()
    run(lambda: reader.pump(sink))
    assert sink.items == [b"plain", b"abc" * 100]


def test_a_compressed_message_is_bounded_by_max_size_once_inflated() -> None:
    import gzip

    body = gzip.compress(b"\0" * 100_000)
    reader, buffer, _ = new_reader(max_size=1000, headers=[("grpc-encoding", "gzip")])
    data = b"\1" + len(body).to_bytes(4, "big") + body
    buffer.add(data, len(data))
    buffer.eof()
    with pytest.raises(LimitExceeded, match="inflates past max_message_size"):
        run(lambda: reader.pump(ListSink()))


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_message_with_bytes_after_its_data_is_refused(encoding: str) -> None:
    # Two gzip members: the first one's bytes came as the whole message, the
    # rest dropped without a word.
    import gzip
    import zlib

    pack = gzip.compress if encoding == "gzip" else zlib.compress
    body = pack(b"ab") + pack(b"cd")
    reader, buffer, _ = new_reader(headers=[("grpc-encoding", encoding)])
    data = b"\1" + len(body).to_bytes(4, "big") + body
    buffer.add(data, len(data))
    buffer.eof()
    sink = ListSink()
    with pytest.raises(ProtocolViolation, match="bytes after its compressed data"):
        run(lambda: reader.pump(sink))
    assert sink.items == []


@given(
    messages=st.lists(st.binary(max_size=500), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    stops=st.lists(st.integers(min_value=0), min_size=1, max_size=4),
    every=st.one_of(st.none(), st.integers(min_value=1, max_value=4)),
)
def test_a_read_interrupted_anywhere_resumes_without_losing_a_byte(
    messages: list[bytes], cuts: list[int], stops: list[int], every: int | None
) -> None:
    # What grpclib does when the connection dies under a reader: the task is
    # interrupted at whatever it awaits; the transport then reads on from the buffer.
    chunks = split(b"".join(frame(m) for m in messages), cuts)
    reader, buffer, _ = new_reader()
    sink = ListSink(every)

    async def main() -> None:
        fed = 0
        for stop in sorted(s % (len(chunks) + 1) for s in stops):
            while fed < stop:
                buffer.add(chunks[fed], len(chunks[fed]))
                fed += 1
            task = asyncio.ensure_future(reader.pump(sink))
            for _ in range(3):  # let it read what is there and wait for more
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        for c in chunks[fed:]:
            buffer.add(c, len(c))
        buffer.eof()
        await reader.pump(sink)
        await reader.pump(sink)  # at the end already: returns at once

    run(main)
    assert sink.items == messages
