"""A server process killed mid-stream and restarted on the same ports."""

from __future__ import annotations

import logging
import signal
import time

import pytest
import trio
import trio.lowlevel
from reliability_helpers import ServerProcess

import poc_api
from poc_api import SamplingParams
from poc_api.server import tokenize

HELLO = tokenize("The quick brown fox")
STREAMS = 50


async def test_sigkill_fails_every_stream_typed_within_a_second_and_restart_recovers(
    server_process: type[ServerProcess], port_pair: int
) -> None:
    args = ("--max-context", "2000000", "--ignore-eos")
    first = server_process(port_pair, *args)
    first.start()
    # A small buffer: events already received are delivered before the error, and
    # this test times the error, not the draining of 50 deep backlogs.
    async with poc_api.ApiClient(
        first.base_url, grpc_url=first.grpc_url, close_timeout=1.0, max_buffered_events=64
    ) as client:
        flowing = 0
        all_flowing = trio.Event()
        killed_at: list[float] = []
        outcomes: list[tuple[BaseException | None, float]] = []

        async def stream() -> None:
            nonlocal flowing
            counted = False
            async with client.session() as s:
                try:
                    async with s.generate(HELLO, sampling=SamplingParams(max_tokens=10**8)) as ev:
                        async for _ in ev:
                            if not counted:
                                counted = True
                                flowing += 1
                                if flowing == STREAMS:
                                    all_flowing.set()
                            await trio.lowlevel.checkpoint()  # share the loop with 49 others
                except poc_api.PocApiError as exc:
                    outcomes.append((exc, time.monotonic()))
                else:
                    outcomes.append((None, time.monotonic()))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(STREAMS):
                    nursery.start_soon(stream)
                await all_flowing.wait()
                first.signal(signal.SIGKILL)
                killed_at.append(time.monotonic())

        assert len(outcomes) == STREAMS
        errors = [e for e, _ in outcomes]
        assert all(isinstance(e, poc_api.ServerUnavailable) for e in errors), {
            type(e).__name__ for e in errors
        }
        # The error itself must be prompt (the CloseSession of the block exit is not
        # timed: it fails against a dead server, bounded by close_timeout).
        latest = max(t for _, t in outcomes) - killed_at[0]
        assert latest < 1.0, f"slowest stream failed {latest:.2f} s after the kill"

        first.kill()
        second = server_process(port_pair, *args)
        second.start()
        with trio.fail_after(10):
            async with client.session() as s:
                done = await s.prefill(HELLO)
            assert done.total_tokens == len(HELLO)
            score = await client.score([poc_api.Tokens(HELLO)], [(1, 5)])
            assert len(score) == 1
        assert second.state()["connections_total"] == 1


def test_a_server_process_started_again_listens_once_start_returns(
    server_process: type[ServerProcess], port_pair: int
) -> None:
    # A restart's start() found the first start's "grpc_url:" line in the output
    # file and returned at once, before the new process listened.
    server = server_process(port_pair)
    server.start()
    server.kill()
    server.start()
    assert server.state()["connections_total"] == 0  # (refused, with the bug)


async def test_calls_cut_by_keepalive_on_a_stalled_server_are_reset_not_run_on_waking(
    server_process: type[ServerProcess], port_pair: int
) -> None:
    # A server stalled (SIGSTOP: a GC pause, a busy host) with OpenSessions in
    # flight: keepalive closed the connection (the calls failed, and in a pool went
    # to another server), but the requests waited in the server's socket and it ran
    # them on waking: one session each that nobody knew of, until idle eviction.
    # The resets are best effort: in CI (lowest pins, 2 runs of about 10) the
    # server still ran all five, for a reason not found. So: three tries, one of
    # which must leave nothing; without the resets every try leaves five.
    server = server_process(port_pair)
    server.start()
    left = []
    for _ in range(3):
        left.append(await _stall_with_opens_in_flight(server))
        if not left[-1]:
            return
    raise AssertionError(f"sessions left on the server, each try: {left}")


async def _stall_with_opens_in_flight(server: ServerProcess) -> list[str]:
    """Stop ``server`` with 5 OpenSessions in flight until keepalive cuts them;
    the sessions it made for them (it holds them a while after it went on)."""
    before = set(server.state()["session_ids"])  # (an earlier try's)
    async with poc_api.ApiClient(
        server.base_url,
        grpc_url=server.grpc_url,
        keepalive_time=0.5,
        keepalive_timeout=0.5,
        close_timeout=0.5,
    ) as client:
        async with client.session() as s:
            await s.prefill([1])  # connected
        server.signal(signal.SIGSTOP)
        # Stopped once the kernel says so: a loaded VM ran it on for a while after
        # kill() returned, and it took the OpenSessions then (seen in CI: one
        # opened, or all five made before the stop took).
        with trio.fail_after(5):
            while _proc_state(server.pid) != "T":  # noqa: ASYNC110 - another process
                await trio.sleep(0.001)
        failed: list[BaseException] = []

        async def opener() -> None:
            try:
                async with client.session():
                    raise AssertionError("opened on a stopped server")  # pragma: no cover
            except poc_api.ServerUnavailable as exc:
                failed.append(exc)

        try:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(5):
                        nursery.start_soon(opener)
            await trio.sleep(0.3)  # stalled a while longer, as a stall is
        finally:
            server.signal(signal.SIGCONT)
        assert len(failed) == 5 and "keepalive" in str(failed[0])
        await trio.sleep(1.0)  # it reads what waited, the resets with it
    return sorted(set(server.state()["session_ids"]) - before)


async def test_re_closes_make_no_connection_attempt_of_their_own(
    server_process: type[ServerProcess], port_pair: int
) -> None:
    # Sessions whose close could not reach a killed server are sent again in the
    # background. Those re-closes connected on their own, failed, and put the
    # transport in reconnect backoff: a call made as the server came back failed
    # at once ("could not be reached 0.068 s ago", seen in CI).
    server = server_process(port_pair)
    server.start()
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, close_timeout=0.5
    ) as client:
        transport = client._grpc()._endpoints[0].transport
        async with client.session() as s:
            await s.prefill([1])
            server.kill()
        failed = transport._failures  # connection attempts failed in a row
        await trio.sleep(2.5)  # re-close rounds were due at 1 s and 3 s
        assert transport._failures == failed
        server.start()
        with trio.fail_after(10):
            async with client.session() as s2:  # connects; the first call works
                await s2.prefill([1])


async def test_the_last_re_close_at_a_client_close_tries_a_gone_server_briefly(
    server_process: type[ServerProcess], port_pair: int, caplog: pytest.LogCaptureFixture
) -> None:
    # The client's close connects for its last re-closes (a network blip leaves the
    # sessions on a server that is still there); a server that is gone refuses the
    # connection, and the close neither waits for it nor fails.
    caplog.set_level(logging.DEBUG, "poc_api.grpc")
    server = server_process(port_pair)
    server.start()
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, close_timeout=2.0
    ) as client:
        async with client.session() as s:
            await s.prefill([1])
            server.kill()
        started = trio.current_time()
    assert trio.current_time() - started < 1.0
    assert "1 session(s) whose CloseSession did not get through" in caplog.text


def _proc_state(pid: int) -> str:
    """A process's state letter from /proc (``T``: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
