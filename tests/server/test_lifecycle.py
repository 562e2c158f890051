"""ReferenceServer lifecycle: trio, port pairing, restart rules."""

from __future__ import annotations

import gc
import socket
import sys
import threading
import time
import warnings
from typing import Any

import attrs
import httpx
import pytest
import trio
from grpclib.exceptions import StreamTerminatedError

from poc_api.server import ReferenceServer, ServerConfig, ServerState
from poc_api.server._app import bind_port_pair

from .conftest import ServerFactory, SyncSalience, wait_until

TIMEOUT = 10.0
# A raw HTTP/2 client's request headers for OpenSession (tests that speak h2 themselves).
OPEN_SESSION_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/salience.Salience/OpenSession"),
    (":authority", "127.0.0.1"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


async def _get_json(url: str) -> object:
    async with httpx.AsyncClient(timeout=TIMEOUT) as c:
        r = await c.get(url)
        r.raise_for_status()
        return r.json()


async def test_async_with_under_trio() -> None:
    with trio.fail_after(TIMEOUT):
        async with ReferenceServer(ServerConfig()) as srv:
            assert srv.grpc_port == srv.http_port + 1
            body = await _get_json(srv.base_url + "/models")
            assert isinstance(body, dict) and body["object"] == "list"
            assert srv.state().http_requests == {"/v1/models": 1}
        with pytest.raises(RuntimeError):
            srv.start()


async def test_entering_a_server_already_started_refuses_and_leaves_it_serving() -> None:
    # A failed __aenter__ stops the server (its start may have run on in the worker
    # thread): also when the start failed because the server was started before,
    # by someone else, which then stopped serving under them.
    srv = ReferenceServer(ServerConfig())
    srv.start()
    try:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(RuntimeError, match="started once"):
                async with srv:
                    pass
            body = await _get_json(srv.base_url + "/models")
            assert isinstance(body, dict) and body["object"] == "list"
    finally:
        srv.stop()


def test_explicit_port_in_use_fails_to_start() -> None:
    srv = ReferenceServer(ServerConfig())
    srv.start()
    try:
        clash = ReferenceServer(ServerConfig(port=srv.http_port))
        with pytest.raises(OSError):
            clash.start()
    finally:
        srv.stop()
    srv.stop()  # idempotent


async def test_the_repr_shows_the_state_and_the_urls_once_started() -> None:
    # It was object's (<poc_api.server._app.ReferenceServer object at 0x...>).
    srv = ReferenceServer(ServerConfig(api_key="sk-repr-secret"))
    assert repr(srv) == "<ReferenceServer not started>"
    with trio.fail_after(TIMEOUT):
        async with srv:
            urls = f"base_url={srv.base_url!r} grpc_url={srv.grpc_url!r}"
            assert repr(srv) == f"<ReferenceServer running {urls}>"
            clash = ReferenceServer(ServerConfig(port=srv.http_port))
            with pytest.raises(OSError):
                clash.start()
            assert repr(clash) == "<ReferenceServer failed to start: OSError>"
    assert repr(srv) == f"<ReferenceServer stopped {urls}>"
    assert "sk-repr-secret" not in repr(srv)


def test_the_config_repr_hides_the_api_key() -> None:
    # ReferenceServer's repr hid the key, its config's showed it (attrs' repr).
    config = ServerConfig(api_key="sk-repr-secret")
    assert "sk-repr-secret" not in repr(config)
    assert "api_key='<redacted>'" in repr(config)
    assert "api_key=None" in repr(ServerConfig())


def test_port_zero_skips_pairs_whose_second_port_is_taken() -> None:
    http, grpc = bind_port_pair("127.0.0.1", 0)
    try:
        assert grpc.getsockname()[1] == http.getsockname()[1] + 1
        # Occupy the port after ours: the next pair must be elsewhere.
        blocker = socket.socket()
        try:
            blocker.bind(("127.0.0.1", grpc.getsockname()[1] + 1))
        except OSError:
            blocker.close()
            return
        try:
            h2, g2 = bind_port_pair("127.0.0.1", 0)
            assert g2.getsockname()[1] == h2.getsockname()[1] + 1
            h2.close()
            g2.close()
        finally:
            blocker.close()
    finally:
        http.close()
        grpc.close()


def test_state_before_start_raises() -> None:
    with pytest.raises(RuntimeError):
        ReferenceServer(ServerConfig()).state()
    with pytest.raises(RuntimeError):
        _ = ReferenceServer(ServerConfig()).base_url


def test_public_names_are_exported() -> None:
    import poc_api.server as server

    assert {"ReferenceServer", "ServerConfig", "ServerState", "run_forever"} <= set(server.__all__)
    assert all(hasattr(server, name) for name in server.__all__)
    fields = {a.name for a in attrs.fields(ServerState)}
    assert fields == {
        "session_ids",
        "connections_total",
        "connections_open",
        "cancelled_streams",
        "resets",
        "tokens_appended",
        "generate_calls",
        "rpc_counts",
        "http_requests",
        "train_samples",
        "tokens_decoded",
        "bytes_streamed",
        "affinity",
    }


def test_server_config_takes_concepts_as_any_iterable_of_names() -> None:
    # converter=tuple: mypy's attrs plugin cannot solve tuple's TypeVar, so no
    # ServerConfig(concepts=[...]) or (concepts=("a", "b")) call type-checked
    # (tests/typing/user_server.py). A typed converter stores the same tuple.
    import typing
    from collections.abc import Iterable

    assert typing.get_type_hints(ServerConfig.__init__)["concepts"] == Iterable[str]
    for given in (["a", "b"], ("a", "b"), iter("ab")):
        assert ServerConfig(concepts=given).concepts == ("a", "b")
    with pytest.raises(ValueError, match="concepts must be a non-empty tuple"):
        ServerConfig(concepts=[])


@pytest.mark.parametrize("value", ["vowel", b"vowel", 5])
def test_server_config_refuses_a_str_for_concepts_as_the_manifest_does(value: object) -> None:
    # concepts="vowel" became five one-letter concepts, silently; the client's
    # ReadoutManifest("vowel", ...) raises TypeError for the same mistake.
    with pytest.raises(TypeError, match=r"^concepts must be a sequence of str, not "):
        ServerConfig(concepts=value)  # type: ignore[arg-type]


def test_a_busy_grpc_port_is_named_in_the_error() -> None:
    # The gRPC port is never given (it is the HTTP port + 1): a bare "Address
    # already in use" for a free HTTP port left the user guessing which.
    http, grpc = bind_port_pair("127.0.0.1", 0)
    port = http.getsockname()[1]
    http.close()  # free; its neighbour stays taken
    try:
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port + 1} \(gRPC, the HTTP port \+ 1\)"):
            bind_port_pair("127.0.0.1", port)
        # And the HTTP port it took was given back.
        socket.create_server(("127.0.0.1", port)).close()
    finally:
        grpc.close()


