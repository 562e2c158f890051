"""Scoring: summed logprobs over an ephemeral session, checked against decoding."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from helpers import make_png, refusing_port, wait_for
from hypothesis import example, given
from hypothesis import strategies as st
from misbehaving import DUMMY_BASE_URL, Reply, misbehaving_server

import poc_api
from poc_api import Image, SamplingParams, ScoreResult, Token, Tokens
from poc_api._score import _exact_prefix_sums, merge_ranges, positions_within, range_sums
from poc_api.server import ReferenceServer, tokenize
from poc_api.testing import reference_server

PROMPT = tokenize("It was the best of times, it was the worst of times")


async def decode_logprobs(client: poc_api.ApiClient, prefix: list[int], n: int) -> list[float]:
    """Independent reference: greedily decode n tokens and read their logprobs."""
    async with client.session() as s:
        async with s.generate(prefix, sampling=SamplingParams(max_tokens=n)) as ev:
            return [e.sampled_logprob async for e in ev if isinstance(e, Token)]


async def greedy(client: poc_api.ApiClient, prefix: list[int], n: int) -> list[int]:
    async with client.session() as s:
        async with s.generate(prefix, sampling=SamplingParams(max_tokens=n)) as ev:
            return [e.id async for e in ev if isinstance(e, Token)]


async def test_score_equals_the_sum_of_decoded_logprobs(client: poc_api.ApiClient) -> None:
    prefix = PROMPT[:10]
    continuation = await greedy(client, prefix, 12)
    reference = await decode_logprobs(client, prefix, 12)
    with trio.fail_after(10):
        [result] = await client.score([Tokens(prefix + continuation)], [(10, 22)])
    assert result.start == 10 and result.end == 22
    assert result.logprob == pytest.approx(math.fsum(reference), abs=1e-4)


async def test_ranges_in_any_order_overlapping_come_back_in_input_order(
    client: poc_api.ApiClient,
) -> None:
    ranges = [(20, 30), (1, 5), (3, 25), (10, 11)]
    results = await client.score([Tokens(PROMPT)], ranges)
    assert [(r.start, r.end) for r in results] == ranges
    singles = await client.score([Tokens(PROMPT)], [(p, p + 1) for p in range(1, 30)])
    by_pos = {r.start: r.logprob for r in singles}
    for r in results:
        assert r.logprob == pytest.approx(sum(by_pos[p] for p in range(r.start, r.end)), abs=1e-4)


async def test_position_zero_has_logprob_zero(client: poc_api.ApiClient) -> None:
    [r] = await client.score([Tokens(PROMPT)], [(0, 1)])
    assert r.logprob == 0.0


async def test_scores_with_images_inside_the_prompt(client: poc_api.ApiClient) -> None:
    img = make_png(56, 28)  # two placeholder positions
    head, tail = PROMPT[:6], PROMPT[6:16]
    chunks: list[poc_api.Chunk] = [Tokens(head), Image(img, "image/png"), Tokens(tail)]
    # Text before the image, text after it, and a range across it.
    results = await client.score(chunks, [(1, 6), (8, 18), (4, 12)])
    # Reference: the same positions' logprobs from prefills in one session.
    async with client.session() as s:
        lp: dict[int, float] = {}
        async with s.generate(
            head, sampling=SamplingParams(max_tokens=0), logprobs_ranges=[(0, 6)]
        ) as ev:
            lp.update({e.position: e.sampled_logprob async for e in ev if isinstance(e, Token)})
        await s.append_image(img, "image/png")
        async with s.generate(
            tail, sampling=SamplingParams(max_tokens=0), logprobs_ranges=[(8, 18)]
        ) as ev:
            lp.update({e.position: e.sampled_logprob async for e in ev if isinstance(e, Token)})
    expect = [sum(lp[p] for p in range(a, b) if p in lp) for a, b in [(1, 6), (8, 18), (4, 12)]]
    assert [r.logprob for r in results] == pytest.approx(expect, abs=1e-4)


async def test_a_score_counts_the_tokens_its_sum_holds(client: poc_api.ApiClient) -> None:
    # The mean per token is logprob / token_count: a range's end - start counts
    # the image's placeholders and position 0 (no prefix), which add no logprob.
    img = make_png(56, 28)  # two placeholder positions
    head, tail = PROMPT[:6], PROMPT[6:16]
    chunks: list[poc_api.Chunk] = [Tokens(head), Image(img, "image/png"), Tokens(tail)]
    ranges = [(0, 6), (8, 18), (4, 12), (0, 18), (6, 8), (3, 3)]
    want = [5, 10, 6, 15, 0, 0]
    results = await client.score(chunks, ranges)
    assert [r.token_count for r in results] == want
    [many] = await client.score_many([(chunks, ranges)])
    assert [r.token_count for r in many] == want
    [shared, _] = await client.score_many(
        [(chunks, ranges), ([Tokens(head)], [(0, 6)])], share_prefix=True
    )
    assert [r.token_count for r in shared] == want
    conts = await client.score_continuations(
        [Tokens(head), Image(img, "image/png")], [[Tokens(tail)], [Tokens(tail[:3])], []]
    )
    assert [r.token_count for r in conts] == [10, 3, 0]
    # Not part of equality: a result built by hand (token_count 0) still compares.
    assert results[0] == ScoreResult(0, 6, results[0].logprob)


@pytest.mark.parametrize(
    ("ranges", "exc"),
    [
        ([(6, 2)], ValueError),
        ([(len(PROMPT) + 1, len(PROMPT) + 1)], ValueError),  # empty, but outside
        ([(-1, 2)], ValueError),
        ([(0, 2**32)], ValueError),
        ([(0, 10_000)], ValueError),  # outside the prompt
        ([(1, 2, 3)], TypeError),
        ([(1.0, 2)], TypeError),
        ("ab", TypeError),
    ],
)
async def test_range_validation_happens_before_anything_is_sent(
    client: poc_api.ApiClient, server: ReferenceServer, ranges: object, exc: type[Exception]
) -> None:
    before = server.state().rpc_counts.get("OpenSession", 0)
    with pytest.raises(exc):
        await client.score([Tokens(PROMPT)], ranges)  # type: ignore[arg-type]
    assert server.state().rpc_counts.get("OpenSession", 0) == before


async def test_empty_ranges_sum_to_zero_as_empty_continuations_do(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    # A candidate list with an empty candidate: (len(p), len(p) + 0). score_continuations
    # returned 0 for it; score and score_many refused it ("start < end").
    n = len(PROMPT)
    [alone] = await client.score([Tokens(PROMPT)], [(1, 5)])
    [cont] = await client.score_continuations([Tokens(PROMPT)], [[]])
    assert cont == ScoreResult(n, n, 0.0)
    before = server.state().rpc_counts.get("OpenSession", 0)
    assert await client.score([Tokens(PROMPT)], [(n, n), (0, 0)]) == [
        ScoreResult(n, n, 0.0),
        ScoreResult(0, 0, 0.0),
    ]
    many = [([Tokens(PROMPT)], [(n, n)]), ([Tokens(PROMPT)], [])]
    for share in (False, True):
        assert await client.score_many(many, share_prefix=share) == [[cont], []]
    # Nothing to sum: no session was opened for any of those.
    assert server.state().rpc_counts.get("OpenSession", 0) == before
    # Beside a real range (also where that range starts or ends), the same sums.
    mixed = [(3, 3), (1, 5), (5, 5), (1, 1)]
    want = [ScoreResult(3, 3, 0.0), alone, ScoreResult(5, 5, 0.0), ScoreResult(1, 1, 0.0)]
    assert await client.score([Tokens(PROMPT)], mixed) == want
    for share in (False, True):
        got = await client.score_many([([Tokens(PROMPT)], mixed)] * 2, share_prefix=share)
        assert got == [want, want]
    # An image whose stated length the server contradicts: a real range past it is
    # refused (counted from the wrong length), an empty one sums to 0 as anywhere;
    # with or without share_prefix alike (the grouped path checked only the wire).
    png = make_png(56, 56)  # four positions; said three
    wrong = [Tokens(PROMPT[:4]), Image(png, "image/png", known_expanded_len=3), Tokens([9, 10])]
    for share in (False, True):
        for empty in (8, 9):
            got = await client.score_many(
                [(wrong, [(0, 2), (empty, empty)])] * 2, share_prefix=share
            )
            assert [r[1] for r in got] == [ScoreResult(empty, empty, 0.0)] * 2
        with pytest.raises(ValueError, match="wrong length"):
            await client.score_many([(wrong, [(0, 2), (7, 8)])] * 2, share_prefix=share)
    # A prompt of unknown length (an image) is sent, to check the range lies inside.
    chunks: list[poc_api.Chunk] = [Tokens([1, 2]), Image(make_png(28, 28), "image/png")]
    assert await client.score(chunks, [(3, 3)]) == [ScoreResult(3, 3, 0.0)]
    with pytest.raises(ValueError, match="outside"):
        await client.score(chunks, [(4, 4)])
    await wait_for(lambda: not server.state().session_ids)


async def test_range_past_the_end_of_a_prompt_with_unknown_image_length(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    chunks: list[poc_api.Chunk] = [Tokens([1, 2]), Image(make_png(28, 28), "image/png")]
    with pytest.raises(ValueError, match="outside"):
        await client.score(chunks, [(1, 50)])
    await wait_for(lambda: not server.state().session_ids)


async def test_the_ephemeral_session_is_closed_after_success_error_and_cancel(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    await client.score([Tokens(PROMPT)], [(1, 5)])
    assert not server.state().session_ids
    with pytest.raises(poc_api.InvalidRequest):
        await client.score([Tokens([1]), Image(b"nope", "image/png"), Tokens([2])], [(0, 1)])
    assert not server.state().session_ids
    long_prompt = [Tokens(PROMPT * 400)]
    with trio.move_on_after(0.01):
        await client.score(long_prompt, [(1, len(PROMPT) * 400)])
    await wait_for(lambda: not server.state().session_ids)


async def test_a_logprob_the_server_left_out_is_a_protocol_violation() -> None:
    # Summed without it, the range's score would be silently too high (an absent
    # position adds 0): the count of positions that came back is checked.
    async with (
        misbehaving_server(Reply(skip_logprobs=(5,))) as srv,
        poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, close_timeout=1.0) as client,
    ):
        with trio.fail_after(10):
            prompt = [Tokens(list(range(10, 20)))]
            with pytest.raises(poc_api.ProtocolViolation, match="expected logprobs for 6 pos"):
                await client.score(prompt, [(2, 8)])
            # Outside the range, the same omission is nothing to score.
            assert await client.score(prompt, [(6, 9)]) == [ScoreResult(6, 9, -3.0)]
            srv.default = Reply()  # every logprob: -1.0 each
            assert await client.score(prompt, [(2, 8)]) == [ScoreResult(2, 8, -6.0)]


async def test_a_logprob_for_a_position_not_asked_for_is_a_protocol_violation() -> None:
    # A server off by one (each prefill event names the next position) sends as many
    # logprobs as were asked for: the count check passes, and the sum silently
    # left out the range's first position (the last one's, outside, was dropped).
    async with (
        misbehaving_server(Reply(shift_logprobs=1)) as srv,
        poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, close_timeout=1.0) as client,
    ):
        with trio.fail_after(10):
            prompt = [Tokens(list(range(10, 20)))]
            with pytest.raises(poc_api.ProtocolViolation, match="position 8"):
                await client.score(prompt, [(2, 8)])
            with pytest.raises(poc_api.ProtocolViolation, match="position 10"):
                await client.score_continuations([Tokens([1, 2, 3, 4, 5])], [list(range(5))])
            with pytest.raises(poc_api.ProtocolViolation):
                await client.score_many([(prompt, [(2, 8)])] * 2, share_prefix=True)


async def test_score_many_keeps_input_order_and_bounds_concurrency(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    prompts = [([Tokens(PROMPT[: 5 + i])], [(1, 5 + i)]) for i in range(24)]
    peak = 0
    done = False

    async def watch() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, len(server.state().session_ids))
            await trio.sleep(0.0005)

    async with trio.open_nursery() as n:
        n.start_soon(watch)
        results = await client.score_many(prompts, max_concurrency=3)
        done = True
    singles = [await client.score(c, r) for c, r in prompts]
    assert results == singles
    assert 1 <= peak <= 3


async def test_score_many_stays_within_the_clients_stream_limit(server: ReferenceServer) -> None:
    # Its default max_concurrency (16) is more than this client lets run at once:
    # the batch must not trip the client's own limit (LimitExceeded).
    prompts = [([Tokens(PROMPT[: 5 + i])], [(1, 5 + i)]) for i in range(24)]
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, max_concurrent_streams=4
    ) as c:
        with trio.fail_after(30):
            results = await c.score_many(prompts)
    assert len(results) == 24


@pytest.mark.parametrize("share_prefix", [False, True])
async def test_score_many_fits_itself_to_a_server_that_refuses_sessions_past_a_cap(
    share_prefix: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # A server that holds at most 4 sessions refused the 5th of score_many's
    # default 16 at once (RESOURCE_EXHAUSTED), and the whole batch failed, though
    # it only had to wait for its own sessions. It goes on with fewer at once now.
    caplog.set_level(logging.INFO, logger="poc_api")
    # Distinct first tokens: with share_prefix, 24 groups (sessions), not one.
    prompts = [([Tokens([i + 10, *PROMPT[: 5 + i]])], [(1, 6 + i)]) for i in range(24)]
    async with reference_server(max_sessions=4, prefill_delay_us=300) as srv:
        async with poc_api.ApiClient(srv.base_url, grpc_url=srv.grpc_url) as c:
            with trio.fail_after(30):
                results = await c.score_many(prompts, share_prefix=share_prefix)
                opened = srv.state().rpc_counts["OpenSession"]
                singles = [await c.score(chunks, rs) for chunks, rs in prompts]
            assert results == singles
            assert opened > 24  # refusals too: the cap was met (else this shows nothing)
            await wait_for(lambda: not srv.state().session_ids)
    said = [r.getMessage() for r in caplog.records if "RESOURCE_EXHAUSTED" in r.getMessage()]
    # Never fewer at once than the server takes: answers in, their tasks not run yet, count.
    limits = [int(m.split("at most ")[1].split()[0]) for m in said]
    assert limits and min(limits) >= 4, said


async def test_score_many_on_a_server_others_fill_fails_as_refused() -> None:
    # Holding no session of its own, it has nothing to wait for: the refusal stands.
    prompts = [([Tokens(PROMPT)], [(1, 5)])] * 3
    async with reference_server(max_sessions=2) as srv:
        async with poc_api.ApiClient(srv.base_url, grpc_url=srv.grpc_url) as c:
            async with c.session(), c.session():
                with trio.fail_after(10), pytest.raises(poc_api.ResourceExhausted):
                    await c.score_many(prompts)


async def test_score_many_raises_the_first_error_unwrapped(client: poc_api.ApiClient) -> None:
    prompts = [([Tokens(PROMPT)], [(1, 5)])] * 5 + [
        ([Tokens([1]), Image(b"nope", "image/png")], [(0, 1)])
    ]
    with pytest.raises(poc_api.InvalidRequest):
        await client.score_many(prompts, max_concurrency=2)
    with pytest.raises(ValueError):
        await client.score_many(prompts, max_concurrency=0)


@pytest.mark.parametrize("share_prefix", [False, True])
async def test_score_many_errors_say_which_prompt(
    client: poc_api.ApiClient, share_prefix: bool
) -> None:
    # One bad prompt among 12: the error did not say which (a server's refusal
    # came bare, and a range check's message left out the "prompts[i]" the
    # other checks give).
    good = ([Tokens(PROMPT)], [(1, 5)])
    prompts = [good] * 7 + [([Tokens([*PROMPT, 5000])], [(1, 3)])] + [good] * 4
    with pytest.raises(poc_api.InvalidRequest, match="vocabulary") as info:
        await client.score_many(prompts, max_concurrency=2, share_prefix=share_prefix)
    assert getattr(info.value, "__notes__", None) == ["score_many: prompts[7]"]
    with pytest.raises(ValueError, match=r"^prompts\[1\] range \(0, 9\) lies outside"):
        await client.score_many([good, ([Tokens([1])], [(0, 9)])])


async def test_score_many_notes_only_its_own_error() -> None:
    # The callers of one connection attempt share its failure, one exception
    # object: score_many's note landed on another task's session() error, and
    # two score_many calls each carried both notes.
    url = f"http://127.0.0.1:{refusing_port()}"
    got: dict[str, BaseException] = {}
    async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=url) as client:

        async def session() -> None:
            with pytest.raises(poc_api.ServerUnavailable) as info:
                async with client.session():
                    pass
            got["session"] = info.value

        async def many(name: str, n: int) -> None:
            with pytest.raises(poc_api.ServerUnavailable) as info:
                await client.score_many([([Tokens([1, 2, 3])], [(1, 3)])] * n)
            got[name] = info.value

        async with trio.open_nursery() as nursery:
            nursery.start_soon(session)
            nursery.start_soon(many, "three", 3)
            nursery.start_soon(many, "five", 5)
    assert getattr(got["session"], "__notes__", None) is None
    for name, n in (("three", 3), ("five", 5)):
        notes = got[name].__notes__  # type: ignore[attr-defined]
        assert len(notes) == 1 and notes[0].startswith("score_many: prompts["), notes
        assert int(notes[0].split("[")[1].split("]")[0]) < n


async def test_a_score_many_groups_note_stays_short(client: poc_api.ApiClient) -> None:
    # A group's note listed every prompt: 2000 alike made a 28,922-character note.
    prompts = [([Tokens([*PROMPT, 5000])], [(1, 3)])] * 2000
    with pytest.raises(poc_api.InvalidRequest) as info:
        await client.score_many(prompts, share_prefix=True)
    assert info.value.__notes__ == [  # type: ignore[attr-defined]
        "score_many: prompts[0], prompts[1], prompts[2] and 1997 more "
        "(scored in one session, sharing a prefix)"
    ]


ranges_st = st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 20)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=8,
)


@given(st.dictionaries(st.integers(0, 60), st.floats(-20, 0), max_size=40), ranges_st)
@example({0: -20.0, 1: -5.898086214983778e-07}, [(0, 2), (1, 2)])
@example({0: -1e-300, 1: -5e-324, 2: -20.0}, [(0, 1), (1, 2), (0, 3)])
def test_range_sums_are_each_ranges_exact_sum(
    logprobs: dict[int, float], ranges: list[tuple[int, int]]
) -> None:
    # Exactly fsum's correctly rounded sum: a range's sum must not depend on the
    # other ranges of the call (prefix sums subtracted lost -5.9e-7 to -20.0).
    got = range_sums(logprobs, ranges)
    for r, (a, b) in zip(got, ranges, strict=True):
        assert (r.start, r.end) == (a, b)
        assert r.logprob == math.fsum(v for p, v in logprobs.items() if a <= p < b)


@given(st.dictionaries(st.integers(0, 60), st.floats(-20, 0), max_size=40), ranges_st)
def test_range_sums_count_the_logprobs_each_sum_holds(
    logprobs: dict[int, float], ranges: list[tuple[int, int]]
) -> None:
    # Position 0's is the spec's 0 for a token with no prefix: no term of a mean.
    got = range_sums(logprobs, ranges)
    for r, (a, b) in zip(got, ranges, strict=True):
        assert r.token_count == sum(1 for p in logprobs if a <= p < b and p > 0)


@given(st.dictionaries(st.integers(0, 60), st.floats(-20, 0), max_size=40), ranges_st)
def test_positions_within_merged_ranges_are_the_ones_any_range_holds(
    logprobs: dict[int, float], ranges: list[tuple[int, int]]
) -> None:
    # share_prefix's filter of a prefix's logprobs for each prompt: a lookup per
    # position of each range (it tested every position against every range).
    end = max(logprobs, default=-1) + 1
    want = {p: v for p, v in logprobs.items() if any(a <= p < b for a, b in ranges)}
    assert positions_within(logprobs, merge_ranges(ranges), end) == want


@given(
    st.lists(st.floats(-20, 0), min_size=1, max_size=30),
    st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=10),
)
def test_exact_prefix_sums_give_fsum_of_every_slice(
    values: list[float], pairs: list[tuple[int, int]]
) -> None:
    result = _exact_prefix_sums(values)
    assert result is not None
    prefix, scale = result
    for a, b in pairs:
        a, b = sorted((min(a, len(values)), min(b, len(values))))
        assert (prefix[b] - prefix[a]) / scale == math.fsum(values[a:b])


def test_range_sums_of_every_prefix_are_exact_too() -> None:
    # Heavily overlapping ranges take the exact-prefix-sum path.
    logprobs = {0: -20.0, 1: -5.898086214983778e-07, 2: -3.0}
    ranges = [(0, 3), (1, 2), (1, 3)] * 10
    got = range_sums(logprobs, ranges)
    assert [r.logprob for r in got[:3]] == [
        math.fsum([-20.0, -5.898086214983778e-07, -3.0]),
        -5.898086214983778e-07,
        math.fsum([-5.898086214983778e-07, -3.0]),
    ]
    inf = float("inf")
    got = range_sums({0: -inf, 1: -1.0}, [(0, 2), (1, 2)] * 10)
    assert [r.logprob for r in got[:2]] == [-inf, -1.0]


class _CountingDict(dict[int, float]):
    """A dict that counts the entries read from it (lookups and iteration)."""

    reads = 0

    def _counted(self, it: Iterator[Any]) -> Iterator[Any]:
        for x in it:
            self.reads += 1
            yield x

    def __iter__(self) -> Iterator[int]:
        return self._counted(super().__iter__())

    def keys(self) -> Any:
        return self._counted(iter(super().keys()))

    def values(self) -> Any:
        return self._counted(iter(super().values()))

    def items(self) -> Any:
        return self._counted(iter(super().items()))

    def __getitem__(self, key: int) -> float:
        self.reads += 1
        return super().__getitem__(key)

    def get(self, key: int, default: Any = None) -> Any:
        self.reads += 1
        return super().get(key, default)


@pytest.mark.parametrize("overlapping", [False, True])
def test_range_sums_of_many_sparse_ranges_read_each_logprob_a_few_times(
    overlapping: bool,
) -> None:
    # Sparse ranges (one position in every 20 of a long prompt) scanned every
    # logprob for each range: 10,000 of them held trio's thread for 3.6 s.
    n = 2000
    logprobs = _CountingDict({20 * i: -1.0 - i / n for i in range(n)})
    ranges = [(20 * i, 20 * i + 1) for i in range(n)]
    if overlapping:
        ranges += [(20 * i, 20 * n) for i in range(n)]
    got = range_sums(logprobs, ranges)
    assert logprobs.reads <= 4 * n, logprobs.reads
    plain = dict(logprobs)
    for r, (a, b) in zip(got, ranges, strict=True):
        assert r.logprob == math.fsum(v for p, v in plain.items() if a <= p < b)


def test_range_sums_of_non_finite_logprobs() -> None:
    inf = float("inf")
    got = range_sums({0: -inf, 1: -1.0, 2: -2.0}, [(0, 2), (1, 3)])
    assert [r.logprob for r in got] == [-inf, -3.0]
    # fsum raised ValueError ("-inf + inf in fsum"), out of score(): nan, as sum gives.
    for logprobs in ({0: inf, 1: -inf}, {0: inf, 5: -inf}):
        [r] = range_sums(logprobs, [(0, 6)])
        assert math.isnan(r.logprob)
    [r] = range_sums({0: 1e308, 1: 1e308}, [(0, 2)])  # fsum: OverflowError
    assert r.logprob == inf


@given(ranges_st)
def test_merged_ranges_cover_exactly_the_union(ranges: list[tuple[int, int]]) -> None:
    merged = merge_ranges(ranges)
    covered = {p for a, b in ranges for p in range(a, b)}
    assert {p for a, b in merged for p in range(a, b)} == covered
    assert all(a < b for a, b in merged)
    assert all(merged[i][1] < merged[i + 1][0] for i in range(len(merged) - 1))


def test_score_result_is_a_value() -> None:
    assert ScoreResult(1, 2, -0.5) == ScoreResult(1, 2, -0.5)


WINDOW_CALLS = ["score", "score_many", "share_prefix", "conversation", "continuations"]


async def _window_call(client: poc_api.ApiClient, call: str, prompt: list[poc_api.Chunk]) -> None:
    """One call of ``call``'s kind on ``prompt`` (its last chunk: text)."""
    last = prompt[-1]
    assert isinstance(last, Tokens)
    other = [*prompt[:-1], Tokens([*last.ids[:-1], 7])]
    if call == "score":
        await client.score(prompt, [(1, 50)])
    elif call == "score_many":
        await client.score_many([(prompt, [(1, 50)])])
    elif call == "share_prefix":
        await client.score_many([(prompt, [(1, 50)]), (other, [(1, 50)])], share_prefix=True)
    elif call == "conversation":
        async with client.conversation() as conv:
            async with conv.stream(prompt, SamplingParams(max_tokens=1)) as events:
                async for _ in events:
                    pass
    else:
        await client.score_continuations(prompt[:-1], [last.ids])


