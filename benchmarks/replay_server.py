"""A salience gRPC server for benchmarks that replays pre-encoded ``GenerateEvent``\\ s.

It does no inference: every reply is built from pre-encoded byte pieces, and the
framed replies of recent requests are cached, so the server spends its CPU on
HTTP/2 framing only and the client is what a benchmark measures.

Behaviour (enough of PROTOCOL.md for a client to run normally):

* ``OpenSession`` answers a fresh id; ``CloseSession`` succeeds. No state is kept
  and offsets are not checked.
* ``Generate``: first, for every appended position inside a ``logprobs_ranges``
  or ``readout_ranges`` entry, a prefill ``Token`` (its id, a fixed logprob, and
  the readout when the position is in a readout range); then ``max_tokens``
  decoded ``Token``\\ s (a fixed id and logprob, positions counting on from the
  prompt, a ``--readout-floats``-float readout on positions in a readout
  range); then ``Done(finish_reason="length")`` (``"prefill"`` when
  ``max_tokens = 0``).
* ``/bench.Replay/Stats`` (not part of salience) answers JSON: connections
  opened so far and open now, RPCs served, events sent, and the process CPU.

Many framed messages go out in one ``send_data`` call (grpclib splits them into
DATA frames under flow control), as a real inference server that batches its
writes would do.

Usage::

    python benchmarks/replay_server.py --gen-dir DIR [--port 0] [--readout-floats 256]

``DIR`` holds ``salience_pb2.py`` (``grpc_tools.protoc --python_out``); the
request is parsed with it (upb, in C). The server prints ``PORT <n>`` on stdout
once it listens, and exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

import grpclib.const
import grpclib.server
from grpclib.const import Cardinality
from grpclib.encoding.base import CodecBase
from grpclib.protocol import H2Protocol

TOKEN_ID = 15_043  # the id of every decoded token
LOGPROB = -0.6931  # the logprob of every event
CHUNK_BYTES = 64 * 1024  # bytes per send_data call
CACHE_BYTES = 256 * 1024 * 1024  # budget for cached replies
U32_MAX = 2**32 - 1

_f32 = struct.Struct("<f").pack
_frame_header = struct.Struct(">BI").pack


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Varints of the positions most benchmarks use, encoded once.
_POS_VARINTS = [varint(p) for p in range(1 << 16)]


def _pos_varint(p: int) -> bytes:
    return _POS_VARINTS[p] if p < 65536 else varint(p)


def _framed(message: bytes) -> bytes:
    return _frame_header(0, len(message)) + message


class _Passthrough(CodecBase):
    """Bytes in, bytes out: requests are parsed and replies encoded by hand."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


class EventEncoder:
    """Builds framed ``GenerateEvent`` messages from pre-encoded pieces.

    A decoded token differs from the next only in its position, so each event is
    ``prefix + varint(position) + suffix``, with the prefix (gRPC frame header,
    oneof tag, lengths, id) looked up by the position varint's length.
    """

    def __init__(self, readout_floats: int) -> None:
        floats = [((i * 37) % 200 - 100) / 25.0 for i in range(readout_floats)]
        packed = struct.pack(f"<{readout_floats}f", *floats)
        self.readout_field = b"\x32" + varint(len(packed)) + packed
        self.logprob_field = b"\x25" + _f32(LOGPROB)
        self._prefix: dict[tuple[int, bool], bytes] = {}

    def _decode_prefix(self, pos_len: int, readout: bool) -> bytes:
        key = (pos_len, readout)
        prefix = self._prefix.get(key)
        if prefix is None:
            head = b"\x08" + varint(TOKEN_ID) + b"\x18"
            tail = self.logprob_field + (self.readout_field if readout else b"")
            body_len = len(head) + pos_len + len(tail)
            token = b"\x0a" + varint(body_len)
            prefix = _frame_header(0, len(token) + body_len) + token + head
            self._prefix[key] = prefix
        return prefix

    def decoded(self, first: int, count: int, readout: Callable[[int], bool]) -> list[bytes]:
        """Framed decode ``Token`` events for positions ``first .. first + count - 1``."""
        plain_tail = self.logprob_field
        ro_tail = plain_tail + self.readout_field
        out = []
        prefix = self._decode_prefix
        for p in range(first, first + count):
            pv = _pos_varint(p)
            ro = readout(p)
            out.append(prefix(len(pv), ro) + pv + (ro_tail if ro else plain_tail))
        return out

    def prefill(self, token_id: int, pos: int, logprob: bool, readout: bool) -> bytes:
        """One framed prefill ``Token`` event."""
        body = b"\x08" + varint(token_id) if token_id else b""
        body += b"\x10\x01"
        if pos:
            body += b"\x18" + _pos_varint(pos)
        if logprob and pos:  # position 0 has no prefix: logprob 0, omitted on the wire
            body += self.logprob_field
        if readout:
            body += self.readout_field
        return _framed(b"\x0a" + varint(len(body)) + body)

    # Not poc_api.server's encode_done: the replay server stays a standalone script
    # that imports nothing of poc_api, so it measures no poc_api code.
    @staticmethod
    def done(prompt: int, completion: int, total: int, reason: str) -> bytes:
        """A framed ``Done`` event."""
        body = b""
        for tag, value in ((b"\x08", prompt), (b"\x10", completion), (b"\x18", total)):
            if value:
                body += tag + varint(value)
        r = reason.encode()
        body += b"\x22" + varint(len(r)) + r
        return _framed(b"\x12" + varint(len(body)) + body)