@pytest.mark.parametrize(
    ("host", "url_host"),
    [
        ("", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1"),
        ("::", "[::1]"),
        ("::0", "[::1]"),  # was "[::0]": a URL no client can connect to
        ("0000::", "[::1]"),
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "[::1]"),
        ("localhost", "localhost"),
    ],
)
def test_the_urls_of_a_server_on_every_interface_name_this_machine(
    host: str, url_host: str
) -> None:
    from poc_api.server._app import _url_host, every_interface

    assert _url_host(host) == url_host
    # ... and the ready line of `poc-api serve` says "on every interface" for these.
    assert every_interface(host) is (host not in ("127.0.0.1", "::1", "localhost"))


def test_an_empty_host_listens_on_every_interface() -> None:
    # "" reads as every interface (its URLs say 127.0.0.1): getaddrinfo("") failed.
    http, grpc = bind_port_pair("", 0)
    try:
        assert http.getsockname()[0] in ("0.0.0.0", "::")
    finally:
        http.close()
        grpc.close()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_stopping_under_a_stream_of_connects_leaves_no_half_made_transport(how: str) -> None:
    # Connections accepted in the loop turn the listener closed in were left
    # half made: "unclosed transport" ResourceWarnings by the hundred, and on
    # CPython 3.13.0 a TypeError from their __del__ (gh-109564) that failed
    # whichever test the garbage collector happened to run in.
    unraisable: list[BaseException | None] = []
    ports: set[int] = set()
    # Garbage of the tests before this one (in this process) is not this test's.
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        hook, sys.unraisablehook = sys.unraisablehook, lambda u: unraisable.append(u.exc_value)
        try:
            for _ in range(2):
                srv = ReferenceServer(ServerConfig())
                srv.start()
                ports |= {srv.http_port, srv.grpc_port}
                done = threading.Event()

                def connect(port: int, done: threading.Event = done) -> None:
                    while not done.is_set():
                        try:
                            socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        except OSError:
                            pass

                threads = [
                    threading.Thread(target=connect, args=(port,))
                    for port in (srv.http_port, srv.grpc_port)
                    for _ in range(2)
                ]
                for t in threads:
                    t.start()
                try:
                    trio.run(trio.sleep, 0.05)
                    srv.kill() if how == "kill" else srv.stop()
                finally:
                    done.set()
                    for t in threads:
                        t.join()
                gc.collect()
        finally:
            sys.unraisablehook = hook
    # Only the servers' own transports: a client's leaked elsewhere in this
    # process (a session-scoped server's peer) is no failure of theirs.
    unclosed = [
        str(w.message)
        for w in caught
        if "unclosed transport" in str(w.message) and _local_port(w.source) in ports
    ]
    assert unclosed == []
    assert unraisable == []


