"""TextDecoder and the CLI's live text, differentially: for any ids in any batches,
the concatenation of what is written is the server's decode of all the ids."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import pytest
import trio
import trio.testing
from fake_tokenizers import clean_up_tokenization, tokenizer_server
from helpers import http_server, read_request, refusing_port
from hypothesis import example, given, settings
from hypothesis import strategies as st

import poc_api
from poc_api.server import ReferenceServer, detokenize

DEAD = f"http://127.0.0.1:{refusing_port()}"  # (no gRPC here: the decoder is HTTP only)
SPECIALS = {"bos": 256, "eos": 257, "vision_start": 258, "vision_end": 259, "image_pad": 260}

# Text the cleanup rules touch, characters of 2 to 4 bytes (whole or cut), bytes
# that start no character, special tokens, and long runs of one of them.
_PIECES = [
    " .", " ,", " !", " ?", " 's", " n't", " 'm", " 've", " 're", " '", "'", " ' ",
    '"', ' "', " ", "  ", " n", "a", "n", "s", "t", "m", "ve", "re", "é", "日", "🎉", "€",
]  # fmt: skip
_piece = st.sampled_from(_PIECES).map(lambda s: list(s.encode()))
_cut_char = st.tuples(st.sampled_from(["é", "日", "🎉", "€"]), st.integers(1, 3)).map(
    lambda c: list(c[0].encode())[: c[1]]
)
_invalid = st.sampled_from([0x80, 0xBF, 0xC0, 0xC3, 0xE2, 0xED, 0xF0, 0xF4, 0xFF]).map(
    lambda b: [b]
)
_special = st.sampled_from(sorted(SPECIALS.values())).map(lambda i: [i])
_run = st.tuples(
    st.sampled_from([[0xFF], [0x80], [0xE2], [0x20], [0x20, 0x27]]), st.integers(1, 90)
)
_ids = st.lists(
    st.one_of(_piece, _piece, _cut_char, _invalid, _special, _run.map(lambda r: r[0] * r[1])),
    max_size=40,
).map(lambda parts: [i for p in parts for i in p])
_cuts = st.one_of(
    st.just("one"), st.just("all"), st.lists(st.integers(1, 9), min_size=1, max_size=30)
)


def batches(ids: Sequence[int], cuts: str | list[int]) -> list[list[int]]:
    if cuts == "one":
        return [[i] for i in ids]
    if isinstance(cuts, str):  # ("all")
        return [list(ids)]
    out: list[list[int]] = []
    at = k = 0
    while at < len(ids):
        n = cuts[k % len(cuts)]
        out.append(list(ids[at : at + n]))
        at, k = at + n, k + 1
    return out


def run_against(
    server: ReferenceServer, cleanup: bool, check: Callable[[str], Awaitable[None]]
) -> None:
    """``check(base_url)`` in a trio run: against the reference server, or with
    ``cleanup`` against its tokenizer with Hugging Face's space cleanup."""

    async def main() -> None:
        if cleanup:
            async with tokenizer_server(cleaned, 261, SPECIALS) as url:
                await check(url)
        else:
            await check(server.base_url)

    trio.run(main)


def cleaned(ids: Sequence[int]) -> str:
    """The reference tokenizer with Hugging Face's clean_up_tokenization_spaces."""
    return clean_up_tokenization(detokenize(ids))


async def stream_text(decoder: poc_api.TextDecoder, parts: list[list[int]], want: str) -> str:
    written = ""
    for part in parts:
        written += await decoder.feed(part)
        assert want.startswith(written), (written, want)  # (nothing to take back)
    written += await decoder.flush()
    assert await decoder.flush() == ""
    return written


async def decoded(client: poc_api.ApiClient, ids: list[int], skip: bool) -> str:
    return await client.detokenize([i for i in ids if not (skip and i in SPECIALS.values())])


@settings(max_examples=150, deadline=None)
@given(ids=_ids, cuts=_cuts, skip=st.booleans(), cleanup=st.booleans())
@example(ids=list(b"x  ' s"), cuts="one", skip=True, cleanup=True)
@example(ids=[0x61, 0xE2, 0x82, 0xAC, 0x80, 0xFF, 257], cuts=[2, 1], skip=False, cleanup=False)
def test_streamed_text_is_the_servers_decode_of_all_the_ids(
    server: ReferenceServer, ids: list[int], cuts: str | list[int], skip: bool, cleanup: bool
) -> None:
    async def check(url: str) -> None:
        async with poc_api.ApiClient(url, grpc_url=DEAD) as client:
            want = await decoded(client, ids, skip)
            decoder = client.text_decoder(skip_special_tokens=skip)
            assert await stream_text(decoder, batches(ids, cuts), want) == want

    run_against(server, cleanup, check)


_short_ids = st.lists(st.one_of(_piece, _cut_char, _invalid, _special), max_size=8).map(
    lambda parts: [i for p in parts for i in p]
)


