"""gRPC transport: one lazily opened grpclib channel per client, driven from trio.

Calls use grpclib's ``Channel.request`` stream API (not the generated stubs,
whose async generators keep a stream open until garbage collection), with a
pass-through codec: requests go out as bytes and replies come back as bytes, so
decoding happens in poc_api's own fast decoder on the trio side.

When a call ends without finishing — trio cancellation, an exception, or the
caller leaving a stream early — the HTTP/2 stream is reset with error code
CANCEL (grpclib itself resets with NO_ERROR, which some servers ignore). grpclib
then releases the stream, acknowledging its unread data so an abandoned stream
never eats the connection's flow-control window.

Flow control is split the way grpc-go splits it: the connection-level window is
handed back as soon as DATA arrives, the stream-level window only as the caller
consumes. An agent that stops reading its stream then holds back that stream
alone (at most ``_STREAM_WINDOW`` bytes buffered), never the other agents'
streams on the shared connection. grpclib acknowledges both on consumption, so
one unread stream could shut the whole connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import math
import os
import select
import ssl as _ssl
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import Token
from functools import partial
from types import TracebackType
from typing import Any, Final, NoReturn, Protocol, SupportsFloat, TypeVar, final
from urllib.parse import urlsplit

import attrs
import h2.connection
import h2.errors
import h2.exceptions
import h2.settings
import httpx
import trio
from grpclib.client import Channel, Handler, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import Connection, EventsProcessor, H2Protocol, _set_nodelay
from h2.events import (
    AlternativeServiceAvailable,
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingReceived,
    RemoteSettingsChanged,
    StreamEnded,
    UnknownFrameReceived,
    WindowUpdated,
)
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from hyperframe.exceptions import InvalidPaddingError
from hyperframe.frame import RstStreamFrame, WindowUpdateFrame

from . import _errors as e
from ._bridge import AsyncioBridge, BatchReceiver, Sink, StreamBlock
from ._hpack import CachingEncoder
from ._http import EXCERPT_LIMIT, key_redactor, shown_url
from ._types import check_timeout
from ._wire import RawCodec, encode_string_field

#: asyncio: undoes what a reply says the server did, for a caller that never got
#: it (see :meth:`GrpcTransport.unary`): ``orphan(reply, transport, metadata)``,
#: the transport and metadata of the call that got the reply.
Orphan = Callable[[bytes, "GrpcTransport", tuple[tuple[str, str], ...]], Awaitable[None]]

__all__ = [
    "GrpcTarget",
    "GrpcTransport",
    "KeepAlive",
    "Orphan",
    "StreamBudget",
    "backoff",
    "deadline",
    "map_grpc_error",
]

log = logging.getLogger("poc_api.grpc")

# DATA sent on a connection since its last turn that says a bulk send is on (h2's
# least, and default, maximum frame size): see _PocConnection.data_send_process.
_BULK_SEND: Final = 16_384

# A TLS 1.3 server that wants a client certificate refuses it after the handshake:
# the connection closes with no word (the alert is lost to the client's first write).
_CLIENT_CERT: Final = ", and does it want a client certificate (ssl_context_factory)"

SERVICE = "/salience.Salience/"

# Inbound flow-control windows. The stream window bounds what one unread stream
# buffers; the connection window only bounds bytes in flight (it is returned on
# receipt), so it is larger to let many streams flow at once.
_STREAM_WINDOW = 1 << 20
_CONNECTION_WINDOW = 16 << 20


def host_name_problem(host: str) -> str | None:
    """Why ``host`` (an IP address or a name) cannot be connected to, or None.

    What getaddrinfo does to a name first (IDNA) refuses an empty label or one
    longer than 63 characters: found only at the first call, as a bare
    ``UnicodeError`` with no URL in it. A space or a control character reaches
    the resolver as it is, to fail as an unknown host.
    """
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if any(c.isspace() or not c.isprintable() or c in "%/\\" for c in host):
        return "a space, control character, '%', '/' or '\\' in the host name"
    try:
        host.encode("idna")
    except UnicodeError:
        return "an empty label, or one longer than 63 characters, in the host name"
    return None


@final
@attrs.frozen
class GrpcTarget:
    """Where the gRPC endpoint is: host, port, and whether to use TLS."""

    host: str
    port: int
    tls: bool
    #: Where the URL came from when the caller did not pass it (for the errors
    #: that a wrong URL explains: no connection).
    origin: str = attrs.field(default="", eq=False)

    @classmethod
    def from_url(cls, url: str, origin: str = "") -> GrpcTarget:
        """Parse ``http://host:port`` / ``https://host:port`` (a path is ignored)."""
        parts = urlsplit(url)
        bad = f"gRPC URL must look like http://host:port, got {shown_url(url)!r}"
        if url != url.strip():
            raise ValueError(f"{bad}: it has leading or trailing whitespace (from a .env file?)")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(bad)
        if "@" in parts.netloc:
            # Credentials that would be dropped without a word: gRPC calls carry api_key.
            raise ValueError(f"{bad}: the gRPC calls send no user:password (they use api_key)")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{bad}: bad port") from None
        if port == 0:  # (asyncio would connect to it, and fail with a puzzling error)
            raise ValueError(f"{bad}: port 0, which no server listens on")
        problem = host_name_problem(parts.hostname)
        if problem is not None:
            raise ValueError(f"{bad}: {problem}")
        tls = parts.scheme == "https"
        return cls(parts.hostname, port if port is not None else (443 if tls else 80), tls, origin)

    @property
    def url(self) -> str:
        """The target as a URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def described(self) -> str:
        """The URL, and where it came from when the caller did not pass it."""
        return f"{self.url} ({self.origin})" if self.origin else self.url


_STATUS_ERRORS: dict[Status, type[e.PocApiError]] = {
    Status.UNAUTHENTICATED: e.AuthenticationError,
    Status.PERMISSION_DENIED: e.AuthenticationError,
    Status.NOT_FOUND: e.SessionNotFound,
    Status.OUT_OF_RANGE: e.ContextOverflow,
    Status.INVALID_ARGUMENT: e.InvalidRequest,
    Status.FAILED_PRECONDITION: e.OffsetMismatch,
    Status.RESOURCE_EXHAUSTED: e.ResourceExhausted,
    Status.CANCELLED: e.StreamCancelled,
    Status.UNAVAILABLE: e.ServerUnavailable,
    Status.DEADLINE_EXCEEDED: e.PocApiTimeout,
}


def map_grpc_error(exc: BaseException, method: str) -> e.PocApiError | None:
    """Translate a grpclib/h2/OS error into poc_api's tree (the one place that does).

    Returns ``None`` for exceptions that are not transport errors (they propagate
    unchanged).
    """
    name = method.rsplit("/", 1)[-1]
    if isinstance(exc, e.PocApiError):
        return exc
    if isinstance(exc, GRPCError):
        text = exc.message or ""
        if exc.status is Status.UNKNOWN and (
            text.startswith("Invalid content-type") or text.startswith("Missing content-type")
        ):
            # grpclib reports a non-gRPC answer as status UNKNOWN: it is the peer's fault.
            return e.ProtocolViolation(f"{name}: the server did not answer gRPC: {text}")
        cls = _STATUS_ERRORS.get(exc.status, e.RpcError)
        text = _excerpt(exc.message or "")
        msg = f"{name}: {exc.status.name}: {text}".rstrip(": ")
        # A session refused for a limit (too many open) was not made: safe to ask
        # again (a retry loop that keys on ``retriable`` gave up on a full server).
        full = exc.status is Status.RESOURCE_EXHAUSTED and name == "OpenSession"
        return cls(msg, grpc_status=exc.status.name, retriable=full)
    if isinstance(exc, StreamTerminatedError):
        text = str(exc)
        if _retriable_reset(exc):
            return e.ServerUnavailable(
                f"{name}: the server refused the stream: {text}", retriable=True
            )
        code = _remote_reset(exc)
        if code is not None:
            status = _RESET_STATUSES.get(code, Status.INTERNAL)
            cls = _STATUS_ERRORS.get(status, e.RpcError)
            return cls(f"{name}: {status.name}: {_ended_how(exc)}", grpc_status=status.name)
        if text == _PROTOCOL_ERROR:
            return e.ProtocolViolation(f"{name}: the server broke the HTTP/2 protocol")
        if text.startswith(f"{_PROTOCOL_ERROR}: "):
            return e.ProtocolViolation(f"{name}: {text[len(_PROTOCOL_ERROR) + 2 :]}")
        # grpclib's "Connection lost", or ours: "Connection lost: why" (_lost_reason).
        detail = text.removeprefix(_LOST) if text.startswith(_LOST) else f": {text}"
        return e.ServerUnavailable(f"{name}: connection lost{detail}", grpc_status="UNAVAILABLE")
    if isinstance(exc, asyncio.TimeoutError):
        return e.PocApiTimeout(f"{name}: deadline exceeded")
    if isinstance(exc, ConnectionRefusedError):
        # Nothing listens (yet): a restart in progress, say. Nothing was sent.
        return e.ServerUnavailable(f"{name}: cannot reach the server: {exc}", retriable=True)
    if isinstance(exc, ConnectionError | OSError):
        return e.ServerUnavailable(f"{name}: cannot reach the server: {exc}")
    if isinstance(exc, ProtocolError | h2.exceptions.ProtocolError):
        return e.ProtocolViolation(f"{name}: protocol error: {exc}")
    return None


def _connect_failure(exc: OSError, tls: bool) -> str:
    """Why a connect (TCP, then TLS) failed, for a message that goes on from it."""
    text = str(exc)
    if isinstance(exc, _ssl.SSLError) and e.alpn_refused(text):
        # nginx and Go servers without HTTP/2 end the handshake with this alert.
        return (
            "the TLS server refused ALPN 'h2' (a no_application_protocol alert): "
            "it does not speak HTTP/2, so it is no gRPC server (an HTTPS port for HTTP/1.1?)"
        )
    if isinstance(exc, _ssl.SSLError) and e.plaintext_peer(text):
        return f"{text}: {e.PLAINTEXT_PEER}"
    if not text:
        # asyncio reports a close in the TLS handshake as a bare ConnectionResetError.
        if tls and isinstance(exc, ConnectionResetError):
            return f"the connection closed in the TLS handshake ({type(exc).__name__})"
        return type(exc).__name__
    return text


def _failure_reason(exc: BaseException, url: str) -> str:
    """Why a connection attempt failed, without the URL its message may start with."""
    text = str(exc) or type(exc).__name__
    for prefix in (f"{url}: ", f"{url} "):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def _bearer_key(metadata: tuple[tuple[str, str], ...]) -> str:
    for name, value in metadata:
        if name == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return ""


def _raise_mapped(
    exc: Exception, path: str, *, closed: bool = False, redact: Callable[[str], str] | None = None
) -> NoReturn:
    """Raise ``exc`` as its :class:`PocApiError`, chained; as itself if unmapped.

    With ``closed`` (the client closed its channel), a lost connection is the
    close's doing, not the server's: it is raised as ``trio.ClosedResourceError``.
    ``redact`` cleans a server's grpc-message (of the error and of its cause).
    """
    cause: Exception = exc
    if redact is not None and isinstance(exc, GRPCError) and exc.message:
        message = redact(exc.message)
        if message != exc.message:
            # The chained cause is shown too: a clean copy stands in for it.
            cause = GRPCError(exc.status, message, exc.details)
    mapped = map_grpc_error(cause, path)
    if closed and isinstance(mapped, e.ServerUnavailable):
        raise e.closed_under_call() from cause
    if mapped is None or mapped is exc:
        raise exc
    if cause is exc:
        raise mapped from cause
    try:
        raise mapped from cause
    finally:
        # The original, key and all, would stay reachable as the implicit context
        # (suppressed from tracebacks, still shown by error trackers).
        mapped.__context__ = None


def _reset_cancel(stream: Stream[Any, Any]) -> None:
    """Reset an unfinished stream with CANCEL before grpclib resets it with NO_ERROR."""
    if not stream._send_request_done:
        return
    raw = stream._stream
    try:
        if raw.closable:
            raw.reset_nowait(h2.errors.ErrorCodes.CANCEL)
    except Exception:  # the connection is going away anyway
        log.debug("stream reset failed", exc_info=True)


@final
@attrs.frozen
class KeepAlive:
    """HTTP/2 keepalive: ping every ``time`` seconds while calls are open.

    A peer that does not answer a ping within ``timeout`` seconds (frozen,
    unplugged, stuck behind a dead NAT) gets its connection closed, which fails
    every open call with :class:`ServerUnavailable` instead of hanging forever.
    """

    time: float = 300.0
    timeout: float = 20.0
    idle: bool = True
    """Also ping while no call runs but sessions are open (between turns)."""


# How a stream above a GOAWAY's last stream id is ended: the server never processed
# it (RFC 9113 6.8, whatever the GOAWAY's error code), exactly as with REFUSED_STREAM.
_GOAWAY_REFUSED = "Received GOAWAY above this stream's id: not processed (REFUSED_STREAM)"


# What a client must ignore: frames of unknown type (RFC 9113 4.1, ORIGIN too),
# ALTSVC, and a 1xx answer before the real one.
_IGNORED_EVENTS = (UnknownFrameReceived, AlternativeServiceAvailable, InformationalResponseReceived)

# How a call that came to a channel after it was closed is ended (see _PocChannel).
_CLOSED_UNSENT = "the connection was closed before this call was sent (REFUSED_STREAM)"


def _excerpt(text: str) -> str:
    """What a server said, cut as HTTP error bodies are (EXCERPT_LIMIT characters)."""
    return text if len(text) <= EXCERPT_LIMIT else text[:EXCERPT_LIMIT] + "…"


def _code_name(code: int | None) -> str:
    """An HTTP/2 error code's name (its number when unknown)."""
    code = code or 0
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


def _closed_unsent(exc: BaseException) -> bool:
    return isinstance(exc, StreamTerminatedError) and str(exc) == _CLOSED_UNSENT


# The gRPC status of a stream the server reset (gRPC's PROTOCOL-HTTP2.md, "Errors").
# Every other code is INTERNAL: those it maps so (NO_ERROR, PROTOCOL_ERROR,
# INTERNAL_ERROR, ...), and, as in gRPC's C-core, those it does not list.
_RESET_STATUSES: Final[dict[int, Status]] = {
    h2.errors.ErrorCodes.REFUSED_STREAM: Status.UNAVAILABLE,
    h2.errors.ErrorCodes.CANCEL: Status.CANCELLED,
    h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: Status.RESOURCE_EXHAUSTED,
    h2.errors.ErrorCodes.INADEQUATE_SECURITY: Status.PERMISSION_DENIED,
}

# How grpclib words a peer's RST_STREAM; the code prints as a number or a name
# depending on the Python version.
_RESET_TEXT = "Stream reset by remote party, error_code: "


def _remote_reset(exc: BaseException) -> int | None:
    """The HTTP/2 error code of the server's RST_STREAM that ended the stream, if
    one did (one grpclib words beyond reading: INTERNAL_ERROR)."""
    text = str(exc)
    if not isinstance(exc, StreamTerminatedError) or not text.startswith(_RESET_TEXT):
        return None
    word = text[len(_RESET_TEXT) :].strip().removeprefix("ErrorCodes.")
    if word.isdigit():
        return int(word)
    return int(h2.errors.ErrorCodes.__members__.get(word, h2.errors.ErrorCodes.INTERNAL_ERROR))


