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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, final
from urllib.parse import urlsplit

import attrs
import h2.errors
import h2.exceptions
from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from . import _errors as e
from ._bridge import AsyncioBridge, BatchReceiver, Sink
from ._wire import RawCodec

__all__ = ["GrpcTarget", "GrpcTransport", "map_grpc_error"]

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


@final
class GrpcTransport:
    """The gRPC side of a client: one channel, opened on first use, shared by all calls."""

    def __init__(
        self,
        bridge: AsyncioBridge,
        target: GrpcTarget,
        *,
        metadata: tuple[tuple[str, str], ...],
        max_message_size: int,
        ssl_context: _ssl.SSLContext | None = None,
    ) -> None:
        self._bridge = bridge
        self._target = target
        self._metadata = metadata
        self._max_message_size = max_message_size
        self._ssl_context = ssl_context
        self._channel: Channel | None = None
        self._closed = False

    @property
    def target(self) -> GrpcTarget:
        """The endpoint this transport talks to."""
        return self._target

    def _get_channel(self) -> Channel:
        # Runs on the asyncio side, which is single-threaded: no lock needed to
        # create the object, and grpclib's own connect lock makes concurrent first
        # callers share one TCP/HTTP2 connection.
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._channel is None:
            log.debug("opening shared salience channel: grpc_url=%s", self._target.url)
            ssl: Any = None
            if self._target.tls:
                ssl = self._ssl_context if self._ssl_context is not None else True
            self._channel = Channel(
                self._target.host,
                self._target.port,
                ssl=ssl,
                codec=RawCodec(),
                config=Configuration(),
            )
        return self._channel

    def _check_size(self, data: bytes, method: str) -> None:
        if len(data) > self._max_message_size:
            raise e.LimitExceeded(
                f"{method.rsplit('/', 1)[-1]}: message of {len(data)} bytes exceeds "
                f"max_message_size={self._max_message_size}"
            )

    async def unary(self, method: str, request: bytes) -> bytes:
        """Call a unary RPC; a trio checkpoint. Raises a :class:`PocApiError`."""
        path = SERVICE + method
        self._check_size(request, path)

        async def call() -> bytes:
            channel = self._get_channel()
            async with channel.request(
                path, Cardinality.UNARY_UNARY, bytes, bytes, metadata=self._metadata
            ) as stream:
                try:
                    await stream.send_message(request, end=True)
                    reply = await stream.recv_message()
                    await stream.recv_trailing_metadata()
                except BaseException:
                    _reset_cancel(stream)
                    raise
            if reply is None:
                raise e.ProtocolViolation(f"{method}: the server sent no reply message")
            self._check_size(reply, path)
            return reply

        try:
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
        until that is done. Errors are raised, mapped, by ``receive_batch``.
        """
        path = SERVICE + method
        self._check_size(request, path)
        check_size: Callable[[bytes, str], None] = self._check_size

        async def produce(sink: Sink[bytes]) -> None:
            channel = self._get_channel()
            try:
                async with channel.request(
                    path, Cardinality.UNARY_STREAM, bytes, bytes, metadata=self._metadata
                ) as stream:
                    try:
                        await stream.send_message(request, end=True)
                        push = sink.push
                        while True:
                            msg = await stream.recv_message()
                            if msg is None:
                                break
                            check_size(msg, path)
                            push(msg)
                            if sink.full:
                                await sink.wait_space()
                        await stream.recv_trailing_metadata()
                    except BaseException:
                        _reset_cancel(stream)
                        raise
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
