"""``chat`` / ``chat_stream`` against what real servers send (issue 11, items 1-5).

Byte-exact OpenAI, vLLM and llama.cpp style streams are decoded

- in memory, by the real ``ChatStream`` over an ``httpx.Response`` whose body is
  the stream cut at every byte boundary (and byte by byte) -- what the caller sees
  must never depend on how TCP cut the bytes;
- over real sockets, from a tiny trio TCP server on port 0 that replays the bytes
  in one write and trickled in small writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import httpx
import pytest
import trio
from helpers import Handler, chat_done, http_server, read_request

import poc_api
from poc_api import (
    ChatCompletion,
    ChatDelta,
    ChatDone,
    ChatReasoningDelta,
    ChatToolCall,
    ChatToolCallDelta,
    HttpError,
    PocApiTimeout,
    ProtocolViolation,
    Usage,
)
from poc_api._http import ChatEvent, ChatStream, HttpApi
from poc_api.server import ReferenceServer

HELLO = [{"role": "user", "content": "Hello there"}]
URL = "http://replay.invalid/v1/chat/completions"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return json.dumps(obj | extra, separators=(",", ":"))


def data(*events: str, eol: str = "\n") -> bytes:
    return "".join(f"data: {e}{eol}{eol}" for e in events).encode()


USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}

# OpenAI: a role chunk, tool-call pieces (id and name first, then argument
# fragments), a finish chunk, a usage chunk with no choices, [DONE].
OPENAI_TOOLS = data(
    chunk({"role": "assistant", "content": None}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_def",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                }
            ]
        }
    ),
    chunk({}, "tool_calls"),
    json.dumps({"id": "chatcmpl-1", "choices": [], "usage": USAGE}),
    "[DONE]",
)
OPENAI_TOOLS_EVENTS: list[ChatEvent] = [
    ChatToolCallDelta(0, "call_abc", "get_weather", ""),
    ChatToolCallDelta(0, "", "", '{"ci'),
    ChatToolCallDelta(0, "", "", 'ty": "Oslo"}'),
    ChatToolCallDelta(1, "call_def", "get_time", "{}"),
    chat_done(
        "tool_calls",
        Usage(9, 3, 12),
        (
            ChatToolCall("call_abc", "get_weather", '{"city": "Oslo"}'),
            ChatToolCall("call_def", "get_time", "{}"),
        ),
    ),
]

# vLLM with a reasoning parser: reasoning_content deltas, then content; CRLF line
# endings (as some proxies rewrite them); usage without total_tokens.
VLLM_REASONING = data(
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "Think"}),
    chunk({"reasoning_content": "ing é"}),
    chunk({"content": "Hi"}),
    chunk({"content": "!"}, "stop"),
    json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}),
    "[DONE]",
    eol="\r\n",
)
VLLM_REASONING_EVENTS: list[ChatEvent] = [
    ChatReasoningDelta("Think"),
    ChatReasoningDelta("ing é"),
    ChatDelta("Hi"),
    ChatDelta("!"),
    chat_done("stop", Usage(5, 4, 9)),
]

# llama.cpp: finish and usage-ish timings on the last chunk, then [DONE].
LLAMACPP = data(
    chunk({"content": "Hel"}),
    chunk({"content": "lo"}),
    chunk({}, "length", usage=USAGE, timings={"predicted_n": 3}),
    "[DONE]",
)
LLAMACPP_EVENTS: list[ChatEvent] = [
    ChatDelta("Hel"),
    ChatDelta("lo"),
    chat_done("length", Usage(9, 3, 12)),
]

TEXT = data(chunk({"content": "a"}), chunk({"content": "b"}), chunk({"content": "c"}))
ABC: list[ChatEvent] = [ChatDelta("a"), ChatDelta("b"), ChatDelta("c")]
FINISH = data(chunk({}, "stop", usage=USAGE))

# Item 1 and 2: an error after three deltas, in every shape real servers use.
OPENAI_ERROR = TEXT + data(
    json.dumps({"error": {"message": "model overloaded", "type": "server_error", "code": 503}})
)
VLLM_FLAT_ERROR = TEXT + data(
    json.dumps(
        {
            "object": "error",
            "message": "Sampled token IDs exceed the max model length",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    ),
    "[DONE]",  # vLLM ends even a failed stream with [DONE]
)
EVENT_ERROR_TEXT = TEXT + b"event: error\ndata: upstream went away\n\n"
LLAMACPP_ERROR = (
    TEXT + b'error: {"code":500,"message":"slot unavailable","type":"server_error"}\n\n'
)

# Item 3: the finish chunk came but [DONE] did not, or came without its blank line.
NO_DONE = TEXT + FINISH
DONE_WITHOUT_BLANK_LINE = TEXT + FINISH + b"data: [DONE]\n"
DONE_WITHOUT_EOL = TEXT + FINISH + b"data: [DONE]"
CUT_BEFORE_FINISH = TEXT

ABC_DONE: list[ChatEvent] = [*ABC, chat_done("stop", Usage(9, 3, 12))]

# (name, stream, events delivered, (error type, message pattern) or None)
CASES: list[tuple[str, bytes, list[ChatEvent], tuple[type[Exception], str] | None]] = [
    ("openai-tools", OPENAI_TOOLS, OPENAI_TOOLS_EVENTS, None),
    ("vllm-reasoning", VLLM_REASONING, VLLM_REASONING_EVENTS, None),
    ("llamacpp", LLAMACPP, LLAMACPP_EVENTS, None),
    ("openai-error", OPENAI_ERROR, ABC, (HttpError, "model overloaded")),
    ("vllm-flat-error", VLLM_FLAT_ERROR, ABC, (HttpError, "exceed the max model length")),
    ("event-error-text", EVENT_ERROR_TEXT, ABC, (HttpError, "upstream went away")),
    ("llamacpp-error", LLAMACPP_ERROR, ABC, (HttpError, "slot unavailable")),
    ("no-done", NO_DONE, ABC_DONE, None),
    ("done-without-blank-line", DONE_WITHOUT_BLANK_LINE, ABC_DONE, None),
    ("done-without-eol", DONE_WITHOUT_EOL, ABC_DONE, None),
    ("cut-before-finish", CUT_BEFORE_FINISH, ABC, (ProtocolViolation, "finish_reason")),
]
IDS = [c[0] for c in CASES]


# -- in memory, every cut ------------------------------------------------------------


class Body(httpx.AsyncByteStream):
    """A response body that arrives in the given pieces (one network read each)."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self._pieces:
            yield piece