def _ended_how(exc: BaseException) -> str:
    """What ended a stream, in words: the server's reset, with its code, else grpclib's reason."""
    code = _remote_reset(exc)
    if code is None:
        return str(exc)
    return f"the server reset the stream with HTTP/2 error code {_code_name(code)}"


def _retriable_reset(exc: BaseException) -> bool:
    return isinstance(exc, StreamTerminatedError) and (
        str(exc) in _UNSENT or _remote_reset(exc) == h2.errors.ErrorCodes.REFUSED_STREAM
    )


_MAX_BACKOFF = 1.0


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after ``failures`` failures in a row: ``base`` doubled each
    time, up to ``cap``. The exponent is bounded: ``base * 2 ** 1024`` is past
    float's range (an outage of a thousand failures raised OverflowError)."""
    return min(cap, base * 2.0 ** min(failures - 1, 64))


# A session whose CloseSession did not get through (its server stalled past
# close_timeout, or could not be reached) has it sent again in the background
# (GrpcTransport.close_later): first this many seconds later, the wait doubled
# each time up to _RECLOSE_MAX, for up to _RECLOSE_FOR seconds (a server's idle
# eviction frees it by then: the reference server's default is 600 s).
_RECLOSE_FIRST = 1.0
_RECLOSE_MAX = 30.0
_RECLOSE_FOR = 600.0
_RECLOSE_BATCH = 16  # re-closes in flight at once: user calls keep the other streams
# A re-close waits this long for its answer (at least reap_timeout): a server
# just back from a long stall works through its backlog first, and a re-close cut
# then would wait for the next round (up to _RECLOSE_MAX).
_RECLOSE_WAIT = 10.0
# A detached call (see GrpcTransport.unary) waits this long (at least reap_timeout)
# for a reply it has not had: a server that stalled (a GC pause, a busy host) with
# an OpenSession in hand makes the session and answers when it comes back, and a
# stream reset before then drops that answer: a session nobody could close.
_LATE_REPLY_WAIT = 60.0
# At most this many detached calls of a transport (one server's connection) wait
# so (each holds a stream and a task): past that, a give-up waits reap_timeout.
_LATE_REPLY_MAX = 64
# warn_now: one warning of a kind per endpoint this often (seconds); the rest DEBUG.
_WARN_EVERY = 60.0


@attrs.frozen
class _Unclosed:
    """A session of :meth:`GrpcTransport.close_later`."""

    give_up_at: float  # loop time
    timed_out: bool  # its close timed out (else the server could not be reached)
    metadata: tuple[tuple[str, str], ...]  # its calls' (the affinity key)


# keepalive_time doubles on each "too_many_pings" GOAWAY up to this (seconds).
_MAX_KEEPALIVE_TIME = 7200.0
_REFUSED_RETRIES = 2

# grpclib's reason for the streams of a connection that broke the protocol.
_PROTOCOL_ERROR = "Protocol error"
_LOST = "Connection lost"  # grpclib's end of a lost connection's streams
# Answers (PING and SETTINGS ACKs, 17 and 9 bytes) to a server that reads none of
# them wait in the write buffer: past this much, written since that buffer filled
# up (asyncio's high-water mark), the server is cut off. A server that reads never
# comes near it; one that floods would otherwise grow it 1:1 with its flood. (Other
# answers, RST_STREAM to frames on a stream this side reset, are not counted: a
# legitimate server's frames in flight can add up, and flow control bounds them.)
_MAX_UNREAD_ANSWERS = 1024 * 1024


def _answer_bytes(events: list[Any]) -> int:
    """The bytes h2 writes to answer these events' frames: PING and SETTINGS ACKs."""
    answers = 0
    for event in events:
        if isinstance(event, PingReceived):
            answers += 17
        elif isinstance(event, RemoteSettingsChanged):
            answers += 9
    return answers


_FLOODED = (
    "the server sends frames that need an answer (PING, SETTINGS) and reads none of the answers"
)
# A GOAWAY refuses the calls above its last stream id, and a connection that drains
# (graceful GOAWAY) the calls it has not sent yet: the server never saw them. Behind
# a proxy that ends connections every N calls that can happen more than twice to one
# call, so these have a bound of their own.
_DRAINED_RETRIES = 8
# Seconds a pool's OpenSession waits for a connection to its endpoint before it
# goes to another that is ready (a listener that never speaks HTTP/2 would hold
# it connect_timeout). A healthy server's SETTINGS come in milliseconds.
_CONNECT_HEDGE = 1.0
_UNSENT = (_GOAWAY_REFUSED, _CLOSED_UNSENT)
_T = TypeVar("_T")


def grpc_ssl_context(make: Callable[[], _ssl.SSLContext] | None) -> _ssl.SSLContext:
    """The ``SSLContext`` of a client's gRPC connections, offering ALPN ``h2``.

    ``make()``'s context, else the default one (:func:`default_ssl_context`,
    httpx's trust): the gRPC side then trusts the CAs the HTTP side trusts
    (certifi's, or those of ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set).
    grpclib's own default reads certifi's alone, so a private CA that the HTTP
    calls accepted failed every gRPC call.
    """
    if make is None:
        return default_ssl_context("grpc")
    context = made_context(make)
    # gRPC servers (grpc-go, C-core behind TLS) refuse a handshake without it.
    context.set_alpn_protocols(["h2"])
    return context


# The default contexts, made once per process (and per side, and per value of the
# variables that choose the CAs): loading certifi's CAs takes 30-45 ms, which every
# ApiClient's entry spent blocking its whole trio run, and a pool's each endpoint
# its loop thread. A side's own context, as before: httpcore sets the HTTP one's
# ALPN (http/1.1) at every connect, the gRPC one offers h2.
_DEFAULT_SSL: dict[tuple[str, str | None, str | None], _ssl.SSLContext] = {}
_DEFAULT_SSL_LOCK = threading.Lock()


def _default_ssl_key(side: str) -> tuple[str, str | None, str | None]:
    return side, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")


def cached_ssl_context(side: str) -> _ssl.SSLContext | None:
    """The default context of ``side`` ("http" or "grpc") if made already, else None."""
    return _DEFAULT_SSL.get(_default_ssl_key(side))


def default_ssl_context(side: str) -> _ssl.SSLContext:
    """httpx's default context for ``side`` ("http" or "grpc": offering ALPN
    ``h2``), made on first use (blocking: call it in a thread from trio)."""
    key = _default_ssl_key(side)
    with _DEFAULT_SSL_LOCK:
        context = _DEFAULT_SSL.get(key)
        if context is None:
            try:
                context = httpx.create_ssl_context()
            except OSError as exc:  # (ssl.SSLError too)
                _, cert_file, cert_dir = key
                raise ValueError(
                    f"the CA certificates to trust cannot be loaded (SSL_CERT_FILE="
                    f"{cert_file!r}, SSL_CERT_DIR={cert_dir!r}): {exc}"
                ) from None
            if side == "grpc":
                context.set_alpn_protocols(["h2"])
            _DEFAULT_SSL[key] = context
    return context


def made_context(make: Callable[[], _ssl.SSLContext]) -> _ssl.SSLContext:
    """``make()``, checked now: an ``ssl.SSLContext`` (``TypeError``) that can make
    client connections (``ValueError``, not an SSL error at each connect: a
    server's context, PROTOCOL_TLS_SERVER)."""
    context = make()
    if not isinstance(context, _ssl.SSLContext):
        raise TypeError(
            "ssl_context_factory must return a new ssl.SSLContext at each call, "
            f"got {type(context).__name__}"
        )
    if context.protocol == _ssl.PROTOCOL_TLS_SERVER:
        raise ValueError(
            "ssl_context_factory must make client contexts (ssl.create_default_context()), "
            "got a PROTOCOL_TLS_SERVER one"
        )
    return context


