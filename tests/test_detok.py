"""TextDecoder: streamed token ids to text, against the reference server's tokenizer."""

from __future__ import annotations

import random
import threading

import pytest
import trio
import trio.testing
from helpers import http_server, read_request, refusing_port

import poc_api
from poc_api import SamplingParams, TokenOut, Tokens
from poc_api.server import EOS, ReferenceServer, tokenize

DEAD = f"http://127.0.0.1:{refusing_port()}"  # (no gRPC here: the decoder is HTTP only)

# Bytes of characters of 1 to 4 UTF-8 bytes, and more than _MAX_CONTEXT ids.
TEXT = "héllo 日本 🎉 the quick brown fox — naïve café ∑ " * 3


async def test_ids_fed_one_at_a_time_give_the_text_with_no_broken_character(
    client: poc_api.ApiClient,
) -> None:
    ids = tokenize(TEXT)
    decoder = client.text_decoder()
    pieces = [await decoder.feed(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + await decoder.flush() == TEXT
    # A character's first bytes are held back until its last one comes (and a
    # trailing space until the next text: a cleanup may drop it before "." etc).
    at = TEXT.index("🎉")
    start = len(TEXT[:at].encode())
    assert pieces[start - 1 : start + 4] == ["", "", "", "", " 🎉"]


@pytest.mark.parametrize("seed", range(12))
async def test_ids_fed_in_any_batches_give_the_same_text(
    client: poc_api.ApiClient, seed: int
) -> None:
    rng = random.Random(seed)
    ids = tokenize(TEXT)
    decoder = client.text_decoder()
    pieces = []
    i = 0
    while i < len(ids):
        n = rng.choice([1, 1, 2, 3, 4, 5, 9, 40])
        pieces.append(await decoder.feed(ids[i : i + n]))
        i += n
    pieces.append(await decoder.flush())
    assert "".join(pieces) == TEXT
    assert "\ufffd" not in "".join(pieces)


async def test_text_before_a_characters_first_bytes_is_not_held_back(
    client: poc_api.ApiClient,
) -> None:
    # "abc" and the first byte of 日 in one feed: "abc" now, 日 with its last byte.
    ids = tokenize("abc日")
    decoder = client.text_decoder()
    assert await decoder.feed(ids[:4]) == "abc"
    assert await decoder.feed(ids[4:]) == "日"


async def test_an_invalid_byte_sequence_comes_out_as_replacement_characters(
    client: poc_api.ApiClient,
) -> None:
    decoder = client.text_decoder()
    # Continuation bytes with no start: not held back for ever, once four ids
    # (a character's most) could not make one; the last could still be a
    # character's first byte (as far as text tells), held until the next ids.
    got = [await decoder.feed([0x80]) for _ in range(4)]
    assert "".join(got) == "\ufffd" * 3
    assert await decoder.feed(tokenize("ok")) == "\ufffdok"
    # A character cut short by the end of the stream: flush() says so.
    assert await decoder.feed(tokenize("日")[:2]) == ""
    assert await decoder.flush() == "\ufffd"
    assert await decoder.flush() == ""


async def test_a_stray_byte_before_a_characters_first_bytes_loses_no_character(
    client: poc_api.ApiClient,
) -> None:
    # A byte that starts no character (0x80), then 🎉 fed byte by byte: at the
    # fourth id the decode ends with U+FFFD and no shorter head is free of one;
    # the emoji's first bytes were written as U+FFFD and the emoji lost.
    ids = [0x80, *tokenize("🎉x")]
    decoder = client.text_decoder()
    pieces = [await decoder.feed(i) for i in ids]
    pieces.append(await decoder.flush())
    assert "".join(pieces) == await client.detokenize(ids) == "\ufffd🎉x"


@pytest.mark.parametrize("seed", range(8))
async def test_stray_bytes_among_the_text_in_any_batches_give_what_detokenize_gives(
    client: poc_api.ApiClient, seed: int
) -> None:
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < 300:
        if rng.random() < 0.15:
            ids.append(rng.choice([0x80, 0xBF, 0xC0, 0xFF, 0xE6, 0xF0, 0xED]))
        else:
            ids += tokenize(rng.choice(["a", " the", "é", "日", "🎉", "∑"]))
    decoder = client.text_decoder()
    pieces = []
    i = 0
    while i < len(ids):
        n = rng.choice([1, 1, 2, 3, 4, 7, 70])
        pieces.append(await decoder.feed(ids[i : i + n]))
        i += n
    pieces.append(await decoder.flush())
    assert "".join(pieces) == await client.detokenize(ids)


async def test_special_tokens_add_no_text_unless_asked(client: poc_api.ApiClient) -> None:
    ids = [*tokenize("done."), EOS]
    plain = client.text_decoder()
    assert await plain.feed(ids) + await plain.flush() == "done."
    raw = client.text_decoder(skip_special_tokens=False)
    assert await raw.feed(ids) + await raw.flush() == await client.detokenize(ids)
    assert (await client.detokenize(ids)).endswith("<|eos|>")


async def test_a_conversations_streamed_ids_become_its_text(client: poc_api.ApiClient) -> None:
    decoder = client.text_decoder()
    ids: list[int] = []
    text = ""
    async with client.conversation() as conv:
        sampling = SamplingParams(max_tokens=40, temperature=1.0)
        async with conv.stream([Tokens(tokenize("Once upon a time"))], sampling) as events:
            async for ev in events:
                if isinstance(ev, TokenOut):
                    ids.append(ev.id)
                    text += await decoder.feed(ev.id)
    text += await decoder.flush()
    assert len(ids) > 1
    assert text == (await client.detokenize(ids)).replace("<|eos|>", "")


async def test_a_cancelled_feed_loses_no_ids(client: poc_api.ApiClient) -> None:
    decoder = client.text_decoder()
    ids = tokenize("日本語")
    with trio.CancelScope() as scope:
        scope.cancel()
        await decoder.feed(ids[:5])
    assert scope.cancelled_caught
    assert await decoder.feed(ids[5:]) == "日本語"


async def test_two_tasks_feeding_one_decoder_at_once_is_refused() -> None:
    # The first feed held at its request (a server that answers when told).
    answer = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        while True:
            head, _ = await read_request(stream)
            if not head:
                return
            await answer.wait()
            path = head.split(b" ", 2)[1]
            body = (
                b'{"vocab_size": 258, "special": {}}'
                if path.endswith(b"/tokenizer")
                else (b'{"text": "a"}')
            )
            reply = (
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            )
            await stream.send_all(reply.encode() + body)

    async with http_server(handler) as url, poc_api.ApiClient(url, grpc_url=DEAD) as client:
        decoder = client.text_decoder()
        got: list[str] = []

        async def first() -> None:
            got.append(await decoder.feed(tokenize("a")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await decoder.feed(tokenize("b"))
            answer.set()
        assert got == ["a"]  # (the refused feed took nothing from it)


@pytest.mark.parametrize(
    ("bad", "exc"),
    [
        ("abc", TypeError),
        (b"ab", TypeError),
        (-1, ValueError),
        (2**32, ValueError),
        (1.5, TypeError),
    ],
)
async def test_what_is_no_token_id_is_refused_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer, bad: object, exc: type[Exception]
) -> None:
    decoder = client.text_decoder()
    with pytest.raises(exc):
        await decoder.feed(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        client.text_decoder(skip_special_tokens=1)  # type: ignore[arg-type]


async def test_a_decoder_used_from_another_trio_run_says_so(client: poc_api.ApiClient) -> None:
    decoder = client.text_decoder()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            trio.run(decoder.feed, [97])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    await trio.to_thread.run_sync(thread.join)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert "another trio.run" in str(errors[0])
    assert await decoder.feed([97]) == "a"


async def test_a_decoder_of_a_closed_client_says_the_client_is_closed(
    server: ReferenceServer,
) -> None:
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
        decoder = client.text_decoder()
        assert await decoder.feed([104, 105]) == "hi"
    with pytest.raises(trio.ClosedResourceError, match="the ApiClient is closed"):
        await decoder.feed([105])
    with pytest.raises(trio.ClosedResourceError, match="the ApiClient is closed"):
        client.text_decoder()


async def test_feeds_that_each_end_with_a_space_still_restart_the_context(
    client: poc_api.ApiClient,
) -> None:
    # Trailing spaces are held back to the next feed; a context held with them
    # was never restarted, and each feed decoded the whole stream again.
    from poc_api._detok import _MAX_CONTEXT

    decoder = client.text_decoder()
    text = "".join(f"w{i} " for i in range(120))
    pieces = [await decoder.feed(tokenize(f"w{i} ")) for i in range(120)]
    assert decoder._written - decoder._start <= _MAX_CONTEXT + 8
    assert "".join(pieces) + await decoder.flush() == text
