"""The official ``openai`` client drives the reference server (issue 11, items 6-10).

``openai.OpenAI`` is synchronous (its async client is asyncio-based), so these tests
are plain functions against a server on its own thread. Every call is bounded by the
client's timeout and no retries.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from poc_api.server import ReferenceServer, ServerConfig

KEY = "sk-openai-compat"
MODEL = "poc-reference"
USER = [{"role": "user", "content": "Tell me about the sea"}]
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def srv() -> Iterator[ReferenceServer]:
    server = ReferenceServer(ServerConfig(port=0, api_key=KEY))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def oai(srv: ReferenceServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=srv.base_url, api_key=KEY, max_retries=0, timeout=TIMEOUT
    ) as client:
        yield client


def chat(oai: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("messages", USER)
    kwargs.setdefault("max_tokens", 12)
    return oai.chat.completions.create(**kwargs)


def stream_chunks(oai: openai.OpenAI, **kwargs: Any) -> list[Any]:
    with chat(oai, stream=True, **kwargs) as stream:
        return list(stream)


# -- item 6: n, logprobs, tools ------------------------------------------------------


def test_n_returns_n_distinct_choices(oai: openai.OpenAI) -> None:
    r = chat(oai, n=3, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # each choice samples on its own
    assert r.usage.completion_tokens == 36


def test_n_streams_every_choice(oai: openai.OpenAI) -> None:
    chunks = stream_chunks(oai, n=2, temperature=1.0, seed=7)
    plain = chat(oai, n=2, temperature=1.0, seed=7)
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
        assert text == plain.choices[i].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == ["length", "length"]


def test_logprobs_come_back_in_openai_shape(oai: openai.OpenAI) -> None:
    r = chat(oai, logprobs=True, top_logprobs=3, temperature=0)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    assert "".join(bytes(t.bytes).decode() for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob < 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    assert chat(oai).choices[0].logprobs is None


def test_streamed_logprobs_match_the_whole_answer(oai: openai.OpenAI) -> None:
    whole = chat(oai, logprobs=True, top_logprobs=2, temperature=0).choices[0].logprobs.content
    chunks = stream_chunks(oai, logprobs=True, top_logprobs=2, temperature=0)
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in whole]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.mark.parametrize("stream", [False, True])
def test_tools_are_accepted_and_answered_with_text(oai: openai.OpenAI, stream: bool) -> None:
    if stream:
        chunks = stream_chunks(oai, tools=TOOLS, tool_choice="auto")
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert all(c.choices[0].delta.tool_calls is None for c in chunks if c.choices)
    else:
        r = chat(oai, tools=TOOLS, tool_choice="auto")
        assert r.choices[0].message.content and r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
    ],
)
def test_what_the_model_cannot_do_is_a_400_not_silence(
    oai: openai.OpenAI, kwargs: dict[str, Any], param: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(oai, **kwargs)
    if param is not None:
        assert info.value.param == param
    assert chat(oai, response_format={"type": "text"}).choices[0].message.content


# -- item 7: validation as OpenAI does it ----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"extra_body": {"stream": "false"}}, "stream"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": "7"}, "seed"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ],
)
def test_bad_requests_are_400_naming_the_param(
    oai: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(oai, **kwargs)
    err = info.value
    assert err.status_code == 400 and err.param == param
    assert isinstance(err.code, str | None)
    assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}
    assert err.body["type"] == "invalid_request_error"


# -- item 8: a tool-call turn --------------------------------------------------------


def test_assistant_tool_call_turn_with_null_content_is_accepted(oai: openai.OpenAI) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    ]
    r = chat(oai, messages=messages, tools=TOOLS)
    assert r.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        chat(oai, messages=[{"role": "user", "content": None}])


# -- item 9: include_usage ---------------------------------------------------------------


def test_usage_is_streamed_only_when_asked_in_a_last_chunk_without_choices(
    oai: openai.OpenAI,
) -> None:
    plain = chat(oai, temperature=0)
    chunks = stream_chunks(oai, temperature=0, stream_options={"include_usage": True})
    *body, last = chunks
    assert last.choices == [] and last.usage == plain.usage
    assert all(c.usage is None and c.choices for c in body)
    assert body[-1].choices[0].finish_reason == "length"
    without = stream_chunks(oai, temperature=0)
    assert all(c.usage is None and c.choices for c in without)


# -- item 10: legacy completions, a model by id, auth, errors, request ids ----------------


def test_legacy_completions(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 8
    text = r.choices[0].text
    with oai.completions.create(
        model=MODEL,
        prompt="Once upon",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage == r.usage
    two = oai.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2, n=2, logprobs=1)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].logprobs is not None and len(two.choices[0].logprobs.tokens) == 2
    echo = oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, echo=True)
    assert echo.choices[0].text.startswith("Once upon")
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert info.value.param == "max_tokens"


def test_a_model_by_id(oai: openai.OpenAI) -> None:
    assert oai.models.retrieve(MODEL).id == MODEL
    assert [m.id for m in oai.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("gpt-nope")
    assert info.value.code == "model_not_found" and info.value.param == "model"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_scheme_is_case_insensitive(srv: ReferenceServer, scheme: str) -> None:
    r = httpx.get(
        srv.base_url + "/models", headers={"authorization": f"{scheme} {KEY}"}, timeout=TIMEOUT
    )
    assert r.status_code == 200
    wrong = httpx.get(
        srv.base_url + "/models", headers={"authorization": f"Basic {KEY}"}, timeout=TIMEOUT
    )
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"


def test_wrong_key_is_an_authentication_error(srv: ReferenceServer) -> None:
    with openai.OpenAI(base_url=srv.base_url, api_key="nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            chat(bad)
    assert info.value.request_id


def test_every_answer_has_a_request_id(oai: openai.OpenAI, srv: ReferenceServer) -> None:
    raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=USER, max_tokens=2)
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.parse()._request_id == raw.headers["x-request-id"]
    with chat(oai, stream=True) as stream:
        assert stream.response.headers["x-request-id"]
    with pytest.raises(openai.BadRequestError) as info:
        chat(oai, temperature=-1)
    assert info.value.request_id
    headers = {"authorization": f"Bearer {KEY}", "x-request-id": "mine-42"}
    for path in ("/models", "/nope"):
        r = httpx.get(srv.base_url + path, headers=headers, timeout=TIMEOUT)
        assert r.headers["x-request-id"] == "mine-42"


def test_error_code_is_a_string_or_null(srv: ReferenceServer) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    for method, path, body in [
        ("GET", "/nope", None),
        ("GET", "/train", None),
        ("POST", "/chat/completions", {"messages": []}),
        ("POST", "/chat/completions", b"{not json"),
        ("POST", "/train", {"model": "m"}),
    ]:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.request(
            method, srv.base_url + path, content=content, headers=headers, timeout=TIMEOUT
        )
        assert r.status_code >= 400
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] is None or isinstance(error["code"], str), (path, error)


@pytest.mark.parametrize("name", ["org/model-1", "my model", "modèle"])
def test_models_retrieve_finds_a_name_the_client_percent_encodes(name: str) -> None:
    # The client quotes the id in the path ("org%2Fmodel-1"): compared undecoded,
    # the listed model was not found. HF-style "org/name" is the usual --model-name.
    server = ReferenceServer(ServerConfig(model_name=name))
    server.start()
    try:
        with openai.OpenAI(
            base_url=server.base_url, api_key="x", max_retries=0, timeout=TIMEOUT
        ) as client:
            assert [m.id for m in client.models.list()] == [name]
            assert client.models.retrieve(name).id == name
    finally:
        server.stop()


def test_message_has_every_field_openai_requires(srv: ReferenceServer) -> None:
    # OpenAI's ChatCompletionResponseMessage requires role, content and refusal
    # (refusal null unless the model declined); tool_calls, when present, is a list.
    r = httpx.post(
        srv.base_url + "/chat/completions",
        json={"model": MODEL, "messages": USER, "max_tokens": 3},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=TIMEOUT,
    )
    message = r.json()["choices"][0]["message"]
    assert {"role", "content", "refusal"} <= message.keys()
    assert message["refusal"] is None
    assert isinstance(message.get("tool_calls", []), list)


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_a_special_token_after_half_a_character_keeps_its_place(
    oai: openai.OpenAI, path: str
) -> None:
    # Seed 1131 at temperature 2 decodes ... "_", byte 0xD0 (the first of a
    # two-byte character), <|vision_start|>: the text shows the bytes in that
    # order, as /detokenize renders the same tokens.
    chat_body = {"messages": [{"role": "user", "content": "hi"}]}
    prompt = oai.post("/tokenize", body={"text": "user: hi\nassistant: "}, cast_to=object)
    body = chat_body if path == "/chat/completions" else {"prompt": prompt["tokens"]}
    kwargs = {"model": MODEL, "max_tokens": 57, "temperature": 2.0, "seed": 1131}
    r: Any = oai.post(path, body=body | kwargs, cast_to=object)
    choice = r["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    assert text.endswith("_\ufffd<|vision_start|>"), text[-20:]


def test_a_too_large_body_is_answered_with_the_clients_request_id() -> None:
    # "Every answer carries an x-request-id (the client's own, if it sent one)":
    # the 413 for a body over max_message_size too, which the SDK reports.
    server = ReferenceServer(ServerConfig(port=0, api_key=KEY, max_message_size=1000))
    server.start()
    try:
        with openai.OpenAI(
            base_url=server.base_url, api_key=KEY, max_retries=0, timeout=TIMEOUT
        ) as client:
            big = [{"role": "user", "content": "x" * 5000}]
            with pytest.raises(openai.APIStatusError) as info:
                chat(client, messages=big, extra_headers={"x-request-id": "mine-413"})
    finally:
        server.stop()
    assert info.value.status_code == 413
    assert info.value.request_id == "mine-413"


def test_legacy_completions_take_max_tokens_0_to_echo_the_prompt(oai: openai.OpenAI) -> None:
    # OpenAI's CreateCompletionRequest: max_tokens has minimum 0 (echo=True,
    # max_tokens=0 is how a prompt is scored); chat's stays at least 1.
    r = oai.completions.create(model=MODEL, prompt="the sea", max_tokens=0, echo=True)
    assert r.choices[0].text == "the sea"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError):
        chat(oai, max_tokens=0)
