"""Shared fixtures: the reference server over real TCP, and clients talking to it."""

from __future__ import annotations

import faulthandler
import inspect
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Generator, Iterator

import pytest
from helpers import HELD_PORTS, make_png, stray_cancelled_fails
from hypothesis import settings

import poc_api
from poc_api.server import ReferenceServer, ServerConfig

# Hypothesis: no per-example deadline (a loaded 2-core CI box is slow), and on CI
# the same examples every run so that a red build is reproducible; locally it
# keeps exploring.
settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# A test that hangs must fail the run, not stall it until CI's own limit: after
# this many seconds (the slowest test takes a few) the run prints every thread's
# stack and exits non-zero.
HANG_SECONDS = float(os.environ.get("POC_TEST_HANG_SECONDS", "120"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    timer = threading.Timer(_hang_seconds(item), _hung, args=(item,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        while HELD_PORTS:  # (helpers.kill_for_good)
            HELD_PORTS.pop().close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    # Before pytest-trio's own hook wraps the test function in its runner.
    if isinstance(item, pytest.Function) and item.get_closest_marker("trio") is not None:
        hypothesis = getattr(item.obj, "hypothesis", None)
        if hypothesis is not None:
            if inspect.iscoroutinefunction(hypothesis.inner_test):
                hypothesis.inner_test = stray_cancelled_fails(hypothesis.inner_test)
        elif inspect.iscoroutinefunction(item.obj):
            item.obj = stray_cancelled_fails(item.obj)
    yield


def _hang_seconds(item: pytest.Item) -> float:
    marker = item.get_closest_marker("hang_seconds")
    own = float(marker.args[0]) if marker is not None else 0.0
    return max(HANG_SECONDS, own)


def _hung(item: pytest.Item) -> None:
    capman = item.config.pluginmanager.getplugin("capturemanager")
    captured = ("", "")
    if capman is not None:
        # Back to the real terminal; show what the test printed so far.
        captured = capman.read_global_capture()
        capman.suspend_global_capture(in_=True)
    err = sys.stderr
    err.write(f"\n\nHANG: {item.nodeid} still running after {_hang_seconds(item):.0f} s\n")
    err.write(f"--- captured stdout ---\n{captured[0]}\n--- captured stderr ---\n{captured[1]}\n")
    err.flush()
    faulthandler.dump_traceback(file=err, all_threads=True)
    err.flush()
    os._exit(70)


@pytest.fixture
def python_handles_sigint() -> Iterator[None]:
    """Python's own SIGINT handler for the test, so that ``trio.run`` installs its own.

    A shell without job control (CI's) starts background jobs with SIGINT ignored;
    Python and trio then install no handler, and a SIGINT would do nothing.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


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
def wide_server() -> Iterator[ReferenceServer]:
    """Like ``server``, with readouts of 512 floats (64 layers): ~2 KiB per token event.

    For tests that move many bytes (flow-control windows, byte bounds): the same
    bytes take a twentieth of the events, and about half the time, of ``server``'s.
    """
    srv = ReferenceServer(ServerConfig(max_context=2_000_000, ignore_eos=True, n_layers=64))
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


@pytest.fixture
def png_56x28() -> bytes:
    return make_png(56, 28)
