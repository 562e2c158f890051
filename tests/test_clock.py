"""poc_api under pytest-trio's ``autojump_clock`` (a MockClock that jumps whenever
every task waits): its waits for the loop thread and the HTTP server are I/O in
flight the clock cannot see, and it must not jump over them (``_clock``)."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time

import pytest
import trio
import trio.testing

import poc_api
from poc_api._clock import HOLD_SECONDS, hold_clock
from poc_api.server import ReferenceServer, ServerConfig
from poc_api.testing import NGINX, nginx_grpc_proxy, reference_server, reference_servers

HELLO = [{"role": "user", "content": "Hello there"}]


async def test_a_processs_first_client_entry_is_not_jumped_over(
    autojump_clock: trio.testing.MockClock,
    server: ReferenceServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first client of a process loads the CA certificates in a thread, a wait
    # the clock cannot see: it jumped 30 s over it, and the enclosing deadline
    # fired at the next call.
    from poc_api import _transport

    monkeypatch.setattr(_transport, "_DEFAULT_SSL", {})  # (as in a new process)
    with trio.fail_after(30):
        async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
            assert await client.tokenize("hi")


async def test_calls_with_timeouts_run_under_an_autojumping_clock(
    autojump_clock: trio.testing.MockClock,
    server: ReferenceServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every timeout here fired at once before: the clock jumped to it while the
    # call waited for the loop thread ("OpenSession: no answer within 5 s"), and
    # the client's exit left its thread behind.
    caplog.set_level(logging.WARNING, logger="poc_api")
    client = poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url)
    async with client:
        async with client.session(timeout=5) as s:
            await s.prefill([1, 2, 3])
            sampling = poc_api.SamplingParams(max_tokens=5)
            async with s.generate([4], sampling=sampling, token_timeout=5, timeout=5) as events:
                tokens = [ev async for ev in events if isinstance(ev, poc_api.Token)]
            assert len(tokens) == 5
        [scored] = await client.score([poc_api.Tokens([1, 2, 3, 4])], [(1, 4)], timeout=5)
        assert math.isfinite(scored.logprob)
        async with client.conversation() as conv:
            async with conv.stream(
                [poc_api.Tokens([5, 6])], sampling=sampling, timeout=5
            ) as events:
                async for _ in events:
                    pass
        assert await client.tokenize("hello", timeout=5)
        async with client.chat_stream(HELLO, model="m", timeout=5) as chat:
            async for _ in chat:
                pass
        assert (await client.chat(HELLO, model="m", timeout=5)).text
        thread = client._bridge.thread if client._bridge is not None else None
    assert thread is not None and not thread.is_alive()
    assert autojump_clock.autojump_threshold == 0  # the user's, back
    assert not caplog.records, [r.getMessage() for r in caplog.records]


async def test_the_users_own_sleeps_still_jump(
    autojump_clock: trio.testing.MockClock, client: poc_api.ApiClient
) -> None:
    async with client.session() as s:
        started, virtual = time.monotonic(), trio.current_time()
        await trio.sleep(3600)  # between calls: nothing of poc_api's in flight
        await s.prefill([1, 2])
        await trio.sleep(3600)
    assert trio.current_time() - virtual >= 7200
    assert time.monotonic() - started < HOLD_SECONDS


async def test_a_deadline_around_a_busy_agent_fires_in_about_real_time(
    autojump_clock: trio.testing.MockClock, client: poc_api.ApiClient
) -> None:
    # An agent that keeps calling never lets the run idle, so a held clock must
    # move by itself: with only the threshold raised, virtual time stood still
    # and "run the agent for 1 s" ran forever.
    started = time.monotonic()
    calls = 0
    with trio.move_on_after(1) as scope:
        while time.monotonic() - started < 15:
            await client.score([poc_api.Tokens([1, 2, 3, 4])], [(1, 4)])
            calls += 1
    assert scope.cancelled_caught, f"no deadline after {calls} calls in 15 s"
    assert time.monotonic() - started < 5
    assert autojump_clock.rate == 0 and autojump_clock.autojump_threshold == 0


async def test_a_users_sleep_inside_a_chat_stream_still_jumps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The stream's task read ahead (held) for as long as the server streamed, so a
    # sleep of the reader's own, between events, lasted until the stream's end.
    async with reference_server(token_delay_ms=20) as server:
        async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
            async with client.chat_stream(HELLO, model="m", max_tokens=100) as events:
                await events.__anext__()
                started = time.monotonic()
                await trio.sleep(30)
                assert time.monotonic() - started < HOLD_SECONDS / 2
                rest = [event async for event in events]
    assert isinstance(rest[-1], poc_api.ChatDone)


async def test_a_server_that_never_answers_still_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Held, the clock jumps once the run has sat idle HOLD_SECONDS of real time.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # never accepted: the connection is made, nothing answers
        port = sock.getsockname()[1]
        client = poc_api.ApiClient(
            "http://127.0.0.1:1/v1", grpc_url=f"http://127.0.0.1:{port}", close_timeout=1
        )
        started, virtual = time.monotonic(), trio.current_time()
        async with client:
            with pytest.raises(poc_api.PocApiTimeout, match="within 30 s"):
                async with client.session(timeout=30):
                    pass
    assert trio.current_time() - virtual >= 30
    assert time.monotonic() - started < 5 * HOLD_SECONDS + 5
    assert autojump_clock.autojump_threshold == 0


async def test_a_cancelled_stream_is_settled_under_an_autojumping_clock(
    autojump_clock: trio.testing.MockClock,
    client: poc_api.ApiClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The reset of a cancelled stream waits (bounded) for the loop thread; the
    # bound jumped at once, and the session's state was guessed.
    caplog.set_level(logging.WARNING, logger="poc_api")
    async with client.session() as s:
        sampling = poc_api.SamplingParams(max_tokens=100_000)
        with trio.move_on_after(10):
            async with s.generate([1, 2], sampling=sampling) as events:
                async for _ in events:
                    await trio.sleep(1)  # the deadline comes in virtual time
        assert s.lost
    assert not caplog.records, [r.getMessage() for r in caplog.records]


async def test_the_testing_servers_start_and_stop_under_a_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Starting and stopping wait for a worker thread: the clock jumped to the
    # deadline at once (TooSlowError in 0.05 s of real time).
    with trio.fail_after(30):
        async with reference_server() as server:
            async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
                await c.tokenize("a")
        async with reference_servers(2) as servers:
            assert len({s.grpc_url for s in servers}) == 2


# Skipped, saying so, where nginx is missing outside CI (as tests/test_nginx.py is).
@pytest.mark.skipif(
    not os.path.exists(NGINX) and not os.environ.get("CI"),
    reason=f"nginx is not installed at {NGINX} (apt-get install nginx-light)",
)
async def test_the_nginx_proxy_starts_and_stops_under_a_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(30):
        async with ReferenceServer(ServerConfig(port=0)) as server:
            async with nginx_grpc_proxy([server.grpc_url]) as url:
                assert url.startswith("http://")


async def test_hold_clock_nests_across_tasks_and_gives_the_threshold_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    held = trio.Event()
    release = trio.Event()

    async def holder() -> None:
        with hold_clock():
            held.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        with hold_clock():
            assert autojump_clock.autojump_threshold == HOLD_SECONDS
            assert autojump_clock.rate == 1.0
            nursery.start_soon(holder)
            await held.wait()
            with hold_clock():
                pass
            assert autojump_clock.autojump_threshold == HOLD_SECONDS
        assert autojump_clock.autojump_threshold == HOLD_SECONDS  # the other task holds
        release.set()
    assert autojump_clock.autojump_threshold == 0 and autojump_clock.rate == 0


async def test_hold_clock_keeps_a_threshold_the_user_set_meanwhile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with hold_clock():
        assert autojump_clock.rate == 1.0
        autojump_clock.autojump_threshold = 0.25
        autojump_clock.rate = 2.0
    assert autojump_clock.autojump_threshold == 0.25
    assert autojump_clock.rate == 2.0
    with hold_clock():
        autojump_clock.rate = 3.0
    assert autojump_clock.rate == 3.0 and autojump_clock.autojump_threshold == 0.25


async def test_a_threshold_the_user_lowers_during_a_hold_is_held_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Set while a stream was being read (a hold never released), the user's 0 was
    # left in force: every later call was jumped over (OpenSession timed out in
    # 0.00 s of real time).
    with hold_clock():
        autojump_clock.autojump_threshold = 0
        autojump_clock.rate = 0
        with hold_clock():
            assert autojump_clock.autojump_threshold == HOLD_SECONDS
            assert autojump_clock.rate == 1.0
    assert autojump_clock.autojump_threshold == 0 and autojump_clock.rate == 0


async def test_hold_clock_leaves_a_high_threshold_and_other_clocks_alone() -> None:
    clock = trio.lowlevel.current_clock()
    with hold_clock():
        assert trio.lowlevel.current_clock() is clock  # nothing to hold: not a MockClock

    async def main() -> None:
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        with hold_clock():
            assert clock.autojump_threshold == 5.0
        assert clock.autojump_threshold == 5.0

    # A threshold above the hold's is already safe: untouched.
    await trio.to_thread.run_sync(
        lambda: trio.run(main, clock=trio.testing.MockClock(autojump_threshold=5.0))
    )


def test_importing_poc_api_imports_no_test_machinery() -> None:
    # The hold once imported trio.testing for MockClock, and trio.testing imports
    # pytest's internals: 40 ms more on every `import poc_api` (a CLI's start).
    code = (
        "import sys, poc_api, poc_api.cli\n"
        "print(sorted(m for m in ('trio.testing', '_pytest', 'pytest') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
