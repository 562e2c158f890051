"""Ctrl-C at every line of poc_api: each call unwinds cleanly, wherever it lands.

test_ctrl_c sends real SIGINTs at random moments; most land while the process
waits, so the narrow places (a library's own ``__exit__``, the line between
starting a thread and recording it) are almost never hit. Here a trace hook
counts the lines that run in poc_api's frames (and contextlib's, which run its
context managers) and, at the N-th one, calls trio's own SIGINT handler with
that frame, exactly what a signal arriving there does: a ``KeyboardInterrupt``
on the spot in unprotected code, or at the next checkpoint in KI-protected code.
Every run must then end in ``KeyboardInterrupt`` out of ``trio.run``, promptly,
with the loop thread gone and no session left on the server: never trio's
"Cancel scope stack corrupted", a hang, or a wait for ``close_timeout``.

Lines where no real signal is handled are skipped: a ``with`` block's normal
exit runs on the ``with`` line, and a signal lands only after that exit's call
has returned (CPython handles signals at calls, loop jumps and function starts).

The scenarios are traced whole, client entry and exit included. A run samples
their lines (see SPREAD_RUNS); every line of each ran when this was written: 0 bad
of 17,743 runs, where the code before it left the loop thread running after a
Ctrl-C in ``ApiClient``'s entry or close, and corrupted trio's cancel scopes after
one in a timed call's ``deadline`` or in httpx's own ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import gc
import os
import random
import signal
import sys
import threading
import time
import traceback
import types
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from helpers import loop_threads, make_png

import poc_api
from poc_api import SamplingParams, Tokens
from poc_api.server import ReferenceServer, ServerConfig

pytestmark = [
    pytest.mark.heavy,  # its subject (trio's KI protection) depends on trio's version
    pytest.mark.skipif(sys.platform == "win32", reason="trio's SIGINT handler"),
    pytest.mark.usefixtures("python_handles_sigint"),  # or trio.run installs no handler
]

# Runs per scenario: lines spread evenly, and lines of enters and exits (a sample
# that differs between Pythons and trio versions). POC_API_KI_FULL=1 runs every line
# (about 18,000 runs, 30 minutes).
SPREAD_RUNS = 12
EDGE_RUNS = 20
FULL = os.environ.get("POC_API_KI_FULL") == "1"
CLOSE_TIMEOUT = 5.0
PNG = make_png(56, 28)
POC = os.path.dirname(poc_api.__file__)
SERVER = os.path.join(POC, "server")


def _traced(code: types.CodeType) -> bool:
    name = code.co_filename
    return (name.startswith(POC) and not name.startswith(SERVER)) or name == contextlib.__file__


@functools.cache
def _with_exits(code: types.CodeType) -> frozenset[int]:
    """Offsets where a ``with`` block's normal exit begins: ``__exit__(None, None, None)``."""
    ins = [i for i in dis.get_instructions(code) if i.opname != "CACHE"]
    return frozenset(
        a.offset
        for a, b, c in zip(ins, ins[1:], ins[2:], strict=False)
        if all(x.opname == "LOAD_CONST" and x.argval is None for x in (a, b, c))
    )


# Where a Ctrl-C most easily tears a resource in half: the runs sample the lines of
# these (each line once, at its first run).
_EDGES = frozenset({"__enter__", "__exit__", "__aenter__", "__aexit__", "aclose", "start"})


def _called_by_us(frame: types.FrameType) -> bool:
    """A contextlib frame running one of poc_api's own context managers."""
    back = frame.f_back
    return (
        frame.f_code.co_filename == contextlib.__file__
        and back is not None
        and back.f_code.co_filename.startswith(POC)
    )


