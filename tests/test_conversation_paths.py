"""Paths of conversations and scoring that other files leave untested: a turn handed
the conversation at its deadline, a close under a waiting turn, a session gone
mid-rewind, images at offset 0 or of no position, continuations with images."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing
from helpers import make_png, wait_for
from misbehaving import DUMMY_BASE_URL, Reply, misbehaving_server

import poc_api
from poc_api import Image, SamplingParams, StreamDone, TokenOut, Tokens
from poc_api.server import ReferenceServer
from poc_api.testing import open_client, reference_server

EIGHT = SamplingParams(max_tokens=8)


async def run(conv, chunks, sampling=EIGHT, **kw):
    with trio.fail_after(20):
        async with conv.stream(chunks, sampling, **kw) as events:
            return [e async for e in events]


async def test_a_turn_waiting_while_the_conversation_closes_is_refused(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    # _Turn.__aenter__: the conversation closed while this turn waited for another's.
    async with client.conversation() as conv:
        got: list[BaseException] = []
        started = trio.Event()

        async def first() -> None:
            with contextlib.suppress(trio.ClosedResourceError):
                async with conv.stream([Tokens([1, 2])], SamplingParams(max_tokens=10**6)) as ev:
                    started.set()
                    async for _ in ev:
                        pass

        async def second() -> None:
            try:
                await run(conv, [Tokens([1, 2])])
            except BaseException as exc:
                got.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                await started.wait()
                nursery.start_soon(second)
                await trio.sleep(0.05)
                await conv.aclose()
        assert len(got) == 1 and isinstance(got[0], trio.ClosedResourceError), got
        assert conv.session is None
        assert not conv._lock.locked()
    await wait_for(lambda: server.state().session_ids == frozenset())


async def test_conversation_stream_aclose_mid_turn_drops_and_after_done_keeps(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    async with client.conversation() as conv:
        async with conv.stream([Tokens([1, 2, 3])], SamplingParams(max_tokens=50)) as ev:
            async for e in ev:
                if isinstance(e, TokenOut):
                    break
            await ev.aclose()
            await ev.aclose()  # idempotent
            with pytest.raises(trio.ClosedResourceError):
                await ev.__anext__()
        assert conv.session is None
        await run(conv, [Tokens([1, 2, 3])])
        sid = conv.session.session_id
        async with conv.stream(
            [Tokens([1, 2, 3]), Tokens([9])], SamplingParams(max_tokens=4)
        ) as ev:
            got = [e async for e in ev]
            await ev.aclose()
        assert isinstance(got[-1], StreamDone)
        assert conv.session is not None and conv.session.session_id == sid
        # Rewound to 3 (the decoded tokens differ from [9]), then [9] and what it decoded.
        assert conv.committed_len == 3 + 1 + sum(isinstance(e, TokenOut) for e in got)


async def test_a_body_error_with_a_malformed_event_buffered_leaves_as_the_body_error() -> None:
    async with misbehaving_server() as srv:
        async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, close_timeout=1.0) as c:
            async with c.session() as s:
                srv.plan("Generate", Reply("malformed", good_first=2))
                with trio.fail_after(5), pytest.raises(KeyError):
                    async with s.generate([1], sampling=SamplingParams(max_tokens=8)) as ev:
                        async for _ in ev:
                            await trio.sleep(0.1)  # the rest arrives meanwhile
                            raise KeyError("mine")
                assert s.lost


async def test_score_continuations_prompt_past_the_window_is_refused_before_sending() -> None:
    async with reference_server(max_context=64) as server, open_client(server) as client:
        before = server.state()
        with pytest.raises(poc_api.ContextOverflow, match="the prompt"):
            await client.score_continuations([Tokens(list(range(1, 80)))], [[1], [2]])
        after = server.state()
        assert after.tokens_appended == before.tokens_appended
        await wait_for(lambda: server.state().session_ids == frozenset())


@pytest.mark.parametrize(
    "cont",
    [
        [Image(make_png(28, 28), "image/png"), Tokens([5, 6])],
        [Tokens([5]), Image(make_png(28, 28), "image/png"), Tokens([6, 7])],
        [Tokens([5]), Image(make_png(28, 28), "image/png")],
    ],
)
async def test_score_continuations_with_images_match_scoring_the_whole_prompt(
    client: poc_api.ApiClient, cont: list[poc_api.Chunk]
) -> None:
    prompt = [Tokens([1, 2]), Image(make_png(28, 56), "image/png"), Tokens([3, 4])]
    other = [Tokens([8, 9, 10])]
    got = await client.score_continuations(prompt, [other, cont, other, cont])
    whole = [*prompt, *cont]
    # The prompt's length: score it with an empty range at the end.
    async with client.session() as s:
        n = 0
        for c in prompt:
            if isinstance(c, Tokens):
                await s.prefill(c.ids)
            else:
                await s.append_image(c.data, c.mime)
        n = s.committed_len
    assert got[1].start == n
    [full] = await client.score(whole, [(got[1].start, got[1].end)])
    assert got[1] == full
    assert got[3] == full
    [o] = await client.score([*prompt, *other], [(n, n + 3)])
    assert got[0] == o == got[2]


async def test_conversation_rewinds_to_zero_onto_an_image(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    a, b = Image(make_png(28, 28), "image/png"), Image(make_png(56, 28), "image/png")
    async with client.conversation() as conv:
        await run(conv, [a, Tokens([1, 2])])
        sid = conv.session.session_id
        events = await run(conv, [b, Tokens([1, 2])])
        assert conv.session.session_id == sid
        committed = conv.committed_len
        # And then a turn that extends it sends only the delta.
        before = server.state().tokens_appended
        await run(
            conv,
            [
                b,
                Tokens([1, 2]),
                Tokens([t.id for t in events if isinstance(t, TokenOut)]),
                Tokens([3]),
            ],
        )
        assert server.state().tokens_appended - before == 1
    async with client.conversation() as fresh:
        assert [e for e in await run(fresh, [b, Tokens([1, 2])]) if isinstance(e, TokenOut)] == [
            e for e in events if isinstance(e, TokenOut)
        ]
        assert fresh.committed_len == committed


async def test_score_many_shared_prefix_with_images_matches_unshared(
    client: poc_api.ApiClient,
) -> None:
    img, img2 = Image(make_png(28, 28), "image/png"), Image(make_png(56, 28), "image/png")
    base = [Tokens([1, 2, 3, 4, 5, 6]), img, Tokens([7, 8, 9, 10, 11, 12])]
    prompts = [
        ([*base, Tokens([13, 14])], [(0, 3), (5, 8)]),
        ([*base, img2, Tokens([15])], [(1, 2), (6, 16)]),
        ([*base], [(2, 6)]),
        ([*base, Tokens([13, 15])], [(0, 1)]),
    ]
    # Ranges within each prompt's real length.
    shared = await client.score_many(prompts, share_prefix=True)
    alone = await client.score_many(prompts, share_prefix=False)
    assert shared == alone


@pytest.mark.parametrize("where", ["AppendImage", "Generate"])
async def test_a_held_session_gone_mid_rewind_is_replaced_with_one_image_event(where: str) -> None:
    img, other = Image(make_png(8, 8), "image/png"), Image(make_png(8, 16), "image/png")
    async with misbehaving_server() as srv:
        async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, close_timeout=1.0) as c:
            async with c.conversation() as conv:
                await run(
                    conv, [Tokens([1, 2, 3, 4]), img, Tokens([5])], SamplingParams(max_tokens=2)
                )
                first = conv.session.session_id
                if where == "AppendImage":
                    srv.plan("AppendImage", Reply("trailers_only", status=5))
                    prompt = [Tokens([1, 2, 3, 4]), other, Tokens([6])]
                else:
                    srv.plan("Generate", Reply("trailers_only", status=5))
                    prompt = [Tokens([1, 2, 9])]
                events = await run(conv, prompt, SamplingParams(max_tokens=2))
                assert isinstance(events[-1], StreamDone)
                assert conv.session.session_id != first
                imgs = [e for e in events if isinstance(e, poc_api.ImageAppended)]
                assert len(imgs) == (1 if where == "AppendImage" else 0)
                assert first in srv.closed
                # The new session holds the whole prompt and the decoded tokens.
                assert conv.committed_len == events[-1].usage.total_tokens


async def test_an_image_of_zero_positions_does_not_make_every_turn_resend_everything() -> None:
    img = Image(make_png(8, 8), "image/png")
    async with misbehaving_server() as srv:
        async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, close_timeout=1.0) as c:
            async with c.conversation() as conv:
                # placeholder_count 0, total_length 4: the image at offset 4 took no position.
                srv.plan("AppendImage", Reply(raw=b"\x10\x04"))
                ev1 = await run(
                    conv, [Tokens([1, 2, 3, 4]), img, Tokens([5])], SamplingParams(max_tokens=2)
                )
                out = [e.id for e in ev1 if isinstance(e, TokenOut)]
                assert conv.committed_len == 7
                before = len(srv.calls)
                await run(
                    conv,
                    [Tokens([1, 2, 3, 4]), img, Tokens([5, *out, 6])],
                    SamplingParams(max_tokens=2),
                )
                made = [call.method for call in srv.calls[before:]]
                assert made == ["Generate"], made


async def test_score_continuations_takes_iterators_of_ids_and_of_chunks(
    client: poc_api.ApiClient,
) -> None:
    prompt = [Tokens([1, 2, 3])]
    want = await client.score_continuations(prompt, [[4, 5], [Tokens([6])], []])
    got = await client.score_continuations(
        prompt, [iter([4, 5]), (c for c in [Tokens([6])]), iter([])]
    )
    assert got == want
    np = pytest.importorskip("numpy")
    assert (
        await client.score_continuations(
            prompt, [np.array([4, 5]), [6], np.array([], dtype=np.int64)]
        )
        == want
    )


async def test_a_turn_that_stops_on_eos_keeps_its_session_and_sends_only_the_delta(
    eos_server: ReferenceServer,
) -> None:
    from poc_api.server import tokenize

    async with open_client(eos_server) as client, client.conversation() as conv:
        prompt = tokenize("Hello there")
        stops = 0
        for turn in range(30):
            events = await run(
                conv, [Tokens(prompt)], SamplingParams(max_tokens=64, temperature=1.0)
            )
            done = events[-1]
            assert isinstance(done, StreamDone)
            stops += done.finish_reason in ("eos", "stop")
            sid = conv.session.session_id
            out = [e.id for e in events if isinstance(e, TokenOut)]
            prompt = prompt + out + tokenize(f" more {turn}")
            before = eos_server.state().tokens_appended
            await run(conv, [Tokens(prompt)], SamplingParams(max_tokens=0))
            assert conv.session.session_id == sid
            assert eos_server.state().tokens_appended - before == len(tokenize(f" more {turn}"))
        assert stops, "no turn stopped on EOS"


async def test_a_turn_handed_the_conversation_as_its_time_ran_out_times_out_and_frees_it(
    mock_clock: trio.testing.MockClock,
) -> None:
    # _Turn._take_turn: the lock came to the turn, but only at its deadline: it
    # gives the conversation back (else the next turn waits for ever) and says so.
    async with misbehaving_server() as srv:
        async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, close_timeout=1.0) as c:
            async with c.conversation() as conv:
                got: list[BaseException] = []

                async def waiter() -> None:
                    try:
                        async with conv.stream([Tokens([1])], timeout=1.0):
                            pass  # pragma: no cover
                    except BaseException as exc:
                        got.append(exc)

                await conv._lock.acquire()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiter)
                    await trio.testing.wait_all_tasks_blocked()
                    conv._lock.release()  # handed to the waiter, which has not run yet
                    mock_clock.jump(2.0)
                [exc] = got
                assert isinstance(exc, poc_api.PocApiTimeout) and exc.retriable
                assert "another task holds" in str(exc) and "nothing was sent" in str(exc)
                assert not conv._lock.locked()
                assert srv.calls_to("OpenSession") == []