@settings(max_examples=40, deadline=None)
@given(
    streams=st.lists(st.tuples(_short_ids, _cuts), min_size=2, max_size=3), cleanup=st.booleans()
)
@example(streams=[([0x61, 0xE2, 0x82], "one"), ([0xAC, 0x62], "all")], cleanup=False)
def test_a_decoder_reused_after_flush_writes_each_streams_decode(
    server: ReferenceServer, streams: list[tuple[list[int], str | list[int]]], cleanup: bool
) -> None:
    # flush() says "the decoder can then go on with the next ids", as a new
    # decoder would. It went on from the last stream's context: a character
    # the flush wrote as U+FFFD was completed by the next stream's first byte
    # and written again ("a\ufffd" then "€b": neither stream's text), and a
    # quote written at the flush came again with the next stream's "m" (" ''m").
    async def check(url: str) -> None:
        async with poc_api.ApiClient(url, grpc_url=DEAD) as client:
            reused = client.text_decoder()
            for ids, cuts in streams:
                want = await decoded(client, ids, skip=True)
                assert await stream_text(reused, batches(ids, cuts), want) == want
                fresh = client.text_decoder()
                assert await stream_text(fresh, batches(ids, cuts), want) == want

    run_against(server, cleanup, check)


@pytest.mark.parametrize(
    ("first", "second"),
    [([0x61, 0xE2, 0x82], [0xAC, 0x62]), ([0x61, 0x20, 0x27], [0x6D])],
    ids=["cut-character", "quote"],
)
async def test_the_next_ids_after_a_flush_are_a_text_of_their_own(
    first: list[int], second: list[int]
) -> None:
    async with tokenizer_server(cleaned, 261, SPECIALS) as url:
        async with poc_api.ApiClient(url, grpc_url=DEAD) as client:
            decoder = client.text_decoder()
            got = [await decoder.feed(first) + await decoder.flush()]
            got.append(await decoder.feed(second) + await decoder.flush())
    assert got == [cleaned(first), cleaned(second)]


@pytest.mark.parametrize("text", ["x  ' s", "I  ' m", "we  ' ve", "do n ' t", "a  ' re ."])
async def test_a_space_cleaned_up_after_a_quotes_spaces_are_is_not_written_early(
    text: str,
) -> None:
    # clean_up_tokenization turns " ' " into "'", and what was before it may then
    # lose its space too: "x  ' s" is "x 's", then "x's". The first space was
    # written when the quote came (only " '" was held back): "x 's".
    ids = list(text.encode())
    async with tokenizer_server(cleaned, 261, SPECIALS) as url:
        async with poc_api.ApiClient(url, grpc_url=DEAD) as client:
            decoder = client.text_decoder()
            pieces = [await decoder.feed(i) for i in ids]
            pieces.append(await decoder.flush())
    assert "".join(pieces) == cleaned(ids)


async def test_empty_input_and_flushes_write_nothing(client: poc_api.ApiClient) -> None:
    decoder = client.text_decoder()
    assert await decoder.flush() == ""
    assert await decoder.feed([]) == ""
    assert await decoder.flush() == ""
    got = await decoder.feed([104, 105, 0xE2]) + await decoder.feed([])
    assert got + await decoder.flush() == "hi\ufffd"
    assert await decoder.flush() == ""


@pytest.mark.parametrize(("run", "n"), [([0xFF], 3_000), ([0xE2, 0x82], 2_000), ([0x20], 2_000)])
async def test_a_long_run_of_invalid_bytes_one_id_at_a_time_costs_linear_time(
    run: list[int], n: int
) -> None:
    # Each feed decodes a bounded context (a few requests of at most ~70 ids):
    # no request, nor the work of all of them, grows with the run.
    sent = longest = 0

    def decode(ids: Sequence[int]) -> str:
        nonlocal sent, longest
        sent += len(ids)
        longest = max(longest, len(ids))
        return cleaned(ids)

    ids = run * (n // len(run))
    async with tokenizer_server(decode, 261, SPECIALS) as url:
        async with poc_api.ApiClient(url, grpc_url=DEAD) as client:
            decoder = client.text_decoder()
            started = time.perf_counter()
            pieces = [await decoder.feed(i) for i in ids]
            pieces.append(await decoder.flush())
            elapsed = time.perf_counter() - started
    assert "".join(pieces) == cleaned(ids)
    assert longest <= 70 and sent <= 100 * len(ids), (longest, sent, elapsed)


def answering(status: int) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """An HTTP side that answers every request with ``status`` (no tokenizer)."""

    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        body = b'{"detail": "no"}'
        await stream.send_all(
            f"HTTP/1.1 {status} Canned\r\ncontent-type: application/json\r\n".encode()
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
            + body
        )

    return handler


@pytest.mark.parametrize("status", [404, 405, 501])
async def test_live_text_falls_back_to_the_byte_level_rule_without_detokenize(
    status: int,
) -> None:
    from poc_api.cli import _byte_level, _Codec, _LiveText, _utf8, _Where

    parts = [[0x61, 0xE2], [0x82], [0xAC, 0x20, 0xF0, 0x9F], [0x8E, 0x89, 257, 0xFF]]
    ids = [i for p in parts for i in p]
    written: list[str] = []
    async with http_server(answering(status)) as url:
        async with poc_api.ApiClient(url, grpc_url=DEAD) as client:
            codec = _Codec(client, _Where(), on_fallback=lambda: None)
            live = _LiveText(codec, written.append)
            send, receive = trio.open_memory_channel[int](100)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(live.run, receive)
                async with send:
                    for part in parts:
                        for i in part:
                            send.send_nowait(i)
                        await trio.testing.wait_all_tasks_blocked()
            assert codec.byte_level
    assert "".join(written) == _byte_level(ids, _utf8(), final=True) == "a€ 🎉<|257|>\ufffd"
