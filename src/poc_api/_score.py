"""Scoring: summed log-probabilities of prompt ranges, over an ephemeral session.

The trio counterpart of the seed's gRPC ``call_score`` (learn.rs). Unlike the
seed, the ranges are sent with *every* ``Generate`` of the walk (the prefill
flushes before images too), because the server never re-emits positions that an
earlier call appended: a range over text before an image would otherwise come
back empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from . import _errors as e
from ._chunks import Chunk, Tokens, check_chunks
from ._session import Session, open_session
from ._types import SamplingParams, ScoreResult, Token, _u32

if TYPE_CHECKING:
    from ._transport import GrpcTransport

__all__ = ["merge_ranges", "range_sums", "score_chunks", "score_many", "validate_ranges"]


def validate_ranges(ranges: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Check ``(start, end)`` pairs: ints in uint32, ``start < end``. Any order."""
    if isinstance(ranges, str | bytes):
        raise TypeError("ranges must be a sequence of (start, end) pairs")
    out = []
    for r in ranges:
        if isinstance(r, str | bytes) or not isinstance(r, Sequence) or len(r) != 2:
            raise TypeError(f"a range must be a (start, end) pair, got {r!r}")
        start, end = _u32("range start", r[0]), _u32("range end", r[1])
        if start >= end:
            raise ValueError(f"a range must have start < end, got ({start}, {end})")
        out.append((start, end))
    return out


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping union of half-open ranges (what goes on the wire)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def range_sums(logprobs: dict[int, float], ranges: Sequence[tuple[int, int]]) -> list[ScoreResult]:
    """Sum ``logprobs`` (position -> logprob) over each range; absent positions add 0."""
    if not ranges:
        return []
    lo = min(s for s, _ in ranges)
    hi = max(t for _, t in ranges)
    span = hi - lo
    if span <= 4 * max(len(logprobs), 1):
        # Dense: prefix sums make each range O(1).
        prefix = [0.0] * (span + 1)
        acc = 0.0
        get = logprobs.get
        for i in range(span):
            acc += get(lo + i, 0.0)
            prefix[i + 1] = acc
        return [ScoreResult(s, t, prefix[t - lo] - prefix[s - lo]) for s, t in ranges]
    return [
        ScoreResult(s, t, math.fsum(v for p, v in logprobs.items() if s <= p < t))
        for s, t in ranges
    ]


async def _collect(
    session: Session,
    tokens: list[int],
    wire_ranges: list[tuple[int, int]],
    into: dict[int, float],
) -> None:
    async with session.generate(
        tokens, sampling=SamplingParams(max_tokens=0), logprobs_ranges=wire_ranges
    ) as events:
        async for ev in events:
            if type(ev) is Token:
                into[ev.position] = ev.sampled_logprob


async def _score_in_session(
    session: Session, chunks: list[Chunk], ranges: list[tuple[int, int]]
) -> list[ScoreResult]:
    wire = merge_ranges(ranges)
    logprobs: dict[int, float] = {}
    text_positions = 0
    image_spans: list[tuple[int, int]] = []
    pending: list[int] = []
    pos = 0
    for chunk in chunks:
        if isinstance(chunk, Tokens):
            pending.extend(chunk.ids)
            pos += len(chunk.ids)
            continue
        if pending:
            await _collect(session, pending, wire, logprobs)
            pending = []
        appended = await session.append_image(chunk.data, chunk.mime)
        image_spans.append((pos, pos + appended.placeholder_count))
        pos += appended.placeholder_count
    total = pos
    for start, end in ranges:
        if end > total:
            raise ValueError(f"range ({start}, {end}) lies outside the {total}-position prompt")
    await _collect(session, pending, wire, logprobs)
    # Every text position inside a range must have come back.
    for start, end in wire:
        covered = end - start
        for a, b in image_spans:
            covered -= max(0, min(b, end) - max(a, start))
        text_positions += covered
    if len(logprobs) != text_positions:
        raise e.ProtocolViolation(
            f"Generate: expected logprobs for {text_positions} positions, got {len(logprobs)}"
        )
    return range_sums(logprobs, ranges)


def _precheck(
    chunks: Sequence[Chunk], ranges: Sequence[Sequence[int]]
) -> tuple[list[Chunk], list[tuple[int, int]]]:
    checked = check_chunks(chunks)
    rs = validate_ranges(ranges)
    if all(isinstance(c, Tokens) or c.known_expanded_len for c in checked):
        total = sum(len(c.ids) if isinstance(c, Tokens) else c.known_expanded_len for c in checked)
        for start, end in rs:
            if end > total:
                raise ValueError(f"range ({start}, {end}) lies outside the {total}-position prompt")
    return checked, rs


async def score_chunks(
    transport: GrpcTransport,
    model: str,
    chunks: Sequence[Chunk],
    ranges: Sequence[Sequence[int]],
    *,
    max_buffered_events: int,
    close_timeout: float,
) -> list[ScoreResult]:
    """Score one prompt in an ephemeral session; see ``ApiClient.score``."""
    checked, rs = _precheck(chunks, ranges)
    if not rs:
        return []
    async with open_session(
        transport, model, max_buffered_events=max_buffered_events, close_timeout=close_timeout
    ) as session:
        return await _score_in_session(session, checked, rs)


async def score_many(
    transport: GrpcTransport,
    model: str,
    prompts: Sequence[tuple[Sequence[Chunk], Sequence[Sequence[int]]]],
    *,
    max_concurrency: int,
    max_buffered_events: int,
    close_timeout: float,
) -> list[list[ScoreResult]]:
    """Score prompts concurrently, at most ``max_concurrency`` at once, results in order."""
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
        raise TypeError("max_concurrency must be an int")
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    checked = [_precheck(c, r) for c, r in prompts]
    results: list[list[ScoreResult] | None] = [None] * len(checked)
    first_error: list[BaseException] = []
    limiter = trio.CapacityLimiter(max_concurrency)

    async def one(i: int, chunks: list[Chunk], rs: list[tuple[int, int]]) -> None:
        async with limiter:
            try:
                if not rs:
                    results[i] = []
                    return
                async with open_session(
                    transport,
                    model,
                    max_buffered_events=max_buffered_events,
                    close_timeout=close_timeout,
                ) as session:
                    results[i] = await _score_in_session(session, chunks, rs)
            except Exception as exc:
                # Keep the first failure, cancel the rest: one error, not a group.
                if not first_error:
                    first_error.append(exc)
                nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for i, (c, r) in enumerate(checked):
            nursery.start_soon(one, i, c, r)
    if first_error:
        raise first_error[0]
    return [r if r is not None else [] for r in results]
