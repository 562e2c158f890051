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
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, final
from urllib.parse import urlsplit

import attrs
import h2.errors
import h2.exceptions
import trio
from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from . import _errors as e
from ._bridge import AsyncioBridge, BatchReceiver, Sink
from ._wire import RawCodec

__all__ = ["GrpcTarget", "GrpcTransport", "KeepAlive", "deadline", "map_grpc_error"]

log = logging.getLogger("poc_api.grpc")

SERVICE = "/salience.Salience/"


@final
@attrs.frozen
class GrpcTarget:
    """Where the gRPC endpoint is: host, port, and whether to use TLS."""

    host: str
    port: int
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> GrpcTarget:
        """Parse ``http://host:port`` / ``https://host:port`` (a path is ignored)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"gRPC URL must look like http://host:port, got {url!r}")
        tls = parts.scheme == "https"
        port = parts.port if parts.port is not None else (443 if tls else 80)
        return cls(parts.hostname, port, tls)

    @property
    def url(self) -> str:
        """The target as a URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


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
        cls = _STATUS_ERRORS.get(exc.status, e.RpcError)
        msg = f"{name}: {exc.status.name}: {exc.message or ''}".rstrip(": ")
        return cls(msg, grpc_status=exc.status.name)
    if isinstance(exc, StreamTerminatedError):
        text = str(exc)
        if _retriable_reset(exc):
            return e.ServerUnavailable(
                f"{name}: the server refused the stream: {text}", retriable=True
            )
        if "reset by remote" in text:
            return e.StreamCancelled(f"{name}: {text}", grpc_status="CANCELLED")
        return e.ServerUnavailable(f"{name}: connection lost: {text}", grpc_status="UNAVAILABLE")
    if isinstance(exc, asyncio.TimeoutError):
        return e.PocApiTimeout(f"{name}: deadline exceeded")
    if isinstance(exc, ConnectionError | OSError):
        return e.ServerUnavailable(f"{name}: cannot reach the server: {exc}")
    if isinstance(exc, ProtocolError | h2.exceptions.ProtocolError):
        return e.ProtocolViolation(f"{name}: protocol error: {exc}")
    return None


def _reset_cancel(stream: Stream[Any, Any]) -> None:
    """Reset an unfinished stream with CANCEL before grpclib resets it with NO_ERROR."""
    if not getattr(stream, "_send_request_done", False):
        return
    raw = stream._stream
    try:
        if raw.closable:
            raw.reset_nowait(h2.errors.ErrorCodes.CANCEL)
    except Exception:  # the connection is going away anyway
        log.debug("stream reset failed", exc_info=True)


async def _recv_raw(raw: Any, max_size: int, path: str) -> bytes | None:
    """Read one length-prefixed gRPC message, refusing oversized ones up front.

    grpclib would buffer a message of any announced size; reading the 5-byte
    prefix ourselves lets the limit apply before the body is read (and skips
    grpclib's per-message codec and event dispatch).
    """
    header = await raw.recv_data(5)
    if not header:
        return None
    if len(header) != 5:
        raise e.ProtocolViolation(f"{path}: the stream ended inside a message header")
    if header[0]:
        raise e.ProtocolViolation(f"{path}: compressed messages are not supported")
    size = int.from_bytes(header[1:5], "big")
    if size > max_size:
        raise e.LimitExceeded(
            f"{path}: the server announced a {size}-byte message; max_message_size is {max_size}"
        )
    if size == 0:
        return b""
    data: bytes = await raw.recv_data(size)
    if len(data) != size:
        raise e.ProtocolViolation(f"{path}: the stream ended inside a message")
    return data


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


def _retriable_reset(exc: BaseException) -> bool:
    # grpclib words a peer's RST_STREAM as "... error_code: <code>"; the code
    # prints as a name or a number depending on the Python version.
    text = str(exc)
    return isinstance(exc, StreamTerminatedError) and (
        "REFUSED_STREAM" in text or text.rstrip().endswith(": 7")
    )


