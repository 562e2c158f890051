"""Scoring: summed log-probabilities of prompt ranges, over an ephemeral session.

The trio counterpart of the seed's gRPC ``call_score`` (learn.rs). Unlike the
seed, the ranges are sent with *every* ``Generate`` of the walk (the prefill
flushes before images too), because the server never re-emits positions that an
earlier call appended: a range over text before an image would otherwise come
back empty.

Prefix sharing (``score_continuations``, ``score_many(share_prefix=True)``): one
session prefills the shared prefix once; then, for each continuation, a
``Generate`` with ``truncating = true`` rewinds the session to the prefix's end
and appends the continuation. The server computes a position's logprob from the
tokens the session holds before it, which after the rewind are exactly the
prefix: the numbers are the ones scoring each full prompt on its own gives, and
they are summed by the same code (:func:`range_sums`), so the sums are equal to
the last bit.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from operator import itemgetter
from typing import TYPE_CHECKING, SupportsIndex, TypeVar

import trio

from . import _errors as e
from ._chunks import Chunk, Image, Tokens, check_chunks, check_image_sizes, known_len, text_len
from ._session import Session, check_window, open_session
from ._types import (
    BYTES_LIKE,
    Ranges,
    SamplingParams,
    ScoreResult,
    Token,
    _plain,
    _plain_iterable,
    as_int,
    check_ranges,
    unordered,
)

if TYPE_CHECKING:
    from ._pool import Router

log = logging.getLogger("poc_api.grpc")

_T = TypeVar("_T")

__all__ = [
    "group_by_prefix",
    "merge_ranges",
    "positions_within",
    "range_sums",
    "score_chunks",
    "score_continuations",
    "score_many",
    "validate_ranges",
]


def validate_ranges(ranges: Ranges, name: str = "ranges") -> list[tuple[int, int]]:
    """Check ``(start, end)`` pairs: ints in uint32, ``start <= end``. Any order.

    An empty range (``start == end``: an empty continuation, say) sums to 0, as
    in ``score_continuations``. Errors name the parameter ``name``."""
    return check_ranges(ranges, name, allow_empty=True)


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping union of half-open ranges (what goes on the wire);
    empty ones add nothing."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if start == end:
            continue
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def range_sums(logprobs: dict[int, float], ranges: Sequence[tuple[int, int]]) -> list[ScoreResult]:
    """Sum ``logprobs`` (position -> logprob) over each range; absent positions add 0.

    Each sum is the correctly rounded exact sum (what :func:`math.fsum` gives),
    whatever the other ranges: no range's result depends on what else was asked.
    """
    if not ranges:
        return []
    # (Position 0's "logprob" is the spec's 0 for a token with no prefix: no term.)
    scored = sorted(p for p in logprobs if p > 0)
    counts = [bisect_left(scored, t) - bisect_left(scored, s) for s, t in ranges]
    lo = min(s for s, _ in ranges)
    hi = max(t for _, t in ranges)
    span = hi - lo
    if span <= 4 * max(len(logprobs), 1):
        get = logprobs.get
        values = [get(lo + i, 0.0) for i in range(span)]
        slices = [(s - lo, t - lo) for s, t in ranges]
    else:
        # Sparse (a few positions of a long prompt): each range's slice of the
        # sorted positions, by bisection. (A scan of them all for each range took
        # seconds for 10,000 ranges.)
        positions = sorted(logprobs)
        values = [logprobs[p] for p in positions]
        slices = [(bisect_left(positions, s), bisect_left(positions, t)) for s, t in ranges]
    # Ranges that overlap much (every prefix of a long prompt): exact prefix sums
    # make each O(1); otherwise fsum over each slice is cheaper (C speed).
    if sum(j - i for i, j in slices) > 8 * len(values):
        prefix = _exact_prefix_sums(values)
        if prefix is not None:
            prefix_sums, scale = prefix
            return [
                ScoreResult(s, t, (prefix_sums[j] - prefix_sums[i]) / scale, token_count=n)
                for (s, t), (i, j), n in zip(ranges, slices, counts, strict=True)
            ]
    return [
        ScoreResult(s, t, _fsum(values[i:j]), token_count=n)
        for (s, t), (i, j), n in zip(ranges, slices, counts, strict=True)
    ]


def _fsum(values: list[float]) -> float:
    """``math.fsum``, but nan for -inf + inf and inf for an overflow, as ``sum``
    gives (fsum raises ValueError / OverflowError: not an error of the caller's)."""
    try:
        return math.fsum(values)
    except (ValueError, OverflowError):
        return sum(values)


def _exact_prefix_sums(values: list[float]) -> tuple[list[int], int] | None:
    """Prefix sums of ``values`` as exact integers over one power-of-two denominator.

    A finite float is ``n / 2**k``: on a common denominator the sums are ints, their
    differences exact, and int / int true division rounds correctly, as ``fsum``.
    Float prefix sums lost a small range to the large ones before it
    (-20 - 5.9e-7, then minus -20). ``None`` if a value is not finite.
    """
    ratios: list[tuple[int, int]] = []
    k = 0
    try:
        for v in values:
            n, d = v.as_integer_ratio()
            shift = d.bit_length() - 1
            ratios.append((n, shift))
            k = max(k, shift)
    except (OverflowError, ValueError):  # inf, nan
        return None
    prefix = [0] * (len(values) + 1)
    acc = 0
    for i, (n, shift) in enumerate(ratios, 1):
        acc += n << (k - shift)
        prefix[i] = acc
    return prefix, 1 << k


_range_start = itemgetter(0)
_range_end = itemgetter(1)


async def _collect(
    session: Session,
    tokens: list[int],
    wire_ranges: list[tuple[int, int]],
    into: dict[int, float],
    *,
    rewind_to: int | None = None,
) -> None:
    # Only positions this call appends, inside a range: a logprob for another (a
    # server off by one) passed the count check, and the sum was wrong.
    start = session.committed_len if rewind_to is None else rewind_to
    end = start + len(tokens)
    # Only the ranges this call's positions fall in (merged: sorted, disjoint, so
    # their ends are sorted too): the server reports no other position (spec §3).
    # Every range with every call cost ranges x calls to check, encode and parse
    # (a prompt of 1,000 images, a range after each, took half a minute).
    wire_ranges = wire_ranges[
        bisect_right(wire_ranges, start, key=_range_end) : bisect_left(
            wire_ranges, end, key=_range_start
        )
    ]
    starts = [s for s, _ in wire_ranges]
    async with session.generate(
        tokens,
        sampling=SamplingParams(max_tokens=0),
        logprobs_ranges=wire_ranges,
        rewind_to=rewind_to,
    ) as events:
        async for ev in events:
            if type(ev) is Token:
                p = ev.position
                i = bisect_right(starts, p) - 1
                if not (ev.is_prefill and start <= p < end and i >= 0 and p < wire_ranges[i][1]):
                    raise e.ProtocolViolation(
                        f"Generate: a logprob for position {p}, which was not asked for "
                        f"(this call appended [{start}, {end}))"
                    )
                into[p] = ev.sampled_logprob


async def _score_in_session(
    session: Session, chunks: list[Chunk], ranges: list[tuple[int, int]]
) -> list[ScoreResult]:
    wire = merge_ranges(ranges)
    logprobs: dict[int, float] = {}
    image_spans: list[tuple[int, int]] = []
    pending: list[int] = []
    pos = 0
    # Text only: an image's stated length may be wrong (the server decides it);
    # the check before each call below has its real one.
    check_window(session, text_len(chunks))
    session._check_images(chunks)
    for chunk in chunks:
        if isinstance(chunk, Tokens):
            pending.extend(chunk.ids)
            pos += len(chunk.ids)
            continue
        if pending:
            check_window(session, pos)
            await _collect(session, pending, wire, logprobs)
            pending = []
        appended = await session.append_image(chunk.data, chunk.mime)
        _check_image_len(session, chunk, appended.placeholder_count, pos, ranges)
        image_spans.append((pos, pos + appended.placeholder_count))
        pos += appended.placeholder_count
    total = pos
    _check_within(ranges, total)
    check_window(session, total)
    if pending:  # (a prompt that ends with an image has nothing left to send)
        await _collect(session, pending, wire, logprobs)
    # Every text position inside a range must have come back.
    _check_count(logprobs, _text_positions(wire, image_spans))
    return range_sums(logprobs, ranges)


def _precheck(
    chunks: Sequence[Chunk], ranges: Ranges, max_message_size: int, where: str = ""
) -> tuple[list[Chunk], list[tuple[int, int]], list[ScoreResult] | None]:
    """Check one prompt; ``where`` prefixes the parameter names (``prompts[3] ``).

    The third item is the prompt's results when it needs no session: no range, or
    only empty ones inside a prompt whose length is known (each sums to 0).
    """
    checked = check_chunks(chunks, f"{where}chunks")
    check_image_sizes(checked, max_message_size, f"{where}chunks")
    rs = validate_ranges(ranges, f"{where}ranges")
    total = known_len(checked)
    if total is not None:
        _check_within(rs, total, where)
    if not rs or (total is not None and all(s == t for s, t in rs)):
        return checked, rs, [ScoreResult(s, t, 0.0) for s, t in rs]
    return checked, rs, None


def _check_within(ranges: Sequence[tuple[int, int]], total: int, where: str = "") -> None:
    """ValueError for a range that ends past a ``total``-position prompt."""
    for start, end in ranges:
        if end > total:
            raise ValueError(
                f"{where}range ({start}, {end}) lies outside the {total}-position prompt"
            )


async def score_chunks(
    transport: Router,
    model: str,
    chunks: Sequence[Chunk],
    ranges: Ranges,
    *,
    max_buffered_events: int,
    close_timeout: float,
) -> list[ScoreResult]:
    """Score one prompt in an ephemeral session; see ``ApiClient.score``."""
    checked, rs, trivial = _precheck(chunks, ranges, transport.max_message_size)
    if trivial is not None:
        await trio.lowlevel.checkpoint()
        return trivial
    return await _in_a_session(
        transport,
        model,
        partial(_score_in_session, chunks=checked, ranges=rs),
        max_buffered_events=max_buffered_events,
        close_timeout=close_timeout,
    )


async def _in_a_session(
    transport: Router,
    model: str,
    work: Callable[[Session], Awaitable[_T]],
    *,
    max_buffered_events: int,
    close_timeout: float,
) -> _T:
    """``work`` in an ephemeral session; in a pool, once more elsewhere if its
    server dies (``_failing_over``)."""

    async def attempt() -> _T:
        async with open_session(
            transport,
            model,
            max_buffered_events=max_buffered_events,
            close_timeout=close_timeout,
        ) as session:
            return await work(session)

    return await _failing_over(transport.failover_attempts, attempt)


async def _failing_over(tries: int, attempt: Callable[[], Awaitable[_T]]) -> _T:
    """``attempt()``, up to ``tries`` times while it fails with ServerUnavailable:
    in a pool, its server died before the result; once more, elsewhere."""
    for i in range(tries):
        try:
            return await attempt()
        except e.ServerUnavailable:
            if i + 1 >= tries:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _which(at: list[int]) -> str:
    """A note naming the prompts ``at`` (a group's: the first three)."""
    named = ", ".join(f"prompts[{i}]" for i in at[:3])
    if len(at) > 3:
        named += f" and {len(at) - 3} more"
    if len(at) > 1:
        named += " (scored in one session, sharing a prefix)"
    return f"score_many: {named}"


def _noted(exc: Exception, note: str) -> Exception:
    """A copy of ``exc`` with ``note``: the object may be other calls' error too,
    whose notes this note is not."""
    copy = e.own_copy(exc)
    copy.add_note(note)
    return copy


async def score_many(
    transport: Router,
    model: str,
    prompts: Sequence[tuple[Sequence[Chunk], Ranges]],
    *,
    max_concurrency: int,
    max_buffered_events: int,
    close_timeout: float,
    share_prefix: bool = False,
) -> list[list[ScoreResult]]:
    """Score prompts concurrently, at most ``max_concurrency`` at once, results in order.

    With ``share_prefix``, prompts that share a prefix are scored in one session
    each group (see :func:`group_by_prefix`): the prefix is sent once, each
    prompt's rest after a rewind to its end. The groups run concurrently; the
    prompts of one group one after another.
    """
    max_concurrency = as_int("max_concurrency", max_concurrency)
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    if not isinstance(share_prefix, bool):
        raise TypeError("share_prefix must be a bool")
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Iterable):
        raise TypeError(
            f"prompts must be a sequence of (chunks, ranges) pairs, not {type(prompts).__name__}"
        )
    unordered(prompts, "prompts", "(chunks, ranges) pairs")  # (results come in its order)
    checked = []
    for i, pair in enumerate(prompts):
        if isinstance(pair, str | bytes) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"prompts[{i}] must be a (chunks, ranges) pair, got {pair!r:.80}")
        checked.append(_precheck(pair[0], pair[1], transport.max_message_size, f"prompts[{i}] "))
    results: list[list[ScoreResult] | None] = [None] * len(checked)
    first_error: list[BaseException] = []
    limiter = trio.CapacityLimiter(max_concurrency)
    # This call's sessions: made and not closed yet; asked for and not answered yet.
    holding = opening = 0

    tries = transport.failover_attempts

    async def one(indices: list[int], shared: int) -> None:
        # The prompts being scored (a group's shared prefix: all of them).
        at = list(indices)
        try:
            while True:
                async with limiter:
                    try:
                        await _failing_over(tries, partial(in_session, indices, shared, at))
                        return
                    except _Full:
                        pass  # in line again, behind the limiter's smaller total
        except Exception as exc:
            # Keep the first failure, cancel the rest: one error, not a group.
            if not first_error:
                # Which prompt (a server's refusal does not say).
                first_error.append(_noted(exc, _which(at)))
            nursery.cancel_scope.cancel()

    async def in_session(indices: list[int], shared: int, at: list[int]) -> None:
        nonlocal holding, opening
        at[:] = indices
        made = False  # (opening until then)
        opening += 1
        try:
            async with open_session(
                transport,
                model,
                max_buffered_events=max_buffered_events,
                close_timeout=close_timeout,
            ) as session:
                opening -= 1
                holding += 1
                made = True
                if len(indices) == 1:
                    chunks, rs, _ = checked[indices[0]]
                    results[indices[0]] = await _score_in_session(session, chunks, rs)
                else:
                    group = [(i, *checked[i][:2]) for i in indices]
                    await _score_group(session, group, shared, results, at)
        except e.ResourceExhausted:
            # This call's other sessions, made or maybe being made (an answer may
            # be in, its task not run yet): no fewer than the server holds of them.
            others = holding + opening - 1
            if made or not others:
                raise  # not the OpenSession, or nothing of this call's to wait for
            # The server holds no more sessions (its cap, or others' sessions too)
            # than this call has open: go on with at most that many at once. Each
            # retry waits in line for one of them to end: the batch progresses.
            if others < limiter.total_tokens:
                log.info(
                    "score_many: the server refused one more session (RESOURCE_EXHAUSTED); "
                    "going on with at most %d at once",
                    others,
                )
                limiter.total_tokens = others
            raise _Full from None
        finally:
            if made:
                holding -= 1
            else:
                opening -= 1

    # Prompts without ranges (or with empty ones only) need no session at all.
    todo = [i for i, (_, _, trivial) in enumerate(checked) if trivial is None]
    for i, (_, _, trivial) in enumerate(checked):
        if trivial is not None:
            results[i] = trivial
    if share_prefix:
        groups = group_by_prefix([checked[i][0] for i in todo])
        batches = [([todo[j] for j in members], shared) for members, shared in groups]
    else:
        batches = [([i], 0) for i in todo]
    if not batches:
        await trio.lowlevel.checkpoint()  # nothing to send; still a checkpoint
    # The children catch every Exception; what can group is cancellation.
    with e.collapse_cancellation():
        async with trio.open_nursery() as nursery:
            e.start_tasks(nursery, one, *batches)
    if first_error:
        raise first_error[0]
    return [r if r is not None else [] for r in results]


