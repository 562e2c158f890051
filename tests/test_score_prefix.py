"""Prefix sharing: ``score_continuations`` and ``score_many(share_prefix=True)``.

Every result is compared for exact equality with scoring each full prompt on its
own (``client.score``), and the reference server's counters show what was sent.
"""

from __future__ import annotations

import random
import tracemalloc

import pytest
import trio
from helpers import make_png, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from misbehaving import DUMMY_BASE_URL, Reply, misbehaving_server
from trio.testing import assert_checkpoints

import poc_api
from poc_api import ContextOverflow, Image, InvalidRequest, ScoreResult, Tokens
from poc_api._score import group_by_prefix
from poc_api.server import ReferenceServer, tokenize

TEXT = tokenize("It was the best of times, it was the worst of times, it was the age of wisdom")


async def separately(
    client: poc_api.ApiClient, prompt: list[poc_api.Chunk], conts: list[list[poc_api.Chunk]]
) -> list[ScoreResult]:
    """The reference: one ``score`` call per full prompt, over the continuation's positions."""
    [prompt_len] = [r.end for r in await client.score_continuations(prompt, [[]])]
    out = []
    for cont in conts:
        n = sum(len(c.ids) if isinstance(c, Tokens) else c.known_expanded_len for c in cont)
        if n == 0:
            out.append(ScoreResult(prompt_len, prompt_len, 0.0))
            continue
        [r] = await client.score([*prompt, *cont], [(prompt_len, prompt_len + n)])
        out.append(r)
    return out


async def test_results_equal_scoring_each_full_prompt(client: poc_api.ApiClient) -> None:
    prompt = TEXT[:30]
    conts = [TEXT[30:40], TEXT[5:6], [], TEXT[40:], [1, 2, 3]]
    with trio.fail_after(20):
        got = await client.score_continuations([Tokens(prompt)], conts)
        expect = await separately(client, [Tokens(prompt)], [[Tokens(c)] for c in conts])
    assert got == expect  # exact: same logprobs, summed by the same code
    assert [(r.start, r.end) for r in got] == [(30, 30 + len(c)) for c in conts]
    assert got[2] == ScoreResult(30, 30, 0.0)
    assert all(r.logprob < 0 for i, r in enumerate(got) if i != 2)


async def test_the_first_continuation_token_is_conditioned_on_the_prompt(
    client: poc_api.ApiClient,
) -> None:
    # One token: its logprob alone is P(token | prompt), as a full-prompt range gives.
    prompt = TEXT[:20]
    with trio.fail_after(10):
        [got] = await client.score_continuations([Tokens(prompt)], [[TEXT[20]]])
        [full] = await client.score([Tokens(TEXT[:21])], [(20, 21)])
        [alone] = await client.score([Tokens([TEXT[20]])], [(0, 1)])
    assert got == full
    assert alone.logprob == 0.0 != got.logprob  # no prefix: not what we got


async def test_images_in_the_prompt_and_in_continuations(client: poc_api.ApiClient) -> None:
    img, img2 = make_png(56, 28), make_png(28, 28, seed=3)  # 2 and 1 positions
    prompt: list[poc_api.Chunk] = [Tokens(TEXT[:6]), Image(img, "image/png"), Tokens(TEXT[6:12])]
    conts: list[list[poc_api.Chunk]] = [
        [Tokens(TEXT[12:20])],
        [Image(img2, "image/png"), Tokens(TEXT[20:25])],
        [Tokens(TEXT[12:14]), Image(img2, "image/png")],
        [Image(img2, "image/png")],
    ]
    with trio.fail_after(20):
        got = await client.score_continuations(prompt, conts)
        known = [Tokens(TEXT[:6]), Image(img, "image/png", 2), Tokens(TEXT[6:12])]
        sized = [
            [Image(c.data, c.mime, 1) if isinstance(c, Image) else c for c in cont]
            for cont in conts
        ]
        expect = await separately(client, known, sized)
    assert got == expect
    assert [(r.start, r.end) for r in got] == [(14, 22), (14, 20), (14, 17), (14, 15)]
    assert got[3].logprob == 0.0  # an image alone has no logprob


