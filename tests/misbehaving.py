"""A deliberately broken salience gRPC server, for reliability tests.

HTTP/2 comes from the ``h2`` state machine over trio sockets, in the test's own
trio run, so a test controls exactly which bytes go out and when. Each request is
answered according to a :class:`Reply` taken from a per-method plan (or the
server's default)::

    async with misbehaving_server() as srv:
        srv.plan("Generate", Reply("refuse"), Reply("refuse"))   # then the default, "ok"
        async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url) as client:
            ...
        assert [c.kind for c in srv.calls_to("Generate")] == ["refuse", "refuse", "ok"]

``Reply.kind`` is one of:

- ``"ok"``: a small well-behaved salience server (sessions are fake; Generate
  streams ``tokens`` tokens after ``first_delay`` s, ``interval`` s apart, with the
  logprob of every prompt position in a requested range but those in
  ``skip_logprobs``; a unary call is answered ``first_delay`` s late, with the
  message ``raw`` if given: the only way ``Check`` is answered but UNIMPLEMENTED);
- ``"silent"``: never answer this stream (the connection stays healthy);
- ``"hold"``: as ``"silent"``, and the server's ``held`` is ``(connection, stream id)``
  (a test then acts on that connection);
- ``"garbage"``: write an invalid HTTP/2 frame (DATA on stream 0);
- ``"http1"``: answer in HTTP/1.1, which an HTTP/2 parser reads as the header of a
  huge frame and then waits for;
- ``"wrong_content_type"``: a 200 answer with ``content-type: text/html``;
- ``"http_status"``: an answer with HTTP ``:status`` = ``status``;
- ``"trailers_only"``: HEADERS with ``grpc-status`` = ``status`` and END_STREAM;
- ``"oversized"``: a message whose length prefix says ``claimed_size`` bytes; only
  16 bytes follow and the stream stalls, unless ``send_body`` (then all of it);
- ``"refuse"``: RST_STREAM(REFUSED_STREAM) before any answer;
- ``"reset"``: RST_STREAM(``status``) — for Generate after the headers and two tokens;
- ``"goaway"``: GOAWAY(``status``, ``debug_data``) whose last stream id excludes this
  request, then close the connection;
- ``"goaway_open"``: the same GOAWAY (``first_delay`` s late), and the connection left
  open (as gRPC servers do: the client is to close it);
- ``"goaway_mid_stream"``: Generate sends its headers and two tokens (unary methods:
  nothing), then GOAWAY(``status``, ``debug_data``) with this stream as the last one
  (the server may have processed it); the connection is left open;
- ``"goaway_after"``: answer normally, then GOAWAY(NO_ERROR) and close;
- ``"malformed"``: a correctly framed message that is not valid protobuf (on
  Generate, after ``good_first`` good tokens);
- ``"close_mid_stream"``: Generate headers and three tokens, then close the TCP
  connection (unary methods: close without answering);
- ``"close"``: close the TCP connection without answering;
- ``"done_no_trailers"``: Generate streams its tokens and ``Done``, then never
  sends trailers (the stream stays open);
- ``"goaway_graceful"``: Generate sends half its tokens, then GOAWAY(NO_ERROR) with
  this stream as the last one, then the rest, ``Done`` and trailers, as a gRPC
  server shutting down gracefully does; the connection closes ``interval`` s later;
- ``"done_then_close"``: Generate streams its tokens and ``Done``, then closes the
  TCP connection (no trailers);
- ``"done_then_status"``: Generate streams its tokens and ``Done``, then trailers with
  ``grpc-status`` = ``status``;
- ``"after_done"``: Generate streams its tokens and ``Done``, then (``interval``
  seconds later) one more token;
- ``"status_after_tokens"``: Generate streams its tokens, then trailers with
  ``grpc-status`` = ``status`` (no ``Done``);
- ``"miscount"``: Generate streams its tokens, then a ``Done`` that counts one more;
- ``"no_done"``: Generate streams its tokens, then OK trailers: no ``Done``;
- ``"two_dones"``: Generate streams its tokens, two ``Done`` (in one DATA frame),
  then OK trailers;
- ``"truncated"``: a message whose length prefix promises ``claimed_size`` bytes;
  16 follow, then END_STREAM (the message is cut short by the end of the stream).
- ``"no_trailers"``: the whole answer, then END_STREAM on an empty DATA frame: no
  trailers, so no ``grpc-status``;
- ``"headers_end"``: response HEADERS (no ``grpc-status``) that end the stream;
- ``"extension_frames"``: frames a peer must ignore first (an unknown type, ORIGIN,
  ALTSVC, a 1xx informational response), then the ``"ok"`` answer;
- ``"bad_bin_trailer"``: the ``"ok"`` answer whose trailers carry a ``-bin`` value
  that is not base64;
- ``"no_status_header"``: response HEADERS without ``:status`` (then nothing);
- ``"non_ascii_header"``: response HEADERS with a byte 0xff in a header value;
- ``"push_promise"``: a PUSH_PROMISE (the client disabled push), then ``"ok"``.
- ``"status_before_request_end"``: as soon as the request's HEADERS arrive (before its
  body has), a trailers-only answer with ``grpc-status`` = ``status``; no RST_STREAM,
  and the rest of the request is never read (use with ``stall_window``);
- ``"refuse_after_answer"``: HEADERS, one good reply message and RST_STREAM
  (REFUSED_STREAM), in one write: a refusal of a call the server answered;
- ``"two_replies"`` (unary methods): two good reply messages, then nothing (the
  stream stays open);
- ``"reply_then_status"`` (unary methods): the ``"ok"`` reply, then trailers with
  ``grpc-status`` = ``status``;
- ``"reply_then_bad_header"`` (unary methods): HEADERS, the ``"ok"`` reply and
  trailers with a byte 0xff in a header value, in one write;
- ``"reply_then_big_header"`` (unary methods): HEADERS and the ``"ok"`` reply, then
  the 9-byte header of a trailers HEADERS frame of 1 MiB + 1 bytes, in one write;
- ``"reply_then_close"`` (unary methods): the ``"ok"`` reply, then close the TCP
  connection (no trailers);
- ``"dribble"``: Generate sends its ``tokens`` tokens a byte per DATA frame, each
  followed by an empty DATA frame (within the window: it must be small);
  ``"dribble_ping"`` the same with a PING after each byte instead;
- ``"ping_flood"``: stop reading the connection, then write PING frames (each one
  a client must answer) until ``claimed_size`` bytes went out or the client closes
  the connection; the server's ``flood_sent`` counts the bytes written;
- ``"continuation_flood"``: response HEADERS without END_HEADERS, then ``tokens``
  CONTINUATION frames of ``claimed_size`` bytes each (no END_HEADERS ever), written
  one at a time (the stream then stays silent);
- ``"flood"``: Generate writes its ``tokens`` tokens (each with a 128-float readout)
  as one blob, so they go out in DATA frames as big as the stream's window and the
  client's frame size allow.

``srv.calls`` records each request's headers and message (``Call.headers``,
``Call.request``: the protobuf bytes, without the gRPC length prefix).
``srv.opened`` holds every session id an OpenSession answer carried (sent or not
cut short), ``srv.closed`` every one a CloseSession asked to close.
``srv.data_sent`` counts the DATA bytes written so far, on every stream;
``srv.ping_times`` holds (connection, ``time.monotonic()``) of every PING received.

``srv.mute = True`` makes *new connections* accept TCP and never send a byte
(no SETTINGS, no PING ACK): the "black hole" server. ``srv.deaf = True`` makes the
open connections read and answer nothing more (no PING ACK): a frozen process.
"""