_MAX_BACKOFF = 1.0
_REFUSED_RETRIES = 2


@final
class GrpcTransport:
    """The gRPC side of a client: one channel, opened on first use, shared by all calls.

    After the connection is lost the next call opens a new channel; failed
    connection attempts back off exponentially, at most ``1 s`` apart.
    """

    def __init__(
        self,
        bridge: AsyncioBridge,
        target: GrpcTarget,
        *,
        metadata: tuple[tuple[str, str], ...],
        max_message_size: int,
        keepalive: KeepAlive | None = KeepAlive(),
        ssl_context: _ssl.SSLContext | None = None,
    ) -> None:
        self._bridge = bridge
        self._target = target
        self._metadata = metadata
        self._max_message_size = max_message_size
        self._keepalive = keepalive
        self._ssl_context = ssl_context
        self._channel: Channel | None = None
        self._channel_was_connected = False
        self._failures = 0
        self._retry_at = 0.0
        self._closed = False
        self.channels_opened = 0
        """How many channels this transport has opened (1 unless it reconnected)."""

    @property
    def target(self) -> GrpcTarget:
        """The endpoint this transport talks to."""
        return self._target

    def _config(self) -> Configuration:
        if self._keepalive is None:
            return Configuration()
        return Configuration(
            _keepalive_time=self._keepalive.time,
            _keepalive_timeout=self._keepalive.timeout,
            _keepalive_permit_without_calls=False,
            # grpclib stops pinging after 2 pings without data and spaces pings by
            # 5 min by default: both would defeat detection of a frozen peer.
            _http2_max_pings_without_data=0,
            _http2_min_sent_ping_interval_without_data=self._keepalive.time,
        )

    def _new_channel(self) -> Channel:
        log.debug("opening shared salience channel: grpc_url=%s", self._target.url)
        ssl: Any = None
        if self._target.tls:
            ssl = self._ssl_context if self._ssl_context is not None else True
        self.channels_opened += 1
        self._channel_was_connected = False
        return Channel(
            self._target.host,
            self._target.port,
            ssl=ssl,
            codec=RawCodec(),
            config=self._config(),
        )

    async def _ready_channel(self) -> Channel:
        # Runs on the asyncio side, which is single-threaded: plain attributes are
        # enough, and grpclib's own connect lock makes concurrent first callers
        # share one TCP/HTTP2 connection.
        if self._closed:
            raise RuntimeError("the client is closed")
        channel = self._channel
        if channel is not None and channel._connected:
            return channel
        if channel is not None and self._channel_was_connected:
            # The connection was lost: start over with a fresh channel.
            log.info("salience connection to %s lost; reconnecting", self._target.url)
            channel.close()
            channel = None
        if channel is None:
            channel = self._channel = self._new_channel()
        loop = asyncio.get_running_loop()
        delay = self._retry_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await channel.__connect__()
        except Exception:
            self._failures += 1
            backoff = min(_MAX_BACKOFF, 0.05 * 2 ** (self._failures - 1))
            self._retry_at = loop.time() + backoff
            raise
        if channel is self._channel:
            self._failures = 0
            self._retry_at = 0.0
            self._channel_was_connected = True
        return channel

    def _check_size(self, data: bytes, method: str) -> None:
        if len(data) > self._max_message_size:
            raise e.LimitExceeded(
                f"{method.rsplit('/', 1)[-1]}: message of {len(data)} bytes exceeds "
                f"max_message_size={self._max_message_size}"
            )

    async def unary(self, method: str, request: bytes, *, timeout: float | None = None) -> bytes:
        """Call a unary RPC; a trio checkpoint. Raises a :class:`PocApiError`.

        ``timeout`` bounds the whole call (PocApiTimeout); a stream the server
        refused (REFUSED_STREAM, never processed) is retried up to twice.
        """
        path = SERVICE + method
        self._check_size(request, path)
        max_size = self._max_message_size

        async def call() -> bytes:
            for attempt in range(_REFUSED_RETRIES + 1):
                channel = await self._ready_channel()
                try:
                    async with channel.request(
                        path, Cardinality.UNARY_UNARY, bytes, bytes, metadata=self._metadata
                    ) as stream:
                        try:
                            await stream.send_message(request, end=True)
                            await stream.recv_initial_metadata()
                            with stream._wrapper:
                                reply = await _recv_raw(stream._stream, max_size, path)
                            await stream.recv_trailing_metadata()
                        except BaseException:
                            _reset_cancel(stream)
                            raise
                except StreamTerminatedError as exc:
                    if attempt < _REFUSED_RETRIES and _retriable_reset(exc):
                        log.debug("%s: stream refused by the server; retrying", method)
                        continue
                    raise
                if reply is None:
                    raise e.ProtocolViolation(f"{method}: the server sent no reply message")
                return reply
            raise AssertionError("unreachable")  # pragma: no cover

        try:
            with deadline(timeout, method):
                return await self._bridge.run(call)
        except Exception as exc:
            mapped = map_grpc_error(exc, path)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc

    @asynccontextmanager
    async def server_stream(
        self, method: str, request: bytes, *, max_items: int
    ) -> AsyncIterator[BatchReceiver[bytes]]:
        """Open a server-streaming RPC whose raw messages the block drains in batches.

        Leaving the block before the stream ended resets it with CANCEL and waits
        until that is done. Errors are raised, mapped, by ``receive_batch``. A
        stream refused before any message (REFUSED_STREAM) is retried up to twice.
        """
        path = SERVICE + method
        self._check_size(request, path)
        max_size = self._max_message_size

        async def produce(sink: Sink[bytes]) -> None:
            try:
                for attempt in range(_REFUSED_RETRIES + 1):
                    channel = await self._ready_channel()
                    received = False
                    try:
                        async with channel.request(
                            path, Cardinality.UNARY_STREAM, bytes, bytes, metadata=self._metadata
                        ) as stream:
                            try:
                                await stream.send_message(request, end=True)
                                await stream.recv_initial_metadata()
                                raw = stream._stream
                                push = sink.push
                                # grpclib's wrapper wakes this task if the connection dies.
                                with stream._wrapper:
                                    while True:
                                        msg = await _recv_raw(raw, max_size, path)
                                        if msg is None:
                                            break
                                        received = True
                                        push(msg)
                                        if sink.full:
                                            await sink.wait_space()
                                await stream.recv_trailing_metadata()
                            except BaseException:
                                _reset_cancel(stream)
                                raise
                    except StreamTerminatedError as exc:
                        if not received and attempt < _REFUSED_RETRIES and _retriable_reset(exc):
                            log.debug("%s: stream refused by the server; retrying", method)
                            continue
                        raise
                    return
            except Exception as exc:
                mapped = map_grpc_error(exc, path)
                if mapped is None or mapped is exc:
                    raise
                raise mapped from exc

        async with self._bridge.stream(produce, max_items=max_items) as rx:
            yield rx

    async def aclose(self) -> None:
        """Close the channel (idempotent). In-flight calls fail with ServerUnavailable."""
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is not None:

            async def close() -> None:
                channel.close()

            await self._bridge.run(close)


@contextmanager
def deadline(timeout: float | None, what: str) -> Iterator[None]:
    """Bound the block by ``timeout`` seconds; raise :class:`PocApiTimeout` when it passes.

    ``None`` means no bound (the caller's own cancel scopes still apply).
    """
    if timeout is None:
        yield
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout!r}")
    with trio.move_on_after(timeout) as scope:
        yield
    if scope.cancelled_caught:
        raise e.PocApiTimeout(f"{what}: no answer within {timeout:g} s")
