"""The HTTP side of the client: readout manifest, train, chat, tokenizer endpoints.

:class:`HttpApi` wraps an ``httpx.AsyncClient`` (owned by ``ApiClient``); httpx
runs on trio natively. Everything here is JSON under ``base_url`` (proto/PROTOCOL.md §5),
plus OpenAI-compatible ``/chat/completions`` with Server-Sent Events decoded by
:class:`~poc_api._sse.SSEDecoder`.

Errors:

- a 4xx/5xx answer raises :class:`~poc_api.HttpError` (401/403:
  :class:`~poc_api.AuthenticationError`) whose message holds the status, the URL and
  :func:`error_excerpt` of the body -- of as much of it as arrived, when its read
  failed (that failure is the error's ``__cause__``);
- a body that is not UTF-8 JSON of the expected shape raises
  :class:`~poc_api.ProtocolViolation`;
- httpx's own exceptions are translated in exactly one place,
  :func:`_map_httpx_errors`: timeouts to :class:`~poc_api.PocApiTimeout`, lost or
  refused connections to :class:`~poc_api.ServerUnavailable`, unparseable HTTP to
  :class:`~poc_api.ProtocolViolation`. ``retriable`` is set only when nothing of
  the request was sent: the connection could not be made (refused, or its connect
  timed out). A lost connection or an error status (a 503 too) may come after
  the server acted on the request.

The api key travels only in the ``authorization`` header. It is never put in an
exception message or a log line, and is redacted from body excerpts in case a
server echoes it back: from all of the answer read, before the excerpt is cut.
A ``user:password@`` in ``base_url`` is taken out of the URLs httpx sees (and
logs) and sent as the Basic auth httpx would have made of it.
"""

from __future__ import annotations

import codecs
import contextlib
import datetime
import difflib
import email.utils
import functools
import html
import inspect
import json
import logging
import math
import os
import re
import sys
import time
import urllib.request
import weakref
import zlib
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextvars import ContextVar
from types import TracebackType
from typing import (
    Any,
    Final,
    Generic,
    NoReturn,
    ParamSpec,
    Protocol,
    SupportsFloat,
    SupportsIndex,
    TypeAlias,
    TypedDict,
    TypeGuard,
    TypeVar,
    cast,
    final,
)

import attrs
import httpx
import trio

from ._clock import FairSlice, autojumping, hold_clock
from ._errors import (
    BLOCK_SENT,
    PLAINTEXT_PEER,
    AuthenticationError,
    HttpError,
    LimitExceeded,
    PocApiError,
    PocApiTimeout,
    ProtocolViolation,
    Sent,
    ServerUnavailable,
    alpn_refused,
    call_scope,
    call_scopes,
    check_run,
    closed_under_call,
    collapse_cancellation,
    own_copy,
    plaintext_peer,
    protected_asynccontextmanager,
    start_tasks,
    stream_closed,
)
from ._sse import SSEDecoder, SSEEvent
from ._types import (
    ReadoutManifest,
    TrainResult,
    TrainSample,
    Usage,
    _u32_tuple,
    as_float,
    as_int,
    check_timeout,
)

__all__ = [
    "ChatCompletion",
    "ChatDelta",
    "ChatDone",
    "ChatEvent",
    "ChatLogprobs",
    "ChatReasoningDelta",
    "ChatStream",
    "ChatTokenLogprob",
    "ChatToolCall",
    "ChatToolCallDelta",
    "ChatTopLogprob",
    "HttpApi",
    "TokenizerInfo",
    "error_excerpt",
    "key_redactor",
    "redact_url",
    "shown_url",
    "url_password",
]

log = logging.getLogger("poc_api.http")

#: Body bytes kept in an error message, cut on a character boundary (so at most
#: as many characters: proto/PROTOCOL.md §5, the seed's floor_char_boundary).
EXCERPT_LIMIT: Final = 500
#: Bytes of an error body read: enough for the server's message in a JSON error
#: body (a validation error listing every field runs to kilobytes; only a body read
#: whole is parsed), bounded so an endless error body cannot hold the caller.
_ERROR_BODY_READ_LIMIT: Final = 64 * 1024
#: Closing a response is local work; the bound only guards a wedged transport.
_CLOSE_TIMEOUT: Final = 5.0
#: Bytes of a chat stream's body the block's task reads ahead of the caller: once
#: the events decoded from that many wait unread, it stops reading until they are.
_CHAT_READ_AHEAD: Final = 64 * 1024
# How long a chat stream's block, left after [DONE], waits for the body's end (it
# comes at once from any server that sends it apart; a server that never does
# costs this much per stream, then its connection).
_BODY_END_GRACE: Final = 0.1
_RESERVED_CHAT_KEYS: Final = frozenset({"messages", "stream", "stream_options"})
_U32_MAX: Final = 2**32 - 1
_I32_MAX: Final = 2**31 - 1
#: POSTs that are pure functions of their body: sent twice, they do no harm.
_PURE_POSTS: Final = frozenset({"/tokenize", "/detokenize"})

# How messages name the model= and base_url arguments: the CLI spells them as its
# --model and --url.
NO_MODEL_SET: Final = "model= is not set"
PASS_MODEL: Final = "pass model="
IS_BASE_URL: Final = "is base_url "


#: What ``HttpApi._request`` returns for an allowed 404 (JSON ``null`` is ``None``).
_ABSENT: Final = object()

#: Characters of an HTML error page looked at for its title or text.
_HTML_SCAN: Final = 8192
_HTML_START: Final = re.compile(r"\s*(<!doctype\s+html|<html)", re.IGNORECASE)
_HTML_TITLE: Final = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
_HTML_HIDDEN: Final = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAG: Final = re.compile(r"<[^>]*>")


def _html_summary(text: str) -> str | None:
    """An HTML error page (a proxy's, or a base_url missing its ``/v1``) told by its
    title, else by its text; ``None`` for a body that is not an HTML page."""
    if not _HTML_START.match(text):
        return None
    found = _HTML_TITLE.search(text)
    title = " ".join(html.unescape(found.group(1)).split()) if found else ""
    if title:
        return f"an HTML page titled {error_excerpt(title.encode(), limit=200)!r}"
    words = " ".join(html.unescape(_HTML_TAG.sub(" ", _HTML_HIDDEN.sub(" ", text))).split())
    return f"an HTML page: {error_excerpt(words.encode(), limit=200)}" if words else "an HTML page"


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header value asks to wait (RFC 9110 §10.2.3:
    delay-seconds or an HTTP-date, a past date being 0), or ``None`` for none or
    one that is neither.

    >>> retry_after("7"), retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), retry_after("soon")
    (7.0, 0.0, None)
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value) if len(value) <= 11 else 1e11  # (no 5000-digit parse)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # (-0000: "UTC, source unknown")
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def error_excerpt(body: bytes, limit: int = EXCERPT_LIMIT) -> str:
    """The first ``limit`` bytes of an HTTP body as text, cut on a character boundary.

    The cut never splits a multibyte UTF-8 character: a character that straddles
    byte ``limit`` is left out whole (the seed's ``floor_char_boundary``). Bytes that
    are not UTF-8 become U+FFFD. The result has at most ``limit`` characters.

    >>> error_excerpt(b"x" * 499 + "é".encode()) == "x" * 499  # é is bytes 499-500
    True
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if len(body) <= limit:
        return decoder.decode(body, final=True)
    # Not final: an incomplete character at the cut is withheld, not replaced.
    return decoder.decode(body[:limit], final=False)


@final
@attrs.frozen
class ChatToolCall:
    """A complete tool call the model asked for (OpenAI ``tool_calls[i]``).

    ``arguments`` is the JSON text exactly as the model wrote it: models do emit
    invalid JSON, so parsing it (``json.loads``) is left to the caller. For an
    OpenAI custom tool (``type == "custom"``) it is the call's free-form ``input``.
    ``extra`` holds the call's other fields as the server sent them (Gemini's
    ``extra_content`` with its ``thought_signature``, which it needs back with
    the call in the next turn's messages: :meth:`to_dict` sends them).
    """

    id: str
    name: str
    arguments: str
    type: str = "function"
    extra: Mapping[str, Any] = attrs.field(factory=dict, kw_only=True, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """The call in OpenAI's ``tool_calls[i]`` shape (its ``extra`` fields too),
        as an assistant message sent back in ``messages`` holds it (see
        :meth:`ChatCompletion.to_message`)."""
        if self.type == "custom":
            body = {"custom": {"name": self.name, "input": self.arguments}}
        else:
            body = {"function": {"name": self.name, "arguments": self.arguments}}
        return {**self.extra, "id": self.id, "type": self.type, **body}


#: A tool call's fields that ChatToolCall holds as its own (the rest: ``extra``).
_TOOL_CALL_FIELDS: Final = frozenset({"id", "type", "index", "function", "custom"})


def _extra_fields(call: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in call.items() if k not in _TOOL_CALL_FIELDS}


def _assistant_message(
    text: str, tool_calls: tuple[ChatToolCall, ...], refusal: str
) -> dict[str, Any]:
    # OpenAI's assistant message: content null for a turn of tool calls only. The
    # reasoning is left out (DeepSeek's API refuses it sent back; OpenAI has no field).
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if tool_calls else "")}
    if tool_calls:
        message["tool_calls"] = [call.to_dict() for call in tool_calls]
    if refusal:
        message["refusal"] = refusal
    return message


class ChatTopLogprob(TypedDict, total=False):
    """One of the most likely tokens at a position (OpenAI's ``top_logprobs[i]``).

    As the server sent it: see :class:`ChatLogprobs`.
    """

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TypedDict, total=False):
    """One generated token with its logprob (OpenAI's ``logprobs.content[i]``).

    As the server sent it: see :class:`ChatLogprobs`.
    """

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(TypedDict, total=False):
    """A chat choice's ``logprobs`` object, in OpenAI's shape:
    ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}``.

    It is the server's JSON as it was parsed, passed on unchecked except that it
    is an object (anything else is a :class:`~poc_api.ProtocolViolation`): a
    server may leave out keys of this shape, send ``null`` for them, or add its
    own. The types say what OpenAI sends; read the keys with ``.get()``.
    """

    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None


class TokenizerInfo(TypedDict):
    """The answer of ``GET /tokenizer`` (a reference-server extension), checked.

    ``vocab_size`` is the number of token ids; ``special`` maps the names of
    special tokens (``"bos"``, ``"eos"``, ``"vision_start"``, ``"vision_end"``,
    ``"image_pad"`` on the reference server) to their ids. Keys beyond these two
    are kept as the server sent them.
    """

    vocab_size: int
    special: dict[str, int]


@final
@attrs.frozen
class ChatCompletion:
    """A non-streaming chat completion: the first choice's text, why it stopped, usage.

    Attributes:
        text: the first choice's message content (``""`` when it only calls tools).
        finish_reason: ``"stop"``, ``"length"``, ``"tool_calls"``, ... (``""`` if absent).
        usage: token accounting, or ``None`` when the server sent none.
        tool_calls: the tool calls of the first choice, in order.
        reasoning: the first choice's ``reasoning_content`` (reasoning models), or ``""``.
        logprobs: the first choice's ``logprobs`` object as the server sent it
            (:class:`ChatLogprobs`: ``{"content": [{"token", "logprob",
            "top_logprobs"}, ...]}``, checked to be an object only), or ``None``.
        choices: every choice in index order, each with ``usage=None`` and no
            ``choices`` of its own: one unless ``n > 1`` (so ``choices[0]`` is the
            first choice, as in the ``openai`` package).
        refusal: the first choice's ``refusal`` (OpenAI's structured outputs: the
            model declined, saying why, instead of answering), or ``""``.
    """

    text: str
    finish_reason: str
    usage: Usage | None
    tool_calls: tuple[ChatToolCall, ...] = ()
    reasoning: str = ""
    logprobs: ChatLogprobs | None = attrs.field(default=None, hash=False)
    choices: tuple[ChatCompletion, ...] = ()
    refusal: str = ""

    def to_message(self) -> dict[str, Any]:
        """The first choice as the assistant message to append to ``messages`` for
        the next turn (its text, tool calls and refusal, in OpenAI's shape), e.g.
        ``messages += [done.to_message(), {"role": "tool", "tool_call_id":
        call.id, "content": result}]``."""
        return _assistant_message(self.text, self.tool_calls, self.refusal)


@final
@attrs.frozen
class ChatDelta:
    """A piece of streamed chat text (of choice ``choice``; 0 unless ``n > 1``).

    ``logprobs`` is the chunk's ``logprobs`` object as the server sent it (with
    ``logprobs=True``, a :class:`ChatLogprobs`: ``{"content": [{"token",
    "logprob", "top_logprobs"}, ...]}`` for the tokens of this piece, checked to
    be an object only), else ``None``. ``text`` is ``""`` for tokens that add no
    text of their own (a UTF-8 fragment, an end token) but came with logprobs.
    """

    text: str
    choice: int = 0
    logprobs: ChatLogprobs | None = attrs.field(default=None, hash=False)


@final
@attrs.frozen
class ChatReasoningDelta:
    """A piece of streamed reasoning text (``delta.reasoning_content``, as vLLM,
    llama.cpp and DeepSeek send it, or ``delta.reasoning``)."""

    text: str
    choice: int = 0


@final
@attrs.frozen
class ChatToolCallDelta:
    """A piece of a streamed tool call.

    ``index`` is the tool call's position among the choice's calls; ``id`` and
    ``name`` usually arrive only in the first piece of a call (``""`` in the
    others) and ``arguments`` is the next fragment of the JSON arguments text.
    :class:`ChatDone` carries the calls put together as :class:`ChatToolCall` s.
    """

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""
    choice: int = 0


@final
@attrs.frozen
class ChatDone:
    """Last event of a chat stream (after ``data: [DONE]``, or after the finish chunks
    of a stream that ended without ``[DONE]``).

    Attributes:
        finish_reason: the first choice's ``"stop"``, ``"length"``, ...
            (``""`` if it sent none).
        usage: token accounting, or ``None`` when the server sent none.
        tool_calls: the first choice's tool calls, put together, in order.
        choices: every choice in index order, each with ``usage=None`` and no
            ``choices`` of its own: one unless ``n > 1`` (so ``choices[i]`` holds
            choice ``i``'s finish reason and tool calls, as
            :attr:`ChatCompletion.choices` does for ``chat()``).
        refusal: the first choice's streamed ``delta.refusal`` pieces put together
            (see :attr:`ChatCompletion.refusal`), or ``""``.
    """

    finish_reason: str
    usage: Usage | None
    tool_calls: tuple[ChatToolCall, ...] = ()
    choices: tuple[ChatDone, ...] = ()
    refusal: str = ""

    def to_message(self, text: str = "") -> dict[str, Any]:
        """The first choice as the assistant message to append to ``messages`` for
        the next turn, with ``text``: the :class:`ChatDelta` texts (of choice 0)
        put together, which this event does not hold (see
        :meth:`ChatCompletion.to_message`)."""
        return _assistant_message(text, self.tool_calls, self.refusal)


ChatEvent: TypeAlias = ChatDelta | ChatReasoningDelta | ChatToolCallDelta | ChatDone
"""An event of ``ApiClient.chat_stream``: :class:`ChatDelta`,
:class:`ChatReasoningDelta` and :class:`ChatToolCallDelta` in the order the
server sent them, then one :class:`ChatDone`."""


@final
class _map_httpx_errors:
    """The one place where httpx exceptions become poc_api exceptions.

    A request that fails because ``client`` was closed under it (by another
    task) raises ``trio.ClosedResourceError``, as the gRPC calls do.

    A class, not a ``@contextmanager``: a chat stream's body is read through it
    chunk by chunk (one instance, entered once per read), and its enter and exit
    must not be split by a Ctrl-C. ``url`` is redacted only for an error's message.
    """

    __slots__ = ("_client", "_hold", "_method", "_url")

    def __init__(self, method: str, url: str, client: httpx.AsyncClient) -> None:
        self._method = method
        self._url = url
        self._client = client
        # The server's answer is I/O a MockClock cannot see coming (_clock).
        self._hold = hold_clock()

    @trio.lowlevel.enable_ki_protection
    def __enter__(self) -> None:
        self._hold.__enter__()

    @trio.lowlevel.enable_ki_protection
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._hold.__exit__(exc_type, exc, tb)
        if exc is None:
            return
        if isinstance(exc, BaseExceptionGroup):
            # httpx's trio backend connects in a nursery (happy eyeballs): a cancel
            # there would otherwise come out as a group of Cancelled. (A group of
            # anything else leaves as it is.)
            with collapse_cancellation():
                raise exc
        client = self._client
        if isinstance(exc, httpx.TransportError | httpx.DecodingError):
            if client.is_closed:
                raise closed_under_call() from exc
            raise _from_httpx(exc, self._method, redact_url(self._url), client) from exc
        if isinstance(exc, RuntimeError) and client.is_closed:
            # httpx's "Cannot send a request, as the client has been closed": the
            # close came while this call waited at a checkpoint before sending.
            raise closed_under_call() from exc


def _chain(exc: BaseException, stop: BaseException | None = None) -> Iterator[BaseException]:
    """``exc``, then each exception down its chain of causes (until ``stop``).

    The context too when suppressed: httpcore raises its ConnectError "from None",
    with the trio error, and the SSL error under it, as its context.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and cause is not stop and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def _reason(exc: BaseException, redact: Callable[[str], str]) -> str:
    """The first non-empty message down ``exc``'s chain of causes, put through ``redact``.

    httpx's ConnectError over trio has none of its own, nor has the trio error
    under it: why a TLS handshake failed is told only by the SSL error at the end.
    """
    for cause in _chain(exc):
        # Redacted before the cut: a key across it would leave its first part,
        # which no redaction after the cut recognises.
        text = redact(str(cause))
        if text:
            return text if len(text) <= EXCERPT_LIMIT else text[:EXCERPT_LIMIT] + "..."
    return ""


