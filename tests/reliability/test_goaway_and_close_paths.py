"""Transport paths no other test reached: a close refused once, calls queued for a stream
on a graceful GOAWAY, error GOAWAYs right behind whole answers, too_many_pings between
calls, the loop thread dying under a reader."""

from __future__ import annotations

import logging

import pytest
import trio
from helpers import reset_while_the_loop_is_busy
from misbehaving import DUMMY_BASE_URL, MisbehavingServer, Reply
from reliability_helpers import wait_for

import poc_api
from poc_api import SamplingParams, _transport


def client_for(srv: MisbehavingServer, **kw: object) -> poc_api.ApiClient:
    kw.setdefault("close_timeout", 1.0)
    return poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, **kw)  # type: ignore[arg-type]


async def test_calls_waiting_for_a_stream_go_to_a_new_connection_on_a_graceful_goaway(
    bad_server: MisbehavingServer,
) -> None:
    # The one stream the server allows is held by a Generate; an OpenSession waits
    # for it. The server then drains the connection (GOAWAY NO_ERROR): the waiting
    # call was never sent, so it goes on a new connection, and both succeed.
    bad_server.max_streams = 1
    async with client_for(bad_server) as c:
        async with c.session() as s:
            bad_server.plan("Generate", Reply("goaway_graceful", tokens=20, interval=0.03))
            opened: list[str] = []

            async def opener() -> None:
                async with c.session() as other:
                    opened.append(other.session_id)

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    async with s.generate([1], sampling=SamplingParams(max_tokens=20)) as ev:
                        await ev.__anext__()
                        nursery.start_soon(opener)
                        events = [e async for e in ev]
        assert isinstance(events[-1], poc_api.Done)
        assert len(opened) == 1
    opens = bad_server.calls_to("OpenSession")
    assert [x.connection for x in opens] == [1, 2]


async def test_an_error_goaway_right_behind_a_whole_unary_answer_keeps_the_answer(
    bad_server: MisbehavingServer,
) -> None:
    # The answer and its OK trailers came; the GOAWAY that follows in the same read
    # (it names this stream as processed) ends the connection, not the call.
    bad_server.plan("OpenSession", Reply("answer_then_goaway", status=2))
    async with client_for(bad_server) as c:
        with trio.fail_after(5):
            async with c.session() as s:
                assert s.session_id.startswith("mis-1-")
            await wait_for(lambda: len(bad_server.closed) == 1)
    assert bad_server.closed == bad_server.opened


async def test_an_error_goaway_behind_the_rest_of_a_split_reply_keeps_the_answer(
    bad_server: MisbehavingServer,
) -> None:
    # The reader waits for the rest of a message when the rest, the trailers and an
    # error GOAWAY come in one read: it resumes where it stopped, from the buffer.
    bad_server.plan("OpenSession", Reply("split_then_goaway", status=2, interval=0.05))
    async with client_for(bad_server) as c:
        with trio.fail_after(5):
            async with c.session() as s:
                assert s.session_id.startswith("mis-1-")
            await wait_for(lambda: len(bad_server.closed) == 1)
    assert bad_server.closed == bad_server.opened


