"""Reference-server branches no other test reached: chat past the window, EOS endings,
streamed echo with usage, fifteen 400 refusals, prefill slots, affinity records, ports."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from grpclib.client import Channel

from poc_api._proto.salience import GenerateRequest, OpenSessionRequest, SalienceStub
from poc_api.server import ServerConfig

from .conftest import ServerFactory, SyncSalience

TIMEOUT = 10.0
USER = [{"role": "user", "content": "Tell me about the sea"}]


def test_a_chat_prompt_past_the_context_window_is_400(make_server: ServerFactory) -> None:
    srv = make_server(max_context=16)
    r = httpx.post(srv.base_url + "/chat/completions", json={"messages": USER}, timeout=TIMEOUT)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "messages"


def test_a_chat_that_meets_eos_finishes_with_stop(make_server: ServerFactory) -> None:
    srv = make_server()
    with httpx.Client(base_url=srv.base_url, timeout=TIMEOUT) as c:
        body = {"messages": USER, "max_tokens": 4000, "temperature": 1.0, "seed": 0}
        r = c.post("/chat/completions", json=body).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] < 4000
    assert "<|" not in choice["message"]["content"]  # (EOS is not text)


def test_a_streamed_legacy_completion_echoes_and_counts_usage(make_server: ServerFactory) -> None:
    srv = make_server()
    body = {"prompt": "hello", "max_tokens": 5, "echo": True}
    with httpx.Client(base_url=srv.base_url, timeout=TIMEOUT) as c:
        whole = c.post("/completions", json=body).json()
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with c.stream("POST", "/completions", json=stream) as r:
            data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["text"] == "hello"
    assert (
        "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
        == (whole["choices"][0]["text"])
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(ch["usage"] is None for ch in chunks[:-1])


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/completions", {"suffix": "x"}, "suffix"),
        ("/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/completions", {"stream": True, "stream_options": []}, "stream_options"),
        ("/completions", {"stop": [1]}, "stop"),
        ("/completions", {"model": 3}, "model"),
        ("/chat/completions", {"tools": {}}, "tools"),
        ("/chat/completions", {"tools": [{"type": "x"}]}, "tools[0].type"),
        ("/chat/completions", {"tools": [{"type": "function"}]}, "tools[0].function.name"),
        (
            "/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": 1}}]},
            "tools[0].function.parameters",
        ),
        (
            "/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "x"},
            "tool_choice",
        ),
        ("/chat/completions", {"response_format": "json"}, "response_format"),
        ("/chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type"),
        ("/chat/completions", {"messages": ["hi"]}, "messages[0]"),
        ("/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role"),
        (
            "/chat/completions",
            {"messages": [{"role": "assistant", "content": None, "tool_calls": {}}]},
            "messages[0].tool_calls",
        ),
    ],
)
def test_openai_refusals_name_their_param(
    make_server: ServerFactory, path: str, extra: dict[str, Any], param: str
) -> None:
    srv = make_server()
    base: dict[str, Any] = {"prompt": "a"} if path == "/completions" else {"messages": USER}
    r = httpx.post(srv.base_url + path, json=base | extra, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_prefill_slots_serialise_simulated_prefills(make_server: ServerFactory) -> None:
    srv = make_server(prefill_delay_us=1000, prefill_slots=1)  # 100 positions: 0.1 s

    async def both() -> float:
        channel = Channel("127.0.0.1", srv.grpc_port)
        stub = SalienceStub(channel)
        try:
            sids = [(await stub.open_session(OpenSessionRequest())).session_id for _ in "ab"]
            started = time.monotonic()

            async def prefill(sid: str) -> None:
                async for _ in stub.generate(
                    GenerateRequest(session_id=sid, append_tokens=[65] * 100)
                ):
                    pass

            await asyncio.gather(*(prefill(s) for s in sids))
            return time.monotonic() - started
        finally:
            channel.close()

    assert asyncio.run(asyncio.wait_for(both(), TIMEOUT)) >= 0.19


def test_session_affinity_headers_are_recorded(make_server: ServerFactory) -> None:
    srv = make_server()
    client = SyncSalience(srv.grpc_port)
    try:
        client.stub.metadata = {"x-session-affinity": "conv-7"}
        client.open()
    finally:
        client.close()
    assert srv.state().affinity == (("OpenSession", "conv-7"),)


@pytest.mark.parametrize(("port", "error"), [(True, TypeError), (65535, ValueError)])
def test_a_port_that_leaves_no_room_for_grpc_is_refused(port: object, error: type) -> None:
    with pytest.raises(error):
        ServerConfig(port=port)  # type: ignore[arg-type]