async def decode(api: HttpApi, pieces: Sequence[bytes]) -> tuple[list[ChatEvent], Exception | None]:
    response = httpx.Response(
        200, headers={"content-type": "text/event-stream"}, stream=Body(pieces)
    )
    events = ChatStream(api, response, URL)
    got: list[ChatEvent] = []
    try:
        await events._check_response()
        async with trio.open_nursery() as nursery:  # as chat_stream's block reads it
            nursery.start_soon(events._pump)
            try:
                async for event in events:
                    got.append(event)
            except (HttpError, ProtocolViolation) as exc:
                return got, exc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await events._release()
    return got, None


def check(
    got: list[ChatEvent],
    error: Exception | None,
    events: list[ChatEvent],
    expected: tuple[type[Exception], str] | None,
    where: str,
) -> None:
    assert got == events, where
    if expected is None:
        assert error is None, f"{where}: {error!r}"
    else:
        assert isinstance(error, expected[0]) and re.search(expected[1], str(error)), where


@pytest.mark.parametrize(("name", "stream", "events", "error"), CASES, ids=IDS)
async def test_every_cut_point_gives_the_same_events(
    name: str,
    stream: bytes,
    events: list[ChatEvent],
    error: tuple[type[Exception], str] | None,
) -> None:
    with trio.fail_after(60):
        async with httpx.AsyncClient() as http:
            api = HttpApi(http, "http://replay.invalid/v1", "", "m")
            cuts: list[list[bytes]] = [[stream], [stream[i : i + 1] for i in range(len(stream))]]
            cuts += [[stream[:i], stream[i:]] for i in range(1, len(stream))]
            for pieces in cuts:
                got, exc = await decode(api, pieces)
                check(got, exc, events, error, f"{name} cut into {[len(p) for p in pieces]}")


