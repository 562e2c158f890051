"""Shared fixtures: the reference server over real TCP, and clients talking to it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

import poc_api
from poc_api.server import ReferenceServer, ServerConfig

# Hypothesis: deterministic and CI-friendly.
os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")


@pytest.fixture(scope="session")
def server() -> Iterator[ReferenceServer]:
    """One reference server for the whole run (its own asyncio thread, loopback TCP).

    Large context and no EOS so that long decodes (cancellation tests) keep going.
    """
    srv = ReferenceServer(ServerConfig(max_context=2_000_000, ignore_eos=True))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def eos_server() -> Iterator[ReferenceServer]:
    """A server with the default (EOS-honouring, 8192-position) configuration."""
    srv = ReferenceServer(ServerConfig())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def client(server: ReferenceServer) -> AsyncIterator[poc_api.ApiClient]:
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        yield c


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    """Poll a server-side condition (servers run on their own thread)."""
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
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


@pytest.fixture
def png_56x28() -> bytes:
    return make_png(56, 28)
