"""HTTP paths the other tests did not run: stalled JSON answers to stream requests, stream
chunks of the wrong shape, model lookups that find no single model, HTTP/2-only ports,
deflate and gzip corners, ChatStream reprs, block misuse, re-entry after a cancelled entry,
a pool without affinity keys."""

from __future__ import annotations

import json
import zlib

import httpx
import pytest
import trio
from helpers import read_request
from test_http import DELTA, HELLO, canned_server, make_api, response, sse

from poc_api._errors import PocApiTimeout, ProtocolViolation
from poc_api._http import ChatDelta, ChatDone, HttpApi

FINISH = '{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'


async def test_a_stream_answered_by_a_json_body_that_stalls_times_out_at_the_clients_timeout() -> (
    None
):
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"
        )
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with canned_server(handler) as url, httpx.AsyncClient(timeout=5.0) as http:
            api = HttpApi(http, url, "", "m", timeout=0.5)
            with pytest.raises(PocApiTimeout, match="no complete error answer"):
                async with api.chat_stream(HELLO):
                    pass


@pytest.mark.parametrize(
    ("chunk", "match"),
    [
        ('{"choices": "x"}', "choices"),
        ("[1, 2]", "a chunk object"),
        ('{"choices":[{"index":"0","delta":{"content":"a"}}]}', "an int choice index"),
    ],
)
async def test_a_stream_chunk_of_the_wrong_shape_is_a_protocol_violation(
    chunk: str, match: str
) -> None:
    async with canned_server(
        [response(200, sse(DELTA, chunk, FINISH, "[DONE]"), "text/event-stream")]
    ) as url:
        async with httpx.AsyncClient(timeout=5.0) as http:
            api = make_api(http, url)
            got = []
            with pytest.raises(ProtocolViolation, match=match):
                async with api.chat_stream(HELLO) as events:
                    async for ev in events:
                        got.append(ev)
    assert got == [ChatDelta("hi")]


async def test_stream_content_parts_skip_what_is_not_an_object() -> None:
    chunk = json.dumps(
        {"choices": [{"index": 0, "delta": {"content": ["junk", {"text": "a"}, {"text": "b"}]}}]}
    )
    body = sse(chunk, FINISH, "[DONE]")
    async with canned_server([response(200, body, "text/event-stream")]) as url:
        async with httpx.AsyncClient(timeout=5.0) as http:
            async with make_api(http, url).chat_stream(HELLO) as events:
                got = [ev async for ev in events]
    assert got[0] == ChatDelta("ab")
    assert isinstance(got[-1], ChatDone)


async def test_bytes_after_a_deflate_stream_are_ignored() -> None:
    data = json.dumps({"tokens": [1, 2, 3]}).encode()
    body = zlib.compress(data) + b"\r\ngarbage"
    async with canned_server([response(200, body, encoding="deflate")]) as url:
        async with httpx.AsyncClient(timeout=5.0) as http:
            assert await make_api(http, url).tokenize("x") == [1, 2, 3]


async def test_raw_deflate_is_read_too() -> None:
    data = json.dumps({"tokens": [1, 2, 3]}).encode()
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    body = c.compress(data) + c.flush()
    async with canned_server([response(200, body, encoding="deflate")]) as url:
        async with httpx.AsyncClient(timeout=5.0) as http:
            assert await make_api(http, url).tokenize("x") == [1, 2, 3]


@pytest.mark.parametrize(
    ("models", "match"),
    [
        ([], "lists no models"),
        ([{"id": "a"}, {"id": "b"}], "lists 2 models"),
        ([{"id": ""}], "no usable id"),
    ],
)
async def test_a_model_lookup_that_finds_no_single_model_is_a_value_error(
    models: list, match: str
) -> None:
    paths = []

    async def handler(stream: trio.SocketStream) -> None:
        req = await read_request(stream)
        paths.append(req)
        await stream.send_all(
            response(200, json.dumps({"object": "list", "data": models}).encode())
        )

    async with canned_server(handler) as url, httpx.AsyncClient(timeout=5.0) as http:
        api = HttpApi(http, url, "", "")
        with pytest.raises(ValueError, match=match):
            await api.chat(HELLO)
        with pytest.raises(ValueError, match=match):
            async with api.chat_stream(HELLO):
                pass
    assert len(paths) == 2  # not cached; no chat request sent


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"[]", "an object"),
        (b'{"choices": []}', "choices"),
        (b'{"choices": [1]}', "a choice object"),
    ],
)
async def test_a_chat_answer_of_the_wrong_shape_is_a_protocol_violation(
    body: bytes, match: str
) -> None:
    async with canned_server([response(200, body)]) as url, httpx.AsyncClient(timeout=5.0) as http:
        with pytest.raises(ProtocolViolation, match=match):
            await make_api(http, url).chat(HELLO)