class _Injector:
    """A trace function that delivers SIGINT at the ``at``-th traced line."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen = 0
        self.where = ""
        self.edges: list[int] = []  # the first run of each line of an enter or exit
        self.sites: set[tuple[types.CodeType, int, types.CodeType | None]] = set()

    def __call__(self, frame: types.FrameType, event: str, arg: object) -> Any:
        if self.seen >= self.at:
            return None
        code = frame.f_code
        if event == "line" and _traced(code) and frame.f_lasti not in _with_exits(code):
            self.seen += 1
            if code.co_name in _EDGES or _called_by_us(frame):
                back = frame.f_back
                site = (code, frame.f_lineno, back.f_code if back is not None else None)
                if site not in self.sites:
                    self.sites.add(site)
                    self.edges.append(self.seen)
            if self.seen == self.at:
                sys.settrace(None)
                self.where = f"{os.path.basename(code.co_filename)}:{frame.f_lineno}"
                handler = signal.getsignal(signal.SIGINT)
                if callable(handler):  # trio.run's (checked before the scenario)
                    handler(signal.SIGINT, frame)
        return self


Scenario = Callable[[poc_api.ApiClient], Awaitable[None]]


async def _session(c: poc_api.ApiClient) -> None:
    async with c.session() as s:
        await s.prefill([1, 2, 3], timeout=30)
        async with s.generate([4], sampling=SamplingParams(max_tokens=3), timeout=30) as ev:
            async for _ in ev:
                pass


async def _conversation(c: poc_api.ApiClient) -> None:
    async with c.conversation() as conv:
        sampling = SamplingParams(max_tokens=3)
        async with conv.stream([Tokens([72, 101])], sampling, timeout=30) as ev:
            async for _ in ev:
                pass


async def _score(c: poc_api.ApiClient) -> None:
    await c.score([Tokens([72, 101, 108, 108])], [(1, 3)], timeout=30)


async def _http(c: poc_api.ApiClient) -> None:
    await c.tokenize("hi", timeout=30)
    messages = [{"role": "user", "content": "hi"}]
    async with c.chat_stream(messages, max_tokens=3, timeout=30) as ev:
        async for _ in ev:
            pass


async def _image(c: poc_api.ApiClient) -> None:
    async with c.session() as s:
        await s.prefill([1, 2], timeout=30)
        await s.append_image(PNG, "image/png", timeout=30)


async def _pool(c: poc_api.ApiClient) -> None:
    # Run with two servers (see _run): sessions and calls are spread over both.
    async with c.session() as s:
        async with s.generate([4], sampling=SamplingParams(max_tokens=3)) as ev:
            async for _ in ev:
                pass
    prompts = [([Tokens([72, 101, 108])], [(1, 2)]), ([Tokens([72, 101, 108, 108])], [(1, 3)])]
    await c.score_many(prompts)


SCENARIOS: dict[str, Scenario] = {
    "session": _session,
    "conversation": _conversation,
    "score": _score,
    "http": _http,
    "image": _image,
    "pool": _pool,
}


def _run(servers: list[ReferenceServer], name: str, at: int) -> tuple[str, _Injector]:
    """One ``trio.run`` of the scenario, traced; how it ended."""
    scenario = SCENARIOS[name]
    # The pool scenario talks to both servers; the others to the first.
    grpc_url = [s.grpc_url for s in servers] if name == "pool" else servers[0].grpc_url
    injector = _Injector(at)

    async def main() -> None:
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler) and handler is not signal.default_int_handler, handler
        sys.settrace(injector)
        try:
            base_url = servers[0].base_url
            client = poc_api.ApiClient(base_url, grpc_url=grpc_url, close_timeout=CLOSE_TIMEOUT)
            async with client:
                await scenario(client)
        finally:
            sys.settrace(None)

    # A run that hangs: its stack goes to stderr, which conftest's hang report shows.
    main_thread = threading.get_ident()
    watchdog = threading.Timer(20, _report_hang, args=(main_thread, injector))
    watchdog.daemon = True
    watchdog.start()
    try:
        trio.run(main)
    except KeyboardInterrupt:
        return "KeyboardInterrupt", injector
    except BaseException as exc:  # what the test is looking for
        return f"{type(exc).__name__}: {exc}"[:300], injector
    finally:
        sys.settrace(None)
        watchdog.cancel()
    return "finished", injector


def _report_hang(thread_id: int, injector: _Injector) -> None:
    frame = sys._current_frames().get(thread_id)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else "?"
    loops = len(loop_threads())
    print(
        f"run at line {injector.at} ({injector.where}) still running after 20 s, "
        f"{loops} loop threads; its stack:\n{stack}",
        file=sys.stderr,
        flush=True,
    )


@pytest.fixture(scope="module")
def servers() -> Any:
    started = [ReferenceServer(ServerConfig()), ReferenceServer(ServerConfig())]
    for server in started:
        server.start()
    yield started
    for server in started:
        server.stop()


def _session_ids(servers: list[ReferenceServer]) -> list[str]:
    return sorted(i for s in servers for i in s.state().session_ids)


def _sample(lines: int, edges: list[int]) -> list[int]:
    """The runs to make of ``lines``: every one with POC_API_KI_FULL=1, else ``edges``
    and SPREAD_RUNS spread evenly."""
    if FULL:
        return list(range(1, lines + 1))
    stride = max(1, lines // SPREAD_RUNS)
    return sorted({*edges, *range(1 + (lines % stride) // 2, lines + 1, stride)})


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ctrl_c_at_any_line_unwinds_cleanly(servers: list[ReferenceServer], name: str) -> None:
    outcome, probe = _run(servers, name, at=sys.maxsize)  # counts the lines
    assert outcome == "finished", outcome
    lines = probe.seen
    rng = random.Random(f"{name} {sys.version_info[:2]} {trio.__version__}")
    sample = _sample(lines, rng.sample(probe.edges, min(EDGE_RUNS, len(probe.edges))))
    bad: list[str] = []
    for at in sample:
        before = set(loop_threads())
        started = time.monotonic()
        outcome, injector = _run(servers, name, at)
        took = time.monotonic() - started
        left = [t.name for t in loop_threads() if t not in before]
        give_up = time.monotonic() + 3
        while _session_ids(servers) and time.monotonic() < give_up:
            time.sleep(0.01)
        sessions = _session_ids(servers)
        if outcome == "finished" and injector.seen < at:
            continue  # this run had fewer lines (how many varies a little)
        if outcome != "KeyboardInterrupt" or left or sessions or took > CLOSE_TIMEOUT - 1:
            bad.append(
                f"line {at} ({injector.where}): {outcome}, {took:.2f} s, "
                f"threads {left}, sessions {sessions}"
            )
    assert not bad, f"{len(bad)} of {len(sample)} runs ({lines} lines):\n" + "\n".join(bad)


_RUN_PY = os.path.join(os.path.dirname(trio.__file__), "_core", "_run.py")


def _in_our_spawn(frame: types.FrameType) -> bool:
    """A frame of trio's ``start_soon`` (or the ``spawn_impl`` under it) that poc_api called."""
    if frame.f_code.co_filename != _RUN_PY or frame.f_code.co_name not in (
        "start_soon",
        "spawn_impl",
    ):
        return False
    back = frame.f_back
    for _ in range(3):  # spawn_impl <- start_soon <- poc_api's start_tasks
        if back is None:
            return False
        if back.f_code.co_filename.startswith(POC):
            return True
        back = back.f_back
    return False


