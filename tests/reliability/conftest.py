"""Fixtures for the reliability suite: misbehaving servers, server processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from misbehaving import MisbehavingServer, misbehaving_server
from reliability_helpers import ServerProcess, free_port_pair


@pytest.fixture
async def bad_server() -> AsyncIterator[MisbehavingServer]:
    """A misbehaving gRPC server, well-behaved until a test plans otherwise."""
    async with misbehaving_server() as srv:
        yield srv


@pytest.fixture
def server_process() -> Iterator[type[ServerProcess]]:
    """Start reference-server processes; every one is killed at the end of the test."""
    started: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def start(self, timeout: float = 20.0) -> None:
            if self not in started:
                started.append(self)
            super().start(timeout)

    yield Tracked
    for proc in started:
        proc.close()


@pytest.fixture
def port_pair() -> int:
    return free_port_pair()
