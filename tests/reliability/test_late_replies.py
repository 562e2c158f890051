"""A detached OpenSession (its caller gave up after the request went out) waits up
to _LATE_REPLY_WAIT for its reply, so that a stalled server's late session is closed;
these are the bounds on that wait."""

from __future__ import annotations

import logging
import time
from functools import partial

import pytest
import trio
from misbehaving import MisbehavingServer, Reply
from reliability_helpers import misbehaving_client as client_for
from reliability_helpers import slow_new_connections, wait_for

import poc_api
from poc_api import _transport


async def give_up_opening(
    c: poc_api.ApiClient, after: float, server: MisbehavingServer | None = None
) -> None:
    """Open a session and give up on it ``after`` s in, before its answer came: its
    OpenSession, sent, is detached (it waits for a late reply). With ``server``, not
    before the server has it (a fixed 0.2 s cut the call before it went out on a
    loaded CI machine: nothing was detached)."""
    before = len(server.calls_to("OpenSession")) if server is not None else 0
    with trio.CancelScope() as giving_up:
        async with trio.open_nursery() as nursery:

            async def give_up() -> None:
                await trio.sleep(after)
                if server is not None:
                    await wait_for(lambda: len(server.calls_to("OpenSession")) > before)
                giving_up.cancel()

            nursery.start_soon(give_up)
            async with c.session():
                pass  # pragma: no cover - not answered in time


async def test_a_detached_open_session_does_not_hold_the_servers_last_stream_for_a_minute(
    bad_server: MisbehavingServer,
) -> None:
    # The server allows one stream at a time and stalls on an OpenSession. Its
    # caller gives up: the detached call keeps the only stream while it waits for
    # a late answer. A session already open must not wait a minute behind it for
    # its next call (before 29f5313: reap_timeout, 0.5 s here).
    bad_server.max_streams = 1
    async with client_for(bad_server) as c:
        async with c.session() as s:
            await s.prefill([1, 2])
            bad_server.plan("OpenSession", Reply("silent"))
            await give_up_opening(c, 0.2, bad_server)
            await wait_for(lambda: len(bad_server.calls_to("OpenSession")) == 2)
            with trio.fail_after(10):
                await s.prefill([3], timeout=3)