class _Full(Exception):
    """score_many: a session was refused as one too many; try again later."""


# -- prefix sharing ------------------------------------------------------------------

# A prompt as a flat sequence of units: a text token id, or a whole image.
_Unit = int | Image


def _units(chunks: Sequence[Chunk]) -> list[_Unit]:
    out: list[_Unit] = []
    for chunk in chunks:
        if isinstance(chunk, Tokens):
            out.extend(chunk.ids)
        else:
            out.append(chunk)
    return out


def _unit_keys(prompts: Sequence[Sequence[Chunk]]) -> list[list[int]]:
    """Each prompt as a flat list of ints, one per unit: a text token is its id
    (uint32: >= 0), an image a negative number naming its (bytes, mime,
    known_expanded_len). Equal units, equal ints: a common prefix of the keys is
    one of the prompts'. (Plain ints, not a tuple per unit: those took seconds of
    the trio thread and hundreds of MB for a thousand 2,000-token prompts.)

    Equal bytes take equal positions (the server counts them from the bytes),
    but the stated known_expanded_len is compared too: the shared prefix is sent
    as one prompt's chunks, and a length the server contradicts is checked
    against the ranges counted from it (_check_image_len). Prompts that state
    it differently share no prefix past the image, so each gets its own check.
    """
    images: dict[tuple[bytes, str, int], int] = {}
    keys = []
    for chunks in prompts:
        key: list[int] = []
        for chunk in chunks:
            if isinstance(chunk, Tokens):
                key += chunk.ids
            else:
                named = (chunk.data, chunk.mime, chunk.known_expanded_len)
                key.append(-1 - images.setdefault(named, len(images)))
        keys.append(key)
    return keys