def _env_proxy(client: httpx.AsyncClient, url: str) -> tuple[str, str] | None:
    """The proxy of the environment httpx sends a call to ``url`` through (as
    messages show it), and the variable that names it; ``None`` for none."""
    if not client.trust_env:
        return None
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return None
    proxies = urllib.request.getproxies()
    # As httpx: the scheme's own variable before ALL_PROXY.
    key = next((k for k in (parsed.scheme, "all") if proxies.get(k)), None)
    if key is None or urllib.request.proxy_bypass(parsed.host):
        return None
    proxy = proxies[key]
    proxy = proxy if "://" in proxy else f"http://{proxy}"  # (httpx's default too)
    # Named as set: urllib takes the name in any case (the last set of them), and
    # the lower-case one before all others.
    lower = f"{key}_proxy"
    if os.environ.get(lower):
        return shown_url(proxy), lower
    names = [n for n, v in os.environ.items() if v and n.lower() == lower]
    return shown_url(proxy), names[-1] if names else lower.upper()


def _via_proxy(exc: httpx.RequestError, url: str, client: httpx.AsyncClient | None) -> str:
    """For a connect that failed: the proxy of the environment it was made to, if
    any. Its error names only the proxy's host (or not even that: "Name or service
    not known"), under the server's URL: it read as the server's own fault."""
    if client is None or not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return ""
    found = _env_proxy(client, url)
    if found is None:
        return ""
    proxy, variable = found
    return (
        f" (through the proxy {proxy} of {variable}: set NO_PROXY to the server's "
        "host, or pass trust_env=False, to connect to it directly)"
    )


# Said where a TLS server closed a fresh connection without a word: a TLS 1.3 one
# refuses a missing client certificate after the handshake (its alert unread), and
# a gRPC-only port closes on an HTTP/1.1 request.
_WANTS_CLIENT_CERT: Final = (
    "does the server want a client certificate (ssl_context_factory), or is it a gRPC-only port?"
)

#: Errors of requests sent on a kept-alive connection, one that had answered.
_ON_AN_ANSWERED_CONNECTION: Final[weakref.WeakSet[BaseException]] = weakref.WeakSet()

# httpx's errors of a connection lost (or found closed) under a request.
_CONNECTION_LOST: Final = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def _from_httpx(
    exc: httpx.RequestError, method: str, url: str, client: httpx.AsyncClient | None = None
) -> PocApiError:
    # httpx's messages quote the server's bytes (a bad header line, a bad chunk),
    # which may echo the key: out of them before they are cut, logged or raised.
    key_out = _call_redactor.get()
    text = _reason(exc, lambda reason: key_out(redact_url(reason)))
    # httpcore raises ConnectError and ConnectTimeout only while it opens the
    # connection (TCP, TLS, a proxy's tunnel), and PoolTimeout while it waits for
    # one: not a byte of the request was sent, so it is safe to send again, as a
    # refused gRPC connection is. Anything later may have reached the server.
    unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    via = _via_proxy(exc, url, client)
    if (
        isinstance(exc, httpx.ConnectTimeout)
        and client is not None
        and client.timeout.connect is not None
    ):
        # Named as the gRPC side names it: "timed out (ConnectTimeout)" said neither
        # which bound passed nor that no connection (TCP, TLS handshake) came up.
        return PocApiTimeout(
            f"{method} {url}: no connection within connect_timeout="
            f"{client.timeout.connect:g} s (TCP connect and TLS handshake; ConnectTimeout){via}",
            retriable=True,
        )
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout) and client is not None:
        # As the connect's: "timed out (ReadTimeout)" named no bound. A chat stream
        # whose server went quiet ends here: the client's timeout bounds each wait
        # for its next bytes (httpx's read timeout), not the stream.
        reading = isinstance(exc, httpx.ReadTimeout)
        bound = client.timeout.read if reading else client.timeout.write
        if bound is not None:
            what = (
                "no more bytes of the answer came"
                if reading
                else "the server took no more bytes of the request"
            )
            return PocApiTimeout(
                f"{method} {url}: {what} within timeout={bound:g} s "
                f"(a bound on each wait; {type(exc).__name__}){via}",
                retriable=unsent,
            )
    if isinstance(exc, httpx.TimeoutException):
        return PocApiTimeout(
            f"{method} {url}: timed out ({type(exc).__name__}){via}", retriable=unsent
        )
    if isinstance(exc, httpx.RemoteProtocolError):
        # h11 reports both "the peer went away" and "the peer sent garbage" this way.
        if any(s in text for s in ("disconnected", "closed connection", "incomplete")):
            # A TLS port drops a plaintext request it cannot read as a handshake
            # (Python's ssl, uvicorn's): closed, not a byte of an answer. (Not on
            # a connection that had answered: a keep-alive close racing the request.)
            hint = ""
            if "without sending a response" in text and exc not in _ON_AN_ANSWERED_CONNECTION:
                if url.startswith("http://"):
                    hint = " (is it a TLS port? then https://)"
                elif url.startswith("https://"):
                    hint = f" ({_WANTS_CLIENT_CERT})"
            return ServerUnavailable(f"{method} {url}: connection lost: {text}{hint}")
        if text.startswith("illegal request line"):
            # h11's words for an answer whose first byte is not text (it means the
            # status line): binary, as an HTTP/2-only port's SETTINGS frame is.
            # A TLS port answers a plaintext request with an alert record: binary too.
            tls_port = " (or a TLS port: then https://)" if url.startswith("http://") else ""
            return ServerUnavailable(
                f"{method} {url}: the server did not answer in HTTP/1.1 (binary bytes, "
                f"as an HTTP/2-only port or a TLS port's alert sends): "
                f"{IS_BASE_URL}a gRPC port?{tls_port}"
            )
        return ProtocolViolation(f"{method} {url}: malformed HTTP response: {text}")
    if isinstance(exc, httpx.DecodingError):
        return ProtocolViolation(f"{method} {url}: undecodable response body: {text}")
    if isinstance(exc, httpx.ConnectError) and alpn_refused(text):
        # A gRPC-only TLS port (grpc-go's, nginx's with only http2) ends the
        # handshake with this alert: it takes ALPN h2 alone.
        return ServerUnavailable(
            f"{method} {url}: the TLS server refused ALPN 'http/1.1' (a "
            f"no_application_protocol alert), as a gRPC-only port does: {IS_BASE_URL}a gRPC port?",
            retriable=True,
        )
    if isinstance(exc, httpx.ConnectError) and plaintext_peer(text):
        # (The classic cause: HTTPS_PROXY=https://... for a plaintext proxy. Looked
        # up here only: it reads the environment.)
        if via:
            text = (
                f"{text}: the proxy of the environment (HTTPS_PROXY, ALL_PROXY), or the "
                "server, did not answer in TLS: is the proxy's URL https:// for a "
                f"plaintext proxy (then http://), or {IS_BASE_URL}a plaintext port?"
            )
            via = ""  # (said)
        else:
            text = f"{text}: {PLAINTEXT_PEER}"
    if not text:
        # Every error down the chain is empty: trio's BrokenResourceError for a TLS
        # connection its peer closed has no words of its own.
        text = "the connection was closed, with no reason given (by the server?)"
        if url.startswith("https:") and exc not in _ON_AN_ANSWERED_CONNECTION:
            text += f"; {_WANTS_CLIENT_CERT}"  # (as for "without sending a response")
    # ConnectError, ReadError, WriteError, CloseError, ProxyError, ...
    return ServerUnavailable(f"{method} {url}: {type(exc).__name__}: {text}{via}", retriable=unsent)


#: Decoded bytes handed out per step of a compressed body: what bounds memory when
#: a few kilobytes on the wire say gigabytes (a gzip bomb).
_DECODE_PIECE: Final = 64 * 1024
#: What an event stream may open with (after a BOM and blank lines): a field
#: line or a comment, as every OpenAI-compatible server's first line is.
_SSE_START: Final = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*(?:data|event|id|retry)?:")
_BLANK: Final = b"\xef\xbb\xbf \t\r\n"
_SSE_FIELDS: Final = (b"data:", b"event:", b"id:", b"retry:")

#: The content-encodings asked for (``accept-encoding``) and decoded here.
_ACCEPT_ENCODING: Final = "gzip, deflate"


@final
class _DecodedBody:
    """A response's body, decoded as its ``content-encoding`` says, at most
    ``_DECODE_PIECE`` bytes per step (an async iterator; end one part-read with
    :func:`_finish_by_cancel`).

    httpx decodes each chunk read whole, so the size limits (``max_body``, the
    error excerpt's read) counted bytes only once a chunk had become gigabytes:
    1.8 KB of ``gzip, gzip`` took 2 GB. Here every layer's decompressor is given
    a cap per call and keeps the rest of its input for the next step.
    """

    def __init__(self, response: httpx.Response, what: str) -> None:
        self._raw = response.aiter_raw()
        listed = (
            e.strip().lower() for e in response.headers.get("content-encoding", "").split(",")
        )
        encodings = [e for e in listed if e and e != "identity"]
        # Raised by the first read, not here: the caller's cleanup (and an error
        # status's report) must come first, as for any other unreadable body.
        self._refused: ProtocolViolation | None = None
        for encoding in encodings:
            if encoding not in ("gzip", "x-gzip", "deflate"):
                self._refused = ProtocolViolation(
                    f"{what}: the response's content-encoding {encoding!r} was not asked "
                    f"for (accept-encoding: {_ACCEPT_ENCODING})"
                )
        # Outermost (last applied) first; each layer's pending input beside it.
        self._layers = [_Inflater(e, what) for e in reversed(encodings) if self._refused is None]
        self._eof = False

    def __aiter__(self) -> _DecodedBody:
        return self

    async def __anext__(self) -> bytes:
        if self._refused is not None:
            await trio.lowlevel.checkpoint()
            raise self._refused
        read = False  # has this step awaited the raw body (a schedule point)?
        while True:
            piece = self._step(0)
            if piece:
                if not read:
                    # Decoded from input already in hand: no I/O, so no trip through
                    # the scheduler. A few kilobytes on the wire inflate to gigabytes
                    # (a gzip bomb of blank lines or comments, which a chat stream
                    # reads on and on): without one here the reader held trio's
                    # thread for seconds, past every deadline and Ctrl-C. Shielded:
                    # a Cancelled here would leave httpx's generators suspended.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    if trio.current_effective_deadline() == -math.inf:
                        await self._cancelled()
                return piece
            if self._eof:
                raise StopAsyncIteration
            read = True
            try:
                raw = await self._raw.__anext__()
            except StopAsyncIteration:
                self._eof = True
                for layer in self._layers:
                    layer.finish()
                continue
            if not self._layers:
                return raw
            self._layers[0].feed(raw)

    async def _cancelled(self) -> NoReturn:
        """Raise the caller's cancellation, from the raw read where there is one.

        Decoding stops (the rest of a bomb would hold the cancel for as long). The
        raw reads raise it inside httpx's generators, finishing them; what they
        return meanwhile (buffered already, no checkpoint) is dropped, not handed
        out undecoded. At the body's end they are finished: raised here.
        """
        self.drop()
        while not self._eof:
            try:
                await self._raw.__anext__()
            except StopAsyncIteration:
                self._eof = True
        await trio.lowlevel.checkpoint()
        raise AssertionError("unreachable: a cancelled task's checkpoint raises")

    def _step(self, i: int) -> bytes:
        """Up to one piece out of layer ``i`` (feeding it from the layer before)."""
        if i == len(self._layers):
            return b""
        layer = self._layers[i]
        while True:
            out = layer.take(_DECODE_PIECE)
            if i + 1 == len(self._layers):
                return out
            if out:
                self._layers[i + 1].feed(out)
            nxt = self._step(i + 1)
            if nxt or not out:
                return nxt

    def plain(self) -> AsyncIterator[bytes] | None:
        """httpx's own iterator of the body when this one only passes its chunks on
        (no content-encoding, nothing read yet): reading it is reading this."""
        if self._layers or self._refused is not None or self._eof:
            return None
        return self._raw

    @property
    def truncated(self) -> ProtocolViolation | None:
        """The error of a body that ended inside a compressed stream, once read to there."""
        return next((layer.truncated for layer in self._layers if layer.truncated), None)

    def drop(self) -> None:
        """Decode no more: later steps only read the raw body on (to its end, or to
        the cancellation that stops it), so dropping a bomb costs no CPU."""
        self._layers = []
        self._refused = None


def _tracer(
    sent: Sent, reused: list[bool] | None = None
) -> Callable[[str, Mapping[str, Any]], Awaitable[None]]:
    """A request's ``trace`` (httpx's documented extension): marks ``sent`` once
    httpcore begins to write the request's headers (before that, nothing of it can
    have reached the server: a timeout then is retriable), and sets ``reused[0]``
    to False if it opens a new connection for it."""

    async def trace(event: str, info: Mapping[str, Any]) -> None:
        if event.endswith(".send_request_headers.started"):
            sent.mark()
        elif reused is not None and event.startswith("connection.connect_"):
            reused[0] = False

    return trace


def _timeout(message: str, sent: Sent | None) -> PocApiTimeout:
    """A timeout, retriable if ``sent`` says none of the call's requests went out."""
    if sent is not None and not sent.any:
        return PocApiTimeout(f"{message}; nothing was sent", retriable=True)
    return PocApiTimeout(message)


def _drop(chunks: AsyncIterator[bytes]) -> None:
    if isinstance(chunks, _DecodedBody):
        chunks.drop()


_GZIP_MAGIC: Final = b"\x1f\x8b"