def _local_port(transport: object) -> int | None:
    """The local port of an asyncio socket transport (a warning's source), if any."""
    get = getattr(transport, "get_extra_info", None)
    sockname = get("sockname") if get is not None else None
    return sockname[1] if isinstance(sockname, tuple) else None


def test_a_call_reset_before_its_handler_ran_leaves_no_stream_behind(
    make_server: ServerFactory,
) -> None:
    # grpclib's request handler releases its stream in a `finally`; a call whose
    # RST_STREAM came in the same read as its request was cancelled before that
    # handler's first step, and its Stream stayed on the connection until the
    # connection closed: a client that keeps one connection and cancels calls
    # grew the server without bound, and stop(grace=) then waited out its grace.
    import h2.config
    import h2.connection
    import h2.errors

    srv = make_server()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock = socket.create_connection(("127.0.0.1", int(srv.grpc_url.rsplit(":", 1)[1])))
    try:
        for i in range(10):
            sid = 1 + 2 * i
            conn.send_headers(sid, OPEN_SESSION_HEADERS)
            conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
            conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        sock.sendall(conn.data_to_send())  # each request and its reset in one read
        grpc = srv._grpc_server
        assert grpc is not None
        assert wait_until(lambda: len(srv.state().resets) == 10)
        assert wait_until(lambda: not any(c.running_streams() for c in grpc.connections)), [
            c.running_streams() for c in grpc.connections
        ]
    finally:
        sock.close()


def test_the_servers_records_of_resets_keep_the_latest_not_all() -> None:
    # Stats.resets was a list that grew by every RST_STREAM a client ever sent
    # (and state() copied it whole): a server running for days grew without bound.
    from poc_api.server._state import KEPT_RECORDS, Stats

    stats = Stats()
    for i in range(KEPT_RECORDS + 5):
        stats.stream_reset(2 * i + 1, 8)
    resets = stats.snapshot(frozenset()).resets
    assert len(resets) == KEPT_RECORDS
    assert resets[-1] == (2 * (KEPT_RECORDS + 4) + 1, 8) and resets[0] == (11, 8)


def test_stop_closes_the_connection_of_a_client_that_stopped_reading(
    make_server: ServerFactory,
) -> None:
    # A client that stops reading its socket mid-Generate (a stopped process, a
    # hung host) leaves the server's writes buffered in its transport; close()
    # waits for them to be flushed, which the stopped loop never does: the socket
    # stayed open (held by ObservedServer.connections) for as long as the
    # ReferenceServer object lived, and a client that read again got no EOF.
    import struct

    import h2.config
    import h2.connection
    import h2.settings

    from poc_api._proto.salience import GenerateRequest, OpenSessionRequest, OpenSessionResponse

    srv = make_server(max_context=1 << 22, ignore_eos=True)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    # Windows wide open: the server's flow control never stops it, its socket does.
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    conn.increment_flow_control_window(2**31 - 1 - 65535)

    def framed(message: OpenSessionRequest | GenerateRequest) -> bytes:
        body = bytes(message)
        return struct.pack(">BI", 0, len(body)) + body

    with socket.create_connection(("127.0.0.1", srv.grpc_port), timeout=10) as sock:
        conn.send_headers(1, OPEN_SESSION_HEADERS)
        conn.send_data(1, framed(OpenSessionRequest()), end_stream=True)
        sock.sendall(conn.data_to_send())
        answer = b""
        while len(answer) < 5 or len(answer) < 5 + int.from_bytes(answer[1:5]):
            for ev in conn.receive_data(sock.recv(65536)):
                if isinstance(ev, h2.events.DataReceived) and ev.stream_id == 1:
                    answer += ev.data
        session_id = OpenSessionResponse.parse(answer[5:]).session_id
        conn.send_headers(
            3,
            [
                (k, "/salience.Salience/Generate" if k == ":path" else v)
                for k, v in OPEN_SESSION_HEADERS
            ],
        )
        generate = GenerateRequest(session_id=session_id, append_tokens=[65], max_tokens=10**6)
        conn.send_data(3, framed(generate), end_stream=True)
        sock.sendall(conn.data_to_send())
        # ... and reads nothing until the server's writes back up.
        streamed = [-1]

        def stalled() -> bool:
            before, streamed[0] = streamed[0], srv.state().bytes_streamed
            time.sleep(0.1)
            return streamed[0] == before

        # (Filling the socket buffers takes a few MiB of decoding: seconds on a
        # loaded 2-core CI, past wait_until's default 5 s.)
        assert wait_until(stalled, timeout=30)
        srv.stop()
        sock.settimeout(5)
        try:
            while sock.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass  # (an abort is a fine end too)
        except TimeoutError:
            pytest.fail("the stopped server's connection was left open")


