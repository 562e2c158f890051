"""A user's program passing numpy's integers and floats where the API takes them.

The README promises numpy integers for token ids, positions and counts, and any
real number (numpy's ``float32`` included) for timeouts: the types must take
what the run time does. Checked by ``mypy --strict tests/typing`` (nox's
typecheck session), never run.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

import poc_api
from poc_api import SamplingParams, Tokens


async def ids_positions_and_timeouts(client: poc_api.ApiClient, png: bytes) -> None:
    ids = [np.int64(72), np.int64(105)]  # list[np.int64]: what a tokenizer's list gives
    array = np.array(ids)
    sampling = SamplingParams(max_tokens=np.int64(4), stop_token_ids=ids)
    async with client.session(timeout=np.float32(5)) as s:
        await s.prefill(ids, timeout=np.float32(2.5))
        await s.prefill(array)
        await s.rewind(np.int64(1), timeout=Fraction(1, 2))
        await s.append_image(bytearray(png), "image/png", timeout=np.float64(3))
        await s.append_image(memoryview(png), "image/png", rewind_to=np.int32(0))
        async with s.generate(
            ids,
            sampling=sampling,
            priority=np.int32(3),
            rewind_to=np.uint32(0),
            timeout=np.float32(10),
            first_token_timeout=np.float16(1),
            token_timeout=1,
        ) as events:
            async for _ in events:
                pass
    await client.detokenize(ids, timeout=np.float32(1))
    await client.tokenize("hi", timeout=np.float32(1))
    await client.tokenizer_info(timeout=np.float32(1))
    await client.readout_manifest(timeout=np.float32(1))
    await client.score([Tokens(ids)], [(np.int64(1), np.int64(2))], timeout=np.float32(1))
    await client.score_many(
        [([Tokens(ids)], [(1, 2)])], max_concurrency=np.int64(4), timeout=np.float32(1)
    )
    await client.score_continuations([Tokens(ids)], [ids, iter(ids)], timeout=np.float32(1))
    await client.train([poc_api.TrainSample(ids, [(1, 2)])], timeout=np.float32(1))
    await client.chat(
        [{"role": "user", "content": "hi"}],
        timeout=np.float32(5),
        max_tokens=np.int64(2),
        temperature=np.float32(0.5),
        top_p=np.float64(1),
        n=np.int8(1),
        logprobs=True,
        top_logprobs=np.int64(2),
        seed=np.int32(7),
    )
    async with client.chat_stream(
        [{"role": "user", "content": "hi"}], timeout=np.float32(5), max_tokens=np.int64(2)
    ) as chat_events:
        async for _ in chat_events:
            pass
    poc_api.ReadoutManifest(["a"], [np.int64(0)])


def client_settings() -> poc_api.ApiClient:
    # The constructor's seconds and counts too.
    return poc_api.ApiClient(
        "http://127.0.0.1:8000/v1",
        connect_timeout=np.float32(3),
        timeout=np.float32(600),
        close_timeout=Fraction(1, 2),
        keepalive_time=np.float64(300),
        keepalive_timeout=np.float16(20),
        max_buffered_events=np.int64(64),
        max_buffered_bytes=np.int32(1 << 20),
        max_message_size=np.uint32(1 << 24),
        max_concurrent_streams=np.int16(8),
        health_check_interval=np.float32(5),
        dns_refresh=np.int64(30),
    )


async def conversation(client: poc_api.ApiClient, ids: list[np.int64]) -> None:
    async with client.conversation() as conv:
        async with conv.stream(
            [Tokens(ids)],
            SamplingParams(max_tokens=2),
            priority=np.int64(2),
            readout_shape=(np.int64(3), np.int64(8)),
            timeout=np.float32(10),
            first_token_timeout=np.float32(2),
            token_timeout=np.float32(1),
        ) as events:
            async for _ in events:
                pass


def prompt_chunks(png: bytes) -> list[poc_api.Chunk]:
    # Any iterable of ids (read once), numpy's brackets too.
    start, end = np.int64(258), np.int64(259)
    prompt = [np.int64(1), start, np.int64(260), end, np.int64(2)]
    poc_api.prompt_to_chunks(iter(prompt), [(png, "image/png")], start, end)
    poc_api.prompt_to_chunks(np.array(prompt, dtype=np.int64), [(png, "image/png")], 258, 259)
    return poc_api.prompt_to_chunks(prompt, [poc_api.Image(png, "image/png")], 258, 259)


async def still_refused(s: poc_api.Session) -> None:
    await s.prefill(["a"])  # type: ignore[list-item]
    await s.prefill([1.5])  # type: ignore[list-item]
    await s.append_image("not bytes", "image/png")  # type: ignore[arg-type]
    poc_api.Image("not bytes", "image/png")  # type: ignore[arg-type]
    await s.rewind(2, timeout="5")  # type: ignore[arg-type]
    s.generate(priority=1.5)  # type: ignore[arg-type]