@final
class _Inflater:
    """One content-encoding layer: input fed in, output taken in capped pieces."""

    def __init__(self, encoding: str, what: str) -> None:
        self._what = what
        self._deflate = encoding == "deflate"
        # deflate: zlib-wrapped as the RFC says, or raw as some servers send it
        # (httpx tries both too); decided by the first bytes.
        wbits = zlib.MAX_WBITS if self._deflate else zlib.MAX_WBITS | 16
        self._z = zlib.decompressobj(wbits)
        self._pending = b""
        self._started = False
        self._between = False  # gzip: a member has ended, no byte of the next came yet
        self._ended = False  # no more input will come
        self._flushed = False
        self._ignoring = False  # gzip: what followed a member was no member; ignored
        self.truncated: ProtocolViolation | None = None  # the input ended inside a stream

    def feed(self, data: bytes) -> None:
        if not self._ignoring:
            self._pending += data

    def finish(self) -> None:
        self._ended = True

    def take(self, limit: int) -> bytes:
        if self.truncated is not None:
            raise self.truncated
        try:
            while self._pending:
                if self._between:
                    # Zero padding after a member is skipped, as Python's gzip module does.
                    self._pending = self._pending.lstrip(b"\0")
                    if not self._pending:
                        break
                    if self._pending == _GZIP_MAGIC[:1] and not self._ended:
                        break  # the next member's magic, cut: wait for its second byte
                    if not self._pending.startswith(_GZIP_MAGIC):
                        # Not another member (a stray CRLF): ignored, as httpx does
                        # (and as what follows a deflate stream's end is).
                        log.debug("%s: ignoring bytes after the gzip body", self._what)
                        self._pending, self._ignoring = b"", True
                        break
                    self._between = False
                elif self._z.eof:  # deflate: what follows its end is ignored, as httpx does
                    self._pending = b""
                    break
                elif (
                    self._deflate
                    and not self._started
                    and len(self._pending) < 2
                    and not self._ended
                ):
                    # zlib takes a lone first byte and waits: the header check (zlib
                    # or raw?) needs both of its bytes.
                    break
                data, self._pending = self._pending, b""
                try:
                    out = self._z.decompress(data, limit)
                except zlib.error:
                    if not (self._deflate and not self._started):
                        raise
                    self._z = zlib.decompressobj(-zlib.MAX_WBITS)
                    out = self._z.decompress(data, limit)
                self._started = True
                self._pending = self._z.unconsumed_tail
                if self._z.eof and not self._deflate:
                    # A gzip body may be several members one after another (RFC 1952),
                    # each needing a decompressor of its own. All that follows this
                    # one is in unused_data (unconsumed_tail may repeat some of it).
                    self._pending = self._z.unused_data
                    self._z = zlib.decompressobj(zlib.MAX_WBITS | 16)
                    self._between = True
                if out:
                    return out
                if not self._pending:
                    if not self._ended:
                        return out  # (b"" says: nothing until more input)
                    break  # all of it in: was it whole? (a lone first byte, say)
            if self._ended and not self._flushed:
                self._flushed = True
                out = self._z.flush()  # (bounded: what the window still holds)
                if self._started and not self._between and not self._z.eof:
                    # A body cut short (in a member, or before its checksum) must
                    # not pass for a whole one. What it held before the cut comes
                    # first: a reader whose body's end is the connection's close
                    # (ChatStream) may count it, as it counts a plain body's.
                    self.truncated = ProtocolViolation(
                        f"{self._what}: undecodable response body: it ends inside "
                        f"its {'deflate' if self._deflate else 'gzip'} stream (truncated)"
                    )
                    if not out:
                        raise self.truncated
                return out
            return b""
        except zlib.error as exc:
            raise ProtocolViolation(f"{self._what}: undecodable response body: {exc}") from exc


async def _finish_by_cancel(chunks: AsyncIterator[bytes]) -> None:
    """End a body iterator left part-read, and every async generator under it.

    Its ``aclose()`` would end the outer generator only: httpx's and httpcore's
    generators nested under it (six of them) would stay suspended at their
    ``yield``, for the garbage collector and trio's finalizer (a ResourceWarning
    each; an error under ``-W error``). Resumed in a cancelled scope instead, the
    innermost one's next read raises ``Cancelled``, which runs through each of them
    and finishes it, as in :meth:`HttpApi._read_body`. What httpx had already
    buffered comes first: a bounded amount, dropped.
    """
    _drop(chunks)
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            while True:
                await chunks.__anext__()
        except StopAsyncIteration:
            pass
        except Exception as exc:  # the read's own error: the body is being dropped
            log.debug("a body dropped part-read ended with %r", exc)


def _decode_json(body: bytes, what: str, redact: Callable[[str], str] = str) -> Any:
    try:
        # utf-8-sig: a byte order mark first is dropped (RFC 8259 lets a parser).
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation(f"{what}: body is not UTF-8 ({exc.reason})") from exc
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        # A web page where JSON was due (a proxy's sign-in page, a base_url that
        # points at a web site) is told by its title, not by a JSON parse error.
        # Redacted before the cut (a key across it would leave its first part);
        # twice the scan: no key is that long. A page that echoes the key often
        # shrinks as it is redacted: the cut's first part of a key could come
        # within the scan, so the cut goes further until it cannot.
        cut = 2 * _HTML_SCAN
        scanned = redact(text[:cut])
        while len(scanned) < 2 * _HTML_SCAN and cut < len(text):
            cut *= 2
            scanned = redact(text[:cut])
        page = _html_summary(scanned[:_HTML_SCAN])
        if page is not None:
            raise ProtocolViolation(
                f"{what}: expected JSON, got {page} ({IS_BASE_URL}right?)"
            ) from exc
        if _SSE_START.match(body, 0, _HTML_SCAN):
            # A server (or gateway) that streams whatever "stream": false said:
            # "Expecting value: line 1 column 1" told nothing of what came.
            raise ProtocolViolation(
                f"{what}: expected JSON, got an event stream ('data: ...' lines)"
            ) from exc
        raise ProtocolViolation(f"{what}: {_json_error(exc)}") from exc


def _json_error(exc: ValueError | RecursionError) -> str:
    """Why ``json.loads`` failed. Besides ``JSONDecodeError`` it raises ``ValueError``
    for an integer of over 4300 digits (Python's int-str limit) and
    ``RecursionError`` for deep nesting: peer input, so all three are caught."""
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON: {exc}"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply to parse"
    return f"unparseable JSON: {exc}"


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape_error(what: str, expected: str, got: object) -> NoReturn:
    raise ProtocolViolation(f"{what}: expected {expected}, got {_short_repr(got)}")


def _unencodable(exc: UnicodeEncodeError) -> str:
    bad = exc.object[exc.start : exc.end]
    return f"a string holds {bad!r} (a lone surrogate), which UTF-8 cannot encode"


def _short_repr(value: object, limit: int = 200) -> str:
    # The key out before the cut: a key across it would leave its first part,
    # which no redaction after the cut recognises.
    text = _call_redactor.get()(repr(value))
    return text if len(text) <= limit else text[:limit] + "..."


