"""Many servers (issue 12): affinity keys, the health service, the client-side pool, failover."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, nullcontext
from typing import Any

import h2.connection
import hyperframe.frame
import pytest
import trio
import trio.testing
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from helpers import kill_for_good, refusing_port, wait_for
from hypothesis import given
from hypothesis import strategies as st
from misbehaving import DUMMY_BASE_URL, MisbehavingServer, Reply, misbehaving_server

import poc_api
from poc_api import (
    EndpointState,
    EndpointStatus,
    SamplingParams,
    StreamDone,
    Token,
    TokenOut,
    Tokens,
    _transport,
)
from poc_api._pool import Router, _timed
from poc_api._proto.grpc.health.v1 import (
    HealthCheckRequest,
    HealthCheckResponse,
    HealthCheckResponseServingStatus,
    HealthStub,
)
from poc_api.server import ReferenceServer, ServerConfig, tokenize
from poc_api.testing import make_png, reference_server, reference_servers

SALIENCE = ("OpenSession", "CloseSession", "AppendImage", "Generate")
TURN = SamplingParams(max_tokens=4)
SERVING = bytes(HealthCheckResponse(status=HealthCheckResponseServingStatus.SERVING))


def salience_calls(server: ReferenceServer) -> int:
    counts = server.state().rpc_counts
    return sum(counts.get(m, 0) for m in SALIENCE)


def pool_client(servers: list[ReferenceServer], **options: object) -> poc_api.ApiClient:
    return poc_api.ApiClient(
        servers[0].base_url,
        grpc_url=[s.grpc_url for s in servers],
        **options,  # type: ignore[arg-type]
    )


def home_of(session: poc_api.Session, servers: list[ReferenceServer]) -> int:
    """The index of the server that holds ``session``."""
    return next(i for i, v in enumerate(servers) if session.session_id in v.state().session_ids)


async def turn(conv: poc_api.Conversation, prompt: list[int]) -> list[int]:
    """One conversation turn; the decoded ids."""
    async with conv.stream([Tokens(prompt)], TURN, timeout=20) as events:
        out = [e async for e in events]
    assert isinstance(out[-1], StreamDone)
    return [e.id for e in out if isinstance(e, TokenOut)]


# -- affinity keys -------------------------------------------------------------------


async def test_every_call_of_a_session_carries_its_own_affinity_key(
    server: ReferenceServer, client: poc_api.ApiClient
) -> None:
    with trio.fail_after(20):
        before = len(server.state().affinity)
        calls_before = salience_calls(server)
        async with client.session() as s:
            await s.prefill([1, 2, 3])
            await s.append_image(make_png(56, 56), "image/png")
            async with s.generate([4], sampling=TURN) as ev:
                async for _ in ev:
                    pass
        async with client.conversation() as conv:
            await turn(conv, [5, 6, 7])
        await client.score([Tokens([1, 2, 3, 4])], [(1, 4)])
        await client.score_many([([Tokens([1, 2, 3])], [(1, 3)])] * 3)
    seen = list(server.state().affinity)[before:]
    # Every salience call carried a key (the shared fixture server sees only us).
    assert len(seen) == salience_calls(server) - calls_before
    by_key: dict[str, list[str]] = collections.defaultdict(list)
    for method, key in seen:
        by_key[key].append(method)
    # One key per session: opened first, closed last, never shared.
    assert len(by_key) == 6
    for methods in by_key.values():
        assert methods[0] == "OpenSession" and methods[-1] == "CloseSession"
        assert methods.count("OpenSession") == 1 and methods.count("CloseSession") == 1
    session_methods = by_key[seen[0][1]]
    assert session_methods == ["OpenSession", "Generate", "AppendImage", "Generate", "CloseSession"]


async def test_affinity_keys_stay_out_of_the_hpack_table(server: ReferenceServer) -> None:
    """A key is new for every session: indexed, keys would fill the client's HPACK
    dynamic table, evict the stable headers (:path, content-type, ...) and slow
    every header's table search."""
    with trio.fail_after(20):
        async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
            for _ in range(60):
                async with client.session():
                    pass
            transport = client._grpc()._endpoints[0].transport
            assert transport._channel is not None
            table = transport._channel._protocol._h2.encoder.header_table
            names = [name for name, _ in table.dynamic_entries]
    assert b"x-session-affinity" not in names
    assert b":path" in names  # the stable headers stay indexed