def _to_chunks(units: Sequence[_Unit]) -> list[Chunk]:
    out: list[Chunk] = []
    text: list[int] = []
    for unit in units:
        if isinstance(unit, int):
            text.append(unit)
            continue
        if text:
            out.append(Tokens(text))
            text = []
        out.append(unit)
    if text:
        out.append(Tokens(text))
    return out


def _common_units(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of ``a`` and ``b``, by bisection over slices
    compared in C (a loop over a long shared prefix unit by unit took longer than
    all the rest of the grouping)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def group_by_prefix(prompts: Sequence[Sequence[Chunk]]) -> list[tuple[list[int], int]]:
    """Group prompts that share a prefix: ``[(indices, shared_units), ...]``.

    ``shared_units`` counts the units (text tokens, whole images) at the start of
    every prompt of the group. Prompts are sorted by content, so prompts with long
    common prefixes end up next to each other; a prompt joins the group before it
    only while the group's shared prefix stays more than half of the shorter of
    any two members: prompts that only share, say, a BOS token are not worth
    serialising in one session. The grouping only decides what is sent once;
    results never depend on it.
    """
    keys = _unit_keys(prompts)
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    groups: list[tuple[list[int], int]] = []
    # The last group's two longest members' lengths: the longer of any two
    # members' shorter ones is the second longest.
    longest = second = 0
    for i in order:
        n = len(keys[i])
        if groups:
            members, shared = groups[-1]
            # In sorted order, a run's common prefix is its smallest neighbour's.
            common = min(shared, _common_units(keys[members[-1]], keys[i]))
            # Judged on the group's prefix, not the last member's: short prompts
            # sharing half with each neighbour chained unrelated ones together.
            middle = sorted((longest, second, n))[1]
            if 2 * common > middle:
                members.append(i)
                groups[-1] = (members, common)
                longest, second = max(longest, n), middle
                continue
        groups.append(([i], n))
        longest, second = n, 0
    for members, _ in groups:
        members.sort()
    return groups


async def _append(
    session: Session,
    chunks: Sequence[Chunk],
    *,
    rewind_to: int | None,
    wire: list[tuple[int, int]] | None,
    into: dict[int, float],
    image_spans: list[tuple[int, int]],
) -> int:
    """Append ``chunks`` at the session's end, or at ``rewind_to`` after dropping
    the positions from there; returns the session's length after.

    Logprobs of the positions in ``wire`` (``None``: every text position appended
    here) go into ``into``, image placeholder spans into ``image_spans``. Nothing
    is sent for no chunks.
    """
    pos = session.committed_len if rewind_to is None else rewind_to
    pending: list[int] = []
    pending_at = pos
    for chunk in chunks:
        if isinstance(chunk, Tokens):
            pending.extend(chunk.ids)
            pos += len(chunk.ids)
            continue
        if pending:
            check_window(session, pos)
            ranges = [(pending_at, pos)] if wire is None else wire
            await _collect(session, pending, ranges, into, rewind_to=rewind_to)
            rewind_to = None
            pending = []
        appended = await session.append_image(chunk.data, chunk.mime, rewind_to=rewind_to)
        _check_image_len(session, chunk, appended.placeholder_count, pos, wire)
        rewind_to = None
        image_spans.append((pos, pos + appended.placeholder_count))
        pos += appended.placeholder_count
        pending_at = pos
    if pending:
        check_window(session, pos)
        ranges = [(pending_at, pos)] if wire is None else wire
        await _collect(session, pending, ranges, into, rewind_to=rewind_to)
    return pos


def _check_image_len(
    session: Session,
    image: Image,
    count: int,
    at: int,
    ranges: Sequence[tuple[int, int]] | None,
) -> None:
    """Refuse, or warn of, an image the server gave another length than the caller said.

    The server's count is the truth (spec §4) and is used. A range of the
    caller's (``ranges``; ``None``: positions the server's counts place) that
    reaches past the image (at ``at``, as long as both counts agree) was computed
    from the caller's count and names other positions: ValueError, rather than a
    plausible, wrong sum. Ranges before the image stand: a warning. So do empty
    ones, which sum to 0 wherever they are (and are not on the wire, which is what
    ``score_many(share_prefix=True)`` checks: the results must not differ).
    """
    said = image.known_expanded_len
    if said in (0, count):
        return
    for start, end in ranges or ():
        if start < end and end > at + min(said, count):
            raise ValueError(
                f"an image at position {at} has known_expanded_len={said}, but the server "
                f"expanded it to {count} positions: range ({start}, {end}), which reaches "
                "past it, was computed from the wrong length (positions after an image "
                "follow the server's count)"
            )
    log.warning(
        "session %s: an image's known_expanded_len is %d but the server gave it "
        "%d positions; positions after it are the server's",
        session.session_id,
        said,
        count,
    )


def _text_positions(wire: Sequence[tuple[int, int]], image_spans: Sequence[tuple[int, int]]) -> int:
    """Positions of ``wire`` (merged ranges) that are not image placeholders.

    Both are sorted and disjoint (the spans in the order the images were
    appended): one sweep over the two, not every span for every range (ranges x
    images: seconds for a few thousand of each)."""
    covered = 0
    j, n = 0, len(image_spans)
    for start, end in wire:
        covered += end - start
        while j < n and image_spans[j][1] <= start:
            j += 1  # ends before this range, so before every later one
        k = j
        while k < n and image_spans[k][0] < end:
            a, b = image_spans[k]
            covered -= max(0, min(b, end) - max(a, start))
            k += 1
    return covered


def _check_count(logprobs: dict[int, float], expected: int) -> None:
    if len(logprobs) != expected:
        raise e.ProtocolViolation(
            f"Generate: expected logprobs for {expected} positions, got {len(logprobs)}"
        )


async def _score_group(
    session: Session,
    group: list[tuple[int, list[Chunk], list[tuple[int, int]]]],
    shared: int,
    results: list[list[ScoreResult] | None],
    at: list[int],
) -> None:
    """Score ``(index, chunks, ranges)`` prompts whose first ``shared`` units are equal.

    ``at`` is set to the index of the prompt being scored once the prefix is sent.
    """
    for index, chunks, _ in group:
        at[:] = [index]
        check_window(session, text_len(chunks))  # (as _score_in_session's)
        session._check_images(chunks)
    at[:] = [index for index, _, _ in group]
    prefix = _to_chunks(_units(group[0][1])[:shared])
    # The prefix's positions may lie in any prompt's ranges: ask for them all now,
    # since the server never re-emits positions an earlier call appended.
    union = merge_ranges([r for _, _, rs in group for r in rs])
    prefix_lp: dict[int, float] = {}
    prefix_spans: list[tuple[int, int]] = []
    end_of_prefix = await _append(
        session, prefix, rewind_to=None, wire=union, into=prefix_lp, image_spans=prefix_spans
    )
    for index, chunks, rs in group:
        at[:] = [index]
        wire = merge_ranges(rs)
        # Exactly the positions the prompt's own session would have reported.
        lp = positions_within(prefix_lp, wire, end_of_prefix)
        spans = list(prefix_spans)
        rest = _to_chunks(_units(chunks)[shared:])
        total = await _append(
            session, rest, rewind_to=end_of_prefix, wire=wire, into=lp, image_spans=spans
        )
        _check_within(rs, total)
        _check_count(lp, _text_positions(wire, spans))
        results[index] = range_sums(lp, rs)


def positions_within(
    logprobs: Mapping[int, float], wire: Sequence[tuple[int, int]], end: int
) -> dict[int, float]:
    """The entries of ``logprobs`` (positions below ``end``) inside ``wire``
    (merged ranges: sorted, disjoint).

    Looked up range by range, up to ``end``: at most ``end`` lookups. Testing
    each position against every range cost positions x ranges, for every prompt
    of a group (a range on every other position of a long prefix: quadratic).
    """
    out: dict[int, float] = {}
    for start, stop in wire:
        if start >= end:
            break
        for p in range(start, min(stop, end)):
            value = logprobs.get(p)
            if value is not None:
                out[p] = value
    return out


def _check_continuation(value: object, i: int) -> list[Chunk]:
    if isinstance(value, Tokens | Image):
        return [value]
    unordered(value, f"continuation {i}", "token ids or chunks")
    if isinstance(value, Iterable) and not isinstance(value, BYTES_LIKE | Sequence):
        # A numpy array of ids (plain ints in one call), or an iterator of ids or
        # of chunks: as the list it stands for.
        plain = _plain(value)
        if isinstance(plain, Iterable):  # (not a 0-d array's int: refused below)
            value = list(plain)
    if isinstance(value, BYTES_LIKE) or not isinstance(value, Sequence):
        raise TypeError(
            f"continuation {i} must be token ids or a sequence of Tokens/Image, "
            f"not {type(value).__name__}"
        )
    items = list(value)
    if all(isinstance(x, Tokens | Image) for x in items):
        return items
    if any(isinstance(x, Tokens | Image) for x in items):
        raise TypeError(f"continuation {i} mixes token ids and chunks")
    try:
        return [Tokens(items)] if items else []
    except (TypeError, ValueError) as exc:  # ("ids[1] must be an int": of which one?)
        raise type(exc)(f"continuation {i}: {exc}") from None


def _check_window(max_length: int, prompt_len: int, lengths: list[int]) -> None:
    """ContextOverflow, before anything is appended, for a continuation that cannot fit
    (``lengths``: lower bounds, text only)."""
    if not max_length:
        return
    if prompt_len > max_length:
        raise e.ContextOverflow(
            f"the prompt ({prompt_len} positions or more) exceeds the context window of "
            f"{max_length} positions (checked before sending; nothing was scored)"
        )
    for i, n in enumerate(lengths):
        if prompt_len + n > max_length:
            raise e.ContextOverflow(
                f"continuation {i} ({n} positions or more) after the {prompt_len}-position "
                "prompt "
                f"exceeds the context window of {max_length} positions (checked before "
                "sending any continuation; nothing was scored)"
            )


async def score_continuations(
    transport: Router,
    model: str,
    prompt_chunks: Sequence[Chunk],
    continuations: Iterable[Iterable[SupportsIndex] | Sequence[Chunk] | Chunk],
    *,
    max_buffered_events: int,
    close_timeout: float,
) -> list[ScoreResult]:
    """Score continuations of one prompt with one prefill; see ``ApiClient.score_continuations``."""
    prompt = check_chunks(prompt_chunks, "prompt_chunks")
    check_image_sizes(prompt, transport.max_message_size, "prompt_chunks")
    unordered(continuations, "continuations", "continuations")  # (results come in its order)
    if isinstance(continuations, BYTES_LIKE | Tokens | Image) or not isinstance(
        continuations, Iterable
    ):
        raise TypeError(
            f"continuations must be a sequence of continuations, not {type(continuations).__name__}"
        )
    # (A 2-D numpy array of ids: one row per continuation, as plain ints in one call;
    # an iterator of continuations: as the list it stands for.)
    plain = _plain_iterable(continuations, "continuations must be a sequence of continuations")
    conts = [_check_continuation(c, i) for i, c in enumerate(plain)]
    for i, cont in enumerate(conts):
        check_image_sizes(cont, transport.max_message_size, f"continuation {i}")
    lengths = [known_len(c) for c in conts]
    prompt_len = known_len(prompt)
    if not conts or (prompt_len is not None and all(n == 0 for n in lengths)):
        # Nothing to score (every continuation empty: each sums to 0).
        await trio.lowlevel.checkpoint()
        if prompt_len is None:
            return []
        return [ScoreResult(prompt_len, prompt_len, 0.0) for _ in conts]
    return await _in_a_session(
        transport,
        model,
        partial(_continuations_in_session, prompt=prompt, conts=conts),
        max_buffered_events=max_buffered_events,
        close_timeout=close_timeout,
    )


async def _continuations_in_session(
    session: Session, prompt: Sequence[Chunk], conts: Sequence[Sequence[Chunk]]
) -> list[ScoreResult]:
    """``score_continuations``' work in its session."""
    # Text only (lower bounds): an image's stated length may be wrong.
    cont_text = [text_len(c) for c in conts]
    _check_window(session.max_length, text_len(prompt), cont_text)
    session._check_images(prompt, "prompt_chunks")
    for i, cont in enumerate(conts):
        session._check_images(cont, f"continuation {i}")
    spans: list[tuple[int, int]] = []
    end_of_prompt = await _append(
        session, prompt, rewind_to=None, wire=[], into={}, image_spans=spans
    )
    # Now the prompt's length is known even when an image's was not.
    _check_window(session.max_length, end_of_prompt, cont_text)
    results = []
    for cont in conts:
        logprobs: dict[int, float] = {}
        spans = []
        end = await _append(
            session,
            cont,
            rewind_to=end_of_prompt,
            wire=None,
            into=logprobs,
            image_spans=spans,
        )
        _check_count(logprobs, end - end_of_prompt - sum(b - a for a, b in spans))
        results.append(range_sums(logprobs, [(end_of_prompt, end)])[0])
    return results