class _Redacts(Protocol):
    def _redact(self, text: str) -> str: ...


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _redacting(fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Where an HTTP call leaves the library: the key out of its error's message,
    and out of the messages of the errors under it (:func:`_redact_chain`).

    For methods of an object with ``_redact``. Messages quote the server's answers
    (a shape error, a model list); a server that echoes the request's headers back
    would put the key in them.
    """

    @functools.wraps(fn)
    async def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        redact = cast(_Redacts, args[0])._redact
        token = _call_redactor.set(redact)  # for the excerpts made during the call
        outer = sys.exception()  # the caller's, if it calls from an except block
        try:
            return await fn(*args, **kwargs)
        except (PocApiError, ValueError) as exc:
            _redact_chain(exc, redact, stop=outer)
            raise
        finally:
            _call_redactor.reset(token)

    return call


def _redact_chain(
    exc: BaseException, redact: Callable[[str], str], *, stop: BaseException | None = None
) -> None:
    """``redact`` the message of ``exc`` and of each exception down its chain of
    causes: a traceback shows them all, and httpx's, h11's and httpcore's quote
    the server's bytes as they came (an echoed key in a bad header line).

    Only down to ``stop`` (the exception the caller was handling when it called:
    the chain goes on into the caller's own), and only exceptions of poc_api and
    the HTTP stack under it: another's ``args`` are its owner's to read.
    """
    for cause in _chain(exc, stop):
        if type(cause).__module__.partition(".")[0] in _REDACTED_MODULES:
            text = str(cause)
            clean = redact(text)
            if clean != text:
                cause.args = (clean,)
                if isinstance(cause, PocApiError):
                    cause.message = clean  # what its str() shows


# Whose exceptions _redact_chain rewrites: those raised for an HTTP call.
_REDACTED_MODULES: Final = frozenset({"poc_api", "httpx", "httpcore", "h11", "builtins"})


def _parse_usage(value: object, what: str) -> Usage | None:
    """Usage from a response, tolerantly: a completion is worth more than its accounting.

    Missing counts are 0 and a missing ``total_tokens`` is the sum of the other two
    (some servers leave it out); a usage that is not an object of integer counts is
    logged and dropped rather than failing a completion that did arrive.
    """
    if value is None:
        return None
    counts: dict[str, int] = {}
    if isinstance(value, dict):
        for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
            n = value.get(field)
            if n is None:
                continue
            if isinstance(n, float) and n.is_integer():
                n = int(n)
            if not _is_int(n) or n < 0:
                counts.clear()
                break
            counts[field] = n
    if not counts:
        # Not the value itself: it is the server's, and may echo anything back.
        log.debug("%s: ignoring a usage that is not an object of integer counts", what)
        return None
    prompt = counts.get("prompt_tokens", 0)
    completion = counts.get("completion_tokens", 0)
    return Usage(prompt, completion, counts.get("total_tokens", prompt + completion))


# ``scheme://user:password@host``: the password is a credential. It may hold a
# raw "@" (httpx, as browsers, takes the authority's last one as its end).
_URL_PASSWORD: Final = re.compile(r"(?P<user>//[^/?#@:\s]*):(?:[^/?#@\s]|@(?=[^/?#\s]*@))*@")


def redact_url(text: str) -> str:
    """``text`` with the password of every ``//user:password@`` in it replaced by ``***``.

    >>> redact_url("http://me:s3cret@h:8000/v1")
    'http://me:***@h:8000/v1'
    """
    return _URL_PASSWORD.sub(r"\g<user>:***@", text)


def shown_url(url: str) -> str:
    """One URL as a message or a repr may show it: its password ``***``, whatever it holds.

    :func:`redact_url` reads free text, where a URL ends at whitespace; here the
    whole string is the URL, so a password with a raw space is hidden too, and
    one with a raw "/", "?" or "#" (which ends the host part early: the URL is
    then invalid, or, with digits before it, a port and a path) is hidden up to
    the string's last "@". (A valid URL with an "@" in its path after a port is
    shown cut so too: better than a password shown.)

    >>> shown_url("http://me:s3 cret@h:8000/v1")
    'http://me:***@h:8000/v1'
    """
    span = _password_span(url)
    if span is None:
        return redact_url(url)
    return f"{url[: span[0]]}***{url[span[1] :]}"


def url_password(url: str) -> str:
    """The raw password :func:`shown_url` hides ("" if none)."""
    span = _password_span(url)
    return "" if span is None else url[span[0] : span[1]]


def _password_span(url: str) -> tuple[int, int] | None:
    """Where a whole URL's password lies: after ``scheme://user:``, up to the
    string's last "@" (``None`` without such a password)."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return None
    at = url.rfind("@", scheme.end())
    colon = url.find(":", scheme.end(), at) if at >= 0 else -1
    return None if colon < 0 else (colon + 1, at)


_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")

# The ``scheme://`` and the userinfo after it, up to the authority's last "@".
_USERINFO: Final = re.compile(r"^(?P<scheme>[^:/?#]+://)[^/?#]*@")


def _split_userinfo(url: str) -> tuple[str, httpx.BasicAuth | None]:
    """``url`` without its ``user:password@``, and the Basic auth httpx makes of it.

    >>> _split_userinfo("http://me:s3cret@h:8000/v1")[0]
    'http://h:8000/v1'
    """
    if _USERINFO.match(url) is None:
        return url, None
    parts = httpx.URL(url)  # (percent-decoded as httpx decodes them for its auth)
    bare = _USERINFO.sub(r"\g<scheme>", url, count=1)
    if not parts.username and not parts.password:
        return bare, None  # "http://@h": httpx sends no auth for it either
    return bare, httpx.BasicAuth(parts.username, parts.password)


# Characters of a bearer token (RFC 6750 b64token, less the trailing "=").
_TOKEN_CHARS: Final = r"A-Za-z0-9\-._~+/"


def _key_forms(api_key: str) -> dict[str, None]:
    """``api_key`` as it may be echoed: itself, and as a JSON string shows it ('"'
    and '\\' escaped; '/' as '\\/' by some servers; Go's '&', '<', '>' as
    \\u0026...): an error body that echoes the key is JSON, quoted as it came."""
    in_json = json.dumps(api_key)[1:-1]
    in_go = in_json.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return dict.fromkeys(
        [api_key, *(f for js in (in_json, in_go) for f in (js, js.replace("/", "\\/")))]
    )


def key_redactor(api_key: str) -> Callable[[str], str]:
    """A function that replaces ``api_key`` (in any case) in a message with ``<redacted>``.

    A key of 8 characters or more is replaced wherever it appears. A shorter one
    only where it stands alone (not inside a longer token): "ab" would otherwise
    turn every "table" into "t<redacted>le".

    >>> key_redactor("sk-123456")("bad key sk-123456")
    'bad key <redacted>'
    """
    if not api_key:
        return _unchanged
    forms = _key_forms(api_key)
    key = "|".join(re.escape(form) for form in sorted(forms, key=len, reverse=True))
    if len(forms) > 1:
        key = f"(?:{key})"
    if len(api_key) < 8:
        key = rf"(?<![{_TOKEN_CHARS}]){key}(?![{_TOKEN_CHARS}])"
    # A key with "<" or ">" could form again across "<redacted>" and its
    # neighbours; keys are ASCII, so the angle quotes U+2039/U+203A take no part.
    mark = "<redacted>"
    if "<" in api_key or ">" in api_key or api_key.lower() in mark:
        mark = "\u2039***\u203a" if api_key.lower() in "redacted" else "\u2039redacted\u203a"
    # In any case: a message may quote what it says lower-cased (a header value).
    return functools.partial(re.compile(key, re.IGNORECASE).sub, mark)


def _unchanged(text: str) -> str:
    return text


#: The redactor of the HttpApi call running in this task (set by ``_redacting``),
#: for the excerpts of a server's answer that module functions make.
_call_redactor: ContextVar[Callable[[str], str]] = ContextVar(
    "poc_api_http_redactor", default=_unchanged
)


_T = TypeVar("_T")


@final
class _Attempt:
    """One run of a :class:`_SharedFetch`'s fetch, awaited by the callers that came
    while it ran. ``error`` stays ``None`` when it ended without a value or an error
    of its own (its caller was cancelled)."""

    __slots__ = ("done", "error", "traceback")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: Exception | None = None
        self.traceback: TracebackType | None = None


@final
class _SharedFetch(Generic[_T]):
    """A value fetched once and cached, one attempt at a time shared by every caller.

    The first caller runs ``fetch``; callers that arrive while it runs wait for that
    same attempt and get its value or its error (one request, not one each in
    turn). A failure is not cached: a caller arriving after the attempt ended
    starts a new one. An attempt cut short by its own caller's cancellation (or
    Ctrl-C) has no answer to share: one of its waiters starts a new attempt, the
    others wait for that one. :meth:`get` is always a checkpoint.
    """

    __slots__ = ("_attempt", "_fetch", "_value", "fetched")

    def __init__(self, fetch: Callable[[], Awaitable[_T]]) -> None:
        self._fetch = fetch
        self._attempt: _Attempt | None = None
        self._value: _T | None = None
        self.fetched = False

    def cached(self) -> _T | None:
        """The value fetched, if one was (no I/O, no checkpoint)."""
        return self._value if self.fetched else None

    def forget(self) -> None:
        """Drop the value fetched: the next :meth:`get` fetches again."""
        self._value, self.fetched = None, False

    async def get(self) -> _T:
        while True:
            if self.fetched:
                await trio.lowlevel.checkpoint()
                return cast(_T, self._value)
            attempt = self._attempt
            if attempt is None:
                return await self._run()
            await attempt.done.wait()
            if attempt.error is not None:
                # Every waiter raises a copy of the attempt's error (its own context
                # and traceback), from where it was raised (as asyncio's
                # Future.result() does), not from its grown traceback.
                raise own_copy(attempt.error).with_traceback(attempt.traceback)

    # Protected: a Ctrl-C between making the attempt and the try, or between
    # forgetting it and telling its waiters, would leave every later caller (or
    # the waiters) waiting for ever; it comes at the next checkpoint instead.
    @trio.lowlevel.enable_ki_protection
    async def _run(self) -> _T:
        attempt = self._attempt = _Attempt()
        try:
            value = await self._fetch()
        except Exception as exc:
            attempt.error, attempt.traceback = exc, exc.__traceback__
            raise
        finally:
            self._attempt = None
            attempt.done.set()
        self._value, self.fetched = value, True
        return value


#: Token ids of a train() batch encoded between two checkpoints (a few ms of work).
_TRAIN_SLICE_TOKENS: Final = 20_000

_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@final
@attrs.frozen
class _Encoded:
    """A JSON request body encoded already (as httpx's ``json=`` would: compact, UTF-8)."""

    body: bytes


async def _train_body(model: str, samples: Sequence[TrainSample]) -> bytes:
    """The ``POST /train`` body, a sample at a time with a checkpoint every
    :data:`_TRAIN_SLICE_TOKENS` ids: encoded at once (httpx's ``json=``), 20,000
    samples of 100 tokens held the run for half a second, every stream and deadline
    of the program standing still. A checkpoint only when it yields: a small batch
    is encoded as before."""
    parts = []
    since = 0
    for s in samples:
        ranges = [[a, b] for a, b in s.target_ranges]
        parts.append(
            _dumps({"tokens": list(s.tokens), "target_ranges": ranges, "weight": s.weight})
        )
        since += len(s.tokens) + len(ranges)
        if since >= _TRAIN_SLICE_TOKENS:
            since = 0
            await trio.lowlevel.checkpoint()
    return f'{{"model":{_dumps(model)},"samples":[{",".join(parts)}]}}'.encode()


@final
class _RequestBody(httpx.ByteStream):
    """A request body (as httpx's ``ByteStream``) whose async iterator is a plain
    object, not an async generator.

    httpx's own ``__aiter__`` is one: a send cancelled midway (a timeout, the
    caller's cancel) leaves it unfinished, and trio's finaliser warns when the
    garbage collector finds it (``ResourceWarning: Async generator ... was garbage
    collected``; an error under ``-W error``). A ByteStream, so httpx never swaps
    it for one of its own.
    """

    def __init__(self, content: bytes) -> None:
        super().__init__(content)
        self._content = content

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _OneChunk(self._content)


@final
class _OneChunk:
    """An async iterator of one chunk."""

    __slots__ = ("_chunk",)

    def __init__(self, chunk: bytes) -> None:
        self._chunk: bytes | None = chunk

    def __aiter__(self) -> _OneChunk:
        return self

    async def __anext__(self) -> bytes:
        chunk, self._chunk = self._chunk, None
        if chunk is None:
            raise StopAsyncIteration
        return chunk


def _check_messages(messages: object) -> list[dict[str, Any]]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a sequence of dicts, not {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a mapping, not {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise TypeError(f"messages[{i}]['role'] must be a str")
        if not role:
            raise ValueError(f"messages[{i}]['role'] must not be empty")
        content = message.get("content")
        if content is None and role == "assistant":
            pass  # a tool-call turn: OpenAI allows (and sends back) a null content
        elif "content" not in message:
            raise ValueError(f"messages[{i}] has no 'content'")
        elif not isinstance(content, str | list):
            raise TypeError(f"messages[{i}]['content'] must be a str or a list of parts")
        out.append(dict(message))
    return out


def _check_number(name: str, value: object, low: float, high: float) -> float:
    try:
        number = as_float(name, value, "a number")  # (a numpy float32 is not JSON's)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or not low <= number <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return number


@final
class _CallSlots:
    """Counts an HttpApi's calls in flight against its ``max_calls`` (None: no bound)."""

    __slots__ = ("_limit", "in_flight")

    def __init__(self, limit: int | None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"max_calls must be an int or None, not {type(limit).__name__}")
        if limit is not None and limit < 1:
            raise ValueError(f"max_calls must be >= 1, got {limit}")
        self._limit = limit
        self.in_flight = 0

    def held(self, method: str, shown: str) -> _CallSlot:
        """One slot for a call, as a ``with`` block; ``LimitExceeded`` if none is free."""
        if self._limit is not None and self.in_flight >= self._limit:
            raise LimitExceeded(
                f"{method} {shown}: {self.in_flight} HTTP calls of this client are in "
                f"flight (chat streams until their block ends), and max_http_connections "
                f"= {self._limit}: raise it, or bound your concurrency (a "
                "trio.CapacityLimiter) to wait instead"
            )
        self.in_flight += 1
        return _CallSlot(self)


@final
class _CallSlot:
    """One call's slot (see :class:`_CallSlots`), given back once, on leaving its block."""

    __slots__ = ("_slots",)

    def __init__(self, slots: _CallSlots) -> None:
        self._slots: _CallSlots | None = slots

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc_info: object) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.in_flight -= 1


def _closed_under_request(exc: httpx.TransportError) -> bool:
    """Did the server close the connection before answering (no status line came)?

    A close with nothing read ("Server disconnected without sending a response"),
    or a reset (ECONNRESET, or EPIPE writing): a server closing a connection whose
    request it has not read answers with RST.
    """
    if isinstance(exc, httpx.RemoteProtocolError):
        return "without sending a response" in str(exc)
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionResetError | BrokenPipeError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


@final
class HttpApi:
    """The HTTP endpoints of one server, over a caller-owned ``httpx.AsyncClient``.

    ``ApiClient`` builds one per client; the readout manifest is cached on it.

    Args:
        client: the httpx client (its timeouts apply to every request).
        base_url: the HTTP root without a trailing ``/``, e.g. ``http://h:8000/v1``.
        api_key: sent as ``authorization: Bearer <key>`` when not empty.
        model: the model name sent with ``/train`` and ``/chat/completions``.
        max_body: the largest response body accepted, in bytes.
        timeout: seconds each request may take as a whole -- sending, the response
            headers and the whole body -- or, for :meth:`chat_stream`, until the
            response headers have arrived; past it :class:`~poc_api.PocApiTimeout`.
            ``None``: no bound but the httpx client's own, which are per socket
            operation (a server trickling its answer a byte at a time never
            trips them).

    Every coroutine is a checkpoint. Cancelling one abandons its request: httpx
    closes the connection it was using, the pool stays usable, nothing is cached.

    A GET, ``/tokenize`` or ``/detokenize`` that the server answers by closing (or
    resetting) the pooled keep-alive connection it was sent on (its idle timeout
    racing the request) is sent once more, on another connection (logged at
    debug). Other requests (chat, train) are never sent twice.

    Example::

        async with httpx.AsyncClient() as http:
            api = HttpApi(http, "http://127.0.0.1:8000/v1", "", "model")
            manifest = await api.readout_manifest()
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        api_key: str,
        model: str,
        *,
        max_body: int = 64 * 1024 * 1024,
        timeout: float | None = None,
        max_calls: int | None = None,
    ) -> None:
        self._timeout = check_timeout("timeout", timeout)
        # Calls in flight, each holding one of httpx's pooled connections (a chat
        # stream for its whole block): one past ``max_calls`` raises LimitExceeded
        # instead of waiting, unseen, in httpx's pool for a connection to come free.
        self._calls = _CallSlots(max_calls)
        if isinstance(max_body, bool) or not isinstance(max_body, int):
            raise TypeError(f"max_body must be an int, not {type(max_body).__name__}")
        if max_body < 1:
            raise ValueError(f"max_body must be positive, got {max_body}")
        self._client = client
        self._max_body = max_body
        # httpx logs every request's URL (at INFO): a user:password@ in it would be
        # in the application's logs. httpx gets the URL without it, and its
        # credentials as the Basic auth httpx would have made of them (none when
        # the key's Bearer header is sent instead).
        self._base_url, self._url_auth = _split_userinfo(base_url)
        if api_key:
            self._url_auth = None
        # What error messages and logs show: never a password from the URL.
        self._shown = shown_url(base_url)
        self._api_key = api_key
        self._redact_key = key_redactor(api_key)
        self._model = model
        self._manifest = _SharedFetch(self._fetch_manifest)
        self._served_model = _SharedFetch(self._fetch_served_model)  # when model is ""
        # Sends in flight, which aclose() ends before it closes httpx's client.
        self._sending: set[trio.CancelScope] = set()
        self._sends_ended: trio.Event | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"<HttpApi {self._shown} model={self._model!r}>"

    # -- plumbing ------------------------------------------------------------------

    def _build_request(
        self, method: str, url: str, payload: object, accept: str = "application/json"
    ) -> httpx.Request:
        if isinstance(payload, _Encoded):
            headers = {**self._headers(accept), "content-type": "application/json"}
            request = self._client.build_request(method, url, headers=headers, content=payload.body)
        else:
            request = self._client.build_request(
                method, url, headers=self._headers(accept), json=payload
            )
        request.stream = _RequestBody(request.content)  # see _RequestBody
        # The URL's credentials, where httpx would have sent them: an auth of the
        # client's own comes first (it runs after this, at send).
        if self._url_auth is not None and self._client.auth is None:
            request = next(self._url_auth.auth_flow(request))
        return request

    async def _send(
        self, method: str, url: str, shown: str, payload: object, *, idempotent: bool, sent: Sent
    ) -> httpx.Response:
        """Send a JSON request; return its response unread (the caller closes it).
        ``sent`` is marked once the request begins to go out (see :func:`_tracer`).

        An ``idempotent`` request (a GET, or a POST of :data:`_PURE_POSTS`) that went
        out on a reused keep-alive connection just as the server closed it (its
        idle timeout racing the request: "Server disconnected without sending a
        response", or a reset where the close found the request unread) is sent
        once more. The pool has dropped that connection, and before reusing an
        idle one httpx drops it if the server has closed it, so the second try
        goes out on a live connection, most often a new one. Anything else is
        never sent twice.
        """
        reused = [True]
        request = self._build_request(method, url, payload)
        request.extensions["trace"] = _tracer(sent, reused)
        try:
            return await self._send_owned(request, reused)
        except _CONNECTION_LOST as exc:
            if not idempotent or not reused[0] or not _closed_under_request(exc):
                raise
            log.debug("%s %s: a reused connection closed under it; sending it again", method, shown)
        request = self._build_request(method, url, payload)
        request.extensions["trace"] = _tracer(sent)
        # On a new connection, maybe, but the server had answered on this URL (the
        # first try's connection).
        return await self._send_owned(request, [True])

    async def _send_owned(
        self, request: httpx.Request, answered: list[bool] | None = None
    ) -> httpx.Response:
        """``client.send(request, stream=True)``, which :meth:`aclose` can end.

        Ended so, it raises ``trio.ClosedResourceError``. (Closing httpx's client
        alone does not end a send whose connection is still being opened: the
        pool's close skips it, the request then goes out and succeeds, and the
        new connection is left open, out of any pool, until the process exits.)

        ``answered[0]`` (a :func:`_tracer`'s ``reused``): whether the request went
        out where the server had answered already; a connection lost under it
        then gets no TLS-port hint (:func:`_from_httpx`).
        """
        if self._closing:
            await trio.lowlevel.checkpoint()
            raise closed_under_call()
        scope = trio.CancelScope()
        self._sending.add(scope)
        try:
            with scope:
                return await self._client.send(request, stream=True)
        except _CONNECTION_LOST as exc:
            if answered is not None and answered[0]:
                _ON_AN_ANSWERED_CONNECTION.add(exc)
            raise
        finally:
            self._sending.discard(scope)
            if not self._sending and self._sends_ended is not None:
                self._sends_ended.set()
        raise closed_under_call()  # (reached only when aclose() cancelled it)

    async def aclose(self) -> None:
        """End the sends in flight (``trio.ClosedResourceError``), then close httpx's
        client, which ends the reads of the answers already begun."""
        self._closing = True
        # Bounded: a send ends at its next checkpoint, but a close must never hang.
        with trio.CancelScope(relative_deadline=_CLOSE_TIMEOUT):
            while self._sending:
                ended = self._sends_ended = trio.Event()
                for scope in self._sending:
                    scope.cancel()
                await ended.wait()
        await self._client.aclose()

    def _headers(self, accept: str = "application/json") -> dict[str, str]:
        # Only what _DecodedBody decodes a piece at a time (httpx would add br and
        # zstd when their packages are installed, decoded whole).
        headers = {"accept": accept, "accept-encoding": _ACCEPT_ENCODING}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        return headers

    def _redact(self, text: str) -> str:
        text = redact_url(text)
        return self._redact_key(text)

    def call_name(self, name: str, method: str, path: str) -> str:
        """``name`` and the request it makes, as messages show them (a timeout's)."""
        return f"{name} ({method} {self._shown}{path})"

    def chat_call_name(self, name: str, model: str | None) -> Callable[[], str]:
        """:meth:`call_name` of a chat call, told when it is needed: without a model
        to name, the call first asks ``GET /models``, and a timeout that passes
        there must name that request, not the chat request never sent."""

        def named() -> str:
            # (A call's model="" names the server's default, not the client's model.)
            if model or (model is None and self._model) or self._served_model.fetched:
                return self.call_name(name, "POST", "/chat/completions")
            return f"{name} (GET {self._shown}/models, to find the model to name: {NO_MODEL_SET})"

        return named

    def _time_limit(self) -> float:
        return math.inf if self._timeout is None else self._timeout

    def _timed_out(
        self, method: str, shown: str, what: str, sent: Sent | None = None
    ) -> PocApiTimeout:
        """The client's ``timeout`` passed; retriable if ``sent`` says nothing went out
        (the connection was still being opened)."""
        assert self._timeout is not None
        return _timeout(f"{method} {shown}: {what} within {self._timeout:g} s (timeout)", sent)

    def _clean(self, body: bytes, *, whole: bool) -> str:
        """``body`` as text with the key redacted from all of it: redacted after a
        cut (the excerpt's, an HTML page's scan), a key across it left its first part.

        ``whole=False`` (a body read only in part) also drops a first part of the
        key at its end, which the redactor cannot recognise -- in any case, as the
        redactor matches the key. Undecodable bytes are kept (surrogateescape).
        """
        text = self._redact(body.decode("utf-8", "surrogateescape"))
        if not whole and self._api_key:
            # In any of the forms the redactor matches (a JSON echo's "\\/" too).
            cut = 0
            for form in _key_forms(self._api_key.lower()):
                for n in range(min(len(form) - 1, len(text)), cut, -1):
                    if text[-n:].lower() == form[:n]:
                        cut = n
                        break
            if cut:
                text = text[:-cut]
        return text

    def _said(self, body: bytes) -> str | None:
        """The message of a JSON error body (OpenAI's ``{"error": {"message"}}``,
        vLLM's flat one, FastAPI's ``{"detail"}``), redacted and cut as an
        excerpt; ``None`` when it has none (the excerpt of the body says it)."""
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
            return None
        error = _error_object(data, "")
        if error is None and isinstance(data, dict):
            error = data.get("detail")
        if isinstance(error, dict):
            error = error.get("message")
        if not isinstance(error, str) or not error.strip():
            return None
        # backslashreplace: JSON may carry a lone surrogate (half an emoji), which
        # no UTF-8 encodes; it shows as \ud800.
        return error_excerpt(self._redact(error).encode("utf-8", "backslashreplace"))

    def _status_error(
        self,
        method: str,
        url: str,
        status: int,
        body: bytes,
        cut: PocApiError | None = None,
        *,
        headers: httpx.Headers | None = None,
    ) -> PocApiError:
        """The error for an error status (401/403: ``AuthenticationError``), with an
        excerpt of ``body``; ``cut`` is the error that cut the body's read short
        (raise this one from it); ``headers``: the answer's (a redirect's
        ``Location``, a ``Retry-After``)."""
        location = headers.get("location") if headers is not None else None
        # Error bodies are read up to _ERROR_BODY_READ_LIMIT: one that long may go on.
        whole = cut is None and len(body) < _ERROR_BODY_READ_LIMIT
        # surrogateescape: the bytes come back unchanged for error_excerpt's cut.
        clean = self._clean(body, whole=whole).encode("utf-8", "surrogateescape")
        excerpt = error_excerpt(clean)
        said = self._said(body) if whole else None
        if said is None:  # (a page's title, not its markup; redacted as the excerpt)
            said = _html_summary(clean.decode("utf-8", "replace")[:_HTML_SCAN])
        detail = said or excerpt
        message = f"HTTP {status} from {method} {redact_url(url)}" + (
            f": {detail}" if detail else " (an empty body)"
        )
        if location is not None and 300 <= status < 400:
            # Redirects are not followed (a POST's body would be lost, or the key
            # sent elsewhere): say where it pointed, mostly a base_url to fix.
            target = error_excerpt(self._redact(redact_url(location)).encode(), limit=200)
            message = (
                f"HTTP {status} from {method} {redact_url(url)}: a redirect to {target!r}, "
                f"not followed ({IS_BASE_URL}right?){': ' + detail if detail else ''}"
            )
        if cut is not None:
            message = f"{message.rstrip()} [body cut short: {type(cut).__name__}]"
        if status in (401, 403):
            return AuthenticationError(message, http_status=status)
        return HttpError(
            message,
            http_status=status,
            url=redact_url(url),
            body_excerpt=excerpt,
            retry_after=retry_after(headers.get("retry-after")) if headers is not None else None,
        )

    # KI-protected: httpx and httpcore run trio.fail_after and move_on_after, whose
    # @contextmanager a Ctrl-C can tear in half ("Cancel scope stack corrupted").
    # Protected, the Ctrl-C comes at the next checkpoint instead, as in trio's own code.
    @trio.lowlevel.enable_ki_protection
    async def _request(
        self,
        method: str,
        path: str,
        payload: object = None,
        *,
        manifest: bool = False,
        expect: str | None = None,
    ) -> Any:
        """Send one JSON request; return the decoded JSON body. With ``manifest``
        (PROTOCOL.md section 5), a 404 returns ``_ABSENT`` and any status but 200
        and 404 is an error, a 2xx too. ``expect``: the key the answer's object
        must have; an object without it that carries an error object (a server
        that answers 200 with its error) raises :class:`HttpError` with the
        server's message, as the manifest's and chat's answers do."""
        url = self._base_url + path
        shown = self._shown + path
        log.debug("%s %s", method, shown)
        started = time.monotonic()
        cut: PocApiError | None = None  # what cut an error body's read short
        sent = Sent(BLOCK_SENT.get())  # (marks the public call's block too)
        # httpx's timeouts bound each socket operation, not the request: a server
        # trickling its answer a byte at a time would hold the caller forever.
        with (
            self._calls.held(method, shown),
            trio.CancelScope(relative_deadline=self._time_limit()) as scope,
        ):
            with _map_httpx_errors(method, shown, self._client):
                idempotent = method == "GET" or path in _PURE_POSTS
                response = await self._send(
                    method, url, shown, payload, idempotent=idempotent, sent=sent
                )
                try:
                    if response.is_success:
                        body = await self._read_body(response, f"{method} {shown}")
                    else:
                        body, cut = await self._read_error_body(
                            response, method, shown, within=scope
                        )
                finally:
                    await response.aclose()
        if scope.cancelled_caught:
            raise self._timed_out(method, shown, "no complete answer", sent)
        log.debug(
            "%s %s -> %d (%d bytes, %.1f ms)",
            method,
            shown,
            response.status_code,
            len(body),
            (time.monotonic() - started) * 1000,
        )
        if manifest and response.status_code == 404:
            return _ABSENT  # (not None: that is a JSON null)
        if not response.is_success or (manifest and response.status_code != 200):
            raise self._status_error(
                method,
                shown,
                response.status_code,
                body,
                cut,
                headers=response.headers,
            ) from cut
        if not body.strip(b" \t\r\n"):
            # (Not "malformed JSON: Expecting value": a 204, or a 200 with nothing.)
            raise ProtocolViolation(
                f"{method} {shown}: HTTP {response.status_code} with an empty body, "
                "where a JSON answer was due"
            )
        data = _decode_json(body, f"{method} {shown}", self._redact)
        # (Absent, or null beside the error: a server writing every field of its
        # answer, as Go's encoding/json without omitempty does.)
        if expect is not None and isinstance(data, dict) and data.get(expect) is None:
            error = _error_object(data, "")
            if error is not None:  # (the server's own words, and its code as the status)
                raise self._server_error(
                    shown, response_status=response.status_code, error=error, method=method
                )
        return data

    async def _read_error_body(
        self,
        response: httpx.Response,
        method: str,
        shown: str,
        chunks: AsyncIterator[bytes] | None = None,
        *,
        within: trio.CancelScope | None = None,
    ) -> tuple[bytes, PocApiError | None]:
        """An error answer's body, as much of it as could be read in time, and the
        error that cut the read short (``None`` if none did).

        The status line did arrive: a body lost on the way (a dropped connection,
        a broken gzip encoding, a timeout) must not turn a 503 into a status-less
        error. ``within`` is the scope of the client's timeout, which bounds the
        answer; the public call's own ``timeout=`` around it (:func:`call_scopes`)
        bounds it too. The time they have left goes to the body, so that running
        out cuts the body, not the answer. (Their deadlines are taken from them
        meanwhile: of two cancelled scopes, the outer one would catch it. They get
        them back unless the time ran out.)
        """
        scopes = ([] if within is None else [within]) + list(call_scopes())
        deadlines = [scope.deadline for scope in scopes]
        deadline = min(deadlines, default=math.inf)
        for scope in scopes:
            scope.deadline = math.inf
        received = bytearray()
        with trio.CancelScope(deadline=deadline) as reading:
            try:
                with _map_httpx_errors(method, shown, self._client):
                    await self._read_body(response, f"{method} {shown}", chunks, into=received)
            except PocApiError as exc:
                log.debug("%s %s: error body cut short: %s", method, shown, self._redact(str(exc)))
                return bytes(received), exc
            finally:
                if not reading.cancel_called:
                    for scope, was in zip(scopes, deadlines, strict=True):
                        scope.deadline = was
        if reading.cancelled_caught:
            if within is not None and deadlines[0] == deadline:
                return bytes(received), self._timed_out(method, shown, "no complete error body")
            what = f"{method} {shown}: no complete error body within the call's timeout"
            return bytes(received), PocApiTimeout(what)
        return bytes(received), None

    async def _read_body(
        self,
        response: httpx.Response,
        what: str,
        chunks: AsyncIterator[bytes] | None = None,
        *,
        into: bytearray | None = None,
    ) -> bytes:
        """The body (from ``chunks`` if the caller already holds its iterator), read up
        to ``max_body`` (``LimitExceeded`` past it); of an error answer only as much
        as its excerpt needs. ``into`` receives the bytes as they arrive (what came
        before a failed read)."""
        ok = response.is_success
        limit = self._max_body if ok else _ERROR_BODY_READ_LIMIT
        length = response.headers.get("content-length", "")
        if ok and length.isascii() and length.isdigit() and int(length) > limit:
            raise LimitExceeded(
                f"{what}: the response body ({int(length)} bytes) is larger than "
                f"{limit} bytes (max_message_size)"
            )
        body = bytearray() if into is None else into
        # The read is stopped by a cancel, not by leaving the loop (a break, a
        # raise): the Cancelled runs through httpx's chain of async generators and
        # finishes them, where a break would leave them for the garbage collector
        # (trio's ResourceWarning, as _RequestBody's). httpx drops the connection.
        with trio.CancelScope() as enough:
            source = _DecodedBody(response, what) if chunks is None else chunks
            try:
                async for chunk in source:
                    if enough.cancel_called:
                        continue  # what httpx had already buffered
                    body += chunk
                    if len(body) > limit or (not ok and len(body) >= limit):
                        enough.cancel()
                        _drop(source)
            except Exception:
                # A body that failed to decode (not the gzip it said) left httpx's
                # generators under it suspended at their yield: finished as above.
                await _finish_by_cancel(source)
                raise
        if ok and len(body) > limit:
            raise LimitExceeded(
                f"{what}: the response body is larger than {limit} bytes (max_message_size)"
            )
        return bytes(body)

    # -- endpoints -----------------------------------------------------------------

    def known_readout_shape(self) -> tuple[int, int] | None:
        """The readout shape of the manifest already fetched, if any (no I/O)."""
        manifest = self._manifest.cached()
        return manifest.shape if manifest is not None else None

    def readout_mismatch(self, shape: tuple[int, int], length: int) -> None:
        """A stream that asked for readouts shaped ``shape`` got one of ``length``
        floats (no I/O). When ``shape`` is the cached manifest's, the server has
        changed its manifest since (restarted with other layers or concepts): the
        cache is dropped, so the next :meth:`readout_manifest` fetches the new
        one. Kept, it refused the server's new shape for ever (as not the
        manifest's) and gave every readout of the old one to the warning."""
        manifest = self._manifest.cached()
        if manifest is None or manifest.shape != shape or shape[0] * shape[1] == length:
            return
        log.warning(
            "GET %s/readout/manifest: the server sends readouts of %d floats, not the "
            "%d*%d of the manifest fetched before (has it restarted?): fetching it again "
            "on the next readout_manifest()",
            self._shown,
            length,
            *shape,
        )
        self._manifest.forget()

    @_redacting
    async def readout_manifest(self) -> ReadoutManifest | None:
        """``GET /readout/manifest``: the readout manifest, or ``None`` when disabled (404).

        A manifest that lists no concepts or no layers names no readout (its shape
        would be empty): it is ``None`` too, with a warning logged. Any status but
        200 and 404 (a 204 too) raises :class:`HttpError` holding it, as does a 200
        that carries an error object (with the server's message).

        Fetched once per ``HttpApi`` and cached: concurrent first callers wait for a
        single request and all get its answer -- its error too. A failed or
        cancelled fetch caches nothing: a caller arriving after it ended tries
        again (and the waiters of a fetch cancelled by its own caller start a new
        one). Always a checkpoint.
        """
        return await self._manifest.get()

    async def _fetch_manifest(self) -> ReadoutManifest | None:
        what = f"GET {self._shown}/readout/manifest"
        data = await self._request("GET", "/readout/manifest", manifest=True, expect="concepts")
        if data is _ABSENT:
            log.debug("readout disabled on %s (404)", self._shown)
            return None
        if not isinstance(data, dict):
            _shape_error(what, "an object", data)
        concepts, layers = data.get("concepts"), data.get("layers")
        if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
            _shape_error(what, '"concepts": [str]', concepts)
        if not isinstance(layers, list) or not all(_is_int(x) for x in layers):
            _shape_error(what, '"layers": [int]', layers)
        # Shape (n, 0) or (0, n): every readout call would refuse it. (Negative and
        # repeated layer indices are the server's business: -1 can be the last.)
        if not concepts or not layers:
            empty = "concepts" if not concepts else "layers"
            log.warning("%s lists no %s: taking readout as disabled", what, empty)
            return None
        return ReadoutManifest(concepts=concepts, layers=layers)

    @_redacting
    async def train(self, samples: Sequence[TrainSample], model: str | None = None) -> TrainResult:
        """``POST /train``: submit training samples; returns the server's job.
        ``model`` names the model instead of the client's.

        Raises ``TypeError`` before sending if a sample is not a :class:`TrainSample`.
        Cancelling abandons the request; the server may or may not have accepted it.
        """
        if isinstance(samples, str | bytes) or not isinstance(samples, Sequence):
            raise TypeError(f"samples must be a sequence of TrainSample, not {type(samples)}")
        for i, s in enumerate(samples):
            if not isinstance(s, TrainSample):
                raise TypeError(f"samples[{i}] must be a TrainSample, not {type(s).__name__}")
        what = f"POST {self._shown}/train"
        model = self._model if model is None else model
        body = await _train_body(model, list(samples))  # (the caller's list may change)
        data = await self._request("POST", "/train", _Encoded(body), expect="accepted")
        if not isinstance(data, dict):
            _shape_error(what, "an object", data)
        accepted, job_id = data.get("accepted"), data.get("job_id")
        if (
            not isinstance(accepted, int)
            or isinstance(accepted, bool)
            or not isinstance(job_id, str)
        ):
            _shape_error(what, '{"accepted": int, "job_id": str}', data)
        return TrainResult(accepted=accepted, job_id=job_id)

    @_redacting
    async def tokenize(self, text: str) -> list[int]:
        """``POST /tokenize`` (reference-server extension): text to token ids.

        An id that no token can have (outside ``[0, 2**32)``) raises
        :class:`~poc_api.ProtocolViolation`. A checkpoint; cancelling abandons the
        request.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"text: {_unencodable(exc)}") from None
        what = f"POST {self._shown}/tokenize"
        data = await self._request("POST", "/tokenize", {"text": text}, expect="tokens")
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
            _shape_error(what, '{"tokens": [int]}', data)
        # Caught here, not as a ValueError blaming the caller's next call with them.
        bad = next((t for t in tokens if not 0 <= t <= _U32_MAX), None)
        if bad is not None:
            raise ProtocolViolation(f"{what}: token id {bad} is not in [0, 2**32)")
        return tokens

    @_redacting
    async def detokenize(self, tokens: Iterable[SupportsIndex]) -> str:
        """``POST /detokenize`` (reference-server extension): token ids to text.

        Bad ids raise ``TypeError``/``ValueError`` before sending. A checkpoint;
        cancelling abandons the request.
        """
        ids = _u32_tuple(tokens)
        what = f"POST {self._shown}/detokenize"
        data = await self._request("POST", "/detokenize", {"tokens": list(ids)}, expect="text")
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(text, str):
            _shape_error(what, '{"text": str}', data)
        return text

    @_redacting
    async def tokenizer_info(self) -> TokenizerInfo:
        """``GET /tokenizer`` (reference-server extension): ``vocab_size`` and special ids.

        An answer not of that shape (``{"vocab_size": int, "special": {str: id}}``,
        ints in ``[0, 2**32)``) raises :class:`~poc_api.ProtocolViolation`. A
        checkpoint; cancelling abandons the request.
        """
        data = await self._request("GET", "/tokenizer", expect="vocab_size")
        what = f"GET {self._shown}/tokenizer"
        if not isinstance(data, dict):
            _shape_error(what, "an object", data)
        vocab_size = data.get("vocab_size")
        if not _is_int(vocab_size) or not 0 <= vocab_size <= _U32_MAX:
            _shape_error(what, '"vocab_size": int', vocab_size)
        special = data.get("special")
        if not isinstance(special, dict) or not all(
            isinstance(name, str) and _is_int(i) and 0 <= i <= _U32_MAX
            for name, i in special.items()
        ):
            _shape_error(what, '"special": {name: token id}', special)
        return cast(TokenizerInfo, data)

    # -- chat ----------------------------------------------------------------------

    def _chat_payload(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        stream: bool,
        model: str | None,
        max_tokens: SupportsIndex | None,
        temperature: SupportsFloat | None,
        top_p: SupportsFloat | None,
        stop: str | Sequence[str] | None,
        tools: Sequence[Mapping[str, Any]] | None,
        tool_choice: str | Mapping[str, Any] | None,
        response_format: Mapping[str, Any] | None,
        n: SupportsIndex | None,
        logprobs: bool | None,
        top_logprobs: SupportsIndex | None,
        seed: SupportsIndex | None,
        extra_body: Mapping[str, Any] | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        """The request body, every argument checked (TypeError/ValueError) before sending.

        An empty ``"model"`` is filled in by the caller (it may need a ``GET /models``).
        """
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a str, not {type(model).__name__}")
        payload: dict[str, Any] = {
            "model": self._model if model is None else model,
            "messages": _check_messages(messages),
        }
        if max_tokens is not None:
            # OpenAI-compatible servers take 1 and up, and no more than an int32.
            payload["max_tokens"] = _check_int("max_tokens", max_tokens, 1, _I32_MAX)
        if temperature is not None:
            payload["temperature"] = _check_number("temperature", temperature, 0.0, math.inf)
        if top_p is not None:
            payload["top_p"] = _check_number("top_p", top_p, 0.0, 1.0)
        if stop is not None:
            stops = [stop] if isinstance(stop, str) else stop
            if not isinstance(stops, Sequence) or not all(isinstance(s, str) for s in stops):
                raise TypeError("stop must be a str or a sequence of str")
            payload["stop"] = list(stops)
        if tools is not None:
            payload["tools"] = _check_tools(tools)
        if tool_choice is not None:
            payload["tool_choice"] = _check_tool_choice(tool_choice, payload.get("tools"))
        if response_format is not None:
            payload["response_format"] = _check_typed_mapping("response_format", response_format)
        if n is not None:
            payload["n"] = _check_int("n", n, 1, _MAX_CHOICES)
        if logprobs is not None:
            if not isinstance(logprobs, bool):
                raise TypeError(f"logprobs must be a bool, not {type(logprobs).__name__}")
            payload["logprobs"] = logprobs
        if top_logprobs is not None:
            if not logprobs:
                raise ValueError("top_logprobs needs logprobs=True")
            payload["top_logprobs"] = _check_int("top_logprobs", top_logprobs, 0, _MAX_TOP_LOGPROBS)
        if seed is not None:
            payload["seed"] = _check_int("seed", seed, -(2**63), 2**64 - 1)
        if extra_body is not None and not isinstance(extra_body, Mapping):
            raise TypeError(f"extra_body must be a mapping, not {type(extra_body).__name__}")
        for key in extra:
            # A keyword that is almost one of ours is a typo, not a vendor field
            # (cutoff 0.85 lets vLLM's top_k past top_p): say so, send nothing.
            near = difflib.get_close_matches(key, _CHAT_KEYWORDS, n=1, cutoff=0.85)
            if near:
                raise TypeError(
                    f"chat() got an unexpected keyword {key!r}: did you mean {near[0]!r}? "
                    f"(extra_body={{{key!r}: ...}} sends it as it is)"
                )
        # Anything else (``logit_bias``, vendor fields such as vLLM's ``top_k``) goes
        # through as given: ``extra_body`` last, as the openai client merges it.
        for more in (extra, extra_body or {}):
            if not all(isinstance(k, str) for k in more):
                raise TypeError("extra_body keys must be str")
            # A stream's stream_options may be replaced, or dropped with None: a
            # server that refuses the field (vLLM before 0.4.3, NVIDIA NIM:
            # "extra inputs are not permitted") has no usage to send anyway.
            reserved = _RESERVED_CHAT_KEYS - {"stream_options"} if stream else _RESERVED_CHAT_KEYS
            clash = reserved & more.keys()
            if clash:
                raise ValueError(f"chat() sets {sorted(clash)} itself")
            payload.update(more)
        payload["stream"] = stream
        if stream:
            options = payload.pop("stream_options", {"include_usage": True})
            if options is not None:
                payload["stream_options"] = options
        try:
            # What httpx does when sending (UTF-8 as newer httpx encodes it).
            json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"chat request: {_unencodable(exc)}") from None
        except (TypeError, ValueError, RecursionError) as exc:
            raise TypeError(f"chat request is not JSON-serialisable: {exc!r}") from exc
        return payload

    @_redacting
    async def _chat_model(self, own: bool = True) -> str:
        """The model to name: ``model=`` if given, else the server's only model.
        ``own=False`` for a call's ``model=""``: the server's default, as the gRPC
        calls send it, not the client's model.

        Servers that check the name (vLLM answers 404 to an unknown one) refuse
        ``""``, so without ``model=`` this asks ``GET /models`` once per client and
        uses the served model when there is exactly one. Any other list raises
        ``ValueError`` before the chat request is sent; an error status raises
        :class:`~poc_api.HttpError` (401/403: :class:`~poc_api.AuthenticationError`)
        saying the lookup failed, and a garbage answer
        :class:`~poc_api.ProtocolViolation`. Concurrent callers share one
        lookup and its outcome, as :meth:`readout_manifest`'s callers share one
        fetch; a failed lookup caches nothing.
        """
        if own and self._model:
            return self._model
        return await self._served_model.get()

    async def _fetch_served_model(self) -> str:
        what = f"GET {self._shown}/models"
        try:
            data = await self._request("GET", "/models", expect="data")
        except HttpError as exc:  # (garbage answers raise as themselves)
            # The server's error, not a bad argument (a 503 is worth retrying): an
            # HttpError still, with its status, that says why chat() asked.
            raise HttpError(
                f"{NO_MODEL_SET} and {what} failed, so there is no model to name: {exc}",
                http_status=exc.http_status,
                url=exc.url,
                body_excerpt=exc.body_excerpt,
                retry_after=exc.retry_after,
            ) from exc
        except AuthenticationError as exc:
            # 401/403: the same error type, and the same word on why chat() asked.
            raise AuthenticationError(
                f"{NO_MODEL_SET} and {what} failed, so there is no model to name: {exc}",
                http_status=exc.http_status,
            ) from exc
        except (ServerUnavailable, PocApiTimeout) as exc:
            # As above: the caller asked for a chat, not for this URL.
            raise type(exc)(
                f"{NO_MODEL_SET} and {what} failed, so there is no model to name: {exc}",
                retriable=exc.retriable,
            ) from exc
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            _shape_error(what, '{"data": [...]}', data)
        ids = [e.get("id") for e in entries if isinstance(e, dict)]
        if len(ids) == 1 and isinstance(ids[0], str) and ids[0]:
            try:
                ids[0].encode("utf-8")
            except UnicodeEncodeError as exc:  # (half an emoji, JSON-escaped)
                raise ProtocolViolation(
                    f"{what} names a model id no request can carry: {_unencodable(exc)}; "
                    f"{PASS_MODEL} to name it"
                ) from None
            log.debug("%s: using the only served model %r", what, self._redact(ids[0]))
            return ids[0]
        if not ids:
            listed = "lists no models"
        elif len(ids) == 1:
            listed = f"lists 1 model with no usable id ({_short_repr(ids)})"
        else:
            listed = f"lists {len(ids)} models ({_short_repr(ids)})"
        raise ValueError(f"{NO_MODEL_SET} and {what} {listed}; {PASS_MODEL} to name one")

    @_redacting
    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
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
        **extra: Any,
    ) -> ChatCompletion:
        """``POST /chat/completions`` without streaming.

        ``messages`` are OpenAI message mappings (``{"role", "content"}``; an
        assistant tool-call turn may have ``content: None``). The keyword arguments
        are OpenAI's; ``extra_body`` (and, for compatibility, other keywords) are
        sent as they are. Bad arguments raise ``TypeError``/``ValueError`` before
        sending. An error answer, in any shape a server sends it, raises
        :class:`~poc_api.HttpError` with the server's message. Cancelling abandons
        the request.

        ``model`` names the model for this call instead of the client's.

        Example::

            done = await api.chat([{"role": "user", "content": "hi"}], max_tokens=16)
            print(done.text, done.finish_reason, done.tool_calls)
        """
        payload = self._chat_payload(
            messages,
            stream=False,
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
            extra=extra,
        )
        if not payload["model"]:
            payload["model"] = await self._chat_model(model is None)
        shown = self._shown + "/chat/completions"
        what = f"POST {shown}"
        data = await self._request("POST", "/chat/completions", payload)
        if not isinstance(data, dict):
            _shape_error(what, "an object", data)
        error = _error_object(data, "message")
        if error is not None:
            raise self._server_error(shown, response_status=200, error=error)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            _shape_error(what, '"choices": [{...}]', choices)
        error = _choice_error(choices)
        if error is not None:
            raise self._server_error(shown, response_status=200, error=error)
        parsed = [_parse_choice(c, what) for c in choices]
        parsed.sort(key=lambda pair: pair[0])
        first = parsed[0][1]
        return attrs.evolve(
            first,
            usage=_parse_usage(data.get("usage"), what),
            choices=tuple(c for _, c in parsed),
        )

    @protected_asynccontextmanager
    async def chat_stream(
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
        **extra: Any,
    ) -> AsyncIterator[ChatStream]:
        """``POST /chat/completions`` with ``stream: true``: deltas, then one ``ChatDone``.

        Arguments as :meth:`chat`. It asks for usage (``stream_options:
        {"include_usage": true}``); ``extra_body={"stream_options": ...}`` replaces
        that, and ``None`` leaves the field out, for a server that refuses it.
        ``timeout`` (seconds) bounds the stream, as a
        Generate stream's does: entering the block, then each read that has to wait
        for events, raises :class:`~poc_api.PocApiTimeout` once it has passed (and
        every later read raises it again, until ``aclose()``). Time the caller spends
        in the block is not cut by it, and a read that finds events read ahead
        returns them; but a reader slower than the server may outlast it while the
        block holds its read-ahead (below): the stream had ended on the server, not
        yet in the block.
        The ``HttpApi``'s own ``timeout`` bounds only the wait for the response
        headers (and an error answer's body): a long stream is never cut by it.

        Entering the block sends the request and waits for the response headers
        (an error status raises here). Iterating yields :class:`ChatDelta`,
        :class:`ChatReasoningDelta` and :class:`ChatToolCallDelta` events in the
        order the server sent them, then one :class:`ChatDone` (with the tool calls
        put together) after ``data: [DONE]`` -- or at the end of a stream that
        already sent its finish reason without ``[DONE]``, as the official client
        allows. Every event that arrived before an error is delivered before it is
        raised: an error event (OpenAI's ``{"error": ...}``, vLLM's
        ``{"object": "error"}``, ``event: error``) raises :class:`~poc_api.HttpError`
        with the server's message; a stream that ends before any finish reason
        raises :class:`~poc_api.ProtocolViolation`. A read you cancel (a timeout
        around one ``__anext__``) loses nothing: the next read goes on; a read that
        failed raises its error again on every later read. The block reads the body
        ahead of you, by at most about 64 KiB of events: while they wait unread it
        reads no more (the server's sending stalls), and it goes on once you read.

        Leaving the block -- after the last event, by ``break``, by an exception or
        by cancellation -- closes the response (shielded, bounded): an unfinished
        response's connection is dropped rather than returned to the pool half-read,
        so the client stays usable. ``events.aclose()`` (``contextlib.aclosing``)
        stops reading: later reads, and a task waiting in one, raise
        ``trio.ClosedResourceError("this stream was closed")``; the block's exit
        still ends the request.

        Example::

            async with api.chat_stream(messages, max_tokens=32) as events:
                async for ev in events:
                    if isinstance(ev, ChatDelta):
                        print(ev.text, end="")
        """
        payload = self._chat_payload(
            messages,
            stream=True,
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
            extra=extra,
        )
        # inf is fine, as everywhere. A plain float: a numpy float32 made a float32
        # trio deadline, which trio's I/O wait refused ("timeout must be an integer").
        seconds = check_timeout("timeout", timeout)
        # A cancel scope around a yield is fine in a context manager (same task).
        # A CancelScope, not move_on_after (a @contextmanager a Ctrl-C can tear).
        url = self._base_url + "/chat/completions"
        shown = self._shown + "/chat/completions"
        # It bounds the wait for the answer's start here, and the block's reads
        # after it (ChatStream._wait_next): not the caller's own code in the block.
        deadline = trio.current_time() + (math.inf if seconds is None else seconds)
        # Has anything gone out (the model lookup's request, or the stream's)?
        sent = Sent(BLOCK_SENT.get())
        with trio.CancelScope(deadline=deadline) as scope:
            if not payload["model"]:
                # (Set and reset around the await alone: a context variable set in
                # a generator's frame would stay set in the caller's block.)
                token = BLOCK_SENT.set(sent)
                try:
                    with call_scope(scope):  # (an error body read takes its deadline)
                        payload["model"] = await self._chat_model(model is None)
                finally:
                    BLOCK_SENT.reset(token)
            request = self._build_request("POST", url, payload, accept="text/event-stream")
            reused = [True]
            request.extensions["trace"] = _tracer(sent, reused)
            log.debug("POST %s (stream)", shown)
            with self._calls.held("POST", shown):  # until the block's end
                # The client's timeout bounds the wait for the answer to begin, not the
                # stream (httpx's read timeout still bounds each wait for the next bytes).
                answer_by = trio.current_time() + self._time_limit()
                with trio.CancelScope(deadline=answer_by) as head:
                    response = await self._send_stream(request, shown, reused)
                if head.cancelled_caught:
                    raise self._timed_out("POST", shown, "no response headers", sent)
                events = ChatStream(self, response, shown, payload.get("n"))
                try:
                    with call_scope(scope), trio.CancelScope(deadline=answer_by) as head:
                        await events._check_response(head)  # (an error answer's body is read here)
                    if head.cancelled_caught:
                        raise self._timed_out("POST", shown, "no complete error answer")
                    scope.deadline = math.inf  # the stream's reads take it on
                    if seconds is not None:
                        events._deadline, events._timeout = deadline, seconds
                    # The body is read by a task of the block's own, so that a read the
                    # caller cancels (a per-event timeout) loses nothing: the next one
                    # goes on where it stopped. (httpx's reader ends for good, and drops
                    # its connection, when a cancellation passes through it.)
                    body_error: BaseException | None = None
                    with collapse_cancellation():  # the pump raises nothing but Cancelled
                        async with trio.open_nursery() as nursery:
                            start_tasks(nursery, events._pump, ())
                            try:
                                yield events
                            except BaseException as exc:
                                # Raised below, past the nursery, as itself: trio would put
                                # it in a group (and copy the caller's own group).
                                body_error = exc
                            finally:
                                try:
                                    if body_error is None:
                                        await events._let_the_body_end()
                                finally:
                                    nursery.cancel_scope.cancel()
                    if body_error is not None:
                        raise body_error
                finally:
                    await events._release()
        if scope.cancelled_caught:
            what = self.chat_call_name("chat_stream", payload["model"])()
            raise _timeout(f"{what}: not finished within {seconds:g} s", sent)

    @_redacting  # (chat_stream, a generator, cannot be): its errors quote the server
    async def _send_stream(
        self, request: httpx.Request, shown: str, reused: list[bool]
    ) -> httpx.Response:
        with _map_httpx_errors("POST", shown, self._client):
            return await self._send_owned(request, reused)

    def _server_error(
        self, url: str, *, response_status: int, error: object, method: str = "POST"
    ) -> HttpError | AuthenticationError:
        """An error object inside a 200 answer, as an :class:`HttpError` (an
        :class:`AuthenticationError` for a 401 or 403, as for such a status).

        ``error`` is OpenAI's ``{"message", "type", "param", "code"}``, vLLM's flat
        ``{"object": "error", "message", ...}``, or any JSON value or text. Its
        ``code``, when it is an HTTP error status, becomes ``http_status``.
        """
        status = response_status
        message: object = error
        code: object = None
        if isinstance(error, dict):
            message = error.get("message", error)
            code = error.get("code")
        # isdigit() alone passes "²" and 5000-digit strings, which int() refuses.
        if isinstance(code, str) and code.isascii() and code.isdigit() and len(code) <= 3:
            code = int(code)
        if _is_int(code) and 400 <= code <= 599:
            status = code
        text = self._redact(message if isinstance(message, str) else json.dumps(message))
        # (A lone surrogate, JSON-escaped half an emoji, is shown escaped, as _said does.)
        excerpt = error_excerpt(text.encode("utf-8", "backslashreplace"))
        message = f"{method} {redact_url(url)}: server error (HTTP {status}): {excerpt}"
        if status in (401, 403):
            return AuthenticationError(message, http_status=status)
        return HttpError(
            message,
            http_status=status,
            url=redact_url(url),
            body_excerpt=excerpt,
        )


# The keywords chat() and chat_stream() take themselves (for the typo check), from
# chat_stream's signature (a superset of chat's: it adds timeout), not a copy of it.
_CHAT_KEYWORDS: Final = tuple(
    name
    for name, param in inspect.signature(HttpApi.chat_stream).parameters.items()
    if param.kind is param.KEYWORD_ONLY
)

#: Most choices (``n``) and top logprobs a request may ask for, as OpenAI's limits.
_MAX_CHOICES: Final = 128
_MAX_TOP_LOGPROBS: Final = 20
_TOOL_CHOICES: Final = frozenset({"none", "auto", "required"})


def _check_int(name: str, value: object, low: int, high: int) -> int:
    value = as_int(name, value)  # (a numpy int is not JSON's)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _check_typed_mapping(name: str, value: object) -> dict[str, Any]:
    """A ``{"type": str, ...}`` mapping (a tool, a response format), as a dict."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping, not {type(value).__name__}")
    kind = value.get("type")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{name} needs a non-empty str 'type'")
    return dict(value)


def _check_tools(tools: object) -> list[dict[str, Any]]:
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise TypeError(f"tools must be a sequence of mappings, not {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        checked = _check_typed_mapping(f"tools[{i}]", tool)
        if checked["type"] == "function":
            function = checked.get("function")
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                raise ValueError(f"tools[{i}] needs 'function': {{'name': str, ...}}")
        out.append(checked)
    return out


def _check_tool_choice(choice: object, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    """OpenAI's ``"none"``, ``"auto"``, ``"required"``, or a ``{"type": ...}`` mapping.

    A ``"function"`` choice must name a function -- one of ``tools`` when they are
    given -- as every OpenAI-compatible server requires: sent without one, the
    server's 400 would blame nothing the caller can see. Other types (OpenAI's
    ``allowed_tools``, a vendor's) are left to the server.
    """
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise ValueError(f"tool_choice must be one of {sorted(_TOOL_CHOICES)} or a mapping")
        return choice
    checked = _check_typed_mapping("tool_choice", choice)
    if checked["type"] != "function":
        return checked
    function = checked.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError(
            "tool_choice of type 'function' needs 'function': {'name': str}, "
            f"got {_short_repr(function)}"
        )
    # (_check_tools made sure each function tool has a str name.)
    names = {t["function"]["name"] for t in tools or () if t["type"] == "function"}
    if tools is not None and name not in names:
        raise ValueError(
            f"tool_choice names the function {name!r}, which is not one of the tools "
            f"({sorted(names)})"
        )
    return checked


def _error_object(data: object, event: str) -> object | None:
    """The error an event or answer carries, or ``None`` when it is not an error.

    Real servers send these shapes: OpenAI's ``{"error": {...}}``, vLLM's flat
    ``{"object": "error", "message": ..., "code": 400}``, and ``event: error`` (or
    llama.cpp's bare ``error:`` line) whose data may be JSON or plain text.
    """
    if isinstance(data, dict):
        error: object = data.get("error")
        if error:  # as the official client: "error": null, "" or false is no error
            return error
        if data.get("object") == "error":
            return data
    if event == "error":
        return data
    return None


def _choice_error(choices: list[Any]) -> object | None:
    """The first error a choice carries (OpenRouter's ``{"error": {...},
    "finish_reason": "error"}``: its provider failed after the answer began), or
    ``None``. As for a whole answer's, ``"error": null`` is no error."""
    for choice in choices:
        error: object = choice.get("error") if isinstance(choice, dict) else None
        if error:
            return error
    return None


def _str_field(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        _shape_error(what, f"a str {key!r}", value)
    return value


def _arguments_text(value: object) -> str:
    # Some servers (Ollama, some proxies) send the arguments as an object, not text.
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _parse_choice(choice: object, what: str) -> tuple[int, ChatCompletion]:
    """One non-streamed choice: its index and its content (``usage`` left ``None``)."""
    if not isinstance(choice, dict):
        _shape_error(what, "a choice object", choice)
    index = choice.get("index", 0)
    if not _is_int(index):
        _shape_error(what, "an int choice index", index)
    message = choice.get("message") or {}
    if not isinstance(message, dict):
        _shape_error(what, "a message object", message)
    content = message.get("content")
    if isinstance(content, list):  # content parts, as some servers echo them
        content = "".join(_str_field(p, "text", what) for p in content if isinstance(p, dict))
    if content is not None and not isinstance(content, str):
        _shape_error(what, "a str message content", content)
    reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    if not isinstance(reasoning, str):
        _shape_error(what, "a str reasoning_content", reasoning)
    refusal = _str_field(message, "refusal", what)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        _shape_error(what, '"tool_calls": [...]', calls)
    tool_calls = []
    for call in calls:
        kind = call.get("type") if isinstance(call, dict) else None
        # OpenAI's custom tools: {"type": "custom", "custom": {"name", "input"}}.
        field, text = ("custom", "input") if kind == "custom" else ("function", "arguments")
        function = call.get(field) if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(function, dict):
            _shape_error(what, f'a tool call {{"id", "{field}": {{...}}}}', call)
        tool_calls.append(
            ChatToolCall(
                id=_str_field(call, "id", what),
                name=_str_field(function, "name", what),
                arguments=_arguments_text(function.get(text)),
                type=_str_field(call, "type", what) or "function",
                extra=_extra_fields(call),
            )
        )
    finish = choice.get("finish_reason")
    if finish is not None and not isinstance(finish, str):
        _shape_error(what, "a str finish_reason", finish)
    completion = ChatCompletion(
        text=content or "",
        finish_reason=finish or "",
        usage=None,
        tool_calls=tuple(tool_calls),
        reasoning=reasoning,
        logprobs=_logprobs(choice, what),
        refusal=refusal,
    )
    return index, completion


def _logprobs(choice: dict[str, Any], what: str) -> ChatLogprobs | None:
    # OpenAI's is an object or null; anything else would break the typed field.
    # (Its contents go on unchecked, as ChatLogprobs says.)
    logprobs = choice.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, dict):
        _shape_error(what, '"logprobs": {...} or null', logprobs)
    return cast("ChatLogprobs | None", logprobs)


@final
class _ToolCallParts:
    """A tool call being put together from streamed pieces."""

    __slots__ = ("arguments", "extra", "id", "name", "type")

    def __init__(self) -> None:
        self.id = ""
        self.type = "function"
        self.name = ""
        self.arguments: list[str] = []
        self.extra: dict[str, Any] = {}

    def done(self) -> ChatToolCall:
        arguments = "".join(self.arguments)
        return ChatToolCall(self.id, self.name, arguments, self.type, extra=self.extra)


@final
class _Parked:
    """A place for one task to wait until another wakes it: trio's lowlevel
    park and reschedule, with no ``trio.Event`` made per wait."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    async def wait(self) -> None:
        """Wait for :meth:`wake` (a cancellation point; one task at a time)."""
        self._task = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake(self) -> None:
        """Wake the task waiting, if one is."""
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)


@final
class ChatStream:
    """The events of one streamed chat completion (``ApiClient.chat_stream``):
    :class:`ChatDelta`, :class:`ChatReasoningDelta` and :class:`ChatToolCallDelta`
    as they arrive, then one :class:`ChatDone`.

    Iterate it with ``async for`` inside its block; each step is a cancellation
    point and a cancelled step loses nothing. An error in the stream is raised
    after the events that came before it, and again by every later read: a
    stream that failed never looks complete. :meth:`aclose` stops reading
    (``contextlib.aclosing``); the block's exit ends the request.
    """

    # A class, not an async generator, so that abandoning it leaves nothing for the
    # garbage collector. The block's _pump task reads the body, decodes its events
    # into a queue, and wakes the reader only when it waits (an event ready to read
    # costs no task switch); it stops reading while _CHAT_READ_AHEAD bytes' worth
    # of events wait unread, and goes on when the reader has taken them all. The
    # error that ended the body (a failed read, an error event, bad data) is kept
    # until the queue -- the events before it -- is delivered, so what the caller
    # sees never depends on how TCP cut the bytes.

    def __repr__(self) -> str:
        # Cheap and never raising: it lands in logs and tracebacks.
        if self._reader_closed:
            state = "closed"
        elif self._error is not None:
            state = f"failed: {type(self._error).__name__}"
        elif self._cut:
            state = "left before the end"
        elif self._finished:
            state = f"finished finish_reason={self._finish.get(self._first, '')!r}"
        else:
            state = "streaming"
        return f"<poc_api.ChatStream {self._what} {state}>"

    def __init__(self, api: HttpApi, response: httpx.Response, url: str, n: object = None) -> None:
        """``n``: the choices the request asked for (``extra_body`` may ask for more
        than ``chat_stream``'s own ``n`` allows)."""
        self._api = api
        self._response = response
        self._url = url  # already redacted: used only in messages
        self._what = f"POST {url}"
        self._chunks = _DecodedBody(response, self._what)
        self._sniffed = b""  # the body's first bytes, read by _check_response
        # llama.cpp's error lines too; each event bounded as a whole answer is.
        self._decoder = SSEDecoder(max_buffer=api._max_body, error_field=True, what=self._what)
        # Is the body's end known to be its end (a length, chunked framing)? Else it
        # is the connection's close, which may cut the last event (see _end_of_stream).
        headers = response.headers
        self._framed = (
            "content-length" in headers
            or "chunked" in headers.get("transfer-encoding", "").lower()
            or response.http_version not in ("HTTP/1.0", "HTTP/1.1")
        )
        # Filled by _pump(), emptied by __anext__.
        self._queue: deque[ChatEvent] = deque()
        self._unread = 0  # body bytes read since the queue was last empty
        self._reader = _Parked()  # the task waiting in __anext__ for events
        self._pump_parked = _Parked()  # _pump(), waiting for the queue to be read
        # Its run: the wake-ups above cross no trio.run (see _check_run).
        self._token = trio.lowlevel.current_trio_token()
        # Set once _pump() has returned or was cancelled: no more events (the block's
        # exit may wait for its read of the body's end after [DONE]: _let_the_body_end).
        self._pump_ended = trio.Event()
        self._reading_the_end = False  # _pump() reads on after [DONE], for the body's end
        self._waiting = False  # a task waits in __anext__
        self._fair = FairSlice()  # when the reader last let other tasks run
        self._error: Exception | None = None  # raised after the queue drains, then again
        self._finished = False  # [DONE] seen, the stream ended or failed: read no more
        self._cut = False  # the block was left before the end: iterating is an error
        self._reader_closed = False  # aclose() was called: iterating is an error
        self._done_queued = False  # the ChatDone is in the queue (or already delivered)
        self._cut_event = False  # the body's close cut its last event (dropped)
        self._finish: dict[int, str] = {}  # each choice's, once its finish chunk came
        self._choices: set[int] = set()  # the indexes of the choices seen (kept for ChatDone)
        # Some servers number every chunk of an n=1 answer anew (0, 1, 2, ...): keep
        # no more choices than the request may ask for, and stream on.
        self._max_choices = max(_MAX_CHOICES, n if _is_int(n) else 1)
        self._choices_dropped = False  # (the warning is given once)
        self._usage: Usage | None = None
        self._tool_calls: dict[int, dict[int, _ToolCallParts]] = {}
        # Per choice: the server's tool call index -> the call (in _tool_calls) it names.
        self._tool_slots: dict[int, dict[int, int]] = {}
        self._kept = 0  # characters of tool calls and refusals kept to join at the end
        self._refusals: dict[int, list[str]] = {}
        # chat_stream(timeout=): when a read still waiting for events times out.
        self._deadline = math.inf
        self._timeout = math.inf
        self._closed_by: PocApiTimeout | None = None  # what later reads raise, if not "closed"

    def _redact(self, text: str) -> str:
        return self._api._redact(text)

    @_redacting
    async def _check_response(self, head: trio.CancelScope | None = None) -> None:
        """Raise for an answer that is not a stream; ``head`` bounds the wait for it."""
        status = self._response.status_code
        if not self._response.is_success:
            api = self._api
            body, cut = await api._read_error_body(
                self._response, "POST", self._url, self._chunks, within=head
            )
            log.debug("POST %s -> %d (stream refused)", self._url, status)
            raise api._status_error(
                "POST", self._url, status, body, cut, headers=self._response.headers
            ) from cut
        ctype = self._response.headers.get("content-type", "")
        if ctype.lower().startswith("text/event-stream"):
            log.debug("POST %s -> %d (streaming)", self._url, status)
            return
        # Not labelled a stream: some servers stream events all the same, under no
        # content-type (a StreamingResponse given none) or application/json. A
        # body that opens as an event stream is read as one (as the openai client
        # reads any 200), as it comes; anything else is told below.
        if head is not None:
            # The client's timeout bounded the headers; the wait for a stream's first
            # bytes is bounded as a labelled stream's is: per read (httpx's timeout).
            head.deadline = math.inf
        with _map_httpx_errors("POST", self._url, self._api._client):
            first = await self._sniff()
        if _SSE_START.match(first):
            log.debug("POST %s -> %d (streaming, labelled %r)", self._url, status, ctype)
            self._sniffed = first
            return
        if ctype.lower().startswith("application/json"):
            # Some servers refuse a stream with a 200 JSON error object (an
            # overloaded vLLM): its message is worth more than "not a stream".
            if head is not None:  # (its body, as an error answer's, within the timeout)
                head.deadline = trio.current_time() + self._api._time_limit()
            with _map_httpx_errors("POST", self._url, self._api._client):
                body = await self._api._read_body(
                    self._response, self._what, self._chunks, into=bytearray(first)
                )
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):  # see _json_error
                data = None
            error = _error_object(data, "")
            if error is not None:
                raise self._api._server_error(self._url, response_status=status, error=error)
        raise ProtocolViolation(
            f"{self._what}: expected text/event-stream, got "
            f"{_short_repr(ctype) if ctype else 'no content-type'}"
        )

    async def _sniff(self) -> bytes:
        """The body's first bytes, read until one is not blank (or it ends): enough
        to tell an event stream, which the pump then decodes first."""
        first = bytearray()
        # (Not a generator: left part-read, the body goes on in the pump, or is
        # ended by _release as any other.)
        async for chunk in self._chunks:
            first += chunk
            start = first.lstrip(_BLANK)[:6]
            # Enough to tell, unless it may still become a field's name ("da").
            if (
                len(first) >= _CHAT_READ_AHEAD
                or _SSE_START.match(first)
                or (start and not any(f.startswith(start) for f in _SSE_FIELDS))
            ):
                break
        return bytes(first)

    @trio.lowlevel.enable_ki_protection  # see _request: httpx's reads run here
    async def _pump(self) -> None:
        """trio, a task of the block's: read the body and decode its events into
        the queue, at most ``_CHAT_READ_AHEAD`` bytes ahead of the reader.

        Raises nothing but cancellation: the error that ends the stream is queued
        behind the events before it.
        """
        _call_redactor.set(self._redact)  # (this task's own context) see _redacting
        chunks = self._chunks.plain() or self._chunks
        reading = _map_httpx_errors("POST", self._url, self._api._client)
        # Under an autojumping MockClock a read holds the clock (_clock), and a
        # read ahead would hold it while the reader sleeps between events: there,
        # read on only once the reader has taken what is queued.
        ahead = 1 if autojumping() else _CHAT_READ_AHEAD
        chunk = self._sniffed  # (the body's first bytes, read to tell it a stream)
        self._sniffed = b""
        try:
            while not self._reader_closed:
                try:
                    if not chunk:
                        with reading:
                            chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    self._end_of_stream()
                    return
                except Exception as exc:
                    if exc is self._chunks.truncated and not self._framed:
                        # The connection's close (the body's end) cut its gzip
                        # stream: as a plain body's cut, not an error in itself.
                        self._end_of_stream(exc)
                    else:
                        self._fail(exc)
                    return
                try:
                    for sse in self._decoder.feed(chunk):
                        self._handle(sse)
                        if self._finished:
                            break
                    held = self._decoder.error
                    if held is not None and not self._finished:
                        # The bound passed after the events above (queued): raised
                        # now, not by a next read that may never come (or fail).
                        raise held
                except Exception as exc:
                    self._fail(exc)
                    return
                size, chunk = len(chunk), b""
                if self._finished:  # [DONE]
                    self._reader.wake()
                    # One more read, as the reader of a whole body would: the end of
                    # the body, mostly, so that httpx gives the connection back to
                    # its pool. Anything else waits for the block's exit, unread.
                    self._reading_the_end = True
                    with contextlib.suppress(Exception), reading:
                        await chunks.__anext__()
                    return
                if self._queue:
                    self._unread += size
                    self._reader.wake()
                    while self._unread >= ahead and not self._reader_closed:
                        await self._pump_parked.wait()  # until the reader takes them all
        finally:
            self._pump_ended.set()
            self._reader.wake()

    async def _let_the_body_end(self) -> None:
        """The block's exit, not by an exception: if the body's end is still to
        come after ``[DONE]`` (a server that writes it apart, as uvicorn does), wait
        a little for it. The block's cancelling that read would cost the connection:
        httpx drops one whose read was cancelled, and the next call opens another
        (a TLS handshake on https)."""
        if self._reading_the_end and not self._pump_ended.is_set():
            with trio.CancelScope(deadline=trio.current_time() + _BODY_END_GRACE):
                await self._pump_ended.wait()

    def _fail(self, exc: Exception) -> None:
        """The pump's end by an error: raised once the events before it are read."""
        self._finished = True
        self._error = exc
        self._reader.wake()

    def _end_of_stream(self, truncated: ProtocolViolation | None = None) -> None:
        """The pump's end with the body's; ``truncated``: the close cut its encoding."""
        self._finished = True
        try:
            # An event the server did not finish with a blank line (often a bare
            # ``data: [DONE]``) still counts: the body is complete.
            cut = self._decoder.unfinished or truncated is not None
            events = self._decoder.close(flush=True)
            for i, sse in enumerate(events):
                try:
                    self._handle(sse)
                except ProtocolViolation:
                    if self._framed or not cut or i != len(events) - 1:
                        raise
                    # A body that ends with its connection's close, cut in the
                    # middle of its last event: that event is lost, not malformed
                    # (an event stream drops an event the stream ends inside).
                    log.debug("%s: the body ended in the middle of an event", self._what)
                    self._cut_event = True
            if truncated is not None and self._unfinished():
                raise truncated  # before the answer's end: the cut is the news
            self._end_of_body()
        except Exception as exc:
            self._error = exc
        self._reader.wake()

    def __aiter__(self) -> ChatStream:
        return self

    @trio.lowlevel.enable_ki_protection  # see _request
    async def __anext__(self) -> ChatEvent:
        # As GenerateStream's: a trip through the scheduler at least every
        # FAIR_SLICE, or a consumer slower than the server, finding events queued
        # every time, holds trio's thread until the stream ends (other tasks and
        # deadlines wait). Before the rest: other tasks may close the stream meanwhile.
        # Every read, not only the one that empties the queue: a reader of another
        # run took the queued events (lost to the block's own reader) unrefused.
        self._check_run()
        if self._fair.due():
            await trio.lowlevel.cancel_shielded_checkpoint()
        queue = self._queue
        if queue and not self._waiting and not self._reader_closed:
            # An event is ready: nothing to wait for, nothing to raise (but a
            # cancellation: still a cancellation point, as GenerateStream's).
            await trio.lowlevel.checkpoint_if_cancelled()
            event = queue.popleft()
            if not queue:
                self._drained()
            return event
        return await self._wait_next()

    def _check_run(self) -> None:
        # The wake-ups of a task of another run: an internal error in trio (raised
        # in the block, in an ExceptionGroup), and its waiter waits for ever.
        check_run(self._token)

    def _drained(self) -> None:
        """The reader took the last queued event: the pump may read on."""
        self._unread = 0
        self._pump_parked.wake()

    @_redacting
    async def _wait_next(self) -> ChatEvent:
        await trio.lowlevel.checkpoint_if_cancelled()  # as GenerateStream's
        self._check_run()
        if self._reader_closed:
            raise self._closed_by or stream_closed()
        if self._waiting:  # as BatchReceiver: one reader at a time
            raise trio.BusyResourceError("another task is already reading this stream")
        while not self._queue:
            if self._error is not None:
                raise self._error
            if self._finished:
                if self._cut:
                    raise trio.ClosedResourceError(
                        "this stream's block has exited: iterate its events inside the block"
                    )
                raise StopAsyncIteration
            if self._pump_ended.is_set():
                # The pump stopped without an end: the block is exiting.
                self._finished = self._cut = True
                continue
            self._waiting = True
            try:
                if self._deadline == math.inf:
                    await self._reader.wait()
                else:
                    # The stream's timeout bounds its events, as a Generate stream's:
                    # a read waiting past it, never the caller's own code.
                    with trio.CancelScope(deadline=self._deadline) as wait:
                        await self._reader.wait()
                    # (Not if what it waited for came as it passed: then that counts.)
                    if wait.cancelled_caught and not (self._queue or self._finished):
                        self._time_out()
            finally:
                self._waiting = False
            if self._reader_closed:
                raise self._closed_by or stream_closed()  # aclose() (by another task)
        event = self._queue.popleft()
        if not self._queue:
            self._drained()
        return event

    def _time_out(self) -> NoReturn:
        """Its timeout passed before the stream's end: this read and every later
        one raise :class:`PocApiTimeout`; nothing more is read."""
        what = self._api.call_name("chat_stream", "POST", "/chat/completions")
        self._closed_by = PocApiTimeout(f"{what}: not finished within {self._timeout:g} s")
        self._reader_closed = True
        self._pump_parked.wake()  # (the pump reads no more)
        raise self._closed_by

    @property
    def _first(self) -> int:
        """The first choice's index (0 unless a server numbers them otherwise)."""
        return min(self._choices, default=0)

    def _unfinished(self) -> bool:
        """Is the answer unfinished, should the body end without ``[DONE]``?

        As before ``choices`` existed, the first choice's finish says: servers
        that stream ``n > 1`` have sent every finish chunk with index 0 (llama.cpp
        before March 2026), and a choice whose finish never came shows as ``""``
        in ``ChatDone.choices``.
        """
        return self._first not in self._finish

    def _queue_done(self) -> None:
        def choice(index: int) -> ChatDone:
            calls = self._tool_calls.get(index, {})
            tool_calls = tuple(calls[i].done() for i in sorted(calls))
            refusal = "".join(self._refusals.get(index, ()))
            return ChatDone(self._finish.get(index, ""), None, tool_calls, refusal=refusal)

        # As chat() does: choices in index order, the first one's on ChatDone.
        choices = tuple(choice(i) for i in sorted(self._choices or {0}))
        first = choices[0]
        done = ChatDone(
            first.finish_reason, self._usage, first.tool_calls, choices, refusal=first.refusal
        )
        self._queue.append(done)
        self._done_queued = True

    def _end_of_body(self) -> None:
        if self._done_queued:
            return
        if self._unfinished():
            cut = " (the connection closed in the middle of an event)" if self._cut_event else ""
            raise ProtocolViolation(
                f"{self._what}: event stream ended before [DONE] and before any finish_reason{cut}"
            )
        # The official client ends such a stream normally: the answer is complete.
        log.debug("%s: stream ended without [DONE] after its finish chunk", self._what)
        self._queue_done()

    def _handle(self, sse: SSEEvent) -> None:
        if self._done_queued:
            return  # nothing after [DONE] counts
        if sse.event != "error" and not sse.data.strip(" \t\r\n"):
            return  # an empty "data:" event: a relay's keep-alive, no chunk
        if sse.data.strip(" \t") == "[DONE]":  # (spaces around it: some servers send them)
            self._finished = True
            self._queue_done()
            return
        try:
            data = json.loads(sse.data)
        except (ValueError, RecursionError) as exc:  # see _json_error
            if sse.event == "error":  # plain-text error data: the message is the text
                data = sse.data
            else:
                raise ProtocolViolation(
                    f"{self._what}: event stream data: {_json_error(exc)}"
                ) from exc
        error = _error_object(data, sse.event)
        if error is not None:
            raise self._api._server_error(
                self._url, response_status=self._response.status_code, error=error
            )
        if not isinstance(data, dict):
            _shape_error(self._what, "a chunk object", data)
        choices = data.get("choices") or []
        if not isinstance(choices, list):
            _shape_error(self._what, '"choices": [...]', choices)
        for choice in choices:
            if isinstance(choice, dict):
                self._choice(choice)
        error = _choice_error(choices)
        if error is not None:  # (after what the chunk brought: it is delivered first)
            raise self._api._server_error(
                self._url, response_status=self._response.status_code, error=error
            )
        if data.get("usage") is not None:
            self._usage = _parse_usage(data["usage"], self._what)

    def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        if not _is_int(index):
            _shape_error(self._what, "an int choice index", index)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                self._queue.append(ChatReasoningDelta(reasoning, index))
            content = delta.get("content")
            if isinstance(content, list):  # content parts (Mistral's), read as chat() reads them
                content = "".join(
                    _str_field(p, "text", self._what) for p in content if isinstance(p, dict)
                )
            logprobs = _logprobs(choice, self._what)
            if isinstance(content, str) and content:
                self._queue.append(ChatDelta(content, index, logprobs))
            elif (
                not (isinstance(reasoning, str) and reasoning)  # (the reasoning's tokens)
                and logprobs
                and (logprobs.get("content") or logprobs.get("refusal"))
            ):
                # Tokens with no text of their own (a UTF-8 fragment, an end or a
                # tool-call token: vLLM and SGLang send them so): their logprobs count.
                self._queue.append(ChatDelta("", index, logprobs))
            calls = delta.get("tool_calls")
            if isinstance(calls, dict):  # one call, not a list (TGI before 3.2)
                calls = [calls]
            if isinstance(calls, list):
                for call in calls:
                    if isinstance(call, dict):
                        self._tool_call(index, call)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._keep(len(refusal), "refusal")
                self._refusals.setdefault(index, []).append(refusal)
        if index not in self._choices:
            if len(self._choices) >= self._max_choices:
                if not self._choices_dropped:
                    self._choices_dropped = True
                    log.warning(
                        "%s: the stream names more than %d choices (index %d): "
                        "ChatDone.choices holds the first %d",
                        self._what,
                        self._max_choices,
                        index,
                        self._max_choices,
                    )
                return
            self._choices.add(index)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self._finish[index] = finish

    def _tool_call(self, choice: int, call: dict[str, Any]) -> None:
        parts = self._tool_calls.setdefault(choice, {})
        slots = self._tool_slots.setdefault(choice, {})
        raw_id, raw_index = call.get("id"), call.get("index")
        call_id = raw_id if isinstance(raw_id, str) else ""
        function = call.get("function")
        text = "arguments"
        if not isinstance(function, dict) and isinstance(call.get("custom"), dict):
            # A custom tool's call, as chat() reads it: {"custom": {"name", "input"}}.
            function, text = call["custom"], "input"
        function = function if isinstance(function, dict) else {}
        raw_name = function.get("name")
        name = raw_name if isinstance(raw_name, str) else ""
        if isinstance(raw_index, int) and not isinstance(raw_index, bool):
            # The server's index, mapped to the call it names now: Ollama and
            # lmdeploy number every call of a turn 0, so a call's first piece (it
            # names its function) with a new id, at an index that already holds
            # another call, starts a new call.
            index = slots.get(raw_index, raw_index)
            taken = parts.get(index)
            if taken is not None and (
                raw_index not in slots or (name and call_id and taken.id and call_id != taken.id)
            ):
                index = max(parts) + 1
            slots[raw_index] = index
        else:
            # A server that leaves out the index (some llama.cpp builds): a new id
            # starts a new call, anything else continues the last one.
            known = {p.id for p in parts.values()}
            new = not parts or (call_id and call_id not in known)
            index = max(parts, default=-1) + 1 if new else max(parts)
            if new:
                # Its index, should the server give it on the call's later pieces
                # (as it numbers them): those continue this call.
                slots.setdefault(index, index)
        arguments = _arguments_text(function.get(text))
        self._keep(len(arguments) + len(name) + len(call_id), "tool calls")
        part = parts.setdefault(index, _ToolCallParts())
        part.id = part.id or call_id
        part.name = part.name or name
        if isinstance(call.get("type"), str) and call["type"]:
            part.type = call["type"]
        part.extra.update(_extra_fields(call))
        part.arguments.append(arguments)
        self._queue.append(ChatToolCallDelta(index, call_id, name, arguments, choice))

    def _keep(self, n: int, what: str) -> None:
        # Text kept until the end (ChatDone's tool calls and refusal): bounded, as
        # a whole answer is.
        self._kept += n
        if self._kept > self._api._max_body:
            raise LimitExceeded(
                f"{self._what}: the stream's {what} are larger than "
                f"{self._api._max_body} characters (max_message_size)"
            )

    async def aclose(self) -> None:
        """Stop reading (idempotent; what ``contextlib.aclosing`` calls).

        Later reads raise ``trio.ClosedResourceError``, also in a task waiting in
        one now. As with ``GenerateStream``, the block's exit ends the request.
        """
        self._check_run()
        self._reader_closed = True
        self._closed_by = None  # (after a timeout too: closed is what later reads say)
        self._reader.wake()  # a task waiting in a read raises
        self._pump_parked.wake()  # and the pump reads no more
        await trio.lowlevel.checkpoint()

    @trio.lowlevel.enable_ki_protection  # see _request
    async def _release(self) -> None:
        """The block's exit: release the response, shielded so that cancellation
        cannot leak the connection. (The pump has stopped: nothing reads it.)"""
        # The block was left before the reader had the whole stream: what the pump
        # had queued is dropped, and reading on says so.
        self._cut = self._cut or not self._finished or bool(self._queue)
        if self._cut:
            self._queue.clear()
            self._error = None
        self._finished = True
        with trio.CancelScope(relative_deadline=_CLOSE_TIMEOUT, shield=True):
            try:
                await _finish_by_cancel(self._chunks)
                await self._response.aclose()
            except Exception as exc:
                # The connection is being thrown away; a failure to close it politely
                # must not replace the exception (or result) the caller already has.
                log.debug("closing %s failed: %r", self._url, exc)