async def test_affinity_keys_can_be_turned_off(server: ReferenceServer) -> None:
    with trio.fail_after(10):
        before = len(server.state().affinity)
        async with poc_api.ApiClient(
            server.base_url, grpc_url=server.grpc_url, affinity_header=None
        ) as client:
            async with client.session() as s:
                await s.prefill([1, 2])
        assert len(server.state().affinity) == before


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (b"x-a", TypeError),
        (1, TypeError),
        ("", ValueError),
        ("X-Upper", ValueError),
        ("x a", ValueError),
        ("grpc-timeout", ValueError),
        ("x-key-bin", ValueError),
        # grpclib refuses these metadata keys on every call (a bare ValueError
        # from deep inside grpclib, at the first session), and RFC 9113 8.2.2
        # forbids the connection-specific ones in HTTP/2.
        ("te", ValueError),
        ("content-type", ValueError),
        ("user-agent", ValueError),
        ("authorization", ValueError),  # the api_key's: sent twice
        ("connection", ValueError),
        ("transfer-encoding", ValueError),
    ],
)
def test_affinity_header_is_checked(header: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        poc_api.ApiClient("http://127.0.0.1:1/v1", affinity_header=header)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("grpc_url", "error"),
    [
        ([], ValueError),
        (["http://127.0.0.1:1", 5], TypeError),
        (["ftp://x:1"], ValueError),
        (["http://127.0.0.1:1", "http://127.0.0.1:1"], ValueError),
        (b"http://127.0.0.1:1", TypeError),
        ("dns:///no-port", ValueError),
        ("dns://8.8.8.8/example.com:80", ValueError),
        ("dns:///a..b:80", ValueError),
        (f"dns:///{'x' * 64}.example:80", ValueError),
        ("dns:///bad host:80", ValueError),  # (went to the resolver as it was)
        (42, TypeError),
    ],
)
def test_grpc_url_list_and_dns_target_are_checked(grpc_url: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        poc_api.ApiClient("http://127.0.0.1:1/v1", grpc_url=grpc_url)  # type: ignore[arg-type]


def test_pool_options_are_checked() -> None:
    with pytest.raises(ValueError):
        poc_api.ApiClient("http://127.0.0.1:1/v1", health_check_interval=0)
    with pytest.raises(TypeError):
        poc_api.ApiClient("http://127.0.0.1:1/v1", dns_refresh="1")  # type: ignore[arg-type]


# -- the health service ----------------------------------------------------------------


async def test_reference_server_answers_standard_health_checks() -> None:
    async with reference_servers(1) as (srv,):
        with trio.fail_after(10):
            for service in ("", "salience.Salience"):
                status = await trio.to_thread.run_sync(_check, srv, service)
                assert status is HealthCheckResponseServingStatus.SERVING
            await trio.to_thread.run_sync(srv.set_serving, False)
            status = await trio.to_thread.run_sync(_check, srv, "")
            assert status is HealthCheckResponseServingStatus.NOT_SERVING
            assert await trio.to_thread.run_sync(_check, srv, "nope") is None


async def test_health_watch_streams_every_change() -> None:
    async with reference_servers(1) as (srv,):
        with trio.fail_after(10):
            statuses = await trio.to_thread.run_sync(_watch_while_toggling, srv)
    assert statuses == [
        HealthCheckResponseServingStatus.SERVING,
        HealthCheckResponseServingStatus.NOT_SERVING,
    ]


def _check(srv: ReferenceServer, service: str) -> HealthCheckResponseServingStatus | None:
    """A Check from plain grpclib on its own asyncio loop (an independent peer).

    ``None`` when the server answers NOT_FOUND (an unknown service).
    """

    async def main() -> HealthCheckResponseServingStatus | None:
        channel = Channel("127.0.0.1", srv.grpc_port)
        try:
            reply = await HealthStub(channel).check(HealthCheckRequest(service=service))
            return reply.status
        except GRPCError as exc:
            assert exc.status is Status.NOT_FOUND
            return None
        finally:
            channel.close()

    return asyncio.run(main())


def _watch_while_toggling(srv: ReferenceServer) -> list[HealthCheckResponseServingStatus]:
    async def main() -> list[HealthCheckResponseServingStatus]:
        channel = Channel("127.0.0.1", srv.grpc_port)
        seen = []
        try:
            async for reply in HealthStub(channel).watch(HealthCheckRequest()):
                seen.append(reply.status)
                if len(seen) == 1:
                    await asyncio.to_thread(srv.set_serving, False)
                else:
                    break
        finally:
            channel.close()
        return seen

    return asyncio.run(main())


# -- the client-side pool ----------------------------------------------------------------


async def test_pool_spreads_sessions_and_keeps_each_on_its_endpoint() -> None:
    async with reference_servers(3) as servers, pool_client(servers) as client:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                release = trio.Event()

                async def hold() -> None:
                    async with client.session() as s:
                        await s.prefill([1, 2, 3])
                        await release.wait()
                        await s.prefill([4])

                for _ in range(60):
                    nursery.start_soon(hold)
                await trio.testing.wait_all_tasks_blocked(0.05)
                await wait_for(lambda: sum(len(s.state().session_ids) for s in servers) == 60)
                endpoints = client.endpoints
                assert [e.url for e in endpoints] == [s.grpc_url for s in servers]
                assert all(isinstance(e, EndpointStatus) for e in endpoints)
                assert sum(e.sessions for e in endpoints) == 60
                for srv, ep in zip(servers, endpoints, strict=True):
                    assert len(srv.state().session_ids) == ep.sessions
                    assert 15 <= ep.sessions <= 25, endpoints  # within ±25 % of 20
                release.set()
        # Each session's later calls went to its own server: nothing was NOT_FOUND,
        # and every server saw as many Generates as twice its sessions.
        for srv in servers:
            state = srv.state()
            assert not state.session_ids
            assert state.rpc_counts["Generate"] == 2 * state.rpc_counts["OpenSession"]
        assert [e.sessions for e in client.endpoints] == [0, 0, 0]


async def test_closing_the_client_closes_held_sessions_on_their_own_servers() -> None:
    # Closed from another task while blocks hold sessions on every server: each
    # is closed on its server, under the affinity key it was opened with.
    async with reference_servers(3) as servers:
        client = pool_client(servers, close_timeout=2.0)

        async def hold(*, task_status: trio.TaskStatus[None]) -> None:
            async with client.session() as s:
                await s.prefill([1, 2, 3])
                task_status.started()
                await trio.sleep_forever()

        with trio.fail_after(20):
            async with client, trio.open_nursery() as nursery:
                for _ in range(12):
                    await nursery.start(hold)
                assert sum(len(s.state().session_ids) for s in servers) == 12
                await client.aclose()
                nursery.cancel_scope.cancel()
        for srv in servers:
            state = srv.state()
            assert not state.session_ids
            opened = sorted(key for method, key in state.affinity if method == "OpenSession")
            closed = sorted(key for method, key in state.affinity if method == "CloseSession")
            assert opened == closed


async def test_the_close_warning_counts_only_the_sessions_it_could_not_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One held session on a good server, one on a server that never answers
    # CloseSession: the close closes the first, and its warning names one.
    async with reference_servers(1) as (good,), misbehaving_server() as silent:
        silent.plan("CloseSession", Reply("silent"))
        client = poc_api.ApiClient(
            good.base_url, grpc_url=[good.grpc_url, silent.url], close_timeout=0.5
        )

        async def hold(*, task_status: trio.TaskStatus[None]) -> None:
            async with client.session():
                task_status.started()
                await trio.sleep_forever()

        with trio.fail_after(20):
            async with client, trio.open_nursery() as nursery:
                for _ in range(2):  # the second goes to the less loaded endpoint
                    await nursery.start(hold)
                assert [e.sessions for e in client.endpoints] == [1, 1]
                await client.aclose()
                nursery.cancel_scope.cancel()
        assert not good.state().session_ids
        warnings = [r.getMessage() for r in caplog.records if "not closed within" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].startswith("1 sessions (and 0 opening"), warnings


async def test_a_pool_session_timeout_after_its_open_session_was_sent_is_not_retriable() -> None:
    # The pool's OpenSession runs as attempts, one per endpoint tried: an attempt
    # that sent its request (the server may have made the session) makes the
    # whole call's timeout non-retriable, as on one server.
    async with misbehaving_server() as a, misbehaving_server() as b:
        for srv in (a, b):
            # First full (each connection is up before the timed call), then silent.
            srv.plan("OpenSession", Reply("trailers_only", status=8), Reply("silent"))
        async with poc_api.ApiClient(
            DUMMY_BASE_URL,
            grpc_url=[a.url, b.url],
            close_timeout=0.2,  # the close waits this long for the silent OpenSession
            health_check_interval=3600,
        ) as client:
            with trio.fail_after(10):
                with pytest.raises(poc_api.ResourceExhausted):
                    async with client.session():
                        pass
                with pytest.raises(poc_api.PocApiTimeout) as info:
                    async with client.session(timeout=0.2):
                        pass
        assert info.value.retriable is False
        assert "nothing was sent" not in str(info.value)
        assert [c.kind for c in a.calls + b.calls if c.method == "OpenSession"].count("silent") == 1


@pytest.mark.parametrize("late", [False, True], ids=["undo_at_once", "undo_after_failover"])
async def test_a_pool_session_answered_then_lost_is_closed_where_it_was_made(
    monkeypatch: pytest.MonkeyPatch, late: bool
) -> None:
    # Each endpoint answers OpenSession, then drops the connection: the pool
    # tries the other. The session each server made was left open there; now
    # each is closed, on its own server. Late: each undo starts after the route
    # moved on to the other endpoint (a close sent by the route would go there).
    if late:
        real = _transport._undo

        async def undo_late(*args: Any) -> None:
            await asyncio.sleep(0.3)
            await real(*args)

        monkeypatch.setattr(_transport, "_undo", undo_late)
    async with misbehaving_server() as a, misbehaving_server() as b:
        for srv in (a, b):
            srv.plan("OpenSession", Reply("reply_then_close"))
        async with poc_api.ApiClient(
            DUMMY_BASE_URL, grpc_url=[a.url, b.url], close_timeout=2, health_check_interval=3600
        ) as client:
            with trio.fail_after(10):
                with pytest.raises(poc_api.ServerUnavailable):
                    async with client.session():
                        pass
                assert len(a.opened) == len(b.opened) == 1
                await wait_for(lambda: len(a.closed) + len(b.closed) == 2)
                assert (a.closed, b.closed) == (a.opened, b.opened)


async def test_pool_places_no_new_session_on_a_server_that_is_not_serving() -> None:
    # The health checks' interval is also their timeout: at 50 ms, a loaded
    # machine timed them all out, and with every endpoint UNREACHABLE the pool
    # placed sessions on the one that was not serving too.
    async with reference_servers(3) as servers:
        async with pool_client(servers, health_check_interval=0.25) as client:
            with trio.fail_after(20):
                await client.score([Tokens([1, 2, 3])], [(1, 3)])  # starts health checks
                await trio.to_thread.run_sync(servers[1].set_serving, False)
                await wait_for(lambda: client.endpoints[1].state is EndpointState.NOT_SERVING)
                before = servers[1].state().rpc_counts.get("OpenSession", 0)
                await client.score_many([([Tokens([1, 2, 3])], [(1, 3)])] * 40)
                assert servers[1].state().rpc_counts.get("OpenSession", 0) == before
                await trio.to_thread.run_sync(servers[1].set_serving, True)
                await wait_for(lambda: client.endpoints[1].state is EndpointState.SERVING)


async def test_a_new_client_places_no_session_on_a_server_that_is_not_serving() -> None:
    # Health checks started at the first placement, and every endpoint was
    # UNKNOWN (usable) until its first answer: a new client put sessions on a
    # draining server (one of four, in 3 of 5 clients).
    async with reference_servers(2) as servers:
        await trio.to_thread.run_sync(servers[1].set_serving, False)
        with trio.fail_after(30):
            for _ in range(6):
                before = servers[1].state().rpc_counts.get("OpenSession", 0)
                async with pool_client(servers) as client:
                    async with trio.open_nursery() as nursery:
                        for _ in range(4):
                            nursery.start_soon(client.score, [Tokens([1, 2, 3])], [(1, 3)])
                    assert client.endpoints[1].state is EndpointState.NOT_SERVING
                assert servers[1].state().rpc_counts.get("OpenSession", 0) == before


async def test_a_new_clients_first_session_waits_at_most_a_second_for_a_silent_endpoint() -> None:
    # The wait for the first health answers is bounded: an endpoint that never
    # speaks HTTP/2 holds the first session up to a second, not its check's timeout.
    async with reference_servers(1) as (good,), misbehaving_server() as hole:
        hole.mute = True
        async with poc_api.ApiClient(
            good.base_url, grpc_url=[hole.url, good.grpc_url], health_check_interval=4.0
        ) as client:
            started = trio.current_time()
            with trio.fail_after(10):
                [result] = await client.score([Tokens([1, 2, 3])], [(1, 3)])
            assert trio.current_time() - started < 2.0
            assert result.logprob < 0


async def test_an_endpoints_first_health_check_may_take_longer_than_a_short_interval() -> None:
    # A check's timeout is the interval (at most 5 s): at 0.3 s, the first check of
    # a healthy endpoint (connecting first; a cold process took 0.33 s) timed out,
    # and the endpoint sat out its backoff with no session while others took them
    # all (15/0/15 in a pool review). Its first check gets at least a second.
    async with reference_servers(1) as (good,), misbehaving_server() as slow:
        slow.plan("Check", Reply(first_delay=0.6, raw=SERVING), *[Reply(raw=SERVING)] * 100)
        async with poc_api.ApiClient(
            good.base_url, grpc_url=[good.grpc_url, slow.url], health_check_interval=0.3
        ) as client:
            with trio.fail_after(10):
                await client.score([Tokens([1, 2, 3])], [(1, 3)])  # starts the checks
                await wait_for(lambda: len(slow.calls_to("Check")) >= 3)
            status = client.endpoints[1]
            assert status.failures == 0, status
            assert status.state is EndpointState.SERVING, status


@asynccontextmanager
async def checks_go_silent(
    interval: float, generate: Reply
) -> AsyncIterator[tuple[poc_api.ApiClient, poc_api.Session, MisbehavingServer]]:
    """A pool of a reference server and a misbehaving one that answers its first
    two health checks (every ``interval`` s) and no other, its Generate answered
    with ``generate``; keepalive_timeout 0.5 s, keepalive_time its 300 s (no ping
    of its own). Yields the client, a session on the misbehaving server (one is
    open on the other too) once two checks came, and that server."""
    async with reference_servers(1) as (good,), misbehaving_server() as slow:
        slow.plan("Check", Reply(raw=SERVING), Reply(raw=SERVING), *[Reply("silent")] * 99)
        slow.plan("Generate", generate)
        async with poc_api.ApiClient(
            good.base_url,
            grpc_url=[good.grpc_url, slow.url],
            health_check_interval=interval,
            keepalive_timeout=0.5,
        ) as client:
            with trio.fail_after(15):
                async with client.session() as s1, client.session() as s2:
                    assert {ep.sessions for ep in client.endpoints} == {1}
                    s = s1 if s1._transport.url == slow.url else s2
                    await wait_for(lambda: len(slow.calls_to("Check")) >= 2)
                    yield client, s, slow


@pytest.mark.parametrize("frozen", [False, True])
async def test_a_health_check_that_times_out_pings_the_calls_connection(frozen: bool) -> None:
    # Calls already sent to a server that froze waited for keepalive's next ping
    # (300 s away by default) though its check had timed out: the timeout now
    # pings that connection. A server that is only slow to check answers the
    # ping, and its calls go on; a frozen one (deaf: it reads and answers nothing)
    # does not, and its calls fail within keepalive_timeout.
    n = 400 if frozen else 40  # tokens 0.05 s apart: 20 s (never finished), or 2 s
    async with checks_go_silent(0.3, Reply(tokens=n, interval=0.05)) as (client, s, slow):
        got = 0
        with (
            pytest.raises(poc_api.ServerUnavailable, match="keepalive ping")
            if frozen
            else nullcontext()
        ):
            async with s.generate([1, 2], sampling=SamplingParams(max_tokens=n)) as ev:
                async for event in ev:
                    got += isinstance(event, Token)
                    if got == 5:
                        slow.deaf = frozen
        assert client.endpoints[1].state is EndpointState.UNREACHABLE
    # (A deaf server reads no PING: it went unanswered, as the match says.)
    assert (got < n) if frozen else (got == n and slow.pings >= 1), (got, slow.pings)


async def test_a_health_check_that_times_out_pings_a_draining_connections_calls_too() -> None:
    # The server sends a graceful GOAWAY mid-stream (the stream runs on, on its
    # draining connection; checks go on a new one), then freezes: only the new
    # connection was probed, and the stream waited for keepalive.
    n = 60  # tokens 0.1 s apart: 3 s to the GOAWAY, then 3 s more
    generate = Reply("goaway_graceful", tokens=n, interval=0.1)
    async with checks_go_silent(0.3, generate) as (_, s, slow):
        got = 0
        with pytest.raises(poc_api.ServerUnavailable, match="keepalive ping"):
            async with s.generate([1, 2], sampling=SamplingParams(max_tokens=n)) as ev:
                async for event in ev:
                    got += isinstance(event, Token)
                    if got == n // 2 + 1:  # past the GOAWAY
                        slow.deaf = True
    assert n // 2 < got < n, got


async def test_a_health_check_that_times_out_does_not_ping_away_a_late_reply() -> None:
    # An OpenSession given up on waits for its late answer (a server that stalled
    # with it in hand makes the session when it comes back). The server's checks
    # time out too: the probe pinged the connection for that detached call (no
    # caller waits on it) and closed it keepalive_timeout later, so the late
    # answer could never come and its session was left to idle eviction.
    async with reference_servers(1) as (good,), misbehaving_server() as slow:
        async with poc_api.ApiClient(
            good.base_url,
            grpc_url=[good.grpc_url, slow.url],
            health_check_interval=0.3,
            keepalive_timeout=0.5,
            close_timeout=0.5,
        ) as client:
            with trio.fail_after(15):
                async with AsyncExitStack() as stack:
                    while not client.endpoints[0].sessions:  # one session on good only
                        async with AsyncExitStack() as one:
                            s = await one.enter_async_context(client.session())
                            if s._transport.url == good.grpc_url:
                                stack.push_async_exit(one.pop_all())
                    await wait_for(lambda: len(slow.calls_to("Check")) >= 2)
                    slow.plan("OpenSession", Reply("hold"))
                    with trio.move_on_after(0.3):
                        async with client.session():  # the least loaded: slow
                            pass  # pragma: no cover - never answered
                    assert slow.held is not None
                    slow.plan("Check", *[Reply("silent")] * 99, replace=True)
                    slow.deaf = True  # stalled
                    await trio.sleep(2.0)  # checks time out; keepalive_timeout passes
                    assert client.endpoints[1].state is EndpointState.UNREACHABLE
                    assert slow.connections == 1  # the late reply's connection is up


async def test_a_server_that_sends_no_data_is_not_pinged_at_each_check_it_leaves_unanswered() -> (
    None
):
    # Pings with no DATA from the server in between, more often than keepalive's,
    # are what gRPC servers count as abuse (ping strikes): they end the
    # connection, calls and all, with GOAWAY "too_many_pings". Probing a live
    # connection on each of its unanswered checks did that.
    async with checks_go_silent(0.2, Reply("silent")) as (_, s, slow):
        async with s.generate([1, 2], sampling=SamplingParams(max_tokens=5)) as ev:
            with trio.move_on_after(2):
                async for _ in ev:
                    pass
        checks = len(slow.calls_to("Check"))
        # Counted before the session closes: CloseSession's answer is DATA, after
        # which a check that times out while it is in flight may rightly ping again.
        pings = list(slow.ping_times)
    assert checks >= 6, checks  # (the unanswered ones: each timed out, then the next)
    assert len(pings) == 1, pings


async def test_a_probe_of_a_connection_that_h2_has_closed_sends_nothing(
    server: ReferenceServer,
) -> None:
    # An error GOAWAY closes h2's state machine before grpclib closes the
    # connection: a ping in between raised h2's ProtocolError out of the check.
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        with trio.fail_after(20):
            async with c.session() as s:
                sampling = SamplingParams(max_tokens=10**6)
                async with s.generate([1, 2], sampling=sampling) as ev:
                    await ev.__anext__()  # a call in flight: the probe would ping
                    transport = c._transport
                    machine = transport._channel._protocol._h2.state_machine  # type: ignore[union-attr]

                    async def probe_closed() -> tuple[bool, bool]:  # (on the client's loop)
                        state = machine.state
                        machine.state = h2.connection.ConnectionState.CLOSED
                        try:
                            closed = transport.probe()  # type: ignore[union-attr]
                        finally:
                            machine.state = state
                        return closed, transport.probe()  # type: ignore[union-attr]

                    assert await c._bridge.run(probe_closed) == (False, True)


async def test_a_health_check_queued_behind_the_clients_own_streams_is_no_failure() -> None:
    # 110 long streams on one server that allows 100 at once: the health check
    # waits for a stream of its own behind them (client side) and times out.
    # The server answers every call: that must not count against it.
    async with reference_servers(2, ignore_eos=True, token_delay_ms=50) as (a, b):
        async with pool_client([a, b], health_check_interval=0.25) as client:
            with trio.fail_after(30):
                await client.score([Tokens([1, 2, 3])], [(1, 3)])  # starts health checks
                await trio.to_thread.run_sync(b.set_serving, False)  # all sessions on a
                await wait_for(lambda: client.endpoints[1].state is EndpointState.NOT_SERVING)

                async def stream() -> None:
                    async with client.session() as s:
                        sampling = SamplingParams(max_tokens=10**6)
                        async with s.generate([1, 2], sampling=sampling) as ev:
                            async for _ in ev:
                                pass

                async with trio.open_nursery() as nursery:
                    for _ in range(110):
                        nursery.start_soon(stream)
                    await wait_for(lambda: a.state().rpc_counts.get("Generate", 0) >= 100, 10)
                    before = client.endpoints[0].failures
                    await trio.sleep(1.2)  # several health checks, each queued
                    status = client.endpoints[0]
                    assert status.streams == 110
                    assert status.failures == before, status
                    nursery.cancel_scope.cancel()


@pytest.mark.heavy
async def test_conversations_fail_over_when_a_server_dies_mid_run() -> None:
    """200 conversations on 3 servers; one server dies during the second turn.

    Every conversation then completes its next turn on a survivor, the survivors
    are left with no session, and no call outlives its deadline.
    """
    n = 200
    async with reference_servers(3, ignore_eos=True, token_delay_ms=20) as servers:
        async with pool_client(servers, health_check_interval=0.2) as client:
            failed_turns = 0
            killing, killed = trio.Event(), trio.Event()
            second_turn_started = 0
            done = 0

            async def agent(i: int) -> None:
                nonlocal failed_turns, second_turn_started, done
                rng = random.Random(i)
                prompt = tokenize(f"agent {i} says")
                async with client.conversation() as conv:
                    for t in range(3):
                        prompt = prompt + [rng.randrange(32, 127) for _ in range(3)]
                        if t == 1:
                            second_turn_started += 1
                        try:
                            reply = await turn(conv, prompt)
                        except poc_api.ServerUnavailable:
                            # Its server died under this very turn: the next try
                            # must work, on a survivor, with the whole prompt. (The
                            # kill runs in a thread: its failures, which now come at
                            # once, may come before `killed` is set.)
                            assert killing.is_set()
                            failed_turns += 1
                            reply = await turn(conv, prompt)
                        prompt = prompt + reply
                        if t == 1:
                            await killed.wait()
                done += 1

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(agent, i)
                    await wait_for(
                        lambda: second_turn_started >= n // 2 and client.endpoints[0].streams > 0,
                        timeout=30,
                    )
                    opened = [s.state().rpc_counts["OpenSession"] for s in servers[1:]]
                    killing.set()
                    await kill_for_good(servers[0])
                    killed.set()
            assert done == n
            # The dead server's conversations reopened on the survivors (at most
            # once each: OpenSession calls that raced with the kill are retried too).
            on_victim = servers[0].state().rpc_counts["OpenSession"]
            reopened = sum(
                s.state().rpc_counts["OpenSession"] - o
                for s, o in zip(servers[1:], opened, strict=True)
            )
            assert 0 < reopened <= n
            # A turn fails only if its stream had started delivering tokens when the
            # server died; before that the conversation moves over by itself.
            assert failed_turns <= on_victim
            states = client.endpoints
            assert states[0].failures > 0 and states[0].state is EndpointState.UNREACHABLE
            assert [e.sessions for e in states[1:]] == [0, 0]
        for srv in servers[1:]:
            assert not srv.state().session_ids, "a session leaked on a survivor"


async def test_max_concurrent_streams_bounds_the_whole_pool() -> None:
    # Four long streams spread over three servers: a fifth call of the client
    # is refused, wherever it would go.
    async with (
        reference_servers(3, ignore_eos=True, token_delay_ms=20) as servers,
        pool_client(servers, max_concurrent_streams=4) as client,
    ):
        with trio.fail_after(20):

            async def hold(*, task_status: trio.TaskStatus[None]) -> None:
                async with client.session() as s:
                    sampling = SamplingParams(max_tokens=10**6)
                    async with s.generate([1, 2], sampling=sampling) as ev:
                        task_status.started()
                        async for _ in ev:
                            pass

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    await nursery.start(hold)
                streams = [e.streams for e in client.endpoints]
                assert sum(streams) == 4 and max(streams) < 4, streams
                with pytest.raises(poc_api.LimitExceeded, match="max_concurrent_streams=4"):
                    await client.score([Tokens([1, 2, 3])], [(1, 3)])
                nursery.cancel_scope.cancel()
            await client.score([Tokens([1, 2, 3])], [(1, 3)])  # the slots came back


async def test_conversations_fail_over_without_waiting_on_the_dead_server() -> None:
    """The server of 20 conversations dies between turns: each next turn moves to
    the survivor at once. (Each such turn used to take about 1 s: its first call,
    then the CloseSession of the session it left behind, each waited out the
    reconnect backoff before failing against the dead server.)"""
    async with (
        reference_servers(2) as servers,
        pool_client(servers) as client,
        AsyncExitStack() as stack,
    ):
        with trio.fail_after(20):
            convs = [await stack.enter_async_context(client.conversation()) for _ in range(60)]
            async with trio.open_nursery() as nursery:
                for conv in convs:
                    nursery.start_soon(turn, conv, [1, 2, 3])
            victim, survivor = servers
            held = victim.state().session_ids
            on_victim = [c for c in convs if c.session is not None and c.session.session_id in held]
            on_victim = on_victim[:20]
            assert len(on_victim) == 20  # (the pool spreads them: about 30 each)
            on_survivor = [
                c for c in convs if c.session is not None and c.session.session_id not in held
            ][:5]

            async def timed(conv: poc_api.Conversation, took: list[float]) -> None:
                started = time.monotonic()
                await turn(conv, [1, 2, 3, 4])
                took.append(time.monotonic() - started)

            # Such turns on the survivor, its server alive: what a turn takes on this
            # machine now (a loaded CI cell makes them slow).
            control: list[float] = []
            for conv in on_survivor:
                await timed(conv, control)
            await kill_for_good(victim)
            # One at a time: each turn's calls to the dead server (the turn's own
            # Generate, then the CloseSession of the session it leaves) fail in
            # turn, so had they waited out the reconnect backoff, which grows with
            # each failure to 1 s, every turn from the second on would take 1.4-3 s.
            # Here one takes a few ms more than the control: the bound is for
            # liveness, not speed, and two turns may miss it (a loaded machine
            # stalls one now and then: 0.53 s once beside a busy loop). (A fixed
            # 0.8 s for 20 turns at once failed under load, and no longer caught
            # the bug: they took 0.21 s with it.)
            bound = max(control) + 0.5
            took: list[float] = []
            for conv in on_victim:
                await timed(conv, took)
                assert sum(t >= bound for t in took) <= 2, (sorted(control), took)
        left = survivor.state().session_ids
        # (Failed once in ~200 CI cells, not reproduced here in 25 runs under load:
        # say where each conversation's session is, should it fail again.)
        where = [
            (c.session.session_id, c.session.session_id in held) if c.session else None
            for c in on_victim
            if c.session is None or c.session.session_id not in left
        ]
        assert not where, (where, sorted(left), took)


async def test_raw_session_on_a_dead_server_raises_server_unavailable() -> None:
    async with reference_servers(2) as servers, pool_client(servers) as client:
        with trio.fail_after(20):
            async with client.session() as s:
                await s.prefill([1, 2])
                victim = servers[home_of(s, servers)]
                await kill_for_good(victim)
                with pytest.raises(poc_api.ServerUnavailable) as info:
                    await s.prefill([3])
                # Refused (the client saw the connection go first): nothing was sent
                # (retriable), so the session is as it was, not lost, and a retry
                # fails the same way while its server is down. Lost under a call
                # already sent: not retriable, and the session is lost.
                assert info.value.retriable is not s.lost
                with pytest.raises((poc_api.ServerUnavailable, poc_api.SessionLost)):
                    await s.prefill([3])
            # New sessions go to the survivor.
            async with client.session() as s2:
                await s2.prefill([1])


def open_sessions_seen(server: ReferenceServer) -> int:
    return server.state().rpc_counts.get("OpenSession", 0)


def shown_full(client: poc_api.ApiClient) -> dict[str, bool]:
    return {ep.url: ep.full for ep in client.endpoints}


@asynccontextmanager
async def _one_full_one_free() -> AsyncIterator[tuple[ReferenceServer, poc_api.ApiClient]]:
    """A pool client of two servers, the first full (its only session taken by
    another client); yields that server and the client."""
    async with (
        reference_server(max_sessions=1) as full,
        reference_server() as free,
        poc_api.ApiClient(full.base_url, grpc_url=full.grpc_url) as other,
        other.session(),  # takes the full server's only session
        pool_client([full, free]) as client,
    ):
        yield full, client


async def test_a_session_refused_by_a_full_server_opens_on_another_endpoint() -> None:
    """Only an unreachable endpoint made OpenSession try another one: a full server
    (RESOURCE_EXHAUSTED, no session made) failed about half of the pool's sessions,
    scoring calls and conversation turns with ResourceExhausted while the other
    server was free."""
    async with _one_full_one_free() as (full, client):
        with trio.fail_after(20):
            refused_before = open_sessions_seen(full)
            for _ in range(10):
                async with client.session() as s:
                    await s.prefill([1, 2])
            for _ in range(5):
                await client.score([Tokens([1, 2, 3])], [(1, 3)])
            for _ in range(5):
                async with client.conversation() as conv:
                    await turn(conv, [1, 2, 3])
            # The full server was asked (each time it was picked) and refused.
            assert open_sessions_seen(full) > refused_before
            assert len(full.state().session_ids) == 1
            # Full is not failed: it stays in rotation, with no backoff.
            assert client.endpoints[0].failures == 0
            assert client.endpoints[0].state is not EndpointState.UNREACHABLE


async def test_a_full_server_is_asked_last_for_a_while_not_at_every_other_pick() -> None:
    # A full server stayed first choice half of the time: each of those sessions
    # paid a refused OpenSession round trip first, for as long as it stayed full.
    async with _one_full_one_free() as (full, client):
        with trio.fail_after(20):
            before = open_sessions_seen(full)
            for _ in range(30):
                async with client.session() as s:
                    await s.prefill([1, 2])
            # One refusal holds it back for _FULL_HOLD (2 s); 30 sessions take far
            # less. Without the hold: ~15 refusals.
            assert open_sessions_seen(full) - before <= 3
            assert len(full.state().session_ids) == 1


async def test_a_full_server_that_takes_a_session_again_is_no_longer_asked_last() -> None:
    # The hold outlived the server's refusal: once it took a session (every other
    # endpoint full too), it stayed "full" for the rest of its 2 s, and the
    # server that really was full was asked first half of the time.
    async with (
        reference_servers(2, max_sessions=1) as (a, b),
        poc_api.ApiClient(a.base_url, grpc_url=a.grpc_url) as other_a,
        poc_api.ApiClient(b.base_url, grpc_url=b.grpc_url) as other_b,
        pool_client([a, b]) as client,
    ):
        with trio.fail_after(20):
            async with other_a.session():
                # Until a refuses one (then it is held back).
                before = open_sessions_seen(a)
                while open_sessions_seen(a) == before:
                    async with client.session():
                        pass
                assert shown_full(client) == {a.grpc_url: True, b.grpc_url: False}
            async with other_b.session():
                # b is full now, a is held but free: a takes this one, after b's refusal.
                async with client.session() as s:
                    assert s.session_id in a.state().session_ids
                assert shown_full(client) == {a.grpc_url: False, b.grpc_url: True}
                refused_by_b = open_sessions_seen(b)
                for _ in range(10):
                    async with client.session() as s:
                        assert s.session_id in a.state().session_ids
                assert open_sessions_seen(b) == refused_by_b  # b (held) was not asked


async def test_when_every_endpoint_is_full_the_caller_gets_resource_exhausted() -> None:
    async with (
        reference_servers(2, max_sessions=1) as servers,
        AsyncExitStack() as stack,
    ):
        for server in servers:
            other = await stack.enter_async_context(
                poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url)
            )
            await stack.enter_async_context(other.session())
        client = await stack.enter_async_context(pool_client(servers))
        with trio.fail_after(20):
            before = [open_sessions_seen(s) for s in servers]
            with pytest.raises(poc_api.ResourceExhausted):
                async with client.session():
                    pass
            # Each endpoint was asked once, none twice.
            assert [open_sessions_seen(s) for s in servers] == [b + 1 for b in before]
            with pytest.raises(poc_api.ResourceExhausted):
                await client.score([Tokens([1, 2, 3])], [(1, 3)])
            async with client.conversation() as conv:
                with pytest.raises(poc_api.ResourceExhausted):
                    await turn(conv, [1, 2, 3])
            assert [open_sessions_seen(s) for s in servers] == [b + 3 for b in before]
            # One server: asked once, as before.
            async with poc_api.ApiClient(
                servers[0].base_url, grpc_url=servers[0].grpc_url
            ) as single:
                with pytest.raises(poc_api.ResourceExhausted):
                    async with single.session():
                        pass
            assert open_sessions_seen(servers[0]) == before[0] + 4