def test_stop_is_prompt_under_an_http_client_that_stopped_reading_a_stream(
    make_server: ServerFactory,
) -> None:
    # The connection's task, cancelled by the stop, closed its writer and waited
    # in wait_closed() for a flush the client never allowed: stop() gave up after
    # its 10 s timeout and left the server's thread (and the socket) behind.
    import json

    srv = make_server(max_context=1 << 22, ignore_eos=True)
    body = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6, "stream": True}
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        time.sleep(1.0)  # ... and reads nothing: the server's writes back up
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 5
        assert srv._thread is not None and not srv._thread.is_alive()


def test_a_context_window_past_uint32_is_refused() -> None:
    # OpenSessionResponse.max_length is a uint32: max_context=2**32 + 5 was taken,
    # reported as max_length 5, and poc_api's client then refused a 25-position
    # prompt with ContextOverflow ("past the context window of 5").
    assert ServerConfig(max_context=2**32 - 1).max_context == 2**32 - 1
    with pytest.raises(ValueError, match="max_context"):
        ServerConfig(max_context=2**32 + 5)
    from click.testing import CliRunner

    from poc_api.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--port", "0", "--max-context", str(2**32 + 5)])
    assert result.exit_code == 2 and "--max-context" in result.output, result.output


def test_a_config_that_is_no_server_config_is_a_type_error() -> None:
    # A dict (an overridden poc_server_config fixture returning the fields) failed
    # in the server's thread, as AttributeError: 'dict' object has no attribute ...
    with pytest.raises(TypeError, match=r"config must be a ServerConfig, not dict"):
        ReferenceServer({"seed": 1})  # type: ignore[arg-type]


def test_a_server_that_failed_to_start_drains_as_it_stops() -> None:
    # stop() and kill() were no-ops on it; drain() raised "Event loop is closed"
    # (from a cleanup's finally, over the start's own OSError).
    srv = ReferenceServer(ServerConfig())
    srv.start()
    try:
        clash = ReferenceServer(ServerConfig(port=srv.http_port))
        with pytest.raises(OSError):
            clash.start()
        clash.drain(grace=0.1)
        with pytest.raises(RuntimeError, match="not running"):
            clash.set_serving(False)
    finally:
        srv.stop()


def test_drain_waits_for_open_sessions_then_stops() -> None:
    srv = ReferenceServer(ServerConfig())
    srv.start()
    client = SyncSalience(srv.grpc_port)
    try:
        sid = client.open()
        drain = threading.Thread(target=srv.drain, kwargs={"grace": 10})
        drain.start()
        time.sleep(0.3)
        assert drain.is_alive()  # (waits for the open session)
        try:
            client.close_session(sid)
        except StreamTerminatedError as exc:
            # The drain's stop sends GOAWAY once the session is gone, and grpclib's
            # client ends every stream on any GOAWAY, even a graceful one that the
            # close's answer still follows (poc_api's client waits for it).
            assert "GOAWAY" in str(exc), exc
        drain.join(5)
        assert not drain.is_alive()  # (well within its grace: the session closed)
    finally:
        client.close()
        srv.stop()
    assert srv._thread is not None and not srv._thread.is_alive()


