"""TextDecoder against emulated real tokenizers (SentencePiece, byte-level BPE, cleanup)."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence

import pytest
from fake_tokenizers import (
    SP_SPECIAL,
    bpe_decode,
    bpe_encode,
    clean_up_tokenization,
    make_bpe,
    sp_decode,
    sp_encode,
    tokenizer_server,
)
from helpers import refusing_port

import poc_api

DEAD = f"http://127.0.0.1:{refusing_port()}"
WORDS = [
    "hello",
    " the",
    " quick",
    " brown",
    " fox",
    ",",
    ".",
    " café",
    " naïve",
    " 日本語",
    "日本",
    " 🎉",
    "🎉🎉",
    " —",
    " ∑",
    "中文字符",
    " a",
    "x",
    "!",
    " ?",
    "  ",
]


def texts(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))


async def run_decoder(
    url: str, ids: Sequence[int], rng: random.Random, batches: bool, skip: bool = True
) -> str:
    async with poc_api.ApiClient(url, grpc_url=DEAD) as client:
        decoder = client.text_decoder(skip_special_tokens=skip)
        pieces = []
        i = 0
        while i < len(ids):
            n = rng.choice([1, 1, 2, 3, 4, 5, 9, 40]) if batches else 1
            pieces.append(await decoder.feed(ids[i : i + n]))
            i += n
        pieces.append(await decoder.flush())
        return "".join(pieces)


async def check(
    decode: Callable[[Sequence[int]], str],
    vocab: int,
    special: dict[str, int],
    encode: Callable[[str], list[int]],
    seed: int,
    batches: bool,
) -> None:
    rng = random.Random(seed)
    async with tokenizer_server(decode, vocab, special) as url:
        text = texts(rng)
        ids = encode(text)
        got = await run_decoder(url, ids, rng, batches)
        assert got == decode(ids), (text, ids)


@pytest.mark.parametrize("batches", [False, True])
@pytest.mark.parametrize("seed", range(30))
async def test_sentencepiece(seed: int, batches: bool) -> None:
    await check(sp_decode, 300, SP_SPECIAL, sp_encode, seed, batches)


@pytest.mark.parametrize("batches", [False, True])
@pytest.mark.parametrize("seed", range(30))
async def test_byte_level_bpe(seed: int, batches: bool) -> None:
    vocab, eot = make_bpe(seed, "".join(WORDS) * 3)
    await check(
        functools.partial(bpe_decode, vocab, eot),
        eot + 1,
        {"eot": eot},
        functools.partial(bpe_encode, vocab),
        seed,
        batches,
    )


@pytest.mark.parametrize("batches", [False, True])
@pytest.mark.parametrize("seed", range(30))
async def test_cleanup_spaces(seed: int, batches: bool) -> None:
    vocab, eot = make_bpe(seed, "".join(WORDS) * 3)

    def decode(ids: Sequence[int]) -> str:
        return clean_up_tokenization(bpe_decode(vocab, eot, ids))

    await check(decode, eot + 1, {"eot": eot}, functools.partial(bpe_encode, vocab), seed, batches)


async def feed_one_by_one(url: str, ids: Sequence[int]) -> list[str]:
    async with poc_api.ApiClient(url, grpc_url=DEAD) as client:
        decoder = client.text_decoder()
        return [await decoder.feed(i) for i in ids] + [await decoder.flush()]


async def test_bpe_tokens_that_end_one_character_and_start_the_next_lose_none() -> None:
    # Byte-level BPE (GPT-2, tiktoken, Qwen): " 中文字符" in tokens each ending
    # inside a character; every decode (and every head) ends with U+FFFD.
    vocab = [bytes([b]) for b in range(256)]
    vocab += [b" \xe4", b"\xb8\xad\xe6", b"\x96\x87\xe5", b"\xad\x97\xe7", b"\xac\xa6"]
    eot = len(vocab)
    decode = functools.partial(bpe_decode, vocab, eot)
    ids = list(range(256, 261))
    assert decode(ids) == " 中文字符"
    async with tokenizer_server(decode, eot + 1, {"eot": eot}) as url:
        pieces = await feed_one_by_one(url, ids)
    assert "".join(pieces) == " 中文字符"


async def test_byte_fallback_characters_over_a_context_restart_are_not_replaced() -> None:
    # Llama-style SentencePiece: 中 is 3 <0xNN> byte tokens, and ByteFallback
    # decodes a run of them with an invalid byte as one U+FFFD per token. A
    # context restarted inside a character turns the whole run into U+FFFD.
    text = "x" * 60 + "中文字符" * 6
    ids = sp_encode(text)
    async with tokenizer_server(sp_decode, 300, SP_SPECIAL) as url:
        pieces = await feed_one_by_one(url, ids)
    assert "".join(pieces) == sp_decode(ids) == text


async def test_a_space_cleaned_up_before_punctuation_loses_not_the_punctuation() -> None:
    # Hugging Face's clean_up_tokenization_spaces: decode("Hi", " ", "?") is "Hi?".
    vocab = [bytes([b]) for b in range(256)]
    eot = len(vocab)

    def decode(ids: Sequence[int]) -> str:
        return clean_up_tokenization(bpe_decode(vocab, eot, ids))

    ids = list(b"Hi ?")
    async with tokenizer_server(decode, eot + 1, {"eot": eot}) as url:
        pieces = await feed_one_by_one(url, ids)
    assert "".join(pieces) == decode(ids) == "Hi?"


async def test_a_held_back_replacement_character_comes_out_at_flush() -> None:
    vocab = [bytes([b]) for b in range(256)] + [
        b" \xe4",
        b"\xb8\xad\xe6",
        b"\x96\x87\xe5",
        b"\xad\x97\xe7",
    ]
    eot = len(vocab)
    decode = functools.partial(bpe_decode, vocab, eot)
    ids = list(range(256, 260))
    async with tokenizer_server(decode, eot + 1, {"eot": eot}) as url:
        pieces = await feed_one_by_one(url, ids)
    assert "".join(pieces) == decode(ids) == " 中文字\ufffd"


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("seed", range(20))
async def test_specials_among_the_ids(seed: int, skip: bool) -> None:
    rng = random.Random(seed)
    ids: list[int] = []
    for _ in range(rng.randint(1, 30)):
        ids += (
            sp_encode(rng.choice(WORDS))[1:] if rng.random() < 0.5 else sp_encode(rng.choice(WORDS))
        )
        if rng.random() < 0.2:
            ids.append(rng.choice([1, 2]))
    async with tokenizer_server(sp_decode, 300, SP_SPECIAL) as url:
        got = await run_decoder(url, ids, rng, batches=seed % 2 == 0, skip=skip)
    want = sp_decode(ids if not skip else [i for i in ids if i not in (0, 1, 2)])
    assert got == want


@pytest.mark.parametrize("tokenizer", ["sentencepiece", "byte_level"])
async def test_a_long_run_of_spaces_keeps_the_context_bounded(tokenizer: str) -> None:
    # Trailing spaces are held back; a context restart was refused while they
    # were more than the new context's text, so through a run of spaces (a
    # model padding, indenting) the context grew with the stream: each
    # /detokenize took every id since the run began (quadratic).
    if tokenizer == "sentencepiece":
        base, special, encode = sp_decode, SP_SPECIAL, sp_encode
        vocab_size = 300
    else:
        vocab = [bytes([b]) for b in range(256)]
        base = functools.partial(bpe_decode, vocab, 256)
        special, vocab_size = {"eot": 256}, 257
        encode = functools.partial(bpe_encode, vocab)
    longest = 0

    def decode(ids: Sequence[int]) -> str:
        nonlocal longest
        longest = max(longest, len(ids))
        return clean_up_tokenization(base(ids))

    ids = encode("x" + " " * 400 + ".")
    async with tokenizer_server(decode, vocab_size, special) as url:
        pieces = await feed_one_by_one(url, ids)
    assert longest <= 70
    assert "".join(pieces) == decode(ids)


@pytest.mark.parametrize(
    "text",
    [
        *("He said ' hi ' to me", "it ' s", "they 're", "we 've", "I 'm", "do n't"),
        # A trailing quote too: " ' " became "'" (written when the space after came),
        # then " '" again when punctuation followed (" ?" loses its space first):
        # "He said' '?".
        *("He said ' ?", "x ' .", "a ' , b", "it' ' !"),
    ],
)
async def test_a_space_cleaned_up_before_a_quote_or_contraction_doubles_nothing(
    text: str,
) -> None:
    # Hugging Face's clean_up_tokenization also removes the space of " ' ",
    # " 's", " n't", ...: the " '" (or " n") was written before the text that
    # completes it came, and the returns went on from where the decode parted
    # from them: "He said ''hi'".
    vocab = [bytes([b]) for b in range(256)]
    eot = len(vocab)

    def decode(ids: Sequence[int]) -> str:
        return clean_up_tokenization(bpe_decode(vocab, eot, ids))

    ids = list(text.encode())
    async with tokenizer_server(decode, eot + 1, {"eot": eot}) as url:
        pieces = await feed_one_by_one(url, ids)
    assert "".join(pieces) == decode(ids)