@pytest.mark.parametrize("call", ["stream", "unary"])
async def test_a_call_that_finds_its_server_gone_marks_the_endpoint_unreachable(
    call: str,
) -> None:
    # A session's stream, or its unary call (AppendImage), on a dead server counts
    # against its endpoint, which then gets no new sessions for a while.
    async with (
        reference_servers(2, ignore_eos=True, token_delay_ms=5) as servers,
        pool_client(servers, health_check_interval=3600) as client,
    ):
        with trio.fail_after(20):
            async with client.session() as s:
                await s.prefill([1, 2])
                victim = home_of(s, servers)
                assert client.endpoints[victim].failures == 0
                with pytest.raises(poc_api.ServerUnavailable):
                    if call == "stream":
                        async with s.generate(sampling=SamplingParams(max_tokens=10**6)) as ev:
                            async for _ in ev:
                                if servers[victim].state().session_ids:
                                    await kill_for_good(servers[victim])
                    else:
                        await kill_for_good(servers[victim])
                        await s.append_image(make_png(28, 28), "image/png")
                # Seen by the call itself, before the session's close tries it.
                status = client.endpoints[victim]
                assert status.failures >= 1
                assert status.state is EndpointState.UNREACHABLE


async def test_a_server_unavailable_raised_by_a_streams_body_does_not_count_against_it() -> None:
    # The block's own stream is fine; its body fails on something else (a call
    # to another service): the endpoint stays healthy and keeps its share.
    async with (
        reference_servers(2) as servers,
        pool_client(servers, health_check_interval=3600) as client,
    ):
        with trio.fail_after(20):
            async with client.session() as s:
                await s.prefill([1, 2])
                home = home_of(s, servers)
                with pytest.raises(poc_api.ServerUnavailable):
                    async with s.generate(sampling=TURN) as ev:
                        async for _ in ev:
                            raise poc_api.ServerUnavailable("a tool's server is down")
            status = client.endpoints[home]
            assert status.failures == 0
            assert status.state is not EndpointState.UNREACHABLE


