"""The HTTP/1.1 side (h11 over asyncio streams): readout manifest, train, chat, tokenizer.

Routes (under ``/v1`` unless noted), all JSON:

- ``GET /v1/readout/manifest``, ``POST /v1/train`` (proto/PROTOCOL.md §5)
- ``POST /v1/chat/completions`` and legacy ``POST /v1/completions`` (OpenAI-compatible,
  :mod:`._openai`; ``stream: true`` answers SSE)
- ``GET /v1/models``, ``GET /v1/models/{id}``
- ``GET /v1/tokenizer``, ``POST /v1/tokenize``, ``POST /v1/detokenize``
- ``GET /health`` and ``GET /admin/state`` (no auth; the latter is for tests only)

Routing is a table of ``(method, path pattern) -> handler``; a handler returns a JSON
object or, for streams, an async iterator of SSE bytes. Every answer carries an
``x-request-id`` (the client's own, if it sent one). Errors are OpenAI-shaped:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import secrets
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Final, final

import h11

from ._model import SPECIAL_NAMES, VOCAB_SIZE, detokenize, tokenize
from ._openai import ChatRequest, CompletionRequest, OpenAIError, error_body, is_int, is_number
from ._state import Runtime

__all__ = ["HttpApp", "HttpError"]

log = logging.getLogger("poc_api.server.http")

_READ_SIZE: Final = 65536
_PUBLIC_PATHS: Final = frozenset({"/health", "/admin/state"})
_MAX_REQUEST_ID: Final = 200

#: The error every route raises; rendered as OpenAI's error object.
HttpError = OpenAIError


def _path(req: h11.Request) -> str:
    """The request's path: no query, no trailing slash."""
    path: str = req.target.decode("latin-1").split("?", 1)[0]
    return path.rstrip("/") if len(path) > 1 else path


def _error_json(e: OpenAIError) -> dict[str, Any]:
    return error_body(e.status, e.message, param=e.param, code=e.code)