def _covered(ranges: Sequence[tuple[int, int]]) -> Callable[[int], bool]:
    if not ranges:
        return lambda _p: False
    if len(ranges) == 1:
        lo, hi = ranges[0]
        return lambda p: lo <= p < hi
    return lambda p: any(s <= p < e for s, e in ranges)


def _chunks(messages: list[bytes]) -> list[bytes]:
    """Join framed messages into ``send_data`` pieces of about CHUNK_BYTES."""
    out: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for m in messages:
        batch.append(m)
        size += len(m)
        if size >= CHUNK_BYTES:
            out.append(b"".join(batch))
            batch, size = [], 0
    if batch:
        out.append(b"".join(batch))
    return out


class _Stats:
    def __init__(self) -> None:
        self.connections_opened = 0
        self.connections_open = 0
        self.rpcs: collections.Counter[str] = collections.Counter()
        self.events = 0
        self.cache_hits = 0


class ReplayService:
    """The grpclib handler mapping."""

    def __init__(self, pb: Any, readout_floats: int, stats: _Stats) -> None:
        self._pb = pb
        self._enc = EventEncoder(readout_floats)
        self._stats = stats
        self._next_id = 0
        self._cache: collections.OrderedDict[tuple[Any, ...], tuple[list[bytes], int]] = (
            collections.OrderedDict()
        )
        self._cache_bytes = 0

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        def h(fn: Any, card: Cardinality) -> grpclib.const.Handler:
            return grpclib.const.Handler(fn, card, bytes, bytes)

        s = "/salience.Salience/"
        return {
            s + "OpenSession": h(self._open, Cardinality.UNARY_UNARY),
            s + "CloseSession": h(self._close, Cardinality.UNARY_UNARY),
            s + "AppendImage": h(self._append_image, Cardinality.UNARY_UNARY),
            s + "Generate": h(self._generate, Cardinality.UNARY_STREAM),
            "/bench.Replay/Stats": h(self._stats_rpc, Cardinality.UNARY_UNARY),
        }

    async def _open(self, stream: Any) -> None:
        await stream.recv_message()
        self._stats.rpcs["OpenSession"] += 1
        self._next_id += 1
        sid = b"r%d" % self._next_id
        await stream.send_message(b"\x0a" + varint(len(sid)) + sid)

    async def _close(self, stream: Any) -> None:
        await stream.recv_message()
        self._stats.rpcs["CloseSession"] += 1
        await stream.send_message(b"")

    async def _append_image(self, stream: Any) -> None:
        raw = await stream.recv_message()
        self._stats.rpcs["AppendImage"] += 1
        req = self._pb.AppendImageRequest.FromString(raw)
        n = 64
        await stream.send_message(
            b"\x08" + varint(n) + b"\x10" + varint(req.offset + n),
        )

    async def _stats_rpc(self, stream: Any) -> None:
        await stream.recv_message()
        st = self._stats
        t = os.times()
        body = {
            "connections_opened": st.connections_opened,
            "connections_open": st.connections_open,
            "rpcs": dict(st.rpcs),
            "events": st.events,
            "cache_hits": st.cache_hits,
            "cpu_s": t.user + t.system,
        }
        await stream.send_message(json.dumps(body).encode())

    def _reply(self, raw: bytes) -> tuple[list[bytes], int]:
        """The framed reply to a ``GenerateRequest`` as send_data pieces, and its event count."""
        req = self._pb.GenerateRequest.FromString(raw)
        lp = tuple((r.start, r.end) for r in req.logprobs_ranges if r.end > r.start)
        ro = tuple((r.start, r.end) for r in req.readout_ranges if r.end > r.start)
        offset = req.offset
        n_append = len(req.append_tokens)
        end = offset + n_append
        # Prefill events depend on the appended ids; the rest on counts only.
        needs_ids = any(s < end and e > offset for s, e in lp + ro)
        key = (
            offset,
            n_append,
            req.max_tokens,
            lp,
            ro,
            bytes(struct.pack(f"<{n_append}I", *req.append_tokens)) if needs_ids else b"",
        )
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self._stats.cache_hits += 1
            return hit
        in_lp, in_ro = _covered(lp), _covered(ro)
        messages: list[bytes] = []
        if needs_ids:
            covered = sorted({p for s, e in lp + ro for p in range(max(s, offset), min(e, end))})
            tokens = req.append_tokens
            prefill = self._enc.prefill
            messages = [prefill(tokens[p - offset], p, in_lp(p), in_ro(p)) for p in covered]
        messages += self._enc.decoded(end, req.max_tokens, in_ro)
        n_events = len(messages) + 1
        reason = "length" if req.max_tokens else "prefill"
        messages.append(self._enc.done(end, req.max_tokens, end + req.max_tokens, reason))
        reply = (_chunks(messages), n_events)
        size = sum(len(c) for c in reply[0])
        if size <= CACHE_BYTES // 4:
            self._cache[key] = reply
            self._cache_bytes += size
            while self._cache_bytes > CACHE_BYTES:
                _, (old, _n) = self._cache.popitem(last=False)
                self._cache_bytes -= sum(len(c) for c in old)
        return reply

    async def _generate(self, stream: Any) -> None:
        raw = await stream.recv_message()
        self._stats.rpcs["Generate"] += 1
        chunks, n_events = self._reply(raw)
        await stream.send_initial_metadata()
        send = stream._stream.send_data  # grpclib's raw HTTP/2 stream (private API)
        for chunk in chunks:
            await send(chunk)
        self._stats.events += n_events
        await stream.send_trailing_metadata()