async def test_a_pool_without_affinity_keys_keeps_each_session_on_its_endpoint() -> None:
    from test_pool import pool_client, turn

    from poc_api.testing import reference_servers

    async with (
        reference_servers(2) as servers,
        pool_client(servers, affinity_header=None) as client,
    ):
        with trio.fail_after(20):
            homes = []
            for _ in range(6):
                async with client.session() as s:
                    await s.prefill([1, 2, 3])
                    await s.prefill([4])
                    homes.append(
                        next(
                            i
                            for i, v in enumerate(servers)
                            if s.session_id in v.state().session_ids
                        )
                    )
                assert not any(v.state().session_ids for v in servers)
            async with client.conversation() as conv:
                await turn(conv, [1, 2])
                await turn(conv, [3])
    assert all(e.sessions == 0 for e in client.endpoints)


async def test_an_http2_only_port_is_told_as_such() -> None:
    from poc_api._errors import ServerUnavailable

    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an HTTP/2 server's first frame

    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(settings)
        with trio.move_on_after(2):
            await stream.receive_some()

    async with canned_server(handler) as url, httpx.AsyncClient(timeout=5.0) as http:
        with pytest.raises(
            ServerUnavailable, match=r"did not answer in HTTP/1\.1.*gRPC port"
        ) as info:
            await make_api(http, url).tokenize("x")
        with pytest.raises(ServerUnavailable, match=r"did not answer in HTTP/1\.1"):
            async with make_api(http, url).chat_stream(HELLO):
                pass
    assert not info.value.retriable
    assert "TLS port" in str(info.value)


async def test_a_chat_streams_repr_says_its_state() -> None:
    body = sse(DELTA, FINISH, "[DONE]")
    async with canned_server([response(200, body, "text/event-stream")]) as url:
        async with httpx.AsyncClient(timeout=5.0) as http:
            api = make_api(http, url)
            async with api.chat_stream(HELLO) as events:
                assert repr(events) == f"<poc_api.ChatStream POST {url}/chat/completions streaming>"
                got = [ev async for ev in events]
                assert repr(events).endswith(" finished finish_reason='stop'>")
            assert repr(events).endswith(" finished finish_reason='stop'>")
            assert got[0] == ChatDelta("hi")
            async with api.chat_stream(HELLO) as events:
                pass
            assert repr(events).endswith(" left before the end>")
            async with api.chat_stream(HELLO) as events:
                await events.aclose()
                assert repr(events).endswith(" closed>")
    async with canned_server([response(200, sse(DELTA, "{bad"), "text/event-stream")]) as url:
        async with httpx.AsyncClient(timeout=5.0) as http:
            with pytest.raises(ProtocolViolation):
                async with make_api(http, url).chat_stream(HELLO) as events:
                    [ev async for ev in events]
            assert repr(events).endswith(" failed: ProtocolViolation>")


async def test_iterating_a_clients_chat_stream_without_async_with_says_how() -> None:
    import poc_api

    async with poc_api.ApiClient(
        "http://127.0.0.1:1/v1", model="m", grpc_url="http://127.0.0.1:1"
    ) as c:
        block = c.chat_stream(HELLO)
        with pytest.raises(
            TypeError, match=r"client\.chat_stream\(\.\.\.\) is a block, not an iterator"
        ):
            async for _ in block:  # type: ignore[attr-defined]
                pass


@pytest.mark.parametrize("encoding", ["gzip", "gzip, gzip", "deflate, gzip"])
async def test_gzip_members_that_hold_nothing_are_read_past(encoding: str) -> None:
    import gzip

    data = json.dumps({"tokens": [1, 2, 3]}).encode()
    body = (
        gzip.compress(b"") + gzip.compress(data[:5]) + gzip.compress(b"") + gzip.compress(data[5:])
    )
    if encoding == "gzip, gzip":
        body = gzip.compress(b"") + gzip.compress(body)
    elif encoding == "deflate, gzip":
        body = gzip.compress(zlib.compress(data))
    async with canned_server([response(200, body, encoding=encoding)]) as url:
        async with httpx.AsyncClient(timeout=5.0) as http:
            assert await make_api(http, url).tokenize("x") == [1, 2, 3]


async def test_a_gzip_body_cut_in_a_member_is_a_protocol_violation_also_chunked() -> None:
    import gzip

    data = json.dumps({"tokens": list(range(2000))}).encode()
    z = gzip.compress(data)[:-12]
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(z), z)
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
        b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    async with canned_server([head + chunked]) as url:
        async with httpx.AsyncClient(timeout=5.0) as http:
            with pytest.raises(ProtocolViolation, match="truncated"):
                await make_api(http, url).tokenize("x")


async def test_a_client_whose_entry_was_cancelled_can_be_entered_again() -> None:
    import poc_api
    from poc_api.server import ReferenceServer, ServerConfig

    async with ReferenceServer(ServerConfig(port=0, api_key=None)) as srv:
        client = poc_api.ApiClient(srv.base_url, grpc_url=srv.grpc_url)
        with trio.CancelScope() as cs:
            cs.cancel()
            await client.__aenter__()
        assert cs.cancelled_caught
        assert client.endpoints == ()
        async with client:
            async with client.session() as s:
                await s.prefill([1, 2])
            with pytest.raises(RuntimeError, match="already open"):
                await client.__aenter__()
        with pytest.raises(RuntimeError, match="cannot be reopened"):
            await client.__aenter__()
