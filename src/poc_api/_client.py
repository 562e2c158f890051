"""``ApiClient``: the entry point. One client, one HTTP/2 connection, many agents.

The trio counterpart of the seed's ``ApiClient``. It owns the asyncio bridge
that grpclib runs on, the lazily opened gRPC channel shared by every session,
conversation and call, and an httpx client for the HTTP endpoints.
"""

from __future__ import annotations

import difflib
import enum
import functools
import inspect
import logging
import math
import os
import ssl
import warnings
from collections.abc import (
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager
from functools import partial
from types import TracebackType
from typing import Any, Final, ParamSpec, SupportsFloat, SupportsIndex, TypeVar, final
from urllib.parse import urlsplit

import httpx
import trio

from ._bridge import AsyncioBridge, require_trio
from ._chunks import Chunk
from ._clock import hold_clock
from ._conversation import Conversation
from ._detok import TextDecoder
from ._errors import NeedsAsyncWith, check_run, checked_on_entry
from ._http import (
    ChatCompletion,
    ChatStream,
    HttpApi,
    TokenizerInfo,
    _unencodable,
    shown_url,
    url_password,
)
from ._pool import (
    DEFAULT_AFFINITY_HEADER,
    DnsTarget,
    EndpointStatus,
    Router,
    check_affinity_header,
    parse_grpc_targets,
)
from ._score import score_chunks, score_continuations, score_many
from ._session import Session, close_live_sessions, open_session
from ._transport import (
    GrpcTarget,
    GrpcTransport,
    KeepAlive,
    StreamBudget,
    cached_ssl_context,
    deadline,
    default_ssl_context,
    grpc_ssl_context,
    host_name_problem,
    made_context,
)
from ._types import (
    Ranges,
    ReadoutManifest,
    ScoreResult,
    TrainResult,
    TrainSample,
    as_float,
    as_int,
    keyword_only_from,
)

__all__ = ["ApiClient", "resolve_grpc_url"]

log = logging.getLogger("poc_api")

# How often the run's-end watch looks whether the client's owner task has ended.
_OWNER_POLL = 0.005


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _known_keywords_only(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Refuse a keyword ``fn`` does not take with a ``TypeError`` that suggests the
    nearest one and points to ``extra_body``.

    For ``chat``/``chat_stream``, whose options are spelled out so that a type
    checker and ``help()`` see them: Python's own error would not say where a
    field they do not name goes. (An unknown keyword used to be sent as it was,
    so ``max_new_tokens=2`` was silently ignored by the server.)
    """
    params = inspect.signature(fn).parameters
    known = [name for name, p in params.items() if p.kind is p.KEYWORD_ONLY]

    def check(kwargs: dict[str, Any]) -> None:
        unknown = [key for key in kwargs if key not in params]
        if not unknown:
            return
        if "stream" in unknown:  # OpenAI's stream=True: a call of its own here
            raise TypeError(f"{fn.__qualname__}() takes no 'stream'; use chat_stream() to stream")
        named = []
        for key in unknown:
            near = difflib.get_close_matches(key, known, n=1)
            named.append(f"{key!r} (did you mean {near[0]!r}?)" if near else repr(key))
        plural = "s" if len(unknown) > 1 else ""
        raise TypeError(
            f"{fn.__qualname__}() got an unexpected keyword argument{plural} "
            f"{', '.join(named)}; pass extra_body={{{unknown[0]!r}: ...}} to send a field "
            "as it is"
        )

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def checked_async(*args: _P.args, **kwargs: _P.kwargs) -> Any:
            check(kwargs)
            return await fn(*args, **kwargs)

        return checked_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        check(kwargs)
        return fn(*args, **kwargs)

    return checked


#: Words of the errors about a derived gRPC URL, which the CLI says in its options.
PORT_PLUS_ONE: Final = "base_url's port + 1: "
PASS_GRPC_URL: Final = "pass grpc_url"


def resolve_grpc_url(
    base_url: str, grpc_url: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """The gRPC endpoint for a client (proto/PROTOCOL.md §1).

    In order: ``grpc_url``; the ``POC_GRPC_URL`` environment variable; else the
    base URL's host with port + 1 (80/443 without a port → 81/444), TLS when
    the scheme is https, path dropped.

    >>> resolve_grpc_url("http://127.0.0.1:8000/v1")
    'http://127.0.0.1:8001'
    """
    return _resolve_grpc_url(base_url, grpc_url, env)[0]


#: The origin of a gRPC URL read from the environment (see _resolve_grpc_url).
_FROM_ENV: Final = "from POC_GRPC_URL"


def _resolve_grpc_url(
    base_url: str, grpc_url: str | None, env: Mapping[str, str] | None
) -> tuple[str, str]:
    """:func:`resolve_grpc_url`, and where the URL came from unless it is
    ``grpc_url`` (for the errors a wrong URL explains; "" for ``grpc_url``)."""
    if grpc_url:
        return grpc_url, ""
    env = os.environ if env is None else env
    if env.get("POC_GRPC_URL"):
        return env["POC_GRPC_URL"], _FROM_ENV
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"base_url must look like http://host:port/v1, got {shown_url(base_url)!r}"
        )
    port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    if port >= 65535:
        raise ValueError(
            f"base_url {shown_url(base_url)!r} is on port {port}: there is no port + 1 "
            f"for gRPC; {PASS_GRPC_URL}"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    origin = f"{PORT_PLUS_ONE}{PASS_GRPC_URL} if the gRPC server is elsewhere"
    return f"{parts.scheme}://{host}:{port + 1}", origin


def check_base_url(base_url: str) -> None:
    """A ``ValueError`` now for a base URL the HTTP calls could not use.

    Every HTTP call appends its path to it: a query or fragment would send the
    calls to the wrong path, and an unparseable URL (a trailing newline from a
    .env file) would fail every call with httpx's own error.
    """
    shown = shown_url(base_url)
    password = url_password(base_url)
    hint = (
        ": percent-encode any '/', '?', '#' or '@' in its user:password"
        if any(c in password for c in "/?#@")
        else ""
    )
    try:
        url = httpx.URL(base_url)
        host = url.host  # decoded: the idna package's IDNAError for a bad "xn--" label
    except UnicodeError as exc:
        raise ValueError(f"base_url {shown!r} has an invalid host name: {exc}") from None
    except httpx.InvalidURL as exc:
        if hint:  # (the fault; and httpx's reason may quote it: "Invalid port: 's3'")
            raise ValueError(f"base_url {shown!r} is not a valid URL{hint}") from None
        reason = str(exc).replace(password, "***") if password else str(exc)
        raise ValueError(f"base_url {shown!r} is not a valid URL: {reason}") from None
    if base_url != base_url.strip():
        # A trailing space is a valid URL to httpx: every call went to "/v1%20/...".
        raise ValueError(
            f"base_url {shown!r} has leading or trailing whitespace (from a .env file?)"
        )
    if hint or b"@" in url.raw_path:
        # A valid URL to httpx: the password's start was taken for a port, the rest
        # for a path. (No server's API root has a raw "@" in its path.)
        raise ValueError(f"base_url {shown!r} has a raw '@' after its host{hint}")
    if url.scheme not in ("http", "https") or not host:
        raise ValueError(f"base_url must look like http://host:port/v1, got {shown!r}")
    if url.port == 0:
        # httpx takes port 0 for the scheme's default (80): the calls went there.
        raise ValueError(f"base_url {shown!r} is on port 0, which no server listens on")
    problem = host_name_problem(url.raw_host.decode("ascii"))
    if problem is not None:
        raise ValueError(f"base_url {shown!r} cannot be connected to: {problem}")
    if url.query or url.fragment or "?" in base_url or "#" in base_url:
        raise ValueError(
            f"base_url must have no query or fragment (each call appends its path "
            f"to it), got {shown!r}"
        )


def check_api_key(api_key: str) -> None:
    """A ``ValueError`` now for a key no header can carry (the CLI's check too)."""
    if api_key and (
        not api_key.isascii() or not api_key.isprintable() or api_key != api_key.strip()
    ):
        # It goes in a header (HTTP and gRPC metadata): refused there, the
        # transport's own error would quote it. The key itself is not shown.
        raise ValueError(
            "api_key must be printable ASCII with no leading or trailing space "
            "(a stray newline or space from a .env file?)"
        )


def check_model(model: str) -> None:
    """A ``ValueError`` now for a model name no request can carry (a lone
    surrogate: protobuf and JSON bodies are UTF-8), as the chat calls refuse it."""
    try:
        model.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"model: {_unencodable(exc)}") from None


def _seconds(name: str, value: object) -> float:
    """A positive, finite number of seconds as a plain float (a numpy float32
    would break trio's I/O wait as a deadline); ``TypeError`` unless a number
    :func:`as_float` takes (bools refused), ``ValueError`` otherwise."""
    try:
        seconds = as_float(name, value, "a number of seconds")
    except OverflowError:  # an int past float's range: too large, as inf is
        seconds = math.inf
    if not seconds > 0 or seconds == math.inf:
        raise ValueError(f"{name} must be a positive, finite number of seconds")
    return seconds


def _count(name: str, value: object) -> int:
    """A positive count as a plain int: ``TypeError`` unless an int (numpy's too;
    bools refused), ``ValueError`` below 1."""
    count = as_int(name, value)
    if count < 1:
        raise ValueError(f"{name} must be positive")
    return count


def _first_target(pool: tuple[GrpcTarget, ...] | DnsTarget | None) -> GrpcTarget | None:
    if pool is None:
        return None
    if isinstance(pool, DnsTarget):
        return GrpcTarget(pool.host, pool.port, False)
    return pool[0]


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPENING = "opening"  # (its entry waits: another task's entry is refused)
    OPENED = "opened"
    CLOSED = "closed"


class _Unraisable:
    """Raises its exception from ``__del__``: Python hands it to ``sys.unraisablehook``.

    For an error that cannot be raised where it happens (a ``ResourceWarning`` made
    an error by ``-W error``, in a task the run's end cancels): Python prints it
    ("Exception ignored in: ..."), and pytest fails the test that was running
    (``PytestUnraisableExceptionWarning``), as for a ``ResourceWarning`` of
    Python's own. (The hook's argument type is not importable before 3.13.)
    """

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __del__(self) -> None:
        raise self.exc from None


@final
class ApiClient:
    """A client for a salience server. Use it as an async context manager.

    Args:
        base_url: the OpenAI-style HTTP root, e.g. ``http://127.0.0.1:8000/v1``
            (no query or fragment: each call appends its path; ``ValueError``).
        api_key: sent as ``authorization: Bearer <key>`` on every call when set.
        model: the model name sent with ``OpenSession`` and HTTP calls.
        grpc_url: the gRPC endpoint; default ``POC_GRPC_URL`` or derived from
            ``base_url`` (see :func:`resolve_grpc_url`). A list of URLs, or a
            ``dns:///host:port`` target, makes a pool of endpoints (below).
        connect_timeout: seconds to connect (HTTP); for gRPC, to connect (TCP and
            TLS) and hear the server speak HTTP/2 (its SETTINGS), all together.
        timeout: seconds each HTTP call's request may take as a whole: sending
            it, the response headers and the whole body (:class:`PocApiTimeout`),
            however slowly the server trickles its answer. For :meth:`chat_stream`
            it bounds the time until the response headers have arrived (a long
            stream is not cut), and then each wait for the stream's next bytes
            (httpx's read timeout). A call's own ``timeout=`` bounds it as well.
            Not used by the gRPC calls.
        close_timeout: bound on each shielded ``CloseSession`` at a session's exit.
        max_buffered_events: events buffered per stream before the client stops
            reading and HTTP/2 flow control pushes back on the server. This bound
            slows the server down instead of raising: no event is ever dropped.
        max_buffered_bytes: the same bound in bytes (of the events as received),
            for events that carry big readouts; past it one more event is still
            taken, however big. A stream nobody reads holds at most two such
            buffers (the batch being read and the next) plus its 1 MiB window.
        max_message_size: largest gRPC message sent or accepted, in bytes; a
            larger one raises :class:`LimitExceeded` before it is read. The same
            bound applies to an HTTP answer's body (a chat stream's events are
            bounded one by one instead).
        keepalive_time: ping the gRPC server every this many seconds while calls
            are open (``None``: never). A server that does not answer within
            ``keepalive_timeout`` seconds is treated as gone: every open call
            fails with :class:`ServerUnavailable` instead of hanging. The default,
            5 minutes, is the most frequent pinging during calls that gRPC's
            C-core and Go servers accept by default (more often earns a GOAWAY
            "too_many_pings", after which poc_api doubles it for that server, up
            to 2 h, as gRPC's clients do, with a warning; not for one on a
            connection poc_api never pinged); lower it for servers that allow it.
        keepalive_timeout: seconds to wait for a ping's answer (default 20).
        keepalive_idle: also ping while no call runs but sessions are open (an
            agent between turns), so a frozen server is found before the next
            turn. Off: ping only while calls run. gRPC's C-core and Go servers
            allow such pings only every 2 hours unless configured to permit
            them: a "too_many_pings" GOAWAY that comes while no call runs turns
            this off for that server (with a warning), not the rate.
        max_concurrent_streams: calls (unary or streaming) in flight at once on
            this client, those waiting for one of the server's own streams
            included (over all endpoints of a pool); one more raises
            :class:`LimitExceeded` at once. A guard
            against runaway fan-out; bound concurrency yourself (e.g. with a
            ``trio.CapacityLimiter``, as ``score_many`` does) to wait instead.
        max_http_connections: HTTP calls (chat, chat streams until their block
            ends, manifest, train, tokenizer) in flight at once on this client,
            each on a connection of its own; one more raises
            :class:`LimitExceeded` at once, as ``max_concurrent_streams`` does
            on the gRPC side (waiting unseen for a connection to come free, it
            could wait for streams that wait on it).
        affinity_header: the gRPC metadata key that carries each session's random
            affinity key, on ``OpenSession`` and every later call of the session
            (``CloseSession`` included). An L7 proxy that hashes on it (nginx
            ``hash $http_x_session_affinity consistent``) keeps each session on the
            backend that holds it. ``None`` sends no key. A name gRPC or HTTP/2
            keeps for itself (``grpc-*``, ``*-bin``, ``te``, ``authorization``,
            ...) is a ``ValueError``.
        health_check_interval: with several endpoints (or a ``dns:///``
            target), seconds between ``grpc.health.v1`` checks of each (run on
            the client's asyncio thread).
        dns_refresh: seconds between re-resolutions of a ``dns:///`` target.
        ssl_context_factory: for ``https`` URLs, a function returning a new
            :class:`ssl.SSLContext` (which CAs to trust, a client certificate),
            e.g. ``lambda: ssl.create_default_context(cafile="corp-ca.pem")``.
            It is called twice when the client is made: the HTTP calls get one
            context and the gRPC connections another (each side sets the ALPN
            protocols of its own). Default: httpx's, for both sides alike:
            certifi's CAs, or those of ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``
            when set; loaded once per process (in a worker thread, not
            stalling the trio run) and shared by the clients that use it.
        trust_env: the HTTP calls honour the proxy variables (``HTTP_PROXY``,
            ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) as httpx does. ``False``
            reaches the server directly whatever they say, as
            :func:`poc_api.testing.open_client` and the CLI do for a reference
            server the program runs itself. (The gRPC side always connects
            directly.)

    Many servers: ``grpc_url`` may list several endpoints, or be a
    ``dns:///host:port`` target whose A/AAAA records are the endpoints. Each
    endpoint gets its own HTTP/2 connection, opened on first use; a new session,
    conversation or scoring call goes to the less loaded of two random healthy
    endpoints, and a session's calls stay on its endpoint. See
    :attr:`endpoints`.

    The gRPC channel opens on first use and is shared by everything made from
    this client: one HTTP/2 connection, however many tasks use it at once.

    Example::

        async with poc_api.ApiClient("http://127.0.0.1:8000/v1") as client:
            async with client.session() as s:
                await s.prefill([1, 2, 3])
                async with s.generate([4], sampling=poc_api.SamplingParams(max_tokens=8)) as ev:
                    async for e in ev:
                        print(e)
    """

    @keyword_only_from(2, ("model", "grpc_url"))
    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        *,
        model: str = "",
        grpc_url: str | Sequence[str] | None = None,
        connect_timeout: SupportsFloat = 30.0,
        timeout: SupportsFloat = 600.0,
        close_timeout: SupportsFloat = 5.0,
        max_buffered_events: SupportsIndex = 4096,
        max_buffered_bytes: SupportsIndex = 4 * 1024 * 1024,
        max_message_size: SupportsIndex = 64 * 1024 * 1024,
        keepalive_time: SupportsFloat | None = 300.0,
        keepalive_timeout: SupportsFloat = 20.0,
        keepalive_idle: bool = True,
        max_concurrent_streams: SupportsIndex = 1024,
        max_http_connections: SupportsIndex = 256,
        affinity_header: str | None = DEFAULT_AFFINITY_HEADER,
        health_check_interval: SupportsFloat = 5.0,
        dns_refresh: SupportsFloat = 30.0,
        ssl_context_factory: Callable[[], ssl.SSLContext] | None = None,
        trust_env: bool = True,
    ) -> None:
        if not isinstance(base_url, str):
            raise TypeError("base_url must be a str")
        check_base_url(base_url)
        if not isinstance(api_key, str) or not isinstance(model, str):
            raise TypeError("api_key and model must be str")
        pool = parse_grpc_targets(grpc_url)  # checks a list or dns:/// target
        self._affinity_header = check_affinity_header(affinity_header)
        # Numbers as the rest of the API takes them (numpy's, a Fraction), stored plain.
        self._health_interval = _seconds("health_check_interval", health_check_interval)
        self._dns_refresh = _seconds("dns_refresh", dns_refresh)
        self._pool = pool
        if not isinstance(keepalive_idle, bool):
            raise TypeError("keepalive_idle must be a bool")
        if not isinstance(trust_env, bool):
            raise TypeError("trust_env must be a bool")
        self._trust_env = trust_env
        if ssl_context_factory is not None and not callable(ssl_context_factory):
            raise TypeError(
                "ssl_context_factory must be a function that returns an ssl.SSLContext "
                "(it is called once for the HTTP calls and once for the gRPC connections)"
            )
        self._grpc_ssl: ssl.SSLContext | None = None
        self._http_ssl: ssl.SSLContext | None = None
        if ssl_context_factory is not None:
            # Made here, not as the client opens: the factory is the caller's code,
            # and the opening is shielded from Ctrl-C. Two contexts: httpcore sets
            # ALPN "http/1.1" on its context at each connect, which would make a
            # shared one offer gRPC servers no "h2".
            self._grpc_ssl = grpc_ssl_context(ssl_context_factory)
            self._http_ssl = made_context(ssl_context_factory)
            if self._http_ssl is self._grpc_ssl:
                raise TypeError(
                    "ssl_context_factory must return a new ssl.SSLContext at each call, "
                    "got the same one twice"
                )
        check_api_key(api_key)
        check_model(model)
        self._connect_timeout = _seconds("connect_timeout", connect_timeout)
        self._timeout = _seconds("timeout", timeout)
        self._close_timeout = _seconds("close_timeout", close_timeout)
        ping_timeout = _seconds("keepalive_timeout", keepalive_timeout)
        self._keepalive = (
            KeepAlive(_seconds("keepalive_time", keepalive_time), ping_timeout, keepalive_idle)
            if keepalive_time is not None
            else None
        )
        self._max_buffered = _count("max_buffered_events", max_buffered_events)
        self._max_buffered_bytes = _count("max_buffered_bytes", max_buffered_bytes)
        self._max_message_size = _count("max_message_size", max_message_size)
        streams = _count("max_concurrent_streams", max_concurrent_streams)
        self._max_http = _count("max_http_connections", max_http_connections)
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._model = model
        first = _first_target(pool)
        if first is not None:
            self._target = first
        else:
            url, origin = _resolve_grpc_url(
                self._base_url, grpc_url if isinstance(grpc_url, str) else None, None
            )
            try:
                self._target = GrpcTarget.from_url(url, origin)
            except ValueError as exc:
                if origin != _FROM_ENV:
                    raise
                # The caller passed no gRPC URL: "gRPC URL must look like ..." named
                # none they had given.
                raise ValueError(
                    f"POC_GRPC_URL (read from the environment: grpc_url was not passed): {exc}"
                ) from None
        # One bound for the client: every endpoint of a pool counts against it.
        self._streams = StreamBudget(streams)
        self._state = _State.UNOPENED
        self._bridge: AsyncioBridge | None = None
        self._transport: GrpcTransport | None = None  # the first endpoint's
        self._router: Router | None = None
        self._http: HttpApi | None = None
        self._closed: trio.Event | None = None
        self._watch: trio.CancelScope | None = None  # _close_at_run_end's
        self._owner: trio.lowlevel.Task | None = None  # the task that entered
        self._opening_run: trio.lowlevel.TrioToken | None = None  # while OPENING

    def __repr__(self) -> str:
        # Never the api key.
        return (
            f"<ApiClient base_url={shown_url(self._base_url)!r} grpc_url={self._target.url!r} "
            f"model={self._model!r} {self._state.value}>"
        )

    @property
    def base_url(self) -> str:
        """The HTTP root, without a trailing slash: as given, so with the password
        of a ``user:password@`` URL (the repr, logs and error messages show
        ``user:***@``)."""
        return self._base_url

    @property
    def grpc_url(self) -> str:
        """The gRPC endpoint in use (a pool's first; see :attr:`endpoints` for all)."""
        return self._target.url

    @property
    def model(self) -> str:
        """The model name sent with every call that passes no ``model=`` of its own
        ("" = the server's default)."""
        return self._model

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> ApiClient:
        require_trio("poc_api.ApiClient")
        if self._state is _State.OPENED:
            raise RuntimeError("the client is already open")
        if self._state is _State.OPENING:
            raise RuntimeError("the client is being opened by another task")
        if self._state is _State.CLOSED:
            raise RuntimeError("a closed ApiClient cannot be reopened; create a new one")
        # Marked before the entry's first wait: another task's entry then is refused,
        # and an aclose() meanwhile (it sets CLOSED) is seen below.
        self._state = _State.OPENING
        self._opening_run = trio.lowlevel.current_trio_token()  # (aclose checks it)
        try:
            await self._open()
        except BaseException:
            if self._state is _State.OPENING:
                self._state = _State.UNOPENED  # (it may be entered again)
            raise
        finally:
            self._opening_run = None
        return self

    async def _open(self) -> None:
        """The entry's work (KI-protected as ``__aenter__``): ends OPENED, or raises."""
        # A checkpoint, as trio's own resources are, before anything starts.
        await trio.lowlevel.checkpoint()
        metadata: tuple[tuple[str, str], ...] = ()
        auth: httpx.Auth | None = None
        if self._api_key:
            metadata = (("authorization", _Secret(f"Bearer {self._api_key}")),)
            # An auth of the client's own: httpx would otherwise turn a base_url's
            # user:password@ into Basic auth that replaces the Bearer header.
            auth = _BearerAuth(self._api_key)
        verify = self._http_ssl or cached_ssl_context("http")
        if verify is None:
            # Made in a thread (once per process): loading the CAs blocked the run.
            # A limiter of its own: trio's default one may be taken by the program's
            # own blocked threads (40 of them), and the entry would wait for them.
            with hold_clock():  # (a wait a MockClock cannot see)
                verify = await trio.to_thread.run_sync(
                    default_ssl_context, "http", limiter=trio.CapacityLimiter(1)
                )
        if self._state is not _State.OPENING:  # aclose() from another task meanwhile
            raise trio.ClosedResourceError("the ApiClient was closed while it was being opened")
        # Before the loop thread: httpx reads the proxy variables here and may
        # refuse them (ALL_PROXY=socks5://... without socksio installed).
        try:
            http = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout, connect=self._connect_timeout),
                auth=auth,
                verify=verify,
                trust_env=self._trust_env,
                # Never more calls than connections (HttpApi counts them): none waits
                # in httpx's pool. (httpx's own default: 100, and a silent wait.)
                limits=httpx.Limits(
                    max_connections=self._max_http,
                    max_keepalive_connections=min(20, self._max_http),
                ),
            )
        except ImportError as exc:  # a SOCKS proxy, without socksio installed
            raise ValueError(
                f"a proxy environment variable (ALL_PROXY, HTTPS_PROXY, ...) asks for "
                f"what httpx cannot do here: {exc}"
            ) from exc
        bridge = AsyncioBridge.start(cancel_timeout=self._close_timeout)
        try:
            self._transport = self._new_transport(bridge, self._target, metadata)
            self._router = self._new_router(bridge, self._transport, metadata)
        except BaseException:
            self._transport = self._router = None
            with trio.CancelScope(shield=True):
                await bridge.aclose()
                await http.aclose()
            raise
        self._bridge = bridge
        self._http = HttpApi(
            http,
            self._base_url,
            self._api_key,
            self._model,
            max_body=self._max_message_size,
            timeout=self._timeout,
            max_calls=self._max_http,
        )
        self._state = _State.OPENED
        # Made here, not in the task: a close before the task first runs cancels it.
        self._watch = trio.CancelScope()
        self._owner = trio.lowlevel.current_task()
        trio.lowlevel.spawn_system_task(self._close_at_run_end, name="poc_api: client watch")

    async def _close_at_run_end(self) -> None:
        """A system task: a client still open when its trio.run ends is closed then.

        trio cancels its system tasks once the main task has returned: a client
        entered and never closed (a slip) would otherwise leave its loop thread,
        its connection and its sessions behind, for every such run. :meth:`aclose`
        ends this task.
        """
        assert self._watch is not None
        with self._watch:
            try:
                await trio.sleep_forever()
            finally:
                if self._state is _State.OPENED:
                    await self._owner_exits()
                if self._state is _State.OPENED:
                    msg = f"{self!r} was not closed before its trio.run ended; closing it now"
                    log.warning("%s", msg)
                    try:
                        warnings.warn(msg, ResourceWarning, stacklevel=1)
                    except Warning as exc:
                        # -W error (filterwarnings = error): raised here, it would
                        # crash the run. Reported as "Exception ignored", as Python
                        # does with a ResourceWarning that cannot be raised; pytest
                        # fails the test that leaked the client.
                        _Unraisable(exc)  # dropped at once: reported there
                    with trio.CancelScope(shield=True):
                        await self.aclose()

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @trio.lowlevel.enable_ki_protection
    async def aclose(self) -> None:
        """Close the channel, the HTTP client and the asyncio thread (idempotent).

        A checkpoint. Always closes, even when cancelled (the cleanup is
        shielded). Any task may call it: calls still running in other tasks fail
        with ``trio.ClosedResourceError`` at once (streams reset, HTTP requests
        cut), and the sessions their blocks hold are closed on the server before
        the connection (``CloseSession``, bounded by ``close_timeout``). A
        second call waits until the first has finished.
        """
        closed = self._closed
        if self._bridge is not None and (closed is None or not closed.is_set()):
            # Another trio.run's close would break both; and its wait for this
            # run's close (below) be woken from this run: an internal error in
            # trio, and this run's own close waiting for ever. (A close that has
            # finished leaves nothing of its run: closing again is a no-op.)
            self._bridge.check_run()
        elif self._opening_run is not None:
            # Being opened: from another run, the close went through (the owner's
            # entry failed as closed), or was undone by the entry going on.
            check_run(self._opening_run)
        if self._state is not _State.OPENED:
            self._state = _State.CLOSED
            if self._closed is not None:
                with trio.CancelScope(shield=True):
                    await self._closed.wait()
            await trio.lowlevel.checkpoint()
            return
        if self._bridge is not None:
            self._bridge.check_caller()
        self._state = _State.CLOSED
        if self._watch is not None:
            self._watch.cancel()
        closed = self._closed = trio.Event()
        # The steps run in a task of their own: trio delivers Ctrl-C to the main
        # task at any checkpoint, shielded or not, and there it would cut the close
        # short (the loop thread, the connection left open). Here it waits until
        # everything is closed, then goes on.
        trio.lowlevel.spawn_system_task(self._shut_down, closed, name="poc_api: client close")
        ki: KeyboardInterrupt | None = None
        with trio.CancelScope(shield=True):
            while not closed.is_set():
                try:
                    await closed.wait()
                except KeyboardInterrupt as exc:
                    ki = exc
        if ki is not None:
            raise ki
        await trio.lowlevel.checkpoint()

    async def _owner_exits(self) -> None:
        """At the run's end: wait (bounded) while the task that entered the client
        unwinds, for it may be about to close the client itself (a system task's
        block, cancelled with this one)."""
        owner = self._owner
        self._owner = None
        if owner is None:
            return
        with hold_clock(), trio.CancelScope(shield=True, relative_deadline=self._close_timeout):
            while self._state is _State.OPENED:
                if inspect.getcoroutinestate(owner.coro) == inspect.CORO_CLOSED:
                    return
                await trio.sleep(_OWNER_POLL)

    async def _shut_down(self, closed: trio.Event) -> None:
        """The steps of :meth:`aclose`; each failure is logged and the next step runs."""

        async def step(what: str, fn: Callable[[], Awaitable[None]]) -> None:
            try:
                await fn()
            except Exception as exc:  # the rest still closes
                log.warning("closing %s failed: %s", what, exc)

        # Shielded: the system nursery is cancelled when the run ends (a client
        # of a system task, or of an async generator trio finalizes then), and the
        # steps must still all run; each is bounded by close_timeout.
        try:
            with trio.CancelScope(shield=True):
                router, bridge = self._router, self._bridge
                # Running calls end first (streams reset, as their blocks would on
                # leaving; HTTP sends ended, then their client closed, which the
                # CloseSessions do not need): no agent reads on while the held
                # sessions are closed, which can take close_timeout.
                if bridge is not None:
                    bridge.abort_calls()
                if self._http is not None:
                    await step("the HTTP client", self._http.aclose)
                if router is not None and bridge is not None:
                    await step(
                        "the sessions still open",
                        partial(close_live_sessions, router, bridge, self._close_timeout),
                    )
                if router is not None:
                    await step("the gRPC channels", router.aclose)
                if bridge is not None:
                    await step("the asyncio thread", bridge.aclose)
        finally:
            closed.set()

    def _grpc(self) -> Router:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("the ApiClient is closed")
        if self._state is not _State.OPENED or self._router is None:
            raise RuntimeError(f"use the ApiClient inside `async with` (it is {self._state.value})")
        assert self._bridge is not None
        self._bridge.check_caller()
        return self._router

    def _new_transport(
        self, bridge: AsyncioBridge, target: GrpcTarget, metadata: tuple[tuple[str, str], ...]
    ) -> GrpcTransport:
        return GrpcTransport(
            bridge,
            target,
            metadata=metadata,
            max_message_size=self._max_message_size,
            max_buffered_bytes=self._max_buffered_bytes,
            keepalive=self._keepalive,
            connect_timeout=self._connect_timeout,
            reap_timeout=self._close_timeout,
            ssl_context=self._grpc_ssl,
            streams=self._streams,
            unindexed_headers=frozenset([self._affinity_header] if self._affinity_header else []),
        )

    def _new_router(
        self,
        bridge: AsyncioBridge,
        primary: GrpcTransport,
        metadata: tuple[tuple[str, str], ...],
    ) -> Router:
        """Where sessions go: ``primary`` alone, or a pool (issue 12)."""

        def make(target: GrpcTarget) -> GrpcTransport:
            return self._new_transport(bridge, target, metadata)

        endpoints: list[GrpcTransport] | DnsTarget
        if isinstance(self._pool, DnsTarget):
            endpoints = self._pool
        else:
            endpoints = [primary]
            if self._pool is not None:
                endpoints += [make(t) for t in self._pool[1:]]
        return Router(
            bridge,
            make,
            endpoints,
            affinity_header=self._affinity_header,
            max_message_size=self._max_message_size,
            health_interval=self._health_interval,
            dns_refresh=self._dns_refresh,
            # All of them, the primary too (also with dns:///, where it is unused):
            # the router closes them together.
            owned=[primary, *endpoints[1:]] if isinstance(endpoints, list) else [primary],
        )

    @property
    def endpoints(self) -> tuple[EndpointStatus, ...]:
        """Each gRPC endpoint's state, open sessions, calls in flight and failures.

        One entry per endpoint of the pool (one for a single ``grpc_url``; those a
        ``dns:///`` target resolved to so far, less the retired ones that had no
        session or call left); empty until the client is open.
        """
        return () if self._router is None else self._router.endpoints()

    def _https(self) -> HttpApi:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("the ApiClient is closed")
        if self._state is not _State.OPENED or self._http is None:
            raise RuntimeError(f"use the ApiClient inside `async with` (it is {self._state.value})")
        assert self._bridge is not None
        self._bridge.check_caller()  # httpx's connections belong to this trio.run too
        return self._http

    # -- gRPC --------------------------------------------------------------------

    def _model_for(self, model: str | None) -> str:
        """The model a call names: its own ``model=``, else the client's (the seed's
        ``ApiClient`` clones share one channel and each may set ``model``)."""
        if model is None:
            return self._model
        if not isinstance(model, str):
            raise TypeError(f"model must be a str, not {type(model).__name__}")
        check_model(model)
        return model

    def session(
        self, *, timeout: SupportsFloat | None = None, model: str | None = None
    ) -> AbstractAsyncContextManager[Session]:
        """Open a server-side session for the block (``OpenSession`` … ``CloseSession``).

        ``timeout`` bounds the ``OpenSession`` call; ``model`` names the model for
        this session instead of the client's (on the same connection). Leaving
        the block in any way — normally, by exception or by cancellation — sends ``CloseSession``,
        shielded and bounded by ``close_timeout``; a failed close is logged and
        never hides the block's own exception.
        """
        model = self._model_for(model)
        return open_session(
            self._grpc(),
            model,
            max_buffered_events=self._max_buffered,
            close_timeout=self._close_timeout,
            timeout=timeout,
            known_shape=self._https().known_readout_shape,
            readout_mismatch=self._https().readout_mismatch,
        )

    def conversation(
        self, *, rewind: bool = True, model: str | None = None
    ) -> AbstractAsyncContextManager[Conversation]:
        """A reusable session slot for multi-turn streaming (see :class:`Conversation`).

        Args:
            rewind: on divergence, truncate to the longest shared prefix (default)
                instead of raising :class:`SessionDivergence`.
            model: the model its sessions name instead of the client's.
        """
        if not isinstance(rewind, bool):
            raise TypeError(f"rewind must be a bool, not {type(rewind).__name__}")
        model = self._model_for(model)
        conv = Conversation(
            self._grpc(),
            model,
            rewind=rewind,
            max_buffered_events=self._max_buffered,
            close_timeout=self._close_timeout,
            known_shape=self._https().known_readout_shape,
            readout_mismatch=self._https().readout_mismatch,
        )
        return _ConversationBlock(conv)

    async def score(
        self,
        chunks: Sequence[Chunk],
        ranges: Ranges,
        *,
        timeout: SupportsFloat | None = None,
        model: str | None = None,
    ) -> list[ScoreResult]:
        """Sum the log-probabilities of the prompt positions in each range.

        Uses an ephemeral session (closed on exit, also on error or cancellation):
        the chunks go as in a conversation (a prefill before each image, then
        the rest), every ``Generate(max_tokens=0)`` with ``logprobs_ranges``. Ranges are
        half-open ``(start, end)``, in any order, and must lie inside the prompt
        (an empty one sums to 0, as an empty continuation does);
        results come back in the order given. Image placeholder positions have no
        log-probability and add nothing to a range. An image's length is the
        server's: one whose ``known_expanded_len`` the server contradicts raises
        ``ValueError`` if a range reaches past it (that range was counted from the
        wrong length). ``timeout`` bounds the whole call (:class:`PocApiTimeout`).
        """
        with deadline(timeout, "score", composite=True):
            return await score_chunks(
                self._grpc(),
                self._model_for(model),
                chunks,
                ranges,
                max_buffered_events=self._max_buffered,
                close_timeout=self._close_timeout,
            )

    async def score_many(
        self,
        prompts: Sequence[tuple[Sequence[Chunk], Ranges]],
        *,
        max_concurrency: SupportsIndex = 16,
        share_prefix: bool = False,
        timeout: SupportsFloat | None = None,
        model: str | None = None,
    ) -> list[list[ScoreResult]]:
        """Score many ``(chunks, ranges)`` prompts concurrently over the one connection.

        At most ``max_concurrency`` are in flight (never more than the client's
        ``max_concurrent_streams``, which would refuse them); results are in input
        order. A server that refuses one more session (``RESOURCE_EXHAUSTED``: a
        cap on open sessions) while this call has others open is not a failure:
        the call goes on with no more at once than it then had (logged at INFO),
        each refused prompt again when one of them ends. With none of its own
        open, the refusal is raised. The first failure cancels the rest and is
        raised (unwrapped), with a note naming its prompt (``score_many:
        prompts[7]``; a group's shared prefix names the group's). ``timeout``
        bounds the whole batch.

        ``share_prefix=True`` groups prompts that share a prefix (token by token;
        images whole, with the same bytes, mime and ``known_expanded_len``): each
        group gets one session that prefills the prefix once, then rewinds to its
        end for each prompt's rest, as :meth:`score_continuations` does. The
        results are the same as without it. A group's prompts run one after
        another; the groups run concurrently.
        """
        # As an int first: numpy's int64 skipped the clamp (and then hit the limit).
        max_concurrency = min(as_int("max_concurrency", max_concurrency), self._streams.limit)
        with deadline(timeout, "score_many", composite=True):
            return await score_many(
                self._grpc(),
                self._model_for(model),
                prompts,
                max_concurrency=max_concurrency,
                max_buffered_events=self._max_buffered,
                close_timeout=self._close_timeout,
                share_prefix=share_prefix,
            )

    async def score_continuations(
        self,
        prompt_chunks: Sequence[Chunk],
        continuations: Iterable[Iterable[SupportsIndex] | Sequence[Chunk] | Chunk],
        *,
        timeout: SupportsFloat | None = None,
        model: str | None = None,
    ) -> list[ScoreResult]:
        """Score continuations of one prompt, sending the prompt once.

        One ephemeral session (closed on success, error and cancellation) prefills
        ``prompt_chunks`` (text and images); then, for each continuation (token
        ids, a chunk, or a sequence of chunks; a 2-D numpy array of ids is one
        continuation per row), one ``Generate`` rewinds to the
        prompt's end (``truncating = true``), appends it and reads its logprobs.
        N continuations of length n on a P-position prompt send P + N·n positions
        instead of N·(P + n).

        Returns one :class:`ScoreResult` per continuation, in input order: its
        positions ``[P, P + len)`` and their summed logprob, which equals what
        :meth:`score` gives for the full prompt over that range (the first
        position is conditioned on the prompt). An empty continuation sums to 0.
        A continuation that cannot fit the context window raises
        :class:`ContextOverflow` for the whole call: before anything is appended
        (once ``OpenSession`` says ``max_length``) when its text alone overflows;
        one that overflows only with its images (whose stated lengths this check
        does not trust) is refused by the server, after those before it.
        ``timeout`` bounds the whole call.
        """
        with deadline(timeout, "score_continuations", composite=True):
            return await score_continuations(
                self._grpc(),
                self._model_for(model),
                prompt_chunks,
                continuations,
                max_buffered_events=self._max_buffered,
                close_timeout=self._close_timeout,
            )

    # -- HTTP --------------------------------------------------------------------

    async def readout_manifest(
        self, *, timeout: SupportsFloat | None = None
    ) -> ReadoutManifest | None:
        """The readout manifest, or ``None`` when the server has readout disabled
        (or sends a manifest with no concepts or no layers: a warning is logged).

        Fetched once per client and shared, even by concurrent first callers (one
        request; they all get its answer, or its error); a failed or cancelled
        fetch is not cached: a later call tries again.
        """
        api = self._https()
        with deadline(
            timeout, api.call_name("readout_manifest", "GET", "/readout/manifest"), composite=True
        ):
            return await api.readout_manifest()

    async def train(
        self,
        samples: Sequence[TrainSample],
        *,
        timeout: SupportsFloat | None = None,
        model: str | None = None,
    ) -> TrainResult:
        """Send training samples to ``POST {base_url}/train``; ``model`` names the
        model instead of the client's."""
        model = self._model_for(model)
        api = self._https()
        with deadline(timeout, api.call_name("train", "POST", "/train"), composite=True):
            return await api.train(samples, model)

    @_known_keywords_only
    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        timeout: SupportsFloat | None = None,
        model: str | None = None,
        max_tokens: SupportsIndex | None = None,
        temperature: SupportsFloat | None = None,
        top_p: SupportsFloat | None = None,
        stop: str | Sequence[str] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        n: SupportsIndex | None = None,
        logprobs: bool | None = None,
        top_logprobs: SupportsIndex | None = None,
        seed: SupportsIndex | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatCompletion:
        """OpenAI-compatible chat completion (non-streaming), ``POST /chat/completions``.

        Options left at ``None`` are not sent (the server's defaults apply). Bad
        arguments raise ``TypeError``/``ValueError`` before anything is sent; an
        unknown keyword is a ``TypeError`` naming it (a field the server knows and
        this method does not goes in ``extra_body``).

        Args:
            messages: OpenAI message mappings (``{"role", "content"}``; an assistant
                tool-call turn may have ``content: None``).
            timeout: seconds for the whole call (:class:`PocApiTimeout` when passed).
            model: the model to name for this call instead of the client's ``model``
                (``""``: the server's default, as for :meth:`session`: its only
                served model, from ``GET /models``).
            max_tokens: decode budget, 1 to 2**31 - 1 (as OpenAI-compatible servers take).
            temperature: sampling temperature (0 is greedy).
            top_p: nucleus sampling threshold in ``[0, 1]``.
            stop: a string, or strings, that end the completion.
            tools: OpenAI tool definitions (``{"type": "function", "function": ...}``).
            tool_choice: ``"none"``, ``"auto"``, ``"required"`` or a mapping naming a tool.
            response_format: e.g. ``{"type": "json_object"}``.
            n: number of choices (all in :attr:`ChatCompletion.choices`).
            logprobs: return the sampled tokens' logprobs.
            top_logprobs: alternatives per position (needs ``logprobs=True``).
            seed: sampling seed.
            extra_body: fields sent as they are, after the ones above (vLLM's
                ``top_k``, ``chat_template_kwargs``, ...).
        """
        api = self._https()
        with deadline(timeout, api.chat_call_name("chat", model), composite=True):
            return await api.chat(
                messages,
                model=model,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=stop,
                tools=tools,
                tool_choice=tool_choice,
                response_format=response_format,
                n=n,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                seed=seed,
                extra_body=extra_body,
            )

    @_known_keywords_only
    def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        timeout: SupportsFloat | None = None,
        model: str | None = None,
        max_tokens: SupportsIndex | None = None,
        temperature: SupportsFloat | None = None,
        top_p: SupportsFloat | None = None,
        stop: str | Sequence[str] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        n: SupportsIndex | None = None,
        logprobs: bool | None = None,
        top_logprobs: SupportsIndex | None = None,
        seed: SupportsIndex | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> AbstractAsyncContextManager[ChatStream]:
        """OpenAI-compatible streaming chat: deltas, then a final :class:`ChatDone`.

        Yields :class:`ChatDelta`, :class:`ChatReasoningDelta` and
        :class:`ChatToolCallDelta` events in the order the server sent them, then
        one :class:`ChatDone`. Leaving the block early closes the HTTP response
        (the connection goes back to the pool or is discarded).

        Args:
            messages: as :meth:`chat`.
            timeout: seconds until the stream's end: entering the block, and each
                read waiting for events after it, raises :class:`PocApiTimeout`
                once they have passed (as a Generate stream's timeout; your own
                code in the block is not cut).
            model: as :meth:`chat`.
            max_tokens: as :meth:`chat`.
            temperature: as :meth:`chat`.
            top_p: as :meth:`chat`.
            stop: as :meth:`chat`.
            tools: as :meth:`chat`.
            tool_choice: as :meth:`chat`.
            response_format: as :meth:`chat`.
            n: as :meth:`chat` (each delta names its ``choice``).
            logprobs: as :meth:`chat` (carried on each :class:`ChatDelta`).
            top_logprobs: as :meth:`chat`.
            seed: as :meth:`chat`.
            extra_body: as :meth:`chat`.
        """
        api = self._https()
        assert self._bridge is not None
        return checked_on_entry(
            api.chat_stream(
                messages,
                timeout=timeout,
                model=model,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=stop,
                tools=tools,
                tool_choice=tool_choice,
                response_format=response_format,
                n=n,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                seed=seed,
                extra_body=extra_body,
            ),
            self._bridge.check_run,
        )

    async def tokenize(self, text: str, *, timeout: SupportsFloat | None = None) -> list[int]:
        """Encode text with the server's tokenizer (reference-server extension).

        An answer with an id outside ``[0, 2**32)`` raises :class:`ProtocolViolation`.
        """
        api = self._https()
        with deadline(timeout, api.call_name("tokenize", "POST", "/tokenize"), composite=True):
            return await api.tokenize(text)

    async def detokenize(
        self, tokens: Iterable[SupportsIndex], *, timeout: SupportsFloat | None = None
    ) -> str:
        """Decode token ids with the server's tokenizer (reference-server extension)."""
        api = self._https()
        with deadline(timeout, api.call_name("detokenize", "POST", "/detokenize"), composite=True):
            return await api.detokenize(tokens)

    def text_decoder(self, *, skip_special_tokens: bool = True) -> TextDecoder:
        """A :class:`TextDecoder`: streamed token ids to text, with the server's
        tokenizer (``/detokenize``, a reference-server extension). Special tokens
        add no text unless ``skip_special_tokens`` is False (they are learnt from
        :meth:`tokenizer_info` at the first feed)."""
        if not isinstance(skip_special_tokens, bool):
            raise TypeError(
                f"skip_special_tokens must be a bool, not {type(skip_special_tokens).__name__}"
            )
        return TextDecoder(self._https, skip_special_tokens=skip_special_tokens)

    async def tokenizer_info(self, *, timeout: SupportsFloat | None = None) -> TokenizerInfo:
        """Vocabulary size and special token ids (reference-server extension).

        ``{"vocab_size": int, "special": {name: id}}`` (:class:`TokenizerInfo`); an
        answer of another shape raises :class:`ProtocolViolation`.
        """
        api = self._https()
        with deadline(
            timeout, api.call_name("tokenizer_info", "GET", "/tokenizer"), composite=True
        ):
            return await api.tokenizer_info()


