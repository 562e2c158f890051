"""The README's library sketch (the first python block under "## The library"),
as a user would paste it: verbatim between the markers (tests/test_readme.py
checks), with the names it leaves free as parameters.

Checked by ``mypy --strict tests/typing`` (nox's typecheck session), never run.
"""

# The sketch as the README shows it: long lines, unused names.
# ruff: noqa: E501, F841, B007
# pyright: reportUnusedVariable=false
from __future__ import annotations

import poc_api


async def library_sketch(
    base_url: str,
    png: bytes,
    chunks: list[poc_api.Chunk],
    sampling: poc_api.SamplingParams,
    ranges: poc_api.Ranges,
    samples: list[poc_api.TrainSample],
    messages: list[dict[str, str]],
) -> None:
    # fmt: off
    # README sketch begins
    async with poc_api.ApiClient(base_url, api_key="", model="", grpc_url=None) as client:
        manifest = await client.readout_manifest()        # ReadoutManifest | None, cached per client
        shape = manifest.shape if manifest else None       # None: the server has readouts disabled
        async with client.session() as s:                  # OpenSession ... CloseSession on exit
            await s.prefill([1, 2, 3])                     # Generate(max_tokens=0)
            img = await s.append_image(png, "image/png")   # ImageAppend(placeholder_count, total_length)
            async with s.generate([4, 5], sampling=poc_api.SamplingParams(max_tokens=8)) as events:
                async for ev in events: ...                # poc_api.Token / poc_api.Done (wire events)
        async with client.conversation() as conv:          # a reusable session slot
            async with conv.stream(chunks, sampling, readout_shape=shape) as events:
                async for out in events: ...               # TokenOut | ImageAppended | StreamDone
        results = await client.score(chunks, ranges)       # list[ScoreResult(start, end, logprob)]
        await client.train(samples)                        # TrainResult(accepted, job_id)
        async with client.chat_stream(messages) as events: # OpenAI-compatible SSE
            async for delta in events: ...                 # ChatDelta | ChatReasoningDelta | ChatToolCallDelta | ChatDone
    # README sketch ends
    # fmt: on
