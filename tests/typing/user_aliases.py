"""A user's program naming the API's own type aliases in its annotations.

Checked by ``mypy --strict tests/typing`` (nox's typecheck session), never run.
"""

from __future__ import annotations

from typing import assert_type

import poc_api
from poc_api import DivergenceReason, Ranges


def spans(n: int) -> Ranges:
    # What score() and generate(readout_ranges=...) take, named in the user's code.
    return [(0, n), (1, 2)]


async def score(client: poc_api.ApiClient, chunks: list[poc_api.Chunk], n: int) -> float:
    ranges: Ranges = spans(n)
    results = await client.score(chunks, ranges)
    return sum(r.logprob for r in results)


def why(exc: poc_api.SessionDivergence) -> DivergenceReason:
    assert_type(exc.reason, DivergenceReason)
    if exc.reason == "short":
        return "short"
    return exc.reason


def not_a_reason() -> DivergenceReason:
    return "diverged"  # type: ignore[return-value]