@final
class StreamBudget:
    """Calls in flight on all of one client's transports, and their bound (trio side).

    A pool has a transport per endpoint; ``max_concurrent_streams`` bounds the
    client as a whole, so they share one of these.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit: int = limit
        self.used: int = 0


@final
class GrpcTransport:
    """The gRPC side of a client: one channel, opened on first use, shared by all calls.

    After the connection is lost the next call opens a new channel. Failed
    connection attempts back off exponentially (50 ms, doubling, at most ``1 s``
    apart); a call that comes while the last attempt's backoff runs fails at once
    with a retriable :class:`ServerUnavailable` (gRPC's TRANSIENT_FAILURE: calls
    that do not wait for ready fail fast) and the first call after it tries again.
    """

    def __init__(
        self,
        bridge: AsyncioBridge,
        target: GrpcTarget,
        *,
        metadata: tuple[tuple[str, str], ...],
        max_message_size: int,
        max_buffered_bytes: int,
        keepalive: KeepAlive | None = KeepAlive(),
        connect_timeout: float = 30.0,
        reap_timeout: float = 5.0,
        max_concurrent_streams: int = 1024,
        ssl_context: _ssl.SSLContext | None = None,
        unindexed_headers: frozenset[str] = frozenset(),
        streams: StreamBudget | None = None,
    ) -> None:
        """``streams``: the client's calls in flight, shared with its other
        transports (else this transport's own, bounded by ``max_concurrent_streams``)."""
        self._bridge = bridge
        bridge.close_if_loop_dies(self._shut)
        self._target = target
        self._metadata = metadata
        # A server may quote the key it refused in grpc-message: never show it.
        self._redact = key_redactor(_bearer_key(metadata))
        # The key as a never-indexed literal (RFC 7541 §7.1.3, what h2 itself does
        # unless grpclib turns its normalisation off): out of the compression
        # context, and out of hpack's debug log, which prints what it indexes.
        self._unindexed = unindexed_headers | {"authorization"}
        self._max_message_size = max_message_size
        self._max_buffered_bytes = max_buffered_bytes
        self._keepalive = keepalive
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._reap_timeout = reap_timeout
        self._reapers: set[asyncio.Future[Any]] = set()
        # Detached calls waiting for a late reply (see unary's detach).
        self._late_waits: set[asyncio.Future[Any]] = set()
        # The grpclib streams of detached calls (no caller waits on them: probe).
        self._detached: set[Any] = set()
        # asyncio side: sessions whose CloseSession did not get through (close_later):
        # the loop time to give up at, and whether it timed out (else the server
        # could not be reached); and the task that sends them again.
        self._unclosed: dict[str, _Unclosed] = {}
        self._recloser: asyncio.Task[None] | None = None
        self._streams = streams if streams is not None else StreamBudget(max_concurrent_streams)
        self.open_streams: int = 0
        """Calls in flight on this transport (unary and streaming)."""
        self.open_sessions: int = 0
        """Sessions opened through this transport and not yet closed (trio side)."""
        self._channel: _PocChannel | None = None
        self._draining: list[Channel] = []  # after a graceful GOAWAY, until their streams end
        self._channel_was_connected = False
        self._failures = 0
        self._retry_at = 0.0  # loop time: no connection attempt before this
        self._failed_at = 0.0  # loop time of the last failed attempt
        self._last_failure = ""  # why it failed
        # The last failed attempt got no answer (connect_timeout, no SETTINGS): the
        # client's close does not try again for its re-closes (_close_unclosed).
        self._last_hung = False
        # The connection attempt in flight: calls that come meanwhile await it.
        self._attempt: asyncio.Future[None] | None = None
        self._connecting: asyncio.Future[_PocChannel] | None = None  # the attempt's task
        self._reached = 0  # connections made (asyncio side)
        self._loss_logged = -1  # _reached when the last outage was logged at WARNING
        self._loss_lock = threading.Lock()  # sessions are closed from either thread
        self._warned_until: dict[str, float] = {}  # warn_now: time.monotonic()
        self._closed = False
        self.channels_opened: int = 0
        """How many channels this transport has opened (1 unless it reconnected)."""

    @property
    def closed(self) -> bool:
        """True once the client began closing (trio side)."""
        return self._bridge.closed

    def check_run(self) -> None:
        """``RuntimeError`` unless called from the client's own trio run."""
        self._bridge.check_run()

    @property
    def target(self) -> GrpcTarget:
        """The endpoint this transport talks to."""
        return self._target

    def probe(self) -> bool:
        """asyncio: a health check of this server went unanswered: ping its
        connection now if calls are in flight on it, and close it (failing them
        with ``ServerUnavailable``) unless the answer comes within
        ``keepalive_timeout``. Keepalive alone would find a frozen server only
        after ``keepalive_time`` (300 s by default). Whether a ping went out."""
        if self._keepalive is None:
            return False
        pinged = False
        # Connections draining after a graceful GOAWAY too: their calls run on.
        for channel in (self._channel, *self._draining):
            protocol = None if channel is None else channel._protocol
            if not isinstance(protocol, _PocH2Protocol) or protocol.closed:
                continue
            # Not for detached calls alone (no caller waits on them): closed, the
            # connection would drop the late reply a stalled server still owes.
            detached = self._detached
            if any(s not in detached for s in protocol.processor.streams.values()):
                pinged |= protocol.connection.probe(self._keepalive.timeout)
        return pinged

    @property
    def connected(self) -> bool:
        """Whether a new call can go at once: a connection is up, its server's
        SETTINGS came, and it is not draining or out of stream ids (either thread)."""
        channel = self._channel
        if channel is None:
            return False
        # One read of the protocol: grpclib's close() deletes it (then the class's
        # None shows) while the trio thread may be reading.
        protocol = channel._protocol
        return (
            isinstance(protocol, _PocH2Protocol)
            and not protocol.closed
            and protocol.settings_received.is_set()
            and not protocol.draining
            and not protocol.worn_out
        )

    @property
    def reap_timeout(self) -> float:
        """How long cleanups of abandoned calls may take (the client's ``close_timeout``)."""
        return self._reap_timeout

    @property
    def url(self) -> str:
        """The endpoint's URL."""
        return self._target.url

    def warn_now(self, what: str) -> bool:
        """Whether a warning of kind ``what`` about this endpoint goes out at WARNING
        now: one a minute (either thread); the rest at DEBUG. A stalled server
        would make one per stream."""
        now = time.monotonic()
        with self._loss_lock:
            if now < self._warned_until.get(what, 0.0):
                return False
            self._warned_until[what] = now + _WARN_EVERY
            return True

    def first_loss_of_outage(self) -> bool:
        """Whether a session whose ``CloseSession`` could not reach this endpoint is
        the first since a connection to it was last made (either thread).

        That one is logged at WARNING, the rest of the outage at DEBUG: a server
        that dies under many sessions is one event, not one per session.
        """
        with self._loss_lock:
            if self._loss_logged == self._reached:
                return False
            self._loss_logged = self._reached
            return True

    def _config(self) -> Configuration:
        windows = Configuration(
            http2_connection_window_size=_CONNECTION_WINDOW,
            http2_stream_window_size=_STREAM_WINDOW,
        )
        if self._keepalive is None:
            return windows
        return dataclasses.replace(
            windows,
            _keepalive_time=self._keepalive.time,
            _keepalive_timeout=self._keepalive.timeout,
            _keepalive_permit_without_calls=False,
            # grpclib stops pinging after 2 pings without data and spaces pings by
            # 5 min by default: both would defeat detection of a frozen peer.
            _http2_max_pings_without_data=0,
            _http2_min_sent_ping_interval_without_data=self._keepalive.time,
        )

    def _too_many_pings(self, calls_open: bool, pinged: bool = True) -> None:
        """asyncio: the server closed a connection for pinging too often (GOAWAY
        ENHANCE_YOUR_CALM "too_many_pings"). As gRPC's own clients do, ping half as
        often on the connections to come: at the same rate every one would end so.

        Unless that connection was never pinged (``pinged``): no rate of pings
        would calm that server, and a longer one only finds a frozen server later.

        Unless no call ran on that connection (``calls_open``: its open streams,
        health checks and cleanups included): then a ping between calls did it,
        and the connections to come ping only during calls, at the same rate.
        gRPC's servers (C-core, grpc-go) take a ping on a connection with no call
        at most every 2 hours unless told to permit them; doubling up to that
        would have left a frozen server mid-call unnoticed for hours.
        """
        keepalive = self._keepalive
        if keepalive is None:
            return
        if not pinged:
            log.warning(
                'salience server at %s sent GOAWAY ENHANCE_YOUR_CALM "too_many_pings" '
                "on a connection poc_api sent no PING on: keepalive unchanged "
                "(keepalive_time %g s)",
                self._target.url,
                keepalive.time,
            )
            return
        if keepalive.idle and not calls_open:
            self._keepalive = attrs.evolve(keepalive, idle=False)
            log.warning(
                'salience server at %s sent GOAWAY ENHANCE_YOUR_CALM "too_many_pings" '
                "while no call ran: its new connections are pinged only during calls "
                "(keepalive_idle off for it; keepalive_time still %g s)",
                self._target.url,
                keepalive.time,
            )
            return
        if keepalive.time >= _MAX_KEEPALIVE_TIME:
            return
        # Bounded: keepalive is what finds a frozen server.
        longer = min(keepalive.time * 2, _MAX_KEEPALIVE_TIME)
        self._keepalive = attrs.evolve(keepalive, time=longer)
        log.warning(
            'salience server at %s sent GOAWAY ENHANCE_YOUR_CALM "too_many_pings": '
            "keepalive_time is now %g s (was %g s) for its new connections",
            self._target.url,
            longer,
            keepalive.time,
        )

    def _new_channel(self) -> _PocChannel:
        log.debug("opening shared salience channel: grpc_url=%s", self._target.url)
        ssl: Any = None
        if self._target.tls:
            if self._ssl_context is None:
                self._ssl_context = grpc_ssl_context(None)
            ssl = self._ssl_context
        self.channels_opened += 1
        self._channel_was_connected = False
        channel = _PocChannel(
            self._target.host,
            self._target.port,
            ssl=ssl,
            codec=RawCodec(),
            config=self._config(),
        )
        channel.before_select = self._bridge.before_select
        channel.url = self._target.url
        channel.redact = self._redact
        channel.too_many_pings = self._too_many_pings
        channel.unindexed_headers = self._unindexed
        if self._keepalive is not None and self._keepalive.idle:
            channel.sessions_open = lambda: self.open_sessions > 0
        return channel

    async def _ready_channel(
        self,
        *,
        wait_for_ready: bool = False,
        progress: _Progress | None = None,
        connect: bool = True,
    ) -> _PocChannel:
        """asyncio: the connected channel, connecting it first if need be.

        A call that comes while another one is connecting shares that attempt's
        outcome: its failure fails every call that waited for it. Within the
        backoff after a failed attempt this raises a retriable
        ``ServerUnavailable`` at once, unless ``wait_for_ready`` (health checks):
        then it waits for the backoff to pass and tries. With a ``progress.hedge``
        (a pool's OpenSession), a call still waiting for the connection after
        ``_CONNECT_HEDGE`` seconds gives up (retriable ``ServerUnavailable``,
        ``progress.left`` set) as soon as ``hedge()`` says another endpoint is
        ready; the attempt goes on. Unless ``connect`` (re-closes), a call that
        would have to make an attempt of its own fails instead (``ServerUnavailable``).
        """
        # Runs on the asyncio side, which is single-threaded: plain attributes are
        # enough. Calls share one connection attempt through ``_attempt``, not
        # through grpclib's connect lock, behind which each waiting call would try
        # again in turn once the attempt failed (and count one more failure).
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the ApiClient is closed")
            channel = self._channel
            self._sweep_draining()
            if channel is not None and (_draining(channel) or _worn_out(channel)):
                # A graceful GOAWAY, or stream ids running out: its streams finish on
                # the old connection, new calls go to a new one.
                if _draining(channel):
                    log.info("salience server at %s is draining this connection", self._target.url)
                else:
                    log.info(
                        "connection to %s is out of stream ids: opening another",
                        self._target.url,
                    )
                self._draining.append(channel)
                channel = self._channel = None
            if channel is not None and channel._connected and _settled(channel):
                return channel
            attempt = self._attempt
            if attempt is not None:
                # Its failure is this call's too; after a success (or a cancelled
                # attempt) look again.
                await self._wait_attempt(attempt, progress)
                continue
            if not connect:
                # A re-close waits for the client's calls to connect (see _reclose).
                raise e.ServerUnavailable(
                    f"{self._target.url}: not connected (left to the client's calls)",
                    retriable=True,
                )
            if channel is not None and (self._channel_was_connected or channel.shut):
                # The connection was lost (or closed): start over with a fresh channel.
                log.info("salience connection to %s lost; reconnecting", self._target.url)
                channel.close()
                channel = None
            now = asyncio.get_running_loop().time()
            delay = self._retry_at - now
            if delay > 0:
                if not wait_for_ready:
                    # The server could not be reached moments ago: failing now beats
                    # sleeping out the backoff to try again (a pool places the call
                    # elsewhere, an agent decides for itself). Nothing was sent.
                    raise e.ServerUnavailable(
                        f"{self._named} could not be reached "
                        f"{now - self._failed_at:.2g} s ago ({self._last_failure}); "
                        f"the next connection attempt will be made by the first call "
                        f"{delay:.2g} s from now (reconnect backoff)",
                        retriable=True,
                    )
                await asyncio.sleep(delay)
                continue  # another call may have connected meanwhile
            if channel is None:
                channel = self._channel = self._new_channel()
            # Made here, not in _connect: calls that come before a task runs it share it.
            attempt = self._attempt = asyncio.get_running_loop().create_future()
            # In a task of its own, which every call waits for (above): one that
            # leaves (cancelled, a health check timing out, a pool's call going to a
            # ready endpoint) no longer ends it for the others, who then started
            # over, with a fresh connect_timeout.
            task = self._connecting = asyncio.ensure_future(self._connect(channel, attempt))
            task.add_done_callback(self._connected_or_not)
            # The call that started it gets the channel it made (or its failure,
            # which _exchange counts: a server whose every connection goes away at
            # once would otherwise be reconnected to without end or backoff).
            channel = await self._wait_attempt(task, progress)
            if channel.shut or channel._protocol is None:
                # Its waiters ran first: one found it draining (or lost) and the
                # sweep closed it before this call sent anything.
                raise StreamTerminatedError(_CLOSED_UNSENT)
            return channel

    @property
    def _named(self) -> str:
        """The target for a failed connect: where its URL came from too, until it
        has been reached (then the URL was right, and the server went away)."""
        return self._target.url if self._reached else self._target.described

    def _closed_hint(self, alpn_note: str) -> str:
        """What else a server that closed before speaking HTTP/2 may be."""
        if not self._target.tls:
            # (A TLS port drops the HTTP/2 preface it cannot read as a handshake.)
            return ", and not a TLS port (then https://)"
        return "" if alpn_note else _CLIENT_CERT  # (a wrong ALPN says it all)

    def _connected_or_not(self, task: asyncio.Future[_PocChannel]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()  # its waiters have it, through the attempt

    async def _wait_attempt(self, attempt: asyncio.Future[_T], progress: _Progress | None) -> _T:
        """asyncio: the outcome of a connection attempt (its future or its task),
        never cancelled by this call's leaving; with a ``progress.hedge``, left for
        another endpoint that is ready (see :meth:`_ready_channel`)."""
        hedge = None if progress is None else progress.hedge
        if hedge is None:
            try:
                return await asyncio.shield(attempt)
            except Exception as exc:
                # Its failure is every waiter's: each its own copy (one object
                # raised in several tasks shares their tracebacks and contexts).
                raise e.own_copy(exc) from exc.__cause__
        assert progress is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = _CONNECT_HEDGE
        while True:
            done, _ = await asyncio.wait((attempt,), timeout=timeout)  # (never cancels it)
            if done:
                error = attempt.exception()
                if error is None:
                    return attempt.result()
                # Its failure is this call's too (a copy of its own, as above).
                raise e.own_copy(error) from error.__cause__
            if hedge():
                # Nothing of the call was sent: it may go to the ready endpoint.
                progress.left = True
                raise e.ServerUnavailable(
                    f"{self._target.url}: not connected after "
                    f"{loop.time() - started:.2g} s (no HTTP/2 SETTINGS yet), while "
                    "another endpoint is ready",
                    retriable=True,
                )
            timeout = _CONNECT_HEDGE / 4

    async def _connect(self, channel: _PocChannel, attempt: asyncio.Future[None]) -> _PocChannel:
        """asyncio: one connection attempt, which calls that come meanwhile share."""
        loop = asyncio.get_running_loop()
        self._last_hung = False
        try:
            # connect_timeout bounds the TCP connect and TLS handshake too (asyncio's
            # own bounds are the OS's SYN retries and 60 s for the handshake).
            started = loop.time()
            bound = asyncio.timeout(self._connect_timeout)
            try:
                async with bound:
                    protocol = await channel.__connect__()
            except OSError as exc:  # (TimeoutError is one)
                if isinstance(exc, TimeoutError) and bound.expired():
                    self._last_hung = True
                    raise e.ServerUnavailable(
                        f"{self._named}: no connection within "
                        f"connect_timeout={self._connect_timeout:g} s",
                        retriable=True,
                    ) from None
                # Refused, no route, a name that does not resolve: no connection,
                # so nothing of the call was sent and it may go again.
                why = _connect_failure(exc, self._target.tls)
                raise e.ServerUnavailable(
                    f"{self._named}: cannot connect: {why}", retriable=True
                ) from exc
            assert isinstance(protocol, _PocH2Protocol)
            # An HTTP/2 server speaks first (its SETTINGS frame). Something that
            # accepts TCP and stays silent, or answers in HTTP/1.1, would otherwise
            # hang every call until keepalive gives up.
            if not protocol.settings_received.is_set():
                # A silent peer is also what keepalive exists to catch: wait no
                # longer than a ping interval plus its timeout.
                limit = max(0.0, self._connect_timeout - (loop.time() - started))
                bound_by = f"connect_timeout={self._connect_timeout:g} s"
                if self._keepalive is not None:
                    ping = self._keepalive.time + self._keepalive.timeout
                    if ping < limit:
                        limit = ping
                        bound_by = f"keepalive_time + keepalive_timeout = {ping:g} s"
                await self._await_settings(channel, protocol, limit, bound_by)
        except Exception as exc:
            if not _closed_unsent(exc):  # not the server's failure: no backoff
                self._failures += 1
                self._failed_at = loop.time()
                self._retry_at = self._failed_at + backoff(self._failures, 0.05, _MAX_BACKOFF)
                # (Its message names the target as _named did: _reached is unchanged.)
                self._last_failure = _failure_reason(exc, self._named)
                attempt.set_exception(exc)  # for the calls that waited for it
                attempt.exception()  # (none may have: nothing to log then)
            raise
        finally:
            self._attempt = None
            if not attempt.done():
                attempt.set_result(None)
        if channel.shut:
            # Closed (by the client's close, or replaced) while this call waited
            # for it to settle: nothing of the call was sent, so it may go again.
            raise StreamTerminatedError(_CLOSED_UNSENT)
        if channel is self._channel:
            self._failures = 0
            self._retry_at = 0.0
            self._channel_was_connected = True
            self._reached += 1
        return channel

    def _sweep_draining(self) -> None:
        """Close the draining connections whose last stream has ended."""
        for channel in list(self._draining):
            protocol = channel._protocol
            if protocol is None or not channel._connected or not protocol.processor.streams:
                self._draining.remove(channel)
                channel.close()

    async def _await_settings(
        self, channel: Channel, protocol: _PocH2Protocol, limit: float, bound_by: str
    ) -> None:
        """Wait for the peer's SETTINGS; fail at once if the connection dies or the
        peer sends GOAWAY first.

        ``bound_by`` names the setting that ``limit`` comes from (for the message).
        """
        waiters = [
            asyncio.ensure_future(protocol.settings_received.wait()),
            asyncio.ensure_future(protocol.lost.wait()),
            asyncio.ensure_future(protocol.went_away_first.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if protocol.settings_received.is_set():
            return
        if channel is self._channel:
            channel.close()
            self._channel = None
        if protocol.went_away_first.is_set() and not protocol.protocol_error:
            raise e.ServerUnavailable(
                f"{self._named} sent GOAWAY before its HTTP/2 SETTINGS: it refused "
                "the connection (shutting down?)",
                retriable=True,
            )
        if protocol.lost.is_set() and not protocol.connection.ping_unanswered:
            # (Pinged while it waited, with sessions open: keepalive closing it is
            # the same silence as this wait running out, which it may come first.)
            if protocol.protocol_error:
                raise e.ProtocolViolation(
                    f"{self._named} answered, but not in HTTP/2{protocol.alpn_note}: "
                    "is it a gRPC server (an HTTP/1.1 port?)"
                )
            raise e.ServerUnavailable(
                f"{self._named} closed the connection before speaking HTTP/2"
                f"{protocol.alpn_note}: is it a gRPC server"
                f"{self._closed_hint(protocol.alpn_note)}?",
                retriable=True,
            )
        # Retriable: nothing of the call was sent (calls wait for the SETTINGS),
        # as for a connect that times out.
        self._last_hung = True
        raise e.ServerUnavailable(
            f"{self._named} accepted the connection but sent no HTTP/2 "
            f"SETTINGS within {bound_by}{protocol.alpn_note}: is it a gRPC server, "
            "and not frozen (stopped, overloaded: the kernel accepts connections for it)?",
            retriable=True,
        )

    @property
    def max_message_size(self) -> int:
        """The largest message it sends or accepts, in bytes."""
        return self._max_message_size

    def check_sendable(self, method: str, request: bytes) -> None:
        """Raise the ``LimitExceeded`` that :meth:`unary` would raise before sending
        (a message over ``max_message_size``, no call slot left), if any.

        For a caller that must tell "refused, nothing sent" from a failure on the
        way: with no checkpoint between this and the call, nothing changes between.
        """
        self._check_size(request, SERVICE + method)
        self._check_slot(method)

    def _check_slot(self, method: str) -> None:
        # A guard against runaway fan-out: one connection multiplexes every call,
        # and the server caps concurrent streams anyway (grpclib then queues).
        streams = self._streams
        if streams.used >= streams.limit:
            raise e.LimitExceeded(
                f"{method}: {streams.used} calls already in flight on this client "
                f"(max_concurrent_streams={streams.limit}; raise it, or bound your "
                "tasks' calls with a trio.CapacityLimiter)"
            )

    def _take_slot(self, method: str, *, cleanup: bool = False) -> None:
        # Cleanup (CloseSession) is never refused: refusing it would leak a session.
        if not cleanup:
            self._check_slot(method)
        self._streams.used += 1
        self.open_streams += 1

    def _give_slot(self) -> None:
        self._streams.used -= 1
        self.open_streams -= 1

    def _check_size(self, data: bytes, method: str) -> None:
        if len(data) > self._max_message_size:
            raise e.LimitExceeded(
                f"{method.rsplit('/', 1)[-1]}: message of {len(data)} bytes exceeds "
                f"max_message_size={self._max_message_size}"
            )

    async def _exchange(
        self,
        path: str,
        cardinality: Cardinality,
        request: bytes,
        sink: _SinkLike,
        progress: _Progress | None = None,
        extra_metadata: tuple[tuple[str, str], ...] = (),
        *,
        wait_for_ready: bool = False,
        connect: bool = True,
    ) -> None:
        """asyncio: one call — send ``request``, hand every reply message to ``sink``.

        Retries a stream the server refused before answering (REFUSED_STREAM: it
        was never processed), up to twice, and a call above a GOAWAY's last stream
        id (whatever its error code), one a draining connection (graceful GOAWAY)
        never sent, or one that came to a connection already closed, up to eight
        times, each on a fresh connection. On any exit
        before the call finished the stream is reset with CANCEL. Within the
        reconnect backoff the call fails at once (``ServerUnavailable``), unless
        ``wait_for_ready``: then it waits for the backoff to pass. Unless
        ``connect``, it makes no connection attempt of its own (see ``_ready_channel``).
        """
        max_size = self._max_message_size
        refused = drained = 0
        task = asyncio.current_task()
        level = 0 if task is None else task.cancelling()
        while True:
            try:
                channel = await self._ready_channel(
                    wait_for_ready=wait_for_ready,
                    progress=progress,
                    connect=connect,
                )
            except StreamTerminatedError as exc:
                # The channel was closed (replaced) while this call connected it.
                if not _closed_unsent(exc) or drained >= _DRAINED_RETRIES:
                    raise
                drained += 1
                if progress is not None:
                    progress.mark_between()
                continue
            reader: _Reader | None = None
            raw: Any = None  # grpclib.protocol.Stream, once the HEADERS are out
            protocol = channel._protocol
            assert isinstance(protocol, _PocH2Protocol)
            gate = protocol.gate
            try:
                if progress is not None:
                    progress.queued = True
                await gate.enter(path.endswith("/CloseSession"))
                if progress is not None:
                    progress.queued = False
                    progress.gate = gate
                try:
                    metadata = self._metadata + extra_metadata if extra_metadata else self._metadata
                    async with channel.request(
                        path, cardinality, bytes, bytes, metadata=metadata
                    ) as stream:
                        try:
                            protocol.sending += 1  # (see data_send_process)
                            try:
                                await stream.send_request()
                                raw = stream._stream
                                if progress is not None:
                                    # HEADERS are written: the server may act on this call.
                                    progress.raw = raw
                                    progress.mark_sent()
                                await stream.send_message(request, end=True)
                            finally:
                                protocol.sending -= 1
                            reader = _Reader(stream._stream, max_size, path)
                            await _receive(stream, reader, sink)
                        except BaseException:
                            try:
                                if raw is not None and isinstance(sink, _Collect) and sink.salvage:
                                    # A reply still in grpclib's buffer (it goes with
                                    # the stream) says what the server did too.
                                    sink.salvage_from(reader or _Reader(raw, max_size, path))
                            finally:
                                _reset_cancel(stream)
                            raise
                finally:
                    gate.leave()
            except StreamTerminatedError as exc:
                _forget_swallowed_cancels(task, level)
                if progress is not None:
                    # (Failed out of the stream queue by a GOAWAY or a lost
                    # connection: no longer waiting behind this client's calls.)
                    progress.queued = False
                ended = exc
                if raw is not None and protocol.unprocessed(raw.id) and not _retriable_reset(exc):
                    # Above a GOAWAY's last stream id: not processed, whatever ended
                    # it here (an error GOAWAY fails every stream of its connection,
                    # and a connection lost right after a GOAWAY does too).
                    ended = StreamTerminatedError(_GOAWAY_REFUSED)
                # Any answer counts, cut into messages or still in grpclib's buffer.
                received = raw is not None and (raw.headers is not None or raw.data_received > 0)
                if received and _retriable_reset(ended):
                    # "Not processed", yet it answered: it was. Sending the call
                    # again would run it twice, so this is no refusal to retry.
                    raise e.ServerUnavailable(
                        f"{path.rsplit('/', 1)[-1]}: UNAVAILABLE: {_ended_how(ended)} "
                        "after it began to answer",
                        grpc_status="UNAVAILABLE",
                    ) from exc
                # Detached (its caller gave up): never processed, there is nothing
                # to undo, and sent again it would make what nobody wants.
                detached = progress is not None and progress.reap_timer is not None
                if not received and _retriable_reset(ended) and not detached:
                    if progress is not None:
                        # Not processed: nothing of it is on the server until the
                        # next attempt's HEADERS go out (see unary's detach).
                        progress.mark_between()
                    if str(ended) in _UNSENT and drained < _DRAINED_RETRIES:
                        drained += 1
                        log.debug(
                            "%s: not sent on a connection that went away; sending it again", path
                        )
                        continue
                    if refused < _REFUSED_RETRIES:
                        refused += 1
                        log.debug("%s: stream refused by the server; retrying", path)
                        continue
                if ended is exc:
                    raise
                raise ended from exc
            return

    async def unary_in_loop(
        self,
        method: str,
        request: bytes,
        progress: _Progress | None = None,
        *,
        extra_metadata: tuple[tuple[str, str], ...] = (),
        undo: Orphan | None = None,
        connect: bool = True,
    ) -> bytes:
        """asyncio: a unary call, for code already running on the asyncio side.

        With ``undo``, a call that fails after its reply arrived (the server
        acted on it: a reset, an error status or a lost connection came after
        the answer) has ``undo(reply, ...)`` run in the background: its caller
        gets the error and nothing to undo with. Unless ``connect``, it makes no
        connection attempt of its own (``ServerUnavailable`` instead).
        """
        path = SERVICE + method
        self._check_size(request, path)
        sink = _Collect(method, salvage=undo is not None, progress=progress)
        try:
            await self._exchange(
                path,
                Cardinality.UNARY_UNARY,
                request,
                sink,
                progress,
                extra_metadata,
                connect=connect,
            )
        except BaseException as exc:
            if undo is not None and sink.items:
                self._undo_later(undo, sink.items[0], extra_metadata)
            if isinstance(exc, GRPCError) and exc.message:
                # Redacted here, not only in unary's _raise_mapped: the closes made
                # on this side (the client's, again, of an orphan) log the error.
                exc.message = self._redact(exc.message)
                exc.args = (exc.status, exc.message, exc.details)
            raise
        if not sink.items:
            raise e.ProtocolViolation(f"{method}: expected one reply message, got none")
        return sink.items[0]

    # Protected from Ctrl-C between the reply's arrival and its return: a reply
    # dropped there could be a session nobody closes.
    @trio.lowlevel.enable_ki_protection
    async def unary(
        self,
        method: str,
        request: bytes,
        *,
        timeout: float | None = None,
        orphan: Orphan | None = None,
        cleanup: bool = False,
        abortable: bool = False,
        abort_unsent: bool = False,
        extra_metadata: tuple[tuple[str, str], ...] = (),
        progress: _Progress | None = None,
    ) -> bytes:
        """Call a unary RPC; a trio checkpoint. Raises a :class:`PocApiError`.

        ``timeout`` bounds the whole call (PocApiTimeout). With ``orphan``, a call
        abandoned (cancelled or timed out) keeps running in the background (up
        to ``_LATE_REPLY_WAIT`` seconds for its reply, then ``reap_timeout``), and
        ``orphan(reply, self, extra_metadata)`` runs (on asyncio) if its reply
        comes: how an OpenSession that reached the server still gets its session
        closed, on the endpoint that made it. So does one whose reply came before
        the call failed. The client's exit waits ``reap_timeout`` for these
        cleanups. A
        ``cleanup`` call (``CloseSession``) is not cut short by Ctrl-C: the
        ``KeyboardInterrupt`` comes once it has finished. An ``abortable`` call
        (``AppendImage``) ends at once when the client's close begins; with
        ``abort_unsent`` (``OpenSession``), only if its HEADERS are not written
        yet (nothing exists on the server: the close need not wait for it).
        ``progress`` (the caller's, to learn whether the request went out) is
        made here if not given.
        """
        if progress is None:
            progress = _Progress()
        abort: bool | Callable[[], bool] = abortable or (abort_unsent and progress.unsent)
        if timeout is not None:
            # Timed out before its HEADERS were written, the call never reached the
            # server (a cancelled call not on the wire is dropped): retriable.
            with deadline(timeout, method, unsent=progress.unsent):
                return await self._unary(
                    method, request, progress, orphan, cleanup, abort, extra_metadata
                )
        return await self._unary(method, request, progress, orphan, cleanup, abort, extra_metadata)

    @trio.lowlevel.enable_ki_protection  # as unary's
    async def _unary(
        self,
        method: str,
        request: bytes,
        progress: _Progress,
        orphan: Orphan | None,
        cleanup: bool,
        abortable: bool | Callable[[], bool],
        extra_metadata: tuple[tuple[str, str], ...],
    ) -> bytes:
        path = SERVICE + method

        async def call() -> bytes:
            reply = await self.unary_in_loop(
                method, request, progress, extra_metadata=extra_metadata, undo=orphan
            )
            if progress.reap_timer is not None and orphan is not None:
                # Detached (the caller gave up after the HEADERS went out) and the
                # reply came in time: undo what the server did.
                progress.reap_timer.cancel()
                await _undo(orphan, reply, self, extra_metadata)
            return reply

        def detach(task: asyncio.Task[Any]) -> bool:
            # The caller gave up. A call never on the wire is simply cancelled
            # (nothing exists on the server); one that may have reached the server
            # runs on, so its reply can be undone: for up to _LATE_REPLY_WAIT while
            # that reply has not come, then reap_timeout for the rest (its trailers).
            # The client's close cuts it at reap_timeout (close_in_loop).
            if progress.unsent():
                # (between: its last attempt was never processed, and the next
                # one is not on the wire yet: nothing exists on the server.)
                return False
            loop = asyncio.get_running_loop()
            detached_at = loop.time()
            raw = progress.raw
            if raw is not None:
                self._detached.add(raw)
                task.add_done_callback(lambda _: self._detached.discard(raw))

            def reap_soon() -> None:
                if progress.reap_timer is not None:
                    progress.reap_timer.cancel()
                progress.reap_timer = loop.call_later(self._reap_timeout, task.cancel)

            def give_way() -> bool:
                # A call waits for a stream: this one waits no longer than it did
                # before a late reply was waited for (reap_timeout from the detach).
                # False if its reply came (its stream ends with its trailers).
                if progress.reap_timer is None or progress.replied or task.done():
                    return False
                progress.reap_timer.cancel()
                progress.reap_timer = loop.call_at(detached_at + self._reap_timeout, task.cancel)
                return True

            gate = progress.gate
            late = self._late_waits
            if (
                progress.replied
                or (gate is not None and gate.queued)
                or len(late) >= _LATE_REPLY_MAX
            ):
                reap_soon()
            else:
                late.add(task)
                task.add_done_callback(late.discard)
                progress.on_reply = reap_soon
                progress.reap_timer = loop.call_later(
                    max(self._reap_timeout, _LATE_REPLY_WAIT), task.cancel
                )
                if gate is not None:
                    # Its stream is one of the few the server allows: once a call
                    # waits for one, the wait is reap_timeout, as before the reply.
                    gate.on_queue[give_way] = None
                    task.add_done_callback(lambda _: gate.on_queue.pop(give_way, None))
            self._reap_later(task)
            return True

        def abandoned(reply: bytes) -> None:
            # The reply arrived just as the caller gave up: undo it all the same.
            if orphan is not None:
                self._bridge.call_soon(lambda: self._undo_later(orphan, reply, extra_metadata))

        # The slot by hand, not by a context manager: this is every unary call's path.
        self._take_slot(method, cleanup=cleanup)
        try:
            return await self._bridge.run(
                call,
                abandoned=abandoned,
                detach=detach if orphan is not None else None,
                defer_ki=cleanup,
                abortable=abortable,
                # Given up on while its asyncio side runs on: it may yet be sent.
                unsettled=progress.mark_unsettled,
            )
        except Exception as exc:
            _raise_mapped(exc, path, closed=self._closed, redact=self._redact)
        finally:
            self._give_slot()

    def _undo_later(
        self, orphan: Orphan, reply: bytes, extra_metadata: tuple[tuple[str, str], ...]
    ) -> None:
        """asyncio: undo a reply nobody will use, in the background (see ``unary``)."""
        if self._closed:  # its close's calls would fail at once
            log.debug("not undoing a reply that came as the client closed")
            return
        self._reap_later(asyncio.ensure_future(_undo(orphan, reply, self, extra_metadata)))

    def close_later(
        self,
        session_id: str,
        *,
        timed_out: bool,
        extra_metadata: tuple[tuple[str, str], ...] = (),
    ) -> bool:
        """trio: send ``CloseSession`` for ``session_id`` again, in the background,
        until it gets through: its own close timed out (a server stalled past
        ``close_timeout``: a GC pause, a busy host) or could not reach the server.
        Tried again with backoff for up to ``_RECLOSE_FOR`` seconds, and once more
        as the client closes, with the session's ``extra_metadata`` (its affinity
        key: behind a proxy, the close must reach the server that holds it). Not
        for a close made as the client closes: whether it will be sent again."""
        if self._bridge.calls_aborted:
            return False  # the client's own close: its summary says what was left
        self._bridge.call_soon(partial(self._queue_close, session_id, timed_out, extra_metadata))
        return True

    def _queue_close(
        self, session_id: str, timed_out: bool, extra_metadata: tuple[tuple[str, str], ...]
    ) -> None:
        """asyncio: see :meth:`close_later` (also for an OpenSession's background
        close, cut: see ``close_orphan``). Taken also once the client's close has
        begun (posted before it, or an orphan's): its last try, or its summary,
        counts it."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        if session_id not in self._unclosed:
            self._unclosed[session_id] = _Unclosed(
                loop.time() + _RECLOSE_FOR, timed_out, extra_metadata
            )
        if self._recloser is None or self._recloser.done():
            self._recloser = loop.create_task(self._reclose())

    async def _reclose(self) -> None:
        """asyncio: the background task of :meth:`close_later`.

        Only on a connection the client's calls made: a re-close makes none. Its
        failed attempts would put the transport in reconnect backoff, and a call
        made as the server came back would fail at once (a restart test did).
        """
        delay = _RECLOSE_FIRST
        while self._unclosed and not self._closed:
            await asyncio.sleep(delay)
            if not self.connected:
                delay = _RECLOSE_FIRST  # (looked at again soon: a flag, no I/O)
                # Never tried while the server stays down: given up when their time
                # is up all the same (else they, and a DNS-retired endpoint holding
                # them, stayed for as long as the process).
                now = asyncio.get_running_loop().time()
                for sid, entry in list(self._unclosed.items()):
                    if now >= entry.give_up_at:
                        del self._unclosed[sid]
                        log.debug("CloseSession %s: given up (%s stays unreachable)", sid, self.url)
            elif await self._close_unclosed():
                delay = _RECLOSE_FIRST  # it answers again: the rest (if any) soon
            else:
                delay = min(2 * delay, _RECLOSE_MAX)

    async def _close_unclosed(self, wait: float | None = None, *, connect: bool = False) -> bool:
        """asyncio: ``CloseSession`` again for the sessions of :meth:`close_later`,
        ``_RECLOSE_BATCH`` at a time (the connection's streams are its calls' too),
        each bounded by ``wait`` (default ``_RECLOSE_WAIT``, at least
        ``reap_timeout``); the round stops at a batch the server left unanswered.
        Whether it answered. Logged once a round, not per session. Only on a
        connection that is up, unless ``connect`` (the client's close): then the
        first batch may make one (a call in reconnect backoff fails at once).
        """
        if wait is None:
            wait = max(self._reap_timeout, _RECLOSE_WAIT)
        ids = list(self._unclosed)
        closed = 0
        refused: list[tuple[str, BaseException]] = []
        answered = False
        # Not when an attempt is in flight (it began before the close: a call's, which
        # has waited for it as long) or the last one got no answer: the close would
        # wait its whole reap_timeout for a server that was just found silent.
        connect = connect and self._attempt is None and not self._last_hung
        try:
            for at in range(0, len(ids), _RECLOSE_BATCH):
                if not self.connected and not (connect and at == 0):
                    break  # (see _reclose: no connection attempt of its own)
                batch = ids[at : at + _RECLOSE_BATCH]
                # Nor one sent again inside (refused by a GOAWAY: a server going
                # down for a restart), unless the client's close.
                outcomes = await asyncio.gather(
                    *(self._close_again(sid, wait, connect=connect) for sid in batch)
                )
                if all(outcome is False for outcome in outcomes):
                    break  # unanswered: so would the rest be, now
                answered = True
                for sid, outcome in zip(batch, outcomes, strict=True):
                    if outcome is True:
                        closed += 1
                    elif outcome is not False:
                        refused.append((sid, outcome))
        finally:
            if answered:
                with self._loss_lock:  # reached again: the next outage is logged anew
                    self._reached += 1
            if closed:
                log.info(
                    "%d session(s) closed on %s whose first CloseSession had not got through",
                    closed,
                    self.url,
                )
            if refused:
                sid, exc = refused[0]
                log.warning(
                    "%d CloseSession(s) sent again to %s were refused (the server frees "
                    "those sessions when idle); the first, of %s: %s",
                    len(refused),
                    self.url,
                    sid,
                    exc,
                )
        return answered

    async def _close_again(
        self, session_id: str, wait: float, *, connect: bool = False
    ) -> bool | BaseException:
        """asyncio: one more ``CloseSession``: True if it got through, False if
        unanswered (still queued, unless its time is up), else the refusal."""
        entry = self._unclosed.get(session_id)
        if entry is None:  # (dropped meanwhile)
            return True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(wait):
                await self.unary_in_loop(
                    "CloseSession",
                    encode_string_field(session_id),  # CloseSessionRequest
                    extra_metadata=entry.metadata,
                    connect=connect,
                )
        except Exception as exc:
            mapped = map_grpc_error(exc, "CloseSession")
            if isinstance(exc, TimeoutError) or isinstance(mapped, e.ServerUnavailable):
                if loop.time() >= entry.give_up_at or self._closed:
                    self._unclosed.pop(session_id, None)
                    log.debug("CloseSession %s: given up (%s)", session_id, exc or "timed out")
                return False
            self._unclosed.pop(session_id, None)  # answered: sending it again will not help
            if isinstance(mapped, e.SessionNotFound):
                return True  # gone already (a restart): as good as closed
            return mapped or exc
        self._unclosed.pop(session_id, None)
        log.debug("session %s closed (its first CloseSession had not got through)", session_id)
        return True

    async def _last_closes(self) -> None:
        """asyncio, as the client closes: one more try for every session of
        :meth:`close_later` (bounded, as the other cleanups, by ``reap_timeout``)."""
        try:
            # May connect: no call is left for a failed attempt's backoff to hold up.
            await self._close_unclosed(self._reap_timeout, connect=True)
        finally:
            self._give_up_unclosed()

    def _give_up_unclosed(self) -> None:
        """asyncio, closing: say how many sessions of :meth:`close_later` are left."""
        if self._unclosed:
            # A WARNING if a timed-out close's was "sent again" (the earlier
            # warning of one that could not reach its server said this already).
            timed_out = any(u.timed_out for u in self._unclosed.values())
            log.log(
                logging.WARNING if timed_out else logging.DEBUG,
                "%d session(s) whose CloseSession did not get through to %s are "
                "left to the server's idle eviction",
                len(self._unclosed),
                self.url,
            )
            self._unclosed.clear()

    def _reap_later(self, task: asyncio.Future[Any]) -> None:
        """asyncio: the client's exit waits (``reap_timeout``) for this cleanup task."""
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    def server_stream(
        self,
        method: str,
        request: bytes,
        *,
        max_items: int,
        extra_metadata: tuple[tuple[str, str], ...] = (),
    ) -> StreamCall:
        """Open a server-streaming RPC whose raw messages the block drains in batches.

        The buffer holds at most ``max_items`` messages and (past one message)
        the transport's ``max_buffered_bytes``.

        Leaving the block before the stream ended resets it with CANCEL and waits
        until that is done. Errors are raised, mapped, by ``receive_batch``. A
        stream refused before any message (REFUSED_STREAM) is retried up to twice.
        """
        return _ServerStream(
            self, method, request, max_items, self._max_buffered_bytes, extra_metadata
        )

    async def aclose(self) -> None:
        """Close the channel (idempotent). In-flight calls fail with ClosedResourceError.

        Cleanups of abandoned calls get ``reap_timeout`` seconds to finish first.
        """
        await self._bridge.run(self.close_in_loop, defer_ki=True)

    async def close_in_loop(self) -> None:
        """asyncio: :meth:`aclose` (a pool closes its transports together with it)."""
        # The set read again: a cleanup that ends (a detached call failing
        # after its reply, or cut by its reap timer) may start another.
        loop = asyncio.get_running_loop()
        end = loop.time() + self._reap_timeout
        recloser, self._recloser = self._recloser, None
        if recloser is not None and not recloser.done():
            recloser.cancel()
            await asyncio.wait({recloser})
        if self._unclosed:
            self._reap_later(asyncio.ensure_future(self._last_closes()))
        while self._reapers and (left := end - loop.time()) > 0:
            await asyncio.wait(set(self._reapers), timeout=left)
        while self._reapers:
            pending = set(self._reapers)
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)
        self._give_up_unclosed()  # (queued meanwhile: an orphan's close, cut)
        self._shut()

    def _shut(self) -> None:
        """asyncio: close every connection; calls not yet sent fail with ClosedResourceError."""
        self._closed = True
        recloser, self._recloser = self._recloser, None
        if recloser is not None:
            recloser.cancel()  # (it ends at once: its calls fail on the closed transport)
        # A connection attempt still running ends with its channel's close (or by
        # connect_timeout; the client's close cancels every task anyway): cancelled
        # here, its callers would get asyncio's CancelledError, not the close's error.
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        for old in self._draining:
            old.close()
        self._draining.clear()


class StreamCall(Protocol):
    """The block of a server-streaming call (:meth:`GrpcTransport.server_stream`)."""

    @property
    def sent(self) -> bool:
        """Whether the request may have reached the server (final after the block)."""
        ...

    @property
    def server_ended(self) -> bool:
        """Whether the server has ended the stream (all it sent is received)."""
        ...

    async def __aenter__(self) -> BatchReceiver[bytes]: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class _SinkLike(Protocol):
    def push(self, item: bytes) -> bool: ...

    async def wait_space(self) -> None: ...


async def _undo(
    orphan: Orphan,
    reply: bytes,
    transport: GrpcTransport,
    extra_metadata: tuple[tuple[str, str], ...],
) -> None:
    """asyncio: undo what an abandoned call's reply says the server did; a failure is logged.

    Bounded by ``reap_timeout``, as a session's own close is by ``close_timeout``:
    on a server that never answers, it would hold its stream until the client's close.
    """
    try:
        async with asyncio.timeout(transport.reap_timeout):
            await orphan(reply, transport, extra_metadata)
    except TimeoutError:
        closing = transport._bridge.calls_aborted  # (then the close's summary counts it)
        log.log(
            logging.DEBUG if closing else logging.WARNING,
            "cleaning up after an abandoned call timed out after %.1f s (to %s)%s",
            transport.reap_timeout,
            transport.target.url,
            "" if closing else "; it is sent again in the background",
        )
    except Exception as exc:
        log.warning("cleaning up after an abandoned call failed: %s", exc)


class _Progress:
    """How far a call got: whether the server may have seen it."""

    __slots__ = (
        "between",
        "block",
        "gate",
        "headers_sent",
        "hedge",
        "left",
        "on_reply",
        "queued",
        "raw",
        "reap_timer",
        "replied",
        "unsettled",
    )

    def __init__(self) -> None:
        self.headers_sent: bool = False
        # A pool's OpenSession: whether another endpoint is ready (asyncio side),
        # for leaving a connection that does not come (see _ready_channel).
        self.hedge: Callable[[], bool] | None = None
        self.left: bool = False  # it did leave its connection for a ready endpoint
        self.block: e.Sent | None = e.BLOCK_SENT.get()  # (made in the caller's trio task)
        # Waiting for a stream of the connection, behind this client's own calls.
        self.queued: bool = False
        # Set once the call is detached from its caller (see GrpcTransport.unary).
        self.reap_timer: asyncio.TimerHandle | None = None
        # A unary call's reply message has come (_Collect); on_reply is then called.
        self.replied: bool = False
        self.on_reply: Callable[[], None] | None = None
        # The call's grpclib stream, once its HEADERS are out (the latest attempt's).
        self.raw: Any = None
        # The stream gate that admitted it (the latest attempt's).
        self.gate: _StreamGate | None = None
        # Between attempts: the last one was never processed (refused, or above a
        # GOAWAY's last stream id) and the next one's HEADERS are not out yet.
        self.between: bool = False
        # Given up on by the trio side while its asyncio side ran on: sent, for good.
        self.unsettled: bool = False

    def unsent(self) -> bool:
        """Whether the call surely never reached the server (its HEADERS not written,
        or only those of an attempt it never processed, the next not yet)."""
        return not self.unsettled and (not self.headers_sent or self.between)

    def mark_sent(self) -> None:
        """The call's HEADERS are written: so are those of its composite blocks."""
        if self.block is not None and self.unsent():
            self.block.count(1)
        self.headers_sent = True
        self.between = False

    def mark_between(self) -> None:
        """Its last attempt was never processed; the next one's HEADERS are not out."""
        if self.unsettled:  # the trio side has taken it as sent for good
            return
        if self.block is not None and not self.unsent():
            self.block.count(-1)
        self.between = True

    def mark_unsettled(self) -> None:
        """Given up on while its asyncio side runs on (the bridge's ``unsettled``): it
        may yet be sent, and counts as sent from now on, whatever that side does."""
        # The trio thread, while the loop thread may be in mark_sent/mark_between:
        # only writes that need no lock (a flag of its own; Sent.mark, which only
        # ever sets True), no read-modify-write of what the loop thread writes.
        self.unsettled = True
        if self.block is not None:
            self.block.mark()


class _Collect:
    """A sink for a unary call's reply: a second one fails the call at once (a
    server that kept answering would otherwise fill memory until it ended)."""

    def __init__(
        self, method: str, *, salvage: bool = False, progress: _Progress | None = None
    ) -> None:
        self.method = method
        self.items: list[bytes] = []
        # A reply that arrived before the call failed is wanted (to undo it).
        self.salvage = salvage
        self.progress = progress

    def push(self, item: bytes) -> bool:
        if self.items:
            raise e.ProtocolViolation(f"{self.method}: expected one reply message, got more")
        self.items.append(item)
        progress = self.progress
        if progress is not None:
            progress.replied = True
            if progress.on_reply is not None:
                progress.on_reply()
        return False

    async def wait_space(self) -> None:  # pragma: no cover - never full
        return

    def salvage_from(self, reader: _Reader) -> None:
        """Keep the reply of a failing call from what ``reader`` has not read yet."""
        if not self.items:
            first = reader.first_received()
            if first is not None:
                self.items.append(first)


class _Reader:
    """Reads length-prefixed gRPC messages off a grpclib stream, resumably.

    It takes whole DATA chunks from the stream's buffer and cuts the messages
    out itself: grpclib's ``recv_data`` would slice its buffer twice per
    message (prefix, then body), most of a small message's cost. The window
    goes back as messages are cut, not as a chunk is taken (as grpclib does): a
    consumer that stops reading (a full sink) then holds at most the stream
    window beyond its sink, even when the server packs the whole window into
    one DATA frame. (It goes back when the next chunk is needed, and for what
    was cut when the sink fills: not per message, which would cost the hot
    path.) A
    message's size is checked from its prefix before its body is gathered, so
    an oversized message is refused before it is buffered (grpclib would take
    any size). Interrupted (the connection died), it resumes where it stopped.
    """

    __slots__ = (
        "_buf",
        "_owed",
        "_owed_data",
        "_parts",
        "_pos",
        "count",
        "max_size",
        "path",
        "raw",
    )

    def __init__(self, raw: Any, max_size: int, path: str) -> None:
        self.raw = raw  # grpclib.protocol.Stream
        self.max_size = max_size
        self.path = path
        self.count = 0
        # What is taken from grpclib but not cut yet: _buf[_pos:], then _parts.
        self._buf = b""
        self._pos = 0
        self._parts: list[bytes] = []
        # The window of the chunks taken, not given back yet (see the class doc),
        # and their data bytes: the last _owed_data bytes of what is not cut yet.
        self._owed = 0
        self._owed_data = 0

    def first_received(self) -> bytes | None:
        """The first whole message received and not read yet; it does not wait.

        For a call that failed (or was cancelled) after its answer arrived,
        whose answer is still needed. Its stream is reset right after.
        """
        # Taken without giving their window back: the stream is reset next, and
        # the connection's part went back on receipt (_SplitWindowH2Connection).
        chunks = self.raw.buffer._unacked
        parts = [self._buf[self._pos :], *self._parts]
        while not chunks.empty():
            parts.append(chunks.get_nowait()[0])
        data = b"".join(parts)
        if len(data) < 5:
            return None
        end = 5 + int.from_bytes(data[1:5], "big")
        if end - 5 > self.max_size or end > len(data):
            return None
        if data[0]:
            try:
                return self._inflate(data[5:end])
            except e.PocApiError:
                return None
        return data[5:end]

    def _inflate(self, body: bytes) -> bytes:
        """A compressed message's bytes, by the stream's ``grpc-encoding``.

        A C-core server given a default compression (grpcio's
        ``compression=grpc.Compression.Gzip``) compresses its replies whatever the
        client's ``grpc-accept-encoding`` says; gzip and deflate are what gRPC
        servers send. The inflated size is bounded by ``max_message_size``."""
        headers = self.raw.headers or ()
        encoding = next((v for k, v in headers if k == "grpc-encoding"), "identity")
        wbits = {"gzip": 31, "deflate": 15}.get(encoding)
        if wbits is None:
            raise e.ProtocolViolation(
                f"{self.path}: a compressed message with grpc-encoding {encoding!r} "
                "(only gzip and deflate are supported)"
            )
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, self.max_size + 1)
        except zlib.error as exc:
            raise e.ProtocolViolation(
                f"{self.path}: a {encoding} message that does not inflate: {exc}"
            ) from None
        if len(out) > self.max_size:
            raise e.LimitExceeded(
                f"{self.path}: a {encoding} message inflates past "
                f"max_message_size ({self.max_size})"
            )
        if not inflater.eof:
            raise e.ProtocolViolation(f"{self.path}: a truncated {encoding} message")
        if inflater.unused_data:
            # (A second gzip member, say: its bytes were dropped, the message cut
            # short without a word. C-core refuses it too: "not all input consumed".)
            raise e.ProtocolViolation(
                f"{self.path}: a {encoding} message with bytes after its compressed data"
            )
        return out

    async def pump(self, sink: _SinkLike) -> None:
        """Read every message to the end of the stream into ``sink``.

        One loop with no per-message coroutine of its own: this is the hot
        path of every stream.
        """
        buffer = self.raw.buffer
        chunks = buffer._unacked  # asyncio.Queue of (data, data_size, ack_size)
        ack = buffer._ack_callback
        push = sink.push
        max_size = self.max_size
        parts = self._parts
        buf, pos = self._buf, self._pos
        if parts:  # resumed while gathering
            buf, pos = buf[pos:] + b"".join(parts), 0
            parts.clear()
        try:
            while True:
                # Cut every whole message out of buf[pos:].
                n = len(buf)
                while n - pos >= 5:
                    compressed = buf[pos]
                    size = int.from_bytes(buf[pos + 1 : pos + 5], "big")
                    if size > max_size:
                        raise e.LimitExceeded(
                            f"{self.path}: the server announced a {size}-byte message; "
                            f"max_message_size is {max_size}"
                        )
                    end = pos + 5 + size
                    if end > n:
                        break
                    self.count += 1
                    body = buf[pos + 5 : end]
                    full = push(self._inflate(body) if compressed else body)
                    pos = end
                    if full:
                        # Give back the window of what this chunk gave the sink.
                        cut = self._owed_data - (n - pos)
                        if cut > 0:
                            ack(cut)
                            self._owed -= cut
                            self._owed_data -= cut
                        await sink.wait_space()
                # Gather chunks until the next message (or its prefix) is whole: one
                # join per message that spans chunks, however many it spans.
                have = n - pos
                need = 5 + int.from_bytes(buf[pos + 1 : pos + 5], "big") if have >= 5 else 5
                if have:
                    parts.append(buf[pos:])
                buf, pos = b"", 0
                while have < need:
                    if chunks.empty() and buffer._eof:
                        if not have:
                            return
                        where = "a message header" if have < 5 else "a message"
                        raise e.ProtocolViolation(f"{self.path}: the stream ended inside {where}")
                    if self._owed:  # what was taken is cut (or gathered): more may come
                        ack(self._owed)
                        self._owed = self._owed_data = 0
                    data, data_size, ack_size = await chunks.get()
                    self._owed += ack_size
                    self._owed_data += data_size
                    if not data_size:
                        continue  # the end-of-stream mark (seen above) or an empty frame
                    parts.append(data)
                    have += data_size
                    if need == 5 and have >= 5:
                        # The prefix is whole: now the message's own size is known.
                        head = b"".join(parts)
                        parts[:] = [head]
                        need = 5 + int.from_bytes(head[1:5], "big")
                        if need - 5 > max_size:
                            break  # refused above, before its body is gathered
                buf = parts[0] if len(parts) == 1 else b"".join(parts)
                parts.clear()
        finally:
            self._buf, self._pos = buf, pos


def _forget_swallowed_cancels(task: asyncio.Task[Any] | None, level: int) -> None:
    """asyncio: undo the cancel requests grpclib swallowed in ``task`` since its
    count was ``level``.

    grpclib ends a call that its connection's end (or a GOAWAY) cut by
    cancelling the task and raising ``StreamTerminatedError`` in place of the
    ``CancelledError``, never calling ``uncancel()``. The count left behind makes
    the task's next asyncio timeout raise ``CancelledError``, not
    ``TimeoutError`` (``asyncio.wait_for`` too, from Python 3.12): a health
    check's did, and ended the pool's health checks for good. Called right where
    the error is caught, with no await since, where no other cancel can be pending.
    """
    if task is not None:
        while task.cancelling() > level:
            task.uncancel()


async def _receive(stream: Stream[Any, Any], reader: _Reader, sink: _SinkLike) -> None:
    """Read a call's answer: headers, every message into ``sink``, trailers."""
    raw = stream._stream
    task = asyncio.current_task()
    level = 0 if task is None else task.cancelling()
    try:
        try:
            await stream.recv_initial_metadata()
            # grpclib's wrapper wakes this task if the connection dies.
            with stream._wrapper:
                await reader.pump(sink)
            if raw.trailers is None and not _has_grpc_status(raw.headers):
                # The stream ended (END_STREAM) with no trailers: grpclib would wait
                # for them forever, on a connection keepalive finds healthy.
                raise e.ProtocolViolation(
                    f"{reader.path}: the stream ended without trailers (no grpc-status)"
                )
            await stream.recv_trailing_metadata()
        except StreamTerminatedError:
            _forget_swallowed_cancels(task, level)
            # grpclib fails every stream of a connection that goes away, even one whose
            # answer had fully arrived (say, a GOAWAY right behind it). If the server
            # finished the call, finish reading it from the buffer.
            headers = dict(raw.headers) if raw.headers is not None else None
            trailers_only = _has_grpc_status(raw.headers)
            if raw.trailers is None and not trailers_only:
                raise
            assert headers is not None
            if not stream._recv_initial_metadata_done:
                stream._raise_for_status(headers)
                stream._raise_for_content_type(headers)
                stream._recv_initial_metadata_done = True
            if trailers_only:
                status, message, details = stream._process_grpc_status(headers)
            else:
                await reader.pump(sink)
                assert raw.trailers is not None
                status, message, details = stream._process_grpc_status(dict(raw.trailers))
            stream._recv_trailing_metadata_done = True
            stream._raise_for_grpc_status(status, message, details)
    except (KeyError, ValueError) as exc:
        # grpclib reads headers unchecked (validate_inbound_headers=False): a
        # missing :status is a KeyError, a -bin value that is not base64 a
        # binascii.Error (a ValueError), and so on.
        # (A KeyError's repr, "KeyError(':status')", was the whole reason given.)
        why = f"no {exc.args[0]!r} header" if isinstance(exc, KeyError) and exc.args else repr(exc)
        raise e.ProtocolViolation(f"{reader.path}: unreadable response headers: {why}") from exc


def _has_grpc_status(headers: Any) -> bool:
    """Whether response headers are trailers-only (they carry ``grpc-status``)."""
    return headers is not None and any(name == "grpc-status" for name, _ in headers)


def _draining(channel: Channel) -> bool:
    protocol = channel._protocol
    return isinstance(protocol, _PocH2Protocol) and protocol.draining


#: Stream ids kept back at the end of a connection's (see _PocH2Protocol.worn_out):
#: more than the calls that can be on their way to their HEADERS at once.
_STREAM_ID_RESERVE: Final = 1 << 16


def _worn_out(channel: Channel) -> bool:
    protocol = channel._protocol
    return isinstance(protocol, _PocH2Protocol) and protocol.worn_out


def _settled(channel: Channel) -> bool:
    """The peer's SETTINGS came, and grpclib has not closed the connection (between
    its close and the loss it causes, a new call failed with an AttributeError)."""
    protocol = channel._protocol
    return (
        isinstance(protocol, _PocH2Protocol)
        and protocol.settings_received.is_set()
        and not protocol.closed
    )


# A response header block bigger than this is refused as it arrives: h2 refuses
# header lists past 64 KiB decoded anyway (its MAX_HEADER_LIST_SIZE), and 1 MiB is
# what it would buffer at HTTP/2's default frame size (see _check_header_blocks).
_MAX_HEADER_BLOCK: Final = 1 << 20
_HEADER_BLOCK_FRAMES: Final = frozenset({0x1, 0x5, 0x9})  # HEADERS, PUSH_PROMISE, CONTINUATION


class _SplitWindowH2Connection(h2.connection.H2Connection):
    """An h2 connection that returns connection-level window on receipt and
    stream-level window on consumption (see the module docstring), and that
    stays open after a graceful GOAWAY."""

    #: time.monotonic() of the last DATA received (a probe's ping rate depends on it)
    data_at: float = -math.inf
    # More than one call sends its request now (set by the protocol).
    contended: Callable[[], bool] = staticmethod(lambda: False)
    _max_frame = 16_384  # the server's SETTINGS_MAX_FRAME_SIZE

    @property
    def max_outbound_frame_size(self) -> int:
        # grpclib sends as much as the window allows up to this in one frame: from a
        # server that takes 16 MiB frames (grpcio's), each connection WINDOW_UPDATE
        # went whole to the oldest upload, and a new call's bytes waited until every
        # upload had ended. While calls contend, a frame is one turn's worth (see
        # _PocConnection.data_send_process).
        frame = self._max_frame
        return min(frame, _BULK_SEND) if self.contended() else frame

    @max_outbound_frame_size.setter
    def max_outbound_frame_size(self, frame: int) -> None:
        self._max_frame = frame

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        # h2 closes its state machine on any GOAWAY, after which the DATA of
        # streams the server promised to finish is a protocol error. HTTP/2 lets
        # streams up to last_stream_id run to completion after GOAWAY(NO_ERROR),
        # and gRPC servers send it on graceful shutdown and max_connection_age. So
        # for NO_ERROR only the event is raised; poc_api opens no new stream on
        # this connection (it is draining) and closes it once its streams end.
        if frame.error_code != h2.errors.ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        self.goaway_last_stream_id = frame.last_stream_id
        event = ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    #: What the frames before a bad one said (see receive_data), else empty.
    events_before_error: list[Any] | None = None

    # The frame being read (see _check_header_blocks): the bytes of its payload not
    # seen yet, its 9-byte header while split across reads, and the size so far of
    # the header block that has not seen END_HEADERS.
    _frame_left = 0
    _frame_head = b""
    _header_block = 0

    def _check_header_blocks(self, data: bytes) -> int | None:
        """Where in ``data`` the frame starts that makes a header block (HEADERS or
        PUSH_PROMISE and its CONTINUATION frames) bigger than _MAX_HEADER_BLOCK,
        refused before h2 buffers it; None if none does.

        h2 holds a block's frames until END_HEADERS, up to 64 of them: 1 MiB at
        HTTP/2's 16 KiB frames, but 64 MiB at the 1 MiB MAX_FRAME_SIZE this client
        announces (for DATA), all to decode a header list it then refuses past
        64 KiB. Only frame headers are read here, so this costs next to nothing."""
        pos, n = 0, len(data)
        left, head = self._frame_left, self._frame_head
        while pos < n:
            if left:
                step = min(left, n - pos)
                pos += step
                left -= step
                continue
            start = pos - len(head)  # (< 0: it began in an earlier read)
            take = 9 - len(head)
            head += data[pos : pos + take]
            pos += take
            if len(head) < 9:
                break
            length = int.from_bytes(head[:3], "big")
            if head[3] in _HEADER_BLOCK_FRAMES:
                self._header_block += length
                if self._header_block > _MAX_HEADER_BLOCK:
                    self._frame_left, self._frame_head = 0, b""
                    return max(start, 0)
                if head[4] & 0x4:  # END_HEADERS
                    self._header_block = 0
            head = b""
            left = length
        self._frame_left, self._frame_head = left, head
        return None

    def receive_data(self, data: Any) -> list[Any]:
        # h2's own, keeping what the frames before a bad one said: h2 drops it
        # with its exception (a reply, and then the session it opened, was lost).
        events: list[Any] = []
        # The frames of this read before a refused header block are read first.
        refused = self._check_header_blocks(data)
        if refused is not None:
            data = data[:refused]
        self.incoming_buffer.add_data(data)
        self.incoming_buffer.max_frame_size = self.max_inbound_frame_size
        try:
            for frame in self.incoming_buffer:
                events.extend(self._receive_frame(frame))
        except InvalidPaddingError as exc:
            self.events_before_error = events
            self._terminate_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            raise h2.exceptions.ProtocolError("Received frame with invalid padding.") from exc
        except h2.exceptions.ProtocolError as exc:
            self.events_before_error = events
            self._terminate_connection(exc.error_code)
            raise
        except UnicodeDecodeError:  # a header value not ASCII
            self.events_before_error = events
            raise
        if refused is not None:
            self.events_before_error = events
            self._terminate_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            raise h2.exceptions.DenialOfServiceError(
                f"a header block of more than {_MAX_HEADER_BLOCK} bytes"
            )
        received = 0
        for event in events:
            if isinstance(event, DataReceived):
                received += event.flow_controlled_length or 0
        if received:
            self.data_at = time.monotonic()
            # The same batching h2 applies on acknowledgement (update once half
            # the window is used), so this adds no WINDOW_UPDATE per DATA frame.
            increment = self._inbound_flow_control_window_manager.process_bytes(received)
            if increment:
                frame = WindowUpdateFrame(0)
                frame.window_increment = increment
                self._prepare_for_sending([frame])
        return events

    def _receive_frame(self, frame: Any) -> list[Any]:
        # h2's own, less its first line: ``logger.trace("...", repr(frame))``
        # formats every frame received, logger or not (a few % of a unary call's
        # CPU). tests/test_h2_receive_frame.py runs both on the same frames.
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as exc:
            # Closed by RST_STREAM: a stream error (RST_STREAM back); else a
            # connection error.
            if self._stream_is_closed_by_reset(exc.stream_id):
                f = RstStreamFrame(exc.stream_id)
                f.error_code = exc.error_code
                self._prepare_for_sending([f])
                events = exc._events
            else:
                raise
        except StreamIDTooLowError as exc:
            if self._stream_is_closed_by_reset(exc.stream_id):
                f = RstStreamFrame(exc.stream_id)
                f.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(exc.stream_id):
                raise StreamClosedError(exc.stream_id) from exc
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events  # type: ignore[no-any-return]

    goaway_last_stream_id: int | None = None
    lost = False  # the connection is gone (set by _PocH2Protocol.connection_lost)

    def get_next_available_stream_id(self) -> int:
        # grpclib picks the id of a new stream right before sending its HEADERS,
        # also for calls that were queued (for a stream slot or write buffer
        # space) when the GOAWAY came, or the connection was lost. Such a call was
        # never seen by the server: refuse it here, and _exchange sends it again
        # on a new connection.
        if self.lost:
            raise StreamTerminatedError(_CLOSED_UNSENT)
        if self.goaway_last_stream_id is not None:
            raise StreamTerminatedError(_GOAWAY_REFUSED)
        return super().get_next_available_stream_id()

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        # Stream part only: the connection part went back on receipt.
        if stream_id <= 0 or acknowledged_size < 0:
            super().acknowledge_received_data(acknowledged_size, stream_id)  # raises
            return
        try:
            stream = self._get_stream_by_id(stream_id)
        except StreamClosedError:
            return
        if stream.open:
            self._prepare_for_sending(stream.acknowledge_received_data(acknowledged_size))


class _PocConnection(Connection):
    """grpclib's connection, pinging also while sessions are open between calls.

    grpclib pings only while a stream is open, so a server that froze while an
    agent thinks between turns would be found only at the next call."""

    sessions_open: Callable[[], bool] = staticmethod(lambda: False)
    open_stream_ids: Callable[[], list[int]] = staticmethod(list)  # (set by the protocol)
    ping_unanswered = False  # keepalive closed the connection: a ping went unanswered
    writer: _CoalescingTransport | None = None  # (set by the protocol that made it)
    # More than one call sends its request now; the transport is paused (set by the
    # protocol: see data_send_process).
    contended: Callable[[], bool] = staticmethod(lambda: False)
    paused: Callable[[], bool] = staticmethod(lambda: False)
    _turn_at = 0  # data_sent at the last turn

    def data_send_process(self) -> None:
        """After each DATA frame grpclib writes: a turn for the other calls' frames.

        grpclib sends a message a frame at a time, waiting on ``write_ready``
        before each: set, the wait returned at once, so the first stream that a
        connection WINDOW_UPDATE woke (the oldest) sent frames until the window was
        gone, and a new call's few bytes (an OpenSession behind 30 image uploads)
        waited, for seconds, until the uploads ended. Once a full frame went out
        since the last turn, while another call sends too, ``write_ready`` is
        cleared until the loop's next iteration: every waiting stream then goes
        once, in turn. Small calls (every unary's path), and a lone upload beside
        streams that only receive, never pay the extra iteration.
        """
        super().data_send_process()
        if self.data_sent - self._turn_at >= _BULK_SEND and self.contended():
            self._turn_at = self.data_sent
            if self.write_ready.is_set():
                self.write_ready.clear()
                asyncio.get_running_loop().call_soon(self._end_turn)

    def _end_turn(self) -> None:
        if not self.paused():  # (a paused transport's resume_writing sets it)
            self.write_ready.set()

    def close(self) -> None:
        # grpclib's keepalive closes the connection by calling this from the timer it
        # set when it pinged (cancelled by the answer); any other close comes before
        # that timer is due. (The bridge's loop keeps time by time.monotonic(), and
        # runs a timer up to its clock resolution early: the slack.)
        timer = self._close_by_ping_handler
        due = time.monotonic() + 0.001
        if timer is not None and not timer.cancelled() and timer.when() <= due:
            self.ping_unanswered = True
            if self.writer is not None:
                self._cancel_streams(self.writer)
                self.writer.peer_gone = True
        super().close()

    def _cancel_streams(self, writer: _CoalescingTransport) -> None:
        """Reset every open stream (CANCEL) before a keepalive close drops the
        connection. Its server is stalled, not gone: the requests wait in its
        socket, and it would run them on waking (an OpenSession, a session nobody
        knows of, left until its idle eviction; in a pool the call went to another
        server meanwhile). Written straight to the socket (the close aborts, and
        drops what asyncio still holds), and only if nothing waits before them."""
        h2_conn = self._connection
        for stream_id in self.open_stream_ids():
            try:
                h2_conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            except h2.exceptions.H2Error:
                pass  # closed already, or the connection is
        data = h2_conn.data_to_send()
        if data:
            writer.write_now(data)

    def probe(self, timeout: float) -> bool:
        """Ping now (asyncio side), unless a ping is out already: unanswered within
        ``timeout`` seconds, the connection closes as keepalive closes it. Whether
        a ping went out.

        Nor when a ping went out less than ``keepalive_time`` ago and no DATA came
        since: gRPC servers count such pings as abuse (ping strikes, reset when
        they send DATA or HEADERS) and end the connection, calls and all, with
        GOAWAY "too_many_pings"."""
        if self._close_by_ping_handler is not None or self.is_closing():
            return False
        now = time.monotonic()
        last = self.last_ping_sent
        h2_conn = self._connection
        interval = self._config._keepalive_time or 0.0  # (set: probes need keepalive)
        data_since = isinstance(h2_conn, _SplitWindowH2Connection) and h2_conn.data_at > (last or 0)
        if last is not None and now - last < interval and not data_since:
            return False
        try:
            h2_conn.ping(struct.pack("!Q", int(now * 10**6)))
        except h2.exceptions.ProtocolError:
            return False  # h2 closed it (an error GOAWAY came): it ends by itself
        self.flush()
        self.last_ping_sent = now
        self._close_by_ping_handler = asyncio.get_running_loop().call_later(timeout, self.close)
        return True

    def _is_need_send_ping(self) -> bool:
        if super()._is_need_send_ping():
            return True
        if not self.sessions_open():
            return False
        last = self.last_ping_sent
        interval = self._config._http2_min_sent_ping_interval_without_data
        return last is None or time.monotonic() - last >= interval


class _PocEventsProcessor(EventsProcessor):
    """grpclib's events processor, handing a connection's returned send window to
    the calls that sent least first."""

    # More than one call sends its request now (set by the protocol).
    contended: Callable[[], bool] = staticmethod(lambda: False)

    def process_window_updated(self, event: WindowUpdated) -> None:
        # grpclib wakes the streams that wait for the connection's window oldest
        # first, and each woken upload takes a frame of it: a server that returns
        # the window in updates smaller than a frame per upload (h2's own returns
        # half its 64 KiB window at a time) left none for a new call, update after
        # update, until the uploads had ended. sorted() is stable: oldest first
        # among equals, as before.
        if event.stream_id == 0 and self.contended():
            for stream in sorted(self.streams.values(), key=lambda s: s.data_sent):
                stream.window_updated.set()
        else:
            super().process_window_updated(event)


# DATA frames up to this size from the server (HTTP/2's default is 16 KiB): a
# frame costs h2 and grpclib about as much as a dozen small messages to handle.
_MAX_FRAME_SIZE = 1 << 20


class _PocH2Protocol(H2Protocol):
    """grpclib's client protocol with split flow control, plus facts grpclib does
    not keep: whether the peer's SETTINGS arrived (or a GOAWAY before them), and
    whether the connection died of a protocol error (grpclib reports that as
    "Connection lost", like a network failure)."""

    connection: _PocConnection  # (made in connection_made)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = _StreamGate()
        self.sending = 0  # calls sending their request (HEADERS, DATA) now
        self.settings_received = asyncio.Event()
        # A GOAWAY came before the SETTINGS: the server refused the connection.
        self.went_away_first = asyncio.Event()
        self.lost = asyncio.Event()
        self.protocol_error = False
        self._error_reason = _PROTOCOL_ERROR  # the streams' end, after a protocol error
        # The lowest last stream id of the GOAWAYs received (None: none came).
        self.goaway_last_stream_id: int | None = None
        self.sessions_open: Callable[[], bool] = lambda: False
        self.url = "the server"  # the transport's grpc_url, for messages
        # The api key out of what the server says (a GOAWAY's debug data), for logs.
        self.redact: Callable[[str], str] = str
        # Over TLS, unless its handshake chose ALPN h2: what it chose, for messages.
        self.alpn_note = ""
        # (calls_open, pinged): see GrpcTransport._too_many_pings
        self.too_many_pings: Callable[[bool, bool], None] = lambda calls_open, pinged: None
        self._calmed = False  # a "too_many_pings" GOAWAY came (too_many_pings ran)
        self._goaway_note: str | None = None  # an error GOAWAY's code and debug data
        self.before_select: Callable[[Callable[[], object]], None] = _run_now
        self.unindexed_headers: frozenset[str] = frozenset()
        self._h2: _SplitWindowH2Connection | None = None
        self._socket: asyncio.Transport | None = None
        self._writer: _CoalescingTransport | None = None
        # Bytes of h2's answers to the server's PING and SETTINGS frames (ACKs)
        # since the socket's write buffer filled up: see _MAX_UNREAD_ANSWERS.
        self._paused = False
        self._unread_answers = 0

    def unprocessed(self, stream_id: int) -> bool:
        """Whether a GOAWAY said the server never processed this stream: its id is
        above the GOAWAY's last stream id, whatever the error code (RFC 9113 6.8)."""
        last = self.goaway_last_stream_id
        return last is not None and stream_id > last

    @property
    def draining(self) -> bool:
        """A graceful GOAWAY came: finish what runs, start nothing (h2 knows)."""
        return self._h2 is not None and self._h2.goaway_last_stream_id is not None

    @property
    def worn_out(self) -> bool:
        """Nearly out of stream ids (a client has 2**30 per connection): time to
        start nothing more on it, as after a graceful GOAWAY. The reserve covers
        the calls that passed this check and have yet to send their HEADERS."""
        h2_conn = self._h2
        return h2_conn is not None and (
            h2_conn.highest_outbound_stream_id
            > h2_conn.HIGHEST_ALLOWED_STREAM_ID - 2 * _STREAM_ID_RESERVE
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # grpclib's own connection_made with the h2 connection class swapped.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _set_nodelay(sock)
        tls = transport.get_extra_info("ssl_object")
        if tls is not None and (alpn := tls.selected_alpn_protocol()) != "h2":
            chose = "no ALPN protocol" if alpn is None else f"ALPN {alpn!r}"
            self.alpn_note = f" (its TLS handshake chose {chose}, not 'h2')"
        h2_conn = self._h2 = _SplitWindowH2Connection(config=self.h2_config)
        # Per-session values (the affinity key) go out as never-indexed literals:
        # in the dynamic table they would evict the stable headers.
        h2_conn.encoder = CachingEncoder(self.unindexed_headers)
        h2_conn.initiate_connection()
        initial = h2_conn.local_settings.initial_window_size
        if self.config.http2_connection_window_size != initial:
            h2_conn.increment_flow_control_window(
                self.config.http2_connection_window_size - initial
            )
        settings: dict[h2.settings.SettingCodes | int, int] = {
            h2.settings.SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME_SIZE,
            # gRPC has no use for server push: a PUSH_PROMISE is a protocol error.
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        }
        if self.config.http2_stream_window_size != initial:
            settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = (
                self.config.http2_stream_window_size
            )
        h2_conn.update_settings(settings)
        # Take such frames from now on: a server may send one right behind its ACK of
        # this, in one read, and h2 checks a read's frames against the limit in force
        # when the read began (16 KiB until the ACK), failing the connection.
        h2_conn.max_inbound_frame_size = _MAX_FRAME_SIZE
        writer = self._writer = _CoalescingTransport(transport, self.before_select)  # type: ignore[arg-type]
        self._socket = transport  # type: ignore[assignment]
        self.connection = _PocConnection(h2_conn, writer, config=self.config)  # type: ignore[arg-type]
        self.connection.sessions_open = self.sessions_open
        self.connection.open_stream_ids = lambda: list(self.processor.streams)
        self.connection.writer = writer
        self.connection.contended = h2_conn.contended = lambda: self.sending > 1
        self.connection.paused = lambda: self._paused
        self.connection.flush()
        self.connection.initialize()
        self.processor = _PocEventsProcessor(self.handler, self.connection)
        self.processor.contended = self.connection.contended

    def pause_writing(self) -> None:
        super().pause_writing()
        self._paused = True
        self._unread_answers = 0

    def resume_writing(self) -> None:
        super().resume_writing()
        self._paused = False

    def data_received(self, data: bytes) -> None:
        # grpclib's own data_received, recording what it drops.
        try:
            events = self.connection.feed(data)
        except (h2.exceptions.ProtocolError, UnicodeDecodeError):
            # (h2 decodes header values as ASCII, as grpclib configures it.)
            # The frames before the bad one count: a reply among them is read (and
            # the session it opened closed), then every stream fails.
            before = None if self._h2 is None else self._h2.events_before_error
            if before:
                self._handle(before)
            if not self.lost.is_set():  # (unless those events ended it already)
                self._protocol_error()
            return
        self._handle(events)

    def _handle(self, events: list[Any]) -> None:
        self.connection.flush()
        if self._paused:
            self._unread_answers += _answer_bytes(events)
            if self._unread_answers > _MAX_UNREAD_ANSWERS:
                self._flooded()
                return
        # Each stream's DATA of this read, not handed on yet: handed on before the
        # stream's next other event (its end, trailers, reset), before the
        # connection's end, and at the end of the read; events of other streams
        # or of the connection (PING, SETTINGS, unknown frames) leave them be.
        runs: dict[int, list[DataReceived]] = {}
        for event in events:
            if isinstance(event, DataReceived):
                run = runs.get(event.stream_id)
                if run is None:
                    runs[event.stream_id] = [event]
                else:
                    run.append(event)
                continue
            if runs:
                if isinstance(event, ConnectionTerminated):
                    for run in runs.values():
                        self._data(run)
                    runs.clear()
                else:
                    run = runs.pop(getattr(event, "stream_id", 0), None)
                    if run is not None:
                        self._data(run)
            if isinstance(event, _IGNORED_EVENTS):
                continue
            if isinstance(event, RemoteSettingsChanged):
                self.settings_received.set()
                if self._h2 is not None:
                    self.gate.set_limit(self._h2.remote_settings.max_concurrent_streams)
            elif isinstance(event, ConnectionTerminated):
                if not self.settings_received.is_set():
                    self.went_away_first.set()  # no call went on it (they wait for SETTINGS)
                last = event.last_stream_id or 0
                if self.goaway_last_stream_id is None or last < self.goaway_last_stream_id:
                    self.goaway_last_stream_id = last
                if event.error_code == h2.errors.ErrorCodes.NO_ERROR:
                    self._graceful_goaway(last)
                    continue  # grpclib would fail every stream of the connection
                log.debug(
                    "GOAWAY %s (last stream %d, debug data %s): the connection is closed",
                    _code_name(event.error_code),
                    last,
                    self.redact(repr(event.additional_data)),
                )
                if self._goaway_note is None:
                    # What the calls it ends say: "connection lost" told nothing of
                    # the server's own reason (GOAWAY INTERNAL_ERROR "out of memory").
                    note = f"the server closed it (GOAWAY {_code_name(event.error_code)}"
                    if event.additional_data:
                        # Redacted whole, then cut: a key across the cut would
                        # not be whole, nor redacted, and its start would show.
                        said = self.redact(event.additional_data.decode("utf-8", "replace"))
                        note += f": {_excerpt(said)!r}"
                    self._goaway_note = note + ")"
                if (
                    event.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
                    and event.additional_data == b"too_many_pings"
                    and not self._calmed
                ):
                    self._calmed = True  # once per connection, however many frames
                    pinged = self.connection.last_ping_sent is not None
                    self.too_many_pings(bool(self.processor.streams), pinged)
            try:
                self.processor.process(event)
            except NotImplementedError:  # an event grpclib has no use for
                self._protocol_error()
                return
            if isinstance(event, StreamEnded):
                self._ended_while_sending(event.stream_id)
        for run in runs.values():
            self._data(run)
        self.connection.flush()

    def _data(self, run: list[DataReceived]) -> None:
        """Hand grpclib one stream's DATA frames of one read as one chunk (and empty
        ones not at all).

        grpclib queues an entry (~130 bytes) per frame: a window of 1-byte frames
        would take ~140 MiB, and empty frames, which take no window, any amount.
        One entry per read per stream, none for nothing, bounds that by the window.
        """
        event = run[0]
        if len(run) > 1:  # (h2's events are plain objects, ours once handed over)
            event.data = b"".join([e.data for e in run])
            event.flow_controlled_length = sum([e.flow_controlled_length or 0 for e in run])
        if event.data or event.flow_controlled_length:
            self.processor.process(event)

    def _ended_while_sending(self, stream_id: int) -> None:
        """The server ended a stream whose request is still being sent: the
        answer is whole (trailers-only, say: a check of the HEADERS failed), and
        the call is over. grpclib would go on waiting for window to send the rest
        of the request, from a server that need not read it (and that need not
        reset the stream): until the call's timeout. gRPC clients stop sending
        (and reset the stream): end the send here; grpclib then raises the
        trailers' status (an OK one is no answer to a request not sent in full)."""
        h2_stream = self._h2.streams.get(stream_id) if self._h2 is not None else None
        if h2_stream is None or h2_stream.closed:
            return  # the request was all sent: the stream ended as it should
        stream = self.processor.streams.get(stream_id)
        if stream is not None:
            stream.__terminated__(
                f"{_PROTOCOL_ERROR}: the server ended the call before its request was sent"
            )

    def _protocol_error(self, reason: str = _PROTOCOL_ERROR) -> None:
        log.debug("HTTP/2 protocol error from the server", exc_info=True)
        self.protocol_error = True
        self._error_reason = reason
        self.lost.set()
        self.processor.close(reason)

    def _flooded(self) -> None:
        """The server sends frames h2 answers (PING, SETTINGS) and reads none of
        the answers: each would wait in the write buffer, for ever. Cut it off."""
        log.warning("%s: closing the connection", _FLOODED)
        self._protocol_error(f"{_PROTOCOL_ERROR}: {_FLOODED}")
        if self._socket is not None:
            self._socket.abort()  # drops the write buffer at once

    def _graceful_goaway(self, last_stream_id: int) -> None:
        log.debug("graceful GOAWAY (last stream %d): draining the connection", last_stream_id)
        self.gate.fail_all()  # calls waiting for a stream here go to a new connection
        for stream_id, stream in list(self.processor.streams.items()):
            if stream_id > last_stream_id:
                # Never processed by the server: safe to send again elsewhere.
                stream.__terminated__(_GOAWAY_REFUSED)

    @property
    def closed(self) -> bool:
        """grpclib closed the connection (keepalive's ping went unanswered, the
        channel closed): no new call goes on it, even before it is lost."""
        return self.lost.is_set() or (self._writer is not None and self._writer.closed)

    def _lost_reason(self, exc: BaseException | None) -> str:
        """The end of the connection's streams, as map_grpc_error words it."""
        if self.protocol_error:
            return self._error_reason
        if self.connection.ping_unanswered:
            timeout = self.connection._config._keepalive_timeout
            return (
                f"{_LOST}: no answer to a keepalive ping from {self.url} within "
                f"keepalive_timeout = {timeout:g} s (frozen, or the network is down?)"
            )
        why = self._goaway_note or exc
        return f"{_LOST} (salience server at {self.url})" + (f": {why}" if why else "")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set()
        self.gate.fail_all()
        self.processor.close(reason=self._lost_reason(exc))
        if self._h2 is not None:
            # A call that waits for the write buffer to drain before its HEADERS is
            # not the processor's yet: woken, it finds the connection lost (unsent).
            self._h2.lost = True
            self.connection.write_ready.set()


class _StreamGate:
    """Calls wait here, first come first served, for one of the server's
    MAX_CONCURRENT_STREAMS (100 by h2's default, 128 behind nginx); CloseSession
    goes ahead of new calls.

    grpclib's own wait for a free stream wakes every waiter each time a stream
    ends and lets whoever runs first take it: under load (hundreds of agents on
    one connection) a CloseSession could wait past ``close_timeout`` and leave its
    session on the server, and every release woke hundreds of tasks. Here a
    release wakes exactly one waiter. Loop side only.
    """

    __slots__ = ("active", "calls", "cleanups", "limit", "on_queue")

    def __init__(self) -> None:
        self.active: int = 0  # admitted calls whose stream has not ended
        self.calls: deque[asyncio.Future[None]] = deque()
        self.cleanups: deque[asyncio.Future[None]] = deque()
        self.limit: int = 2**31  # the server's MAX_CONCURRENT_STREAMS, once its SETTINGS came
        # Detached calls waiting for a late reply (GrpcTransport.unary), in the
        # order they were detached: each call that has to wait makes one of them
        # (the first whose reply has not come) give its stream up sooner, or as
        # many as it takes to go under a limit the server lowered (see enter).
        self.on_queue: dict[Callable[[], bool], None] = {}

    @property
    def queued(self) -> bool:
        """Calls wait for a stream."""
        return bool(self.calls or self.cleanups)

    def set_limit(self, limit: int) -> None:
        if self.queued:
            # Lowered below the streams open: calls already waiting need that many
            # more to end (each made one late wait give way as it came).
            self._give_way(max(0, self.active - limit) - max(0, self.active - self.limit))
        self.limit = limit
        self._admit()

    def _give_way(self, need: int) -> None:
        """Make ``need`` detached calls waiting for a late reply (the first ones
        whose reply has not come) give their streams up sooner."""
        on_queue = self.on_queue
        while on_queue and need > 0:
            shorten = next(iter(on_queue))
            del on_queue[shorten]
            if shorten():
                need -= 1

    async def enter(self, cleanup: bool) -> None:
        if self.active < self.limit and not self.cleanups and (cleanup or not self.calls):
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self.cleanups if cleanup else self.calls
        queue.append(fut)
        # One stream ends for it, or more: past a SETTINGS that lowered the limit
        # below the streams open, that many more must end before any call goes.
        self._give_way(max(1, self.active - self.limit + 1))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.leave()  # admitted just as it was cancelled: pass the stream on
            elif fut in queue:
                queue.remove(fut)
            raise

    def leave(self) -> None:
        self.active -= 1
        if self.calls or self.cleanups:
            self._admit()

    def _admit(self) -> None:
        while self.active < self.limit:
            queue = self.cleanups or self.calls
            if not queue:
                return
            fut = queue.popleft()
            if not fut.done():  # (a cancelled waiter's future is)
                fut.set_result(None)
                self.active += 1

    def fail_all(self) -> None:
        """The connection is gone or draining: its waiters go again on a new one."""
        for queue in (self.cleanups, self.calls):
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_exception(StreamTerminatedError(_CLOSED_UNSENT))


class _CoalescingTransport:
    """The socket transport as grpclib's connection sees it: writes wait in a
    list and go out as one, right before the loop next selects.

    A unary call's HEADERS and DATA, and the frames of every call that wrote in
    the same loop iteration, then leave in one ``send`` instead of one each,
    which saves a system call per frame here and a read in the server. Nothing
    waits longer than the iteration that wrote it.
    """

    __slots__ = ("_before_select", "_chunks", "_hangup", "_real", "closed", "peer_gone")

    def __init__(
        self,
        real: asyncio.WriteTransport,
        before_select: Callable[[Callable[[], object]], None],
    ) -> None:
        self._real = real
        self._before_select = before_select
        self._chunks: list[bytes] = []
        self.closed = False  # grpclib closed the connection (lost follows soon)
        self.peer_gone = False  # a ping went unanswered: close() aborts
        # TLS: a write that fails closes the socket's transport under the TLS one,
        # whose is_closing() stays False; the socket says it (see flush).
        self._hangup: select.poll | None = None
        sock = real.get_extra_info("socket")
        tls = real.get_extra_info("sslcontext") is not None
        if tls and sock is not None and hasattr(select, "poll"):  # (not on Windows)
            self._hangup = select.poll()
            self._hangup.register(sock.fileno(), 0)  # (errors and hang-ups: always told)

    def write(self, data: bytes) -> None:
        if not data:
            return
        chunks = self._chunks
        chunks.append(data)
        if len(chunks) == 1:
            self._before_select(self.flush)

    def flush(self) -> bool:
        """Write what waits; True when the write failed (the connection reset:
        asyncio closed the transport and ``call_soon``s its loss)."""
        chunks = self._chunks
        if chunks:
            self._chunks = []
            real = self._real
            if not real.is_closing():
                real.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                # (Over TLS the socket's own state: reset, its reader is gone too.
                # At worst a hang-up that select would have told: one more turn.)
                return real.is_closing() or (
                    self._hangup is not None and bool(self._hangup.poll(0))
                )
        return False

    def is_closing(self) -> bool:
        return self._real.is_closing()

    def write_now(self, data: bytes) -> None:
        """Write what waits in the list, then ``data``, straight to the socket: only
        if asyncio holds nothing unsent, so that it goes to the kernel at once,
        behind whole frames (a peer that stopped reading may leave room for only
        part of it: that part goes). What waits goes first: a reset must not name a
        stream whose HEADERS the peer never got."""
        chunks, self._chunks = self._chunks, []
        real = self._real
        if not real.is_closing() and real.get_write_buffer_size() == 0:
            real.write(b"".join([*chunks, data]))

    def close(self) -> None:
        self.closed = True
        if self.peer_gone:
            # Over plain TCP, close() ends the connection only once its write
            # buffer has drained, which a frozen peer never does: a request body
            # waiting there (a big image) kept the connection, and its calls,
            # open with no end.
            self._real.abort()
            return
        self.flush()  # a reset or GOAWAY written just before still goes out
        if self._real.get_extra_info("ssl_object") is not None:
            # Over TLS, close() first trades close_notify alerts, for up to 30 s
            # (asyncio's ssl_shutdown_timeout), and only then is the connection
            # lost: a server found frozen by keepalive kept every call waiting that
            # long, and a client's exit (its loop stops at once) left the socket
            # open. HTTP/2 needs no close_notify (its frames say where they end).
            self._real.abort()
        else:
            self._real.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)


def _run_now(fn: Callable[[], object]) -> None:
    fn()


class _PocChannel(Channel):
    sessions_open: Callable[[], bool] = staticmethod(lambda: False)
    url = "the server"
    redact: Callable[[str], str] = staticmethod(str)
    too_many_pings: Callable[[bool, bool], None] = staticmethod(lambda calls_open, pinged: None)
    before_select: Callable[[Callable[[], object]], None] = staticmethod(_run_now)
    unindexed_headers: frozenset[str] = frozenset()
    shut = False  # closed by the transport: for good, never connected again

    def close(self) -> None:
        self.shut = True
        super().close()

    async def __connect__(self) -> H2Protocol:
        # grpclib connects a closed channel again when a call comes to it late (a
        # call that took the channel before the client closed, or before it was
        # replaced), and a connect in flight when it closes completes unclosed:
        # either way a connection that nothing would ever close. Nothing of the
        # call was sent yet, so it may go again on a fresh connection. Nor does a
        # channel whose connection was lost connect again: a call let through as
        # it died (an error GOAWAY) would go out on that new connection while
        # _exchange judges it by the old one's GOAWAY (sent again, run twice).
        if self.shut or (self._protocol is not None and not self._connected):
            raise StreamTerminatedError(_CLOSED_UNSENT)
        protocol = await super().__connect__()
        if self.shut:
            super().close()
            raise StreamTerminatedError(_CLOSED_UNSENT)
        return protocol

    def _protocol_factory(self) -> H2Protocol:
        protocol = _PocH2Protocol(Handler(), self._config, self._h2_config)
        protocol.sessions_open = self.sessions_open
        protocol.url = self.url
        protocol.redact = self.redact
        protocol.too_many_pings = self.too_many_pings
        protocol.before_select = self.before_select
        protocol.unindexed_headers = self.unindexed_headers
        return protocol


@final
class deadline:  # used like the function it replaced
    """Bound the block by ``timeout`` seconds; raise :class:`PocApiTimeout` when it passes.

    ``None`` means no bound (the caller's own cancel scopes still apply).
    A timeout is retriable ("nothing was sent") when ``unsent()`` says so, or,
    with ``composite``, when no call made inside the block (in any task it
    started) began to send: no gRPC call wrote its HEADERS, no HTTP request
    began to write its headers.

    A class with KI-protected enter and exit, not a ``@contextmanager``: a Ctrl-C
    landing in contextlib's ``__exit__`` would leave the generator's cancel scope
    open, and trio then fails with "Cancel scope stack corrupted".
    """

    __slots__ = ("_call", "_composite", "_scope", "_timeout", "_token", "_unsent", "_what")

    def __init__(
        self,
        timeout: SupportsFloat | None,
        what: str | Callable[[], str],
        *,
        unsent: Callable[[], bool] | None = None,
        composite: bool = False,
    ) -> None:
        self._timeout = check_timeout("timeout", timeout)
        self._what = what  # (a callable: named when it times out)
        # Says, once the block has ended, whether nothing of it reached the server.
        self._unsent = unsent
        self._composite = composite
        self._scope: trio.CancelScope | None = None
        self._call: e.call_scope | None = None
        self._token: Token[e.Sent | None] | None = None

    @trio.lowlevel.enable_ki_protection
    def __enter__(self) -> None:
        if self._timeout is not None:
            if self._composite:
                sent = e.Sent(e.BLOCK_SENT.get())
                self._token = e.BLOCK_SENT.set(sent)
                self._unsent = lambda: not sent.any
            self._scope = trio.CancelScope(relative_deadline=self._timeout)
            self._scope.__enter__()
            # An HTTP error body read in the block takes its deadline (_http).
            self._call = e.call_scope(self._scope)
            self._call.__enter__()

    @trio.lowlevel.enable_ki_protection
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope, self._scope = self._scope, None
        if scope is None:
            return
        call, self._call = self._call, None
        if call is not None:
            call.__exit__()
        token, self._token = self._token, None
        if token is not None:
            e.BLOCK_SENT.reset(token)
        scope.__exit__(exc_type, exc, tb)  # raises whatever is not its own Cancelled
        if scope.cancelled_caught:
            what = self._what if isinstance(self._what, str) else self._what()
            # (.4g: a timeout derived from a deadline, 0.499989 s, shows as 0.5 s.)
            msg = f"{what}: no answer within {self._timeout:.4g} s"
            if self._unsent is not None and self._unsent():
                raise e.PocApiTimeout(f"{msg}; nothing was sent", retriable=True) from None
            raise e.PocApiTimeout(msg) from None


@final
class _ServerStream:
    """The block of :meth:`GrpcTransport.server_stream` (a class: see ``StreamBlock``)."""

    __slots__ = (
        "_block",
        "_extra",
        "_max_bytes",
        "_max_items",
        "_method",
        "_progress",
        "_request",
        "_transport",
    )

    def __init__(
        self,
        transport: GrpcTransport,
        method: str,
        request: bytes,
        max_items: int,
        max_bytes: int,
        extra_metadata: tuple[tuple[str, str], ...],
    ) -> None:
        self._transport = transport
        self._method = method
        self._request = request
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._extra = extra_metadata
        self._block: StreamBlock[bytes] | None = None
        self._progress = _Progress()

    @property
    def sent(self) -> bool:
        """Whether the request's HEADERS were written: the server may have seen it.

        False again between two attempts (the last one never processed: refused,
        or above a GOAWAY's last stream id; the next one's HEADERS not out yet).
        Final once the block has exited (its asyncio side has ended then).
        """
        return not self._progress.unsent()

    @property
    def server_ended(self) -> bool:
        """Whether the server has ended the stream (END_STREAM received): all it
        sent is in the client's memory, though perhaps not in the block's buffer
        yet (read from the trio thread: a flag that only ever turns True)."""
        raw = self._progress.raw
        return raw is not None and bool(raw.buffer._eof)

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> BatchReceiver[bytes]:
        t = self._transport
        path = SERVICE + self._method
        t._check_size(self._request, path)
        request, extra, progress = self._request, self._extra, self._progress

        async def produce(sink: Sink[bytes]) -> None:
            try:
                await t._exchange(
                    path, Cardinality.UNARY_STREAM, request, sink, progress, extra_metadata=extra
                )
            except Exception as exc:
                _raise_mapped(exc, path, closed=t._closed, redact=t._redact)

        t._take_slot(self._method)
        try:
            block = t._bridge.stream(
                produce,
                max_items=self._max_items,
                max_bytes=self._max_bytes,
                unsettled=progress.mark_unsettled,  # it may yet be sent (see sent)
            )
            rx = await block.__aenter__()
        except BaseException:
            t._give_slot()
            raise
        self._block = block
        return rx

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(self, *exc_info: object) -> None:
        assert self._block is not None, "exited a stream never entered"
        try:
            await self._block.__aexit__(*exc_info)
        finally:
            self._transport._give_slot()