from __future__ import annotations

import struct
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import trio

from poc_api._proto import salience as pb
from poc_api.server._grpc import encode_done, encode_token

__all__ = ["DUMMY_BASE_URL", "Call", "MisbehavingServer", "Reply", "misbehaving_server"]

#: ApiClient needs an HTTP root; the misbehaving server only speaks gRPC.
DUMMY_BASE_URL = "http://127.0.0.1:9/v1"

Kind = Literal[
    "ok",
    "silent",
    "hold",
    "garbage",
    "http1",
    "wrong_content_type",
    "http_status",
    "trailers_only",
    "oversized",
    "refuse",
    "reset",
    "goaway",
    "goaway_open",
    "goaway_mid_stream",
    "goaway_after",
    "malformed",
    "close_mid_stream",
    "close",
    "done_no_trailers",
    "done_then_close",
    "done_then_status",
    "after_done",
    "miscount",
    "no_done",
    "two_dones",
    "status_after_tokens",
    "truncated",
    "goaway_graceful",
    "no_trailers",
    "headers_end",
    "extension_frames",
    "bad_bin_trailer",
    "no_status_header",
    "non_ascii_header",
    "push_promise",
    "flood",
    "dribble",
    "dribble_ping",
    "ping_flood",
    "continuation_flood",
    "refuse_after_answer",
    "two_replies",
    "reply_then_status",
    "reply_then_big_header",
    "reply_then_close",
    "answer_then_goaway",
    "split_then_goaway",
    "status_before_request_end",
    "reply_then_bad_header",
]

