"""Helpers shared by the top-level tests (a module of its own: `conftest` names collide)."""

from __future__ import annotations

import asyncio
import functools
import gc
import re
import socket
import struct
import threading
import time
import warnings
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
)
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

import poc_api
from poc_api import ChatDone, ChatToolCall, Usage
from poc_api.server import ReferenceServer


@contextmanager
def resource_warnings() -> Iterator[list[str]]:
    """The ResourceWarnings (messages) of what the block leaves to the garbage
    collector, filled in at its end. Garbage from before the block (an earlier
    test's, in this worker) is collected first and not counted: it is not this
    test's to judge (a CI run failed on a socket another test had left)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield found
        gc.collect()
    found.extend(str(w.message) for w in caught if issubclass(w.category, ResourceWarning))


def opened_models(records: list[Any]) -> list[str]:
    """The models the reference servers' OpenSession calls named, in order, from
    log records (``caplog.records``; ``poc_api.server.grpc`` at DEBUG)."""
    return [
        r.args[0]
        for r in records
        if r.name == "poc_api.server.grpc" and r.msg.startswith("OpenSession for model")
    ]


async def block_the_run(after: float, seconds: float) -> None:
    """Block the whole trio run for ``seconds`` (as a loaded machine may)."""
    await trio.sleep(after)
    time.sleep(seconds)  # noqa: ASYNC251 - the point: no task runs meanwhile


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    """Poll a server-side condition (servers run on their own thread)."""
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the server lives on another thread
            await trio.sleep(0.002)


def die_like_a_bug() -> None:
    """A loop callback that ends the loop thread, as a bug would (SystemExit escapes
    asyncio's callback handling)."""
    raise SystemExit


def kill_loop_thread(bridge: Any) -> None:
    """End an ``AsyncioBridge``'s loop thread as a bug would, and wait until it has."""
    bridge.loop.call_soon_threadsafe(die_like_a_bug)
    bridge.thread.join(5)
    assert not bridge.thread.is_alive()


def loop_threads() -> list[threading.Thread]:
    """The asyncio loop threads of poc_api clients (bridges) alive now."""
    return [t for t in threading.enumerate() if t.name == "poc_api-asyncio"]


@functools.cache  # (a byte at a time in Python: the tests asked for the same ones often)
def make_png(width: int, height: int, seed: int = 0) -> bytes:
    """A valid RGB PNG of the given size (zlib + struct, no imaging library)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(
        b"\x00" + bytes((x * 7 + y * 13 + seed) % 256 for x in range(width * 3))
        for y in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


async def wait_until_streaming_stalls(server: ReferenceServer, quiet: float = 0.3) -> int:
    """Wait until the server has stopped writing Generate data (a client window is
    shut) and return the bytes it wrote; stalling takes a few MiB of writing."""
    with trio.fail_after(60):
        last = -1
        while True:
            now = server.state().bytes_streamed
            if now == last:
                return now
            last = now
            await trio.sleep(quiet)


async def asyncio_tasks_pending(client: Any) -> list[asyncio.Task[Any]]:
    """Unfinished asyncio tasks on the client's loop thread (the census itself aside)."""

    async def census() -> list[asyncio.Task[Any]]:
        me = asyncio.current_task()
        return [t for t in asyncio.all_tasks() if t is not me and not t.done()]

    result: list[asyncio.Task[Any]] = await client._bridge.run(census)
    return result


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def read_request(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """One HTTP/1.1 request: its head and its Content-Length body (which httpx writes
    apart from the head: it may come in a segment of its own)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        more = await stream.receive_some(65536)
        if not more:
            return buf, b""
        buf += more
    head, _, body = buf.partition(b"\r\n\r\n")
    m = re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE)
    while m and len(body) < int(m.group(1)):
        body += await stream.receive_some(65536)
    return head, body


@asynccontextmanager
async def http_server(handler: Handler) -> AsyncIterator[str]:
    """A trio TCP server on 127.0.0.1:0 running ``handler`` per connection; yields
    its base_url (``.../v1``). A client that hangs up first is fine."""

    async def serve(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1"
        nursery.cancel_scope.cancel()


async def read_beside_a_second_reader(events: AsyncIterable[Any]) -> list[Any]:
    """Read ``events`` to the end in one task while another task tries to read too:
    that one must get ``trio.BusyResourceError`` (as with trio's own streams).
    Returns what the first task read."""
    got: list[Any] = []

    async def read() -> None:
        got.extend([e async for e in events])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        try:
            await events.__aiter__().__anext__()
        except trio.BusyResourceError:
            pass
        else:
            raise AssertionError("a second reader got an event, not BusyResourceError")
    return got


async def aclose_under_a_reader(
    events: Any, settle: Callable[[], Awaitable[object]]
) -> list[BaseException]:
    """Close a stream (its ``aclose()``) while another task waits in a read of it,
    once ``settle()`` has let that task get there. Returns what the waiting read
    raised, if it raised ``trio.ClosedResourceError``."""
    caught: list[BaseException] = []

    async def reader() -> None:
        try:
            async for _ in events:
                pass
        except trio.ClosedResourceError as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await settle()
        await events.aclose()
    return caught


def stray_cancelled_fails(
    test: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., Coroutine[Any, Any, None]]:
    """The test fails when a ``trio.Cancelled`` that no cancelled scope around it
    caused leaves it.

    pytest-trio cancels its own scope around the test as the test ends, and
    that scope then swallows a stray Cancelled: a test whose code under test
    leaked one (a cancellation bug) passed. Found by mutation testing: a
    ``pytest.raises(KeyboardInterrupt)`` passed where a Cancelled came out.
    (tests/conftest.py wraps every async test in it.) It sees what leaves the
    test function only: a stray Cancelled in a task of a nursery the test opened
    is swallowed by that nursery's scope, and fixtures are not wrapped.
    """

    @functools.wraps(test)
    async def wrapper(**kwargs: Any) -> None:
        try:
            await test(**kwargs)
        except BaseException as exc:
            if not _only_cancelled(exc):
                raise
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
            except trio.Cancelled:
                raise exc from None  # a real cancellation (pytest-trio's, a fixture's)
            raise AssertionError(
                "a trio.Cancelled left the test that no cancelled scope around it caused"
            ) from exc

    return wrapper


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(sub) for sub in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


@asynccontextmanager
async def heartbeat(period: float = 0.005) -> AsyncIterator[Callable[[], int]]:
    """A task that ticks every ``period`` s during the block; yields a reader of
    the tick count (how often other tasks got to run)."""
    ticks = 0

    async def beat() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(period)
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(beat)
        yield lambda: ticks
        nursery.cancel_scope.cancel()


async def consume_busily(events: AsyncIterable[Any], work: float) -> float:
    """Iterate ``events`` doing ``work`` s of busy work (no checkpoint) per event,
    as a consumer slower than its server; the seconds it took."""
    started = time.perf_counter()
    async for _ in events:
        until = time.perf_counter() + work
        while time.perf_counter() < until:
            pass
    return time.perf_counter() - started


def refusing_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Ports of servers killed for good, kept taken until the test ends (conftest closes them).
HELD_PORTS: list[socket.socket] = []


async def kill_for_good(server: ReferenceServer) -> None:
    """``server.kill()``, then keep its ports taken until the test ends: bound, not
    listening, so a connect is refused as by a dead server. Released, a port may go
    to a server another test starts meanwhile (xdist runs three processes), and a
    client reconnecting to the dead one's address reaches that one, alive."""
    await trio.to_thread.run_sync(server.kill)
    for port in (server.grpc_port, server.http_port):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:  # taken already: the rare case this guards against
            sock.close()
            continue
        HELD_PORTS.append(sock)


def chat_done(
    finish_reason: str, usage: Usage | None, tool_calls: tuple[ChatToolCall, ...] = ()
) -> ChatDone:
    """The ChatDone of a one-choice stream: its choice repeated in ``choices``."""
    only = ChatDone(finish_reason, None, tool_calls)
    return ChatDone(finish_reason, usage, tool_calls, (only,))


async def reset_while_the_loop_is_busy(
    client: poc_api.ApiClient, server_side: trio.SocketStream
) -> None:
    """Reset the connection (RST from ``server_side``, the server's end of it) while
    the client's loop thread is busy in a callback, then open a session: its
    HEADERS, written right before the loop selects, find the reset. The session
    must fail with ``ServerUnavailable`` at once (within 5 s), not at the
    keepalive's timer."""
    bridge = client._bridge
    assert bridge is not None

    async def reset_soon() -> None:
        await trio.sleep(0.1)
        linger = struct.pack("ii", 1, 0)
        server_side.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        server_side.socket.close()  # RST, while the loop thread is busy

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reset_soon)
        bridge.call_soon(lambda: time.sleep(0.4))  # a busy loop iteration
        with trio.fail_after(5), pytest.raises(poc_api.ServerUnavailable):
            async with client.session():
                pass  # pragma: no cover


async def uploads_ended_during_a_small_call(
    client: poc_api.ApiClient, image: bytes, uploads: int, hold: float
) -> int:
    """Start ``uploads`` sessions each appending ``image``; once all send (and
    ``hold`` seconds more), run a small call (open, prefill, close): how many
    uploads ended while it ran. A new call's few bytes must not wait behind them."""
    sending = 0
    all_sending = trio.Event()
    uploaded = 0

    async def upload() -> None:
        nonlocal sending, uploaded
        async with client.session() as s:
            sending += 1
            if sending == uploads:
                all_sending.set()
            await s.append_image(image, "image/png")
        uploaded += 1

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(uploads):
                nursery.start_soon(upload)
            await all_sending.wait()
            await trio.sleep(hold)  # the uploads hold the connection's window
            before = uploaded
            async with client.session() as s:
                await s.prefill([1, 2, 3])
            return uploaded - before
    raise AssertionError("unreachable")  # pragma: no cover