async def test_continuation_forms_token_ids_a_chunk_or_chunks(client: poc_api.ApiClient) -> None:
    prompt = [Tokens(TEXT[:10])]
    cont = TEXT[10:15]
    with trio.fail_after(10):
        got = await client.score_continuations(
            prompt, [cont, tuple(cont), Tokens(cont), [Tokens(cont[:2]), Tokens(cont[2:])]]
        )
    assert len(set(got)) == 1


async def test_server_counters_prompt_sent_once(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    """16 continuations of 20 tokens on a 2,000-token prompt: 2,000 + 320 positions."""
    prompt = (TEXT * 30)[:2000]
    conts = [(TEXT * 2)[i : i + 20] for i in range(16)]
    assert len(prompt) == 2000 and all(len(c) == 20 for c in conts)
    with trio.fail_after(30):
        before = server.state()
        got = await client.score_continuations([Tokens(prompt)], conts)
        after = server.state()
        assert after.tokens_appended - before.tokens_appended == 2000 + 16 * 20
        assert after.generate_calls - before.generate_calls == 1 + 16
        assert after.rpc_counts["OpenSession"] - before.rpc_counts["OpenSession"] == 1

        # The same through score_many(share_prefix=True), and without sharing.
        prompts = [([Tokens(prompt + c)], [(2000, 2020)]) for c in conts]
        before = server.state()
        shared = await client.score_many(prompts, share_prefix=True)
        middle = server.state()
        plain = await client.score_many(prompts)
        end = server.state()
    # Sorted by content the candidates share more than the prompt: still <= 2,320.
    assert middle.tokens_appended - before.tokens_appended <= 2000 + 16 * 20
    assert end.tokens_appended - middle.tokens_appended == 16 * 2020
    assert [r for [r] in shared] == [r for [r] in plain] == got
    await wait_for(lambda: not server.state().session_ids)


async def test_empty_continuations_need_no_session(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    before = server.state().rpc_counts.get("OpenSession", 0)
    with trio.fail_after(5):
        assert await client.score_continuations([Tokens(TEXT[:7])], []) == []
        got = await client.score_continuations([Tokens(TEXT[:7])], [[], ()])
    assert got == [ScoreResult(7, 7, 0.0)] * 2
    assert server.state().rpc_counts.get("OpenSession", 0) == before


@pytest.mark.parametrize(
    ("prompt", "conts", "exc"),
    [
        ([Tokens([1])], "ab", TypeError),
        ([Tokens([1])], [[1, 2]][0], TypeError),  # one continuation, not a list of them
        ([Tokens([1])], Tokens([1]), TypeError),
        ([Tokens([1])], [[1, Tokens([2])]], TypeError),
        ([Tokens([1])], [["a"]], TypeError),
        ([Tokens([1])], [b"ab"], TypeError),
        ([Tokens([1])], [[-1]], ValueError),
        ([Tokens([1])], [[2**32]], ValueError),
        (Tokens([1]), [[1]], TypeError),
        ([[1]], [[1]], TypeError),
    ],
)
async def test_arguments_are_checked_before_anything_is_sent(
    client: poc_api.ApiClient, server: ReferenceServer, prompt: object, conts: object, exc: type
) -> None:
    before = server.state().rpc_counts.get("OpenSession", 0)
    with pytest.raises(exc):
        await client.score_continuations(prompt, conts)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await client.score_continuations([Tokens([1])], [[2]], timeout=-1)
    assert server.state().rpc_counts.get("OpenSession", 0) == before


async def test_a_continuation_past_the_context_window_fails_before_the_prompt_is_sent(
    eos_server: ReferenceServer,
) -> None:
    window = 8192
    prompt = (TEXT * 200)[: window - 10]
    async with poc_api.ApiClient(eos_server.base_url, grpc_url=eos_server.grpc_url) as client:
        before = eos_server.state()
        with trio.fail_after(10), pytest.raises(ContextOverflow, match="continuation 1 "):
            await client.score_continuations([Tokens(prompt)], [TEXT[:10], TEXT[:11]])
        after = eos_server.state()
        assert after.tokens_appended == before.tokens_appended  # nothing appended
        opened = after.rpc_counts["OpenSession"] - before.rpc_counts.get("OpenSession", 0)
        assert opened == 1
        await wait_for(lambda: not eos_server.state().session_ids)

        # An image of unknown length: only the server can tell; the call still fails
        # as a whole, with the server's ContextOverflow, and the session is closed.
        img = Image(make_png(56, 56), "image/png")  # 4 positions
        with trio.fail_after(10), pytest.raises(ContextOverflow):
            await client.score_continuations(
                [Tokens(prompt[:-4])], [TEXT[:5], [Tokens(TEXT[:11]), img]]
            )
        await wait_for(lambda: not eos_server.state().session_ids)
        # Exactly at the window is fine.
        with trio.fail_after(10):
            [r] = await client.score_continuations([Tokens(prompt)], [TEXT[:10]])
        assert r.end == window


async def test_the_session_is_closed_after_error_and_cancellation(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    with trio.fail_after(10), pytest.raises(InvalidRequest):
        await client.score_continuations(
            [Tokens(TEXT[:5])], [TEXT[5:9], [Image(b"nope", "image/png")], TEXT[9:12]]
        )
    await wait_for(lambda: not server.state().session_ids)
    with trio.move_on_after(0.02):
        await client.score_continuations([Tokens(TEXT * 4000)], [TEXT[:5]] * 50)
    await wait_for(lambda: not server.state().session_ids)
    with pytest.raises(poc_api.PocApiTimeout):
        await client.score_continuations([Tokens(TEXT * 4000)], [TEXT[:5]] * 50, timeout=0.01)
    await wait_for(lambda: not server.state().session_ids)


async def test_score_many_share_prefix_keeps_input_order_and_results(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    img = make_png(56, 28)
    a, b = TEXT[:25], TEXT[30:60]
    prompts: list[tuple[list[poc_api.Chunk], list[tuple[int, int]]]] = [
        ([Tokens(a + TEXT[:8])], [(25, 33), (1, 30)]),  # a range reaching into the prefix
        ([Tokens(b + TEXT[:5])], [(30, 35)]),
        ([Tokens(a)], []),  # no ranges: nothing sent
        ([Tokens(a + TEXT[9:20])], [(20, 36), (3, 4)]),
        ([Tokens(b[:3]), Image(img, "image/png"), Tokens(b[3:])], [(1, 10), (2, 32)]),
        ([Tokens(b[:3]), Image(img, "image/png"), Tokens(b[3:] + TEXT[:4])], [(4, 36)]),
        ([Tokens(a)], [(1, 25)]),  # the whole prompt is the shared prefix
        ([Tokens(TEXT[70:75])], [(0, 5)]),  # alone in its group
    ]
    with trio.fail_after(20):
        shared = await client.score_many(prompts, share_prefix=True, max_concurrency=2)
        plain = await client.score_many(prompts)
    assert shared == plain
    assert shared[2] == []
    await wait_for(lambda: not server.state().session_ids)


async def test_score_many_share_prefix_errors(client: poc_api.ApiClient) -> None:
    bad = [([Tokens([*TEXT[:20], 1])], [(1, 21)]), ([Tokens(TEXT[:20])], [(5, 99)])]
    with pytest.raises(ValueError, match="outside"):
        await client.score_many(bad, share_prefix=True)
    with pytest.raises(TypeError):
        await client.score_many(bad, share_prefix=1)  # type: ignore[arg-type]
    unknown = [([Tokens(TEXT[:9]), Image(make_png(28, 28), "image/png")], [(1, 50)])] * 2
    with trio.fail_after(10), pytest.raises(ValueError, match="outside"):
        await client.score_many(unknown, share_prefix=True)


async def test_a_logprob_the_server_left_out_after_a_rewind_is_a_protocol_violation() -> None:
    # Position 11 lies in the continuation, sent after a rewind to the prefix's end:
    # its own count check, not the plain score's, has to notice it is missing.
    prefix = list(range(10, 20))
    async with (
        misbehaving_server(Reply(skip_logprobs=(11,))) as srv,
        poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, close_timeout=1.0) as client,
    ):
        with trio.fail_after(10):
            with pytest.raises(poc_api.ProtocolViolation, match="expected logprobs for 3 pos"):
                await client.score_continuations([Tokens(prefix)], [[1, 2, 3]])
            prompts = [([Tokens([*prefix, *cont])], [(10, 13)]) for cont in ([1, 2, 3], [4, 5, 6])]
            assert len(group_by_prefix([chunks for chunks, _ in prompts])) == 1
            with pytest.raises(poc_api.ProtocolViolation, match="expected logprobs for 3 pos"):
                await client.score_many(prompts, share_prefix=True)
            srv.default = Reply()  # every logprob: -1.0 each
            assert await client.score_continuations([Tokens(prefix)], [[1, 2, 3]]) == [
                ScoreResult(10, 13, -3.0)
            ]
            assert (
                await client.score_many(prompts, share_prefix=True)
                == [[ScoreResult(10, 13, -3.0)]] * 2
            )


def test_grouping_puts_shared_prefixes_together() -> None:
    p = list(range(100))
    prompts = [[Tokens([*p, 1, 2])], [Tokens([7] * 50)], [Tokens([*p, 3])], [Tokens([7] * 49)]]
    prompts.append([Tokens(p[:1] + [9] * 60)])  # shares one token only: alone
    groups = sorted(group_by_prefix(prompts))
    assert groups == [([0, 2], 100), ([1, 3], 49), ([4], 61)]


def _bos_pairs(n: int, tail: int) -> list[list[poc_api.Chunk]]:
    """For each k: a short ``[BOS, a_k]`` query and the same two tokens plus a long tail."""
    out: list[list[poc_api.Chunk]] = []
    for k in range(n):
        out.append([Tokens([256, 65 + k])])
        out.append([Tokens([256, 65 + k] + [97 + (k * 7 + i) % 26 for i in range(tail)])])
    return out


def test_short_prompts_do_not_chain_unrelated_prompts_into_one_group() -> None:
    # Each neighbour in sorted order shares at least half of the shorter of the
    # two, but the group's prefix fell to the BOS token alone: 32 prompts ran
    # one after another in one session.
    groups = sorted(group_by_prefix(_bos_pairs(16, 200)))
    assert groups == [([2 * k, 2 * k + 1], 2) for k in range(16)]


_unit_prompts = st.lists(
    st.lists(st.sampled_from([0, 1, 2]), max_size=8).map(lambda ids: [Tokens([7, *ids])]),
    max_size=12,
)


@settings(max_examples=200)
@given(_unit_prompts)
def test_every_group_shares_more_than_half_of_any_two_members(
    prompts: list[list[poc_api.Chunk]],
) -> None:
    ids = [list(p[0].ids) for p in prompts]  # type: ignore[union-attr]
    groups = group_by_prefix(prompts)
    assert sorted(i for members, _ in groups for i in members) == list(range(len(prompts)))
    for members, shared in groups:
        rows = [ids[i] for i in members]
        # ``shared`` is exactly what every member starts with ...
        assert all(r[:shared] == rows[0][:shared] for r in rows)
        assert shared == len(rows[0]) or any(
            len(r) == shared or r[shared] != rows[0][shared] for r in rows
        )
        # ... and is worth sharing: more than half of the shorter of any two members.
        if len(rows) > 1:
            second_longest = sorted(len(r) for r in rows)[-2]
            assert 2 * shared > second_longest


async def test_score_many_share_prefix_runs_unrelated_groups_in_their_own_sessions(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    prompts = [(p, [(1, 2)] if len(p[0]) == 2 else [(1, 40)]) for p in _bos_pairs(8, 40)]  # type: ignore[arg-type]
    before = server.state().rpc_counts.get("OpenSession", 0)
    with trio.fail_after(20):
        shared = await client.score_many(prompts, share_prefix=True)
    assert server.state().rpc_counts.get("OpenSession", 0) - before == 8  # one per pair
    assert shared == await client.score_many(prompts)


# A prompt of up to 3 text runs and images, and up to 5 continuations of up to 3 parts.
_IMGS = [make_png(28, 28, seed=1), make_png(56, 28, seed=2)]
_text = st.lists(st.sampled_from(TEXT), min_size=1, max_size=30)
_part = st.one_of(
    _text.map(Tokens),
    st.sampled_from(range(len(_IMGS))).map(lambda i: Image(_IMGS[i], "image/png")),
)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.slow
@given(
    prompt=st.lists(_part, max_size=3),
    conts=st.lists(st.lists(_part, max_size=3), max_size=5),
)
async def test_property_same_sums_as_scoring_each_full_prompt(
    server: ReferenceServer,
    prompt: list[poc_api.Chunk],
    conts: list[list[poc_api.Chunk]],
) -> None:
    # A client per example: pytest-trio closes async fixtures after the first one.
    with trio.fail_after(30):
        async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
            expect = await _separately_by_server_lengths(client, prompt, conts)
            got = await client.score_continuations(prompt, conts)
    assert got == expect


async def _separately_by_server_lengths(
    client: poc_api.ApiClient, prompt: list[poc_api.Chunk], conts: list[list[poc_api.Chunk]]
) -> list[ScoreResult]:
    """One ``score`` per full prompt; lengths (images included) from the server itself."""
    [prompt_len] = [r.end for r in await client.score_continuations(prompt, [[]])]
    expect = []
    for cont in conts:
        [whole] = await client.score_continuations([*prompt, *cont], [[]])
        if whole.end == prompt_len:
            expect.append(ScoreResult(prompt_len, prompt_len, 0.0))
        else:
            [r] = await client.score([*prompt, *cont], [(prompt_len, whole.end)])
            expect.append(r)
    return expect


async def test_calls_that_send_nothing_are_still_checkpoints(client: poc_api.ApiClient) -> None:
    with assert_checkpoints():
        await client.score_continuations([Tokens([1, 2])], [])
    with assert_checkpoints():
        await client.score_continuations([Tokens([1, 2])], [[]])
    with assert_checkpoints():
        await client.score([Tokens([1, 2])], [])
    for share in (False, True):
        with assert_checkpoints():
            await client.score_many([([Tokens([1])], [])], share_prefix=share)
        with assert_checkpoints():
            await client.score_many([], share_prefix=share)


async def test_a_long_continuation(client: poc_api.ApiClient) -> None:
    long = (TEXT * 300)[:20_000]
    with trio.fail_after(30):
        got = await client.score_continuations([Tokens(TEXT[:10])], [long, TEXT[:3]])
        [full] = await client.score([Tokens(TEXT[:10] + long)], [(10, 20_010)])
    assert got[0] == full


@pytest.mark.parametrize(
    ("bad", "error", "says"),
    [
        ([1, -1], ValueError, r"^continuation 2: ids\[1\] must be in \[0, 2\*\*32\)"),
        ([1, "x"], TypeError, r"^continuation 2: ids\[1\] must be an int"),
    ],
)
async def test_a_bad_continuation_id_names_its_continuation(
    client: poc_api.ApiClient, bad: list[object], error: type[Exception], says: str
) -> None:
    # "ids[0] must be in [0, 2**32)": of which of the continuations, it did not say.
    with pytest.raises(error, match=says):
        await client.score_continuations([Tokens([5, 6])], [[1, 2], [3], bad])  # type: ignore[list-item]


def test_grouping_long_prompts_takes_a_pointer_per_token_not_a_tuple() -> None:
    # Each token became a (0, id) tuple to sort on: 64 bytes a token, and about a
    # second of the trio thread (no checkpoint) for 1,000 prompts of 2,000 tokens.
    rng = random.Random(0)
    shared = [rng.randrange(1000, 50000) for _ in range(1500)]
    prompts = [
        [Tokens(shared + [rng.randrange(1000, 50000) for _ in range(500)])] for _ in range(200)
    ]
    tracemalloc.start()
    try:
        groups = group_by_prefix(prompts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert groups == [(list(range(200)), 1500)]
    assert peak < 8 * 400_000 * 2  # 400,000 tokens: a list slot each (was 25.6 MB)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.slow
@given(
    prefix=st.lists(_part, max_size=3),
    rests=st.lists(st.lists(_part, max_size=2), min_size=1, max_size=4),
    cuts=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=4),
)
async def test_property_share_prefix_ranges_equal_scoring_each_prompt(
    server: ReferenceServer,
    prefix: list[poc_api.Chunk],
    rests: list[list[poc_api.Chunk]],
    cuts: list[tuple[float, float]],
) -> None:
    with trio.fail_after(30):
        async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
            prompts = []
            for rest in rests:
                chunks = [*prefix, *rest]
                [whole] = await client.score_continuations(chunks, [[]])
                n = whole.end
                ranges = [
                    (min(round(a * n), round(b * n)), max(round(a * n), round(b * n)))
                    for a, b in cuts
                ]
                prompts.append((chunks, ranges))
            expect = [await client.score(c, r) for c, r in prompts]
            plain = await client.score_many(prompts)
            shared = await client.score_many(prompts, share_prefix=True)
    assert plain == expect
    assert shared == expect
