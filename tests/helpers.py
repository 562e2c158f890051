"""Helpers shared by the top-level tests (a module of its own: `conftest` names collide)."""

from __future__ import annotations

import asyncio
from typing import Any

import trio

from poc_api.server import ReferenceServer


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    """Poll a server-side condition (servers run on their own thread)."""
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the server lives on another thread
            await trio.sleep(0.002)


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
