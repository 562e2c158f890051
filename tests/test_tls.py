"""TLS: ``https`` URLs on both sides, a private CA, a client certificate.

The reference server speaks plaintext; a TLS-terminating proxy (trio's
``SSLStream``, a certificate from ``trustme``'s CA) sits in front of each of its
ports, choosing ALPN ``h2`` for gRPC and ``http/1.1`` for HTTP as real servers do.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme
from helpers import reset_while_the_loop_is_busy, resource_warnings, wait_for

import poc_api
from poc_api import Tokens
from poc_api.server import ReferenceServer
from poc_api.testing import reference_server


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@attrs.define
class Knobs:
    """How a :func:`tls_proxy` misbehaves (changed while it runs)."""

    frozen: bool = False  # moves no byte either way, TCP up: a frozen server
    linger: float = 0.0  # seconds before it passes an end on: a peer some RTT away
    accepted: list[trio.SocketStream] = attrs.Factory(list)  # the client sides' sockets


async def _pump(source: trio.abc.Stream, sink: trio.abc.Stream, knobs: Knobs) -> None:
    try:
        while data := await source.receive_some(65536):
            while knobs.frozen:  # noqa: ASYNC110 - a test knob, set from the test
                await trio.sleep(0.02)
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        try:
            await trio.sleep(knobs.linger)
        finally:  # (also when the proxy is cancelled: the socket is not left to the GC)
            await trio.aclose_forcefully(sink)


@asynccontextmanager
async def tls_proxy(
    port: int,
    server_ssl: ssl.SSLContext,
    alpn: str,
    seen: list[str] | None = None,
    knobs: Knobs | None = None,
) -> AsyncIterator[int]:
    """A TLS port in front of ``127.0.0.1:port`` that speaks only ``alpn``;
    ``seen`` gets each handshake's outcome ("ok", or why not)."""
    knobs = knobs or Knobs()

    async def serve(tcp: trio.SocketStream) -> None:
        knobs.accepted.append(tcp)
        tls = trio.SSLStream(tcp, server_ssl, server_side=True)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            if seen is not None:
                cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
                seen.append(getattr(cause, "reason", None) or repr(cause))
            await trio.aclose_forcefully(tcp)
            return
        if tls.selected_alpn_protocol() != alpn:
            # As grpc-go does: no "h2" offered, no gRPC (and no "http/1.1", no HTTP).
            if seen is not None:
                seen.append(f"ALPN {tls.selected_alpn_protocol()!r}")
            await trio.aclose_forcefully(tls)
            return
        if seen is not None:
            seen.append("ok")
        backend = await trio.open_tcp_stream("127.0.0.1", port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, tls, backend, knobs)
            nursery.start_soon(_pump, backend, tls, knobs)

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            partial(trio.serve_tcp, serve, 0, host="127.0.0.1", handler_nursery=nursery)
        )
        yield listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def server_context(
    ca: trustme.CA, alpn: str, client_ca: trustme.CA | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    ctx.set_alpn_protocols([alpn])
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(ctx)
    return ctx


@asynccontextmanager
async def tls_server(
    ca: trustme.CA,
    client_ca: trustme.CA | None = None,
    seen: list[str] | None = None,
    knobs: Knobs | None = None,
    **config: Any,
) -> AsyncIterator[tuple[ReferenceServer, str, str]]:
    """A reference server behind TLS: (server, https base_url, https grpc_url);
    ``knobs`` for its gRPC side."""
    async with (
        reference_server(**config) as server,
        tls_proxy(
            server.http_port, server_context(ca, "http/1.1", client_ca), "http/1.1", seen
        ) as http_port,
        tls_proxy(
            server.grpc_port, server_context(ca, "h2", client_ca), "h2", seen, knobs
        ) as grpc_port,
    ):
        yield server, f"https://localhost:{http_port}/v1", f"https://localhost:{grpc_port}"


async def use_both_sides(client: poc_api.ApiClient) -> None:
    """One HTTP call and one gRPC call."""
    assert await client.readout_manifest() is not None
    [result] = await client.score([Tokens([5, 6, 7, 8])], [(1, 4)])
    assert result.logprob < 0


async def test_a_private_ca_from_ssl_context_factory_serves_grpc_and_http(ca: trustme.CA) -> None:
    def trusting() -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        return ctx

    seen: list[str] = []
    async with (
        tls_server(ca, seen=seen) as (_, base_url, grpc_url),
        poc_api.ApiClient(base_url, grpc_url=grpc_url, ssl_context_factory=trusting) as client,
    ):
        await use_both_sides(client)
    assert seen == ["ok", "ok"], seen  # each side offered its protocol by ALPN


async def test_grpc_trusts_ssl_cert_file_as_the_http_calls_do(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # grpclib's default context reads certifi's CAs alone: the HTTP calls took
    # the private CA of SSL_CERT_FILE and every gRPC call failed to verify.
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with (
        tls_server(ca) as (_, base_url, grpc_url),
        poc_api.ApiClient(base_url, grpc_url=grpc_url) as client,
    ):
        await use_both_sides(client)


async def test_a_client_certificate_from_the_factory_is_presented_on_both_sides(
    ca: trustme.CA,
) -> None:
    client_ca = trustme.CA()
    client_cert = client_ca.issue_cert("agent@example.com")

    def with_cert(present: bool) -> Callable[[], ssl.SSLContext]:
        def make() -> ssl.SSLContext:
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            if present:
                client_cert.configure_cert(ctx)
            return ctx

        return make

    seen: list[str] = []
    async with tls_server(ca, client_ca, seen) as (_, base_url, grpc_url):
        async with poc_api.ApiClient(
            base_url, grpc_url=grpc_url, ssl_context_factory=with_cert(True)
        ) as client:
            await use_both_sides(client)
        assert seen and set(seen) == {"ok"}, seen
        # Without it the server refuses the handshake: a typed error on each side.
        async with poc_api.ApiClient(
            base_url, grpc_url=grpc_url, ssl_context_factory=with_cert(False)
        ) as client:
            with pytest.raises(poc_api.PocApiError) as http_info:
                await client.readout_manifest()
            with pytest.raises(poc_api.ServerUnavailable) as grpc_info:
                await client.score([Tokens([5, 6, 7])], [(1, 3)])
        assert "ok" not in seen[-1], seen
    # TLS 1.3 refuses after the handshake, with nothing the client reads: the gRPC
    # side asked "is it a gRPC server?" and the HTTP side said "no reason given".
    for info in (http_info, grpc_info):
        assert "client certificate" in str(info.value), info.value


async def test_an_untrusted_grpc_certificate_is_server_unavailable_saying_why(
    ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with (
        tls_server(ca) as (_, base_url, grpc_url),
        poc_api.ApiClient(base_url, grpc_url=grpc_url) as client,
    ):
        with pytest.raises(poc_api.ServerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await client.score([Tokens([5, 6, 7])], [(1, 3)])


def test_ssl_context_factory_must_be_a_function() -> None:
    with pytest.raises(TypeError, match="ssl_context_factory must be a function"):
        poc_api.ApiClient(
            "https://localhost:1/v1",
            ssl_context_factory=ssl.create_default_context(),  # type: ignore[arg-type]
        )


@pytest.mark.parametrize("returns", ["same", "not a context"])
def test_ssl_context_factory_must_return_a_new_context_each_call(returns: str) -> None:
    # One context for both sides would be mutated by each: httpcore sets its
    # ALPN to http/1.1 at every connect, and gRPC servers refuse a handshake
    # without h2.
    shared = ssl.create_default_context()

    def make() -> ssl.SSLContext:
        return shared if returns == "same" else "ctx"  # type: ignore[return-value]

    with pytest.raises(TypeError, match=r"must return a new ssl\.SSLContext"):
        poc_api.ApiClient("https://localhost:1/v1", ssl_context_factory=make)


def test_ssl_context_factory_runs_when_the_client_is_made() -> None:
    # Not as it opens: that is shielded from Ctrl-C, and a factory is the
    # caller's code (a slow one held Ctrl-C off until it returned, twice).
    made: list[ssl.SSLContext] = []

    def make() -> ssl.SSLContext:
        made.append(ssl.create_default_context())
        return made[-1]

    poc_api.ApiClient("https://localhost:1/v1", ssl_context_factory=make)
    assert len(made) == 2 and made[0] is not made[1]


def test_a_server_side_context_is_refused_at_once() -> None:
    # It failed at each connect: a raw ssl.SSLError from the HTTP side.
    with pytest.raises(ValueError, match="client contexts"):
        poc_api.ApiClient(
            "https://localhost:1/v1",
            ssl_context_factory=lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
        )


def trusting(ca: trustme.CA) -> Callable[[], ssl.SSLContext]:
    def make() -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        return ctx

    return make


async def test_keepalive_finds_a_frozen_tls_server_as_soon_as_a_plaintext_one(
    ca: trustme.CA,
) -> None:
    # grpclib closes a connection whose ping went unanswered; over TLS that close
    # first traded close_notify alerts for up to 30 s (asyncio's
    # ssl_shutdown_timeout): the stream failed 31 s after the freeze, and every
    # call meanwhile raised a bare AttributeError from grpclib (the closed
    # connection still looked connected).
    knobs = Knobs()
    async with (
        tls_server(ca, knobs=knobs, token_delay_ms=100) as (_, base_url, grpc_url),
        poc_api.ApiClient(
            base_url,
            grpc_url=grpc_url,
            ssl_context_factory=trusting(ca),
            keepalive_time=0.5,
            keepalive_timeout=1.0,
        ) as client,
        client.session() as s,
    ):
        await s.prefill([1, 2])
        frozen_at = 0.0
        with trio.fail_after(20), pytest.raises(poc_api.ServerUnavailable):
            async with s.generate([3], sampling=poc_api.SamplingParams(max_tokens=400)) as ev:
                async for _ in ev:
                    if not knobs.frozen:
                        knobs.frozen, frozen_at = True, time.monotonic()
        assert time.monotonic() - frozen_at < 5.0  # 0.5 + 1.0 s, as in plaintext
        # A call now fails as a call to a frozen server does (typed, at once).
        with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable):
            await client.score([Tokens([5, 6, 7])], [(1, 3)])


async def test_a_tls_connection_is_closed_with_its_client(ca: trustme.CA) -> None:
    # close() began the close_notify exchange, the loop stopped before the peer
    # (20 ms away) answered, and the socket stayed open until the garbage
    # collector closed it ("unclosed transport"): every client of a remote server.
    knobs = Knobs(linger=0.02)
    async with tls_server(ca, knobs=knobs) as (_, base_url, grpc_url):
        with resource_warnings() as unclosed:
            for _ in range(5):
                async with poc_api.ApiClient(
                    base_url, grpc_url=grpc_url, ssl_context_factory=trusting(ca)
                ) as client:
                    await client.score([Tokens([5, 6, 7])], [(1, 3)])
        assert not unclosed, unclosed


async def test_the_default_ca_certificates_load_once_and_off_the_trio_thread(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each ApiClient's entry made httpx's default SSLContext in the trio thread:
    # 30-45 ms of loading certifi's CAs, every task of the run stalled meanwhile;
    # and each endpoint of a pool made its own for gRPC, in the loop thread.
    import httpx

    from poc_api import _transport

    made: list[tuple[str, bool]] = []
    real = httpx.create_ssl_context

    def spy(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        # (The trio run is the main thread's.)
        in_trio_thread = threading.current_thread() is threading.main_thread()
        made.append((os.environ.get("SSL_CERT_FILE", ""), in_trio_thread))
        return real(*args, **kwargs)

    monkeypatch.setattr(httpx, "create_ssl_context", spy)
    monkeypatch.setattr(_transport, "_DEFAULT_SSL", {})
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with tls_server(ca) as (_, base_url, grpc_url):
        # A pool of two endpoints (the one server by two names), both connected.
        host = "127.0.0.1" if "localhost" in grpc_url else "localhost"
        pool = [grpc_url, f"https://{host}:{grpc_url.rsplit(':', 1)[1]}"]
        for _ in range(2):
            async with poc_api.ApiClient(base_url, grpc_url=pool) as client:
                await use_both_sides(client)
                await wait_for(
                    lambda: all(
                        ep.state is poc_api.EndpointState.SERVING for ep in client.endpoints
                    )
                )
    # One for the HTTP side and one for gRPC (shared by both endpoints), for both
    # clients; none in the trio thread.
    assert made == [(str(pem), False)] * 2, made
    assert sorted(side for side, *_ in _transport._DEFAULT_SSL) == ["grpc", "http"]
    # The variables choose the CAs: a new value, a new context.
    monkeypatch.delenv("SSL_CERT_FILE")
    async with poc_api.ApiClient("http://127.0.0.1:1/v1"):
        pass
    assert made[2:] == [("", False)], made


async def test_the_ca_certificates_load_beside_a_program_whose_threads_fill_trios_limiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The CAs load in a thread (above): through trio's default limiter (40), the
    # entry waited behind the program's own blocked threads, maybe for ever.
    from poc_api import _transport

    monkeypatch.setattr(_transport, "_DEFAULT_SSL", {})
    release = threading.Event()
    limiter = trio.to_thread.current_default_thread_limiter()
    async with trio.open_nursery() as nursery:
        for _ in range(limiter.total_tokens):
            nursery.start_soon(
                partial(trio.to_thread.run_sync, release.wait, abandon_on_cancel=True)
            )
        await wait_for(lambda: limiter.borrowed_tokens == limiter.total_tokens)
        try:
            with trio.fail_after(10):
                async with poc_api.ApiClient("http://127.0.0.1:1/v1"):
                    pass
        finally:
            release.set()


async def test_ca_certificates_that_cannot_be_loaded_are_a_value_error_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bare ssl.SSLError from the client's entry (httpx >= 0.28: FileNotFoundError
    # for a missing file too; 0.27 falls back to certifi's CAs then).
    from poc_api import _transport

    monkeypatch.setattr(_transport, "_DEFAULT_SSL", {})
    (tmp_path / "bad.pem").write_text("not a certificate")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "bad.pem"))
    with pytest.raises(ValueError, match=r"cannot be loaded \(SSL_CERT_FILE='.*bad\.pem'"):
        async with poc_api.ApiClient("http://127.0.0.1:1/v1"):
            pass


async def test_grpc_to_an_https_port_without_h2_says_alpn_chose_none(ca: trustme.CA) -> None:
    # The HTTP side's TLS port offers only http/1.1: the handshake ends with no
    # ALPN protocol, and the port closes. The message said "closed the connection
    # before speaking HTTP/2" and nothing of the handshake that told why.
    async with tls_server(ca) as (_, base_url, _grpc_url):
        exc = await grpc_failure(ca, base_url.removesuffix("/v1"))
    assert "its TLS handshake chose no ALPN protocol, not 'h2'" in str(exc)
    assert "client certificate" not in str(exc)  # (the ALPN said why: no guess beside it)


@contextmanager
def refusing_handshakes(ctx: ssl.SSLContext | None) -> Iterator[int]:
    """A blocking TLS port (its alerts go out before the socket closes, as a real
    server's do) that ends every handshake: with ``ctx``'s refusal, or by closing
    the connection after the ClientHello when ``ctx`` is None. Yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener closed: the test is over
                return
            with conn:
                if ctx is None:
                    conn.recv(4096)  # the ClientHello: the handshake has begun
                    continue
                with contextlib.suppress(OSError):  # (ssl.SSLError is one)
                    ctx.wrap_socket(conn, server_side=True)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


async def grpc_failure(ca: trustme.CA, grpc_url: str) -> poc_api.ServerUnavailable:
    """The ServerUnavailable of a gRPC call to ``grpc_url``, trusting ``ca``."""
    async with poc_api.ApiClient(
        "https://localhost:1/v1",
        grpc_url=grpc_url,
        ssl_context_factory=trusting(ca),
    ) as client:
        with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable) as info:
            await client.score([Tokens([5, 6, 7])], [(1, 3)])
    return info.value


async def test_a_tls_server_refusing_alpn_h2_is_named_as_such(ca: trustme.CA) -> None:
    # nginx without http2 ends the handshake with a no_application_protocol alert
    # (120); the message was OpenSSL's own "tlsv1 alert no application protocol".
    ctx = server_context(ca, "http/1.1")
    ctx.sni_callback = lambda *_: 120  # type: ignore[assignment,return-value]
    with refusing_handshakes(ctx) as port:
        exc = await grpc_failure(ca, f"https://localhost:{port}")
    assert "refused ALPN 'h2'" in str(exc), exc
    assert "it does not speak HTTP/2" in str(exc)
    assert exc.retriable


async def test_a_connection_closed_in_the_handshake_says_so(ca: trustme.CA) -> None:
    # asyncio reports a close in the handshake as a ConnectionResetError with no
    # text: the message ended in "cannot connect: " and nothing.
    with refusing_handshakes(None) as port:
        exc = await grpc_failure(ca, f"https://localhost:{port}")
    assert str(exc).endswith(
        "cannot connect: the connection closed in the TLS handshake (ConnectionResetError)"
    ), exc
    assert exc.retriable


async def test_an_https_base_url_refusing_alpn_http_1_1_is_named_as_such(ca: trustme.CA) -> None:
    # A gRPC-only TLS port (grpc-go refuses a handshake without h2) given as the
    # base_url: the message was OpenSSL's "tlsv1 alert no application protocol".
    ctx = server_context(ca, "h2")
    ctx.sni_callback = lambda *_: 120  # type: ignore[assignment,return-value]
    with refusing_handshakes(ctx) as port:
        async with poc_api.ApiClient(
            f"https://localhost:{port}/v1", ssl_context_factory=trusting(ca)
        ) as client:
            with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable) as info:
                await client.readout_manifest()
    assert "refused ALPN 'http/1.1'" in str(info.value), info.value
    assert "is base_url a gRPC port" in str(info.value)
    assert info.value.retriable


async def test_plaintext_grpc_to_a_tls_grpc_port_suggests_https(ca: trustme.CA) -> None:
    # http:// to a TLS gRPC port: the port drops the HTTP/2 preface it cannot read
    # as a handshake, and the message asked "is it a gRPC server?" of one that is.
    async with tls_server(ca) as (_, _base_url, grpc_url):
        exc = await grpc_failure(ca, grpc_url.replace("https://", "http://"))
    assert "closed the connection before speaking HTTP/2" in str(exc), exc
    assert "https://" in str(exc), exc


async def test_a_tls_port_that_closes_after_the_handshake_is_not_an_empty_reason(
    ca: trustme.CA,
) -> None:
    # An https base_url on a TLS port that takes the handshake (no ALPN chosen) and
    # closes: httpx's ReadError, httpcore's and trio's under it are all empty, and
    # the message ended "tokenize: ReadError: ", with nothing after it.
    async with tls_server(ca) as (_, _base_url, grpc_url):
        async with poc_api.ApiClient(
            grpc_url + "/v1", grpc_url=grpc_url, ssl_context_factory=trusting(ca)
        ) as client:
            with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable) as info:
                await client.tokenize("a")
    said = str(info.value)
    assert not said.rstrip().endswith(":"), said
    assert "closed" in said, said


async def test_plaintext_http_to_a_tls_http_port_suggests_https(ca: trustme.CA) -> None:
    # http:// to a TLS HTTP port (uvicorn --ssl-*, Python's ssl): the port drops
    # the request it cannot read as a handshake, and the error said only "connection
    # lost: Server disconnected without sending a response", where the gRPC side
    # asks "not a TLS port (then https://)?" of the same mistake.
    async with tls_server(ca) as (_, base_url, grpc_url):
        async with poc_api.ApiClient(
            base_url.replace("https://", "http://"), grpc_url=grpc_url
        ) as client:
            with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable) as info:
                await client.tokenize("a")
    assert "https://" in str(info.value), info.value


async def test_a_tls_connection_reset_found_by_a_coalesced_write_fails_the_call_at_once(
    ca: trustme.CA,
) -> None:
    # As over plaintext (test_goaway_and_close_paths): the peer resets the
    # connection while the loop thread is busy; the next call's HEADERS, written
    # right before the loop selects, fail with ECONNRESET in the socket under the
    # TLS transport, which closes it and call_soon's its loss. The loop must not
    # block in select with the timeout it chose before that write.
    knobs = Knobs()
    async with (
        tls_server(ca, knobs=knobs) as (_, base_url, grpc_url),
        poc_api.ApiClient(base_url, grpc_url=grpc_url, ssl_context_factory=trusting(ca)) as client,
    ):
        with trio.fail_after(5):
            async with client.session():  # the connection is up
                pass
        (tcp,) = knobs.accepted
        await reset_while_the_loop_is_busy(client, tcp)


async def test_a_stalled_tls_handshake_fails_at_connect_timeout_naming_it(ca: trustme.CA) -> None:
    # A port that accepts TCP and never answers the ClientHello: the HTTP side said
    # only "timed out (ConnectTimeout)", naming neither the bound nor the connect.
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        async with poc_api.ApiClient(
            f"https://localhost:{port}/v1",
            grpc_url=f"https://localhost:{port}",
            ssl_context_factory=trusting(ca),
            connect_timeout=0.5,
        ) as client:
            with trio.fail_after(10), pytest.raises(poc_api.PocApiTimeout) as http:
                await client.readout_manifest()
            with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable) as grpc:
                await client.score([Tokens([5, 6, 7])], [(1, 3)])
    finally:
        listener.close()
    for exc in (http.value, grpc.value):
        assert "no connection within connect_timeout=0.5 s" in str(exc), exc
        assert exc.retriable