@final
class _Secret(str):
    """A str that is itself on the wire and ``<redacted>`` in reprs: the gRPC
    metadata's key is a local of every call's frame, and traceback tools that
    show locals (rich's ``show_locals``, ``pytest -l``, error trackers) print
    their reprs."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'"


class _BearerAuth(httpx.Auth):
    """``authorization: Bearer <key>`` on every request (repr without the key)."""

    def __init__(self, key: str) -> None:
        self._header = f"Bearer {key}"

    def __repr__(self) -> str:
        return "<_BearerAuth>"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["authorization"] = self._header
        yield request


@final
class _ConversationBlock(NeedsAsyncWith):
    """The block of :meth:`ApiClient.conversation`: closes it on exit, shielded.

    A class, not an ``@asynccontextmanager`` (see ``Session.generate``).
    """

    __slots__ = ("_conv", "_entered")

    def __init__(self, conv: Conversation) -> None:
        self._conv = conv
        self._entered = False

    def _usage(self) -> str:
        return "client.conversation()"

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> Conversation:
        # From another trio.run the block was spent (and its exit then refused).
        self._conv._transport.check_run()
        if self._entered:  # its exit closes the conversation: one block only
            raise RuntimeError("a conversation block can be entered only once")
        self._entered = True
        return self._conv

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(self, *exc_info: object) -> None:
        with trio.CancelScope(shield=True):
            await self._conv.aclose()