async def test_a_too_many_pings_goaway_between_calls_stops_idle_pings_only(
    bad_server: MisbehavingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Pinged between calls (a session open, keepalive_idle): the server's
    # "too_many_pings" GOAWAY turns idle pings off for the next connections, and
    # leaves keepalive_time as it was; the session's next call goes on connection 2.
    caplog.set_level(logging.WARNING, logger="poc_api")
    async with client_for(bad_server, keepalive_time=0.1, keepalive_timeout=2.0) as c:
        async with c.session() as s:
            await wait_for(lambda: any(n == 1 for n, _ in bad_server.ping_times))
            # The server's GOAWAY, written on connection 1 by a held call's handler:
            # hold a Generate, cancel it (its stream ends), then send the GOAWAY.
            bad_server.plan("Generate", Reply("hold"))
            cancel = trio.CancelScope()
            async with trio.open_nursery() as nursery:

                async def held_call() -> None:
                    with cancel:
                        await s.prefill([1])

                nursery.start_soon(held_call)
                # Held once the server has it (not after a fixed 0.2 s: a loaded
                # 2-core CI may take longer to get the call there).
                await wait_for(lambda: bad_server.held is not None)
                cancel.cancel()
            assert bad_server.held is not None
            held, _ = bad_server.held
            transport = c._transport
            assert isinstance(transport, _transport.GrpcTransport)
            assert transport._channel is not None
            protocol = transport._channel._protocol
            await wait_for(lambda: not protocol.processor.streams)  # type: ignore[union-attr]
            held.h2.close_connection(error_code=11, additional_data=b"too_many_pings")
            await held.flush()
            await wait_for(
                lambda: transport._keepalive is not None and not transport._keepalive.idle
            )
            assert transport._keepalive is not None and transport._keepalive.time == 0.1
        with trio.fail_after(5):  # (s was lost: its call was cancelled)
            async with c.session() as s2:
                await s2.prefill([1, 2])
    assert bad_server.calls_to("Generate")[-1].connection == 2
    warned = [r.getMessage() for r in caplog.records if "too_many_pings" in r.getMessage()]
    assert len(warned) == 1 and "keepalive_idle off" in warned[0], warned


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_stream_read_when_the_loop_thread_dies_fails_at_once(
    bad_server: MisbehavingServer,
) -> None:
    # A Generate streams slowly; its reader waits for the next token when the loop
    # thread dies (a bug): the reader fails with the dead thread's error, not a hang.
    from helpers import kill_loop_thread

    async with client_for(bad_server) as c:
        with trio.fail_after(10):
            async with c.session() as s:
                bad_server.plan("Generate", Reply(tokens=50, interval=0.2))
                assert c._bridge is not None
                bridge = c._bridge

                async def kill() -> None:
                    await trio.sleep(0.05)
                    await trio.to_thread.run_sync(kill_loop_thread, bridge)

                async with trio.open_nursery() as nursery:
                    with pytest.raises(trio.ClosedResourceError, match="asyncio thread"):
                        async with s.generate([1], sampling=SamplingParams(max_tokens=50)) as ev:
                            await ev.__anext__()
                            nursery.start_soon(kill)
                            async for _ in ev:
                                pass


async def test_a_close_session_refused_by_the_server_is_sent_once_and_logged_once(
    bad_server: MisbehavingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The server answers CloseSession with an error status (INTERNAL): no lost
    # connection, so nothing to send again. It was sent (and logged) twice.
    caplog.set_level(logging.WARNING, logger="poc_api")
    bad_server.plan("CloseSession", Reply("trailers_only", status=13))
    async with client_for(bad_server) as c:
        with trio.fail_after(5):
            async with c.session() as s:
                await s.prefill([1, 2])
    assert [x.kind for x in bad_server.calls_to("CloseSession")] == ["trailers_only"]
    warned = [r.getMessage() for r in caplog.records if "CloseSession" in r.getMessage()]
    assert len(warned) == 1, warned


async def test_a_connection_reset_found_by_a_coalesced_write_fails_the_call_at_once(
    bad_server: MisbehavingServer,
) -> None:
    # The peer resets the connection (RST) while the loop thread is busy; its next
    # write (a call's HEADERS, written right before the loop selects) fails with
    # ECONNRESET, and asyncio drops the socket's reader and call_soon's the
    # connection's loss. The loop blocked in select with the timeout it chose
    # before the write: the call failed only at the keepalive's timer, 300 s on.
    async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=bad_server.url) as client:
        with trio.fail_after(5):
            async with client.session():  # the connection is up
                pass
        (conn,) = bad_server._open
        await reset_while_the_loop_is_busy(client, conn)
