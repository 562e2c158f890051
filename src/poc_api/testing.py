"""Helpers for testing code that uses poc_api, against the embedded reference server.

Context managers, usable from any trio program (no pytest needed)::

    import trio
    import poc_api
    from poc_api.testing import open_client, reference_server

    async def main() -> None:
        async with reference_server(seed=1) as server, open_client(server) as client:
            async with client.session() as s:
                await s.prefill(await client.tokenize("Hello"))
                assert s.committed_len == 5

    trio.run(main)

pytest fixtures (they need pytest and pytest-trio). In your ``conftest.py``::

    pytest_plugins = ["poc_api.testing"]

then, in a test module (with ``trio_mode = true``, or mark the test ``@pytest.mark.trio``)::

    async def test_greeting(poc_client: poc_api.ApiClient) -> None:
        results = await poc_client.score([poc_api.Tokens(list(b"Hi there"))], [(2, 8)])
        assert results[0].logprob < 0

- ``poc_server`` (session scope): one :class:`~poc_api.server.ReferenceServer` for the
  whole run. It runs on its own thread, so the fixture is synchronous. Override the
  ``poc_server_config`` fixture (session scope, returns a
  :class:`~poc_api.server.ServerConfig`) to configure it.
- ``poc_client`` (function scope, async): an open :class:`~poc_api.ApiClient` connected to
  ``poc_server``, closed after the test.
- ``poc_png`` (function scope): a 56x56 PNG image (4 placeholder positions on the
  reference server).

:func:`make_png` builds other PNG images. Importing this module without pytest
installed is fine: only the fixtures are left out.

A ``conftest.py`` may import helpers from this module as well as name it in
``pytest_plugins``: it has no ``assert`` for pytest to rewrite, and says so to
pytest (PYTEST_DONT_REWRITE), which otherwise warns that the module was imported
before it could rewrite it (an error under ``filterwarnings = error``).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import SupportsFloat, SupportsIndex, TypedDict, Unpack

import trio

from ._client import ApiClient
from ._clock import hold_clock
from ._errors import protected_asynccontextmanager
from ._png import encode_png
from .server import ReferenceServer, ServerConfig
from .server._app import _run_in_thread

__all__ = [
    "NGINX",
    "ApiClientOptions",
    "ServerConfigFields",
    "make_png",
    "nginx_grpc_config",
    "nginx_grpc_proxy",
    "open_client",
    "reference_server",
    "reference_servers",
]


class ServerConfigFields(TypedDict, total=False):
    """The keyword arguments of :class:`~poc_api.server.ServerConfig`, all optional.

    What :func:`reference_server` and :func:`reference_servers` take, so that a type
    checker refuses a misspelt field or a value of the wrong type. Each means what
    the field of ``ServerConfig`` of the same name means.
    """

    host: str
    port: int
    api_key: str | None
    readout: bool
    seed: int
    max_sessions: int
    idle_timeout: float
    max_context: int
    max_message_size: int
    ignore_eos: bool
    n_layers: int
    concepts: Iterable[str]
    model_name: str
    prefill_delay_us: float
    token_delay_ms: float
    prefill_slots: int


class ApiClientOptions(TypedDict, total=False):
    """The options of :class:`~poc_api.ApiClient` after ``base_url``, all optional.

    What :func:`open_client` takes, so that a type checker refuses a misspelt
    option or a value of the wrong type. Each means what the ``ApiClient``
    argument of the same name means.
    """

    api_key: str
    model: str
    grpc_url: str | Sequence[str] | None
    connect_timeout: SupportsFloat
    timeout: SupportsFloat
    close_timeout: SupportsFloat
    max_buffered_events: SupportsIndex
    max_buffered_bytes: SupportsIndex
    max_message_size: SupportsIndex
    keepalive_time: SupportsFloat | None
    keepalive_timeout: SupportsFloat
    keepalive_idle: bool
    max_concurrent_streams: SupportsIndex
    max_http_connections: SupportsIndex
    affinity_header: str | None
    health_check_interval: SupportsFloat
    dns_refresh: SupportsFloat
    ssl_context_factory: Callable[[], ssl.SSLContext] | None
    trust_env: bool


@protected_asynccontextmanager
async def reference_server(**config: Unpack[ServerConfigFields]) -> AsyncIterator[ReferenceServer]:
    """Run a reference server for the block; stop it on exit.

    Keyword arguments are :class:`~poc_api.server.ServerConfig` fields (``seed``,
    ``api_key``, ``readout``, ``max_context``, ``ignore_eos``, ...: see
    :class:`ServerConfigFields`). The port defaults
    to 0: a free pair of loopback ports (HTTP on ``p``, gRPC on ``p + 1``).

    Starting and stopping run in a worker thread, so the event loop is not blocked.

    Example::

        async with reference_server(api_key="secret", readout=False) as server:
            print(server.base_url, server.grpc_url)
    """
    async with ReferenceServer(ServerConfig(**config)) as server:
        yield server


@protected_asynccontextmanager
async def reference_servers(
    n: int, **config: Unpack[ServerConfigFields]
) -> AsyncIterator[list[ReferenceServer]]:
    """Run ``n`` reference servers for the block ; stop them on exit.

    Keyword arguments are :class:`~poc_api.server.ServerConfig` fields
    (:class:`ServerConfigFields`), shared by all of them (``token_delay_ms`` and
    ``prefill_delay_us`` make them behave like busy inference servers). A test may
    :meth:`~poc_api.server.ReferenceServer.stop` one early to kill it; stopping
    twice is harmless.

    Example::

        async with reference_servers(3) as servers:
            async with ApiClient(servers[0].base_url,
                                 grpc_url=[s.grpc_url for s in servers]) as client:
                ...
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("n must be an int")
    if n < 1:
        raise ValueError("n must be at least 1")
    servers = [ReferenceServer(ServerConfig(**config)) for _ in range(n)]
    started: list[ReferenceServer] = []
    try:
        # One after another: each start takes milliseconds, and a failure is then
        # a plain exception, not a group.
        for server in servers:
            with hold_clock():  # (a thread's work, which a MockClock cannot see)
                await trio.to_thread.run_sync(server.start)
            started.append(server)
        yield servers
    finally:
        # Shielded, and each stop run to its end under a Ctrl-C too (trio delivers
        # one at any checkpoint, shielded or not); the Ctrl-C goes on after.
        ki: KeyboardInterrupt | None = None
        for server in started:
            try:
                await _run_in_thread(server.stop, shielded=True)
            except KeyboardInterrupt as exc:
                ki = exc
        if ki is not None:
            raise ki