async def test_a_sessions_close_does_not_time_out_behind_a_detached_open_session(
    bad_server: MisbehavingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # As above: the session's CloseSession waited behind the detached call past
    # close_timeout, then its re-close too, and the session was left on the server.
    bad_server.max_streams = 1
    async with client_for(bad_server, close_timeout=1.0) as c:
        async with c.session() as s:
            await s.prefill([1, 2])
            bad_server.plan("OpenSession", Reply("silent"))
            await give_up_opening(c, 0.2, bad_server)
            await wait_for(lambda: len(bad_server.calls_to("OpenSession")) == 2)
            await trio.sleep(0.3)
        assert bad_server.closed == [s.session_id]
    assert not [r for r in caplog.records if r.levelno >= 30]


async def test_a_late_reply_without_trailers_is_reaped_reap_timeout_after_it(
    bad_server: MisbehavingServer,
) -> None:
    # Given up on before its answer; the answer comes, its trailers never do: the
    # call is reset reap_timeout after the answer, and its session closed.
    from misbehaving import _GRPC_HEADERS

    async with client_for(bad_server, close_timeout=0.5) as c:
        bad_server.plan("OpenSession", Reply("hold"))
        await give_up_opening(c, 0.2, bad_server)
        await wait_for(lambda: bad_server.held is not None)
        assert bad_server.held is not None
        conn, sid = bad_server.held
        await trio.sleep(0.6)  # past reap_timeout since the detach
        await conn.send_headers(sid, _GRPC_HEADERS, end=False)
        await conn.send_data(sid, conn._good_reply(sid, "OpenSession"))
        answered = time.monotonic()
        await wait_for(lambda: bad_server.closed == bad_server.opened == ["mis-1-1"], timeout=3)
        await wait_for(lambda: (1, sid, 8) in bad_server.resets, timeout=10)
        assert time.monotonic() - answered < 10  # reap_timeout (0.5 s) after it, not 60 s


async def test_the_clients_close_cuts_a_detached_call_at_reap_timeout_and_resets_it(
    bad_server: MisbehavingServer,
) -> None:
    bad_server.plan("OpenSession", *[Reply("silent")] * 5)
    async with client_for(bad_server, close_timeout=0.5) as c:
        for _ in range(5):
            await give_up_opening(c, 0.1, bad_server)
        await wait_for(lambda: len(bad_server.calls_to("OpenSession")) == 5)
        began = time.monotonic()
    assert time.monotonic() - began < 10  # reap_timeout (0.5 s), not _LATE_REPLY_WAIT (60 s)
    await wait_for(lambda: len([r for r in bad_server.resets if r[2] == 8]) == 5, timeout=3)


async def test_a_late_reply_cut_by_the_clients_close_is_said(
    bad_server: MisbehavingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The answer comes during the client's close, its trailers never: the close
    # cuts the call at reap_timeout. The session it made is closed, or said to be left.
    from misbehaving import _GRPC_HEADERS

    caplog.set_level(logging.DEBUG, logger="poc_api")
    async with trio.open_nursery() as nursery:
        async with client_for(bad_server, close_timeout=0.5) as c:
            bad_server.plan("OpenSession", Reply("hold"))
            await give_up_opening(c, 0.2, bad_server)
            await wait_for(lambda: bad_server.held is not None)
            assert bad_server.held is not None
            conn, sid = bad_server.held

            async def answer() -> None:
                await trio.sleep(0.1)  # as the client closes
                await conn.send_headers(sid, _GRPC_HEADERS, end=False)
                await conn.send_data(sid, conn._good_reply(sid, "OpenSession"))

            nursery.start_soon(answer)
    assert bad_server.opened == ["mis-1-1"]
    said = [r.getMessage() for r in caplog.records if "left to the server" in r.getMessage()]
    assert bad_server.closed == ["mis-1-1"] or said


async def test_a_detached_open_session_refused_by_a_goaway_is_not_sent_again(
    bad_server: MisbehavingServer,
) -> None:
    # Its caller gave up; then a GOAWAY says the server never processed it. Nothing
    # exists on the server and nobody wants a session: sending it again on a new
    # connection makes one only to close it (a server that stalled, the reason the
    # caller gave up, gets twice the work).
    bad_server.plan("OpenSession", Reply("goaway_open", first_delay=0.5))
    async with client_for(bad_server, close_timeout=0.5) as c:
        await give_up_opening(c, 0.2, bad_server)
        await trio.sleep(1.0)
        assert len(bad_server.calls_to("OpenSession")) == 1
        assert bad_server.opened == []


async def test_past_the_cap_a_detached_call_waits_only_reap_timeout(
    bad_server: MisbehavingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each detached call waiting for a late reply holds a stream and a task: a loop
    # of give-ups against a server that allows many streams kept a minute's worth.
    monkeypatch.setattr(_transport, "_LATE_REPLY_MAX", 1)
    bad_server.plan("OpenSession", Reply("silent"), Reply("silent"))
    async with client_for(bad_server, close_timeout=0.5) as c:
        for _ in range(2):
            await give_up_opening(c, 0.2, bad_server)
        await wait_for(lambda: len(bad_server.resets) == 1, timeout=3)
        await trio.sleep(1.0)
        assert len(bad_server.resets) == 1  # the first still waits for its answer


async def test_a_call_given_up_on_while_its_retry_connects_is_not_sent_again(
    bad_server: MisbehavingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A GOAWAY says the OpenSession was never processed; its retry waits for a new
    # connection (a server coming back slowly), and meanwhile its caller gives up.
    # Nothing exists on the server: the call is to end, not to wait a minute for
    # the connection and then make a session nobody wants (before 29f5313 it was
    # cut at reap_timeout, 0.5 s here).
    slow_new_connections(monkeypatch, 1.5)
    bad_server.plan("OpenSession", Reply("goaway_open", first_delay=0.1))
    async with client_for(bad_server, close_timeout=0.5) as c:
        await give_up_opening(c, 0.4, bad_server)
        await trio.sleep(2.5)
        assert len(bad_server.calls_to("OpenSession")) == 1
        assert bad_server.opened == []


async def test_one_call_waiting_for_a_stream_cuts_one_late_wait_not_all(
    bad_server: MisbehavingServer,
) -> None:
    # Two OpenSessions given up on wait for their late answers, on a server that
    # allows three streams. One call then waits (briefly) for a stream: one stream
    # is all it needs. Cutting every late wait reset both, and both sessions the
    # server made when it came back were left to idle eviction.
    bad_server.max_streams = 3
    async with client_for(bad_server) as c:
        async with c.session() as s1, c.session() as s2:
            bad_server.plan("OpenSession", *[Reply("ok", first_delay=1.5)] * 2)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(give_up_opening, c, 0.2)
                nursery.start_soon(give_up_opening, c, 0.2)
            async with trio.open_nursery() as nursery:  # one of these waits for a stream
                nursery.start_soon(s1.prefill, [1, 2])
                nursery.start_soon(s2.prefill, [1, 2])
            await wait_for(lambda: len(bad_server.opened) == 4, timeout=3)
            await trio.sleep(0.5)
            late = bad_server.opened[2:]
            left = [sid for sid in late if sid not in bad_server.closed]
            assert len(left) <= 1, (late, bad_server.closed)


async def test_late_waits_give_way_to_a_server_that_lowers_its_stream_limit(
    bad_server: MisbehavingServer,
) -> None:
    # Three OpenSessions given up on wait for their late answers; then the server's
    # SETTINGS lower MAX_CONCURRENT_STREAMS to 1 (a server under load). A session's
    # next call needs all three streams to end, not one: it waited a minute behind
    # the two late waits its one queued call did not cut (before 29f5313 they were
    # reset at reap_timeout, 0.5 s here).
    import h2.settings

    async with client_for(bad_server) as c:
        async with c.session() as s:
            await s.prefill([1, 2])
            bad_server.plan("OpenSession", Reply("hold"), Reply("silent"), Reply("silent"))
            for _ in range(3):
                await give_up_opening(c, 0.2, bad_server)
            await wait_for(lambda: len(bad_server.calls_to("OpenSession")) == 4)
            assert bad_server.held is not None
            conn, _ = bad_server.held
            conn.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
            await conn.flush()
            await trio.sleep(0.1)
            with trio.fail_after(10):
                await s.prefill([3], timeout=3)


async def test_the_clients_close_ends_an_open_session_between_two_attempts(
    bad_server: MisbehavingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A GOAWAY says the OpenSession was never processed; its retry waits for a new
    # connection (a server coming back slowly) when the client closes. Nothing of
    # it is on the server: the close is to end it at once, as it ends one whose
    # HEADERS were never written, not wait for the connection and send it then.
    slow_new_connections(monkeypatch, 6.0)
    bad_server.plan("OpenSession", Reply("goaway_open", first_delay=0.1))
    outcome: list[BaseException | None] = []

    async def opener(c: poc_api.ApiClient) -> None:
        try:
            async with c.session():
                outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        async with client_for(bad_server, close_timeout=10.0) as c:
            nursery.start_soon(opener, c)
            await wait_for(lambda: bad_server.connections == 2)
            began = time.monotonic()
        closed_in = time.monotonic() - began
    assert closed_in < 4.0, closed_in  # (6 s: it waited for the new connection)
    assert len(bad_server.calls_to("OpenSession")) == 1  # (2: a session made, then closed)
    assert isinstance(outcome[0], trio.ClosedResourceError), outcome


async def test_late_waits_give_way_when_the_limit_is_lowered_under_a_waiting_call(
    bad_server: MisbehavingServer,
) -> None:
    # As above, but the session's call already waits for a stream (it made one
    # late wait give way) when the server's SETTINGS lower its limit from 3 to 1:
    # it then needs the other two streams too.
    import h2.settings

    bad_server.max_streams = 3
    async with client_for(bad_server, close_timeout=2.0) as c:
        async with c.session() as s:
            await s.prefill([1, 2])
            bad_server.plan("OpenSession", Reply("hold"), Reply("silent"), Reply("silent"))
            for _ in range(3):
                await give_up_opening(c, 0.1, bad_server)
            await wait_for(lambda: len(bad_server.calls_to("OpenSession")) == 4)
            assert bad_server.held is not None
            conn, _ = bad_server.held
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(s.prefill, [3], timeout=8))
                await trio.sleep(0.1)  # it waits for a stream
                conn.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
                await conn.flush()
                with trio.fail_after(6):
                    await wait_for(lambda: len(bad_server.calls_to("Generate")) == 2, timeout=6)
