"""The HTTP/1.1 side (h11 over asyncio streams): readout manifest, train, chat, tokenizer.

Routes (under ``/v1`` unless noted), all JSON:

- ``GET /v1/readout/manifest``, ``POST /v1/train`` (PROTOCOL.md §5)
- ``POST /v1/chat/completions`` (OpenAI-compatible; ``stream: true`` answers SSE)
- ``GET /v1/models``, ``GET /v1/tokenizer``, ``POST /v1/tokenize``, ``POST /v1/detokenize``
- ``GET /health`` and ``GET /admin/state`` (no auth; the latter is for tests only)
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, final

import h11

from ._model import EOS, SPECIAL_NAMES, VOCAB_SIZE, SamplingSpec, detokenize, tokenize
from ._state import Runtime

__all__ = ["HttpApp", "HttpError"]

log = logging.getLogger("poc_api.server.http")

_READ_SIZE: Final = 65536
_PUBLIC_PATHS: Final = frozenset({"/health", "/admin/state"})
_DEFAULT_CHAT_MAX_TOKENS: Final = 128


class HttpError(Exception):
    """An error answer: status code and message (sent as an OpenAI-style error body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error_body(status: int, message: str) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def validate_train(body: Any) -> int:
    """Validate a ``/v1/train`` body (PROTOCOL.md §5); returns the sample count."""
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
            _is_int(t) and 0 <= t < VOCAB_SIZE for t in tokens
        ):
            raise HttpError(400, f"{where}.tokens must be a list of ids in [0, {VOCAB_SIZE})")
        ranges = s.get("target_ranges")
        if not isinstance(ranges, list):
            raise HttpError(400, f"{where}.target_ranges must be a list")
        for r in ranges:
            ok = (
                isinstance(r, list)
                and len(r) == 2
                and _is_int(r[0])
                and _is_int(r[1])
                and 0 <= r[0] < r[1] <= len(tokens)
            )
            if not ok:
                raise HttpError(
                    400, f"{where}.target_ranges entry {r!r} is not [start, end] within the tokens"
                )
        if not _is_number(s.get("weight")):
            raise HttpError(400, f"{where}.weight must be a finite number")
    return len(samples)


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise HttpError(400, "message content must be a string or a list of text parts")


def chat_prompt(messages: Any) -> str:
    """The prompt text for chat ``messages``: ``role: content`` lines, then ``assistant: ``."""
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty list")
    lines = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise HttpError(400, "each message needs a string 'role'")
        lines.append(f"{m['role']}: {_message_text(m.get('content', ''))}\n")
    return "".join(lines) + "assistant: "


@final
class _Chat:
    """One chat completion: decodes with the same model and sampler as Generate."""

    def __init__(self, rt: Runtime, body: Any) -> None:
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        cfg = rt.config
        self.rt = rt
        self.model = body.get("model") or cfg.model_name
        if not isinstance(self.model, str):
            raise HttpError(400, "'model' must be a string")
        self.tokens = tokenize(chat_prompt(body.get("messages")))
        self.prompt_len = len(self.tokens)
        if self.prompt_len >= cfg.max_context:
            raise HttpError(400, f"prompt of {self.prompt_len} tokens exceeds the context window")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = _DEFAULT_CHAT_MAX_TOKENS
        if not _is_int(max_tokens) or max_tokens < 0:
            raise HttpError(400, "'max_tokens' must be a non-negative integer")
        self.max_tokens: int = max_tokens
        temperature = body.get("temperature", 0.0)
        top_p = body.get("top_p", 1.0)
        top_k = body.get("top_k", 0)
        seed = body.get("seed", cfg.seed)
        if not (_is_number(temperature) and _is_number(top_p) and _is_int(top_k)):
            raise HttpError(400, "temperature/top_p must be numbers and top_k an integer")
        if not _is_int(seed):
            raise HttpError(400, "'seed' must be an integer")
        self.spec = SamplingSpec(
            temperature=max(0.0, float(temperature)), top_k=top_k, top_p=float(top_p), seed=seed
        )
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise HttpError(400, "'stop' must be a string or a list of strings")
        self.stop: list[str] = stop
        self.stream = bool(body.get("stream", False))
        self.completion = 0
        self.finish_reason = "length"
        self.id = "chatcmpl-" + secrets.token_hex(8)
        self.created = int(time.time())

    async def pieces(self) -> AsyncIterator[str]:
        """Decode, yielding text as it becomes valid UTF-8; sets ``finish_reason``."""
        model, spec, tokens = self.rt.model, self.spec, self.tokens
        max_context = self.rt.config.max_context
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Text that could still be the start of a stop string is held back.
        hold = max((len(s) for s in self.stop), default=1) - 1
        text, sent, cut = "", 0, False
        try:
            while self.completion < self.max_tokens:
                if len(tokens) >= max_context:
                    self.finish_reason = "length"
                    break
                tok = spec.pick(model.dist(tokens), len(tokens), tokens)
                tokens.append(tok)
                self.completion += 1
                if tok == EOS and not self.rt.config.ignore_eos:
                    self.finish_reason = "stop"
                    break
                text += (
                    decoder.decode(bytes((tok,)))
                    if tok < 256
                    else f"<|{SPECIAL_NAMES.get(tok, tok)}|>"
                )
                hits = [i for i in (text.find(s, max(0, sent - hold)) for s in self.stop) if i >= 0]
                if hits:
                    text = text[: min(hits)]
                    self.finish_reason = "stop"
                    cut = True
                    break
                if len(text) - hold > sent:
                    yield text[sent : len(text) - hold]
                    sent = len(text) - hold
                if not self.completion % 64:
                    await asyncio.sleep(0)  # stay responsive on long decodes
            if not cut:
                text += decoder.decode(b"", final=True)
            if len(text) > sent:
                yield text[sent:]
        finally:
            self.rt.stats.decoded(self.completion)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_len,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt_len + self.completion,
        }

    def chunk(self, delta: dict[str, Any], finish: str | None, usage: bool = False) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage:
            obj["usage"] = self.usage()
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    async def response(self) -> dict[str, Any]:
        text = "".join([p async for p in self.pieces()])
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage(),
        }


