"""``poc-api``: the command-line face of poc_api.

Commands::

    poc-api demo                       # tour the library against an embedded server
    poc-api demo --url http://host:8000/v1
    poc-api generate "Once upon a time" --max-tokens 40
    poc-api score "The cat sat on the" --continuation " mat." --continuation " moon."
    poc-api chat "Tell me a story"
    poc-api serve --port 8000          # the reference server: HTTP on 8000, gRPC on 8001

Without ``--url`` (or ``POC_BASE_URL``), ``demo``, ``generate``, ``score`` and
``chat`` start the reference server inside the process, on free loopback ports,
so they work out of the box. ``--api-key`` (``POC_API_KEY``) and ``--grpc-url``
(``POC_GRPC_URL``) complete the connection settings; they are accepted both
before and after the command name. ``POC_GRPC_URL`` without a base URL is not
used (the embedded server has its own ports), while ``--grpc-url`` without one
is a usage error.

Errors print one line on stderr, ``error: ...``, and exit with status 1; usage
errors exit with status 2. poc_api's own log records of WARNING and above print
as one-line ``poc_api warning: ...`` (``serve`` leaves them to logging). The api
key is never printed. ``POC_DEBUG=1`` adds debug logging and a traceback for
unexpected errors.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import io
import json
import logging
import math
import os
import select
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any, Final, NoReturn, TypedDict, TypeVar, final
from urllib.parse import urlsplit

import attrs
import click
import trio
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import _errors as e
from ._chunks import Chunk, Tokens
from ._client import (
    PASS_GRPC_URL,
    PORT_PLUS_ONE,
    ApiClient,
    check_api_key,
    check_base_url,
    resolve_grpc_url,
)
from ._conversation import ConversationStream
from ._errors import protected_asynccontextmanager, start_tasks
from ._http import IS_BASE_URL, NO_MODEL_SET, PASS_MODEL, ChatDelta, shown_url
from ._log import control_escapes
from ._png import encode_png
from ._pool import parse_grpc_targets
from ._session import GenerateStream
from ._transport import GrpcTarget
from ._types import Done, ReadoutManifest, SamplingParams, StreamDone, Token, TokenOut, Usage
from .server import ReferenceServer, ServerConfig, run_forever

__all__ = ["cli", "main", "sparkline"]

#: Unicode block elements, lowest to highest.
SPARK_BLOCKS: Final = "▁▂▃▄▅▆▇█"
#: Decoded ids waiting to be printed. The printer batches what has queued up, so
#: the bound only matters if the tokenizer endpoint stalls: then it pushes back on
#: the stream (and HTTP/2 flow control on the server) instead of growing memory.
_LIVE_BUFFER: Final = 1024
_logger: Final = logging.getLogger("poc_api.cli")
#: Statuses meaning "this server has no tokenizer endpoint".
_NO_ENDPOINT: Final = frozenset({404, 405, 501})
_ENV_URL: Final = "POC_BASE_URL"
_ENV_KEY: Final = "POC_API_KEY"
_ENV_GRPC: Final = "POC_GRPC_URL"
_ENV_MODEL: Final = "POC_MODEL"
_MODEL_KEY: Final = "poc_api.model"  # in click's ctx.meta, shared by the group and its commands
_TIMEOUT_KEY: Final = "poc_api.timeout"  # (as _MODEL_KEY)

T = TypeVar("T")


def _echo(message: str = "", *, err: bool = False) -> None:
    """``click.echo`` to the standard stream as it is. Left to choose, click swaps
    an ASCII one (``PYTHONIOENCODING=ascii``) for a UTF-8 writer on its buffer,
    past :func:`main`'s ``errors="replace"``: what the terminal cannot show then
    reached it as UTF-8 bytes, not as ``?``. (``None``, fd closed: click writes
    nowhere, as ``print()`` does: not click's default, stdout, for a closed stderr.)"""
    stream = sys.stderr if err else sys.stdout
    if stream is None:
        return
    click.echo(message, file=stream)


class CliError(Exception):
    """A failure the CLI reports as one ``error: ...`` line (exit status 1)."""


def sparkline(values: Sequence[float], low: float | None = None, high: float | None = None) -> str:
    """One block character per value, scaled from ``low`` (``▁``) to ``high`` (``█``).

    ``low``/``high`` default to the values' own minimum and maximum. A flat series
    (or an empty range) gives all ``▁``; non-finite values give a space.

    >>> sparkline([0.0, 0.5, 1.0])
    '▁▅█'
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return " " * len(values)
    lo = min(finite) if low is None else low
    hi = max(finite) if high is None else high
    top = len(SPARK_BLOCKS) - 1
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(" ")
        elif hi - lo <= 1e-12:
            out.append(SPARK_BLOCKS[0])
        else:
            frac = min(max((v - lo) / (hi - lo), 0.0), 1.0)
            out.append(SPARK_BLOCKS[round(frac * top)])
    return "".join(out)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _one_line(text: str) -> str:
    return _shown(" ".join(text.split()))


# Text from a server (generated, or an error message) must not drive the terminal
# (clear it, set its title, write the clipboard with OSC 52, rewrite the line above).
_TERMINAL_ESCAPES: Final = control_escapes(keep="\t\n")


def _shown(text: str) -> str:
    return text.translate(_TERMINAL_ESCAPES)


# -- connection settings --------------------------------------------------------------


@final
@attrs.frozen
class _Target:
    """Where to connect: ``base_url = None`` means an embedded reference server."""

    base_url: str | None
    api_key: str = attrs.field(repr=False)  # (a repr lands in tracebacks' locals)
    grpc_url: str | None
    model: str = ""
    #: --timeout: the bound on each wait for the server (None: the library's own).
    timeout: float | None = None
    #: grpc_url is POC_GRPC_URL's (not --grpc-url's): the client's errors say so.
    grpc_from_env: bool = False

    def stream_timeouts(self) -> _StreamTimeouts:
        """A Generate stream's keyword arguments for ``timeout``: the first token
        and each next one are waits; the stream as a whole is not."""
        return {"first_token_timeout": self.timeout, "token_timeout": self.timeout}


class _StreamTimeouts(TypedDict):
    first_token_timeout: float | None
    token_timeout: float | None


class _ClientTimeouts(TypedDict, total=False):
    timeout: float
    connect_timeout: float
    close_timeout: float


class _FloatRange(click.FloatRange):
    """click's ``FloatRange``, less NaN: it compares false with both bounds, so
    click lets it through to a constructor that then raises outside ``_run``."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if isinstance(rv, float) and math.isnan(rv):
            self.fail(f"{value!r} is not a number.", param, ctx)
        return rv


def _check_text(value: str, hint: str, *, empty_ok: bool = False) -> None:
    """A usage error (exit 2, before any work) for text the client would refuse."""
    if not value and not empty_ok:
        raise click.BadParameter("must not be empty", param_hint=hint)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # argv bytes that are not UTF-8 (surrogateescape)
        raise click.BadParameter(
            f"is not UTF-8 text ({value[exc.start : exc.end]!r} at {exc.start})", param_hint=hint
        ) from None


@final
class _Text:
    """A TEXT argument: checked at once as given, or for ``-`` standard input,
    read whole by :meth:`read` as the command runs (under :func:`_run`, so that a
    Ctrl-C while it waits ends as any command's, and a failed read is one error
    line). As a usage error (exit 2): what :func:`_check_text` refuses, or input
    that is not UTF-8. One final newline of the input is dropped (``echo`` and
    here-documents add it)."""

    def __init__(self, value: str, hint: str) -> None:
        self.value = value
        self._hint = hint
        if value != "-":
            _check_text(value, hint)

    def read(self) -> None:
        if self.value != "-":
            return
        if sys.stdin is None:  # (fd 0 closed)
            raise click.BadParameter(
                "- reads standard input, which is closed", param_hint=self._hint
            )
        try:
            data = sys.stdin.buffer.read()
        except OSError as exc:  # (a descriptor open for writing only, say)
            raise CliError(
                f"cannot read {self._hint} from standard input: {exc.strerror or exc}"
            ) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise click.BadParameter(
                f"standard input is not UTF-8 text (byte {exc.start})", param_hint=self._hint
            ) from None
        text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
        _check_text(text, self._hint)
        self.value = text


def _check_url(value: str, what: str) -> str:
    try:
        parts = urlsplit(value)  # ("Invalid IPv6 URL" for an unclosed "[")
    except ValueError as exc:
        raise click.UsageError(f"invalid {what}: {exc}: {shown_url(value)!r}") from None
    try:
        _ = parts.port
    except ValueError:
        raise click.UsageError(f"invalid {what}: bad port in {shown_url(value)!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.UsageError(
            f"invalid {what}: expected http(s)://host:port/..., got {shown_url(value)!r}"
        )
    return value


@final
@attrs.frozen
class _Globals:
    url: str | None
    api_key: str | None = attrs.field(repr=False)
    grpc_url: str | None


def _target(url: str | None, api_key: str | None, grpc_url: str | None) -> _Target:
    """Command options first, then the group's, then the environment."""
    ctx = click.get_current_context()
    g = ctx.find_object(_Globals) or _Globals(None, None, None)
    base = url or g.url or os.environ.get(_ENV_URL) or None
    key = api_key if api_key is not None else g.api_key
    if key is None:
        key = os.environ.get(_ENV_KEY, "")
    try:  # what the client would refuse, as a usage error (before any server starts)
        check_api_key(key)
    except ValueError as exc:
        origin = "--api-key" if api_key is not None or g.api_key is not None else _ENV_KEY
        raise click.UsageError(f"invalid {origin}: {exc}") from None
    model = ctx.meta.get(_MODEL_KEY) or os.environ.get(_ENV_MODEL, "")
    # (as TEXT: argv bytes that are not UTF-8 fail only in the first call that sends it)
    _check_text(model, "--model" if ctx.meta.get(_MODEL_KEY) else _ENV_MODEL, empty_ok=True)
    timeout: float | None = ctx.meta.get(_TIMEOUT_KEY)
    grpc_flag = grpc_url or g.grpc_url
    if base is None:
        if grpc_flag:
            raise click.UsageError("--grpc-url needs --url (or POC_BASE_URL)")
        # POC_GRPC_URL is for remote servers; the embedded one has its own ports.
        return _Target(None, key, None, model, timeout)
    what = "--url" if url or g.url else _ENV_URL
    _check_url(base, what)
    grpc = grpc_flag or os.environ.get(_ENV_GRPC) or None
    grpc_what = "--grpc-url" if grpc_flag else _ENV_GRPC
    if grpc and grpc.startswith("dns:"):
        try:  # a pool of the name's addresses, as ApiClient(grpc_url="dns:///...") makes
            parse_grpc_targets(grpc)
        except ValueError as exc:
            raise click.UsageError(f"invalid {grpc_what}: {exc}") from None
    elif grpc:
        _check_url(grpc, grpc_what)
    try:  # what the client would refuse, as a usage error (before any work)
        check_base_url(base.rstrip("/"))
        resolve_grpc_url(base, grpc, env={})
    except ValueError as exc:
        raise click.UsageError(f"invalid {what}: {_as_options(str(exc))}") from None
    if grpc and not grpc.startswith("dns:"):
        try:
            GrpcTarget.from_url(grpc)
        except ValueError as exc:
            raise click.UsageError(f"invalid {grpc_what}: {exc}") from None
    from_env = bool(grpc) and not grpc_flag
    return _Target(base.rstrip("/"), key, grpc, model, timeout, grpc_from_env=from_env)


def _keep_model(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value is not None:  # a command's own --model wins over the group's
        ctx.meta[_MODEL_KEY] = value


def _keep_timeout(ctx: click.Context, _: click.Parameter, value: float | None) -> None:
    if value is not None:  # (as --model)
        ctx.meta[_TIMEOUT_KEY] = value


def _url_option(func: Callable[..., T]) -> Callable[..., T]:
    opts = [
        click.option(
            "--url",
            metavar="URL",
            default=None,
            help=f"Server HTTP root, e.g. http://127.0.0.1:8000/v1 [env {_ENV_URL}]. "
            "Default: start an embedded reference server.",
        ),
        click.option(
            "--api-key",
            metavar="KEY",
            default=None,
            help=f"Bearer token for the server [env {_ENV_KEY}]. Never printed.",
        ),
        click.option(
            "--grpc-url",
            metavar="URL",
            default=None,
            help=(
                f"gRPC endpoint [env {_ENV_GRPC}, read with a --url only]. "
                "Default: the --url port + 1."
            ),
        ),
        click.option(
            "--model",
            metavar="NAME",
            default=None,
            expose_value=False,
            callback=_keep_model,
            help=f"Model name to send [env {_ENV_MODEL}]. Default: the server's only one.",
        ),
        click.option(
            "--timeout",
            metavar="SECONDS",
            type=_FloatRange(0.0, 1e9, min_open=True),
            default=None,
            expose_value=False,
            callback=_keep_timeout,
            help="Bound on each wait for the server: connecting, each HTTP request, "
            "each gRPC call, the first token and each next one, a whole score, "
            "closing a session. Default: 600 s for an HTTP request, 30 s to connect, "
            "5 s to close, none for other gRPC calls.",
        ),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


@final
class _Where:
    """The endpoints in use, for error messages (filled in once known)."""

    def __init__(self) -> None:
        self.base_url: str | None = None
        self.grpc_url: str | None = None
        #: Endpoints that have answered: one lost later is "unavailable", not
        #: "cannot reach" (a new connection to a killed server is refused).
        self.reached: set[str] = set()

    def answered(self, url: str | None) -> None:
        if url is not None:
            self.reached.add(url)


@final
@attrs.frozen
class _Conn:
    client: ApiClient
    server: ReferenceServer | None


def _client_timeouts(target: _Target) -> _ClientTimeouts:
    """``ApiClient``'s keyword arguments for ``--timeout`` (none without it)."""
    if target.timeout is None:
        return {}
    t = target.timeout
    return {"timeout": t, "connect_timeout": min(30.0, t), "close_timeout": min(5.0, t)}


@protected_asynccontextmanager
async def _connect(target: _Target, where: _Where, *, seed: int = 0) -> AsyncIterator[_Conn]:
    """A client for ``target``; an embedded reference server when it has no URL."""
    if target.base_url is None:
        # Not poc_api.testing: that module imports pytest when it is installed.
        config = ServerConfig(seed=seed, api_key=target.api_key or None)
        async with ReferenceServer(config) as server:
            where.base_url, where.grpc_url = server.base_url, server.grpc_url
            client = ApiClient(
                server.base_url,
                api_key=target.api_key,
                grpc_url=server.grpc_url,
                model=target.model,
                trust_env=False,  # (its own server, on loopback: never through a proxy)
                **_client_timeouts(target),
            )
            async with client:
                yield _Conn(client, server)
        return
    grpc_url = target.grpc_url
    if target.grpc_from_env and grpc_url and not grpc_url.startswith("dns:"):
        # Left for the client to read (the same variable): its connection errors
        # then say "(from POC_GRPC_URL)", not a URL the user seems to have passed.
        grpc_url = None
    client = ApiClient(
        target.base_url,
        api_key=target.api_key,
        grpc_url=grpc_url,
        model=target.model,
        **_client_timeouts(target),
    )
    # Redacted, as error messages are: _describe looks for it in them.
    where.base_url, where.grpc_url = shown_url(client.base_url), client.grpc_url
    async with client:
        yield _Conn(client, None)


# -- text <-> ids --------------------------------------------------------------------


@final
class _Codec:
    """Text to token ids and back with the server's tokenizer endpoints.

    A server without them (``/tokenize`` answers 404) gets the reference
    tokenizer's byte-level rule instead: ids below 256 are UTF-8 bytes.
    """

    def __init__(
        self, client: ApiClient, where: _Where, on_fallback: Callable[[], None] | None = None
    ) -> None:
        self.client = client
        self._where = where
        self._on_fallback = on_fallback
        self.byte_level = False
        self._single: dict[int, str] = {}
        self._specials: frozenset[int] | None = None

    def fall_back(self, exc: e.HttpError) -> None:
        if exc.http_status not in _NO_ENDPOINT:
            raise exc
        if not self.byte_level:
            self.byte_level = True
            if self._on_fallback is not None:
                self._on_fallback()
            else:
                # Right for the reference server's byte-level tokenizer only: a
                # base_url missing its /v1 would otherwise go on in silence.
                _Stdout.end_line()
                base = self._where.base_url
                hint = (
                    " (does --url lack its /v1?)"
                    if base is not None and urllib.parse.urlsplit(base).path in ("", "/")
                    else ""
                )
                _echo(
                    f"warning: {_one_line(str(exc))}: using the byte-level rule instead "
                    f"(ids < 256 are UTF-8 bytes), right only for a byte-level tokenizer{hint}",
                    err=True,
                )

    async def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        if not self.byte_level:
            try:
                ids = await self.client.tokenize(text)
            except e.HttpError as exc:
                self.fall_back(exc)
            else:
                self._where.answered(self._where.base_url)
                return ids
        return list(text.encode("utf-8"))

    async def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD)."""
        if not self.byte_level:
            try:
                decoded = await self.client.detokenize(ids)
            except e.HttpError as exc:
                self.fall_back(exc)
            else:
                self._where.answered(self._where.base_url)
                return decoded
        return _byte_level(ids, _utf8(), final=True)

    async def specials(self) -> frozenset[int]:
        """The tokenizer's special ids (``/tokenizer``), not shown as text; none
        when the server does not say (no such endpoint, or any failure: this is
        for display only)."""
        if self._specials is None:
            found: frozenset[int] = frozenset()
            if not self.byte_level:
                try:
                    found = frozenset((await self.client.tokenizer_info())["special"].values())
                except e.PocApiError as exc:  # (the text's own calls say what fails)
                    _logger.debug("no special token ids to leave out of the text: %s", exc)
            self._specials = found
        return self._specials

    async def piece(self, token: int) -> str:
        """The text of one token, cached."""
        if token not in self._single:
            self._single[token] = await self.decode([token])
        return self._single[token]


@final
class _LiveText:
    """Writes decoded tokens as text while they stream in.

    Runs as its own task fed through a channel, so decoding (an HTTP round trip
    per batch) never delays reading the stream, and the timings stay honest.
    With the server's tokenizer, a :class:`TextDecoder` writes what each batch
    adds (a character's first bytes wait for the rest): together, the text of
    all the ids. The byte-level rule decodes its bytes incrementally instead.
    """

    def __init__(self, codec: _Codec, write: Callable[[str], None]) -> None:
        self._codec = codec
        self._write = write
        self._start()

    def _start(self) -> None:
        # (Special ids are left out here: the codec knows them, or shows them.)
        self._decoder = self._codec.client.text_decoder(skip_special_tokens=False)
        self._bytes = _utf8()
        #: Ids fed to the decoder while it has written nothing: for the
        #: byte-level rule if the server turns out to have no /detokenize.
        self._unwritten: list[int] | None = []

    async def run(self, receive: trio.MemoryReceiveChannel[int]) -> None:
        # Each stream (the demo runs several through one) decoded from its own
        # start: after the last one's ids, a character it ended in the first
        # bytes of was completed by this one's.
        self._start()
        async with receive:
            async for first in receive:
                batch = [first]
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                # Special tokens (the end-of-sequence a completion stops on) are
                # not text: left out, as tokenizers' skip_special_tokens does.
                specials = await self._codec.specials()
                text = await self._decode([i for i in batch if i not in specials])
                if text:
                    self._write(text)
        if text := await self._decode([], final=True):
            self._write(text)

    async def _decode(self, ids: list[int], *, final: bool = False) -> str:
        if not self._codec.byte_level:
            if self._unwritten is not None:
                self._unwritten += ids
            try:
                text = await (self._decoder.flush() if final else self._decoder.feed(ids))
            except e.HttpError as exc:
                self._codec.fall_back(exc)
                ids = self._unwritten if self._unwritten is not None else ids
                self._unwritten = None
            else:
                if text:
                    self._unwritten = None
                return text
        return _byte_level(ids, self._bytes, final=final)


def _utf8() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _byte_level(ids: Sequence[int], utf8: codecs.IncrementalDecoder, *, final: bool) -> str:
    """The byte-level rule: ids below 256 are UTF-8 bytes (invalid ones U+FFFD),
    others ``<|id|>``. Through ``utf8``, a decoder kept across calls, a character
    whose bytes come in two calls comes whole; ``final`` flushes what it holds."""
    text = []
    run = bytearray()
    for i in ids:
        if i < 256:
            run.append(i)
        else:
            text.append(utf8.decode(bytes(run), final=True) + f"<|{i}|>")
            run.clear()
    text.append(utf8.decode(bytes(run), final=final))
    return "".join(text)


# -- streaming with timings --------------------------------------------------------


@final
class _Timing:
    """Time to first token and decode rate of one stream."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def tick(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.tokens += 1

    @property
    def ttft(self) -> float | None:
        """Seconds from the request to the first decoded token."""
        return None if self.first is None else self.first - self.started

    @property
    def rate(self) -> float | None:
        """Decoded tokens per second after the first one."""
        if self.first is None or self.last is None or self.tokens < 2:
            return None
        span = self.last - self.first
        return (self.tokens - 1) / span if span > 0 else math.inf


@final
@attrs.frozen(eq=False)
class _Reply:
    ids: list[int]
    readouts: list[memoryview[float]]
    finish_reason: str
    usage: Usage | None
    timing: _Timing


_Events = (
    AbstractAsyncContextManager[GenerateStream] | AbstractAsyncContextManager[ConversationStream]
)


async def _pump(
    open_events: Callable[[], _Events], live: _LiveText | None, label: str, where: _Where
) -> _Reply:
    """Run one generate stream, feeding decoded ids to ``live`` as they arrive."""
    ids: list[int] = []
    readouts: list[memoryview[float]] = []
    finish, usage = "", None
    send, receive = trio.open_memory_channel[int](_LIVE_BUFFER)
    try:
        async with trio.open_nursery() as nursery:
            if live is not None:
                start_tasks(nursery, live.run, (receive,))
            else:
                receive.close()
            async with send:
                timing = _Timing(label)
                async with open_events() as events:
                    async for ev in events:
                        where.answered(where.grpc_url)
                        if isinstance(ev, Token | TokenOut):
                            if isinstance(ev, Token) and ev.is_prefill:
                                continue
                            timing.tick()
                            ids.append(ev.id)
                            if isinstance(ev, TokenOut) and ev.readout is not None:
                                readouts.append(ev.readout)
                            if live is not None:
                                await send.send(ev.id)
                        elif isinstance(ev, Done | StreamDone):
                            finish, usage = ev.finish_reason, ev.usage
    except BaseExceptionGroup as group:
        # One real failure (the stream's or the printer's) is raised as itself.
        leaf = _leaf(group)
        if leaf is group:
            raise
        raise leaf from None
    return _Reply(ids, readouts, finish, usage, timing)


# -- output helpers ---------------------------------------------------------------------


def _console() -> Console:
    # Not a terminal (CI, a pipe): plain text, 80 columns, no colour codes.
    return _Console(highlight=False)


def _show_char(text: str) -> str:
    if text == " ":
        return "␣"
    if text == "\n":
        return "⏎"
    if len(text) == 1 and text.isprintable():
        return text
    return "·"


async def _readout_table(
    manifest: ReadoutManifest, reply: _Reply, codec: _Codec, *, title: str
) -> Table:
    """Per concept: a sparkline over the generated tokens at the last readout layer."""
    n_layers, n_concepts = manifest.shape
    layer = n_layers - 1
    series = [[float(r[layer, c]) for r in reply.readouts] for c in range(n_concepts)]
    table = Table(title=title, box=box.SIMPLE, title_justify="left", pad_edge=False)
    table.add_column("concept", no_wrap=True)
    table.add_column("per generated token", no_wrap=True)
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    # Readouts come with decoded tokens only, so they line up with the ids.
    chars = [_show_char(await codec.piece(t)) for t in reply.ids[: len(reply.readouts)]]
    table.add_row("(token)", "".join(chars), "", "")
    for name, values in zip(manifest.concepts, series, strict=True):
        # The server names the concepts: shown as text (not rich markup), escaped.
        shown = Text(_shown(name))
        table.add_row(shown, sparkline(values), f"{min(values):.2f}", f"{max(values):.2f}")
    return table


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return "∞" if math.isinf(rate) else f"{rate:,.0f}"


# -- running a command ---------------------------------------------------------------


def _leaf(exc: BaseException) -> BaseException:
    """The one real error inside (nested) exception groups, if there is one."""
    while isinstance(exc, BaseExceptionGroup):
        inner = exc.exceptions
        real = [x for x in inner if not isinstance(x, trio.Cancelled)]
        if len(real) != 1:
            return exc
        exc = real[0]
    return exc


def _describe(exc: BaseException, where: _Where) -> str | None:
    """The one-line message for an expected failure; ``None`` for a bug."""
    said = _describe_as_library(exc, where)
    # The library names its arguments (model=, base_url); here they are options.
    if said is not None:
        said = said.replace(NO_MODEL_SET, f"--model (or {_ENV_MODEL}) is not set")
        said = said.replace(PASS_MODEL, "pass --model")
        said = said.replace(IS_BASE_URL, "is --url ")
        said = _as_options(said)
    return said


def _as_options(said: str) -> str:
    """The library's words for a derived gRPC URL, in the CLI's options."""
    said = said.replace(PORT_PLUS_ONE, "--url's port + 1: ")
    return said.replace(PASS_GRPC_URL, "pass --grpc-url")


def _describe_as_library(exc: BaseException, where: _Where) -> str | None:
    if isinstance(exc, e.TransportError):
        msg = str(exc)
        url = where.base_url
        if where.base_url is None or where.base_url not in msg:
            url = where.grpc_url or where.base_url
        if isinstance(exc, e.PocApiTimeout):
            return f"the server at {url} did not answer in time ({msg})"
        if exc.retriable and url not in where.reached:  # (nothing sent; never heard from)
            return f"cannot reach the server at {url} ({msg})"
        # Perhaps reached, and lost: the message says which.
        return f"the server at {url} is unavailable ({msg})"
    if isinstance(exc, e.AuthenticationError):
        if exc.grpc_status == "PERMISSION_DENIED" or exc.http_status == 403:
            return f"the server refused the request: permission denied ({exc})"
        return f"the server refused the api key ({exc})"
    if isinstance(exc, e.PocApiError | CliError):
        return str(exc)
    if isinstance(exc, ValueError) and str(exc).startswith(NO_MODEL_SET):
        return str(exc)  # (an argument missing, not a bad one)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    if isinstance(exc, ValueError | TypeError):
        return f"bad argument: {exc}"
    return None


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's own exits with status 1; _run ends every command's broken pipe
        # the same way (quietly, 141). (rich < 14 has no hook: the error comes.)
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (so a broken pipe is
    our output's, not a connection's)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll(), no real stdout
        return False


# The client's close, of the sessions whose CloseSession never got through
# (_transport.py, _give_up_unclosed).
_LEFT_TO_EVICTION = "session(s) whose CloseSession did not get through"


class _WarningLines(logging.Handler):
    """poc_api's log records (WARNING and above) on stderr as one-line
    ``poc_api warning: ...`` (``poc_api error: ...``), as the command's own errors
    are shown (logging's last resort printed them bare, before the ``error:`` line).

    A failed ``CloseSession`` is held back until the command ends (:meth:`told`):
    when the command failed too, most often for the same reason, it is one short
    line after the command's own error, not a long one before it.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._closes: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and (
            record.msg.startswith("CloseSession ") or _LEFT_TO_EVICTION in record.msg
        ):
            # (The client's close says how many timed-out closes it gave up on: a
            # close failure too, told with the others.)
            self._closes.append(record)
            return
        self._show(record)

    def told(self, *, failed: bool) -> None:
        """Show the held-back close failures: in short after a failed command."""
        records, self._closes = self._closes, []
        each = any(isinstance(r.msg, str) and r.msg.startswith("CloseSession ") for r in records)
        for record in records:
            if not failed:
                self._show(record)
                continue
            if _LEFT_TO_EVICTION in str(record.msg):
                if not each:  # (else it repeats the lines of those sessions)
                    self._show(record)
                continue
            session = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            with contextlib.suppress(OSError):  # (as the error line's own echo)
                _echo(
                    f"poc_api {record.levelname.lower()}: session {session} was not closed "
                    "either (CloseSession failed); the server frees it when idle",
                    err=True,
                )

    def _show(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                # One line, as errors are (POC_DEBUG=1 shows the traceback).
                exc = record.exc_info[1]
                message = f"{message}: {type(exc).__name__}: {exc}"
            _Stdout.end_line()
            # Not "error:" for an ERROR record: that prefix is the command's own failure.
            _echo(f"poc_api {record.levelname.lower()}: {_one_line(message)}", err=True)
        except Exception:
            self.handleError(record)


@contextmanager
def _warnings_as_lines(handler: _WarningLines) -> Iterator[None]:
    """``handler`` on the ``poc_api`` logger while a command runs, unless logging
    is set up (``POC_DEBUG=1``, or a program that runs the CLI in its own process
    with handlers of its own)."""
    logger = logging.getLogger("poc_api")
    if logger.handlers or logging.getLogger().handlers:
        yield
        return
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _run(body: Callable[[_Where], None], *, warning_lines: bool = True) -> None:
    """Run a command body, reporting a failure as one ``error:`` line (exit status 1).

    ``warning_lines``: poc_api's log records of WARNING and above as one-line
    ``poc_api warning: ...`` (``serve`` keeps logging's own output, tracebacks and all).
    """
    where = _Where()
    _Stdout.mid_line = False
    lines = _WarningLines()
    try:
        with _warnings_as_lines(lines) if warning_lines else contextlib.nullcontext():
            body(where)
    except (click.exceptions.Exit, click.ClickException, SystemExit):
        lines.told(failed=False)
        raise
    except BaseException as exc:
        try:
            _report(exc, where)
        finally:
            lines.told(failed=True)
    else:
        lines.told(failed=False)


def _report(exc: BaseException, where: _Where) -> NoReturn:
    """Say how the command failed (one ``error:`` line), and exit with its status."""
    leaf = _leaf(exc)
    if not isinstance(leaf, BrokenPipeError):
        _Stdout.end_line()
    if isinstance(leaf, KeyboardInterrupt):
        _echo("error: interrupted", err=True)
        sys.exit(130)
    if isinstance(leaf, _EndedBySignal):
        with contextlib.suppress(OSError):  # (a hung-up terminal's stderr may be gone)
            _echo(f"error: {leaf}", err=True)
        sys.exit(128 + leaf.signum)
    if isinstance(leaf, BrokenPipeError) and _stdout_reader_gone():
        # The reader of our output went away (`| head`): its choice, not an
        # error. Quiet, with the status of a process SIGPIPE killed, as Unix
        # tools end; stdout to /dev/null so the exit's flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    if isinstance(leaf, click.ClickException | click.exceptions.Exit | SystemExit):
        raise leaf from None
    message = _describe(leaf, where)
    if message is None:
        if os.environ.get("POC_DEBUG") == "1":
            raise exc  # (the traceback, whole)
        message = (
            f"unexpected {type(leaf).__name__}: {leaf} "
            "(set POC_DEBUG=1 for a traceback; this is a bug in poc_api)"
        )
    _echo(f"error: {_one_line(message)}", err=True)
    sys.exit(1)


#: Signals a client command ends on as on Ctrl-C: its calls cancelled, its
#: sessions closed; then the status of a process the signal killed.
_END_SIGNALS: Final = (
    {signal.SIGTERM: "terminated", signal.SIGHUP: "hung up"} if sys.platform != "win32" else {}
)


def _end_signals() -> list[signal.Signals]:
    """:data:`_END_SIGNALS` but those ignored (``nohup``: a SIGHUP ignored when the
    command started stays ignored, as Python keeps an ignored SIGINT)."""
    return [s for s in _END_SIGNALS if signal.getsignal(s) != signal.SIG_IGN]


@final
class _EndedBySignal(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(_END_SIGNALS[signal.Signals(signum)])
        self.signum = signum


async def _until_signal(body: Callable[[_Where], Awaitable[None]], where: _Where) -> None:
    """Run ``body``; SIGTERM or SIGHUP cancels it (so it unwinds as under Ctrl-C:
    streams reset, sessions closed), then raises :class:`_EndedBySignal`."""
    ends = _end_signals()
    if not ends:
        await body(where)
        return
    got: list[int] = []
    with trio.open_signal_receiver(*ends) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    got.append(signum)
                    nursery.cancel_scope.cancel()
                    return

            start_tasks(nursery, watch, ())
            await body(where)
            nursery.cancel_scope.cancel()
    if got:
        raise _EndedBySignal(got[0])


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM or SIGHUP raise :class:`_EndedBySignal` (before ``trio.run``, in a
    read of stdin: their default killed the process, with no ``error:`` line)."""

    def end(signum: int, frame: object) -> None:
        raise _EndedBySignal(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.signal(signum, end) for signum in _end_signals()}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _run_async(body: Callable[[_Where], Awaitable[None]], *, text: _Text | None = None) -> None:
    """:func:`_run` for an async body, under ``trio.run``; ``text`` is read first."""

    def run(where: _Where) -> None:
        if text is not None:
            with _signals_raise():
                text.read()
        trio.run(_until_signal, body, where)

    _run(run)


# -- the command group -----------------------------------------------------------------


class _Group(click.Group):
    """A group that treats a bare ``poc-api`` as a usage error (exit 2) on every
    click version (before 8.2, click printed the help and exited 0)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and not ctx.resilient_parsing:
            click.echo(ctx.get_help(), err=True, color=ctx.color)
            ctx.exit(2)
        return super().parse_args(ctx, args)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@_url_option
@click.version_option(package_name="poc_api", prog_name="poc-api")
@click.pass_context
def cli(ctx: click.Context, url: str | None, api_key: str | None, grpc_url: str | None) -> None:
    """Client and reference server for stateful LLM inference over salience gRPC.

    Without --url (or POC_BASE_URL), demo/generate/score/chat run against an
    embedded reference server started inside the process.
    """
    ctx.obj = _Globals(url, api_key, grpc_url)


# -- demo ------------------------------------------------------------------------------

_DEMO_PREFIX = "A photo of a quiet garden, taken in 1984: "
_DEMO_AFTER_IMAGE = " In the picture"
_DEMO_TURN1 = "Once upon a time, in a small town, THE"
_DEMO_TURN2 = " And then the storm came."
_DEMO_SCORE_PROMPT = "The cat sat on the"
_DEMO_CONTINUATIONS = (" mat.", " xylophone.")


@cli.command()
@_url_option
def demo(url: str | None, api_key: str | None, grpc_url: str | None) -> None:
    """Tour the library: session, image, streaming, readouts, scoring, reuse, timings."""
    target = _target(url, api_key, grpc_url)
    _run_async(lambda where: _demo(target, where))


async def _vision_brackets(client: ApiClient) -> tuple[list[int], list[int]]:
    """``([vision_start], [vision_end])`` from ``GET /tokenizer``; empty lists without it."""
    try:
        info = await client.tokenizer_info()
    except e.HttpError as exc:
        if exc.http_status in _NO_ENDPOINT:
            return [], []
        raise
    except e.ProtocolViolation:  # a /tokenizer of another shape: no brackets known
        return [], []
    start, end = info["special"].get("vision_start"), info["special"].get("vision_end")
    if start is not None and end is not None:
        return [start], [end]
    return [], []


async def _demo(target: _Target, where: _Where) -> None:
    con = _console()
    started = time.perf_counter()
    timings: list[_Timing] = []
    con.rule("[bold]poc_api demo", style="blue")
    async with _connect(target, where) as conn:
        client, server = conn.client, conn.server
        if server is not None:
            con.print(f"server: embedded reference server (seed {server.config.seed})")
        else:
            con.print("server: remote")
        con.print(f"  HTTP {shown_url(client.base_url)}  ·  gRPC {client.grpc_url}")

        def note_fallback() -> None:
            con.print(
                "[yellow]note:[/] the server has no /tokenize endpoint; "
                "using the byte-level rule (ids < 256 are UTF-8 bytes)"
            )

        codec = _Codec(client, where, note_fallback)

        def write_live(text: str) -> None:
            with _Stdout.lock:
                con.print(_shown(text), end="", style="cyan", markup=False, soft_wrap=True)
                _Stdout.wrote(text)

        live = _LiveText(codec, write_live)

        # 1 + 2: a session holding text and an image, then a live greedy stream.
        con.print()
        con.rule("[bold]1. Session: text, then an image", align="left")
        async with client.session(timeout=target.timeout) as session:
            prefix = await codec.encode(_DEMO_PREFIX)
            start, end = await _vision_brackets(client)
            await session.prefill(prefix + start, timeout=target.timeout)
            con.print(
                f"prefill  {json.dumps(_DEMO_PREFIX)}\n"
                f"         {_count(len(prefix), 'token')} "
                f"({'byte-level fallback' if codec.byte_level else 'via /tokenize'})"
                + (f" + vision_start {start}" if start else "")
                + f" → committed_len {session.committed_len}"
            )
            png = encode_png(56, 56)
            appended = await session.append_image(png, "image/png", timeout=target.timeout)
            con.print(
                f"image    56x56 PNG, {len(png)} bytes → placeholder_count "
                f"[bold]{appended.placeholder_count}[/] → committed_len {appended.total_length}"
            )
            if not start:
                con.print("         (no special ids from /tokenizer: the image is not bracketed)")

            con.print()
            con.rule("[bold]2. Streaming generation (greedy)", align="left")
            after = end + await codec.encode(_DEMO_AFTER_IMAGE)
            sampling = SamplingParams(max_tokens=48, temperature=0.0)
            con.print(
                f"prompt continues with {f'vision_end {end} + ' if end else ''}"
                f"{json.dumps(_DEMO_AFTER_IMAGE)}; output:"
            )
            write_live(_DEMO_AFTER_IMAGE)
            reply = await _pump(
                lambda: session.generate(after, sampling=sampling, **target.stream_timeouts()),
                live,
                "2. generation",
                where,
            )
            con.print()
            con.print(
                f"finish_reason {reply.finish_reason!r} · {_count(len(reply.ids), 'token')} · "
                f"committed_len {session.committed_len}"
            )
            timings.append(reply.timing)

        # 3 + 5: one conversation, two turns; the first one with readouts.
        con.print()
        con.rule("[bold]3. Readouts", align="left")
        manifest = await client.readout_manifest()
        if manifest is None:
            con.print("readout is disabled on this server (the manifest answered 404): skipped")
        else:
            con.print(
                f"manifest: {len(manifest.concepts)} concepts x layers {list(manifest.layers)} "
                f"→ readout shape {manifest.shape}"
            )
        async with client.conversation() as conv:
            turn1 = await codec.encode(_DEMO_TURN1)
            chunks1: list[Chunk] = [Tokens(turn1)]
            con.print(f"prompt {json.dumps(_DEMO_TURN1)}; output:")
            write_live(_DEMO_TURN1)
            r1 = await _pump(
                lambda: conv.stream(
                    chunks1,
                    SamplingParams(max_tokens=32),
                    readout_shape=None if manifest is None else manifest.shape,
                    **target.stream_timeouts(),
                ),
                live,
                "3. conversation turn 1",
                where,
            )
            con.print()
            timings.append(r1.timing)
            if manifest is not None:
                if r1.readouts:
                    con.print(
                        await _readout_table(
                            manifest,
                            r1,
                            codec,
                            title=f"layer {manifest.layers[-1]} (the last), scaled per concept",
                        )
                    )
                else:
                    con.print("the server sent no readout vectors of the manifest's shape")

            # 4: scoring (one ephemeral session: the prompt is prefilled once).
            con.rule("[bold]4. Scoring two continuations", align="left")
            prompt = await codec.encode(_DEMO_SCORE_PROMPT)
            conts = [await codec.encode(c) for c in _DEMO_CONTINUATIONS]
            counted = server.state().tokens_appended if server is not None else 0
            results = await client.score_continuations(
                [Tokens(prompt)], conts, timeout=target.timeout
            )
            counted = server.state().tokens_appended - counted if server is not None else 0
            scored = [
                (cont_text, len(cont), result.logprob)
                for cont_text, cont, result in zip(_DEMO_CONTINUATIONS, conts, results, strict=True)
            ]
            table = Table(box=box.SIMPLE, pad_edge=False)
            table.add_column("continuation")
            table.add_column("tokens", justify="right")
            table.add_column("log P (sum)", justify="right")
            table.add_column("per token", justify="right")
            for cont_text, n, lp in scored:
                table.add_row(json.dumps(cont_text), str(n), f"{lp:.3f}", f"{lp / n:.3f}")
            con.print(f"prompt {json.dumps(_DEMO_SCORE_PROMPT)}")
            con.print(table)
            con.print(
                _positions_line(
                    len(prompt), [len(c) for c in conts], counted if server is not None else None
                ),
                soft_wrap=True,  # one line, for people and for grep
            )
            best = max(scored, key=lambda s: s[2])
            worst = min(scored, key=lambda s: s[2])
            con.print(
                f"more likely: [bold]{json.dumps(best[0])}[/] "
                f"({best[2] - worst[2]:.2f} nats higher: "
                f"{math.exp(min(best[2] - worst[2], 700.0)):.3g} times as likely)"
            )

            # 5: the second turn sends only the delta.
            con.print()
            con.rule("[bold]5. Reusing the conversation: only the delta is sent", align="left")
            sid = conv.session.session_id if conv.session is not None else "?"
            user2 = await codec.encode(_DEMO_TURN2)
            full = [*turn1, *r1.ids, *user2]
            before = conv.committed_len
            appended_before = server.state().tokens_appended if server is not None else 0
            con.print(f"turn 2 adds {json.dumps(_DEMO_TURN2)}; output:")
            write_live(_DEMO_TURN2)
            r2 = await _pump(
                lambda: conv.stream(
                    [Tokens(full)], SamplingParams(max_tokens=24), **target.stream_timeouts()
                ),
                live,
                "5. conversation turn 2",
                where,
            )
            con.print()
            timings.append(r2.timing)
            after_len = conv.committed_len
            prompt_tokens = r2.usage.prompt_tokens if r2.usage is not None else before
            sent = prompt_tokens - before
            same = conv.session is not None and conv.session.session_id == sid
            reuse = Table(box=box.SIMPLE, pad_edge=False)
            reuse.add_column("")
            reuse.add_column("positions", justify="right")
            reuse.add_row("turn 2 prompt (whole history)", str(len(full)))
            reuse.add_row("committed_len before turn 2", str(before))
            reuse.add_row("tokens sent in turn 2 (the delta)", f"[bold]{sent}[/]")
            reuse.add_row("committed_len after turn 2", str(after_len))
            con.print(reuse)
            con.print(
                f"session reused: {'yes' if same else 'no'} · sent {sent} of {len(full)} "
                f"prompt tokens (delta = {len(user2)} new tokens)"
            )
            if server is not None:
                counted = server.state().tokens_appended - appended_before
                con.print(f"the server counted {counted} appended tokens for turn 2")

        # 6: timings.
        con.print()
        con.rule("[bold]6. Timings", align="left")
        tt = Table(box=box.SIMPLE, pad_edge=False)
        tt.add_column("stream")
        tt.add_column("tokens", justify="right")
        tt.add_column("time to first token", justify="right")
        tt.add_column("tokens/s (decode)", justify="right")
        for t in timings:
            tt.add_row(t.label, str(t.tokens), _ms(t.ttft), _rate(t.rate))
        con.print(tt)
        con.print(f"demo finished in {time.perf_counter() - started:.2f} s")


# -- generate -------------------------------------------------------------------------


@cli.command()
@click.argument("text")
@_url_option
@click.option(
    "--max-tokens",
    type=click.IntRange(0, 2**32 - 1),
    default=64,
    show_default=True,
    help="Decode budget.",
)
@click.option(
    "--temperature",
    type=_FloatRange(0.0, 1e6),
    default=0.0,
    show_default=True,
    help="0 is greedy.",
)
@click.option(
    "--top-p",
    type=_FloatRange(0.0, 1.0),
    default=1.0,
    show_default=True,
    help="Nucleus filter; 1 is off.",
)
@click.option(
    "--top-k",
    type=click.IntRange(0, 2**32 - 1),
    default=0,
    show_default=True,
    help="Top-k filter; 0 is off.",
)
@click.option(
    "--seed",
    type=click.IntRange(0),
    default=None,
    help="Seed of the embedded reference server's sampler. The protocol has no seed "
    "field, so this cannot be combined with --url.",
)
@click.option(
    "--readout",
    is_flag=True,
    help="Also show per-concept readouts (last layer) across the generated tokens.",
)
def generate(
    text: str,
    url: str | None,
    api_key: str | None,
    grpc_url: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    readout: bool,
) -> None:
    """Stream the completion of TEXT (- reads it from stdin) to stdout as it arrives."""
    prompt = _Text(text, "TEXT")
    target = _target(url, api_key, grpc_url)
    if seed is not None and target.base_url is not None:
        raise click.UsageError(
            "--seed only applies to the embedded reference server: the salience "
            "protocol has no seed field"
        )
    sampling = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k
    )
    _run_async(
        lambda where: _generate(target, where, prompt.value, sampling, seed or 0, readout),
        text=prompt,
    )


def _write_stdout(text: str) -> None:
    # To a terminal, escaped; to a pipe or file, the text as generated.
    if sys.stdout is None:  # fd 1 closed: written nowhere, as print() does
        return
    with _Stdout.lock:
        sys.stdout.write(_shown(text) if sys.stdout.isatty() else text)
        sys.stdout.flush()
        _Stdout.wrote(text)


class _Stdout:
    """Whether the text streamed to stdout has left its line open: a warning or an
    error shown while it is, on the same terminal, first ends that line, so that
    the two do not run together. (In a file or a pipe, stdout holds the text as
    generated: nothing is added to it.)"""

    mid_line = False
    #: Warnings may come from the client's loop thread too.
    lock = threading.Lock()

    @classmethod
    def wrote(cls, text: str) -> None:
        if text:
            cls.mid_line = not text.endswith("\n")

    @classmethod
    def end_line(cls) -> None:
        with cls.lock:
            if not cls.mid_line:
                return
            cls.mid_line = False
            if sys.stdout is None or sys.stderr is None:  # (fd 1 or 2 closed: no line)
                return
            try:
                if sys.stdout.isatty() and sys.stderr.isatty():
                    sys.stdout.write("\n")
                    sys.stdout.flush()
            except (OSError, ValueError):  # (a closed or broken stdout: nothing to end)
                pass


async def _generate(
    target: _Target,
    where: _Where,
    text: str,
    sampling: SamplingParams,
    seed: int,
    readout: bool,
) -> None:
    async with _connect(target, where, seed=seed) as conn:
        client = conn.client
        manifest = None
        if readout:
            manifest = await client.readout_manifest()
            if manifest is None:
                raise CliError("readout is disabled on this server (the manifest answered 404)")
        codec = _Codec(client, where)
        ids = await codec.encode(text)
        if not ids:
            raise CliError("TEXT encodes to no tokens")
        await codec.specials()  # (before the stream: the text waits for nothing then)
        async with client.conversation() as conv:
            reply = await _pump(
                lambda: conv.stream(
                    [Tokens(ids)],
                    sampling,
                    readout_shape=None if manifest is None else manifest.shape,
                    **target.stream_timeouts(),
                ),
                _LiveText(codec, _write_stdout),
                "generate",
                where,
            )
        _write_stdout("\n")
        if manifest is not None:
            con = _console()
            if reply.readouts:
                con.print(
                    await _readout_table(
                        manifest, reply, codec, title=f"readouts, layer {manifest.layers[-1]}"
                    )
                )
            elif not reply.ids:  # (--max-tokens 0: readouts come with decoded tokens)
                con.print("no token was decoded, so there are no readouts to show")
            else:
                con.print("the server sent no readout vectors of the manifest's shape")


# -- score ---------------------------------------------------------------------------


@cli.command()
@click.argument("text")
@click.option(
    "--continuation",
    "-c",
    "continuations",
    multiple=True,
    required=True,
    help="A continuation of TEXT to score (repeat the option for more).",
)
@_url_option
def score(
    text: str,
    continuations: tuple[str, ...],
    url: str | None,
    api_key: str | None,
    grpc_url: str | None,
) -> None:
    """Score continuations of TEXT (- reads it from stdin): summed log-probability,
    best first.

    Prints one row per continuation: rank, summed logprob (natural log), the
    per-token average, the token count and the continuation as a JSON string;
    then, after a blank line, how many positions were sent: TEXT is prefilled
    once and each continuation appended after a rewind to its end.
    """
    prompt = _Text(text, "TEXT")
    for c in continuations:
        _check_text(c, "--continuation")
    target = _target(url, api_key, grpc_url)
    _run_async(lambda where: _score(target, where, prompt.value, continuations), text=prompt)


async def _score(target: _Target, where: _Where, text: str, continuations: tuple[str, ...]) -> None:
    async with _connect(target, where) as conn:
        client = conn.client
        codec = _Codec(client, where)
        prompt = await codec.encode(text)
        conts: list[list[int]] = []
        for cont_text in continuations:
            cont = await codec.encode(cont_text)
            if not cont:
                raise CliError(f"continuation {json.dumps(cont_text)} encodes to no tokens")
            conts.append(cont)
        appended = conn.server.state().tokens_appended if conn.server is not None else 0
        results = await client.score_continuations([Tokens(prompt)], conts, timeout=target.timeout)
        if conn.server is not None:
            appended = conn.server.state().tokens_appended - appended
    lengths = [len(c) for c in conts]
    rows = sorted(
        zip(continuations, lengths, (r.logprob for r in results), strict=True),
        key=lambda row: -row[2],
    )
    _echo(f"{'rank':>4}  {'logprob':>10}  {'per-token':>10}  {'tokens':>6}  continuation")
    for rank, (cont_text, n, lp) in enumerate(rows, 1):
        _echo(
            f"{rank:>4}  {lp:>10.4f}  {lp / n:>10.4f}  {n:>6}  "
            f"{json.dumps(cont_text, ensure_ascii=False)}"
        )
    _echo()
    _echo(_positions_line(len(prompt), lengths, appended if conn.server is not None else None))


def _positions_line(prompt_len: int, lengths: Sequence[int], counted: int | None) -> str:
    """How many positions scoring sent, against scoring each full prompt on its own."""
    sent = prompt_len + sum(lengths)
    separate = len(lengths) * prompt_len + sum(lengths)
    return (
        f"positions sent: {sent:,} (prompt {prompt_len:,} once + continuations "
        f"{sum(lengths):,}; one full prompt each would send {separate:,})"
        + (f"; the server counted {counted:,}" if counted is not None else "")
    )


# -- chat ----------------------------------------------------------------------------


@cli.command()
@click.argument("text")
@_url_option
@click.option("--system", default=None, help="A system message to put first.")
@click.option(
    "--max-tokens",
    type=click.IntRange(1, 2**31 - 1),  # OpenAI's field is an int32
    default=64,
    show_default=True,
    help="Reply budget.",
)
@click.option(
    "--temperature",
    type=_FloatRange(0.0, 1e6),
    default=None,
    help="0 is greedy. Default: the server's (the reference server's is 0).",
)
@click.option(
    "--top-p",
    type=_FloatRange(0.0, 1.0),
    default=None,
    help="Nucleus filter; 1 is off. Default: the server's.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**64 - 1),  # (what the library sends: an int64 or uint64)
    default=None,
    help="Sent as the OpenAI 'seed' field (the reference server honours it).",
)
def chat(
    text: str,
    url: str | None,
    api_key: str | None,
    grpc_url: str | None,
    system: str | None,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
) -> None:
    """OpenAI-compatible chat (POST /chat/completions, streamed), printed live.

    TEXT is the user's message; - reads it from stdin.
    """
    prompt = _Text(text, "TEXT")
    if system is not None:
        _check_text(system, "--system", empty_ok=True)
    target = _target(url, api_key, grpc_url)
    extra: dict[str, Any] = {} if seed is None else {"seed": seed}

    def chat_body(where: _Where) -> Awaitable[None]:
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": prompt.value})
        return _chat(target, where, messages, max_tokens, temperature, top_p, extra)

    _run_async(chat_body, text=prompt)


async def _chat(
    target: _Target,
    where: _Where,
    messages: list[dict[str, str]],
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    extra: dict[str, Any],
) -> None:
    async with _connect(target, where) as conn:
        async with conn.client.chat_stream(
            messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, **extra
        ) as events:
            async for ev in events:
                if isinstance(ev, ChatDelta):
                    _write_stdout(ev.text)
        _write_stdout("\n")


# -- serve ---------------------------------------------------------------------------

_DEFAULTS = ServerConfig()


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65534),
    default=8000,
    show_default=True,
    help="HTTP port; gRPC listens on PORT+1. 0 picks a free pair.",
)
@click.option(
    "--api-key",
    metavar="KEY",
    default=None,
    help=f"Require this bearer token [env {_ENV_KEY}].",
)
@click.option("--no-readout", is_flag=True, help="Disable readout (the manifest answers 404).")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="Sampler seed.")
@click.option(
    "--max-sessions",
    type=click.IntRange(1),
    default=_DEFAULTS.max_sessions,
    show_default=True,
    help="Most sessions open at once; opening one more is refused (RESOURCE_EXHAUSTED).",
)
@click.option(
    "--idle-timeout",
    type=_FloatRange(0.0, 1e9),
    default=_DEFAULTS.idle_timeout,
    show_default=True,
    help="Seconds before an idle session is evicted (0: never).",
)
@click.option(
    "--max-context",
    type=click.IntRange(1, 2**32 - 1),  # (positions are uint32 on the wire)
    default=_DEFAULTS.max_context,
    show_default=True,
    help="Context window of a session, in positions; appending past it is refused (OUT_OF_RANGE).",
)
@click.option("--ignore-eos", is_flag=True, help="Never stop at the model's EOS token.")
@click.option(
    "--max-message-size",
    type=click.IntRange(1),
    default=_DEFAULTS.max_message_size,
    show_default=True,
    help="Largest gRPC message taken or sent, in bytes.",
)
@click.option(
    "--n-layers",
    type=click.IntRange(1, 1024),
    default=_DEFAULTS.n_layers,
    show_default=True,
    help="Layers of each readout (n_layers x n_concepts floats per token).",
)
@click.option(
    "--model-name",
    default=_DEFAULTS.model_name,
    show_default=True,
    help="The model's name (GET /models, chat answers).",
)
@click.option(
    "--prefill-delay-us",
    type=_FloatRange(0.0, 1e6),
    default=_DEFAULTS.prefill_delay_us,
    show_default=True,
    help="Simulated GPU time per prefilled position, in microseconds (0 = off).",
)
@click.option(
    "--token-delay-ms",
    type=_FloatRange(0.0, 1e6),
    default=_DEFAULTS.token_delay_ms,
    show_default=True,
    help="Simulated GPU time per decoded token, in milliseconds (0 = off).",
)
@click.option(
    "--prefill-slots",
    type=click.IntRange(0),
    default=_DEFAULTS.prefill_slots,
    show_default=True,
    help="At most this many simulated prefills at once (0 = unlimited).",
)
def serve(
    host: str,
    port: int,
    api_key: str | None,
    no_readout: bool,
    seed: int,
    max_sessions: int,
    idle_timeout: float,
    max_context: int,
    ignore_eos: bool,
    max_message_size: int,
    n_layers: int,
    model_name: str,
    prefill_delay_us: float,
    token_delay_ms: float,
    prefill_slots: int,
) -> None:
    """Run the reference server until Ctrl-C / SIGTERM (HTTP on PORT, gRPC on PORT+1).

    Prints "base_url: ..." and "grpc_url: ..." on stdout once both ports listen.
    """
    ctx = click.get_current_context()
    g = ctx.find_object(_Globals)
    if g is not None and (g.url or g.grpc_url):
        # (POC_BASE_URL and POC_GRPC_URL, ambient settings for the client commands,
        # are not looked at.)
        raise click.UsageError(
            "--url and --grpc-url are for the client commands; serve listens on "
            "--host and --port (gRPC on PORT+1)"
        )
    if ctx.meta.get(_MODEL_KEY):  # (POC_MODEL, as the URLs, is not looked at)
        raise click.UsageError(
            "--model is for the client commands; serve names its model with --model-name"
        )
    if ctx.meta.get(_TIMEOUT_KEY) is not None:
        raise click.UsageError("--timeout is for the client commands; serve waits on nothing")
    key = api_key if api_key is not None else (g.api_key if g is not None else None)
    origin = "--api-key" if key is not None else _ENV_KEY
    if key is None:
        key = os.environ.get(_ENV_KEY) or None
    try:  # a key no client's header can carry: a server no client could use
        check_api_key(key or "")
    except ValueError as exc:
        raise click.UsageError(f"invalid {origin}: {exc}") from None
    if not model_name.strip():  # (a name no client could ask for)
        raise click.UsageError("--model-name must not be empty")
    config = ServerConfig(
        host=host,
        port=port,
        api_key=key or None,
        readout=not no_readout,
        seed=seed,
        max_sessions=max_sessions,
        idle_timeout=idle_timeout,
        max_context=max_context,
        ignore_eos=ignore_eos,
        max_message_size=max_message_size,
        n_layers=n_layers,
        model_name=model_name,
        prefill_delay_us=prefill_delay_us,
        token_delay_ms=token_delay_ms,
        prefill_slots=prefill_slots,
    )

    def body(where: _Where) -> None:
        where.base_url = f"http://{host}:{port}/v1"
        try:
            run_forever(config)
        except BrokenPipeError:  # the reader of its URLs went away: _run ends quietly
            raise
        except OSError as exc:  # its message names the host and port
            raise CliError(exc.strerror or str(exc)) from exc

    _run(body, warning_lines=False)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``poc-api`` console script."""
    for stream in (sys.stdout, sys.stderr):
        # What the terminal's encoding cannot show becomes "?", not an error that
        # ends the command (PYTHONIOENCODING=ascii, an old locale).
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="replace")
    stdout = sys.stdout
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="poc-api")
    except SystemExit as exc:
        # Text click writes itself (`poc-api --help | true`) to a reader that left:
        # click ends that with status 1 and swaps in its own sys.stdout. The
        # reader's choice, as for a command's own output (`_report`): status 141.
        if exc.code == 1 and sys.stdout is not stdout and _stdout_reader_gone():
            sys.exit(128 + signal.SIGPIPE)
        raise
    except OSError as exc:
        # Text click writes itself (--help, --version, a usage error) that could not
        # be written (a full disk, a closed stream): one line, as a command's own.
        with contextlib.suppress(OSError, ValueError):
            _echo(f"error: {exc.strerror or exc}", err=True)
        # What is still buffered for them goes nowhere: the exit's own flush would
        # fail again ("Exception ignored", and status 120).
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    os.dup2(devnull, stream.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