@pytest.mark.slow
async def test_score_many_on_a_pool_gives_one_servers_results_and_balances() -> None:
    rng = random.Random(7)
    prompts = []
    for _ in range(1000):
        ids = [rng.randrange(32, 127) for _ in range(rng.randrange(4, 24))]
        prompts.append(([Tokens(ids)], [(1, len(ids))]))
    async with reference_servers(3) as servers:
        with trio.fail_after(60):
            async with pool_client(servers[:1]) as one:
                want = await one.score_many(prompts, max_concurrency=32)
            opened = [s.state().rpc_counts.get("OpenSession", 0) for s in servers]
            async with pool_client(servers) as pool:
                got = await pool.score_many(prompts, max_concurrency=32)
        assert got == want
        per_server = [
            s.state().rpc_counts.get("OpenSession", 0) - o
            for s, o in zip(servers, opened, strict=True)
        ]
        mean = sum(per_server) / 3
        assert sum(per_server) == 1000
        assert all(abs(c - mean) <= 0.25 * mean for c in per_server), per_server


async def test_score_many_retries_a_prompt_whose_server_died_once_elsewhere() -> None:
    prompts = [([Tokens(list(range(40, 80)))], [(1, 40)])] * 60
    async with reference_servers(3, prefill_delay_us=2000) as servers:
        async with pool_client(servers[:1]) as one:
            want = await one.score_many(prompts[:1])
        async with pool_client(servers) as client:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:

                    async def kill_soon() -> None:
                        await wait_for(
                            lambda: servers[2].state().rpc_counts.get("Generate", 0) >= 3
                        )
                        await kill_for_good(servers[2])

                    nursery.start_soon(kill_soon)
                    got = await client.score_many(prompts, max_concurrency=30)
        assert got == want * 60
        assert client.endpoints[2].failures > 0


