"""The OpenAI-compatible endpoints' requests and answers: pure of I/O but for decoding.

``/v1/chat/completions`` (:class:`ChatRequest`) and the legacy ``/v1/completions``
(:class:`CompletionRequest`) validate their bodies as OpenAI does -- a bad role,
type or range is a 400 naming the ``param`` -- and decode with the same model and
sampler as Generate. What the toy model cannot do is said, not faked: ``tools``
are accepted and the model answers with text (it never calls a tool);
``response_format`` other than ``text`` is a 400.

Errors are :class:`OpenAIError` and render as OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with ``code`` a string or null.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import math
import re
import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any, Final, final

import attrs

from ._model import (
    EOS,
    SPECIAL_NAMES,
    VOCAB_SIZE,
    Distribution,
    SamplingSpec,
    detokenize,
    tokenize,
)
from ._state import Runtime

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "OpenAIError",
    "chat_prompt",
    "error_body",
]

_DEFAULT_CHAT_MAX_TOKENS: Final = 128
_DEFAULT_COMPLETION_MAX_TOKENS: Final = 16  # OpenAI's default for /v1/completions
_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_MAX_CHOICES: Final = 128
_MAX_TOP_LOGPROBS: Final = 20
_MAX_LEGACY_LOGPROBS: Final = 5
_MAX_STOPS: Final = 4
_FUNCTION_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class OpenAIError(Exception):
    """An error answer: HTTP status, message, and OpenAI's ``param`` and ``code``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        #: The ``Allow`` header of a 405: the methods the path takes.
        self.allow = ""
        #: The ``x-request-id`` to answer with, when the request's headers were read.
        self.request_id = ""


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``type`` from the status, ``code`` a string or null."""
    if status == 401:
        kind = "authentication_error"
    elif status < 500:
        kind = "invalid_request_error"
    else:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bad(param: str, message: str, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def is_int(v: object) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A finite JSON number (not a bool): 10**400 is none, as float() says."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # a JSON integer no float holds (10**400)
        return False


def _int(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise _bad(name, f"'{name}' must be an integer, got {json.dumps(value)}", "invalid_type")
    if not low <= value <= high:
        raise _bad(name, f"'{name}' must be in [{low}, {high}], got {value}", "invalid_value")
    assert isinstance(value, int)
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value):
        raise _bad(name, f"'{name}' must be a number, got {json.dumps(value)}", "invalid_type")
    if not low <= value <= high:
        raise _bad(name, f"'{name}' must be in [{low:g}, {high:g}], got {value}", "invalid_value")
    return float(value)


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        # "false" is a truthy string: guessing would turn streaming on by surprise.
        raise _bad(name, f"'{name}' must be a boolean, got {json.dumps(value)}", "invalid_type")
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "'stop' must be a string or a list of strings", "invalid_type")
    if len(stops) > _MAX_STOPS:
        raise _bad("stop", f"'stop' takes at most {_MAX_STOPS} strings", "invalid_value")
    return [s for s in stops if s]


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true", None)
    if not isinstance(options, dict):
        raise _bad("stream_options", "'stream_options' must be an object", "invalid_type")
    return _bool(options, "include_usage")


@final
@attrs.frozen
class _Sampling:
    """What every kind of request shares: how to decode and how much."""

    model: str
    max_tokens: int
    spec: SamplingSpec
    stop: list[str]
    n: int
    top_logprobs: int | None  # None: no logprobs; k: the k most likely alongside
    stream: bool
    include_usage: bool


def _sampling(
    rt: Runtime, body: dict[str, Any], default_max: int, logprobs: int | None, least: int = 1
) -> _Sampling:
    cfg = rt.config
    model = body.get("model")
    if model is None:
        model = cfg.model_name
    if not isinstance(model, str):
        raise _bad("model", "'model' must be a string", "invalid_type")
    stream = _bool(body, "stream")
    max_tokens = _int(body, "max_completion_tokens", None, 1, 2**31 - 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", default_max, least, 2**31 - 1)
    assert max_tokens is not None
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _int(body, "top_k", 0, -1, VOCAB_SIZE)  # vLLM's extension; -1 = off
    seed = _int(body, "seed", cfg.seed, -(2**63), 2**64 - 1)
    n = _int(body, "n", 1, 1, _MAX_CHOICES)
    for name in ("presence_penalty", "frequency_penalty"):
        _number(body, name, 0.0, -2.0, 2.0)  # checked as OpenAI does; the toy ignores them
    assert top_k is not None and seed is not None and n is not None
    return _Sampling(
        model=model,
        max_tokens=max_tokens,
        # top_p = 0 keeps the most likely token alone, as OpenAI's does (the limit of
        # a shrinking nucleus); SamplingSpec's 0 is the protocol's "off" (proto3's unset).
        spec=SamplingSpec(
            temperature=temperature,
            top_k=1 if top_p == 0 else max(top_k, 0),
            top_p=top_p,
            seed=seed,
        ),
        stop=_stops(body),
        n=n,
        top_logprobs=logprobs,
        stream=stream,
        include_usage=_include_usage(body, stream),
    )


# -- decoding -------------------------------------------------------------------------


def _token_text(tok: int) -> str:
    return f"<|{SPECIAL_NAMES.get(tok, tok)}|>"


def _token_bytes(tok: int) -> bytes:
    return bytes((tok,)) if tok < 256 else _token_text(tok).encode()


def _token_str(tok: int) -> str:
    # One byte of a multibyte character is not text by itself; OpenAI shows such
    # tokens with "bytes:\xNN" strings and gives the exact bytes alongside.
    if tok >= 256:
        return _token_text(tok)
    return chr(tok) if tok < 128 else f"bytes:\\x{tok:02x}"


def _logprob_entry(tok: int, dist: Distribution, k: int) -> dict[str, Any]:
    lp = dist.logprobs
    return {
        "token": _token_str(tok),
        "logprob": lp[tok],
        "bytes": list(_token_bytes(tok)),
        "top_logprobs": [
            {"token": _token_str(t), "logprob": lp[t], "bytes": list(_token_bytes(t))}
            for t in dist.order[:k]
        ],
    }


@final
class _Decode:
    """One choice being decoded: yields ``(text, logprob entries)`` as text becomes final.

    Text that could still be the start of a stop string, or an incomplete UTF-8
    character, is held back; ``finish_reason`` and ``completion`` are set as it goes.
    """

    def __init__(self, rt: Runtime, prompt: list[int], s: _Sampling, seed: int) -> None:
        self.rt = rt
        self.prompt = prompt
        self.s = s
        self.spec = attrs.evolve(s.spec, seed=seed)
        self.completion = 0
        self.finish_reason = "length"

    async def pieces(self) -> AsyncGenerator[tuple[str, list[dict[str, Any]], list[int]], None]:
        """``(text, logprob entries, their tokens' offsets in the completion's text)``.

        An entry goes out with the piece its token's text starts in: held-back text
        holds its entries back too (a stream's chunks pair text with its tokens).
        """
        model, spec, tokens = self.rt.model, self.spec, list(self.prompt)
        max_context = self.rt.config.max_context
        k = self.s.top_logprobs
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        hold = max((len(s) for s in self.s.stop), default=1) - 1
        text, sent, cut = "", 0, False
        entries: list[tuple[int, dict[str, Any]]] = []  # (text offset, entry)
        token_delay = self.rt.config.token_delay_ms / 1e3
        try:
            while self.completion < self.s.max_tokens:
                if len(tokens) >= max_context:
                    self.finish_reason = "length"
                    break
                if token_delay:
                    # Simulated GPU time per decoded token, as Generate's; what was
                    # decoded so far has gone out (a stream yields it as it goes).
                    await asyncio.sleep(token_delay)
                dist = model.dist(tokens)
                tok = spec.pick(dist, len(tokens), tokens)
                tokens.append(tok)
                self.completion += 1
                if tok == EOS and not self.rt.config.ignore_eos:
                    self.finish_reason = "stop"
                    break
                if tok >= 256:
                    # A special token ends a partial character (as detokenize renders
                    # it): its bytes show before the token, not after it, and do not
                    # pair with a byte that comes after the token.
                    text += decoder.decode(b"", final=True)
                if k is not None:
                    entries.append((len(text), _logprob_entry(tok, dist, k)))
                text += decoder.decode(bytes((tok,))) if tok < 256 else _token_text(tok)
                hits = [
                    i for i in (text.find(s, max(0, sent - hold)) for s in self.s.stop) if i >= 0
                ]
                if hits:
                    text = text[: min(hits)]
                    self.finish_reason = "stop"
                    cut = True
                    break
                if len(text) - hold > sent:
                    sent_before, sent = sent, len(text) - hold
                    out = [(at, e) for at, e in entries if at < sent]
                    entries = entries[len(out) :]
                    yield text[sent_before:sent], [e for _, e in out], [at for at, _ in out]
                if not self.completion % 64:
                    await asyncio.sleep(0)  # stay responsive on long decodes
            if not cut:
                text += decoder.decode(b"", final=True)
            if len(text) > sent or entries:
                yield text[sent:], [e for _, e in entries], [at for at, _ in entries]
        finally:
            self.rt.stats.decoded(self.completion)


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


_DONE: Final = b"data: [DONE]\n\n"


# -- chat -----------------------------------------------------------------------------


def _message_text(i: int, message: dict[str, Any]) -> str:
    role = message["role"]
    content = message.get("content")
    param = f"messages[{i}].content"
    if content is None:
        if role == "assistant":  # a tool-call turn: OpenAI allows a null content
            calls = message.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise _bad(f"messages[{i}].tool_calls", "'tool_calls' must be a list")
            return json.dumps(calls) if calls else ""
        raise _bad(param, f"messages[{i}] with role '{role}' needs a 'content'", "invalid_value")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(param, "content parts must be objects with a 'type'", "invalid_type")
            if part["type"] != "text":
                raise _bad(param, f"content part type '{part['type']}' is not supported")
            if not isinstance(part.get("text"), str):
                raise _bad(param, "a text part needs a string 'text'", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(param, "'content' must be a string or a list of parts", "invalid_type")


def chat_prompt(messages: Any) -> str:
    """The prompt text for chat ``messages``: ``role: content`` lines, then ``assistant: ``.

    Roles, contents and tool turns are checked as OpenAI does (400 naming the param).
    """
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list", "invalid_value")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "each message must be an object", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str):
            raise _bad(f"messages[{i}].role", "each message needs a string 'role'", "invalid_type")
        if role not in _ROLES:
            raise _bad(
                f"messages[{i}].role",
                f"invalid role '{role}'; expected one of {sorted(_ROLES)}",
                "invalid_value",
            )
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise _bad(f"messages[{i}].tool_call_id", "a 'tool' message needs 'tool_call_id'")
        lines.append(f"{role}: {_message_text(i, m)}\n")
    return "".join(lines) + "assistant: "


def _check_tools(body: dict[str, Any]) -> None:
    """``tools`` and ``tool_choice`` as OpenAI checks them; the toy never calls a tool."""
    tools = body.get("tools")
    names: set[str] = set()
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", "'tools' must be a list", "invalid_type")
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise _bad(f"tools[{i}].type", "each tool must be {'type': 'function', ...}")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _bad(f"tools[{i}].function.name", "each tool needs a function 'name'")
            if not _FUNCTION_NAME.match(fn["name"]):
                raise _bad(
                    f"tools[{i}].function.name",
                    "function names are 1-64 characters of a-z, A-Z, 0-9, _ and -",
                    "invalid_value",
                )
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise _bad(f"tools[{i}].function.parameters", "'parameters' must be an object")
            names.add(fn["name"])
    choice = body.get("tool_choice")
    if choice is None:
        return
    if tools is None:
        raise _bad("tool_choice", "'tool_choice' is only allowed when 'tools' are given")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad("tool_choice", f"invalid tool_choice '{choice}'", "invalid_value")
        if choice == "required":
            # Honest: a text-only model cannot satisfy a required tool call.
            raise _bad("tool_choice", "this model cannot call tools", "unsupported_value")
        return
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or fn["name"] not in names:
        raise _bad("tool_choice", "tool_choice must name one of the given tools")
    raise _bad("tool_choice", "this model cannot call tools", "unsupported_value")


def _check_response_format(body: dict[str, Any]) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise _bad("response_format", "'response_format' must be {'type': ...}", "invalid_type")
    if fmt["type"] == "text":
        return
    if fmt["type"] in ("json_object", "json_schema"):
        raise _bad(
            "response_format",
            f"response_format '{fmt['type']}' is not supported by this model",
            "unsupported_value",
        )
    raise _bad("response_format.type", f"invalid response_format '{fmt['type']}'")


def _body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise OpenAIError(400, "body must be a JSON object")
    return body


@final
class ChatRequest:
    """One ``/v1/chat/completions`` request, checked; decodes ``n`` choices."""

    def __init__(self, rt: Runtime, body: Any) -> None:
        body = _body(body)
        logprobs = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", None, 0, _MAX_TOP_LOGPROBS)
        if top is not None and not logprobs:
            raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        self.s = _sampling(rt, body, _DEFAULT_CHAT_MAX_TOKENS, (top or 0) if logprobs else None)
        _check_tools(body)
        _check_response_format(body)
        self.rt = rt
        self.prompt = tokenize(chat_prompt(body.get("messages")))
        if len(self.prompt) >= rt.config.max_context:
            raise _bad(
                "messages",
                f"prompt of {len(self.prompt)} tokens exceeds the context window",
                "context_length_exceeded",
            )
        self.id = _new_id("chatcmpl-")
        self.created = int(time.time())
        # Choice i > 0 samples with seed + i: the sampler is keyed on (seed, context),
        # so the same seed would give n identical samples.
        self.choices = [
            _Decode(rt, self.prompt, self.s, self.s.spec.seed + i) for i in range(self.s.n)
        ]

    @property
    def stream(self) -> bool:
        """Whether the client asked for server-sent events."""
        return self.s.stream

    def usage(self) -> dict[str, int]:
        """Token accounting over every choice."""
        completion = sum(c.completion for c in self.choices)
        prompt = len(self.prompt)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def response(self) -> dict[str, Any]:
        """The whole ``chat.completion`` object."""
        choices = []
        for i, c in enumerate(self.choices):
            text, entries = "", []
            async for piece, lps, _ in c.pieces():
                text += piece
                entries += lps
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": {"content": entries, "refusal": None}
                    if self.s.top_logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason,
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.s.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.s.model,
            "choices": choices,
        }
        if self.s.include_usage:
            obj["usage"] = usage  # null on every chunk but the last, as OpenAI does
        return _sse(obj)

    async def events(self) -> AsyncGenerator[bytes, None]:
        """The SSE body: a role chunk, deltas, a finish chunk per choice, usage, [DONE]."""
        lp = self.s.top_logprobs is not None
        for i, c in enumerate(self.choices):
            first = {"role": "assistant", "content": ""}
            yield self._chunk(
                [{"index": i, "delta": first, "logprobs": None, "finish_reason": None}]
            )
            async with contextlib.aclosing(c.pieces()) as pieces:  # (closed if we are)
                async for piece, entries, _ in pieces:
                    logprobs = {"content": entries, "refusal": None} if lp else None
                    delta = {"index": i, "delta": {"content": piece}, "logprobs": logprobs}
                    yield self._chunk([delta | {"finish_reason": None}])
            yield self._chunk(
                [{"index": i, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}]
            )
        if self.s.include_usage:
            yield self._chunk([], self.usage())
        yield _DONE


# -- legacy completions ---------------------------------------------------------------


def _prompts(prompt: Any) -> list[list[int]]:
    """``prompt`` as OpenAI takes it: a string, strings, token ids, or lists of ids."""
    if isinstance(prompt, str):
        return [tokenize(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [tokenize(p) for p in prompt]
        if all(is_int(t) and 0 <= t < VOCAB_SIZE for t in prompt):
            return [list(prompt)]
        if all(
            isinstance(p, list) and p and all(is_int(t) and 0 <= t < VOCAB_SIZE for t in p)
            for p in prompt
        ):
            return [list(p) for p in prompt]
    raise _bad(
        "prompt",
        f"'prompt' must be a string, a list of strings, or token ids below {VOCAB_SIZE}",
        "invalid_type",
    )


@final
class CompletionRequest:
    """One legacy ``/v1/completions`` request: ``n`` choices per prompt."""

    def __init__(self, rt: Runtime, body: Any) -> None:
        body = _body(body)
        logprobs = _int(body, "logprobs", None, 0, _MAX_LEGACY_LOGPROBS)
        # max_tokens may be 0 here (OpenAI's minimum for /v1/completions): with
        # echo, the prompt back without a completion.
        self.s = _sampling(rt, body, _DEFAULT_COMPLETION_MAX_TOKENS, logprobs, least=0)
        self.echo = _bool(body, "echo")
        if body.get("suffix") is not None:
            raise _bad("suffix", "'suffix' is not supported by this model", "unsupported_value")
        self.prompts = _prompts(body.get("prompt"))
        for p in self.prompts:
            if len(p) >= rt.config.max_context:
                raise _bad(
                    "prompt",
                    f"prompt of {len(p)} tokens exceeds the context window",
                    "context_length_exceeded",
                )
        self.id = _new_id("cmpl-")
        self.created = int(time.time())
        self.choices = [
            (p, _Decode(rt, p, self.s, self.s.spec.seed + j))
            for p in self.prompts
            for j in range(self.s.n)
        ]

    @property
    def stream(self) -> bool:
        """Whether the client asked for server-sent events."""
        return self.s.stream

    def usage(self) -> dict[str, int]:
        """Token accounting over every prompt and choice."""
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.completion for _, c in self.choices)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _logprobs(
        self, entries: list[dict[str, Any]], starts: list[int], offset: int
    ) -> dict[str, Any] | None:
        """The legacy logprobs shape: parallel lists, top ones as ``{token: logprob}``.

        ``starts`` are the tokens' offsets in the completion's text, ``offset`` where
        that text starts in the choice's (the echoed prompt's length).
        """
        if self.s.top_logprobs is None:
            return None
        offsets = [offset + at for at in starts]
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                {t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries
            ],
            "text_offset": offsets,
        }

    def _echo(self, prompt: list[int]) -> str:
        return detokenize(prompt) if self.echo else ""

    async def response(self) -> dict[str, Any]:
        """The whole ``text_completion`` object."""
        choices = []
        for i, (prompt, c) in enumerate(self.choices):
            text, entries, starts = self._echo(prompt), [], []
            async for piece, lps, ats in c.pieces():
                text += piece
                entries += lps
                starts += ats
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": self._logprobs(entries, starts, len(self._echo(prompt))),
                    "finish_reason": c.finish_reason,
                }
            )
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.s.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.s.model,
            "choices": choices,
        }
        if self.s.include_usage:
            obj["usage"] = usage
        return _sse(obj)

    async def events(self) -> AsyncGenerator[bytes, None]:
        """The SSE body: text chunks, a finish chunk per choice, usage, [DONE]."""
        for i, (prompt, c) in enumerate(self.choices):
            offset = 0
            echo = self._echo(prompt)
            if echo:
                yield self._chunk(
                    [{"index": i, "text": echo, "logprobs": None, "finish_reason": None}]
                )
                offset = len(echo)
            async with contextlib.aclosing(c.pieces()) as pieces:  # (closed if we are)
                async for piece, entries, starts in pieces:
                    yield self._chunk(
                        [
                            {
                                "index": i,
                                "text": piece,
                                "logprobs": self._logprobs(entries, starts, offset),
                                "finish_reason": None,
                            }
                        ]
                    )
            yield self._chunk(
                [{"index": i, "text": "", "logprobs": None, "finish_reason": c.finish_reason}]
            )
        if self.s.include_usage:
            yield self._chunk([], self.usage())
        yield _DONE