#: Where Debian's nginx packages (``nginx-light`` is enough) install the binary.
NGINX = "/usr/sbin/nginx"


def nginx_grpc_config(
    backends: Sequence[str],
    port: int,
    workdir: str,
    *,
    affinity_header: str = "x-session-affinity",
    keepalive_requests: int = 1_000_000,
) -> str:
    """An nginx configuration that proxies gRPC on ``127.0.0.1:port`` to ``backends``.

    ``backends`` are ``host:port`` (or ``http://host:port``) gRPC endpoints. The
    upstream hashes on the session's affinity header with consistent hashing, so
    every call of a session reaches the backend that holds it; a call without the
    header is spread round-robin. ``workdir`` holds the pid file, logs and
    temporary files. nginx ends a client connection with a graceful GOAWAY after
    ``keepalive_requests`` calls.
    """
    # weight=20: nginx puts 160 x weight points per server on the hash ring; the
    # default 160 splits the keys unevenly enough to cost throughput.
    servers = "\n".join(
        f"        server {b.removeprefix('http://').rstrip('/')} weight=20 max_fails=0;"
        for b in backends
    )
    variable = "$http_" + affinity_header.replace("-", "_")
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""\
{user}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    upstream salience {{
        hash {variable} consistent;
{servers}
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        http2_max_concurrent_streams 4096;
        # nginx ends an HTTP/2 connection (GOAWAY) after keepalive_requests
        # streams, 1,000 by default: a client making many calls would keep
        # reconnecting.
        keepalive_requests {keepalive_requests};
        keepalive_timeout 600s;
        location / {{
            grpc_pass grpc://salience;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}
}}
"""


def _find_nginx() -> str:
    """:data:`NGINX` if it exists, else ``nginx`` on ``PATH``.

    NGINX is read now, not when this module was imported: a test suite may set it.
    """
    found = NGINX if os.path.exists(NGINX) else shutil.which("nginx")
    if found is None:
        raise FileNotFoundError(
            f"nginx is not installed: not at {NGINX} nor on PATH (apt-get install "
            "nginx-light, or pass nginx= its path)"
        )
    return found


@protected_asynccontextmanager
async def nginx_grpc_proxy(
    backends: Sequence[str],
    *,
    affinity_header: str = "x-session-affinity",
    keepalive_requests: int = 1_000_000,
    nginx: str | None = None,
) -> AsyncIterator[str]:
    """Run nginx in front of ``backends`` for the block; yields its gRPC URL.

    It listens on a free loopback port with :func:`nginx_grpc_config` and is
    stopped on exit. Needs nginx (``apt-get install nginx-light``): ``nginx`` is
    its path, by default :data:`NGINX` as this call finds it, else ``nginx`` on
    ``PATH`` (Homebrew, Nix, conda); neither raises ``FileNotFoundError`` saying so.

    Example::

        async with reference_servers(3) as servers:
            async with nginx_grpc_proxy([s.grpc_url for s in servers]) as url:
                async with ApiClient(servers[0].base_url, grpc_url=url) as client:
                    ...
    """
    if nginx is None:
        nginx = _find_nginx()
    with tempfile.TemporaryDirectory(prefix="poc-nginx-") as workdir:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        conf = Path(workdir) / "nginx.conf"
        conf.write_text(
            nginx_grpc_config(
                backends,
                port,
                workdir,
                affinity_header=affinity_header,
                keepalive_requests=keepalive_requests,
            )
        )
        args = [nginx, "-p", workdir, "-c", str(conf), "-e", f"{workdir}/error.log"]
        # (nginx starting, in a worker thread then in its own process, and its
        # stop below, are work a MockClock cannot see: _clock)
        with hold_clock():
            process = await trio.lowlevel.open_process([*args, "-g", "daemon off;"])
        try:
            with hold_clock(), trio.fail_after(10):
                while True:
                    if process.poll() is not None:
                        log = (Path(workdir) / "error.log").read_text(errors="replace")
                        raise RuntimeError(f"nginx exited with {process.returncode}: {log}")
                    try:
                        stream = await trio.open_tcp_stream("127.0.0.1", port)
                    except OSError:
                        await trio.sleep(0.02)
                        continue
                    await stream.aclose()
                    break
            yield f"http://127.0.0.1:{port}"
        finally:
            with trio.CancelScope(shield=True), hold_clock():
                process.terminate()
                with trio.move_on_after(5) as scope:
                    await process.wait()
                if scope.cancelled_caught:
                    process.kill()
                    await process.wait()


@protected_asynccontextmanager
async def open_client(
    server: ReferenceServer, **client_options: Unpack[ApiClientOptions]
) -> AsyncIterator[ApiClient]:
    """An open :class:`~poc_api.ApiClient` connected to ``server``, closed on exit.

    It uses the server's gRPC URL explicitly (so ``POC_GRPC_URL`` in the
    environment cannot redirect it), its api key, if it has one, and
    ``trust_env=False`` (so ``HTTP_PROXY`` cannot send its HTTP calls to a proxy). Keyword
    arguments go to :class:`~poc_api.ApiClient` (``model``, ``timeout``, ...: see
    :class:`ApiClientOptions`) and override these: ``grpc_url=proxy``, with
    ``proxy`` the URL an :func:`nginx_grpc_proxy` yields, goes through that proxy.
    """
    options: ApiClientOptions = {
        "api_key": server.config.api_key or "",
        "grpc_url": server.grpc_url,
        # The server is this process's, on loopback: not through the proxy of
        # HTTP_PROXY & co. (there, its HTTP calls failed).
        "trust_env": False,
    }
    options.update(client_options)
    async with ApiClient(server.base_url, **options) as client:
        yield client


def make_png(width: SupportsIndex = 56, height: SupportsIndex = 56, seed: int = 0) -> bytes:
    """A valid RGB PNG image of the given size (deterministic in ``seed``).

    The reference server gives an image one position per 28x28 patch: a 56x56
    image takes 4.
    """
    return encode_png(width, height, seed=seed)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only a test extra
    _HAVE_PYTEST = False
else:
    _HAVE_PYTEST = True

if _HAVE_PYTEST:

    @pytest.fixture(scope="session")
    def poc_server_config() -> ServerConfig:
        """The configuration of ``poc_server``; override this fixture to change it."""
        return ServerConfig()

    @pytest.fixture(scope="session")
    def poc_server(poc_server_config: ServerConfig) -> Iterator[ReferenceServer]:
        """A reference server shared by the whole test session (on its own thread)."""
        server = ReferenceServer(poc_server_config)
        server.start()
        try:
            yield server
        finally:
            server.stop()

    @pytest.fixture
    async def poc_client(poc_server: ReferenceServer) -> AsyncIterator[ApiClient]:
        """An open client connected to ``poc_server``; closed after the test."""
        async with open_client(poc_server) as client:
            yield client

    @pytest.fixture
    def poc_png() -> bytes:
        """A 56x56 PNG image (4 placeholder positions on the reference server)."""
        return make_png(56, 56)
