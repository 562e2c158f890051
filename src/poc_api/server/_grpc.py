"""The salience gRPC service on grpclib, plus connection/RST_STREAM observation.

Handlers take the raw grpclib ``Stream`` (not the betterproto2 ``SalienceBase``
methods) because they need the request metadata for auth. Generate events are
encoded by hand and several are written per DATA frame: betterproto2 plus one
``send_message`` per token would cap the stream far below the throughput the
client tests need.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, final

import grpclib.const
import grpclib.server
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.protocol import H2Protocol, Stream
from h2.errors import ErrorCodes
from h2.events import RequestReceived, StreamReset
from hyperframe.frame import GoAwayFrame

from .._proto.salience import (
    AppendImageRequest,
    AppendImageResponse,
    CloseSessionRequest,
    CloseSessionResponse,
    GenerateEvent,
    GenerateRequest,
    OpenSessionRequest,
    OpenSessionResponse,
)
from ._health import HealthService
from ._images import image_size, placeholder_count
from ._model import EOS, IMAGE_PAD, VOCAB_SIZE, SamplingSpec
from ._sessions import ErrorKind, Session, SessionError
from ._state import Runtime, Stats

__all__ = ["ObservedServer", "SalienceService", "encode_done", "encode_token"]

log = logging.getLogger("poc_api.server.grpc")

_STATUS: Final = {
    ErrorKind.NOT_FOUND: Status.NOT_FOUND,
    ErrorKind.FAILED_PRECONDITION: Status.FAILED_PRECONDITION,
    ErrorKind.INVALID_ARGUMENT: Status.INVALID_ARGUMENT,
    ErrorKind.OUT_OF_RANGE: Status.OUT_OF_RANGE,
    ErrorKind.RESOURCE_EXHAUSTED: Status.RESOURCE_EXHAUSTED,
}

# A status message quotes the request (a mime type, a session id): cut, so that a
# huge one does not make a trailer block that fails the client's whole connection.
_MAX_STATUS_MESSAGE: Final = 512


def _status_error(e: SessionError) -> GRPCError:
    message = e.message
    if len(message) > _MAX_STATUS_MESSAGE:
        message = message[: _MAX_STATUS_MESSAGE - 3] + "..."
    return GRPCError(_STATUS[e.kind], message)


# Flush pending events (and let the loop see RST_STREAM) this often.
_FLUSH_EVENTS: Final = 64
_FLUSH_SECONDS: Final = 0.002

_f32 = struct.Struct("<f").pack
_frame_len = struct.Struct(">BI").pack


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _frame(event_body: bytes) -> bytes:
    """A gRPC length-prefixed message holding ``GenerateEvent{<event_body>}``."""
    return _frame_len(0, len(event_body)) + event_body


def encode_token(
    token_id: int,
    is_prefill: bool,
    position: int,
    logprob: float,
    top: Sequence[tuple[int, float]] = (),
    readout: Sequence[float] = (),
) -> bytes:
    """A framed ``GenerateEvent{token: Token{...}}`` (wire-identical to betterproto2's)."""
    body = b"\x08" + _varint(token_id) if token_id else b""
    if is_prefill:
        body += b"\x10\x01"
    if position:
        body += b"\x18" + _varint(position)
    if logprob != 0.0:
        body += b"\x25" + _f32(logprob)
    for tid, lp in top:
        sub = (b"\x08" + _varint(tid) if tid else b"") + (b"\x15" + _f32(lp) if lp != 0.0 else b"")
        body += b"\x2a" + _varint(len(sub)) + sub
    if readout:
        packed = struct.pack(f"<{len(readout)}f", *readout)
        body += b"\x32" + _varint(len(packed)) + packed
    return _frame(b"\x0a" + _varint(len(body)) + body)


def encode_done(prompt: int, completion: int, total: int, reason: str) -> bytes:
    """A framed ``GenerateEvent{done: Done{...}}``."""
    body = b""
    for tag, value in ((b"\x08", prompt), (b"\x10", completion), (b"\x18", total)):
        if value:
            body += tag + _varint(value)
    r = reason.encode()
    body += b"\x22" + _varint(len(r)) + r
    return _frame(b"\x12" + _varint(len(body)) + body)


@final
class _Codec(ProtoCodec):
    """betterproto2 messages with a size limit both ways (grpclib has none)."""

    def __init__(self, max_size: int) -> None:
        self._max = max_size

    def encode(self, message: Any, message_type: Any) -> bytes:
        data = bytes(message)
        if len(data) > self._max:
            raise GRPCError(Status.RESOURCE_EXHAUSTED, f"response of {len(data)} bytes too large")
        return data

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self._max:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"request of {len(data)} bytes exceeds max_message_size {self._max}",
            )
        try:
            return message_type.parse(data)
        # betterproto2 raises what it meets: UnicodeDecodeError, KeyError, ...
        except Exception as e:
            raise GRPCError(
                Status.INTERNAL, f"cannot parse the request message: {type(e).__name__}"
            ) from None


