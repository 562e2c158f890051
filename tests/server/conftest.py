"""Fixtures for the reference server tests: real servers on loopback, two client stacks.

- :class:`SyncSalience` drives a plain grpclib client on its own asyncio loop
  (never poc_api's client), every call bounded by ``asyncio.wait_for``.
- ``pb`` compiles ``proto/salience.proto`` with grpcio-tools for an independent peer.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
from grpclib.client import Channel

from poc_api._proto.salience import (
    AppendImageRequest,
    AppendImageResponse,
    CloseSessionRequest,
    Done,
    GenerateEvent,
    GenerateRequest,
    OpenSessionRequest,
    PositionRange,
    SalienceStub,
    Token,
)
from poc_api.server import ReferenceServer, ServerConfig

T = TypeVar("T")
CALL_TIMEOUT = 15.0
ROOT = Path(__file__).resolve().parents[2]


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` passes; returns the last value."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return cond()
        time.sleep(0.01)
    return True


class SyncSalience:
    """A blocking facade over a grpclib ``SalienceStub`` with one HTTP/2 connection."""

    def __init__(self, port: int, api_key: str | None = None) -> None:
        self._runner = asyncio.Runner(loop_factory=asyncio.SelectorEventLoop)
        self.metadata = {"authorization": f"Bearer {api_key}"} if api_key else None

        async def make() -> Channel:
            return Channel("127.0.0.1", port)

        self.channel: Channel = self._runner.run(make())
        self.stub = SalienceStub(self.channel, metadata=self.metadata)

    def run(self, aw: Awaitable[T] | Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        """Run one awaitable on this client's loop, failing after ``timeout`` seconds."""

        async def bounded() -> T:
            return await asyncio.wait_for(aw, timeout)

        return self._runner.run(bounded())

    def open(self) -> str:
        return self.run(self.stub.open_session(OpenSessionRequest())).session_id

    def close_session(self, sid: str) -> None:
        self.run(self.stub.close_session(CloseSessionRequest(session_id=sid)))

    def events(self, sid: str, **kw: Any) -> list[GenerateEvent]:
        """All events of one Generate call; ranges may be given as (start, end) tuples."""
        for key in ("logprobs_ranges", "readout_ranges"):
            if key in kw:
                kw[key] = [PositionRange(start=s, end=e) for s, e in kw[key]]

        async def collect() -> list[GenerateEvent]:
            req = GenerateRequest(session_id=sid, **kw)
            return [ev async for ev in self.stub.generate(req)]

        return self.run(collect())

    def generate(self, sid: str, **kw: Any) -> tuple[list[Token], Done]:
        """Generate and split the events into tokens and the final Done (checked last)."""
        evs = self.events(sid, **kw)
        assert evs and evs[-1].done is not None, evs
        assert all(e.token is not None for e in evs[:-1])
        return [e.token for e in evs[:-1] if e.token is not None], evs[-1].done

    def append_image(self, sid: str, image: bytes, mime: str, offset: int, **kw: Any) -> Any:
        req = AppendImageRequest(session_id=sid, image=image, mime=mime, offset=offset, **kw)
        res: AppendImageResponse = self.run(self.stub.append_image(req))
        return res

    def close(self) -> None:
        self.channel.close()
        self._runner.close()


ServerFactory = Callable[..., ReferenceServer]


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """Start servers with a given config; all are stopped at the end of the test."""
    started: list[ReferenceServer] = []

    def make(**cfg: Any) -> ReferenceServer:
        srv = ReferenceServer(ServerConfig(**cfg))
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[ReferenceServer]:
    """One default server (readout on, no key) shared by a test module."""
    srv = ReferenceServer(ServerConfig())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ReferenceServer) -> Iterator[SyncSalience]:
    c = SyncSalience(server.grpc_port)
    yield c
    c.close()


@pytest.fixture
def connect() -> Iterator[Callable[..., SyncSalience]]:
    """Open grpclib clients to any server; all closed at the end of the test."""
    clients: list[SyncSalience] = []

    def open_client(srv: ReferenceServer, api_key: str | None = None) -> SyncSalience:
        c = SyncSalience(srv.grpc_port, api_key)
        clients.append(c)
        return c

    yield open_client
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def pb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, ModuleType]]:
    """(salience_pb2, salience_pb2_grpc) compiled from proto/ with grpcio-tools."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    out = tmp_path_factory.mktemp("grpcio_gen")
    proto_dir = ROOT / "proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(proto_dir / "salience.proto"),
        ]
    )
    assert rc == 0, "protoc failed"
    sys.path.insert(0, str(out))
    try:
        yield (
            importlib.import_module("salience_pb2"),
            importlib.import_module("salience_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))
