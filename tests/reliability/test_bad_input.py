"""Bad input gets a clear typed error — before sending when the client can tell —
and the client (and its session) stays usable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from helpers import http_server, read_request
from misbehaving import DUMMY_BASE_URL, MisbehavingServer, Reply
from reliability_helpers import make_png

import poc_api
from poc_api import Image, SamplingParams, Tokens, TrainSample
from poc_api._wire import append_image_request_size
from poc_api.server import ReferenceServer, tokenize

HELLO = tokenize("The quick brown fox")
PNG = make_png(56, 28)
BAD_IDS: list[Any] = [-1, 2**32, 2**64, True, 1.5, "7", None, b"x"]
BAD_RANGES: list[Any] = [
    (5, 2),
    (3, 3),
    (-1, 3),
    (1, 2**32),
    (1.0, 2),
    ("a", 2),
    (True, 2),
    (1, 2, 3),
    (1,),
    (),
    5,
    "ab",
    None,
    bytearray(b"\x01\x02"),  # (iterates as ints: it was the pair (1, 2))
    memoryview(b"\x01\x02"),
    range(0, 4, 2),  # a range is its positions: one with steps is none
]


# -- gRPC-side arguments ---------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_invalid_token_ids_are_refused_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer, bad: Any
) -> None:
    async with client.session() as s:
        await s.prefill([1])
        before = server.state().generate_calls
        with pytest.raises((ValueError, TypeError)):
            await s.prefill([1, bad])
        with pytest.raises((ValueError, TypeError)):
            async with s.generate([bad]):
                pass
        with pytest.raises((ValueError, TypeError)):
            Tokens([2, bad])
        with pytest.raises((ValueError, TypeError)):
            SamplingParams(stop_token_ids=[bad])
        with pytest.raises((ValueError, TypeError)):
            TrainSample(tokens=[1, bad], target_ranges=[(0, 1)])
        assert server.state().generate_calls == before
        assert not s.lost
        await s.prefill([2])
        assert s.committed_len == 2


async def test_an_out_of_vocabulary_id_is_invalid_request_and_keeps_things_usable(
    client: poc_api.ApiClient,
) -> None:
    async with client.session() as s:
        with pytest.raises(poc_api.InvalidRequest):
            await s.prefill([100_000])
        assert not s.lost
        await s.prefill([1])
    async with client.conversation() as conv:
        with trio.fail_after(5), pytest.raises(poc_api.InvalidRequest):
            async with conv.stream([Tokens([100_000])], SamplingParams(max_tokens=2)):
                pass
        async with conv.stream([Tokens([1, 2])], SamplingParams(max_tokens=2)) as ev:
            assert isinstance([e async for e in ev][-1], poc_api.StreamDone)
    with pytest.raises(poc_api.InvalidRequest):
        await client.score([Tokens([1, 100_000])], [(0, 2)])


@pytest.mark.parametrize("key", ["max_tokens", "temperature", "stop_token_ids"])
async def test_a_sampling_option_given_as_a_keyword_says_where_it_goes(
    client: poc_api.ApiClient, server: ReferenceServer, key: str
) -> None:
    # stream(chunks, max_tokens=3): Python's error named the keyword only.
    before = server.state().rpc_counts.get("Generate", 0)
    async with client.conversation() as conv, client.session() as s:
        for call in (
            lambda: conv.stream([Tokens([1])], **{key: 3}),
            lambda: s.generate([1], **{key: 3}),
        ):
            with pytest.raises(TypeError, match=rf"pass sampling=SamplingParams\({key}=\.\.\.\)"):
                call()
        with pytest.raises(TypeError, match=r"unexpected keyword argument 'bogus'$"):
            s.generate([1], bogus=3)  # type: ignore[call-arg]
    assert server.state().rpc_counts.get("Generate", 0) == before


@pytest.mark.parametrize(
    ("data", "mime", "exc_type"),
    [
        (b"", "image/png", ValueError),
        ("not bytes", "image/png", TypeError),
        (PNG, None, TypeError),
        (PNG, 7, TypeError),
        (PNG, "text/plain", ValueError),  # as Image(PNG, "text/plain") does
        (PNG, "", ValueError),
        (PNG, "image/", ValueError),
        # The server quoted it in its error's grpc-message, whose size then failed
        # the whole connection (other tasks' streams on it too).
        (PNG, "image/" + "x" * 100_000, ValueError),
        (PNG, "image/png\ud800", ValueError),  # a bare UnicodeEncodeError, later
    ],
)
async def test_bad_images_are_refused_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer, data: Any, mime: Any, exc_type: type
) -> None:
    async with client.session() as s:
        before = server.state().rpc_counts.get("AppendImage", 0)
        with pytest.raises(exc_type):
            await s.append_image(data, mime)
        assert server.state().rpc_counts.get("AppendImage", 0) == before
        assert not s.lost


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (b"definitely not an image", "image/png"),
        (PNG[:20], "image/png"),  # truncated before the size
        (PNG, "image/bmp"),  # a type the server does not decode
    ],
)
async def test_undecodable_images_are_invalid_request_and_keep_the_session(
    client: poc_api.ApiClient, data: bytes, mime: str
) -> None:
    async with client.session() as s:
        await s.prefill([1])
        with trio.fail_after(5), pytest.raises(poc_api.InvalidRequest):
            await s.append_image(data, mime)
        assert not s.lost and s.committed_len == 1
        await s.append_image(PNG, "image/png")
        assert s.committed_len == 3


@pytest.mark.parametrize(
    ("data", "mime", "exc_type"),
    [
        (b"", "image/png", ValueError),  # as Session.append_image(b"", ...) does
        ("not bytes", "image/png", TypeError),
        (PNG, None, TypeError),
        (PNG, "text/plain", ValueError),
        (PNG, "image/", ValueError),
        (PNG, "image/" + "x" * 250, ValueError),  # RFC 6838: 127 + "/" + 127
        (PNG, "image/png\ud800", ValueError),
    ],
)
def test_bad_image_chunks_are_refused_at_construction(data: Any, mime: Any, exc_type: type) -> None:
    with pytest.raises(exc_type):
        Image(data, mime)


async def test_an_image_type_in_capitals_is_an_image_type(
    client: poc_api.ApiClient,
) -> None:
    # MIME types are case-insensitive (RFC 9110 8.3.1); the server decodes these.
    for mime in ("IMAGE/PNG", "Image/Png"):
        results = await client.score([Tokens([1, 2]), Image(PNG, mime)], [(0, 2)])
        assert len(results) == 1
        async with client.session() as s:
            assert (await s.append_image(PNG, mime)).placeholder_count == 2


async def test_an_image_type_the_server_cannot_decode_is_invalid_request(
    client: poc_api.ApiClient,
) -> None:
    with pytest.raises(poc_api.InvalidRequest):
        await client.score([Tokens([1]), Image(PNG, "image/x-unknown"), Tokens([2])], [(0, 1)])


@pytest.mark.parametrize("bad", BAD_RANGES)
async def test_malformed_ranges_are_refused_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer, bad: Any
) -> None:
    before = server.state().rpc_counts.get("OpenSession", 0)
    if bad != (3, 3):  # an empty range is a score's to sum (to 0), nobody else's
        with pytest.raises((ValueError, TypeError)):
            await client.score([Tokens(HELLO)], [(0, 1), bad])
    assert server.state().rpc_counts.get("OpenSession", 0) == before
    async with client.session() as s:
        for name in ("logprobs_ranges", "readout_ranges"):
            with pytest.raises((ValueError, TypeError)):
                async with s.generate([1], **{name: [bad]}):
                    pass
        with pytest.raises((ValueError, TypeError)):
            TrainSample(tokens=HELLO, target_ranges=[bad])
        assert not s.lost


async def test_a_range_object_is_the_range_of_its_positions(client: poc_api.ApiClient) -> None:
    # range(1, 3) is positions 1 and 2, the pair (1, 3): it was read as the pair of
    # its elements, (1, 2), and range(1, 4) was refused (three elements).
    prompt = [Tokens(HELLO)]
    for r, pair in [(range(1, 3), (1, 3)), (range(1, 4), (1, 4)), (range(1, 2), (1, 2))]:
        [got] = await client.score(prompt, [r])
        assert got == (await client.score(prompt, [pair]))[0]
    assert TrainSample(HELLO, [range(0, 2)]).target_ranges == ((0, 2),)
    with pytest.raises(TypeError, match=r"range\(0, 4, 2\)"):
        await client.score(prompt, [range(0, 4, 2)])


async def test_ranges_given_as_a_mapping_are_a_type_error(client: poc_api.ApiClient) -> None:
    # score(chunks, {(0, 1): 1}) was accepted, its keys taken as the ranges: a dict
    # is not a sequence of pairs, and its values were dropped without a word.
    with pytest.raises(TypeError, match="not dict"):
        await client.score([Tokens(HELLO)], {(0, 1): 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not dict"):
        TrainSample(tokens=HELLO, target_ranges={(0, 1): 1})  # type: ignore[arg-type]


def test_a_train_sample_without_tokens_is_a_value_error() -> None:
    # TrainSample(tokens=[], target_ranges=[]) was accepted and sent (the server
    # counted it as a sample): a sample with nothing in it to learn is a mistake.
    with pytest.raises(ValueError, match="at least one token"):
        TrainSample(tokens=[], target_ranges=[])
    assert TrainSample(tokens=[1], target_ranges=[]).tokens == (1,)


async def test_a_range_past_the_prompt_is_a_value_error(client: poc_api.ApiClient) -> None:
    with pytest.raises(ValueError, match="outside"):
        await client.score([Tokens([1, 2, 3])], [(1, 4)])
    # With an image of unknown length the check happens once the length is known.
    with pytest.raises(ValueError, match="outside"):
        await client.score([Tokens([1]), Image(PNG, "image/png")], [(0, 10)])
    assert (await client.score([Tokens([1, 2, 3])], [(1, 3)]))[0].end == 3


@pytest.mark.parametrize(
    ("shape", "exc_type"),
    [
        ((0, 8), ValueError),
        ((3, -1), ValueError),
        ((3,), TypeError),
        ((3, 8, 1), TypeError),
        ((3.0, 8), TypeError),
        ((True, 8), TypeError),
        ("38", TypeError),
        (38, TypeError),
    ],
)
async def test_malformed_readout_shape_is_refused_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer, shape: Any, exc_type: type
) -> None:
    async with client.conversation() as conv:
        before = server.state().rpc_counts.get("OpenSession", 0)
        with pytest.raises(exc_type):
            async with conv.stream([Tokens([1])], readout_shape=shape):
                pass
        assert server.state().rpc_counts.get("OpenSession", 0) == before


async def test_a_readout_shape_that_does_not_match_the_server_drops_readouts(
    client: poc_api.ApiClient,
) -> None:
    async with client.conversation() as conv:
        async with conv.stream(
            [Tokens(HELLO)],
            SamplingParams(max_tokens=4),
            readout_shape=(11, 13),
        ) as ev:
            tokens = [e async for e in ev if isinstance(e, poc_api.TokenOut)]
    assert len(tokens) == 4 and all(t.readout is None for t in tokens)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": -1},
        {"max_tokens": 2**32},
        {"max_tokens": 1.5},
        {"temperature": -0.1},
        {"temperature": float("inf")},
        {"temperature": "hot"},
        {"top_p": 1.01},
        {"top_p": float("nan")},
        {"top_k": -1},
        {"logprob_top_k": True},
        {"logprob_top_k": -1},
        {"stop_token_ids": "ab"},
    ],
)
def test_bad_sampling_params_are_refused(kwargs: dict[str, Any]) -> None:
    # By name: logprob_top_k's errors once named top_k.
    (name,) = kwargs
    with pytest.raises((ValueError, TypeError), match=rf"(?<![\w]){name}\b"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 1e300}, {"temperature": -1e300}, {"temperature": 3.5e38}, {"top_p": -1e39}],
)
def test_floats_too_large_for_the_float32_wire_field_are_refused_by_name(
    kwargs: dict[str, Any],
) -> None:
    # Without the check they passed and then failed at encoding, as OverflowError.
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"^{name} must fit in a float32"):
        SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=r"^temperature must be finite"):
        SamplingParams(temperature=10**400)  # an int no float holds


async def test_the_largest_float32_is_accepted_and_sent(client: poc_api.ApiClient) -> None:
    # The limit is float32's, not lower: its largest value encodes and is sent.
    # (Magnitudes too small for float32 are accepted too and arrive as 0.0.)
    sampling = SamplingParams(max_tokens=1, temperature=3.4028234663852886e38)
    async with client.session() as s, s.generate([1], sampling=sampling) as ev:
        events = [e async for e in ev]
    assert isinstance(events[-1], poc_api.Done)


@pytest.mark.parametrize(
    ("length", "exc_type"),
    [
        (None, TypeError),  # was taken as "no rewind": a no-op Generate was sent
        (1.5, TypeError),
        ("1", TypeError),
        (True, TypeError),
        (-1, ValueError),
        (99, ValueError),  # past the session's end
    ],
)
async def test_rewind_needs_an_int_length_and_names_it_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer, length: Any, exc_type: type
) -> None:
    async with client.session() as s:
        await s.prefill([1, 2, 3])
        before = server.state().generate_calls
        with pytest.raises(exc_type, match=r"^length\b"):
            await s.rewind(length)
        assert server.state().generate_calls == before
        assert not s.lost and s.committed_len == 3
        await s.rewind(2)
        assert s.committed_len == 2


async def test_append_image_refuses_a_non_image_mime_as_image_does(
    client: poc_api.ApiClient,
) -> None:
    with pytest.raises(ValueError) as from_chunk:
        Image(PNG, "text/plain")
    async with client.session() as s:
        with pytest.raises(ValueError) as from_session:
            await s.append_image(PNG, "text/plain")
    assert str(from_session.value) == str(from_chunk.value)


async def _enter(block: Any) -> None:
    async with block:
        pass


def _case(call: Callable[[Any, poc_api.ApiClient], object], exc_type: type, match: str) -> Any:
    return pytest.param(call, exc_type, match, id=match)


# Each bad argument's error names the parameter it is about (not "'NoneType' object
# is not iterable" or "not enough values to unpack"), and comes before anything is sent.
NAMED_ERRORS = [
    _case(lambda s, c: s.prefill(None), TypeError, "^tokens must be a sequence .* NoneType"),
    _case(lambda s, c: s.prefill(5), TypeError, "^tokens must be a sequence .* int"),
    _case(lambda s, c: _enter(s.generate(None)), TypeError, "^tokens must be a sequence"),
    _case(
        lambda s, c: _enter(s.generate([1], readout_ranges=None)),
        TypeError,
        "^readout_ranges must be a sequence of .start, end. pairs, not NoneType",
    ),
    _case(
        lambda s, c: _enter(s.generate([1], logprobs_ranges=(0, 2))),
        TypeError,
        "^logprobs_ranges must hold .start, end. pairs, got 0",
    ),
    _case(
        lambda s, c: _enter(s.generate([1], logprobs_ranges=[{0, 2}])),
        TypeError,
        "^logprobs_ranges must hold .start, end. pairs",
    ),
    _case(lambda s, c: SamplingParams(stop_token_ids=None), TypeError, "^stop_token_ids must"),
    _case(lambda s, c: SamplingParams(stop_token_ids=5), TypeError, "^stop_token_ids must"),
    _case(lambda s, c: Tokens(None), TypeError, "^ids must be a sequence of token ids"),
    _case(lambda s, c: TrainSample(None, [(0, 1)]), TypeError, "^tokens must be a sequence"),
    _case(lambda s, c: TrainSample([1, 2], [(0,)]), TypeError, "^target_ranges must hold"),
    _case(lambda s, c: TrainSample([1, 2], "ab"), TypeError, "^target_ranges must be a seq"),
    _case(lambda s, c: TrainSample([1, 2], None), TypeError, "^target_ranges must be a seq"),
    _case(lambda s, c: c.score(None, [(0, 1)]), TypeError, "^chunks must .* not NoneType"),
    _case(lambda s, c: c.score([Tokens([1, 2])], None), TypeError, "^ranges must be a seq"),
    _case(lambda s, c: c.score([Tokens([1, 2])], (0, 2)), TypeError, "^ranges must hold"),
    _case(lambda s, c: c.score_many(None), TypeError, "^prompts must be a sequence"),
    _case(
        lambda s, c: c.score_many([[Tokens([1, 2])]]),
        TypeError,
        r"^prompts\[0\] must be a \(chunks, ranges\) pair",
    ),
    _case(
        lambda s, c: c.score_many([([Tokens([1, 2])], [(0, 1)]), ([Tokens([1])], None)]),
        TypeError,
        r"^prompts\[1\] ranges must be a sequence",
    ),
    _case(
        lambda s, c: c.score_continuations(None, [[1]]),
        TypeError,
        "^prompt_chunks must be a sequence of Tokens/Image, not NoneType",
    ),
    # An element's error names the argument and the index (it said "token id").
    _case(lambda s, c: s.prefill([1.0]), TypeError, r"^tokens\[0\] must be an int, not float"),
    _case(lambda s, c: s.prefill([1, -1]), ValueError, r"^tokens\[1\] must be in \[0, 2\*\*32\)"),
    _case(
        lambda s, c: _enter(s.generate([1, 2, "3"])),
        TypeError,
        r"^tokens\[2\] must be an int, not str",
    ),
    _case(
        lambda s, c: SamplingParams(stop_token_ids=[1, "2"]),
        TypeError,
        r"^stop_token_ids\[1\] must be an int, not str",
    ),
    _case(lambda s, c: Tokens([1, 2, 3.0]), TypeError, r"^ids\[2\] must be an int, not float"),
    _case(
        lambda s, c: TrainSample([1, None], [(0, 1)]),
        TypeError,
        r"^tokens\[1\] must be an int, not NoneType",
    ),
    _case(
        lambda s, c: c.detokenize([1, True]), TypeError, r"^tokens\[1\] must be an int, not bool"
    ),
    # A timeout of the wrong type is a TypeError (it was a ValueError), as on ApiClient.
    _case(lambda s, c: s.prefill([1], timeout="5"), TypeError, "^timeout must be a number .* str"),
    _case(
        lambda s, c: _enter(s.generate([1], first_token_timeout="1")),
        TypeError,
        "^first_token_timeout must be a number of seconds or None, not str",
    ),
    _case(
        lambda s, c: _enter(s.generate([1], token_timeout=True)),
        TypeError,
        "^token_timeout must be a number of seconds or None, not bool",
    ),
    _case(lambda s, c: c.readout_manifest(timeout=[1]), TypeError, "^timeout must .* not list"),
    _case(lambda s, c: s.prefill([1], timeout=-1), ValueError, "^timeout must be a non-neg"),
    _case(lambda s, c: s.rewind(1, timeout=float("nan")), ValueError, "^timeout .* got nan"),
]


@pytest.mark.parametrize(("call", "exc_type", "match"), NAMED_ERRORS)
async def test_bad_arguments_raise_errors_that_name_their_parameter(
    client: poc_api.ApiClient,
    server: ReferenceServer,
    call: Callable[[Any, poc_api.ApiClient], object],
    exc_type: type,
    match: str,
) -> None:
    async with client.session() as s:
        await s.prefill([1, 2])
        before = server.state().rpc_counts
        with pytest.raises(exc_type, match=match):
            result = call(s, client)
            if isinstance(result, Awaitable):
                await result
        assert server.state().rpc_counts == before
        assert not s.lost


def test_a_target_range_may_end_at_the_last_token_but_not_past_it() -> None:
    assert TrainSample([1, 2], [(0, 2)]).target_ranges == ((0, 2),)
    with pytest.raises(ValueError, match=r"exceeds the sample's 2 tokens"):
        TrainSample([1, 2], [(0, 3)])
    with pytest.raises(ValueError, match=r"exceeds the sample's 2 tokens"):
        TrainSample([1, 2], [(1, 2), (2, 3)])


@pytest.mark.parametrize(
    ("ids", "kind"),
    [
        (b"\x01\x02", "bytes"),
        ("ab", "a string"),
        (bytearray(b"\x01\x02"), "bytearray"),
        (memoryview(b"\x01\x02"), "memoryview"),
    ],
)
async def test_token_ids_given_as_a_string_or_bytes_are_refused_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer, ids: Any, kind: str
) -> None:
    # Bytes iterate as small ints: without the check b"\x01\x02" was the ids [1, 2].
    # (Bytes were called "a string" too; a bytearray or memoryview passed.)
    not_a_string = rf"^tokens must be a sequence of token ids, not {kind}$"
    before = server.state().http_requests.get("/v1/detokenize", 0)
    with pytest.raises(TypeError, match=not_a_string):
        TrainSample(ids, [(0, 1)])
    with pytest.raises(TypeError, match=not_a_string):
        await client.detokenize(ids)
    with pytest.raises(TypeError, match=rf"^ids must be a sequence of token ids, not {kind}$"):
        Tokens(ids)
    continuation = rf"^continuation 0 must be token ids .*, not {type(ids).__name__}$"
    with pytest.raises(TypeError, match=continuation):
        await client.score_continuations([Tokens([1, 2])], [ids])
    assert server.state().http_requests.get("/v1/detokenize", 0) == before


async def test_a_conversation_given_none_says_so(client: poc_api.ApiClient) -> None:
    async with client.conversation() as conv:
        with pytest.raises(
            TypeError, match=r"^chunks must be a sequence of Tokens/Image, not None"
        ):
            async with conv.stream(None):  # type: ignore[arg-type]
                pass


# -- HTTP endpoints with a tiny real HTTP server ------------------------------------------


def http_response(status: int, body: bytes, ctype: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


@asynccontextmanager
async def tiny_http(
    answers: list[bytes | Callable[[trio.SocketStream], Awaitable[None]]],
) -> AsyncIterator[str]:
    """Answer the n-th connection with the n-th answer (the last repeats).

    Chat tests name a model: without one the client would first ask ``GET /models``
    and be served a canned answer meant for the chat request.
    """
    served = 0

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal served
        answer = answers[min(served, len(answers) - 1)]
        served += 1
        await read_request(stream)
        if callable(answer):
            await answer(stream)
        else:
            await stream.send_all(answer)

    async with http_server(serve) as url:
        yield url


MANIFEST_OK = http_response(200, b'{"concepts": ["a", "b"], "layers": [0, 1, 2]}')
TRAIN_OK = http_response(200, b'{"accepted": 1, "job_id": "j1"}')
CHAT_OK = http_response(
    200,
    b'{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": null}',
)


async def call_endpoint(c: poc_api.ApiClient, name: str) -> object:
    if name == "manifest":
        return await c.readout_manifest()
    if name == "train":
        return await c.train([TrainSample(tokens=[1, 2], target_ranges=[(0, 2)])])
    return await c.chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("endpoint", "good"), [("manifest", MANIFEST_OK), ("train", TRAIN_OK), ("chat", CHAT_OK)]
)
@pytest.mark.parametrize(
    "bad_body",
    [
        b"\xff\xfe\x00not utf-8",
        b'{"concepts": ["a"',
        b"<html>502 Bad Gateway</html>",
        b"",
        b"[1, 2, 3]",
        b'{"concepts": 5, "layers": "x", "accepted": "one", "choices": 7}',
    ],
)
async def test_malformed_json_answers_are_protocol_violations(
    endpoint: str, good: bytes, bad_body: bytes
) -> None:
    async with tiny_http([http_response(200, bad_body), good]) as base:
        async with poc_api.ApiClient(base, grpc_url="http://127.0.0.1:9", model="m") as c:
            with trio.fail_after(5), pytest.raises(poc_api.ProtocolViolation):
                await call_endpoint(c, endpoint)
            with trio.fail_after(5):
                assert await call_endpoint(c, endpoint) is not None


async def test_an_error_status_with_a_binary_body_is_a_readable_http_error() -> None:
    async with tiny_http(
        [http_response(500, b"\xff\xfe" * 600, "application/octet-stream"), TRAIN_OK]
    ) as base:
        async with poc_api.ApiClient(base, grpc_url="http://127.0.0.1:9") as c:
            with trio.fail_after(5), pytest.raises(poc_api.HttpError) as info:
                await call_endpoint(c, "train")
            assert info.value.http_status == 500 and "500" in str(info.value)
            assert len(str(info.value)) < 1000
            assert (await call_endpoint(c, "train")) == poc_api.TrainResult(1, "j1")


async def cut_sse(stream: trio.SocketStream) -> None:
    """A chunked SSE answer that stops in the middle of an event and hangs up."""
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    event = b'data: {"choices":[{"index":0,"delta":{"content":"hel"}}]}\n\n'
    await stream.send_all(b"%x\r\n%s\r\n" % (len(event), event))
    half = b'data: {"choices":[{"index":0,"de'
    await stream.send_all(b"%x\r\n%s" % (len(half) + 40, half))  # chunk never completed


async def good_sse(stream: trio.SocketStream) -> None:
    body = (
        b'data: {"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    await stream.send_all(http_response(200, body, "text/event-stream"))


async def test_an_sse_stream_cut_mid_event_is_typed_and_the_client_recovers() -> None:
    async with tiny_http([cut_sse, good_sse]) as base:
        async with poc_api.ApiClient(base, grpc_url="http://127.0.0.1:9", model="m") as c:
            got: list[object] = []
            with (
                trio.fail_after(5),
                pytest.raises((poc_api.ServerUnavailable, poc_api.ProtocolViolation)),
            ):
                async with c.chat_stream([{"role": "user", "content": "hi"}]) as events:
                    async for ev in events:
                        got.append(ev)
            assert got == [poc_api.ChatDelta("hel")]
            with trio.fail_after(5):
                async with c.chat_stream([{"role": "user", "content": "hi"}]) as events:
                    out = [ev async for ev in events]
            assert out[0] == poc_api.ChatDelta("ok") and isinstance(out[-1], poc_api.ChatDone)


async def test_an_sse_stream_with_garbage_events_is_a_protocol_violation() -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        await stream.send_all(http_response(200, b"data: \xff\xfe{{{\n\n", "text/event-stream"))

    async with tiny_http([garbage, good_sse]) as base:
        async with poc_api.ApiClient(base, grpc_url="http://127.0.0.1:9", model="m") as c:
            with trio.fail_after(5), pytest.raises(poc_api.ProtocolViolation):
                async with c.chat_stream([{"role": "user", "content": "hi"}]) as events:
                    async for _ in events:
                        pass
            async with c.chat_stream([{"role": "user", "content": "hi"}]) as events:
                first = await events.__anext__()
            assert first == poc_api.ChatDelta("ok")


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hi",
        [{"content": "x"}],
        [{"role": "", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [5],
        None,
    ],
)
async def test_bad_chat_messages_are_refused_before_sending(messages: Any) -> None:
    async with tiny_http([CHAT_OK]) as base:
        async with poc_api.ApiClient(base, grpc_url="http://127.0.0.1:9", model="m") as c:
            with pytest.raises((ValueError, TypeError)):
                await c.chat(messages)
            assert (await c.chat([{"role": "user", "content": "hi"}])).text == "hi"


async def test_rewinding_to_the_sessions_own_end_is_accepted_and_changes_nothing(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    # The end itself is in [0, committed_len]: a no-op, not "past the session's end".
    greedy = SamplingParams(max_tokens=4)
    async with client.session() as fresh:
        await fresh.prefill(HELLO)
        async with fresh.generate(sampling=greedy) as ev:
            expected = [t.id async for t in ev if isinstance(t, poc_api.Token)]
    async with client.session() as s:
        await s.prefill(HELLO)
        end = s.committed_len
        appended = server.state().tokens_appended
        done = await s.rewind(end)
        assert done.total_tokens == end
        assert s.committed_len == end and not s.lost
        async with s.generate(rewind_to=s.committed_len, sampling=greedy) as ev:
            got = [t.id async for t in ev if isinstance(t, poc_api.Token)]
        assert ev.done is not None and ev.done.prompt_tokens == end
        assert s.committed_len == end + len(got) and not s.lost
        # Nothing was dropped or added on the server: it decodes as a fresh session.
        assert server.state().tokens_appended == appended
        assert got == expected


async def test_an_open_session_answer_with_an_empty_session_id_is_a_protocol_violation(
    bad_server: MisbehavingServer,
) -> None:
    bad_server.plan("OpenSession", Reply(session_id=""))
    async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=bad_server.url, close_timeout=0.5) as c:
        with trio.fail_after(5), pytest.raises(poc_api.ProtocolViolation, match="empty session id"):
            async with c.session():
                pass
        with trio.fail_after(5):  # the client stays usable
            async with c.session() as s:
                await s.prefill([1, 2])
        assert s.session_id


@pytest.mark.parametrize(
    "call",
    ["Tokens", "prefill", "score-ranges", "score_many-prompts", "continuation", "continuations"],
)
async def test_a_set_where_order_matters_is_refused_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer, call: str
) -> None:
    # A set's order is arbitrary: Tokens({5, 3, 300}) became (3, 300, 5), a prompt
    # silently scrambled (and ranges' results, which come back in their order,
    # shuffled). score_many({...}) said "prompts[0] must be a pair, got 'a'".
    before = server.state().rpc_counts.copy()
    prompt = [Tokens([72, 101, 108])]
    with pytest.raises(TypeError, match=r"(set|dict).*order") as info:
        if call == "Tokens":
            Tokens({5, 3, 300})
        elif call == "prefill":
            async with client.session() as s:
                await s.prefill(frozenset({5, 3}))  # type: ignore[arg-type]
        elif call == "score-ranges":
            await client.score(prompt, {(0, 1), (1, 2)})  # type: ignore[arg-type]
        elif call == "score_many-prompts":
            await client.score_many({"a": 1})  # type: ignore[arg-type]
        elif call == "continuation":
            await client.score_continuations(prompt, [{1, 2}])  # type: ignore[list-item]
        else:
            await client.score_continuations(prompt, {(1,), (2,)})  # type: ignore[arg-type]
    after = server.state().rpc_counts
    assert after.get("Generate", 0) == before.get("Generate", 0), info.value
    opened = after.get("OpenSession", 0) - before.get("OpenSession", 0)
    assert opened == (call == "prefill"), info.value  # (only that block's own session)


def test_sets_stay_fine_where_order_does_not_matter() -> None:
    assert sorted(SamplingParams(stop_token_ids={7, 3}).stop_token_ids) == [3, 7]
    sample = TrainSample(tokens=[1, 2, 3], target_ranges={(0, 1), (1, 3)})
    assert sorted(sample.target_ranges) == [(0, 1), (1, 3)]


async def _with_image(
    client: poc_api.ApiClient,
    call: str,
    prompt: list[Tokens | Image],
    image: Image,
    conv: poc_api.Conversation,
    delta: list[Tokens | Image],
) -> None:
    """``call`` ("score", "score_many", "score_continuations", "conversation": a
    turn of ``delta``) with ``prompt`` (or ``image``) in it."""
    if call == "score":
        await client.score(prompt, [(0, 2)])
    elif call == "score_many":
        await client.score_many([([Tokens([1, 2])], [(0, 2)]), (prompt, [(0, 2)])])
    elif call == "score_continuations":
        await client.score_continuations([Tokens([1, 2])], [[3], [image]])
    else:
        async with conv.stream(delta, SamplingParams(max_tokens=1)):
            raise AssertionError("the turn began")  # pragma: no cover


@pytest.mark.parametrize(
    "call", ["score", "score_many", "score_continuations", "conversation", "append_image"]
)
async def test_an_image_whose_request_is_over_max_message_size_is_refused_before_sending(
    server: ReferenceServer, call: str
) -> None:
    # Its bytes are within the limit, its AppendImage request (with the mime, the
    # session id, the offset) is not: the check counted the bytes only, so it was
    # refused at its AppendImage, after the prefill (a conversation's session dropped).
    # The request fits but for the session id: only a check that has it refuses.
    limit = append_image_request_size(session_id="", image_len=len(PNG), mime="image/png")
    big = Image(PNG, "image/png")
    prompt = [Tokens([72, 101]), big, Tokens([108])]
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, max_message_size=limit
    ) as client:
        async with client.conversation() as conv:
            async with conv.stream([Tokens([72, 101])], SamplingParams(max_tokens=1)) as ev:
                reply = [e.id async for e in ev if isinstance(e, poc_api.TokenOut)]
            held = conv.session
            assert held is not None
            async with client.session() as s:
                before = server.state().rpc_counts.copy()
                with pytest.raises(poc_api.LimitExceeded, match="max_message_size") as info:
                    if call == "append_image":
                        await s.append_image(PNG, "image/png")
                    else:
                        delta = [Tokens([72, 101, *reply, 4]), big]
                        await _with_image(client, call, prompt, big, conv, delta)
                if call != "append_image":  # (the transport's own check)
                    assert "before sending" in str(info.value), info.value
                after = server.state().rpc_counts
                if call in ("score", "score_continuations"):
                    # Checked exactly once its session is open: the OpenSession
                    # (and its close) went out, nothing else.
                    sent = {k: after[k] - before.get(k, 0) for k in after}
                    assert {k: n for k, n in sent.items() if n} in (
                        {},
                        {"OpenSession": 1, "CloseSession": 1},
                    ), sent
                elif call != "score_many":
                    assert after == before, info.value
                assert not s.lost
            assert conv.session is held  # kept: nothing was sent


@pytest.mark.parametrize("call", ["score", "score_many", "score_continuations", "conversation"])
async def test_an_image_over_max_message_size_is_refused_before_sending(
    server: ReferenceServer, call: str
) -> None:
    # It was refused at its AppendImage: after the OpenSession and the prefill of
    # the tokens before it had gone out (and, in a conversation, with the session
    # dropped for it). Its size is known before anything is sent.
    big = Image(make_png(8, 8) + b"\0" * (2 << 20), "image/png")
    prompt = [Tokens([72, 101]), big, Tokens([108])]
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, max_message_size=1 << 20
    ) as client:
        before = server.state().rpc_counts.copy()
        with pytest.raises(poc_api.LimitExceeded, match="max_message_size") as info:
            async with client.conversation() as conv:
                await _with_image(client, call, prompt, big, conv, prompt)
        assert "before sending" in str(info.value), info.value
        assert server.state().rpc_counts == before, info.value