async def _simulate_prefill(rt: Runtime, positions: int) -> None:
    """Simulated GPU time for taking ``positions`` into a session (off when 0).

    Checked before the append so that a request cancelled while "computing"
    appends nothing; skipped entirely (no await) when the delay is off.
    """
    delay_us = rt.config.prefill_delay_us
    if delay_us and positions:
        if rt.prefill_slots is not None:
            async with rt.prefill_slots:
                await asyncio.sleep(positions * delay_us / 1e6)
            return
        await asyncio.sleep(positions * delay_us / 1e6)


def _merged(ranges: Sequence[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The union of ``ranges`` within [lo, hi), as sorted disjoint [start, end) ranges.

    A request may repeat or overlap its ranges by the hundred thousand (a 1 MB
    message): the work must follow their union, not their count times the positions.
    """
    out: list[tuple[int, int]] = []
    for s, e in sorted({(max(s, lo), min(e, hi)) for s, e in ranges if min(e, hi) > max(s, lo)}):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _positions(ranges: Sequence[tuple[int, int]], lo: int, hi: int) -> list[int]:
    """Sorted positions in [lo, hi) covered by any of ``ranges``."""
    return [p for s, e in _merged(ranges, lo, hi) for p in range(s, e)]


def _in_any(ranges: Sequence[tuple[int, int]]) -> Callable[[int], bool]:
    merged = _merged(ranges, 0, 1 << 32)  # (positions are uint32)
    if not merged:
        return lambda _p: False
    if len(merged) == 1:
        ((s0, e0),) = merged
        return lambda p: s0 <= p < e0
    starts = [s for s, _ in merged]

    def inside(p: int) -> bool:
        i = bisect.bisect_right(starts, p) - 1
        return i >= 0 and p < merged[i][1]

    return inside


_Stream = grpclib.server.Stream[Any, Any]


@final
class SalienceService:
    """grpclib handler mapping for ``salience.Salience`` backed by a :class:`Runtime`."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        def h(func: Callable[[_Stream], Any], card: Cardinality, req: Any, rep: Any) -> Any:
            return grpclib.const.Handler(func, card, req, rep)

        base = "/salience.Salience/"
        return {
            base + "OpenSession": h(
                self._open, Cardinality.UNARY_UNARY, OpenSessionRequest, OpenSessionResponse
            ),
            base + "CloseSession": h(
                self._close, Cardinality.UNARY_UNARY, CloseSessionRequest, CloseSessionResponse
            ),
            base + "AppendImage": h(
                self._append_image,
                Cardinality.UNARY_UNARY,
                AppendImageRequest,
                AppendImageResponse,
            ),
            base + "Generate": h(
                self._generate, Cardinality.UNARY_STREAM, GenerateRequest, GenerateEvent
            ),
        }

    async def _begin(self, stream: _Stream, method: str) -> Any:
        md = stream.metadata
        affinity = md.get("x-session-affinity") if md is not None else None
        self._rt.stats.rpc(method, affinity if isinstance(affinity, str) else None)
        header = md.get("authorization") if md is not None else None
        if not self._rt.authorized(header if isinstance(header, str) else None):
            raise GRPCError(Status.UNAUTHENTICATED, "missing or wrong api key")
        try:
            request = await stream.recv_message()
        except NotImplementedError:  # grpclib's answer to a compressed message
            raise GRPCError(
                Status.UNIMPLEMENTED, "compressed messages are not supported (send identity)"
            ) from None
        except AssertionError:  # grpclib's "Received less data than expected"
            raise GRPCError(Status.INTERNAL, "message shorter than its length prefix") from None
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
        return request

    async def _open(self, stream: _Stream) -> None:
        req: OpenSessionRequest = await self._begin(stream, "OpenSession")
        cfg = self._rt.config
        if req.model and req.model != cfg.model_name:
            log.debug("OpenSession for model %r served by %r", req.model, cfg.model_name)
        try:
            session = self._rt.store.open()
        except SessionError as e:
            raise _status_error(e) from None
        await stream.send_message(
            OpenSessionResponse(session_id=session.id, max_length=cfg.max_context)
        )

    async def _close(self, stream: _Stream) -> None:
        req: CloseSessionRequest = await self._begin(stream, "CloseSession")
        self._rt.store.close(req.session_id)
        await stream.send_message(CloseSessionResponse())

    async def _append_image(self, stream: _Stream) -> None:
        req: AppendImageRequest = await self._begin(stream, "AppendImage")
        try:
            with self._rt.store.use(req.session_id) as session:
                try:
                    w, h = image_size(req.image, req.mime)
                except ValueError as e:
                    raise SessionError(
                        ErrorKind.INVALID_ARGUMENT, f"cannot decode image: {e}"
                    ) from None
                n = placeholder_count(w, h)
                session.check_append(req.offset, req.truncating, n, self._rt.config.max_context)
                await _simulate_prefill(self._rt, n)
                session.append_at(req.offset, [IMAGE_PAD] * n)
                total = len(session)
        except SessionError as e:
            raise _status_error(e) from None
        await stream.send_message(AppendImageResponse(placeholder_count=n, total_length=total))

    async def _generate(self, stream: _Stream) -> None:
        req: GenerateRequest = await self._begin(stream, "Generate")
        stats = self._rt.stats
        stats.generate()
        try:
            with self._rt.store.use(req.session_id) as session:
                await _Generation(self._rt, stream, session, req).run()
        except SessionError as e:
            raise _status_error(e) from None
        except (asyncio.CancelledError, StreamTerminatedError):
            # grpclib cancels the handler task when the client sends RST_STREAM; a
            # handler waiting inside grpclib's stream wrapper (e.g. on flow control)
            # sees that as StreamTerminatedError instead.
            stats.stream_cancelled()
            raise


@final
class _Generation:
    """One Generate call: validate, append, emit prefill events, decode, Done."""

    def __init__(self, rt: Runtime, stream: _Stream, session: Session, req: GenerateRequest):
        self._rt = rt
        self._stream = stream
        self._session = session
        self._req = req
        self._pending: list[bytes] = []
        self._last_flush = time.monotonic()
        self._headers_sent = False

    async def _flush(self) -> None:
        if self._pending:
            if not self._headers_sent:
                await self._stream.send_initial_metadata()
                self._headers_sent = True
            data = b"".join(self._pending)
            self._pending.clear()
            # Many framed messages in one write; grpclib splits it into DATA
            # frames and waits on flow control. (Private API: see module doc.)
            await self._stream._stream.send_data(data)
            self._rt.stats.streamed(len(data))
        self._last_flush = time.monotonic()
        # Let the loop process incoming frames, above all RST_STREAM.
        await asyncio.sleep(0)

    async def _maybe_flush(self) -> None:
        if (
            len(self._pending) >= _FLUSH_EVENTS
            or time.monotonic() - self._last_flush > _FLUSH_SECONDS
        ):
            await self._flush()

    async def run(self) -> None:
        rt, req, session = self._rt, self._req, self._session
        cfg = rt.config
        appended = list(req.append_tokens)
        bad = [t for t in appended if t >= VOCAB_SIZE]
        if bad:
            raise SessionError(
                ErrorKind.INVALID_ARGUMENT,
                f"token id {bad[0]} out of vocabulary (size {VOCAB_SIZE})",
            )
        session.check_append(req.offset, req.truncating, len(appended), cfg.max_context)
        await _simulate_prefill(rt, len(appended))
        session.append_at(req.offset, appended)
        rt.stats.appended(len(appended))
        tokens = session.tokens
        model, readout = rt.model, rt.readout

        lp_ranges = [(r.start, r.end) for r in req.logprobs_ranges if r.end > r.start]
        ro_ranges = [(r.start, r.end) for r in req.readout_ranges if r.end > r.start]
        in_lp = _in_any(lp_ranges)
        in_ro = _in_any(ro_ranges)

        # 1. Prefill events, only for the positions this call appended.
        end = req.offset + len(appended)
        for p in _positions(lp_ranges + ro_ranges, req.offset, end):
            lp = model.logprob(tokens, p) if in_lp(p) else 0.0
            vec = readout.vector(tokens, p) if readout is not None and in_ro(p) else ()
            self._pending.append(encode_token(tokens[p], True, p, lp, (), vec))
            await self._maybe_flush()

        # 2. Decode.
        prompt_len = len(tokens)
        spec = SamplingSpec(
            temperature=max(0.0, req.temperature),
            top_k=req.top_k,
            top_p=req.top_p,
            seed=cfg.seed,
        )
        stops = frozenset(req.stop_token_ids)
        top_k = min(req.logprob_top_k, VOCAB_SIZE)
        stop_on_eos = not cfg.ignore_eos
        max_context = cfg.max_context
        budget = req.max_tokens
        token_delay = cfg.token_delay_ms / 1e3
        pending = self._pending
        completion = 0
        finish = "prefill" if budget == 0 else ""
        try:
            while not finish:
                pos = len(tokens)
                if pos >= max_context:
                    finish = "context"
                    break
                if token_delay:
                    # Simulated GPU time per decoded token: what was decoded so far
                    # goes out first, as a real server streams while it computes.
                    if pending:
                        await self._flush()
                    await asyncio.sleep(token_delay)
                dist = model.dist(tokens)
                tok = spec.pick(dist, pos, tokens)
                tokens.append(tok)
                completion += 1
                pending.append(
                    encode_token(
                        tok,
                        False,
                        pos,
                        dist.logprobs[tok],
                        dist.top(top_k) if top_k else (),
                        readout.vector(tokens, pos) if readout is not None and in_ro(pos) else (),
                    )
                )
                if tok in stops:
                    finish = "stop"
                elif tok == EOS and stop_on_eos:
                    finish = "eos"
                elif completion >= budget:
                    finish = "length"
                elif (
                    completion == 1  # the first token goes out at once
                    or len(pending) >= _FLUSH_EVENTS
                    or (not completion & 7 and time.monotonic() - self._last_flush > _FLUSH_SECONDS)
                ):
                    await self._flush()
        finally:
            rt.stats.decoded(completion)

        # 3. Done, last.
        pending.append(encode_done(prompt_len, completion, len(tokens), finish))
        await self._flush()


@final
class _ObservedProtocol(H2Protocol):
    """H2Protocol that reports connections and client RST_STREAMs to :class:`Stats`."""

    def __init__(self, stats: Stats, live: set[_ObservedProtocol], *args: Any) -> None:
        super().__init__(*args)
        self._stats = stats
        self._live = live
        self._counted = False
        self._transport: Any = None
        self._last_stream_id: int | None = None  # the GOAWAY's, once sent

    def goaway(self) -> None:
        """Send GOAWAY(NO_ERROR) naming the last stream this server will finish.

        Written as raw bytes: h2 refuses to send anything, DATA of the streams it
        still finishes included, once it has sent a GOAWAY itself.
        """
        if self._transport is None or self._transport.is_closing():
            return
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.connection._connection.highest_inbound_stream_id
        self._last_stream_id = frame.last_stream_id
        frame.error_code = 0
        self._transport.write(frame.serialize())

    def running_streams(self) -> int:
        return len(self.processor.streams)

    def close_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort_transport(self) -> None:
        """Drop the connection at once, as the kernel does for a killed process."""
        if self._transport is not None:
            self._transport.abort()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._transport = transport
        self._live.add(self)
        self._counted = True
        self._stats.connection_opened()
        original = self.processor.process_stream_reset

        def process_stream_reset(event: StreamReset) -> None:
            if event.remote_reset:
                self._stats.stream_reset(int(event.stream_id), int(event.error_code))
            original(event)

        accept = self.processor.process_request_received

        def process_request_received(event: RequestReceived) -> None:
            last = self._last_stream_id
            if last is not None and event.stream_id > last:
                # Above the GOAWAY's last stream id: the client sends it again
                # elsewhere (h2 knows nothing of the raw GOAWAY, and would run it).
                self.connection._connection.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                return
            accept(event)

        # EventsProcessor dispatches through this dict of bound methods.
        self.processor.processors[StreamReset] = process_stream_reset
        self.processor.processors[RequestReceived] = process_request_received

    def connection_lost(self, exc: BaseException | None) -> None:
        self._live.discard(self)
        try:
            super().connection_lost(exc)
        finally:
            if self._counted:
                self._counted = False
                self._stats.connection_closed()


async def close_listener(server: asyncio.AbstractServer) -> None:
    """``server.close()``, after the connections it has accepted have attached.

    ``close()`` between the accept of a connection and its handling (the next loop
    turn) leaves that connection's transport half made and unclosed: a
    ``ResourceWarning`` later, and on CPython 3.13.0 a ``TypeError`` raised in the
    garbage collector's ``__del__``, inside whatever code runs then (gh-109564,
    fixed in 3.13.1). So: stop watching the listening sockets, give the accepted
    connections their turn, then close.
    """
    if isinstance(server, asyncio.Server):  # (grpclib types its listener as the ABC)
        loop = server.get_loop()
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
        await asyncio.sleep(0)
    server.close()


@final
class _Handler(grpclib.server.Handler):
    """grpclib's ``Handler``, which also releases the stream of a call cancelled
    before its task's first step.

    grpclib's request handler releases its stream in a ``finally``; a call whose
    RST_STREAM comes in the same read as its request is cancelled before that
    ``finally`` can run, and its ``Stream`` stayed on the connection until the
    connection closed: without bound under a client that keeps one connection
    and cancels calls, and ``stop(grace=)`` waited out its grace for it.
    """

    def accept(
        self,
        stream: Stream,
        headers: Any,
        release_stream: Callable[[], Any],
    ) -> None:
        released = False

        def release_once() -> None:
            nonlocal released
            if not released:
                released = True
                release_stream()

        super().accept(stream, headers, release_once)
        self._tasks[stream].add_done_callback(lambda _: release_once())


#: How long a stopping server lets a connection flush what it has buffered.
_CLOSE_FLUSH_SECONDS: Final = 1.0


@final
class ObservedServer(grpclib.server.Server):
    """grpclib ``Server`` whose connections are :class:`_ObservedProtocol`."""

    def __init__(self, rt: Runtime) -> None:
        services: list[Any] = [SalienceService(rt), HealthService(rt.health)]
        super().__init__(services, codec=_Codec(rt.config.max_message_size))
        self._stats = rt.stats
        self.connections: set[_ObservedProtocol] = set()

    async def shutdown(self, grace: float) -> None:
        """Stop: GOAWAY on every connection, up to ``grace`` s for running calls to
        finish, then cancel what is left and close every connection."""
        assert self._server is not None
        await close_listener(self._server)  # no new connections
        # Also with no grace (as stop() says): a call the client sends as the
        # connection closes is then known unprocessed (above the last stream id),
        # sent again elsewhere, not lost with the connection.
        for conn in list(self.connections):
            conn.goaway()
        if grace > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            # Polled: grpclib has no "last stream ended" event to wait for.
            while loop.time() < deadline and self._busy():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        self.close()  # cancels the calls still running
        for conn in list(self.connections):
            conn.close_transport()
        # A transport closes once its buffered writes are flushed: that of a client
        # that stopped reading (a stopped process) never would, and would hold its
        # socket open after the loop is gone. A moment to flush, then abort.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CLOSE_FLUSH_SECONDS
        await asyncio.sleep(0)
        while self.connections and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort_transport()
        await asyncio.sleep(0)  # (their connection_lost)

    def _busy(self) -> bool:
        return any(c.running_streams() for c in self.connections)

    async def abort(self) -> None:
        """Die like a crashed process: stop listening, drop every connection at once."""
        assert self._server is not None
        await close_listener(self._server)
        self.close()
        for conn in list(self.connections):
            conn.abort_transport()

    def _protocol_factory(self) -> H2Protocol:
        # Mirrors grpclib.server.Server._protocol_factory (grpclib 0.4.x).
        self.__gc_step__()
        handler = _Handler(
            self._mapping, self._codec, self._status_details_codec, self.__dispatch__
        )
        self._handlers.add(handler)
        return _ObservedProtocol(
            self._stats, self.connections, handler, self._config, self._h2_config
        )