async def test_an_error_in_the_same_read_as_three_deltas_comes_after_them() -> None:
    async with httpx.AsyncClient() as http:
        api = HttpApi(http, "http://replay.invalid/v1", "", "m")
        got, exc = await decode(api, [OPENAI_ERROR])  # one network read
    assert got == ABC
    assert isinstance(exc, HttpError) and exc.http_status == 503


async def test_vllm_flat_error_carries_its_code_as_status() -> None:
    async with httpx.AsyncClient() as http:
        api = HttpApi(http, "http://replay.invalid/v1", "", "m")
        _, exc = await decode(api, [VLLM_FLAT_ERROR])
    assert isinstance(exc, HttpError) and exc.http_status == 400


# -- over real sockets ----------------------------------------------------------------


def answer(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status} Replay\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def stream_replayer(body: bytes, piece: int) -> Handler:
    """Answer with an SSE body (read until close), written ``piece`` bytes at a time."""

    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        await stream.send_all(head)
        for i in range(0, len(body), piece):
            await stream.send_all(body[i : i + piece])
            if piece < len(body):
                await trio.sleep(0.001)

    return handler


@pytest.mark.parametrize("piece", [1 << 20, 7])
@pytest.mark.parametrize(("name", "stream", "events", "error"), CASES, ids=IDS)
async def test_replayed_streams_over_a_socket(
    name: str,
    stream: bytes,
    events: list[ChatEvent],
    error: tuple[type[Exception], str] | None,
    piece: int,
) -> None:
    got: list[ChatEvent] = []
    exc: Exception | None = None
    with trio.fail_after(20):
        async with http_server(stream_replayer(stream, piece)) as url:
            async with poc_api.ApiClient(url, grpc_url="http://127.0.0.1:1", model="m") as client:
                try:
                    async with client.chat_stream(HELLO) as evs:
                        async for event in evs:
                            got.append(event)
                except (HttpError, ProtocolViolation) as e:
                    exc = e
    check(got, exc, events, error, name)


# -- requests: fields, model, redaction, timeout ----------------------------------------


