"""The exception tree of poc_api.

Every failure the library reports on purpose derives from :class:`PocApiError`;
bad arguments raise plain :class:`ValueError` / :class:`TypeError` before anything
is sent. The tree::

    PocApiError
    ├── TransportError            the connection, not the server, failed
    │   ├── ServerUnavailable     cannot connect, connection lost, UNAVAILABLE
    │   └── PocApiTimeout         a deadline passed (also a TimeoutError)
    ├── RpcError                  the server answered with a non-OK gRPC status, or reset the stream
    │   ├── AuthenticationError   UNAUTHENTICATED or PERMISSION_DENIED, or HTTP 401/403
    │   ├── SessionNotFound       NOT_FOUND: unknown, closed or evicted session
    │   ├── ContextOverflow       OUT_OF_RANGE: the context window is full
    │   ├── InvalidRequest        INVALID_ARGUMENT (e.g. an undecodable image)
    │   ├── OffsetMismatch        FAILED_PRECONDITION: offset != session length
    │   ├── ResourceExhausted     RESOURCE_EXHAUSTED: server limits
    │   └── StreamCancelled       CANCELLED, or the server reset the stream with CANCEL
    ├── HttpError                 an HTTP endpoint answered 4xx/5xx
    ├── ProtocolViolation         the peer sent something malformed
    ├── LimitExceeded             a client-side bound was hit
    ├── SessionDivergence         the prompt no longer matches the session
    └── SessionLost               a session's state is unknown (a call cut short, or gone)

``AuthenticationError`` is raised for both transports, so it is also an
``HttpError``-like: it carries ``http_status`` when it came from HTTP.

Lower-level errors (grpclib, h2, OSError, httpx) are translated in exactly one
place each: :func:`poc_api._transport.map_grpc_error` and
:mod:`poc_api._http`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from contextvars import ContextVar, Token
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Generic,
    Literal,
    NoReturn,
    ParamSpec,
    TypeAlias,
    TypeVar,
    final,
)

import trio

from ._log import ONE_LINE_ESCAPES

__all__ = [
    "AuthenticationError",
    "ContextOverflow",
    "DivergenceReason",
    "HttpError",
    "InvalidRequest",
    "LimitExceeded",
    "OffsetMismatch",
    "PocApiError",
    "PocApiTimeout",
    "ProtocolViolation",
    "ResourceExhausted",
    "RpcError",
    "ServerUnavailable",
    "SessionDivergence",
    "SessionLost",
    "SessionNotFound",
    "StreamCancelled",
    "TransportError",
    "collapse_cancellation",
    "start_tasks",
]


class PocApiError(Exception):
    """Base of every error poc_api raises on purpose.

    Its message has control characters (but tab) escaped (``\\x0a``): what a
    server said in it cannot start a line of its own in a log or drive a terminal.
    Attributes that hold the server's text (``body_excerpt``) keep it as it came.

    Attributes:
        grpc_status: the gRPC status name (``"NOT_FOUND"``, ...) when the error
            came from a gRPC call, else ``None``.
        http_status: the HTTP status code when it came from an HTTP call.
        retriable: True when the server certainly did not process the request
            (e.g. it refused the stream), so sending it again is safe; see
            :attr:`PocApiError.retriable` for calls made of several requests.
    """

    grpc_status: str | None = None
    http_status: int | None = None
    retriable: bool = False
    """True when the server certainly did not process the request (e.g. it
    refused the stream), so sending it again is safe. For a call made of several
    requests (a conversation's turn, a ``score``), the failing one was not
    processed and what the earlier ones did is undone (the turn's session is
    closed) or changed nothing (scoring)."""

    def __init__(
        self,
        message: str,
        *,
        grpc_status: str | None = None,
        http_status: int | None = None,
        retriable: bool = False,
    ) -> None:
        # What a server says (a status message, a body) goes into messages that
        # applications log and print: as in poc_api's own log lines (_log.py).
        message = str(message).translate(ONE_LINE_ESCAPES)  # (an exception, say)
        super().__init__(message)
        self.message = message
        if grpc_status is not None:
            self.grpc_status = grpc_status
        if http_status is not None:
            self.http_status = http_status
        if retriable:
            self.retriable = True

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its args plus its attributes, rebuilt without calling
        # __init__: subclasses with required keyword-only arguments (HttpError,
        # SessionDivergence) would not unpickle otherwise (multiprocessing,
        # trio-parallel).
        return (_rebuild, (type(self), self.args), self.__dict__)


_E = TypeVar("_E", bound=BaseException)


def own_copy(exc: _E) -> _E:
    """A copy of ``exc`` for one of the callers that share a failure (the waiters
    of one connection attempt, of one cached fetch).

    One object raised in several tasks is one traceback, one ``__context__`` and
    one list of notes for all of them: a task's exception then showed another
    task's frames, the exception that task was handling, or its notes.
    """
    copy = _rebuild(type(exc), exc.args)
    copy.__dict__.update(exc.__dict__)
    if "__notes__" in copy.__dict__:
        copy.__notes__ = list(exc.__notes__)
    copy.__cause__ = exc.__cause__
    copy.__context__ = exc.__context__
    copy.__suppress_context__ = exc.__suppress_context__
    return copy.with_traceback(exc.__traceback__)


def _rebuild(cls: type[_E], args: tuple[Any, ...]) -> _E:
    """An exception of ``cls`` with ``args``, made without its ``__init__``."""
    exc = cls.__new__(cls, *args)
    exc.args = args  # (OSError's __new__, PocApiTimeout's, leaves them to __init__)
    return exc


class TransportError(PocApiError):
    """The connection failed: the request may or may not have reached the server."""


@final
class ServerUnavailable(TransportError):
    """The server cannot be reached, went away, or answered UNAVAILABLE.

    Within the reconnect backoff after a failed connection attempt, a call raises
    this at once (``retriable``: nothing was sent), saying when the next attempt
    will be made.
    """


@final
class PocApiTimeout(TransportError, TimeoutError):
    """A deadline given to poc_api passed before the call finished."""


class RpcError(PocApiError):
    """The server answered a gRPC call with a non-OK status."""


@final
class AuthenticationError(RpcError):
    """The server refused the caller.

    The api key was missing or wrong (gRPC ``UNAUTHENTICATED``, HTTP 401), or the
    key is not allowed what was asked (``PERMISSION_DENIED``, HTTP 403, a stream
    reset with ``INADEQUATE_SECURITY``): ``grpc_status`` / ``http_status`` say which.
    """


@final
class SessionNotFound(RpcError):
    """The session is unknown to the server: closed, evicted, or the server restarted."""


@final
class ContextOverflow(RpcError):
    """The request would exceed the session's context window (OUT_OF_RANGE)."""


@final
class InvalidRequest(RpcError):
    """The server rejected the request's content (INVALID_ARGUMENT)."""


@final
class OffsetMismatch(RpcError):
    """The offset did not match the session length (FAILED_PRECONDITION)."""


@final
class ResourceExhausted(RpcError):
    """A server-side limit was hit (RESOURCE_EXHAUSTED), e.g. too many sessions
    (that refusal of an ``OpenSession`` is ``retriable``: no session was made)."""


@final
class StreamCancelled(RpcError):
    """The server cancelled the call (CANCELLED), or reset its stream with CANCEL.

    A reset with another HTTP/2 error code raises the error of the gRPC status
    gRPC maps that code to (see the README's errors section)."""


@final
class HttpError(PocApiError):
    """An HTTP endpoint answered with an error status.

    The message holds the status, the URL and the server's message (of a JSON
    error body: OpenAI's, vLLM's, FastAPI's), else the body's first 500 bytes,
    cut on a character boundary (so at most 500 characters); :attr:`body_excerpt`
    always has the latter. :attr:`retry_after` is the wait in seconds the
    answer's ``Retry-After`` header asked for (a 429 or a 503, mostly), or
    ``None``: poc_api does not retry by itself.
    """

    # Narrower than PocApiError's: every HttpError is built with a status.
    http_status: int

    def __init__(
        self,
        message: str,
        *,
        http_status: int,
        url: str,
        body_excerpt: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, http_status=http_status)
        self.url = url
        self.body_excerpt = body_excerpt
        self.retry_after = retry_after


@final
class ProtocolViolation(PocApiError):
    """The peer sent something poc_api cannot understand (bad frame, JSON, content type)."""


@final
class LimitExceeded(PocApiError):
    """A client-side bound (message size, concurrent streams, ...) was exceeded."""


DivergenceReason: TypeAlias = Literal["unknown_length", "straddle", "short", "content"]
"""Why a prompt's chunks no longer line up with the session: :attr:`SessionDivergence.reason`.

``"unknown_length"``: a chunk of unknown length (an image) comes before the
session's end; ``"straddle"``: a chunk runs across it; ``"short"``: the chunks
end before it; ``"content"``: the prompt differs from what the session holds
before it (``rewind=False``).
"""


@final
class SessionDivergence(PocApiError):
    """The prompt's chunks no longer line up with what the session holds.

    Attributes:
        reason: ``"unknown_length"``, ``"straddle"``, ``"short"`` or ``"content"``.
        chunk_index: the chunk where the walk stopped (``"content"``: the chunk
            that holds the first position that differs; ``None`` for ``"short"``).
        accumulated: positions summed before that chunk.
        chunk_len: that chunk's length (0 when unknown).
        committed_len: positions the session holds on the server.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: DivergenceReason,
        chunk_index: int | None,
        accumulated: int,
        chunk_len: int,
        committed_len: int,
    ) -> None:
        super().__init__(message)
        self.reason: DivergenceReason = reason
        self.chunk_index = chunk_index
        self.accumulated = accumulated
        self.chunk_len = chunk_len
        self.committed_len = committed_len


@final
class SessionLost(PocApiError):
    """The session's server-side state is unknown after an interrupted call.

    A generate stream that was cancelled or failed part-way (after the server
    began answering, before its ``Done``) leaves the session in a state the
    client cannot know, as does a call that found the session gone from the
    server (``SessionNotFound``: a restart, an eviction). The message says which.
    Open a new session. (A call the server refused before answering,
    ``InvalidRequest``, ``OffsetMismatch`` or ``ContextOverflow``, keeps it.)
    """


@contextmanager
def collapse_cancellation() -> Iterator[None]:
    """Around a nursery the library opened (ours, or httpx's connect): a group
    made only of cancellations (and Ctrl-C) leaves as one exception.

    ``except trio.Cancelled`` and ``except KeyboardInterrupt`` then work for the
    caller, as they do around trio's own functions. The leaf keeps its own
    ``__cause__``, ``__context__`` and ``__suppress_context__``. A group holding
    anything else is left exactly as it is: only groups of nothing but
    cancellation are the library's to collapse.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if not all(isinstance(x, trio.Cancelled | KeyboardInterrupt) for x in leaves):
            raise
        ki = [x for x in leaves if isinstance(x, KeyboardInterrupt)]
        _reraise((ki or leaves)[0])


@trio.lowlevel.enable_ki_protection
def start_tasks(
    nursery: trio.Nursery, fn: Callable[..., Awaitable[object]], *args_list: tuple[Any, ...]
) -> None:
    """``nursery.start_soon(fn, *args)`` for each ``args``, protected from Ctrl-C.

    trio's ``start_soon`` is not: a ``KeyboardInterrupt`` landing inside it (between
    its steps of making the task) leaves a coroutine never awaited, a task the
    nursery waits for but never runs (a hang), or a ``TrioInternalError`` at the
    run's end. Protected, it comes at the next checkpoint instead.
    """
    for args in args_list:
        nursery.start_soon(fn, *args)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _reraise(leaf: BaseException) -> NoReturn:
    context, cause, suppress = leaf.__context__, leaf.__cause__, leaf.__suppress_context__
    try:
        raise leaf
    finally:
        # `raise` inside the handler set the group as context: put back the leaf's own.
        leaf.__context__, leaf.__cause__ = context, cause
        leaf.__suppress_context__ = suppress


def check_run(owner: trio.lowlevel.TrioToken) -> None:
    """``RuntimeError`` unless called from the trio run ``owner`` names (a client's):
    a task of another run woken by this one is an internal error in trio, and
    waits for ever."""
    try:
        token = trio.lowlevel.current_trio_token()
    except RuntimeError:
        raise RuntimeError(
            "poc_api must be used from inside trio.run (no trio run is active here)"
        ) from None
    if token is not owner:
        raise RuntimeError(
            "this ApiClient belongs to another trio.run (or thread); "
            "open a client in each trio.run that uses one"
        )


def closed_under_call() -> trio.ClosedResourceError:
    """What a call gets when its client is closed (by any task) while it runs.

    trio's own convention (a stream closed by another task): the call failed
    because of the close, not because of the server, so it is not a
    (retriable) :class:`ServerUnavailable`.
    """
    return trio.ClosedResourceError("the ApiClient was closed while this call was running")


def stream_closed() -> trio.ClosedResourceError:
    """What a stream's reader gets once the stream's ``aclose()`` was called
    (``GenerateStream``, ``ConversationStream``, a chat stream's events)."""
    return trio.ClosedResourceError("this stream was closed")


def alpn_refused(reason: str) -> bool:
    """Whether a failed TLS handshake's ``reason`` is the server's
    no_application_protocol alert (OpenSSL's words for it): it took none of the
    ALPN protocols offered, as a gRPC-only port refuses http/1.1, and an HTTP/1.1
    one h2."""
    return "no application protocol" in reason


#: Said of a TLS handshake that the peer answered in plaintext.
PLAINTEXT_PEER: Final = "the server did not answer in TLS: is it a plaintext port (then http://)?"


def plaintext_peer(reason: str) -> bool:
    """Whether a failed TLS handshake's ``reason`` is OpenSSL's for an answer that
    is no TLS record (a plaintext HTTP/1.1 or HTTP/2 server's bytes)."""
    return "WRONG_VERSION_NUMBER" in reason


class Sent:
    """Whether any call of a block (a ``score``: several gRPC calls, in several
    tasks; a ``chat``: an HTTP lookup, then the request) began to send its request
    (gRPC: wrote its HEADERS): see ``_transport.deadline(..., composite=True)``."""

    __slots__ = ("_any", "_calls", "parent")

    def __init__(self, parent: Sent | None) -> None:
        self._any: bool = False
        # gRPC calls whose HEADERS are out, less those between two attempts (the
        # last one never processed, the next one not out yet): see _Progress.
        self._calls: int = 0
        # The block around this one (nested composite deadlines): sent there too.
        self.parent: Sent | None = parent

    @property
    def any(self) -> bool:
        return self._any or self._calls > 0

    def mark(self) -> None:
        block: Sent | None = self
        while block is not None:
            block._any = True
            block = block.parent

    def count(self, n: int) -> None:
        """A gRPC call's request went out (``n=1``), or was found never processed
        (``n=-1``: refused, or above a GOAWAY's last stream id)."""
        block: Sent | None = self
        while block is not None:
            block._calls += n
            block = block.parent


# The Sent of the innermost composite deadline around this task. A task started
# inside that block gets a copy of the context, holding the same Sent.
BLOCK_SENT: ContextVar[Sent | None] = ContextVar("poc_api_block_sent", default=None)


# The cancel scopes of the public calls running in this task (their timeout=), and
# the task: an HTTP error body read inside them takes their deadlines (_http), so
# that a call's timeout cuts the body and not the status line already in.
_CALL_SCOPES: ContextVar[tuple[object, tuple[trio.CancelScope, ...]] | None] = ContextVar(
    "poc_api_call_scopes", default=None
)


@final
class call_scope:
    """While the block runs, ``scope`` bounds the public call running in this task:
    :func:`call_scopes` lists it. A class, not a ``@contextmanager``, for the KI
    protection of the callers' own ``__enter__``/``__exit__``."""

    __slots__ = ("_scope", "_token")

    def __init__(self, scope: trio.CancelScope) -> None:
        self._scope = scope
        self._token: Token[tuple[object, tuple[trio.CancelScope, ...]] | None] | None = None

    def __enter__(self) -> None:
        scopes = (*call_scopes(), self._scope)
        self._token = _CALL_SCOPES.set((trio.lowlevel.current_task(), scopes))

    def __exit__(self, *exc_info: object) -> None:
        token, self._token = self._token, None
        if token is not None:
            _CALL_SCOPES.reset(token)


def call_scopes() -> tuple[trio.CancelScope, ...]:
    """The scopes of :class:`call_scope` blocks around this point of this task
    (not those of a task that started this one: a child task must not move them)."""
    entry = _CALL_SCOPES.get()
    if entry is None or entry[0] is not trio.lowlevel.current_task():
        return ()
    return entry[1]


_P = ParamSpec("_P")
_T = TypeVar("_T")


class NeedsAsyncWith:
    """Mixin of a block's object: iterated or awaited without ``async with``, it
    says how it is used (Python's own ``TypeError`` names the private class).

    Invisible to type checkers: the public methods are typed as returning an
    ``AbstractAsyncContextManager``, which has neither method.
    """

    __slots__ = ()

    def _usage(self) -> str:  # "client.chat_stream(...)"
        raise NotImplementedError

    def __aiter__(self) -> NoReturn:
        usage = self._usage()
        raise TypeError(
            f"{usage} is a block, not an iterator: "
            f"`async with {usage} as events:`, then `async for ev in events`"
        )

    def __await__(self) -> NoReturn:
        usage = self._usage()
        raise TypeError(f"{usage} is a block, not an awaitable: `async with {usage} as ...:`")

    # No __enter__/__exit__ for a plain `with` (Python's own error then names the
    # private class): with them a block would pass for a context manager to code
    # that picks `with` or `async with` by what an object has.

    if not TYPE_CHECKING:  # (typed, it would let any attribute of a block type-check)

        def __getattr__(self, name):
            # Only for attributes it lacks: `client.session().prefill(...)`. (Private
            # and dunder names keep Python's own error: hasattr probes them.)
            if name.startswith("_"):
                return object.__getattribute__(self, name)
            usage = self._usage()
            raise AttributeError(
                f"{usage} is a block, with no attribute {name!r}: "
                f"`async with {usage} as x:`, then x.{name}"
            )


def protected_asynccontextmanager(
    fn: Callable[_P, AsyncIterator[_T]],
) -> Callable[_P, AbstractAsyncContextManager[_T]]:
    """``contextlib.asynccontextmanager`` with KI-protected enter and exit, and a
    block that says so when entered twice.

    A Ctrl-C landing in contextlib's own ``__aexit__`` would leave the generator
    suspended, with whatever it holds open (a cancel scope: "Cancel scope stack
    corrupted"; a client: its loop thread). Protected, it comes at the next
    checkpoint instead, as in trio's own code. (contextlib's second entry fails
    with an ``AttributeError`` about its internals.)
    """
    factory = contextlib.asynccontextmanager(fn)

    # A method (ApiClient's chat_stream, through HttpApi's) is called on a client.
    usage = f"{'client.' if '.' in fn.__qualname__ else ''}{fn.__name__}(...)"

    @functools.wraps(fn)
    def block(*args: _P.args, **kwargs: _P.kwargs) -> AbstractAsyncContextManager[_T]:
        return _Protected(factory(*args, **kwargs), fn.__name__, usage)

    return block


def checked_on_entry(
    block: AbstractAsyncContextManager[_T], check: Callable[[], None]
) -> AbstractAsyncContextManager[_T]:
    """``block`` (a :func:`protected_asynccontextmanager` one) with ``check()`` run
    first on entry, before it counts as entered: a refused entry leaves it to its
    owner (``ApiClient.chat_stream``'s: another trio.run's entry sent its request
    on the owner's httpx client, whose close then crossed runs)."""
    assert isinstance(block, _Protected)
    block._check = check
    return block


@final
class _Protected(NeedsAsyncWith, Generic[_T]):
    __slots__ = ("_check", "_cm", "_entered", "_name", "_usage_text")

    def __init__(self, cm: AbstractAsyncContextManager[_T], name: str, usage: str) -> None:
        self._cm = cm
        self._name = name
        self._usage_text = usage
        self._entered = False
        self._check: Callable[[], None] | None = None  # see checked_on_entry

    def _usage(self) -> str:
        return self._usage_text

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> _T:
        if self._check is not None:
            self._check()
        if self._entered:
            raise RuntimeError(f"a {self._name} block can be entered only once")
        self._entered = True
        return await self._cm.__aenter__()

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._cm.__aexit__(exc_type, exc, tb)
