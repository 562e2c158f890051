"""The HTTP side of the client: readout manifest, train, chat, tokenizer endpoints.

:class:`HttpApi` wraps an ``httpx.AsyncClient`` (owned by ``ApiClient``); httpx
runs on trio natively. Everything here is JSON under ``base_url`` (PROTOCOL.md §5),
plus OpenAI-compatible ``/chat/completions`` with Server-Sent Events decoded by
:class:`~poc_api._sse.SSEDecoder`.

Errors:

- a 4xx/5xx answer raises :class:`~poc_api.HttpError` (401/403:
  :class:`~poc_api.AuthenticationError`) whose message holds the status, the URL and
  :func:`error_excerpt` of the body;
- a body that is not UTF-8 JSON of the expected shape raises
  :class:`~poc_api.ProtocolViolation`;
- httpx's own exceptions are translated in exactly one place,
  :func:`_map_httpx_errors`: timeouts to :class:`~poc_api.PocApiTimeout`, lost or
  refused connections to :class:`~poc_api.ServerUnavailable`, unparseable HTTP to
  :class:`~poc_api.ProtocolViolation`.

The api key travels only in the ``authorization`` header. It is never put in an
exception message or a log line, and is redacted from body excerpts in case a
server echoes it back.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Final, NoReturn, final

import attrs
import httpx
import trio

from ._errors import (
    AuthenticationError,
    HttpError,
    PocApiError,
    PocApiTimeout,
    ProtocolViolation,
    ServerUnavailable,
)
from ._sse import SSEDecoder, SSEEvent
from ._types import ReadoutManifest, TrainResult, TrainSample, Usage

__all__ = [
    "ChatCompletion",
    "ChatDelta",
    "ChatDone",
    "ChatEvent",
    "HttpApi",
    "error_excerpt",
]

log = logging.getLogger("poc_api.http")

#: Body characters kept in an error message (PROTOCOL.md §5).
EXCERPT_LIMIT: Final = 500
#: Bytes of an error body read from a streaming response: enough for the excerpt,
#: bounded so an endless error body cannot hold the caller.
_ERROR_BODY_READ_LIMIT: Final = 4 * EXCERPT_LIMIT
#: Closing a response is local work; the bound only guards a wedged transport.
_CLOSE_TIMEOUT: Final = 5.0
_RESERVED_CHAT_KEYS: Final = frozenset({"messages", "stream", "stream_options"})
_U32_MAX: Final = 2**32 - 1


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
class ChatCompletion:
    """A non-streaming chat completion: the first choice's text, why it stopped, usage."""

    text: str
    finish_reason: str
    usage: Usage | None


@final
@attrs.frozen
class ChatDelta:
    """A piece of streamed chat text."""

    text: str


@final
@attrs.frozen
class ChatDone:
    """Last event of a chat stream (after ``data: [DONE]``)."""

    finish_reason: str
    usage: Usage | None


ChatEvent = ChatDelta | ChatDone