@pytest.mark.parametrize("call", WINDOW_CALLS)
@pytest.mark.parametrize("image_len", [4, 0], ids=["image_len_said", "image_len_unknown"])
@pytest.mark.parametrize("over", ["text", "image"])
async def test_a_prompt_past_the_context_window_is_refused_before_it_is_sent(
    eos_server: ReferenceServer, call: str, image_len: int, over: str
) -> None:
    # Only score_continuations checked the window: score, score_many and a
    # conversation sent the prompt until the server refused it (OUT_OF_RANGE).
    # Text alone too long: nothing is sent. Text that fits, and an image that
    # takes it past the window: the image's length is the server's to say (a
    # stated one may be wrong), so what precedes the rest and the image go, and
    # the rest is refused before it is sent.
    window = 8192
    size = window + 1 if over == "text" else window
    text = (PROMPT * 400)[: size - 100]
    img = Image(make_png(56, 56), "image/png", image_len)  # 4 positions
    prompt: list[poc_api.Chunk] = [Tokens(text[:100]), img, Tokens(text)]
    async with poc_api.ApiClient(eos_server.base_url, grpc_url=eos_server.grpc_url) as client:
        before = eos_server.state()
        with trio.fail_after(20), pytest.raises(poc_api.ContextOverflow) as info:
            await _window_call(client, call, prompt)
        assert info.value.grpc_status is None  # the client's refusal, not the server's
        assert str(window) in str(info.value)
        after = eos_server.state()
        appended = after.tokens_appended - before.tokens_appended
        images = after.rpc_counts.get("AppendImage", 0) - before.rpc_counts.get("AppendImage", 0)
        assert (appended, images) == ((0, 0) if over == "text" else (100, 1))
        await wait_for(lambda: not eos_server.state().session_ids)