@pytest.mark.parametrize("call", ["score", "score_continuations"])
async def test_score_retries_a_prompt_whose_server_died_once_elsewhere(call: str) -> None:
    # score_many's retry, for a single client.score: the server holding the
    # score's session dies during its Generate; the prompt is scored again on the
    # survivor, with the one-server result. (score_continuations had no retry.)
    prompt = [Tokens(list(range(40, 80)))]

    async def scored(client: poc_api.ApiClient) -> object:
        if call == "score":
            return await client.score(prompt, [(1, 40)])
        return await client.score_continuations(prompt, [[7, 8, 9], [10]])

    # 25 ms per position: a 1 s prefill to kill the server in, also on a loaded machine.
    async with reference_servers(2, prefill_delay_us=25_000) as servers:
        async with pool_client(servers[:1]) as one:
            want = await scored(one)
        generates = [s.state().rpc_counts.get("Generate", 0) for s in servers]

        def started() -> list[int]:
            now = [s.state().rpc_counts.get("Generate", 0) for s in servers]
            return [i for i, (n, b) in enumerate(zip(now, generates, strict=True)) if n > b]

        async with pool_client(servers, health_check_interval=3600) as client:
            victims: list[int] = []
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:

                    async def kill_soon() -> None:
                        # The first Generate prefills for 1 s: killed in the middle.
                        await wait_for(started)
                        victims.extend(started())
                        await kill_for_good(servers[victims[0]])

                    nursery.start_soon(kill_soon)
                    got = await scored(client)
            assert got == want
            assert len(victims) == 1
            assert client.endpoints[victims[0]].failures > 0
            survivor = servers[1 - victims[0]]
            assert survivor.state().rpc_counts.get("Generate", 0) > generates[1 - victims[0]]


async def test_dns_target_resolves_to_endpoints() -> None:
    async with reference_servers(1) as (srv,):
        url = f"dns:///127.0.0.1:{srv.grpc_port}"
        async with poc_api.ApiClient(srv.base_url, grpc_url=url) as client:
            assert client.endpoints == ()
            with trio.fail_after(10):
                results = await client.score([Tokens([1, 2, 3])], [(1, 3)])
            assert len(results) == 1
            (ep,) = client.endpoints
            assert ep.url == srv.grpc_url and ep.sessions == 0


async def test_public_pool_calls_are_checkpoints() -> None:
    async with reference_servers(2) as servers, pool_client(servers) as client:
        with trio.testing.assert_checkpoints():
            await client.score([Tokens([1, 2])], [])
        with trio.testing.assert_checkpoints():
            await client.score_many([])


async def test_drain_reports_not_serving_and_waits_for_open_sessions() -> None:
    async with reference_servers(2) as servers:
        async with pool_client(servers, health_check_interval=0.25) as client:
            with trio.fail_after(20):
                async with client.session() as s:
                    await s.prefill([1, 2])
                    victim = servers[home_of(s, servers)]
                    index = servers.index(victim)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(trio.to_thread.run_sync, victim.drain, 10.0)
                        await wait_for(
                            lambda: client.endpoints[index].state is EndpointState.NOT_SERVING
                        )
                        # Its open session carries on; new ones go elsewhere.
                        await s.prefill([3])
                        async with client.session() as other:
                            await other.prefill([1])
                            assert other.session_id not in victim.state().session_ids
                        # The last session closes: drain() returns at once (not
                        # after its 10 s grace) and stops the server.
                        await s.aclose()


@asynccontextmanager
async def dns_pool(
    monkeypatch: pytest.MonkeyPatch, records: list[str]
) -> AsyncIterator[tuple[ReferenceServer, ReferenceServer, poc_api.ApiClient]]:
    """Two servers on one port of two loopback addresses (127.0.0.1, 127.0.0.2),
    and a client of ``dns:///pool.test:PORT`` whose lookup answers ``records`` as
    they are at each refresh (every 50 ms)."""
    from poc_api import _pool

    async def lookup(host: str, port: int) -> list[str]:
        assert host == "pool.test"
        return list(records)

    monkeypatch.setattr(_pool, "_lookup", lookup)
    async with reference_servers(1) as (a,):
        b = ReferenceServer(ServerConfig(host="127.0.0.2", port=a.http_port))
        await trio.to_thread.run_sync(b.start)
        try:
            url = f"dns:///pool.test:{a.grpc_port}"
            async with poc_api.ApiClient(
                a.base_url, grpc_url=url, dns_refresh=0.05, health_check_interval=0.05
            ) as client:
                yield a, b, client
        finally:
            await trio.to_thread.run_sync(b.stop)


async def test_dns_target_follows_the_records_as_they_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two servers on one port of two loopback addresses, behind a name whose
    records change: new addresses become endpoints, vanished ones are retired."""
    records = ["127.0.0.1", "127.0.0.2"]
    async with dns_pool(monkeypatch, records) as (a, b, client):
        with trio.fail_after(20):
            await client.score_many([([Tokens([1, 2, 3])], [(1, 3)])] * 40)
            assert [e.url for e in client.endpoints] == [a.grpc_url, b.grpc_url]
            assert all(s.state().rpc_counts.get("OpenSession", 0) > 5 for s in (a, b))
            records[:] = ["127.0.0.2"]
            # Retired (and soon dropped: it has no session left).
            await wait_for(
                lambda: all(
                    e.url != a.grpc_url or e.state is EndpointState.RETIRED
                    for e in client.endpoints
                )
            )
            before = a.state().rpc_counts["OpenSession"]
            await client.score_many([([Tokens([1, 2, 3])], [(1, 3)])] * 20)
            assert a.state().rpc_counts["OpenSession"] == before
            records[:] = ["127.0.0.1", "127.0.0.2"]
            await wait_for(
                lambda: any(
                    e.url == a.grpc_url and e.state is not EndpointState.RETIRED
                    for e in client.endpoints
                )
            )


async def test_dns_target_with_one_address_is_resolved_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One record at first: the pool still re-resolves it every ``dns_refresh``
    seconds, so a replaced pod (old address dead, the record names a new one) is
    picked up."""
    records = ["127.0.0.1"]
    async with dns_pool(monkeypatch, records) as (a, b, client):
        with trio.fail_after(20):
            await client.score([Tokens([1, 2, 3])], [(1, 3)])
            assert [e.url for e in client.endpoints] == [a.grpc_url]
            await kill_for_good(a)
            records[:] = ["127.0.0.2"]
            await wait_for(
                lambda: any(
                    e.url == b.grpc_url and e.state is not EndpointState.RETIRED
                    for e in client.endpoints
                )
            )
            await client.score([Tokens([1, 2, 3])], [(1, 3)])
            assert b.state().rpc_counts.get("OpenSession", 0) == 1