_Handler = Callable[[Any], Awaitable[Any]]


@final
class HttpApp:
    """Serves one asyncio stream connection at a time per call of :meth:`handle`."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._jobs = itertools.count(1)
        self._routes: dict[tuple[str, str], _Handler] = {
            ("GET", "/health"): self._health,
            ("GET", "/admin/state"): self._admin_state,
            ("GET", "/v1/readout/manifest"): self._manifest,
            ("POST", "/v1/train"): self._train,
            ("GET", "/v1/models"): self._models,
            ("GET", "/v1/tokenizer"): self._tokenizer,
            ("POST", "/v1/tokenize"): self._tokenize,
            ("POST", "/v1/detokenize"): self._detokenize,
        }
        self._paths = {p for _, p in self._routes} | {"/v1/chat/completions"}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def aclose(self) -> None:
        """Cancel every open connection and wait for them to finish."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve HTTP/1.1 requests on one connection until it closes (keep-alive)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                try:
                    request = await self._read_request(conn, reader)
                except HttpError as e:
                    await self._send_json(conn, writer, e.status, _error_body(e.status, e.message))
                    break
                except h11.RemoteProtocolError as e:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self._send_json(conn, writer, 400, _error_body(400, str(e)))
                    break
                if request is None:
                    break
                req, body = request
                await self._respond(conn, writer, req, body)
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

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request, bytes] | None:
        limit = self._rt.config.max_message_size
        req: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(_READ_SIZE))
                continue
            if isinstance(event, h11.Request):
                req = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise HttpError(413, f"body exceeds {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert req is not None
                return req, bytes(body)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _respond(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, req: h11.Request, raw: bytes
    ) -> None:
        method = req.method.decode()
        path = req.target.decode("latin-1").split("?", 1)[0]
        if len(path) > 1:
            path = path.rstrip("/")
        self._rt.stats.http(path)
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
        try:
            if path not in _PUBLIC_PATHS and not self._rt.authorized(headers.get("authorization")):
                raise HttpError(401, "missing or wrong api key")
            if path not in self._paths:
                raise HttpError(404, f"no route for {path}")
            body: Any = None
            if method == "POST":
                try:
                    body = json.loads(raw) if raw else None
                except (ValueError, UnicodeDecodeError) as e:
                    raise HttpError(400, f"malformed JSON body: {e}") from None
            if path == "/v1/chat/completions" and method == "POST":
                chat = _Chat(self._rt, body)
                if chat.stream:
                    await self._stream_chat(conn, writer, chat)
                else:
                    await self._send_json(conn, writer, 200, await chat.response())
                return
            handler = self._routes.get((method, path))
            if handler is None:
                raise HttpError(405, f"{method} not allowed on {path}")
            result = await handler(body)
        except HttpError as e:
            await self._send_json(conn, writer, e.status, _error_body(e.status, e.message))
            return
        await self._send_json(conn, writer, 200, result)

    async def _send_json(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, obj: Any
    ) -> None:
        data = json.dumps(obj).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
        if conn.our_state is not h11.SEND_RESPONSE:
            return  # a response is already under way; nothing sane left to send
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        writer.write(conn.send(h11.Data(data=data)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _stream_chat(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, chat: _Chat
    ) -> None:
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
        writer.write(
            conn.send(h11.Data(data=chat.chunk({"role": "assistant", "content": ""}, None)))
        )
        async for piece in chat.pieces():
            writer.write(conn.send(h11.Data(data=chat.chunk({"content": piece}, None))))
            await writer.drain()
        writer.write(conn.send(h11.Data(data=chat.chunk({}, chat.finish_reason, usage=True))))
        writer.write(conn.send(h11.Data(data=b"data: [DONE]\n\n")))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    # -- JSON routes -------------------------------------------------------

    async def _health(self, _body: Any) -> Any:
        return {"status": "ok"}

    async def _admin_state(self, _body: Any) -> Any:
        return self._rt.state().to_json()

    async def _manifest(self, _body: Any) -> Any:
        manifest = self._rt.manifest()
        if manifest is None:
            raise HttpError(404, "readout is disabled on this server")
        return manifest

    async def _train(self, body: Any) -> Any:
        n = validate_train(body)
        self._rt.stats.trained(n)
        return {"accepted": n, "job_id": f"train-{next(self._jobs)}-{secrets.token_hex(4)}"}

    async def _models(self, _body: Any) -> Any:
        name = self._rt.config.model_name
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "poc_api"}],
        }

    async def _tokenizer(self, _body: Any) -> Any:
        return {
            "vocab_size": VOCAB_SIZE,
            "special": {name: i for i, name in SPECIAL_NAMES.items()},
        }

    async def _tokenize(self, body: Any) -> Any:
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise HttpError(400, "body must be {'text': str}")
        return {"tokens": tokenize(body["text"])}

    async def _detokenize(self, body: Any) -> Any:
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(
            _is_int(t) and 0 <= t < VOCAB_SIZE for t in tokens
        ):
            raise HttpError(400, f"body must be {{'tokens': [int]}} with ids < {VOCAB_SIZE}")
        return {"text": detokenize(tokens)}
