"""ReferenceServer: both listeners on one asyncio loop in a daemon thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import sys
import threading
import time
from types import TracebackType
from typing import Final, final

import sniffio

from ._grpc import ObservedServer, close_listener
from ._http import HttpApp
from ._state import Runtime, ServerConfig, ServerState

__all__ = ["ReferenceServer", "run_forever"]

_START_TIMEOUT: Final = 30.0


class _HideAuthorization(logging.Filter):
    """On hpack's loggers: drop the DEBUG lines that show a request's authorization.

    hpack logs each header block it decodes, and each header, at DEBUG: with a
    reference server in the process and DEBUG logging on, the application's log
    would show every client's ``authorization: Bearer <key>``. Installed while a
    reference server runs (``_hiding``).
    """

    def __init__(self, keys: list[str]) -> None:
        super().__init__()
        self.keys = keys

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        lowered = message.lower()
        if "authorization" in lowered or "bearer" in lowered:
            return False
        return not any(key and key in message for key in self.keys)


# hpack.hpack logs the header blocks and headers it decodes; hpack.table the
# entries it evicts (a client may index its authorization header).
_HPACK_LOGGERS: Final = (logging.getLogger("hpack.hpack"), logging.getLogger("hpack.table"))
_hiding_lock = threading.Lock()
_hiding: list[str] = []  # one entry per running server: its api key ("" for none)
_hide = _HideAuthorization(_hiding)


def _hide_authorization(key: str, on: bool) -> None:
    """Count a server in (``on``) or out of hpack's filter."""
    with _hiding_lock:
        if on:
            if not _hiding:
                for logger in _HPACK_LOGGERS:
                    logger.addFilter(_hide)
            _hiding.append(key)
        else:
            _hiding.remove(key)
            if not _hiding:
                for logger in _HPACK_LOGGERS:
                    logger.removeFilter(_hide)


_STOP_TIMEOUT: Final = 10.0
_PORT_PAIR_ATTEMPTS: Final = 64


def _listen(host: str, port: int) -> socket.socket:
    # "" is every interface (as _url_host reads it): getaddrinfo wants None for that.
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _listen_on(host: str, port: int, what: str) -> socket.socket:
    """:func:`_listen`, whose error names the port (the gRPC one is never given)."""
    try:
        return _listen(host, port)
    except OSError as e:
        where = f"{host or '*'}:{port} ({what})"
        raise OSError(e.errno, f"cannot listen on {where}: {e.strerror}") from e


def bind_port_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """Listening sockets on ``port`` and ``port + 1`` (proto/PROTOCOL.md §1).

    An ``OSError``'s message says where and which port (the front ends print it
    as it is).

    With ``port = 0`` the kernel picks the HTTP port and the next one is tried for
    gRPC; on a clash both are released and another pair is tried.
    """
    if port:
        http = _listen_on(host, port, "HTTP")
        try:
            return http, _listen_on(host, port + 1, "gRPC, the HTTP port + 1")
        except BaseException:
            http.close()
            raise
    for _ in range(_PORT_PAIR_ATTEMPTS):
        http = _listen_on(host, 0, "HTTP")
        p = http.getsockname()[1]
        if p < 65535:
            try:
                return http, _listen_on(host, p + 1, "gRPC, the HTTP port + 1")
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    http.close()
                    raise
        http.close()
    raise OSError(errno.EADDRINUSE, f"no free pair of adjacent ports on {host or '*'}")


def every_interface(host: str) -> bool:
    """Whether a server listening on ``host`` listens on every interface
    ("", 0.0.0.0, ::, and their other spellings: ::0, 0000::...)."""
    if host == "":
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a name
        return False


def _url_host(host: str) -> str:
    """The host for this machine's URLs of a server listening on ``host``."""
    if every_interface(host):
        return "[::1]" if ":" in host else "127.0.0.1"
    return f"[{host}]" if ":" in host else host