async def test_dns_target_is_resolved_every_dns_refresh_whatever_the_health_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``dns_refresh`` shorter than ``health_check_interval``: the records were
    looked up once per check interval (here 20 s, not 0.1 s), and an address
    found was passed over by placement (unchecked, not connected) until the next
    round of checks."""
    from poc_api import _pool

    records = ["127.0.0.1"]

    async def lookup(host: str, port: int) -> list[str]:
        return list(records)

    monkeypatch.setattr(_pool, "_lookup", lookup)
    async with reference_servers(1) as (a,):
        b = ReferenceServer(ServerConfig(host="127.0.0.2", port=a.http_port))
        await trio.to_thread.run_sync(b.start)
        try:
            async with poc_api.ApiClient(
                a.base_url,
                grpc_url=f"dns:///pool.test:{a.grpc_port}",
                dns_refresh=0.1,
                health_check_interval=20,
            ) as client:
                with trio.fail_after(15):
                    await client.score([Tokens([1, 2, 3])], [(1, 3)])
                    records[:] = ["127.0.0.1", "127.0.0.2"]
                    await wait_for(lambda: len(client.endpoints) == 2, timeout=3)
                    await wait_for(lambda: client.endpoints[1].state is EndpointState.SERVING)
                    await client.score_many(
                        [([Tokens([1, 2, 3])], [(1, 3)])] * 20, max_concurrency=1
                    )
                    assert b.state().rpc_counts.get("OpenSession", 0) >= 3
        finally:
            await trio.to_thread.run_sync(b.stop)


async def test_a_retired_endpoint_is_dropped_once_its_last_session_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An address DNS no longer lists keeps its open session (calls on it still
    work), then leaves the endpoint list and has its connection closed."""
    records = ["127.0.0.1"]
    async with dns_pool(monkeypatch, records) as (a, b, client):
        with trio.fail_after(20):
            async with client.session() as s:
                await s.prefill([1, 2])
                records[:] = ["127.0.0.2"]
                await wait_for(lambda: len(client.endpoints) == 2)
                await wait_for(lambda: client.endpoints[0].state is EndpointState.RETIRED)
                await trio.sleep(0.3)  # several refresh passes: it stays
                assert [e.url for e in client.endpoints] == [a.grpc_url, b.grpc_url]
                await s.prefill([3])
                assert a.state().connections_open == 1
            await wait_for(lambda: [e.url for e in client.endpoints] == [b.grpc_url])
            await wait_for(lambda: a.state().connections_open == 0)
            await client.score([Tokens([1, 2, 3])], [(1, 3)])
            assert not a.state().session_ids


async def test_a_pool_closes_its_endpoints_at_once_not_one_after_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each server made a session for an OpenSession that then failed, and the
    # cleanup that closes it does not end (a stand-in for any stuck cleanup).
    # The client's close waits up to close_timeout for the cleanups of each
    # channel, then cuts them: it did so for each endpoint in turn (3 x 1.5 s).
    async def stuck_undo(*_: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(_transport, "_undo", stuck_undo)
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(misbehaving_server()) for _ in range(3)]
        for srv in servers:
            srv.plan("OpenSession", Reply("reply_then_close"))
        client = poc_api.ApiClient(
            DUMMY_BASE_URL,
            grpc_url=[srv.url for srv in servers],
            close_timeout=1.5,
            health_check_interval=3600,
        )
        async with client:
            with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable):
                async with client.session():
                    pass
            assert all(len(t._reapers) == 1 for t in client._router._owned)  # type: ignore[union-attr]
            start = time.monotonic()
        assert time.monotonic() - start < 2.5  # was 4.5+


async def test_a_caller_giving_up_during_the_first_dns_lookup_does_not_fail_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first caller's task ran the shared lookup: cancelled, it ended the lookup
    # for everyone, and a caller waiting for it got "resolved to no address".
    from poc_api import _pool

    async def slow_lookup(host: str, port: int) -> list[str]:
        await asyncio.sleep(0.3)
        return ["127.0.0.1"]

    monkeypatch.setattr(_pool, "_lookup", slow_lookup)
    async with reference_servers(1) as (srv,):
        url = f"dns:///pool.test:{srv.grpc_port}"
        async with poc_api.ApiClient(srv.base_url, grpc_url=url) as client:

            async def impatient() -> None:
                with trio.move_on_after(0.1):
                    async with client.session():
                        pass

            async def patient() -> None:
                await trio.sleep(0.02)
                async with client.session() as s:
                    await s.prefill([1])

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(impatient)
                    nursery.start_soon(patient)


async def test_sessions_leave_an_endpoint_that_never_speaks_for_one_that_is_ready() -> None:
    # A server that accepts TCP and never speaks HTTP/2: the OpenSessions placed
    # there waited for its SETTINGS up to connect_timeout (30 s) while the other
    # endpoint was connected and idle (about half of them timed out here). Now one
    # still waiting after a second fails over to the ready endpoint.
    async with reference_servers(1) as (good,), misbehaving_server() as hole:
        hole.mute = True
        async with poc_api.ApiClient(good.base_url, grpc_url=[hole.url, good.grpc_url]) as client:
            opened = 0

            async def one() -> None:
                nonlocal opened
                async with client.session(timeout=5) as s:
                    await s.prefill([1])
                    opened += 1

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for _ in range(20):
                        nursery.start_soon(one)
            assert opened == 20
            assert good.state().rpc_counts["OpenSession"] == 20


@pytest.mark.parametrize(
    "extra",
    [
        b"\x0a\x00",  # field 1 length-delimited: betterproto2 made the status []
        b"\x0d\x00\x00\x00\x00",  # field 1 as fixed32: betterproto2 raised KeyError
    ],
)
async def test_a_health_reply_with_a_known_field_of_another_wire_type_is_still_serving(
    extra: bytes,
) -> None:
    # protobuf skips such a field (as an unknown one): the reply says SERVING.
    # Parsed by betterproto2, the endpoint was NOT_SERVING or failed, and got no
    # new session for as long as its server answered so.
    async with misbehaving_server() as a, misbehaving_server() as b:
        a.plan("Check", *[Reply(raw=b"\x08\x01" + extra)] * 1000)
        async with poc_api.ApiClient(
            DUMMY_BASE_URL, grpc_url=[a.url, b.url], health_check_interval=0.1
        ) as client:
            async with client.session():
                pass  # starts health checks
            await wait_for(lambda: len(a.calls_to("Check")) >= 2, timeout=5)
            assert client.endpoints[0].state is EndpointState.SERVING
            assert client.endpoints[0].failures == 0


def health_check_times(server: ReferenceServer) -> list[float]:
    """A list that gets the time of every health check ``server`` answers from now on."""
    health = server._rt.health if server._rt is not None else None
    assert health is not None
    checks: list[float] = []
    original = health.status

    def status(service: str) -> Any:
        checks.append(time.monotonic())  # (the server's thread)
        return original(service)

    health.status = status  # type: ignore[method-assign]
    return checks


async def test_a_silent_endpoint_does_not_slow_the_health_checks_of_the_others() -> None:
    # Each check of a silent endpoint times out after the interval, and the next
    # round of checks began an interval after that one ended: the good endpoint
    # was checked every 2 intervals (a server's NOT_SERVING noticed that late).
    async with reference_servers(1) as (good,), misbehaving_server() as hole:
        hole.mute = True
        checks = health_check_times(good)
        async with poc_api.ApiClient(
            good.base_url, grpc_url=[good.grpc_url, hole.url], health_check_interval=0.3
        ) as client:
            await client.score([Tokens([1, 2, 3])], [(1, 3)])  # starts health checks
            await trio.sleep(3.3)
        gaps = [round(b - a, 2) for a, b in itertools.pairwise(checks)]
        # 0.3 s apart (as with no silent endpoint); they were 0.6 s apart.
        assert len(gaps) >= 5 and sorted(gaps)[len(gaps) // 2] < 0.45, gaps


async def test_a_health_check_that_raises_does_not_end_the_health_checks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An exception out of one check ended the loop that runs them all, silently:
    # the pool then never saw an endpoint come back or go NOT_SERVING (the
    # backoff's OverflowError did that). A bug injected into one check here.
    async with reference_servers(2) as servers:
        checks = health_check_times(servers[0])
        async with pool_client(servers, health_check_interval=0.1) as client:
            router = client._router
            assert router is not None
            check = router._check
            failed = []

            async def check_with_a_bug(ep: Any) -> None:
                if not failed:
                    failed.append(ep)
                    raise RuntimeError("a bug in a health check")
                await check(ep)

            router._check = check_with_a_bug  # type: ignore[method-assign]
            await client.score([Tokens([1, 2, 3])], [(1, 3)])  # starts health checks
            await wait_for(lambda: len(checks) >= 5, timeout=10)
        assert failed
        assert "a bug in a health check" in caplog.text


@asynccontextmanager
async def slow_first_bytes(port: int, delay: float) -> AsyncIterator[str]:
    """A TCP proxy to 127.0.0.1:``port`` that holds the server's first bytes
    ``delay`` s (a slow link: the connection is ready that much later)."""

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, hold: float) -> None:
        try:
            while data := await src.receive_some(65536):
                if hold:
                    await trio.sleep(hold)
                    hold = 0
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await dst.aclose()

    async def handle(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server, 0.0)
            nursery.start_soon(pump, server, client, delay)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handle, 0)
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


async def test_a_session_left_for_a_ready_endpoint_that_refuses_it_comes_back() -> None:
    # The endpoint left (its connection slow) for a connected one that is full:
    # the session failed (ServerUnavailable or ResourceExhausted) though the slow
    # endpoint would have taken it, as it did before the hedge.
    async with (
        reference_servers(1) as (slow,),
        slow_first_bytes(slow.grpc_port, 2.5) as slow_url,
        misbehaving_server() as full,
    ):
        full.plan("OpenSession", *[Reply("trailers_only", status=8)] * 10)  # RESOURCE_EXHAUSTED
        async with poc_api.ApiClient(slow.base_url, grpc_url=[slow_url, full.url]) as client:
            with trio.fail_after(15):
                async with client.session() as s:
                    await s.prefill([1, 2])
            assert slow.state().rpc_counts["OpenSession"] == 1