_GRPC_HEADERS = [(":status", "200"), ("content-type", "application/grpc+proto")]
_OK_TRAILERS = [("grpc-status", "0")]
_frame_len = struct.Struct(">BI").pack


def _padding(size: int) -> bytes:
    """A valid protobuf message of exactly ``size`` bytes (>= 6): one unknown field 15.

    Its length is a varint padded to five bytes, which protobuf parsers accept.
    """
    n = size - 6
    length = bytes(((n >> (7 * i)) & 0x7F) | (0x80 if i < 4 else 0) for i in range(5))
    return b"\x7a" + length + b"p" * n


@attrs.frozen
class Reply:
    """How to answer one request (see the module docstring)."""

    kind: Kind = "ok"
    status: int = 0
    tokens: int = 8
    first_delay: float = 0.0
    interval: float = 0.0
    claimed_size: int = 0
    send_body: bool = False
    good_first: int = 0  # "malformed" on Generate: this many good tokens come first
    message: str = "injected%20failure"  # "trailers_only": its grpc-message
    debug_data: bytes = b""  # "goaway", "goaway_open", "goaway_mid_stream"
    count: int = 1  # "goaway_open": this many GOAWAY frames, in one write
    skip_logprobs: tuple[int, ...] = ()  # Generate: prompt positions whose logprob is left out
    shift_logprobs: int = 0  # Generate: prefill events name their position this much too far
    raw: bytes | None = None  # "ok" on a unary method (also Check): this reply message
    session_id: str | None = None  # "ok" OpenSession: this id (None: mis-<conn>-<stream>)
    done: tuple[int, int, int] | None = None  # Generate: this Done (prompt, completion, total)


@attrs.frozen
class Call:
    """One request the server saw: method, connection number (1-based), stream id,
    and how it was answered; then what it carried (left out of its repr)."""

    method: str
    connection: int
    stream_id: int
    kind: Kind
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    request: bytes = attrs.field(default=b"", repr=False)  # the message, unframed


class MisbehavingServer:
    """State and knobs of a running misbehaving server (see :func:`misbehaving_server`)."""

    def __init__(self, default: Reply) -> None:
        self.default = default
        self.mute = False
        self.deaf = False
        #: MAX_CONCURRENT_STREAMS that new connections announce (None: h2's 100).
        self.max_streams: int | None = None
        #: INITIAL_WINDOW_SIZE that new connections announce; they then grant no
        #: flow-control credit, so a request body bigger than it stalls (None: h2's
        #: 65,535, and credit as data arrives).
        self.stall_window: int | None = None
        #: New connections announce 16 MiB stream windows and give the connection's
        #: window (HTTP/2's 65,535 to start) back a DATA frame at a time, as it
        #: arrives: each WINDOW_UPDATE is one frame's worth.
        self.trickle_window = False
        self.held: tuple[_Connection, int] | None = None  # see "hold"
        self.port = 0
        self.connections = 0
        self.calls: list[Call] = []
        #: (connection, stream_id, h2 error code) of every RST_STREAM the client sent.
        self.resets: list[tuple[int, int, int]] = []
        self.pings = 0
        self.ping_times: list[tuple[int, float]] = []
        self.data_sent = 0
        self.dribbled = False  # a "dribble" reply was sent in full
        self.flood_sent = 0  # "ping_flood": bytes of PING frames written
        self.opened: list[str] = []  # session ids OpenSession answers carried
        self.closed: list[str] = []  # session ids CloseSession asked to close
        self._plans: defaultdict[str, deque[Reply]] = defaultdict(deque)
        self._open: list[trio.SocketStream] = []

    @property
    def url(self) -> str:
        """The gRPC URL to give ``ApiClient(grpc_url=...)``."""
        return f"http://127.0.0.1:{self.port}"

    def plan(self, method: str, *replies: Reply, replace: bool = False) -> None:
        """Answer the next calls of ``method`` (``"*"``: any method) with ``replies``
        (``replace``: instead of the replies still planned for it)."""
        if replace:
            self._plans[method].clear()
        self._plans[method].extend(replies)

    def calls_to(self, method: str) -> list[Call]:
        """The calls seen for one method, in order."""
        return [c for c in self.calls if c.method == method]

    def _next_reply(self, method: str) -> Reply:
        for key in (method, "*"):
            if self._plans[key]:
                return self._plans[key].popleft()
        return self.default

    async def close_connections(self) -> None:
        """Drop every open connection (a server restart, as the client sees it)."""
        for s in list(self._open):
            await s.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self._open.append(stream)
        try:
            if self.mute:
                while await stream.receive_some(65536):
                    pass
                return
            await _Connection(self, stream, self.connections).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._open.remove(stream)
            await stream.aclose()


