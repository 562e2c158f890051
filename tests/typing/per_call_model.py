"""Per-call models, as a user writes them."""

from __future__ import annotations

import poc_api
from poc_api import SamplingParams, Tokens, TrainSample


async def main(client: poc_api.ApiClient) -> None:
    async with client.session(model="other") as s:
        await s.prefill([1, 2], rewind_to=0)
    async with client.conversation(model="other", rewind=True) as conv:
        async with conv.stream([Tokens([1])], SamplingParams(max_tokens=1)) as ev:
            async for _ in ev:
                pass
    r: list[poc_api.ScoreResult] = await client.score([Tokens([1, 2])], [(1, 2)], model="m")
    rr: list[list[poc_api.ScoreResult]] = await client.score_many(
        [([Tokens([1, 2])], [(1, 2)])], share_prefix=True, model=None
    )
    c: list[poc_api.ScoreResult] = await client.score_continuations([Tokens([1])], [[2]], model="m")
    t: poc_api.TrainResult = await client.train([TrainSample([1], [(0, 1)])], model="m")
    client.session(model=3)  # type: ignore[arg-type]
    print(r, rr, c, t)