async def test_new_sessions_go_to_connected_endpoints_not_to_ones_still_connecting() -> None:
    # Two endpoints that never speak and one that does: a session picked for a
    # silent one waited a second there before it went to the good one (a burst
    # after the start took up to two seconds). The health checks connect every
    # endpoint; a connected one is preferred.
    async with (
        reference_servers(1) as (good,),
        misbehaving_server() as hole1,
        misbehaving_server() as hole2,
    ):
        hole1.mute = hole2.mute = True
        urls = [hole1.url, hole2.url, good.grpc_url]
        async with poc_api.ApiClient(good.base_url, grpc_url=urls) as client:
            with trio.fail_after(10):
                async with client.session():  # the start: it may wait a second
                    pass
            took: list[float] = []

            async def one() -> None:
                start = trio.current_time()
                async with client.session():
                    took.append(trio.current_time() - start)

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(12):
                        nursery.start_soon(one)
            assert max(took) < 0.8, took


async def test_a_session_left_for_a_full_endpoint_waits_for_its_hold_not_for_the_silent_one() -> (
    None
):
    # The ready endpoint refused as full; the other never speaks. The call came
    # back to the silent one and waited out its connect_timeout (8 s, then
    # ServerUnavailable), though the full one had room again 2 s later.
    async with misbehaving_server() as hole, misbehaving_server() as full:
        hole.mute = True
        full.plan("OpenSession", Reply(), Reply("trailers_only", status=8))  # RESOURCE_EXHAUSTED
        async with poc_api.ApiClient(
            DUMMY_BASE_URL, grpc_url=[hole.url, full.url], connect_timeout=8
        ) as client:
            with trio.fail_after(10):
                async with client.session():  # connects `full` (its first answer)
                    pass
            start = trio.current_time()
            with trio.fail_after(15):
                async with client.session():
                    pass
            assert trio.current_time() - start < 5
            assert [c.kind for c in full.calls_to("OpenSession")] == ["ok", "trailers_only", "ok"]


@asynccontextmanager
async def cuttable_proxy(port: int) -> AsyncIterator[tuple[str, Callable[[], Awaitable[None]]]]:
    """A TCP proxy to 127.0.0.1:``port``: its URL, and what cuts every connection
    through it at once (a proxy restarted; it takes new ones after)."""
    streams: list[trio.SocketStream] = []

    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await dst.aclose()

    async def handle(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", port)
        streams.extend((client, server))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server)
            nursery.start_soon(pump, server, client)

    async def cut() -> None:
        for stream in streams:
            await stream.aclose()
        streams.clear()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handle, 0)
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", cut
        nursery.cancel_scope.cancel()


async def test_an_endpoint_whose_connection_dropped_gets_new_sessions_at_once() -> None:
    # Its connection cut (a proxy restarted) while its server stayed healthy: it
    # got no new session until a health check had reconnected it (up to
    # health_check_interval), when preferring connected endpoints.
    async with reference_servers(2) as (a, b):
        async with cuttable_proxy(a.grpc_port) as (a_url, cut):
            async with poc_api.ApiClient(
                a.base_url, grpc_url=[a_url, b.grpc_url], health_check_interval=30
            ) as client:
                with trio.fail_after(20):
                    await client.score_many([([Tokens([1, 2, 3])], [(1, 3)])] * 8)
                    await wait_for(
                        lambda: all(e.state is EndpointState.SERVING for e in client.endpoints)
                    )
                    await cut()  # the connection to a is gone
                    await wait_for(lambda: not client._router._endpoints[0].transport.connected)  # type: ignore[union-attr]
                    before = a.state().rpc_counts.get("OpenSession", 0)
                    await client.score_many(
                        [([Tokens([1, 2, 3])], [(1, 3)])] * 20, max_concurrency=1
                    )
                    assert a.state().rpc_counts.get("OpenSession", 0) - before >= 3


async def test_an_endpoint_whose_connection_dropped_under_a_call_gets_new_sessions_again() -> None:
    # As above, with a stream in flight when the connection is cut: the stream
    # fails and counts against the endpoint (0.25 s backoff). Its server is
    # healthy and answers the calls that follow (the sessions' closes), yet it
    # got no new session until the next health check, health_check_interval
    # (here 30 s) away: EndpointState.UNREACHABLE says "until its backoff has
    # passed".
    async with reference_servers(2, ignore_eos=True, token_delay_ms=5) as (a, b):
        async with cuttable_proxy(a.grpc_port) as (a_url, cut):
            async with poc_api.ApiClient(
                a.base_url, grpc_url=[a_url, b.grpc_url], health_check_interval=30
            ) as client:
                with trio.fail_after(20):
                    async with AsyncExitStack() as stack:
                        held = [await stack.enter_async_context(client.session()) for _ in range(4)]
                        s = next(s for s in held if s._transport.url == a_url)
                        with pytest.raises(poc_api.ServerUnavailable):
                            sampling = SamplingParams(max_tokens=10**6)
                            async with s.generate([1, 2], sampling=sampling) as ev:
                                async for _ in ev:
                                    await cut()  # the connection to a is gone
                        assert client.endpoints[0].state is EndpointState.UNREACHABLE
                    # The closes reached a again (through the proxy, which is back).
                    assert not a.state().session_ids
                    await trio.sleep(0.5)  # past its backoff
                    before = a.state().rpc_counts.get("OpenSession", 0)
                    await client.score_many(
                        [([Tokens([1, 2, 3])], [(1, 3)])] * 20, max_concurrency=1
                    )
                    assert a.state().rpc_counts.get("OpenSession", 0) - before >= 3, (
                        client.endpoints
                    )


async def test_an_agent_retrying_a_dead_server_gets_server_unavailable_every_time() -> None:
    # From the 1025th failed attempt in a row (about a second of tight retries),
    # every attempt raised OverflowError ("int too large to convert to float")
    # from the endpoint's backoff.
    async with reference_server() as srv:
        async with poc_api.ApiClient(srv.base_url, grpc_url=srv.grpc_url) as client:
            async with client.session():
                pass
            srv.stop()
            errors = collections.Counter()
            with trio.fail_after(60):
                for _ in range(1100):
                    try:
                        async with client.session():
                            pass
                    except poc_api.PocApiError as exc:
                        errors[type(exc)] += 1
            assert errors == {poc_api.ServerUnavailable: 1100}


async def test_a_long_outage_backs_off_at_the_cap_and_never_overflows() -> None:
    # 0.25 * 2 ** (n - 1) is past float's range from the 1025th failure in a row
    # (85 min of health checks of a dead endpoint): OverflowError out of the
    # health loop, which then died, and out of every call of the transport once
    # 1025 connection attempts had failed.
    dead = [f"http://127.0.0.1:{refusing_port()}" for _ in range(2)]
    async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=dead, connect_timeout=1) as client:
        router = client._router
        assert router is not None
        ep = router._endpoints[0]
        for _ in range(2000):
            ep.failed()
        assert 9 < ep.down_until - time.monotonic() <= 10
        transport = ep.transport
        transport._failures = 5000  # as after 5000 failed attempts (one a second: 83 min)
        with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable):
            async with client.session():
                pass
        assert transport._failures == 5001


@given(st.integers(1, 10**6))
def test_reconnect_backoff_doubles_up_to_its_cap(failures: int) -> None:
    from poc_api._transport import backoff

    got = backoff(failures, 0.05, 1.0)
    assert got == (1.0 if failures > 64 else min(1.0, 0.05 * 2 ** (failures - 1)))
    assert backoff(failures + 1, 0.05, 1.0) >= got


