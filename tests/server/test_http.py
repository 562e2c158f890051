"""HTTP endpoints (h11 server) driven by httpx over real TCP, PROTOCOL.md §1, §5."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from poc_api.server import ReferenceServer

from .conftest import ServerFactory, wait_until

TIMEOUT = 10.0


@pytest.fixture
def http(server: ReferenceServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as c:
        yield c


def root(srv: ReferenceServer) -> str:
    return srv.base_url.removesuffix("/v1")


def test_urls_follow_the_port_rule(server: ReferenceServer) -> None:
    assert server.grpc_port == server.http_port + 1
    assert server.base_url == f"http://127.0.0.1:{server.http_port}/v1"
    assert server.grpc_url == f"http://127.0.0.1:{server.grpc_port}"


def test_readout_manifest(http: httpx.Client) -> None:
    r = http.get("/readout/manifest")
    assert r.status_code == 200
    assert r.json() == {
        "concepts": ["vowel", "consonant", "digit", "space", "punct", "upper", "newline", "image"],
        "layers": [0, 1, 2],
    }


def test_readout_manifest_is_404_when_disabled(make_server: ServerFactory) -> None:
    srv = make_server(readout=False)
    r = httpx.get(srv.base_url + "/readout/manifest", timeout=TIMEOUT)
    assert r.status_code == 404 and "error" in r.json()


def test_manifest_follows_config(make_server: ServerFactory) -> None:
    srv = make_server(n_layers=2, concepts=("a", "b"))
    r = httpx.get(srv.base_url + "/readout/manifest", timeout=TIMEOUT)
    assert r.json() == {"concepts": ["a", "b"], "layers": [0, 1]}


GOOD_SAMPLE = {"tokens": [1, 2, 3, 4], "target_ranges": [[1, 3], [3, 4]], "weight": 0.5}


def test_train_accepts_valid_samples(make_server: ServerFactory) -> None:
    srv = make_server()
    body = {"model": "m", "samples": [GOOD_SAMPLE, {**GOOD_SAMPLE, "weight": 2}]}
    r = httpx.post(srv.base_url + "/train", json=body, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json()["accepted"] == 2 and r.json()["job_id"].startswith("train-")
    assert srv.state().train_samples == 2


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"samples": [GOOD_SAMPLE]},
        {"model": 1, "samples": [GOOD_SAMPLE]},
        {"model": "m", "samples": {}},
        {"model": "m", "samples": [{**GOOD_SAMPLE, "tokens": [1, 261]}]},
        {"model": "m", "samples": [{**GOOD_SAMPLE, "tokens": [1, -1]}]},
        {"model": "m", "samples": [{**GOOD_SAMPLE, "tokens": [1, True]}]},
        {"model": "m", "samples": [{**GOOD_SAMPLE, "target_ranges": [[2, 2]]}]},
        {"model": "m", "samples": [{**GOOD_SAMPLE, "target_ranges": [[0, 5]]}]},
        {"model": "m", "samples": [{**GOOD_SAMPLE, "target_ranges": [[0]]}]},
        {"model": "m", "samples": [{**GOOD_SAMPLE, "weight": "1"}]},
        {"model": "m", "samples": [{"tokens": [1], "target_ranges": [[0, 1]]}]},
    ],
)
def test_train_rejects_bad_bodies(http: httpx.Client, body: Any) -> None:
    r = http.post("/train", json=body)
    assert r.status_code == 400
    assert isinstance(r.json()["error"]["message"], str)


@pytest.mark.parametrize("body", [b"{not json", b"[" * 200_000 + b"]" * 200_000])
@pytest.mark.parametrize("path", ["/train", "/chat/completions", "/tokenize"])
def test_malformed_json_is_400(http: httpx.Client, path: str, body: bytes) -> None:
    # (Nesting too deep for Python's parser is a RecursionError, not a ValueError.)
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", b'{"text": "\\ud800"}'),
        ("/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udc00"}]}'),
        ("/completions", b'{"prompt": "\\ud800", "max_tokens": 1}'),
        ("/completions", b'{"prompt": ["ok", "\\ud800"], "max_tokens": 1}'),
    ],
)
def test_a_lone_surrogate_escape_is_400(
    http: httpx.Client, path: str, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # Valid JSON grammar that names no Unicode character, so no UTF-8 bytes to
    # tokenize: the handler raised UnicodeEncodeError, the client got no answer at
    # all (the connection closed) and the log an ERROR traceback.
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"], caplog.text


CHAT = {"model": "x", "messages": [{"role": "user", "content": "Tell me about the sea"}]}


def test_chat_completion(http: httpx.Client) -> None:
    r = http.post("/chat/completions", json={**CHAT, "max_tokens": 40})
    assert r.status_code == 200
    body = r.json()
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 40
    assert usage["total_tokens"] == usage["prompt_tokens"] + 40
    assert http.post("/chat/completions", json={**CHAT, "max_tokens": 40}).json()["choices"] == [
        choice
    ]


def test_chat_stop_strings(http: httpx.Client) -> None:
    full = http.post("/chat/completions", json={**CHAT, "max_tokens": 40}).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[10:13]
    r = http.post("/chat/completions", json={**CHAT, "max_tokens": 40, "stop": stop}).json()
    assert r["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def sse_events(r: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]


def test_chat_streaming_sse(http: httpx.Client) -> None:
    body = {**CHAT, "max_tokens": 30, "temperature": 0.7}
    plain = http.post("/chat/completions", json=body).json()
    with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = sse_events(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    # Usage only when asked for (stream_options.include_usage), as OpenAI does.
    assert all("usage" not in c for c in chunks)


def test_chat_rejects_bad_requests(http: httpx.Client) -> None:
    assert http.post("/chat/completions", json={"messages": []}).status_code == 400
    assert http.post("/chat/completions", json={**CHAT, "max_tokens": -1}).status_code == 400


def test_models(http: httpx.Client) -> None:
    body = http.get("/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == "poc-reference"


def test_tokenizer_endpoints(http: httpx.Client) -> None:
    assert http.get("/tokenizer").json() == {
        "vocab_size": 261,
        "special": {
            "bos": 256,
            "eos": 257,
            "vision_start": 258,
            "vision_end": 259,
            "image_pad": 260,
        },
    }
    toks = http.post("/tokenize", json={"text": "hé!"}).json()["tokens"]
    assert toks == list("hé!".encode())
    text = http.post("/detokenize", json={"tokens": [*toks, 257, 0xFF]}).json()["text"]
    assert text == "hé!<|eos|>\ufffd"
    assert http.post("/detokenize", json={"tokens": [300]}).status_code == 400
    assert http.post("/tokenize", json={"txt": "a"}).status_code == 400


def test_unknown_path_and_wrong_method(http: httpx.Client) -> None:
    assert http.get("/nope").status_code == 404
    assert http.get("/train").status_code == 405


def test_keep_alive_serves_many_requests_on_one_connection(server: ReferenceServer) -> None:
    with httpx.Client(
        base_url=server.base_url, timeout=TIMEOUT, limits=httpx.Limits(max_connections=1)
    ) as c:
        for _ in range(20):
            assert c.get("/models").status_code == 200


def test_admin_state_matches_state(make_server: ServerFactory) -> None:
    srv = make_server(api_key="k")
    headers = {"authorization": "Bearer k"}
    httpx.get(srv.base_url + "/models", headers=headers, timeout=TIMEOUT)
    r = httpx.get(root(srv) + "/admin/state", timeout=TIMEOUT)  # no key needed
    assert r.status_code == 200
    body = r.json()
    assert body == srv.state().to_json() | {"http_requests": body["http_requests"]}
    assert body["http_requests"]["/v1/models"] == 1
    assert set(body) == {
        "session_ids",
        "connections_total",
        "connections_open",
        "cancelled_streams",
        "resets",
        "tokens_appended",
        "generate_calls",
        "rpc_counts",
        "http_requests",
        "train_samples",
        "tokens_decoded",
        "bytes_streamed",
        "affinity",
    }


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/readout/manifest"),
        ("POST", "/train"),
        ("POST", "/chat/completions"),
        ("GET", "/models"),
        ("POST", "/tokenize"),
        ("GET", "/tokenizer"),
    ],
)
def test_http_auth(make_server: ServerFactory, method: str, path: str) -> None:
    srv = make_server(api_key="k")
    url = srv.base_url + path
    body = {"model": "m", "samples": [], "messages": CHAT["messages"], "text": "a"}
    assert httpx.request(method, url, json=body, timeout=TIMEOUT).status_code == 401
    wrong = {"authorization": "Bearer nope"}
    assert httpx.request(method, url, json=body, headers=wrong, timeout=TIMEOUT).status_code == 401
    good = {"authorization": "Bearer k"}
    assert httpx.request(method, url, json=body, headers=good, timeout=TIMEOUT).status_code == 200


def test_a_client_that_expects_100_continue_gets_it(server: ReferenceServer) -> None:
    # curl sends "Expect: 100-continue" for bodies over 1 KiB and waits a second
    # for the go-ahead before it sends the body anyway: 1 s per such request.
    import socket

    body = b'{"text": "' + b"a" * 2000 + b'"}'
    head = (
        f"POST /v1/tokenize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nexpect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        sock.sendall(head)
        sock.settimeout(0.5)
        assert sock.recv(1000).startswith(b"HTTP/1.1 100 ")
        sock.settimeout(5)
        sock.sendall(body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]


def test_a_request_without_the_key_is_refused_before_its_body_is_invited(
    make_server: ServerFactory,
) -> None:
    # It got "100 Continue", and its body was read (and kept) before the 401.
    import socket

    srv = make_server(api_key="k")
    head = (
        b"POST /v1/train HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 50000000\r\nexpect: 100-continue\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=5) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
    # Its body unread, the connection closes, and the answer says so (RFC 9110
    # 10.1.1): else the client may send the body, or its next request, into it.
    assert b"\r\nconnection: close\r\n" in answer.lower(), answer
    assert srv.state().http_requests.get("/v1/train") == 1


def test_the_body_of_a_request_without_the_key_is_not_kept(make_server: ServerFactory) -> None:
    # The server buffered it whole (up to max_message_size, 64 MiB) before the 401.
    import socket
    import tracemalloc

    srv = make_server(api_key="k")
    size = 20_000_000
    head = (
        f"POST /v1/train HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {size}\r\n\r\n"
    ).encode()
    piece = b" " * 1_000_000
    tracemalloc.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as sock:
            sock.sendall(head)
            for _ in range(size // len(piece)):
                sock.sendall(piece)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
    assert peak < size // 4, f"{peak / 1e6:.1f} MB held"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"JUNK\r\n\r\n", 400),
        (b"POST /v1/tokenize HTTP/1.1\r\nhost: x\r\ncontent-length: -5\r\n\r\n", 400),
        (b"GET /v1/health HTTP/1.1\r\nhost: x\r\nbad header: 1\r\n\r\n", 400),
    ],
)
def test_a_request_that_cannot_be_read_gets_a_400(
    server: ReferenceServer, request_bytes: bytes, status: int
) -> None:
    # It got no answer: the connection was closed (the error response was only
    # sent once a request had been read).
    import socket

    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        sock.sendall(request_bytes)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:100]
    assert b'"invalid_request_error"' in answer


def test_a_body_one_byte_over_max_message_size_is_413_and_one_at_it_is_served(
    make_server: ServerFactory,
) -> None:
    limit = 1000
    srv = make_server(max_message_size=limit)
    request = b'{"text": "a"}'

    def post(size: int) -> httpx.Response:
        body = request + b" " * (size - len(request))  # JSON whitespace: still valid
        assert len(body) == size
        with httpx.Client(base_url=srv.base_url, timeout=TIMEOUT) as c:
            return c.post("/tokenize", content=body, headers={"content-type": "application/json"})

    at = post(limit)
    assert at.status_code == 200, at.text
    assert at.json()["tokens"] == [ord("a")]
    over = post(limit + 1)
    assert over.status_code == 413, over.text
    assert str(limit) in over.text


def test_a_chat_one_token_short_of_the_context_window_decodes_one_token(
    make_server: ServerFactory,
) -> None:
    # The context window holds max_context positions: a prompt of max_context - 1
    # leaves room for exactly one generated token, then "length".
    max_context = 64
    srv = make_server(max_context=max_context, ignore_eos=True)
    with httpx.Client(base_url=srv.base_url, timeout=TIMEOUT) as c:

        def chat(content: str) -> dict[str, Any]:
            messages = [{"role": "user", "content": content}]
            r = c.post("/chat/completions", json={"messages": messages, "max_tokens": 1000})
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            return body

        template = chat("")["usage"]["prompt_tokens"]  # the chat template's own tokens
        body = chat("a" * (max_context - 1 - template))  # one token per ASCII byte
    assert body["usage"]["prompt_tokens"] == max_context - 1
    assert body["usage"]["completion_tokens"] == 1
    assert body["choices"][0]["finish_reason"] == "length"


_HUGE_INT = "1" + "0" * 400  # a JSON integer (under Python's 4300-digit limit) no float holds


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/train",
            '{"model": "m", "samples": [{"tokens": [1], "target_ranges": [], "weight": %s}]}',
        ),
        ("/chat/completions", '{"messages": [{"role": "user", "content": "a"}], "top_p": %s}'),
        ("/completions", '{"prompt": "a", "top_p": %s}'),
        ("/completions", '{"prompt": "a", "presence_penalty": %s}'),
    ],
)
def test_a_number_too_large_for_a_float_is_400(
    http: httpx.Client, path: str, body: str, caplog: pytest.LogCaptureFixture
) -> None:
    # math.isfinite(10**400) raises OverflowError: the connection closed with no
    # answer at all, and the log got an ERROR traceback.
    r = http.post(path, content=body % _HUGE_INT, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "error" in r.json()
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"], caplog.text


@pytest.mark.parametrize("name", [[1], {"a": 1}])
def test_a_tool_choice_naming_no_string_is_400(
    http: httpx.Client, name: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # `name in set_of_names` raised TypeError (unhashable): no answer, an ERROR log.
    body = {
        **CHAT,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": name}},
    }
    r = http.post("/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tool_choice"
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"], caplog.text


def test_a_405_names_the_allowed_methods(http: httpx.Client) -> None:
    # RFC 9110 15.5.6: "The origin server MUST generate an Allow header field in a
    # 405 (Method Not Allowed) response containing a list of the target resource's
    # currently supported methods."
    r = http.get("/train")
    assert r.status_code == 405
    assert r.headers.get("allow") == "POST"
    r = http.post("/readout/manifest", json={})
    assert r.status_code == 405
    assert r.headers.get("allow") == "GET"


def test_a_handler_bug_is_a_500_not_a_dropped_connection(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The two bugs above dropped the connection with no answer: the client saw a
    # transport error, not the server's fault. The next such bug answers 500.
    from poc_api.server import _http

    def broken(body: Any) -> int:
        raise RuntimeError("a handler bug")

    monkeypatch.setattr(_http, "validate_train", broken)
    r = http.post("/train", json={"model": "m", "samples": [GOOD_SAMPLE]})
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "server_error"
    assert "a handler bug" in caplog.text  # the traceback is logged, not sent
    assert "a handler bug" not in r.text
    assert http.get("/readout/manifest").status_code == 200  # the server goes on


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_streamed_logprobs_go_with_the_text_they_belong_to(http: httpx.Client, path: str) -> None:
    # A stop string makes the decoder hold text back (it may be the stop's start):
    # a chunk's logprobs must be those of its own text, not of the tokens after it.
    if path == "/completions":
        body: dict[str, Any] = {"prompt": "hello", "logprobs": 0}
    else:
        body = {**CHAT, "logprobs": True}
    body |= {"max_tokens": 12, "stop": ["QQQQ"], "stream": True}
    with http.stream("POST", path, json=body) as r:
        chunks = [json.loads(d) for d in sse_events(r)[:-1]]
    at = 0
    for chunk in chunks:
        for choice in chunk["choices"]:
            text = choice["text"] if path == "/completions" else choice["delta"].get("content")
            if not text:
                continue
            if path == "/completions":
                lp = choice["logprobs"]
                assert "".join(lp["tokens"]) == text
                assert lp["text_offset"] == list(range(at, at + len(text)))
            else:
                assert "".join(e["token"] for e in choice["logprobs"]["content"]) == text
            at += len(text)
    assert at == 12


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_a_stream_its_client_left_ends_its_decode_at_once(
    make_server: ServerFactory, path: str
) -> None:
    # The SSE generator was left to the garbage collector: its decode's finally
    # (which counts tokens_decoded) ran whenever that came, or never.
    srv = make_server(token_delay_ms=20, ignore_eos=True)
    body: dict[str, Any] = {"prompt": "hello"} if path == "/completions" else dict(CHAT)
    body |= {"max_tokens": 500, "stream": True}
    with httpx.Client(base_url=srv.base_url, timeout=TIMEOUT) as c:
        with c.stream("POST", path, json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break
    assert wait_until(lambda: srv.state().tokens_decoded > 0, timeout=3.0)
    assert srv.state().tokens_decoded < 100


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_a_completion_its_client_left_stops_decoding(make_server: ServerFactory, path: str) -> None:
    # Not streamed: nothing is written until the whole decode is done, so nothing
    # noticed the client had gone; the server decoded on for the full budget
    # (here 500 x 20 ms = 10 s of simulated GPU time nobody would read).
    srv = make_server(token_delay_ms=20, ignore_eos=True)
    body: dict[str, Any] = {"prompt": "hello"} if path == "/completions" else dict(CHAT)
    body |= {"max_tokens": 500}
    with httpx.Client(base_url=srv.base_url, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(path, json=body)
    assert wait_until(lambda: srv.state().tokens_decoded > 0, timeout=3.0)
    assert srv.state().tokens_decoded < 100


def _raw_post(path: str, payload: dict[str, Any], headers: bytes = b"") -> bytes:
    """An HTTP/1.1 POST of ``payload`` as JSON, as bytes for a raw socket."""
    body = json.dumps(payload).encode()
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\n".encode() + headers
    return head + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body


def test_a_keep_alive_client_may_send_its_next_request_while_one_decodes(
    make_server: ServerFactory,
) -> None:
    # (Pipelined: the next request arrives while the first is being answered.)
    srv = make_server(token_delay_ms=5)
    one = _raw_post("/v1/chat/completions", {**CHAT, "max_tokens": 20})
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=TIMEOUT) as sock:
        sock.sendall(one)
        time.sleep(0.02)
        sock.sendall(one)
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.count(b'"finish_reason"') == 2


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_top_p_0_keeps_the_most_likely_token_alone(http: httpx.Client, path: str) -> None:
    # 0 was the salience protocol's "off": a nucleus of 0 sampled from everything,
    # while one of 1e-6 was greedy (OpenAI's top_p=0 is the most likely token).
    body: dict[str, Any] = {"prompt": "Tell me"} if path == "/completions" else dict(CHAT)
    body |= {"max_tokens": 12}

    def text(**sampling: float) -> str:
        choice = http.post(path, json=body | sampling).json()["choices"][0]
        return str(choice["text"] if path == "/completions" else choice["message"]["content"])

    greedy = text(temperature=0.0)
    assert {text(temperature=1.0, top_p=0.0, seed=seed) for seed in range(4)} == {greedy}


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions"])
def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(
    server: ReferenceServer, path: str
) -> None:
    # (HTTP/1.0-style clients and `nc -N` shut their write side once the request
    # is sent: EOF on the read side is not the client leaving.)
    if path == "/v1/models":
        req = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    else:
        req = _raw_post(path, {**CHAT, "max_tokens": 4}, b"connection: close\r\n")
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=TIMEOUT) as sock:
        sock.sendall(req)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data


def test_what_a_client_sends_during_a_decode_is_not_buffered_without_bound(
    make_server: ServerFactory,
) -> None:
    # The socket is read while a completion decodes (to see the client leave):
    # everything the client sent meanwhile went to h11's buffer, without bound
    # (300 MiB in half a second; the kernel's buffers had stopped it at a few MiB).
    srv = make_server(token_delay_ms=50, ignore_eos=True)
    req = _raw_post("/v1/completions", {"prompt": "hi", "max_tokens": 100})
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=TIMEOUT) as sock:
        sock.sendall(req)
        sock.settimeout(1.0)
        sent = 0
        with pytest.raises(TimeoutError):
            while sent < 64 << 20:
                sent += sock.send(b"x" * (1 << 20))
    assert sent < 32 << 20