class _CountingServer(grpclib.server.Server):
    """A grpclib ``Server`` that counts TCP connections."""

    def __init__(self, handlers: list[Any], stats: _Stats) -> None:
        super().__init__(handlers, codec=_Passthrough())
        self._bench_stats = stats

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        stats = self._bench_stats
        made, lost = protocol.connection_made, protocol.connection_lost

        def connection_made(transport: Any) -> None:
            stats.connections_opened += 1
            stats.connections_open += 1
            made(transport)

        def connection_lost(exc: BaseException | None) -> None:
            stats.connections_open -= 1
            lost(exc)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol


async def serve(gen_dir: str, host: str, port: int, readout_floats: int) -> None:
    """Run the server until SIGTERM/SIGINT."""
    sys.path.insert(0, gen_dir)
    import salience_pb2  # type: ignore[import-not-found]  # generated at benchmark start

    stats = _Stats()
    server = _CountingServer([ReplayService(salience_pb2, readout_floats, stats)], stats)
    await server.start(host, port)
    # grpclib's Server keeps its asyncio.Server private; the bench only reads its port.
    listening = cast(asyncio.Server | None, server._server)
    sockets = listening.sockets if listening is not None else ()
    print(f"PORT {sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-dir", required=True, help="directory holding salience_pb2.py")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--readout-floats", type=int, default=256)
    args = parser.parse_args()
    asyncio.run(serve(args.gen_dir, args.host, args.port, args.readout_floats))


if __name__ == "__main__":
    main()