def validate_train(body: Any) -> int:
    """Validate a ``/v1/train`` body (proto/PROTOCOL.md §5); returns the sample count."""
    if not isinstance(body, dict):
        raise HttpError(400, "body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise HttpError(400, "'model' must be a string")
    samples = body.get("samples")
    if not isinstance(samples, list):
        raise HttpError(400, "'samples' must be a list")
    for i, s in enumerate(samples):
        where = f"samples[{i}]"
        if not isinstance(s, dict):
            raise HttpError(400, f"{where} must be an object")
        tokens = s.get("tokens")
        if not isinstance(tokens, list) or not all(
            is_int(t) and 0 <= t < VOCAB_SIZE for t in tokens
        ):
            raise HttpError(400, f"{where}.tokens must be a list of ids in [0, {VOCAB_SIZE})")
        ranges = s.get("target_ranges")
        if not isinstance(ranges, list):
            raise HttpError(400, f"{where}.target_ranges must be a list")
        for r in ranges:
            ok = (
                isinstance(r, list)
                and len(r) == 2
                and is_int(r[0])
                and is_int(r[1])
                and 0 <= r[0] < r[1] <= len(tokens)
            )
            if not ok:
                raise HttpError(
                    400, f"{where}.target_ranges entry {r!r} is not [start, end] within the tokens"
                )
        if not is_number(s.get("weight")):
            raise HttpError(400, f"{where}.weight must be a finite number")
    return len(samples)


_Result = dict[str, Any] | AsyncGenerator[bytes, None]
# What a keep-alive client may send ahead (its next requests) while one is answered.
_PIPELINED_MAX: Final = 1 << 20
_Handler = Callable[[Any, dict[str, str]], Awaitable[_Result]]


@final
class HttpApp:
    """Serves one asyncio stream connection at a time per call of :meth:`handle`."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._jobs = itertools.count(1)
        # (method, full-match pattern) -> handler; path parameters are named groups.
        table: list[tuple[str, str, _Handler]] = [
            ("GET", "/health", self._health),
            ("GET", "/admin/state", self._admin_state),
            ("GET", "/v1/readout/manifest", self._manifest),
            ("POST", "/v1/train", self._train),
            ("POST", "/v1/chat/completions", self._chat),
            ("POST", "/v1/completions", self._completions),
            ("GET", "/v1/models", self._models),
            ("GET", "/v1/models/(?P<model>.+)", self._model),
            ("GET", "/v1/tokenizer", self._tokenizer),
            ("POST", "/v1/tokenize", self._tokenize),
            ("POST", "/v1/detokenize", self._detokenize),
        ]
        self._routes = [(m, re.compile(p), h) for m, p, h in table]
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def aclose(self) -> None:
        """Cancel every open connection and wait for them to finish."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        # Dropped, not closed: close() waits to flush what is buffered, which a
        # client that stopped reading (a streamed completion it left) never lets
        # happen, and the connection's task then waited in wait_closed() for good.
        for w in list(self._writers):
            w.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve HTTP/1.1 requests on one connection until it closes (keep-alive)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        try:
            while True:
                try:
                    request = await self._read_request(conn, reader, writer)
                except HttpError as e:
                    rid = e.request_id or _request_id({})
                    await self._send_json(conn, writer, e.status, _error_json(e), rid)
                    break
                except h11.RemoteProtocolError as e:
                    # h11's hint: 400, or 431 for headers over its limit.
                    status = e.error_status_hint
                    err = error_body(status, str(e))
                    await self._send_json(conn, writer, status, err, _request_id({}))
                    break
                if request is None:
                    break
                req, body = request
                await self._respond(conn, reader, writer, req, body)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.LocalProtocolError):
            pass
        except asyncio.CancelledError:
            # Server shutdown. This is the root of the connection's own task, and
            # on Python 3.11 asyncio.streams calls task.exception() on it, which
            # raises (and logs) if the task ends cancelled.
            pass
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            finally:
                self._writers.discard(writer)

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request, bytes] | None:
        limit = self._rt.config.max_message_size
        req: h11.Request | None = None
        body = bytearray()
        size = 0
        refused: tuple[dict[str, Any], str] | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    if refused is not None:  # its body is not wanted: answered now
                        assert req is not None
                        self._rt.stats.http(_path(req))
                        await self._send_json(conn, writer, 401, *refused)
                        return None
                    # "Expect: 100-continue" (curl's, for bodies over 1 KiB): the
                    # client would wait a second before sending the body anyway.
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                conn.receive_data(await reader.read(_READ_SIZE))
                continue
            if isinstance(event, h11.Request):
                req = event
                refused = self._refusal(req)
            elif isinstance(event, h11.Data):
                # A request without the key is answered 401 once read (its client
                # may still be sending it: an early answer and close could be
                # lost to the reset), but its body is not kept.
                size += len(event.data)
                if refused is None:
                    body += event.data
                if size > limit:
                    e = HttpError(413, f"body exceeds {limit} bytes")
                    assert req is not None
                    e.request_id = _request_id(
                        {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
                    )
                    raise e
            elif isinstance(event, h11.EndOfMessage):
                assert req is not None
                return req, bytes(body)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    def _refusal(self, req: h11.Request) -> tuple[dict[str, Any], str] | None:
        """The 401's body and request id, for a request without the server's key."""
        path = _path(req)
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
        if path in _PUBLIC_PATHS or self._rt.authorized(headers.get("authorization")):
            return None
        e = HttpError(401, "missing or wrong api key", code="invalid_api_key")
        return _error_json(e), _request_id(headers)

    def _route(self, method: str, path: str) -> tuple[_Handler, dict[str, str]]:
        allowed: list[str] = []
        for m, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if m == method:
                return handler, match.groupdict()
            allowed.append(m)
        if allowed:
            e = HttpError(405, f"{method} not allowed on {path}", code="method_not_allowed")
            e.allow = ", ".join(sorted(set(allowed)))  # a 405 MUST say (RFC 9110 15.5.6)
            raise e
        raise HttpError(404, f"no route for {path}", code="not_found")

    async def _respond(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: h11.Request,
        raw: bytes,
    ) -> None:
        method = req.method.decode()
        path = _path(req)
        self._rt.stats.http(path)
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
        request_id = _request_id(headers)
        try:
            if path not in _PUBLIC_PATHS and not self._rt.authorized(headers.get("authorization")):
                raise HttpError(401, "missing or wrong api key", code="invalid_api_key")
            handler, params = self._route(method, path)
            body: Any = None
            if method == "POST":
                try:
                    body = json.loads(raw) if raw else None
                    # A "\ud800" escape is JSON grammar but no character: refused
                    # like bytes that are not UTF-8, not left to crash a handler
                    # that encodes the string (the tokenizer).
                    json.dumps(body, ensure_ascii=False).encode()
                except ValueError as e:  # (UnicodeDecodeError and -EncodeError too)
                    raise HttpError(400, f"malformed JSON body: {e}") from None
                except RecursionError:
                    raise HttpError(400, "JSON body nested too deeply") from None
            result = await self._unless_client_leaves(conn, reader, handler(body, params))
        except HttpError as e:
            extra = [("allow", e.allow)] if e.allow else []
            await self._send_json(conn, writer, e.status, _error_json(e), request_id, extra)
            return
        except ConnectionError:
            raise  # (the client left: no one to answer)
        except Exception:
            # A handler's bug: the client gets a status to report, not a dropped
            # connection (the traceback goes to the log, where it is the server's).
            log.exception("HTTP %s %s failed", method, path)
            body_500 = error_body(500, "internal server error", code="internal_error")
            await self._send_json(conn, writer, 500, body_500, request_id)
            return
        if isinstance(result, dict):
            await self._send_json(conn, writer, 200, result, request_id)
        else:
            await self._send_events(conn, writer, result, request_id)

    @staticmethod
    async def _unless_client_leaves(
        conn: h11.Connection, reader: asyncio.StreamReader, work: Awaitable[_Result]
    ) -> _Result:
        """``work``, cancelled if the client closes the connection meanwhile.

        A non-streamed completion takes its whole decode time (token_delay_ms)
        before it writes a byte: a client that gave up must stop it, as a cancelled
        Generate stops. What a keep-alive client sends meanwhile (its next request)
        goes to h11's buffer, read after this answer.
        """
        task = asyncio.ensure_future(work)
        read: asyncio.Future[bytes] | None = None
        try:
            while True:
                if len(conn.trailing_data[0]) >= _PIPELINED_MAX:
                    # A client still sending is there: the rest waits in the kernel's
                    # buffers (backpressure), not in ours.
                    return await task
                read = asyncio.ensure_future(reader.read(_READ_SIZE))
                await asyncio.wait({task, read}, return_when=asyncio.FIRST_COMPLETED)
                if read.done():
                    data = read.result()
                    conn.receive_data(data)
                    if not data and not task.done():
                        raise ConnectionResetError("the client closed the connection")
                if task.done():  # (an answer that is ready goes out, even to a half-close)
                    return task.result()
        finally:
            for fut in (task, read):
                if fut is not None and not fut.done():
                    fut.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await fut

    async def _send_json(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        obj: Any,
        request_id: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        data = json.dumps(obj).encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(data))),
            ("x-request-id", request_id),
            *(extra or ()),
        ]
        if conn.their_state is not h11.DONE:
            # Answered before the request was read whole (an early 401 to one that
            # waits for 100 Continue, a 413, a malformed request): the connection
            # closes after it, and says so (RFC 9110 10.1.1), else the client may
            # send the rest of its request, or its next, into the reset.
            headers.append(("connection", "close"))
        # IDLE: the client's request could not even be read (h11 lets a server
        # answer that with an error). Anything else: a response is under way.
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        writer.write(conn.send(h11.Data(data=data)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _send_events(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        events: AsyncGenerator[bytes, None],
        request_id: str,
    ) -> None:
        headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("x-request-id", request_id),
        ]
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
        # Closed here, not whenever the garbage collector gets to it: a client that
        # leaves mid-stream ends the decode, and its finally counts what was decoded.
        async with contextlib.aclosing(events):
            async for event in events:
                writer.write(conn.send(h11.Data(data=event)))
                await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    # -- routes ------------------------------------------------------------

    async def _health(self, _body: Any, _params: dict[str, str]) -> _Result:
        return {"status": "ok"}

    async def _admin_state(self, _body: Any, _params: dict[str, str]) -> _Result:
        return self._rt.state().to_json()

    async def _manifest(self, _body: Any, _params: dict[str, str]) -> _Result:
        manifest = self._rt.manifest()
        if manifest is None:
            raise HttpError(404, "readout is disabled on this server", code="not_found")
        return manifest

    async def _train(self, body: Any, _params: dict[str, str]) -> _Result:
        n = validate_train(body)
        self._rt.stats.trained(n)
        return {"accepted": n, "job_id": f"train-{next(self._jobs)}-{secrets.token_hex(4)}"}

    async def _chat(self, body: Any, _params: dict[str, str]) -> _Result:
        chat = ChatRequest(self._rt, body)  # validates: a bad request is a 400 here
        return chat.events() if chat.stream else await chat.response()

    async def _completions(self, body: Any, _params: dict[str, str]) -> _Result:
        completion = CompletionRequest(self._rt, body)
        return completion.events() if completion.stream else await completion.response()

    def _model_object(self) -> dict[str, Any]:
        name = self._rt.config.model_name
        return {"id": name, "object": "model", "created": 0, "owned_by": "poc_api"}

    async def _models(self, _body: Any, _params: dict[str, str]) -> _Result:
        return {"object": "list", "data": [self._model_object()]}

    async def _model(self, _body: Any, params: dict[str, str]) -> _Result:
        # Percent-decoded: clients quote the id ("org/name" is sent as "org%2Fname").
        model = urllib.parse.unquote(params["model"])
        if model != self._rt.config.model_name:
            raise HttpError(
                404,
                f"The model '{model}' does not exist",
                param="model",
                code="model_not_found",
            )
        return self._model_object()

    async def _tokenizer(self, _body: Any, _params: dict[str, str]) -> _Result:
        return {
            "vocab_size": VOCAB_SIZE,
            "special": {name: i for i, name in SPECIAL_NAMES.items()},
        }

    async def _tokenize(self, body: Any, _params: dict[str, str]) -> _Result:
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise HttpError(400, "body must be {'text': str}")
        return {"tokens": tokenize(body["text"])}

    async def _detokenize(self, body: Any, _params: dict[str, str]) -> _Result:
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(
            is_int(t) and 0 <= t < VOCAB_SIZE for t in tokens
        ):
            raise HttpError(400, f"body must be {{'tokens': [int]}} with ids < {VOCAB_SIZE}")
        return {"text": detokenize(tokens)}


def _request_id(headers: dict[str, str]) -> str:
    """The client's ``x-request-id`` when it sent a sane one (as vLLM does), else new."""
    given = headers.get("x-request-id", "")
    if given and len(given) <= _MAX_REQUEST_ID and given.isascii() and given.isprintable():
        return given
    return "req_" + secrets.token_hex(16)
