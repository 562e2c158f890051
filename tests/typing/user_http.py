"""A user's program reading the HTTP side's dicts: typed, no ``Any`` reaching it.

Checked by ``mypy --strict tests/typing`` (nox's typecheck session), never run.
"""

from __future__ import annotations

from typing import assert_type

import poc_api


async def vision_brackets(client: poc_api.ApiClient) -> tuple[int, int]:
    info = await client.tokenizer_info()
    assert_type(info, poc_api.TokenizerInfo)
    assert_type(info["vocab_size"], int)
    assert_type(info["special"], dict[str, int])
    info["vocab"]  # type: ignore[typeddict-item]
    return info["special"]["vision_start"], info["special"]["vision_end"]


def chosen_tokens(logprobs: poc_api.ChatLogprobs | None) -> list[tuple[str, float]]:
    # The server's JSON as it came (an object; its keys unchecked): .get() it.
    out: list[tuple[str, float]] = []
    for entry in (logprobs or {}).get("content") or []:
        assert_type(entry, poc_api.ChatTokenLogprob)
        token, logprob = entry.get("token"), entry.get("logprob")
        assert_type(token, str | None)
        assert_type(logprob, float | None)
        assert_type(entry.get("bytes"), list[int] | None)
        for alt in entry.get("top_logprobs", []):
            assert_type(alt, poc_api.ChatTopLogprob)
            assert_type(alt.get("logprob"), float | None)
        if token is not None and logprob is not None:
            out.append((token, logprob))
    return out


async def chat_logprobs(client: poc_api.ApiClient) -> None:
    messages = [{"role": "user", "content": "hi"}]
    done = await client.chat(messages, logprobs=True, top_logprobs=2)
    assert_type(done.logprobs, poc_api.ChatLogprobs | None)
    chosen_tokens(done.logprobs)
    async with client.chat_stream(messages, logprobs=True) as events:
        async for ev in events:
            if isinstance(ev, poc_api.ChatDelta):
                assert_type(ev.logprobs, poc_api.ChatLogprobs | None)
                chosen_tokens(ev.logprobs)