@pytest.mark.parametrize("cancels", [1, 2])
def test_an_asyncio_block_cancelled_while_its_server_starts_stops_the_server(
    cancels: int,
) -> None:
    # asyncio lets go of a cancelled to_thread() at once; the thread went on
    # starting the server, and with no __aexit__ for a failed __aenter__ it served
    # on for the rest of the process (a test's asyncio.timeout, a TaskGroup's
    # failing sibling). A second cancellation (a TaskGroup's, after an
    # asyncio.timeout's), while __aenter__ waited for the start it was cancelled
    # in, let go of that wait: the stop ran beside the start still going (before
    # the server's loop was up, nothing to stop), which then served on.
    import asyncio

    srv = ReferenceServer(ServerConfig())
    start = srv.start

    def slow_start() -> None:
        time.sleep(0.2)  # (its model loading, say)
        start()

    srv.start = slow_start  # type: ignore[method-assign]

    async def main() -> None:
        async def block() -> None:
            async with srv:
                await asyncio.sleep(TIMEOUT)

        task = asyncio.ensure_future(block())
        await asyncio.sleep(0)  # the worker thread is starting the server
        for _ in range(cancels):
            task.cancel()
            await asyncio.sleep(0.05)  # __aenter__ waits for the start, cancelled
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert srv._thread is not None
    srv._thread.join(TIMEOUT)
    assert not srv._thread.is_alive(), srv


async def test_a_ctrl_c_as_the_start_returns_under_trio_is_raised_and_stops_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Ctrl-C landing as the worker thread's start returned (trio raises it in
    # any unprotected bytecode) started the server a second time: "can only be
    # started once" went out instead of the KeyboardInterrupt.
    run_sync = trio.to_thread.run_sync
    interrupted = False

    async def interrupted_on_return(fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal interrupted
        result = await run_sync(fn, *args, **kwargs)
        if not interrupted:
            interrupted = True
            raise KeyboardInterrupt
        return result

    srv = ReferenceServer(ServerConfig())
    monkeypatch.setattr(trio.to_thread, "run_sync", interrupted_on_return)
    with trio.fail_after(TIMEOUT), pytest.raises(KeyboardInterrupt):
        async with srv:
            pass
    assert srv._thread is not None and not srv._thread.is_alive(), srv


def test_stop_without_grace_sends_goaway_before_it_closes(make_server: ServerFactory) -> None:
    # stop() says every connection gets a GOAWAY; with no grace none was sent, the
    # connection only closed: a call a client sent as it closed (a conversation's
    # next turn, right after a restart) could not be known unprocessed, and failed
    # with "connection lost" instead of going again to the restarted server.
    import h2.config
    import h2.connection
    import h2.events

    srv = make_server()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", srv.grpc_port), timeout=TIMEOUT) as sock:
        sock.sendall(conn.data_to_send())
        events: list[object] = []
        while not any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events):
            events += conn.receive_data(sock.recv(65536))
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        while data := sock.recv(65536):
            events += conn.receive_data(data)
        stopper.join(TIMEOUT)
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events), events


def test_a_call_sent_after_the_stop_goaway_is_not_run(make_server: ServerFactory) -> None:
    # The GOAWAY of stop(grace=) names the last stream the server will finish; a
    # client sends again, elsewhere, every call above it (never processed, RFC 9113
    # 6.8). The GOAWAY was raw bytes h2 knew nothing of, and a call that reached
    # the server during the grace still ran: processed twice.
    import h2.config
    import h2.connection
    import h2.events

    srv = make_server()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", srv.grpc_port), timeout=TIMEOUT) as sock:
        conn.send_headers(
            1, OPEN_SESSION_HEADERS
        )  # no request yet: the call runs until the grace ends
        sock.sendall(conn.data_to_send())
        conn.send_headers(3, OPEN_SESSION_HEADERS)
        conn.send_data(3, b"\0\0\0\0\0", end_stream=True)
        late = conn.data_to_send()  # (sent once the GOAWAY is in)
        events: list[object] = []
        while not any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events):
            events += conn.receive_data(sock.recv(65536))
        stopper = threading.Thread(target=lambda: srv.stop(grace=1.0))
        stopper.start()
        while not any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
            events += conn.receive_data(sock.recv(65536))
        (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway.last_stream_id == 1
        sock.sendall(late)
        stopper.join(TIMEOUT)
    assert srv.state().session_ids == frozenset()