async def test_a_health_check_that_ends_cancelled_does_not_end_the_checks(
    server: ReferenceServer,
    eos_server: ReferenceServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A check whose timeout came out as a CancelledError (grpclib's swallowed
    # cancels, Python 3.12+) was re-raised by the loop of checks, which ended
    # for good: the pool never saw an endpoint change state again.
    checks: list[str] = []
    check_once = Router._check_once

    async def check(self: Router, ep: Any) -> None:
        checks.append(ep.target.url)
        if len(checks) == 3:
            raise asyncio.CancelledError  # as such a check ended
        await check_once(self, ep)

    monkeypatch.setattr(Router, "_check_once", check)
    async with poc_api.ApiClient(
        server.base_url, grpc_url=[server.grpc_url, eos_server.grpc_url], health_check_interval=0.05
    ) as client:
        await client.score([Tokens([1, 2, 3])], [(1, 3)])  # starts the checks
        await wait_for(lambda: len(checks) >= 10)
    assert "failed unexpectedly (checks go on)" in caplog.text


def test_a_health_check_that_fails_as_it_is_cancelled_leaves_no_unread_exception() -> None:
    # The client's close cancels the health checks. A check whose server reset
    # it in that instant ended with grpclib's StreamTerminatedError (grpclib
    # turns the cancel into it), and Python 3.11's wait_for, cancelled, never
    # reads what the task it cancels ends with: "Task exception was never
    # retrieved" (WARNING, with a traceback) at a close that went well.
    reported: list[dict[str, Any]] = []

    async def check() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise ConnectionResetError("reset as it was cancelled") from None

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        outer = asyncio.ensure_future(_timed(check(), 5.0))
        await asyncio.sleep(0.01)
        outer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
            await outer
        del outer
        gc.collect()

    asyncio.run(main())
    assert reported == []


def test_a_dns_refresh_retiring_an_endpoint_as_it_fails_keeps_it_retired(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop thread retires an endpoint (its address left DNS) while the trio
    thread records a failure there, between its "not retired?" check and its write:
    the endpoint stays retired (it was overwritten UNREACHABLE, and a health check's
    answer then made it SERVING again: sessions placed on it until the next refresh)."""
    import inspect
    import sys
    import threading

    from poc_api import _pool
    from poc_api._pool import DnsTarget, EndpointState, _Endpoint
    from poc_api._transport import GrpcTarget

    async def lookup(host: str, port: int) -> list[str]:
        return ["127.0.0.2"]

    monkeypatch.setattr(_pool, "_lookup", lookup)
    router = Router(
        None,  # type: ignore[arg-type]  # _resolve_now uses no bridge
        lambda target: None,  # type: ignore[arg-type,return-value]  # nor a transport
        DnsTarget.parse("dns:///pool.test:1"),
        affinity_header=None,
        max_message_size=1 << 20,
    )
    ep = _Endpoint(GrpcTarget("127.0.0.1", 1, False), None)  # type: ignore[arg-type]
    ep.state = EndpointState.SERVING
    router._endpoints = [ep]

    source, first = inspect.getsourcelines(_Endpoint.failed)
    (write,) = [first + i for i, line in enumerate(source) if "self.state = EndpointState" in line]
    paused, go = threading.Event(), threading.Event()

    def trace(frame: Any, event: str, arg: object) -> Any:
        if frame.f_code is _Endpoint.failed.__code__:
            if event == "line" and frame.f_lineno == write:
                paused.set()
                go.wait(10)
            return trace
        return None

    def fail() -> None:
        sys.settrace(trace)
        try:
            ep.failed()
        finally:
            sys.settrace(None)

    failing = threading.Thread(target=fail)
    failing.start()
    try:
        assert paused.wait(10)
        refresh = threading.Thread(target=asyncio.run, args=(router._resolve_now(),))
        refresh.start()
        refresh.join(0.3)  # it waits for the failure's write, or (the bug) it is over
    finally:
        go.set()
        failing.join(10)
    refresh.join(10)
    assert not refresh.is_alive()
    assert ep.state is EndpointState.RETIRED


_SAME_PROMPTS = [([poc_api.Tokens(list(range(40, 60)))], [(1, 20)])] * 12


async def test_score_many_on_a_full_server_adapts_as_on_one_server_while_another_is_dead() -> None:
    # The full endpoint's RESOURCE_EXHAUSTED was dropped for the dead one's
    # "could not be reached" (pick() tries a dead endpoint last): score_many waits
    # in line on the one and ended the batch on the other.
    async with reference_servers(1, max_sessions=2, prefill_delay_us=2000) as servers:
        srv = servers[0]
        async with poc_api.ApiClient(srv.base_url, grpc_url=srv.grpc_url) as single:
            want = await single.score_many(_SAME_PROMPTS, max_concurrency=8)
        dead = f"http://127.0.0.1:{refusing_port()}"
        async with poc_api.ApiClient(srv.base_url, grpc_url=[srv.grpc_url, dead]) as client:
            with trio.fail_after(30):
                got = await client.score_many(_SAME_PROMPTS, max_concurrency=8)
        assert got == want


async def test_a_session_refused_by_the_only_live_endpoint_as_full_is_resource_exhausted() -> None:
    async with reference_servers(1, max_sessions=1) as servers:
        srv = servers[0]
        dead = f"http://127.0.0.1:{refusing_port()}"
        async with (
            poc_api.ApiClient(srv.base_url, grpc_url=srv.grpc_url) as other,
            other.session(),  # the server is full
            poc_api.ApiClient(srv.base_url, grpc_url=[srv.grpc_url, dead]) as client,
        ):
            with trio.fail_after(20):
                for _ in range(3):
                    with pytest.raises(poc_api.ResourceExhausted):
                        async with client.session():
                            pass
                with pytest.raises(poc_api.ResourceExhausted):
                    await client.score([poc_api.Tokens([1, 2, 3])], [(1, 3)])
                async with client.conversation() as conv:
                    with pytest.raises(poc_api.ResourceExhausted):
                        async with conv.stream([poc_api.Tokens([1, 2])], timeout=10) as events:
                            async for _ in events:
                                pass


async def test_a_retired_endpoint_whose_server_died_with_a_session_is_dropped_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The session's close could not reach the dead server and was queued to be
    # sent again "for up to 10 minutes"; but while the server stayed down the
    # queue was never looked at, so it never emptied: the retired endpoint stayed
    # in client.endpoints (health-checked, its connection attempts going on) for
    # as long as the client lived.
    monkeypatch.setattr(_transport, "_RECLOSE_FOR", 0.5)
    monkeypatch.setattr(_transport, "_RECLOSE_FIRST", 0.05)
    records = ["127.0.0.1", "127.0.0.2"]
    async with dns_pool(monkeypatch, records) as (a, b, client):
        with trio.fail_after(20):
            while True:
                async with client.session() as s:
                    await s.prefill([1, 2])
                    if s.session_id in a.state().session_ids:
                        await kill_for_good(a)
                        break
            records[:] = ["127.0.0.2"]
            await wait_for(lambda: [e.url for e in client.endpoints] == [b.grpc_url], timeout=5)


async def test_a_dns_refresh_that_hangs_does_not_hold_up_the_health_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The health loop awaited each refresh before its checks: a lookup that hangs
    # (a DNS server gone: the resolver's timeouts and retries) stopped every
    # check, and a draining server kept getting new sessions as long.
    from poc_api import _pool

    async def hanging(host: str, port: int) -> list[str]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async with dns_pool(monkeypatch, ["127.0.0.1", "127.0.0.2"]) as (_a, b, client):
        with trio.fail_after(20):
            await client.score_many([([Tokens([1, 2, 3])], [(1, 3)])] * 10)
            monkeypatch.setattr(_pool, "_lookup", hanging)
            await trio.sleep(0.2)  # a refresh is due (every 50 ms), and hangs
            await trio.to_thread.run_sync(b.set_serving, False)
            await wait_for(
                lambda: client.endpoints[1].state is EndpointState.NOT_SERVING, timeout=3
            )


async def test_a_dns_target_that_cannot_be_resolved_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The lookup's error went to a log line only; the caller was told the name
    # "resolved to no address", as if DNS had answered with an empty record set.
    from poc_api import _pool

    async def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(_pool, "_lookup", failing)
    async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url="dns:///nowhere.test:8001") as client:
        with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable) as caught:
            await client.score([Tokens([1, 2, 3])], [(1, 3)])
    assert "Name or service not known" in str(caught.value)


async def test_a_draining_endpoint_stays_out_of_rotation_when_a_call_there_is_answered() -> None:
    # A draining server (NOT_SERVING) whose connection is cut under a stream
    # (UNREACHABLE), then answers a held session's call: answered() put it back
    # to UNKNOWN, usable, and it got new sessions until the next health check,
    # though its last check said NOT_SERVING. Only a check brings it back.
    async with reference_servers(2, ignore_eos=True, token_delay_ms=5) as (a, b):
        async with cuttable_proxy(a.grpc_port) as (a_url, cut):
            async with poc_api.ApiClient(
                a.base_url, grpc_url=[a_url, b.grpc_url], health_check_interval=1
            ) as client:
                with trio.fail_after(20):
                    async with AsyncExitStack() as stack:
                        held = [await stack.enter_async_context(client.session()) for _ in range(4)]
                        on_a = [s for s in held if s._transport.url == a_url]
                        assert len(on_a) >= 2
                        await trio.to_thread.run_sync(a.set_serving, False)
                        await wait_for(
                            lambda: client.endpoints[0].state is EndpointState.NOT_SERVING,
                            timeout=5,
                        )
                        with pytest.raises(poc_api.ServerUnavailable):
                            sampling = SamplingParams(max_tokens=10**6)
                            async with on_a[0].generate([1, 2], sampling=sampling) as ev:
                                async for _ in ev:
                                    await cut()
                        assert client.endpoints[0].state is EndpointState.UNREACHABLE
                        await on_a[1].prefill([3])  # answered, by the draining server
                        assert client.endpoints[0].state in (
                            EndpointState.UNREACHABLE,
                            EndpointState.NOT_SERVING,
                        ), client.endpoints


async def test_a_health_check_that_waited_for_a_stream_then_hangs_connecting_is_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The server allows one stream, held by a Generate: the health check waits for
    # a stream (client side). The server then drains the connection (graceful
    # GOAWAY) and new connections get no SETTINGS (it hangs): the check leaves the
    # queue for a new connection and times out connecting. That is a failure of the
    # server, not "its streams are all busy".
    caplog.set_level(logging.DEBUG, logger="poc_api")
    async with reference_servers(1) as (good,), misbehaving_server() as slow:
        slow.max_streams = 1
        async with poc_api.ApiClient(
            good.base_url, grpc_url=[good.grpc_url, slow.url], health_check_interval=0.3
        ) as client:
            with trio.fail_after(20):
                async with client.session() as s1, client.session() as s2:
                    s = s1 if s1._transport.url == slow.url else s2
                    await wait_for(lambda: len(slow.calls_to("Check")) >= 2)
                    slow.plan("Generate", Reply("hold"))
                    async with trio.open_nursery() as nursery:
                        gen_scope = trio.CancelScope()

                        async def generate() -> None:
                            with gen_scope:
                                await s.prefill([1])

                        nursery.start_soon(generate)
                        await wait_for(lambda: slow.held is not None)
                        checks = len(slow.calls_to("Check"))
                        await trio.sleep(0.5)  # a check waits for the held stream
                        assert len(slow.calls_to("Check")) == checks
                        before = client.endpoints[1].failures
                        slow.mute = True
                        assert slow.held is not None
                        conn, sid = slow.held
                        frame = hyperframe.frame.GoAwayFrame(0)
                        frame.last_stream_id, frame.error_code = sid, 0
                        mark = len(caplog.records)
                        await conn.stream.send_all(frame.serialize())
                        await wait_for(lambda: client.endpoints[1].failures > before, 5)
                        gen_scope.cancel()
    skipped = [
        r.getMessage() for r in caplog.records[mark:] if "streams are all busy" in r.getMessage()
    ]
    assert not skipped, skipped