@asynccontextmanager
async def misbehaving_server(
    default: Reply | None = None, *, port: int = 0
) -> AsyncIterator[MisbehavingServer]:
    """Run a :class:`MisbehavingServer` on 127.0.0.1 (``port``, 0: any free one) for the block."""
    srv = MisbehavingServer(default if default is not None else Reply())
    try:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, srv._handle, port)
            srv.port = listeners[0].socket.getsockname()[1]
            try:
                yield srv
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Connection handlers never raise, so a group holds the block's own error.
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        raise exc from None


class _Connection:
    """One HTTP/2 connection: a reader loop and a task per request."""

    def __init__(self, server: MisbehavingServer, stream: trio.SocketStream, number: int) -> None:
        self.server = server
        self.stream = stream
        self.number = number
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=config)
        self.send_lock = trio.Lock()
        self.window = trio.Event()
        self.requests: dict[int, tuple[str, bytearray]] = {}
        self.headers: dict[int, tuple[tuple[str, str], ...]] = {}
        self.stall_window = server.stall_window
        self.trickle_window = server.trickle_window
        self.reading = True  # "ping_flood" stops the reader

    async def flush(self) -> None:
        async with self.send_lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def run(self) -> None:
        self.h2.initiate_connection()
        if self.server.max_streams is not None:
            self.h2.update_settings(
                {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams}
            )
        if self.trickle_window:
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 << 20})
        if self.stall_window is not None:
            self.h2.update_settings(
                {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.stall_window}
            )
        await self.flush()
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                if self.server.deaf:
                    continue
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    if self.h2.state_machine.state is h2.connection.ConnectionState.CLOSED:
                        # Frames that crossed our GOAWAY (a keepalive PING): h2
                        # refuses them; a server that went away reads on, as
                        # "goaway_open" promises (it broke off here, at times
                        # before its GOAWAY was even written).
                        continue
                    break
                for ev in events:
                    self._on_event(ev, nursery)
                try:
                    await self.flush()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not self.reading:
                    await trio.sleep_forever()  # (until the connection's tasks end)
            nursery.cancel_scope.cancel()

    def _on_event(self, ev: h2.events.Event, nursery: trio.Nursery) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            path = dict(ev.headers).get(":path", "")
            self.requests[ev.stream_id] = (str(path).rsplit("/", 1)[-1], bytearray())
            self.headers[ev.stream_id] = tuple((str(k), str(v)) for k, v in ev.headers)
            method = self.requests[ev.stream_id][0]
            plan = self.server._plans[method]
            if plan and plan[0].kind == "status_before_request_end":
                reply = plan.popleft()
                self.server.calls.append(Call(method, self.number, ev.stream_id, reply.kind))
                nursery.start_soon(self._trailers_only, ev.stream_id, method, b"", reply)
        elif isinstance(ev, h2.events.DataReceived):
            if ev.stream_id in self.requests:
                self.requests[ev.stream_id][1].extend(ev.data)
            if self.trickle_window:
                size = ev.flow_controlled_length
                if size:
                    self.h2.increment_flow_control_window(size)
                    if ev.stream_id in self.requests:
                        self.h2.increment_flow_control_window(size, ev.stream_id)
            elif self.stall_window is None:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            method, body = self.requests.pop(ev.stream_id, ("", bytearray()))
            headers = self.headers.pop(ev.stream_id, ())
            nursery.start_soon(self._respond, ev.stream_id, method, bytes(body), headers)
        elif isinstance(ev, h2.events.StreamReset):
            self.server.resets.append((self.number, ev.stream_id, int(ev.error_code)))
        elif isinstance(ev, h2.events.PingReceived):
            self.server.pings += 1
            self.server.ping_times.append((self.number, time.monotonic()))
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window.set()
            self.window = trio.Event()

    # -- sending -------------------------------------------------------------------

    async def send_headers(self, sid: int, headers: list[tuple[str, str]], end: bool) -> None:
        self.h2.send_headers(sid, headers, end_stream=end)
        await self.flush()

    async def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        view = memoryview(data)
        while view:
            size = min(
                self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size, len(view)
            )
            if size <= 0:
                await self.window.wait()
                continue
            self.h2.send_data(sid, bytes(view[:size]))
            self.server.data_sent += size
            view = view[size:]
            await self.flush()
        if end:
            self.h2.end_stream(sid)
            await self.flush()

    async def send_unary(
        self, sid: int, message: bytes, trailers: list[tuple[str, str]] | None = _OK_TRAILERS
    ) -> None:
        await self.send_headers(sid, _GRPC_HEADERS, end=False)
        await self.send_data(sid, _frame_len(0, len(message)) + message)
        if trailers is None:
            await self.send_data(sid, b"", end=True)
        else:
            await self.send_headers(sid, trailers, end=True)

    async def send_raw(self, data: bytes) -> None:
        """Bytes h2 would refuse to send, after whatever h2 has queued."""
        async with self.send_lock:
            await self.stream.send_all(self.h2.data_to_send() + data)

    async def send_raw_headers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        frame = hyperframe.frame.HeadersFrame(sid)
        frame.data = self.h2.encoder.encode(headers)  # keeps h2's HPACK table in step
        frame.flags.add("END_HEADERS")
        await self.send_raw(frame.serialize())

    async def close(self) -> None:
        await self.stream.aclose()

    # -- answering -------------------------------------------------------------------

    async def _respond(
        self, sid: int, method: str, body: bytes, headers: tuple[tuple[str, str], ...]
    ) -> None:
        reply = self.server._next_reply(method)
        self.server.calls.append(Call(method, self.number, sid, reply.kind, headers, body[5:]))
        if method == "CloseSession":
            self.server.closed.append(pb.CloseSessionRequest.parse(body[5:]).session_id)
        try:
            await getattr(self, "_" + reply.kind)(sid, method, body[5:], reply)
        except (
            h2.exceptions.StreamClosedError,
            h2.exceptions.ProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ):
            pass  # the client reset the stream or went away: nothing left to answer

    async def _ok(
        self,
        sid: int,
        method: str,
        body: bytes,
        reply: Reply,
        trailers: list[tuple[str, str]] | None = _OK_TRAILERS,
    ) -> None:
        if reply.first_delay and method != "Generate":
            await trio.sleep(reply.first_delay)  # processed, but the answer is late
        if reply.raw is not None and method != "Generate":
            await self.send_unary(sid, reply.raw, trailers)
        elif method == "OpenSession":
            session_id = reply.session_id
            if session_id is None:
                session_id = f"mis-{self.number}-{sid}"
            self.server.opened.append(session_id)
            msg = pb.OpenSessionResponse(session_id=session_id, max_length=1 << 20)
            await self.send_unary(sid, bytes(msg), trailers)
        elif method == "CloseSession":
            await self.send_unary(sid, bytes(pb.CloseSessionResponse()), trailers)
        elif method == "AppendImage":
            req = pb.AppendImageRequest.parse(body)
            msg = pb.AppendImageResponse(placeholder_count=4, total_length=req.offset + 4)
            await self.send_unary(sid, bytes(msg), trailers)
        elif method == "Generate":
            await self._generate(sid, pb.GenerateRequest.parse(body), reply, trailers=trailers)
        else:
            await self._trailers_only(sid, method, body, Reply("trailers_only", status=12))

    async def _no_trailers(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._ok(sid, method, body, reply, trailers=None)

    async def _headers_end(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self.send_headers(sid, _GRPC_HEADERS, end=True)

    async def _extension_frames(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        unknown = struct.pack(">I", 3)[1:] + bytes([0xEE, 0]) + struct.pack(">I", 0) + b"abc"
        origin = struct.pack(">I", 0)[1:] + bytes([0x0C, 0]) + struct.pack(">I", 0)
        altsvc = hyperframe.frame.AltSvcFrame(sid)
        altsvc.field = b'h2=":443"'
        await self.send_raw(unknown + origin + altsvc.serialize())
        await self.send_raw_headers(sid, [(b":status", b"100")])
        await self._ok(sid, method, body, reply)

    async def _bad_bin_trailer(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._ok(sid, method, body, reply, trailers=[*_OK_TRAILERS, ("x-trace-bin", "a")])

    async def _no_status_header(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self.send_raw_headers(sid, [(b"content-type", b"application/grpc+proto")])

    async def _push_promise(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        frame = hyperframe.frame.PushPromiseFrame(sid)
        frame.promised_stream_id = 2
        frame.data = self.h2.encoder.encode(
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x")]
        )
        frame.flags.add("END_HEADERS")
        await self.send_raw(frame.serialize())
        await self._ok(sid, method, body, reply)

    async def _non_ascii_header(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self.send_raw_headers(
            sid,
            [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-note", b"\xff")],
        )

    async def _done_no_trailers(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._generate(sid, pb.GenerateRequest.parse(body), reply, trailers=False)
        await trio.sleep_forever()

    async def _done_then_close(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._generate(sid, pb.GenerateRequest.parse(body), reply, trailers=False)
        await trio.sleep(0.05)
        await self.close()

    async def _done_then_status(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._generate(sid, pb.GenerateRequest.parse(body), reply, trailers=False)
        trailers = [("grpc-status", str(reply.status)), ("grpc-message", "injected%20failure")]
        await self.send_headers(sid, trailers, end=True)

    async def _after_done(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        req = pb.GenerateRequest.parse(body)
        await self._generate(sid, req, reply, trailers=False)
        await trio.sleep(reply.interval)
        await self.send_data(sid, encode_token(90, False, 10**6, -0.5))
        await self.send_headers(sid, _OK_TRAILERS, end=True)

    async def _status_after_tokens(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self.send_headers(sid, _GRPC_HEADERS, end=False)
        for i in range(reply.tokens):
            await self.send_data(sid, encode_token(65 + i, False, i, -0.5))
        trailers = [("grpc-status", str(reply.status)), ("grpc-message", "injected%20failure")]
        await self.send_headers(sid, trailers, end=True)

    async def _truncated(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self.send_headers(sid, _GRPC_HEADERS, end=False)
        await self.send_data(sid, _frame_len(0, reply.claimed_size) + b"\x0a" * 16, end=True)

    async def _miscount(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._generate(sid, pb.GenerateRequest.parse(body), reply, miscount=1)

    async def _no_done(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._generate(sid, pb.GenerateRequest.parse(body), reply, dones=0)

    async def _two_dones(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._generate(sid, pb.GenerateRequest.parse(body), reply, dones=2)

    async def _generate(
        self,
        sid: int,
        req: pb.GenerateRequest,
        reply: Reply,
        *,
        trailers: list[tuple[str, str]] | bool | None = True,
        miscount: int = 0,
        dones: int = 1,
    ) -> None:
        await self.send_headers(sid, _GRPC_HEADERS, end=False)
        start, end = req.offset, req.offset + len(req.append_tokens)
        prefill = b"".join(
            encode_token(req.append_tokens[p - start], True, p + reply.shift_logprobs, -1.0)
            for p in range(start, end)
            if any(r.start <= p < r.end for r in req.logprobs_ranges)
            and p not in reply.skip_logprobs
        )
        if prefill:
            await self.send_data(sid, prefill)
        n = min(reply.tokens, req.max_tokens)
        if reply.first_delay:
            await trio.sleep(reply.first_delay)
        for i in range(n):
            if i and reply.interval:
                await trio.sleep(reply.interval)
            await self.send_data(sid, encode_token(65 + i % 26, False, end + i, -0.5))
        m = n + miscount
        done = encode_done(end, m, end + m, "length" if n else "prefill")
        if reply.done is not None:
            done = encode_done(*reply.done, "length" if n else "prefill")
        await self.send_data(sid, done * dones)  # (0: nothing)
        if trailers is True:
            await self.send_headers(sid, _OK_TRAILERS, end=True)
        elif trailers is None:
            await self.send_data(sid, b"", end=True)
        elif trailers:
            await self.send_headers(sid, trailers, end=True)

    async def _flood(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        req = pb.GenerateRequest.parse(body)
        await self.send_headers(sid, _GRPC_HEADERS, end=False)
        end = req.offset + len(req.append_tokens)
        readout = [0.5] * 128  # a 512-byte readout: a ~530-byte event
        blob = b"".join(
            encode_token(65 + i % 26, False, end + i, -0.5, readout=readout)
            for i in range(reply.tokens)
        )
        await self.send_data(sid, blob)
        n = reply.tokens
        await self.send_data(sid, encode_done(end, n, end + n, "length"))
        await self.send_headers(sid, _OK_TRAILERS, end=True)

    async def _silent(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        return  # the stream stays open, unanswered, until the client resets it

    async def _hold(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        self.server.held = (self, sid)

    async def _garbage(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        # A DATA frame on stream 0: no HTTP/2 peer may accept it.
        async with self.send_lock:
            await self.stream.send_all(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00junk")

    async def _http1(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        # What a plain HTTP/1.1 server would say. Read as an HTTP/2 frame header it
        # announces a 4.7 MB frame, so a client waits for the rest: only a deadline
        # or keepalive can notice.
        async with self.send_lock:
            await self.stream.send_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

    async def _wrong_content_type(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self.send_headers(
            sid, [(":status", "200"), ("content-type", "text/html; charset=utf-8")], end=False
        )
        await self.send_data(sid, b"<html><body>not gRPC</body></html>", end=True)

    async def _http_status(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self.send_headers(
            sid, [(":status", str(reply.status)), ("content-type", "text/plain")], end=False
        )
        await self.send_data(sid, b"try again later", end=True)

    async def _trailers_only(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        headers = [
            *_GRPC_HEADERS,
            ("grpc-status", str(reply.status)),
            ("grpc-message", reply.message),
        ]
        await self.send_headers(sid, headers, end=True)

    async def _oversized(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self.send_headers(sid, _GRPC_HEADERS, end=False)
        prefix = _frame_len(0, reply.claimed_size)
        if not reply.send_body:
            await self.send_data(sid, prefix + b"\x0a" * 16)
            await trio.sleep_forever()  # the rest never comes
        await self.send_data(sid, prefix + _padding(reply.claimed_size))
        await self.send_headers(sid, _OK_TRAILERS, end=True)

    async def _ping_flood(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        self.reading = False
        ping = hyperframe.frame.PingFrame(0)
        ping.opaque_data = b"flooding"
        blob = ping.serialize() * 4096
        while self.server.flood_sent < reply.claimed_size:
            async with self.send_lock:
                await self.stream.send_all(blob)
            self.server.flood_sent += len(blob)

    async def _continuation_flood(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        headers = hyperframe.frame.HeadersFrame(sid)
        headers.data = self.h2.encoder.encode([(b":status", b"200")])
        more = hyperframe.frame.ContinuationFrame(sid)
        more.data = b"\x00" * reply.claimed_size  # (one frame, written again and again)
        blob = more.serialize()
        async with self.send_lock:
            await self.stream.send_all(self.h2.data_to_send() + headers.serialize())
            for _ in range(reply.tokens):
                await self.stream.send_all(blob)
        await trio.sleep_forever()

    async def _dribble_ping(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._dribble(sid, method, body, reply, ping=True)

    async def _dribble(
        self, sid: int, method: str, body: bytes, reply: Reply, ping: bool = False
    ) -> None:
        req = pb.GenerateRequest.parse(body)
        await self.send_headers(sid, _GRPC_HEADERS, end=False)
        end = req.offset + len(req.append_tokens)
        blob = b"".join(encode_token(65, False, end + i, -0.5) for i in range(reply.tokens))
        for i in range(len(blob)):
            self.h2.send_data(sid, blob[i : i + 1])
            if ping:
                self.h2.ping(i.to_bytes(8, "big"))
            else:
                self.h2.send_data(sid, b"")
            self.server.data_sent += 1
            if i % 4096 == 4095:
                await self.flush()
        n = reply.tokens
        self.h2.send_data(sid, encode_done(end, n, end + n, "length"))
        await self.send_headers(sid, _OK_TRAILERS, end=True)
        self.server.dribbled = True

    def _good_reply(self, sid: int, method: str) -> bytes:
        if method == "Generate":
            return encode_token(65, False, 1, -0.5)
        session_id = f"mis-{self.number}-{sid}"
        self.server.opened.append(session_id)
        msg = pb.OpenSessionResponse(session_id=session_id, max_length=1 << 20)
        return _frame_len(0, len(bytes(msg))) + bytes(msg)

    async def _refuse_after_answer(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        self.h2.send_headers(sid, _GRPC_HEADERS)
        self.h2.send_data(sid, self._good_reply(sid, method))
        self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
        await self.flush()

    async def _two_replies(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self.send_headers(sid, _GRPC_HEADERS, end=False)
        await self.send_data(sid, self._good_reply(sid, method) * 2)
        await trio.sleep_forever()

    async def _reply_then_status(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._ok(sid, method, body, reply, trailers=[("grpc-status", str(reply.status))])

    async def _reply_then_bad_header(
        self, sid: int, method: str, body: bytes, reply: Reply
    ) -> None:
        self.h2.send_headers(sid, _GRPC_HEADERS)
        self.h2.send_data(sid, self._good_reply(sid, method))
        frame = hyperframe.frame.HeadersFrame(sid)
        frame.data = self.h2.encoder.encode([(b"grpc-status", b"0"), (b"x-note", b"\xff")])
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        await self.send_raw(frame.serialize())

    async def _reply_then_big_header(
        self, sid: int, method: str, body: bytes, reply: Reply
    ) -> None:
        self.h2.send_headers(sid, _GRPC_HEADERS)
        self.h2.send_data(sid, self._good_reply(sid, method))
        # HEADERS (type 1), END_HEADERS | END_STREAM: its length alone is refused.
        head = ((1 << 20) + 1).to_bytes(3, "big") + bytes([0x1, 0x5]) + sid.to_bytes(4, "big")
        await self.send_raw(head)

    async def _reply_then_close(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self.send_headers(sid, _GRPC_HEADERS, end=False)
        await self.send_data(sid, self._good_reply(sid, method))
        await self.close()

    async def _answer_then_goaway(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        # The whole answer (HEADERS, reply, OK trailers), then GOAWAY(``status``) naming
        # this stream as processed, in one write; the connection is left open.
        self.h2.send_headers(sid, _GRPC_HEADERS)
        self.h2.send_data(sid, self._good_reply(sid, method))
        self.h2.send_headers(sid, _OK_TRAILERS, end_stream=True)
        self.h2.close_connection(error_code=reply.status, last_stream_id=sid)
        await self.flush()

    async def _split_then_goaway(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        # The reply's first bytes in one write; then (``interval`` s later) its rest,
        # the OK trailers and GOAWAY(``status``) naming this stream, in one write.
        message = self._good_reply(sid, method)
        self.h2.send_headers(sid, _GRPC_HEADERS)
        self.h2.send_data(sid, message[:3])
        await self.flush()
        await trio.sleep(reply.interval)
        self.h2.send_data(sid, message[3:])
        self.h2.send_headers(sid, _OK_TRAILERS, end_stream=True)
        self.h2.close_connection(error_code=reply.status, last_stream_id=sid)
        await self.flush()

    async def _refuse(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
        await self.flush()

    async def _reset(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        if method == "Generate":
            await self.send_headers(sid, _GRPC_HEADERS, end=False)
            await self.send_data(sid, encode_token(65, False, 1, -0.5))
            await self.send_data(sid, encode_token(66, False, 2, -0.5))
            await trio.sleep(0.01)
        self.h2.reset_stream(sid, reply.status)
        await self.flush()

    async def _goaway(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._goaway_open(sid, method, body, reply)
        await self.close()

    async def _goaway_open(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        if reply.first_delay:
            await trio.sleep(reply.first_delay)
        for _ in range(reply.count):
            self.h2.close_connection(
                error_code=reply.status,
                last_stream_id=max(0, sid - 2),
                additional_data=reply.debug_data or None,
            )
        await self.flush()

    async def _goaway_mid_stream(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        if method == "Generate":
            await self.send_headers(sid, _GRPC_HEADERS, end=False)
            await self.send_data(sid, encode_token(65, False, 1, -0.5))
            await self.send_data(sid, encode_token(66, False, 2, -0.5))
            await trio.sleep(0.01)
        self.h2.close_connection(
            error_code=reply.status, last_stream_id=sid, additional_data=reply.debug_data or None
        )
        await self.flush()

    async def _goaway_graceful(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        req = pb.GenerateRequest.parse(body)
        await self.send_headers(sid, _GRPC_HEADERS, end=False)
        n, end = min(reply.tokens, req.max_tokens), req.offset + len(req.append_tokens)
        for i in range(n):
            if i == n // 2:
                # Raw bytes: h2 would refuse to send anything after its own GOAWAY.
                frame = hyperframe.frame.GoAwayFrame(0)
                frame.last_stream_id, frame.error_code = sid, 0
                async with self.send_lock:
                    await self.stream.send_all(frame.serialize())
            await trio.sleep(reply.interval)
            await self.send_data(sid, encode_token(65 + i % 26, False, end + i, -0.5))
        await self.send_data(sid, encode_done(end, n, end + n, "length"))
        await self.send_headers(sid, _OK_TRAILERS, end=True)
        await trio.sleep(reply.interval)
        await self.close()

    async def _goaway_after(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self._ok(sid, method, body, reply)
        self.h2.close_connection(error_code=0, last_stream_id=sid)
        await self.flush()
        await trio.sleep(0.01)
        await self.close()

    async def _malformed(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        # A length-delimited field 1 that claims far more bytes than the message has.
        bad = b"\x0a\xff\xff\x03\x08\x01"
        await self.send_headers(sid, _GRPC_HEADERS, end=False)
        for i in range(reply.good_first if method == "Generate" else 0):
            await self.send_data(sid, encode_token(65 + i, False, i, -0.5))
        await self.send_data(sid, _frame_len(0, len(bad)) + bad)
        await self.send_headers(sid, _OK_TRAILERS, end=True)

    async def _close_mid_stream(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        if method == "Generate":
            await self.send_headers(sid, _GRPC_HEADERS, end=False)
            for i in range(3):
                await self.send_data(sid, encode_token(65 + i, False, i, -0.5))
            await trio.sleep(0.05)
        await self.close()

    async def _close(self, sid: int, method: str, body: bytes, reply: Reply) -> None:
        await self.close()