class _SpawnInjector(_Injector):
    """SIGINT at the ``at``-th line trio runs to start a task of poc_api's."""

    def __call__(self, frame: types.FrameType, event: str, arg: object) -> Any:
        if self.seen >= self.at:
            return None
        if event == "line" and _in_our_spawn(frame):
            self.seen += 1
            site = (frame.f_code, frame.f_lineno, None)
            if site not in self.sites:  # (each spawn runs the same lines)
                self.sites.add(site)
                self.edges.append(self.seen)
            if self.seen == self.at:
                sys.settrace(None)
                self.where = f"{frame.f_code.co_name}:{frame.f_lineno}"
                handler = signal.getsignal(signal.SIGINT)
                if callable(handler):
                    handler(signal.SIGINT, frame)
        return self


def test_ctrl_c_inside_trio_starting_a_task_of_ours_unwinds_cleanly(
    servers: list[ReferenceServer],
) -> None:
    # trio's start_soon is not KI-protected: a Ctrl-C landing in it as score_many
    # started its tasks left "coroutine ... was never awaited", a task the nursery
    # waited for but never ran (a hang), or TrioInternalError at the run's end.
    prompts = [([Tokens([72, 101, 108 + i])], [(1, 3)]) for i in range(3)]

    def run(at: int) -> tuple[str, _Injector]:
        injector = _SpawnInjector(at)

        async def main() -> None:
            async with poc_api.ApiClient(
                servers[0].base_url, grpc_url=servers[0].grpc_url, close_timeout=CLOSE_TIMEOUT
            ) as client:
                sys.settrace(injector)
                try:
                    await client.score_many(prompts, max_concurrency=2)
                finally:
                    sys.settrace(None)

        watchdog = threading.Timer(20, _report_hang, args=(threading.get_ident(), injector))
        watchdog.daemon = True
        watchdog.start()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # "never awaited"
                trio.run(main)
        except KeyboardInterrupt:
            return "KeyboardInterrupt", injector
        except BaseException as exc:
            return f"{type(exc).__name__}: {exc}"[:300], injector
        finally:
            sys.settrace(None)
            watchdog.cancel()
        return "finished", injector

    outcome, probe = run(sys.maxsize)
    assert outcome == "finished", outcome
    assert probe.seen > 0  # the lines of trio's start_soon are seen
    sample = _sample(probe.seen, probe.edges)  # each line trio runs to start a task, once
    bad = []
    for at in sample:
        gc.collect()  # (a coroutine never awaited warns when collected)
        outcome, injector = run(at)
        if outcome != "KeyboardInterrupt" or _session_ids(servers):
            bad.append(f"line {at} ({injector.where}): {outcome}")
    assert not bad, f"{len(bad)} of {len(sample)} runs:\n" + "\n".join(bad)