class Recorder:
    """A replay server's handler that records requests and answers from a table."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, Any]] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        head, body = await read_request(stream)
        method, target = head.split(b" ")[:2]
        path = target.decode().split("/v1", 1)[1]
        self.requests.append((f"{method.decode()} {path}", json.loads(body) if body else None))
        await stream.send_all(self.answers[f"{method.decode()} {path}"])


COMPLETION = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "hmm",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5},
    }
).encode()
MODELS_ONE = json.dumps({"object": "list", "data": [{"id": "served-model"}]}).encode()
MODELS_TWO = json.dumps({"object": "list", "data": [{"id": "a"}, {"id": "b"}]}).encode()
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]


async def test_chat_sends_openai_fields_and_reads_tool_calls() -> None:
    rec = Recorder({"POST /chat/completions": answer(200, COMPLETION)})
    with trio.fail_after(10):
        async with http_server(rec) as url:
            async with poc_api.ApiClient(url, grpc_url="http://127.0.0.1:1", model="m") as client:
                done = await client.chat(
                    HELLO,
                    tools=TOOLS,
                    tool_choice="auto",
                    response_format={"type": "json_object"},
                    n=1,
                    logprobs=True,
                    top_logprobs=2,
                    seed=5,
                    stop=["\n"],
                    model="per-call",  # the client's model for this call
                    extra_body={"top_k": 4, "chat_template_kwargs": {"x": True}},
                )
    first = ChatCompletion(
        text="",
        finish_reason="tool_calls",
        usage=None,
        tool_calls=(ChatToolCall("call_1", "get_weather", '{"city":"Oslo"}'),),
        reasoning="hmm",
    )
    # total_tokens left out by the server: the sum. choices[0] is the first choice,
    # also when there is only one (it was empty then: an IndexError for openai users).
    usage = Usage(7, 5, 12)
    assert done == attrs.evolve(first, usage=usage, choices=(first,))
    _, sent = rec.requests[0]
    assert sent["model"] == "per-call"
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto"
    assert sent["response_format"] == {"type": "json_object"}
    assert (sent["n"], sent["logprobs"], sent["top_logprobs"], sent["seed"]) == (1, True, 2, 5)
    assert sent["stop"] == ["\n"] and sent["top_k"] == 4
    assert sent["chat_template_kwargs"] == {"x": True} and sent["stream"] is False


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tools": {"type": "function"}}, TypeError),
        ({"tools": [{"function": {"name": "f"}}]}, ValueError),
        ({"tools": [{"type": "function", "function": {}}]}, ValueError),
        ({"tool_choice": "always"}, ValueError),
        # A named choice with no name was sent, for the server's 400 (HttpError).
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, ValueError),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}}, ValueError),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": "get_weather"}},
            ValueError,
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": ""}}},
            ValueError,
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": 1}}},
            ValueError,
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}},
            ValueError,
        ),
        ({"tool_choice": {"function": {"name": "get_weather"}}}, ValueError),
        ({"tool_choice": ["auto"]}, TypeError),
        ({"response_format": "json"}, TypeError),
        ({"n": 0}, ValueError),
        ({"n": 1.0}, TypeError),
        ({"logprobs": 1}, TypeError),
        ({"top_logprobs": 2}, ValueError),
        ({"logprobs": True, "top_logprobs": 21}, ValueError),
        ({"seed": "7"}, TypeError),
        ({"extra_body": [("a", 1)]}, TypeError),
        ({"extra_body": {"messages": []}}, ValueError),
        ({"extra_body": {"x": object()}}, TypeError),
        ({"timeout": -1}, ValueError),
    ],
)
async def test_bad_arguments_raise_before_anything_is_sent(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    rec = Recorder({})
    with trio.fail_after(10):
        async with http_server(rec) as url:
            async with poc_api.ApiClient(url, grpc_url="http://127.0.0.1:1") as client:
                with pytest.raises(error):
                    if "timeout" in kwargs:
                        async with client.chat_stream(HELLO, **kwargs):
                            pass
                    else:
                        await client.chat(HELLO, **kwargs)
                with pytest.raises(error):
                    async with client.chat_stream(HELLO, **kwargs):
                        pass
    assert rec.requests == []


@pytest.mark.parametrize(
    ("tools", "choice"),
    [
        (TOOLS, {"type": "function", "function": {"name": "get_weather"}}),
        # Without tools= here (given some other way, say): the name is the server's to check.
        (None, {"type": "function", "function": {"name": "anything"}}),
        # Shapes of other types (OpenAI's newer ones, a vendor's) are the server's business.
        (TOOLS, {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}),
    ],
)
async def test_a_well_formed_tool_choice_is_sent_as_given(
    tools: list[dict[str, Any]] | None, choice: dict[str, Any]
) -> None:
    rec = Recorder({"POST /chat/completions": answer(200, COMPLETION)})
    with trio.fail_after(10):
        async with http_server(rec) as url:
            async with poc_api.ApiClient(url, grpc_url="http://127.0.0.1:1", model="m") as client:
                await client.chat(HELLO, tools=tools, tool_choice=choice)
    _, sent = rec.requests[0]
    assert sent["tool_choice"] == choice


async def test_without_model_the_only_served_model_is_named_and_cached() -> None:
    rec = Recorder(
        {"GET /models": answer(200, MODELS_ONE), "POST /chat/completions": answer(200, COMPLETION)}
    )
    with trio.fail_after(10):
        async with http_server(rec) as url:
            async with poc_api.ApiClient(url, grpc_url="http://127.0.0.1:1") as client:
                await client.chat(HELLO)
                await client.chat(HELLO)
    assert [r[0] for r in rec.requests] == [
        "GET /models",
        "POST /chat/completions",
        "POST /chat/completions",
    ]
    assert all(body["model"] == "served-model" for _, body in rec.requests[1:])


@pytest.mark.parametrize(
    ("models", "error", "match"),
    [
        (answer(200, MODELS_TWO), ValueError, "lists 2 models"),
        # The server's error status is its own (an HttpError), not a bad argument.
        (answer(404, b'{"detail": "Not Found"}'), poc_api.HttpError, "failed.*HTTP 404"),
    ],
)
async def test_without_model_an_ambiguous_server_is_a_clear_error_before_sending(
    models: bytes, error: type[Exception], match: str
) -> None:
    rec = Recorder({"GET /models": models})
    with trio.fail_after(10):
        async with http_server(rec) as url:
            async with poc_api.ApiClient(url, grpc_url="http://127.0.0.1:1") as client:
                with pytest.raises(error, match=match):
                    await client.chat(HELLO)
                with pytest.raises(error, match=match):
                    async with client.chat_stream(HELLO):
                        pass
    assert {r[0] for r in rec.requests} == {"GET /models"}  # the chat was never sent


async def test_model_given_is_sent_without_asking(server: ReferenceServer) -> None:
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
        with trio.fail_after(10):
            done = await client.chat(HELLO, max_tokens=3)
    assert done.usage is not None and done.usage.completion_tokens == 3


async def test_credentials_in_the_url_never_appear_in_errors() -> None:
    rec = Recorder({"POST /chat/completions": answer(500, b'{"error": "boom"}')})
    with trio.fail_after(10):
        async with http_server(rec) as url:
            secret_url = url.replace("http://", "http://alice:hunter2@")
            async with poc_api.ApiClient(
                secret_url, grpc_url="http://127.0.0.1:1", model="m"
            ) as client:
                with pytest.raises(HttpError) as info:
                    await client.chat(HELLO)
                with pytest.raises(HttpError) as info2:
                    async with client.chat_stream(HELLO):
                        pass
    for exc in (info.value, info2.value):
        assert "hunter2" not in str(exc) and "hunter2" not in exc.url
        assert "alice:***@" in str(exc)


async def test_chat_stream_timeout_bounds_the_whole_block() -> None:
    async def stall(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"
            + data(chunk({"content": "a"}))
        )
        await trio.sleep_forever()

    got: list[ChatEvent] = []
    with trio.fail_after(10):
        async with http_server(stall) as url:
            async with poc_api.ApiClient(url, grpc_url="http://127.0.0.1:1", model="m") as client:
                with pytest.raises(PocApiTimeout):
                    async with client.chat_stream(HELLO, timeout=0.3) as events:
                        async for event in events:
                            got.append(event)
    assert got == [ChatDelta("a")]


async def test_reference_server_round_trip_with_tools_n_and_logprobs(
    server: ReferenceServer,
) -> None:
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
        with trio.fail_after(20):
            done = await client.chat(
                HELLO, max_tokens=6, n=2, logprobs=True, top_logprobs=2, tools=TOOLS, seed=3
            )
            async with client.chat_stream(HELLO, max_tokens=6, temperature=0) as events:
                streamed = [e async for e in events]
            whole = await client.chat(HELLO, max_tokens=6, temperature=0)
    assert len(done.choices) == 2 and done.choices[0].text == done.text
    assert done.tool_calls == () and len(done.logprobs["content"]) == 6
    assert "".join(e.text for e in streamed if isinstance(e, ChatDelta)) == whole.text
    assert streamed[-1] == chat_done(whole.finish_reason, whole.usage)


async def test_a_vllm_flat_error_in_a_200_answer_raises_with_its_message() -> None:
    flat = {"object": "error", "message": "The model `x` does not exist.", "code": 404}
    rec = Recorder({"POST /chat/completions": answer(200, json.dumps(flat).encode())})
    with trio.fail_after(10):
        async with http_server(rec) as url:
            async with poc_api.ApiClient(url, grpc_url="http://127.0.0.1:1", model="x") as client:
                with pytest.raises(HttpError, match="does not exist") as info:
                    await client.chat(HELLO)
    assert info.value.http_status == 404


async def test_streamed_choices_carry_their_index(server: ReferenceServer) -> None:
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
        with trio.fail_after(20):
            async with client.chat_stream(HELLO, max_tokens=5, n=2, temperature=1.0) as events:
                got = [e async for e in events]
            whole = await client.chat(HELLO, max_tokens=5, n=2, temperature=1.0)
    for i in (0, 1):
        text = "".join(e.text for e in got if isinstance(e, ChatDelta) and e.choice == i)
        assert text == whole.choices[i].text
    expected = tuple(ChatDone(c.finish_reason, None, c.tool_calls) for c in whole.choices)
    assert got[-1] == ChatDone("length", whole.usage, (), expected)


async def test_streamed_logprobs_ride_on_their_deltas(server: ReferenceServer) -> None:
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
        with trio.fail_after(20):
            kwargs: dict[str, Any] = {"max_tokens": 8, "logprobs": True, "top_logprobs": 2}
            async with client.chat_stream(HELLO, temperature=0, **kwargs) as events:
                got = [e async for e in events if isinstance(e, ChatDelta)]
            whole = await client.chat(HELLO, temperature=0, **kwargs)
    streamed = [t for e in got for t in e.logprobs["content"]]
    assert streamed == whole.logprobs["content"]


# Ollama (0.20.x, ollama/ollama#15457) numbers every streamed tool call of a turn
# ``index: 0``, each with an id of its own: distinct calls, not pieces of one.
OLLAMA_SAME_INDEX = data(
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "write_file", "arguments": '{"path":"a"}'},
                }
            ]
        }
    ),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "read_file", "arguments": '{"path":"b"}'},
                }
            ]
        }
    ),
    chunk({}, "tool_calls"),
    "[DONE]",
)


def tool_piece(id: str, name: str | None, arguments: str) -> str:
    function = {"arguments": arguments} | ({"name": name} if name else {})
    return chunk({"tool_calls": [{"index": 0, "id": id, "type": "function", "function": function}]})


# lmdeploy (InternLM/lmdeploy#3412): index 0 for every call too, the pieces after
# a call's first with id "".
LMDEPLOY_SAME_INDEX = data(
    tool_piece("call_1", "write_file", ""),
    tool_piece("", None, '{"path":"a"}'),
    tool_piece("call_2", "read_file", ""),
    tool_piece("", None, '{"path":"b"}'),
    chunk({}, "tool_calls"),
    "[DONE]",
)


@pytest.mark.parametrize(
    "stream", [OLLAMA_SAME_INDEX, LMDEPLOY_SAME_INDEX], ids=["ollama", "lmdeploy"]
)
async def test_streamed_tool_calls_reusing_an_index_with_new_ids_stay_apart(stream: bytes) -> None:
    async with httpx.AsyncClient() as http:
        api = HttpApi(http, "http://replay.invalid/v1", "", "m")
        got, exc = await decode(api, [stream])
    assert exc is None
    assert got[-1] == chat_done(
        "tool_calls",
        None,
        (
            ChatToolCall("call_1", "write_file", '{"path":"a"}'),
            ChatToolCall("call_2", "read_file", '{"path":"b"}'),
        ),
    )
    # The deltas say which call each piece belongs to, as ChatDone does.
    assert {e.index for e in got if isinstance(e, ChatToolCallDelta) and e.id} == {0, 1}


async def test_streamed_content_parts_are_text_as_in_chat() -> None:
    # Mistral's reasoning models stream content as a list of parts; chat() joins
    # the text parts of such a message, so the stream must not drop them.
    stream = data(
        chunk({"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hm"}]}]}),
        chunk({"content": [{"type": "text", "text": "Hel"}]}),
        chunk({"content": [{"type": "text", "text": "lo"}]}, "stop"),
        "[DONE]",
    )
    async with httpx.AsyncClient() as http:
        api = HttpApi(http, "http://replay.invalid/v1", "", "m")
        got, exc = await decode(api, [stream])
    assert exc is None
    assert got == [ChatDelta("Hel"), ChatDelta("lo"), chat_done("stop", None)]


async def test_streamed_tool_call_whose_index_comes_after_its_first_piece_stays_one() -> None:
    # A call's first piece without an index (id and name), the rest with it: one call.
    first = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    rest = {"index": 0, "function": {"arguments": '{"a":1}'}}
    stream = data(
        chunk({"tool_calls": [first]}),
        chunk({"tool_calls": [rest]}),
        chunk({}, "tool_calls"),
        "[DONE]",
    )
    async with httpx.AsyncClient() as http:
        api = HttpApi(http, "http://replay.invalid/v1", "", "m")
        got, exc = await decode(api, [stream])
    assert exc is None
    assert got[-1] == chat_done("tool_calls", None, (ChatToolCall("call_1", "f", '{"a":1}'),))