@pytest.mark.parametrize("call", WINDOW_CALLS)
async def test_an_image_said_longer_than_it_is_does_not_refuse_a_prompt_that_fits(
    eos_server: ReferenceServer, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The window check counted the stated 9000 positions: ContextOverflow for a
    # prompt of 100 + 4 + 100 positions.
    img = Image(make_png(56, 56), "image/png", 9000)  # the server gives it 4
    prompt: list[poc_api.Chunk] = [Tokens(PROMPT * 8), img, Tokens(PROMPT * 8)]
    async with poc_api.ApiClient(eos_server.base_url, grpc_url=eos_server.grpc_url) as client:
        with trio.fail_after(20):
            await _window_call(client, call, prompt)
    assert any("known_expanded_len is 9000" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("call", ["score", "share_prefix", "score_continuations"])
async def test_an_image_the_server_gives_another_length_than_said_is_warned_of(
    client: poc_api.ApiClient, caplog: pytest.LogCaptureFixture, call: str
) -> None:
    # The server's count is used (spec §4): ranges the caller computed from its
    # own count point at other positions, and nothing said so (a conversation did).
    img = Image(make_png(56, 56), "image/png", 7)  # the server gives it 4
    prompt: list[poc_api.Chunk] = [Tokens(PROMPT[:3]), img, Tokens(PROMPT[3:8])]
    with trio.fail_after(10):
        if call == "score":
            await client.score(prompt, [(1, 3)])
        elif call == "share_prefix":
            other = [*prompt[:2], Tokens(PROMPT[3:9])]
            await client.score_many([(prompt, [(1, 3)]), (other, [(1, 3)])], share_prefix=True)
        else:
            await client.score_continuations(prompt[:2], [PROMPT[3:5]])
    [record] = [r for r in caplog.records if "known_expanded_len" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert "is 7 but the server gave it 4 positions" in record.getMessage()


async def test_share_prefix_gives_what_each_prompt_gets_alone_when_they_state_an_image_differently(
    server: ReferenceServer, client: poc_api.ApiClient
) -> None:
    # Prompts with the same image bytes but different known_expanded_len shared
    # their prefix, built from the first prompt's chunks: the stated length checked
    # was that prompt's. A range counted from another prompt's wrong length came
    # back as a plausible, wrong sum; a prompt with no wrong length was refused.
    png = make_png(56, 56)  # the server gives it 4 positions

    def prompt(said: int, tail: list[int]) -> list[poc_api.Chunk]:
        return [Tokens(PROMPT[:6]), Image(png, "image/png", said), Tokens(tail)]

    wrong = 7
    cases = [
        # the wrong length's prompt has a range after the image: refused either way
        [(prompt(0, [9, 10, 11]), [(0, 3)]), (prompt(wrong, [12, 13]), [(13, 15)])],
        # the wrong length's ranges lie before the image; the other's after it: a result
        [(prompt(wrong, [9, 10, 11]), [(0, 3)]), (prompt(0, [12, 13]), [(10, 12)])],
    ]
    with trio.fail_after(20):
        for prompts in cases:
            outcomes = []
            for share in (False, True):
                try:
                    outcomes.append(await client.score_many(prompts, share_prefix=share))
                except ValueError as exc:
                    outcomes.append(str(exc))
            assert outcomes[0] == outcomes[1], outcomes
        assert isinstance(outcomes[0], list)
    await wait_for(lambda: not server.state().session_ids)


@pytest.mark.parametrize("said", [3, 7], ids=["said_shorter", "said_longer"])
@pytest.mark.parametrize("call", ["score", "score_many", "share_prefix"])
async def test_a_range_past_an_image_the_server_gives_another_length_than_said_is_refused(
    server: ReferenceServer, client: poc_api.ApiClient, call: str, said: int
) -> None:
    # The caller counted the image as `said` positions; the server gives it 4. A
    # range after it, computed from that count, names other positions: said shorter,
    # its sum came back as a plausible, wrong logprob (a WARNING the only sign); said
    # longer, the error blamed the range. Ranges before the image stand (above).
    img = Image(make_png(56, 56), "image/png", said)  # the server gives it 4
    prompt: list[poc_api.Chunk] = [Tokens(PROMPT[:3]), img, Tokens(PROMPT[3:8])]
    after = (3 + said, 3 + said + 5)  # the text after the image, by the caller's count
    ranges = [(1, 3), after]
    # Into the image as far as both counts agree: the same positions either way.
    with trio.fail_after(10):
        await client.score(prompt, [(1, 3 + min(said, 4))])
    with trio.fail_after(10), pytest.raises(ValueError) as info:
        if call == "score":
            await client.score(prompt, ranges)
        elif call == "score_many":
            await client.score_many([(prompt, ranges)])
        else:
            other = [*prompt[:2], Tokens(PROMPT[3:9])]
            await client.score_many([(prompt, ranges), (other, [(1, 3)])], share_prefix=True)
    message = str(info.value)
    assert f"known_expanded_len={said}" in message and "4 positions" in message, message
    assert str(after) in message, message
    await wait_for(lambda: not server.state().session_ids)


async def test_a_prompt_that_ends_with_an_image_sends_no_empty_generate(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    # score() sent a last Generate with no tokens after the image: a round trip
    # for nothing (the shared-prefix path sent none).
    chunks: list[poc_api.Chunk] = [Tokens(PROMPT[:6]), Image(make_png(56, 28), "image/png")]
    before = server.state().rpc_counts.get("Generate", 0)
    [r] = await client.score(chunks, [(1, 8)])
    assert server.state().rpc_counts.get("Generate", 0) - before == 1
    both = await client.score_many([(chunks, [(1, 8)])] * 2, share_prefix=True)
    assert both == [[r], [r]]


async def test_a_prompt_of_many_images_sends_each_generate_only_its_own_ranges(
    client: poc_api.ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # score() sent every range with every Generate (one per text run between
    # images): ranges x images to check, encode and parse, a prompt of 1,000
    # images with a range after each took 26 s (250: 2.7 s), 1.6 s now.
    import poc_api._session

    sent: list[int] = []
    encode = poc_api._session.encode_generate_request

    def spy(**fields: Any) -> bytes:
        sent.append(len(fields["logprobs_ranges"]))
        return encode(**fields)

    monkeypatch.setattr(poc_api._session, "encode_generate_request", spy)
    png = make_png(8, 8)
    async with client.session() as s:
        n_image = (await s.append_image(png, "image/png")).placeholder_count
    n = 150
    chunks: list[poc_api.Chunk] = []
    ranges, pos = [], 0
    for _ in range(n):
        chunks += [Image(png, "image/png", known_expanded_len=n_image), Tokens(PROMPT[:4])]
        pos += n_image
        ranges.append((pos + 1, pos + 4))
        pos += 4
    sent.clear()
    got = await client.score(chunks, ranges)
    assert len(got) == n and len(set(got_r.logprob for got_r in got)) == 1
    assert len(sent) == n  # one Generate per text run
    assert sum(sent) <= 2 * n, f"{sum(sent)} ranges sent over {len(sent)} Generate calls"


class _CountingSpans(list[tuple[int, int]]):
    reads = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for span in super().__iter__():
            self.reads += 1
            yield span

    def __getitem__(self, i: Any) -> Any:
        self.reads += 1
        return super().__getitem__(i)


def test_text_positions_reads_each_image_span_a_few_times() -> None:
    # Every image span was looked at for every range: ranges x images.
    from poc_api._score import _text_positions

    n = 2000
    spans = _CountingSpans((10 * i, 10 * i + 6) for i in range(n))  # 6 image, then 4 text positions
    wire = [(10 * i + 5, 10 * i + 8) for i in range(n)]  # 1 image position, 2 text each
    assert _text_positions(wire, spans) == 2 * n
    assert _text_positions([(0, 10 * n)], spans) == 4 * n
    spans.reads = 0
    _text_positions(wire, spans)
    reads = spans.reads  # (a few per range and span; was every span for every range)
    assert reads <= 8 * n, reads