@contextlib.contextmanager
def _map_httpx_errors(method: str, url: str) -> Iterator[None]:
    """The one place where httpx exceptions become poc_api exceptions."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise PocApiTimeout(f"{method} {url}: timed out ({type(exc).__name__})") from exc
    except httpx.RemoteProtocolError as exc:
        # h11 reports both "the peer went away" and "the peer sent garbage" this way.
        text = str(exc)
        if any(s in text for s in ("disconnected", "closed connection", "incomplete")):
            raise ServerUnavailable(f"{method} {url}: connection lost: {text}") from exc
        raise ProtocolViolation(f"{method} {url}: malformed HTTP response: {text}") from exc
    except httpx.DecodingError as exc:
        raise ProtocolViolation(f"{method} {url}: undecodable response body: {exc}") from exc
    except httpx.TransportError as exc:
        # ConnectError, ReadError, WriteError, CloseError, ProxyError, ...
        raise ServerUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc


def _decode_json(body: bytes, what: str) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation(f"{what}: body is not UTF-8 ({exc.reason})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolViolation(f"{what}: malformed JSON: {exc}") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape_error(what: str, expected: str, got: object) -> NoReturn:
    raise ProtocolViolation(f"{what}: expected {expected}, got {_short_repr(got)}")


def _short_repr(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_usage(value: object, what: str) -> Usage | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        _shape_error(what, "a usage object", value)
    fields = ("prompt_tokens", "completion_tokens", "total_tokens")
    if not all(_is_int(value.get(f)) for f in fields):
        _shape_error(what, "integer usage fields " + ", ".join(fields), value)
    return Usage(*(value[f] for f in fields))


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
        if "content" not in message:
            raise ValueError(f"messages[{i}] has no 'content'")
        content = message["content"]
        if not isinstance(content, str | list):
            raise TypeError(f"messages[{i}]['content'] must be a str or a list of parts")
        out.append(dict(message))
    return out


def _check_number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


@final
class HttpApi:
    """The HTTP endpoints of one server, over a caller-owned ``httpx.AsyncClient``.

    ``ApiClient`` builds one per client; the readout manifest is cached on it.

    Args:
        client: the httpx client (its timeouts apply to every request).
        base_url: the HTTP root without a trailing ``/``, e.g. ``http://h:8000/v1``.
        api_key: sent as ``authorization: Bearer <key>`` when not empty.
        model: the model name sent with ``/train`` and ``/chat/completions``.

    Every coroutine is a checkpoint. Cancelling one abandons its request: httpx
    closes the connection it was using, the pool stays usable, nothing is cached.

    Example::

        async with httpx.AsyncClient() as http:
            api = HttpApi(http, "http://127.0.0.1:8000/v1", "", "model")
            manifest = await api.readout_manifest()
    """

    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str, model: str) -> None:
        self._client = client
        self._base_url = base_url
        self._api_key = api_key
        self._model = model
        self._manifest_lock = trio.Lock()
        self._manifest_fetched = False
        self._manifest: ReadoutManifest | None = None

    def __repr__(self) -> str:
        return f"<HttpApi {self._base_url} model={self._model!r}>"

    # -- plumbing ------------------------------------------------------------------

    def _headers(self, accept: str = "application/json") -> dict[str, str]:
        headers = {"accept": accept}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        return headers

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "<redacted>") if self._api_key else text

    def _status_error(self, method: str, url: str, status: int, body: bytes) -> PocApiError:
        excerpt = self._redact(error_excerpt(body))
        message = f"HTTP {status} from {method} {url}: {excerpt}"
        if status in (401, 403):
            return AuthenticationError(message, http_status=status)
        return HttpError(message, http_status=status, url=url, body_excerpt=excerpt)

    async def _request(
        self, method: str, path: str, payload: object = None, *, allow_404: bool = False
    ) -> Any:
        """Send one JSON request; return the decoded JSON body (``None`` for an allowed 404)."""
        url = self._base_url + path
        log.debug("%s %s", method, url)
        started = time.monotonic()
        with _map_httpx_errors(method, url):
            response = await self._client.request(
                method,
                url,
                headers=self._headers(),
                json=payload,
            )
        body = response.content
        log.debug(
            "%s %s -> %d (%d bytes, %.1f ms)",
            method,
            url,
            response.status_code,
            len(body),
            (time.monotonic() - started) * 1000,
        )
        if allow_404 and response.status_code == 404:
            return None
        if not response.is_success:
            raise self._status_error(method, url, response.status_code, body)
        return _decode_json(body, f"{method} {url}")

    # -- endpoints -----------------------------------------------------------------

    async def readout_manifest(self) -> ReadoutManifest | None:
        """``GET /readout/manifest``: the readout manifest, or ``None`` when disabled (404).

        Fetched once per ``HttpApi`` and cached: concurrent first callers wait for a
        single request. A failed or cancelled fetch caches nothing, so the next caller
        tries again. Always a checkpoint.
        """
        if self._manifest_fetched:
            await trio.lowlevel.checkpoint()
            return self._manifest
        async with self._manifest_lock:
            if not self._manifest_fetched:
                self._manifest = await self._fetch_manifest()
                self._manifest_fetched = True
        return self._manifest

    async def _fetch_manifest(self) -> ReadoutManifest | None:
        what = f"GET {self._base_url}/readout/manifest"
        data = await self._request("GET", "/readout/manifest", allow_404=True)
        if data is None:
            log.debug("readout disabled on %s (404)", self._base_url)
            return None
        if not isinstance(data, dict):
            _shape_error(what, "an object", data)
        concepts, layers = data.get("concepts"), data.get("layers")
        if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
            _shape_error(what, '"concepts": [str]', concepts)
        if not isinstance(layers, list) or not all(_is_int(x) for x in layers):
            _shape_error(what, '"layers": [int]', layers)
        return ReadoutManifest(concepts=concepts, layers=layers)

    async def train(self, samples: Sequence[TrainSample]) -> TrainResult:
        """``POST /train``: submit training samples; returns the server's job.

        Raises ``TypeError`` before sending if a sample is not a :class:`TrainSample`.
        Cancelling abandons the request; the server may or may not have accepted it.
        """
        if isinstance(samples, str | bytes) or not isinstance(samples, Sequence):
            raise TypeError(f"samples must be a sequence of TrainSample, not {type(samples)}")
        for i, s in enumerate(samples):
            if not isinstance(s, TrainSample):
                raise TypeError(f"samples[{i}] must be a TrainSample, not {type(s).__name__}")
        payload = {
            "model": self._model,
            "samples": [
                {
                    "tokens": list(s.tokens),
                    "target_ranges": [[a, b] for a, b in s.target_ranges],
                    "weight": s.weight,
                }
                for s in samples
            ],
        }
        what = f"POST {self._base_url}/train"
        data = await self._request("POST", "/train", payload)
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

    async def tokenize(self, text: str) -> list[int]:
        """``POST /tokenize`` (reference-server extension): text to token ids.

        A checkpoint; cancelling abandons the request.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        what = f"POST {self._base_url}/tokenize"
        data = await self._request("POST", "/tokenize", {"text": text})
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
            _shape_error(what, '{"tokens": [int]}', data)
        return tokens

    async def detokenize(self, tokens: Sequence[int]) -> str:
        """``POST /detokenize`` (reference-server extension): token ids to text.

        Bad ids raise ``TypeError``/``ValueError`` before sending. A checkpoint;
        cancelling abandons the request.
        """
        if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
            raise TypeError("tokens must be a sequence of ints")
        for t in tokens:
            if not _is_int(t):
                raise TypeError(f"token ids must be ints, not {type(t).__name__}")
            if not 0 <= t <= _U32_MAX:
                raise ValueError(f"token id out of range: {t}")
        what = f"POST {self._base_url}/detokenize"
        data = await self._request("POST", "/detokenize", {"tokens": list(tokens)})
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(text, str):
            _shape_error(what, '{"text": str}', data)
        return text

    async def tokenizer_info(self) -> dict[str, Any]:
        """``GET /tokenizer`` (reference-server extension): ``vocab_size`` and special ids.

        A checkpoint; cancelling abandons the request.
        """
        data = await self._request("GET", "/tokenizer")
        if not isinstance(data, dict):
            _shape_error(f"GET {self._base_url}/tokenizer", "an object", data)
        return data

    # -- chat ----------------------------------------------------------------------

    def _chat_payload(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        stream: bool,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        stop: str | Sequence[str] | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self._model, "messages": _check_messages(messages)}
        if max_tokens is not None:
            if not _is_int(max_tokens):
                raise TypeError(f"max_tokens must be an int, not {type(max_tokens).__name__}")
            if max_tokens < 0:
                raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
            payload["max_tokens"] = max_tokens
        if temperature is not None:
            payload["temperature"] = _check_number("temperature", temperature, 0.0, math.inf)
        if top_p is not None:
            payload["top_p"] = _check_number("top_p", top_p, 0.0, 1.0)
        if stop is not None:
            stops = [stop] if isinstance(stop, str) else stop
            if not isinstance(stops, Sequence) or not all(isinstance(s, str) for s in stops):
                raise TypeError("stop must be a str or a sequence of str")
            payload["stop"] = list(stops)
        clash = _RESERVED_CHAT_KEYS & extra.keys()
        if clash:
            raise ValueError(f"chat() sets {sorted(clash)} itself")
        payload.update(extra)
        payload["stream"] = stream
        if stream:
            payload["stream_options"] = {"include_usage": True}
        try:
            json.dumps(payload, allow_nan=False)  # what httpx will do when sending
        except (TypeError, ValueError) as exc:
            raise TypeError(f"chat request is not JSON-serialisable: {exc}") from exc
        return payload

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        **extra: Any,
    ) -> ChatCompletion:
        """``POST /chat/completions`` without streaming: the first choice's text.

        ``messages`` are ``{"role": ..., "content": ...}`` mappings; ``extra`` keys are
        sent as they are (OpenAI parameters such as ``seed``). Bad arguments raise
        ``TypeError``/``ValueError`` before sending. Cancelling abandons the request.

        Example::

            done = await api.chat([{"role": "user", "content": "hi"}], max_tokens=16)
            print(done.text, done.finish_reason)
        """
        payload = self._chat_payload(
            messages,
            stream=False,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            extra=extra,
        )
        url = self._base_url + "/chat/completions"
        what = f"POST {url}"
        data = await self._request("POST", "/chat/completions", payload)
        if not isinstance(data, dict):
            _shape_error(what, "an object", data)
        if "error" in data:
            raise self._stream_error(url, response_status=200, error=data["error"])
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            _shape_error(what, '"choices": [{...}]', choices)
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            _shape_error(what, "a str message content", content)
        finish = choices[0].get("finish_reason")
        if finish is not None and not isinstance(finish, str):
            _shape_error(what, "a str finish_reason", finish)
        return ChatCompletion(
            text=content or "",
            finish_reason=finish or "",
            usage=_parse_usage(data.get("usage"), what),
        )

    @contextlib.asynccontextmanager
    async def chat_stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        **extra: Any,
    ) -> AsyncIterator[AsyncIterator[ChatEvent]]:
        """``POST /chat/completions`` with ``stream: true``: text deltas, then one ``ChatDone``.

        Entering the block sends the request and waits for the response headers
        (an error status raises here). Iterating yields :class:`ChatDelta` pieces
        and, after ``data: [DONE]``, a final :class:`ChatDone`; a stream that ends
        before ``[DONE]`` raises :class:`~poc_api.ProtocolViolation`, an
        ``{"error": ...}`` chunk raises :class:`~poc_api.HttpError`.

        Leaving the block — after the last event, by ``break``, by an exception or
        by cancellation — closes the response (shielded, bounded): an unfinished
        response's connection is dropped rather than returned to the pool half-read,
        so the client stays usable.

        Example::

            async with api.chat_stream(messages, max_tokens=32) as events:
                async for ev in events:
                    if isinstance(ev, ChatDelta):
                        print(ev.text, end="")
        """
        payload = self._chat_payload(
            messages,
            stream=True,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            extra=extra,
        )
        url = self._base_url + "/chat/completions"
        request = self._client.build_request(
            "POST",
            url,
            headers=self._headers(accept="text/event-stream"),
            json=payload,
        )
        log.debug("POST %s (stream)", url)
        with _map_httpx_errors("POST", url):
            response = await self._client.send(request, stream=True)
        events = _ChatEvents(self, response, url)
        try:
            await events.check_response()
            yield events
        finally:
            await events.aclose()

    def _stream_error(self, url: str, *, response_status: int, error: object) -> HttpError:
        """An ``{"error": ...}`` object inside a 200 answer, as an :class:`HttpError`.

        Its ``code``, when it is an HTTP error status, becomes ``http_status``.
        """
        status = response_status
        message: object = error
        code: object = None
        if isinstance(error, dict):
            message = error.get("message", error)
            code = error.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
            status = code
        text = self._redact(message if isinstance(message, str) else json.dumps(message))
        excerpt = error_excerpt(text.encode())
        return HttpError(
            f"POST {url}: server error (HTTP {status}): {excerpt}",
            http_status=status,
            url=url,
            body_excerpt=excerpt,
        )


