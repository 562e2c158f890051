"""Emulated real tokenizers for TextDecoder tests, and a canned HTTP server for them."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import trio
from helpers import http_server, read_request

# -- (a) SentencePiece / Llama with byte fallback (HF tokenizers decoder chain:
#        Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0)) -------------------
SP_SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2}
SP_BYTES = 3  # <0x00>..<0xFF> are 3..258
SP_WORDS = [
    "▁the",
    "▁quick",
    "▁brown",
    "▁fox",
    "▁",
    "▁a",
    "a",
    "b",
    "c",
    "e",
    "l",
    "o",
    "h",
    "▁he",
    "llo",
    ".",
    ",",
    "▁caf",
    "é",
    "▁na",
    "ï",
    "ve",
    "▁—",
    "x",
    "y",
    "▁日本",
    "▁hello",
    "!",
    "?",
    "t",
    "q",
    "u",
    "r",
    "n",
    "w",
    "f",
    "▁▁",
    "s",
    "d",
]
SP_VOCAB = list(SP_SPECIAL) + [f"<0x{b:02X}>" for b in range(256)] + SP_WORDS


def sp_encode(text: str) -> list[int]:
    s = "▁" + text.replace(" ", "▁")
    ids: list[int] = []
    i = 0
    by_len = sorted(SP_WORDS, key=len, reverse=True)
    while i < len(s):
        for w in by_len:
            if s.startswith(w, i):
                ids.append(SP_VOCAB.index(w))
                i += len(w)
                break
        else:
            ids += [SP_BYTES + b for b in s[i].encode()]
            i += 1
    return ids


def sp_decode(ids: Sequence[int]) -> str:
    out: list[str] = []
    run: list[int] = []

    def fuse() -> None:
        if run:
            try:
                out.append(bytes(run).decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))  # (ByteFallback: one per byte token)
            run.clear()

    for i in ids:
        if SP_BYTES <= i < SP_BYTES + 256:
            run.append(i - SP_BYTES)
            continue
        fuse()
        out.append(SP_VOCAB[i].replace("▁", " "))
    fuse()
    s = "".join(out)
    return s[1:] if s.startswith(" ") else s


# -- (b) GPT-2 / tiktoken-like byte-level BPE: tokens are arbitrary byte strings ---------
def make_bpe(seed: int, text: str) -> tuple[list[bytes], int]:
    """A vocab of all 256 bytes plus random byte chunks of ``text`` (crossing
    character boundaries); the last id is <|endoftext|>."""
    rng = random.Random(seed)
    data = text.encode()
    chunks = {bytes([b]) for b in range(256)}
    for _ in range(400):
        i = rng.randrange(len(data))
        chunks.add(data[i : i + rng.randint(2, 6)])
    vocab = sorted(chunks, key=lambda c: (len(c), c))
    return vocab, len(vocab)


def bpe_encode(vocab: list[bytes], text: str) -> list[int]:
    data = text.encode()
    index = {c: i for i, c in enumerate(vocab)}
    ids = []
    i = 0
    while i < len(data):
        for n in range(6, 0, -1):
            if data[i : i + n] in index:
                ids.append(index[data[i : i + n]])
                i += n
                break
    return ids


def bpe_decode(vocab: list[bytes], eot: int, ids: Sequence[int]) -> str:
    out = bytearray()
    parts: list[str] = []
    for i in ids:
        if i == eot:
            parts.append(out.decode("utf-8", errors="replace"))
            out.clear()
            parts.append("<|endoftext|>")
        else:
            out += vocab[i]
    parts.append(out.decode("utf-8", errors="replace"))
    return "".join(parts)


# -- (c) HF clean_up_tokenization_spaces over a byte-level decode ------------------------
def clean_up_tokenization(s: str) -> str:
    return (
        s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


@asynccontextmanager
async def tokenizer_server(
    decode: Callable[[Sequence[int]], str], vocab_size: int, special: dict[str, int]
) -> AsyncIterator[str]:
    """A server answering ``GET /tokenizer`` and ``POST /detokenize`` with ``decode``."""

    async def handler(stream: trio.SocketStream) -> None:
        while True:
            head, body = await read_request(stream)
            if not head:
                return
            path = head.split(b" ", 2)[1]
            if path.endswith(b"/tokenizer"):
                data = {"vocab_size": vocab_size, "special": special}
            else:
                data = {"text": decode(json.loads(body)["tokens"])}
            raw = json.dumps(data).encode()
            reply = (
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                f"content-length: {len(raw)}\r\n\r\n"
            )
            await stream.send_all(reply.encode() + raw)

    async with http_server(handler) as url:
        yield url