@final
class ReferenceServer:
    """A deterministic salience server (gRPC on ``p + 1``, HTTP on ``p``) for tests and demos.

    It runs its own asyncio loop in a daemon thread, so it can be used from trio,
    from asyncio, or from plain synchronous code::

        async with ReferenceServer(ServerConfig(seed=1)) as srv:   # trio or asyncio
            client = poc_api.ApiClient(srv.base_url)

        srv = ReferenceServer(ServerConfig())                      # synchronous
        srv.start()
        ...
        srv.stop()

    ``__aenter__`` runs :meth:`start` in a worker thread, so it does not block the
    caller's event loop; ``__aexit__`` likewise runs :meth:`stop`.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        if config is not None and not isinstance(config, ServerConfig):
            # (A dict from an overridden poc_server_config fixture failed deep in
            # the server's thread, as an AttributeError.)
            raise TypeError(
                f"config must be a ServerConfig, not {type(config).__name__} "
                "(ServerConfig(**fields) makes one)"
            )
        self.config: ServerConfig = config if config is not None else ServerConfig()
        """The configuration the server runs with."""
        self._rt: Runtime | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._ports: tuple[int, int] | None = None
        self._stopped = False
        self._grpc_server: ObservedServer | None = None
        self._grace = 0.0

    def __repr__(self) -> str:
        # Its state, and its URLs once it listens; never the api key.
        thread = self._thread
        if thread is None:
            return "<ReferenceServer not started>"
        if not self._ready.is_set():
            return "<ReferenceServer starting>"
        if self._error is not None:
            return f"<ReferenceServer failed to start: {type(self._error).__name__}>"
        urls = f"base_url={self.base_url!r} grpc_url={self.grpc_url!r}"
        if not thread.is_alive():
            return f"<ReferenceServer stopped {urls}>"
        return f"<ReferenceServer {'stopping' if self._stopped else 'running'} {urls}>"

    # -- addresses ---------------------------------------------------------

    @property
    def http_port(self) -> int:
        """The HTTP port (raises if the server has not started)."""
        return self._require_ports()[0]

    @property
    def grpc_port(self) -> int:
        """The gRPC port: always ``http_port + 1``."""
        return self._require_ports()[1]

    @property
    def base_url(self) -> str:
        """OpenAI-style HTTP root, e.g. ``http://127.0.0.1:8000/v1``."""
        return f"http://{_url_host(self.config.host)}:{self.http_port}/v1"

    @property
    def grpc_url(self) -> str:
        """gRPC endpoint, e.g. ``http://127.0.0.1:8001``."""
        return f"http://{_url_host(self.config.host)}:{self.grpc_port}"

    def _require_ports(self) -> tuple[int, int]:
        if self._ports is None:
            raise RuntimeError("ReferenceServer is not running")
        return self._ports

    def state(self) -> ServerState:
        """A thread-safe snapshot of sessions, connections, resets and counters."""
        if self._rt is None:
            raise RuntimeError("ReferenceServer has not been started")
        return self._rt.state()

    def set_serving(self, serving: bool) -> None:
        """Answer ``SERVING`` / ``NOT_SERVING`` on ``grpc.health.v1.Health`` (thread-safe).

        Load balancers and poc_api's client-side pool stop placing new sessions
        on a server that is not serving; its open sessions carry on.
        """
        if not isinstance(serving, bool):
            raise TypeError("serving must be a bool")
        rt, loop = self._rt, self._loop
        if rt is None or loop is None or self._stopped:
            raise RuntimeError("ReferenceServer is not running")
        applied = threading.Event()

        def apply() -> None:
            rt.health.set(serving)
            applied.set()

        try:
            loop.call_soon_threadsafe(apply)
        except RuntimeError:  # its loop is closed: it failed to start, or has stopped
            raise RuntimeError("ReferenceServer is not running") from None
        applied.wait(_STOP_TIMEOUT)

    def drain(self, grace: float = 10.0) -> None:
        """Graceful shutdown: stop taking new sessions, let open ones finish, then stop.

        Reports ``NOT_SERVING`` at once, waits up to ``grace`` seconds for the
        sessions it holds to be closed by their clients, then calls :meth:`stop`.

        It blocks the calling thread for that wait: from a trio program whose
        clients hold those sessions, run it in a thread
        (``await trio.to_thread.run_sync(server.drain)``), else those clients
        cannot close them, and the drain always waits out ``grace`` and cuts them.
        """
        # (A server that failed to start has nothing to drain: stop() is a no-op.)
        if self._rt is not None and not self._stopped and self._error is None:
            self.set_serving(False)
            deadline = time.monotonic() + grace
            while self._rt.store.ids() and time.monotonic() < deadline:
                time.sleep(0.01)
        self.stop()

    def kill(self) -> None:
        """Die like a crashed process: every gRPC connection drops at once, then stop.

        Clients see their connections reset (as after ``kill -9``) instead of the
        graceful end :meth:`stop` gives. For failover tests.
        """
        loop, grpc_server = self._loop, self._grpc_server
        if loop is not None and grpc_server is not None and not self._stopped:
            with contextlib.suppress(RuntimeError):  # loop already closed
                aborted = asyncio.run_coroutine_threadsafe(grpc_server.abort(), loop)
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    aborted.result(_STOP_TIMEOUT)
        self.stop()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the server thread and block until both ports listen.

        Raises the startup error (e.g. a port in use) if the server cannot start.
        A server can be started once.
        """
        if self._thread is not None:
            raise RuntimeError("ReferenceServer can only be started once")
        self._rt = Runtime(self.config)
        self._thread = threading.Thread(
            target=self._thread_main, name="poc_api-reference-server", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT):
            raise RuntimeError("ReferenceServer did not start in time")
        if self._error is not None:
            self._thread.join(_STOP_TIMEOUT)
            raise self._error

    def stop(self, grace: float = 0.0) -> None:
        """Stop serving and join the thread. Idempotent.

        Every gRPC connection gets a GOAWAY; calls still running get up to
        ``grace`` seconds to finish (new calls must go elsewhere), then they are
        cancelled and every connection is closed, so clients notice at once.

        It blocks the calling thread until the server has stopped (up to
        ``grace`` seconds and more): from a trio program with a ``grace``, run it in
        a thread (``await trio.to_thread.run_sync(lambda: server.stop(grace=5))``),
        so that the program's own streams are read meanwhile.
        """
        if self._thread is None:
            return
        if not self._stopped:
            self._stopped = True
            self._grace = grace
            loop, event = self._loop, self._stop_event
            if loop is not None and event is not None:
                with contextlib.suppress(RuntimeError):  # loop already closed
                    loop.call_soon_threadsafe(event.set)
        # A second call (another task's, during the first one's grace) also
        # returns only once the server has stopped.
        self._thread.join(self._grace + _STOP_TIMEOUT)

    async def __aenter__(self) -> ReferenceServer:
        # Run to its end even if cancelled (asyncio lets go of the worker thread,
        # which starts the server regardless), then stopped: a failed __aenter__
        # gets no __aexit__, and the server would serve on. (Not one started before
        # this block: refused as start() refuses it, and left to whoever started it.)
        if self._thread is not None:
            raise RuntimeError("ReferenceServer can only be started once")
        try:
            await _run_in_thread(self.start, shielded=True)
        except BaseException:
            await _run_in_thread(self.stop, shielded=True)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Shielded: a block left by cancellation (a test's timeout, a failing
        # sibling) must stop its server too, not leave it running.
        await _run_in_thread(self.stop, shielded=True)

    def _thread_main(self) -> None:
        # trio-asyncio installs a global event loop policy; a plain
        # SelectorEventLoop keeps this thread independent of it.
        key = self.config.api_key or ""
        _hide_authorization(key, True)
        try:
            with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                runner.run(self._serve())
        except BaseException as e:
            if not self._ready.is_set():
                self._error = e
        finally:
            _hide_authorization(key, False)
            self._ready.set()

    async def _serve(self) -> None:
        assert self._rt is not None
        rt = self._rt
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        http_sock, grpc_sock = bind_port_pair(self.config.host, self.config.port)
        self._ports = (http_sock.getsockname()[1], grpc_sock.getsockname()[1])
        app = HttpApp(rt)
        http_server = await asyncio.start_server(app.handle, sock=http_sock)
        grpc_server = self._grpc_server = ObservedServer(rt)
        await grpc_server.start(sock=grpc_sock)
        evictor = asyncio.create_task(self._evict_loop(rt))
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            evictor.cancel()
            await close_listener(http_server)
            await grpc_server.shutdown(self._grace)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(grpc_server.wait_closed(), _STOP_TIMEOUT / 2)
            # Open keep-alive connections would keep wait_closed() waiting (3.12+).
            await app.aclose()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(http_server.wait_closed(), _STOP_TIMEOUT / 2)

    @staticmethod
    async def _evict_loop(rt: Runtime) -> None:
        if not rt.config.idle_timeout:
            return  # 0: sessions are never evicted
        interval = min(max(rt.config.idle_timeout / 4, 0.01), 1.0)
        while True:
            await asyncio.sleep(interval)
            rt.store.evict_idle()


async def _run_in_thread(fn: object, *, shielded: bool = False) -> None:
    """``fn()`` in a worker thread; ``shielded``: run to its end even if cancelled."""
    assert callable(fn)
    if sniffio.current_async_library() == "trio":
        import trio

        from .._clock import hold_clock

        # The thread is work an autojumping MockClock cannot see (_clock).
        with trio.CancelScope(shield=shielded), hold_clock():
            if not shielded:
                await trio.to_thread.run_sync(fn)
                return
            # trio delivers a Ctrl-C to the main task at any checkpoint, shielded
            # or not: one landing where the worker thread starts would leave fn
            # (a server's stop) undone. Run it to its end, then let the Ctrl-C go.
            # Once: a Ctrl-C as it returned ran it again (a second start: "can
            # only be started once" instead of the Ctrl-C).
            ki: KeyboardInterrupt | None = None
            started = False

            def once() -> None:
                nonlocal started
                started = True
                fn()

            while not started:
                try:
                    await trio.to_thread.run_sync(once)
                except KeyboardInterrupt as exc:
                    ki = exc
            if ki is not None:
                raise ki
    elif not shielded:
        await asyncio.to_thread(fn)
    else:
        # As often as it is cancelled (a TaskGroup's after an asyncio.timeout's):
        # awaited bare, a second cancellation let go of the thread, which ran on
        # (a start, beside the stop meant to undo it).
        done = asyncio.ensure_future(asyncio.to_thread(fn))
        cancelled: asyncio.CancelledError | None = None
        while not done.done():
            try:
                await asyncio.wait({done})
            except asyncio.CancelledError as exc:
                cancelled = exc  # (the thread runs on regardless: wait for it, then go)
        if cancelled is not None and done.exception() is None:
            raise cancelled
        done.result()


def run_forever(config: ServerConfig) -> None:
    """Run a server until SIGINT/SIGTERM, printing its URLs (used by ``poc-api serve``).

    Prints ``base_url: ...`` and ``grpc_url: ...`` lines on stdout once both ports
    listen, so a parent process can read them.
    """
    server = ReferenceServer(config)
    server.start()
    done = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        done.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        auth = "required" if config.api_key else "off"
        print(f"base_url: {server.base_url}", flush=True)
        print(f"grpc_url: {server.grpc_url}", flush=True)
        # The URLs above are for this machine; say when others can reach it too.
        where = " on every interface" if every_interface(config.host) else ""
        print(
            f"poc_api reference server ready{where} (auth {auth}, readout "
            f"{'on' if config.readout else 'off'}, seed {config.seed})",
            file=sys.stderr,
            flush=True,
        )
        while not done.wait(0.5):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        server.stop()