@final
class _ChatEvents:
    """The async iterator behind :meth:`HttpApi.chat_stream` (a class, not an async
    generator, so that abandoning it leaves nothing for the garbage collector)."""

    def __init__(self, api: HttpApi, response: httpx.Response, url: str) -> None:
        self._api = api
        self._response = response
        self._url = url
        self._what = f"POST {url}"
        self._chunks = response.aiter_bytes()
        self._decoder = SSEDecoder()
        self._queue: deque[ChatEvent] = deque()
        self._finished = False  # [DONE] seen or the stream failed: read no more
        self._finish_reason = ""
        self._usage: Usage | None = None

    async def check_response(self) -> None:
        status = self._response.status_code
        if not self._response.is_success:
            body = bytearray()
            with _map_httpx_errors("POST", self._url):
                async for chunk in self._chunks:
                    body += chunk
                    if len(body) >= _ERROR_BODY_READ_LIMIT:
                        break
            log.debug("POST %s -> %d (stream refused)", self._url, status)
            raise self._api._status_error("POST", self._url, status, bytes(body))
        ctype = self._response.headers.get("content-type", "")
        if not ctype.lower().startswith("text/event-stream"):
            raise ProtocolViolation(
                f"{self._what}: expected text/event-stream, got {ctype or 'no content-type'!r}"
            )
        log.debug("POST %s -> %d (streaming)", self._url, status)

    def __aiter__(self) -> _ChatEvents:
        return self

    async def __anext__(self) -> ChatEvent:
        while not self._queue:
            if self._finished:
                raise StopAsyncIteration
            with _map_httpx_errors("POST", self._url):
                try:
                    chunk: bytes | None = await self._chunks.__anext__()
                except StopAsyncIteration:
                    chunk = None
            if chunk is None:
                self._finished = True
                self._decoder.close()
                raise ProtocolViolation(f"{self._what}: event stream ended before [DONE]")
            for sse in self._decoder.feed(chunk):
                self._handle(sse)
                if self._finished:
                    break
        return self._queue.popleft()

    def _handle(self, sse: SSEEvent) -> None:
        if sse.data == "[DONE]":
            self._finished = True
            self._queue.append(ChatDone(self._finish_reason, self._usage))
            return
        try:
            data = json.loads(sse.data)
        except json.JSONDecodeError as exc:
            self._finished = True
            raise ProtocolViolation(f"{self._what}: malformed JSON in event stream: {exc}") from exc
        if sse.event == "error" or (isinstance(data, dict) and "error" in data):
            self._finished = True
            error = data.get("error", data) if isinstance(data, dict) else data
            raise self._api._stream_error(
                self._url, response_status=self._response.status_code, error=error
            )
        if not isinstance(data, dict):
            self._finished = True
            _shape_error(self._what, "a chunk object", data)
        choices = data.get("choices") or []
        if not isinstance(choices, list):
            self._finished = True
            _shape_error(self._what, '"choices": [...]', choices)
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                self._queue.append(ChatDelta(content))
            finish = choice.get("finish_reason")
            if isinstance(finish, str):
                self._finish_reason = finish
        if data.get("usage") is not None:
            self._usage = _parse_usage(data["usage"], self._what)

    async def aclose(self) -> None:
        """Release the response: shielded so cancellation cannot leak the connection."""
        self._finished = True
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            try:
                close_chunks = getattr(self._chunks, "aclose", None)
                if close_chunks is not None:
                    await close_chunks()
                await self._response.aclose()
            except Exception as exc:
                # The connection is being thrown away; a failure to close it politely
                # must not replace the exception (or result) the caller already has.
                log.debug("closing %s failed: %r", self._url, exc)
