"""Conversations: delta sending, divergence, images, readouts, failure recovery."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

import pytest
import trio
import trio.lowlevel
from helpers import block_the_run, make_png, opened_models, wait_for
from misbehaving import DUMMY_BASE_URL, Reply, misbehaving_server

import poc_api
from poc_api import (
    Chunk,
    Image,
    ImageAppended,
    PocApiTimeout,
    SamplingParams,
    SessionDivergence,
    StreamDone,
    TokenOut,
    Tokens,
)
from poc_api.server import ReferenceServer, ServerConfig, tokenize
from poc_api.testing import open_client, reference_server

GREEDY8 = SamplingParams(max_tokens=8)


async def run(
    conv: poc_api.Conversation,
    chunks: list[poc_api.Chunk],
    sampling: SamplingParams = GREEDY8,
    **kw: object,
) -> list[poc_api.StreamEvent]:
    with trio.fail_after(20):
        async with conv.stream(chunks, sampling, **kw) as events:  # type: ignore[arg-type]
            return [e async for e in events]


def decoded(events: list[poc_api.StreamEvent]) -> list[int]:
    return [e.id for e in events if isinstance(e, TokenOut)]


async def test_twenty_turns_send_only_deltas_and_match_a_fresh_session(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    prompt: list[int] = tokenize("Once upon a time")
    async with client.conversation() as conv:
        for turn in range(20):
            user = tokenize(f" and then {turn}")
            prompt = prompt + user
            before = server.state().tokens_appended
            sid_before = conv.session.session_id if conv.session else None
            events = await run(conv, [Tokens(prompt)])
            sent = server.state().tokens_appended - before
            reply = decoded(events)
            if turn == 0:
                assert sent == len(prompt)
            else:
                assert sent == len(user), f"turn {turn} resent the prompt"
                assert conv.session is not None and conv.session.session_id == sid_before
            # Same output as a fresh session given the whole prompt at once.
            async with client.session() as s:
                async with s.generate(prompt, sampling=GREEDY8) as ev:
                    fresh = [e.id async for e in ev if isinstance(e, poc_api.Token)]
            assert reply == fresh
            done = events[-1]
            assert isinstance(done, StreamDone) and done.usage is not None
            assert done.usage.total_tokens == conv.committed_len == len(prompt) + 8
            prompt = prompt + reply


async def test_images_interleaved_with_text_flush_before_each_image(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    a, b = make_png(56, 28), make_png(28, 84, seed=1)
    chunks: list[poc_api.Chunk] = [
        Tokens([1, 2, 3]),
        Image(a, "image/png"),
        Tokens([4]),
        Tokens([5]),
        Image(b, "image/png"),
        Tokens([6, 7]),
    ]
    before = server.state()
    async with client.conversation() as conv:
        events = await run(conv, chunks)
        assert events[:2] == [ImageAppended(2), ImageAppended(3)]
        assert all(isinstance(e, TokenOut) for e in events[2:-1])
        assert conv.committed_len == 3 + 2 + 2 + 3 + 2 + 8
        after = server.state()
        # Two prefill flushes + the final Generate; two image appends.
        assert after.rpc_counts.get("AppendImage", 0) - before.rpc_counts.get("AppendImage", 0) == 2
        assert after.generate_calls - before.generate_calls == 3
        # Next turn: the same images (lengths still unknown to the caller) are not resent.
        reply = Tokens(decoded(events))
        events2 = await run(conv, [*chunks, reply, Tokens([9])])
        assert not any(isinstance(e, ImageAppended) for e in events2)
        assert server.state().rpc_counts["AppendImage"] == after.rpc_counts["AppendImage"]


async def test_every_generate_of_a_turn_carries_its_priority(
    client: poc_api.ApiClient, server: ReferenceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The prefill before each image (and a rewind) went at priority 0: on a busy
    # server a high-priority turn with images waited behind everyone's decode.
    from poc_api.server import _grpc

    priorities: list[int] = []
    init = _grpc._Generation.__init__

    def record(self: object, rt: object, stream: object, session: object, req: Any) -> None:
        priorities.append(req.priority)  # (the server's thread)
        init(self, rt, stream, session, req)  # type: ignore[arg-type]

    monkeypatch.setattr(_grpc._Generation, "__init__", record)
    chunks: list[poc_api.Chunk] = [
        Tokens([1, 2]),
        Image(make_png(28, 28), "image/png"),
        Tokens([3]),
    ]
    async with client.conversation() as conv:
        await run(conv, chunks, priority=7)
        await run(conv, [*chunks, Tokens([4]), Image(make_png(28, 56), "image/png")], priority=-2)
    # A flush and the final Generate each (the second turn's rewind rides on its flush).
    assert priorities == [7, 7, -2, -2], priorities


async def test_an_image_of_unknown_length_is_never_resent_in_later_turns(
    client: poc_api.ApiClient, server: ReferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The documented usage: the same chunks every turn, the image's length never
    # tracked by the caller. Every other turn used to rewind to before the image
    # (its length 0 in the recorded history) and append it again.
    caplog.set_level(logging.INFO, logger="poc_api")
    chunks: list[poc_api.Chunk] = [Tokens([1, 2, 3]), Image(make_png(56, 56), "image/png")]
    chunks.append(Tokens([4, 5]))
    async with client.conversation() as conv:
        chunks.append(Tokens(decoded(await run(conv, chunks))))
        for turn in range(2, 6):
            before = server.state()
            events = await run(conv, [*chunks, Tokens([6])])
            after = server.state()
            appends = after.rpc_counts.get("AppendImage", 0) - before.rpc_counts.get(
                "AppendImage", 0
            )
            assert appends == 0, f"turn {turn}"
            assert after.tokens_appended - before.tokens_appended == 1, f"turn {turn}"
            chunks += [Tokens([6]), Tokens(decoded(events))]
    assert "rewinding" not in caplog.text


@pytest.mark.parametrize("claimed", [3, 5])
async def test_a_wrong_known_expanded_len_gives_way_to_the_servers_count(
    client: poc_api.ApiClient,
    server: ReferenceServer,
    caplog: pytest.LogCaptureFixture,
    claimed: int,
) -> None:
    # The server gives this image 4 positions; the caller says otherwise. The
    # conversation used to keep the caller's number, and the next turn cut its
    # delta at the wrong place: a token sent twice or dropped, no error.
    png = make_png(56, 56)
    chunks: list[poc_api.Chunk] = [Tokens([72, 101, 108]), Image(png, "image/png", claimed)]
    chunks.append(Tokens([108, 111]))
    async with client.conversation() as conv:
        first = await run(conv, chunks)
        assert first[0] == ImageAppended(4)
        assert "known_expanded_len" in caplog.text  # the warning names the mismatch
        chunks += [Tokens(decoded(first)), Tokens([32, 119])]
        before = server.state()
        second = [(e.id, e.position) for e in await run(conv, chunks) if isinstance(e, TokenOut)]
        after = server.state()
        assert after.tokens_appended - before.tokens_appended == 2  # just the delta
        assert after.rpc_counts["AppendImage"] == before.rpc_counts["AppendImage"]
        committed = conv.committed_len
    # A fresh session given the whole prompt: same tokens at the same positions.
    async with client.session() as s:
        await s.prefill([72, 101, 108])
        await s.append_image(png, "image/png")
        rest = [108, 111, *decoded(first), 32, 119]
        async with s.generate(rest, sampling=GREEDY8) as ev:
            fresh = [(e.id, e.position) async for e in ev if isinstance(e, poc_api.Token)]
        assert second == fresh
        assert committed == s.committed_len


async def test_readouts_are_reshaped_to_layers_by_concepts(client: poc_api.ApiClient) -> None:
    manifest = await client.readout_manifest()
    assert manifest is not None
    async with client.conversation() as conv:
        events = await run(conv, [Tokens(tokenize("Hi"))], readout_shape=manifest.shape)
    tokens = [e for e in events if isinstance(e, TokenOut)]
    assert len(tokens) == 8
    for t in tokens:
        assert t.readout is not None
        assert t.readout.shape == manifest.shape
        assert t.readout.format == "f"
        rows = t.readout.tolist()
        assert len(rows) == manifest.shape[0] and len(rows[0]) == manifest.shape[1]


async def test_readout_of_the_wrong_shape_is_dropped_with_a_warning(
    client: poc_api.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="poc_api")
    for turn in range(2):
        caplog.clear()
        async with client.conversation() as conv:
            events = await run(conv, [Tokens(tokenize("Hi"))], readout_shape=(5, 5))
        tokens = [e for e in events if isinstance(e, TokenOut)]
        assert tokens and all(t.readout is None for t in tokens)
        # Once per stream, with a count at its end: every stream says so (the
        # warning was once per process, and a second stream dropped all silently).
        mismatches = [r for r in caplog.records if "readout shape mismatch" in r.message]
        assert len(mismatches) == 1, turn
        assert "expected 5*5=25, got 24" in mismatches[0].message
        assert f"{len(tokens)} readouts of this stream were dropped" in caplog.text


async def test_a_stale_readout_shape_on_every_turn_warns_once_naming_session_and_server(
    client: poc_api.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    # An agent service that kept a shape its server no longer has (restarted with
    # other concepts) passes it to every turn. Each stream dropped its readouts
    # with two WARNINGs that named neither the session nor the server: 20 turns,
    # 40 warnings, none saying where. One a minute per endpoint says so at
    # WARNING, naming both; the rest go to DEBUG (still one per stream).
    caplog.set_level(logging.DEBUG, logger="poc_api")
    sessions = []
    for _ in range(20):
        async with client.conversation() as conv:
            events = await run(conv, [Tokens(tokenize("Hi"))], readout_shape=(5, 5))
            assert conv.session is not None
            sessions.append(conv.session.session_id)
        assert all(e.readout is None for e in events if isinstance(e, TokenOut))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 2, warned
    assert sessions[0] in warned[0] and client.grpc_url in warned[0]
    assert "expected 5*5=25, got 24; dropped" in warned[0]
    assert sessions[0] in warned[1] and "8 readouts of this stream were dropped" in warned[1]
    told = [r.getMessage() for r in caplog.records if "readout shape mismatch" in r.getMessage()]
    assert len(told) == 20  # every stream still says so, at DEBUG after the first
    assert all(sid in m for sid, m in zip(sessions, told, strict=True))


async def test_without_readout_shape_no_readouts_are_requested(
    client: poc_api.ApiClient,
) -> None:
    async with client.conversation() as conv:
        events = await run(conv, [Tokens([1, 2])])
    assert all(e.readout is None for e in events if isinstance(e, TokenOut))


async def test_divergent_prompt_rewinds_to_the_shared_prefix_and_logs_it(
    client: poc_api.ApiClient, server: ReferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poc_api")
    p1 = tokenize("The cat sat on the mat")
    p2 = tokenize("The cat ran")
    async with client.conversation() as conv:
        await run(conv, [Tokens(p1)])
        sid = conv.session.session_id if conv.session else ""
        before = server.state().tokens_appended
        events = await run(conv, [Tokens(p2)])
        shared = len(tokenize("The cat "))
        assert server.state().tokens_appended - before == len(p2) - shared
        assert conv.session is not None and conv.session.session_id == sid
        assert conv.committed_len == len(p2) + 8
    assert "rewinding" in caplog.text
    async with client.session() as s:
        async with s.generate(p2, sampling=GREEDY8) as ev:
            fresh = [e.id async for e in ev if isinstance(e, poc_api.Token)]
    assert decoded(events) == fresh


@pytest.mark.parametrize(
    ("second", "calls"),
    [
        # (the first turn: [1, 2, 3, 4], an image, [5]; 8 tokens decoded)
        ([Tokens([1, 2, 9])], {"Generate": 1}),  # diverges in the text
        ([Tokens([1, 2, 3, 4])], {"Generate": 1}),  # a strict prefix
        ([Tokens([1, 2, 3, 4]), "image", Tokens([6])], {"Generate": 1}),  # after the image
        # Diverges at the image (another one): the rewind rides on the AppendImage.
        ([Tokens([1, 2, 3, 4]), "other", Tokens([6])], {"AppendImage": 1, "Generate": 1}),
        # Before the image: on the prefill that flushes the text before it.
        ([Tokens([1, 2, 7]), "image", Tokens([6])], {"AppendImage": 1, "Generate": 2}),
    ],
)
async def test_a_divergent_turn_rewinds_in_its_first_call_not_a_call_of_its_own(
    client: poc_api.ApiClient,
    server: ReferenceServer,
    second: list[poc_api.Chunk | str],
    calls: dict[str, int],
) -> None:
    # The rewind was a Generate of its own before the turn's first call: one
    # round trip more per divergent turn. Its outcome is the fresh session's.
    image, other = Image(make_png(28, 28), "image/png"), Image(make_png(28, 56), "image/png")
    named = {"image": image, "other": other}
    prompt = [named[c] if isinstance(c, str) else c for c in second]
    async with client.conversation() as conv:
        await run(conv, [Tokens([1, 2, 3, 4]), image, Tokens([5])])
        before = server.state().rpc_counts
        events = await run(conv, prompt)
        after = server.state().rpc_counts
        made = {m: after.get(m, 0) - before.get(m, 0) for m in after}
        assert {m: n for m, n in made.items() if n} == calls
        committed = conv.committed_len
    async with client.conversation() as fresh:
        assert decoded(await run(fresh, prompt)) == decoded(events)
        assert fresh.committed_len == committed


async def test_a_prompt_that_is_a_strict_prefix_rewinds_too(client: poc_api.ApiClient) -> None:
    async with client.conversation() as conv:
        first = await run(conv, [Tokens([1, 2, 3, 4])])
        again = await run(conv, [Tokens([1, 2, 3, 4])])
        assert decoded(first) == decoded(again)


@pytest.mark.parametrize(
    ("second", "reason"),
    [
        ([Image(make_png(28, 28), "image/png"), Tokens([1] * 20)], "unknown_length"),
        ([Tokens([1, 2])], "short"),
        ([Tokens([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])], "straddle"),
        ([Tokens([9, 9, 9, 9]), Tokens([0] * 8), Tokens([1])], "content"),
    ],
)
async def test_without_rewind_each_divergence_raises_with_numbers_before_sending(
    client: poc_api.ApiClient,
    server: ReferenceServer,
    second: list[poc_api.Chunk],
    reason: str,
) -> None:
    async with client.conversation(rewind=False) as conv:
        events = await run(conv, [Tokens([1, 2, 3, 4])])
        assert conv.committed_len == 12
        if reason == "content":
            second = [second[0], Tokens(decoded(events)), second[2]]
        before = server.state().generate_calls
        with pytest.raises(SessionDivergence) as info:
            await run(conv, second)
        assert info.value.reason == reason
        assert info.value.committed_len == 12
        assert server.state().generate_calls == before
        # The slot was emptied; the next stream starts over with a new session.
        assert conv.session is None
        events = await run(conv, [Tokens([1, 2])])
        assert conv.committed_len == 2 + 8


async def test_without_rewind_an_empty_token_run_in_the_sent_part_is_no_divergence(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    # Tokens([]) takes 0 positions, a known length: the walk took it for an
    # unknown one and the second turn, a pure extension, raised SessionDivergence.
    async with client.conversation(rewind=False) as conv:
        first = [Tokens([1, 2]), Tokens([]), Tokens([3])]
        events = await run(conv, first)
        before = server.state().tokens_appended
        await run(conv, [*first, Tokens(decoded(events)), Tokens([4])])
        assert server.state().tokens_appended - before == 1


async def test_error_closes_the_session_and_the_next_stream_resends_everything(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    async with client.conversation() as conv:
        await run(conv, [Tokens([1, 2, 3])])
        assert conv.session is not None
        sid = conv.session.session_id
        with pytest.raises(poc_api.InvalidRequest):
            await run(conv, [Tokens([1, 2, 3]), Image(b"garbage", "image/png")])
        assert conv.session is None
        assert sid not in server.state().session_ids
        before = server.state().tokens_appended
        await run(conv, [Tokens([1, 2, 3, 4])])
        assert server.state().tokens_appended - before == 4


async def test_cancelled_stream_empties_the_slot(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    async with client.conversation() as conv:
        with trio.move_on_after(0.2):
            async with conv.stream([Tokens([1, 2])], SamplingParams(max_tokens=10**6)) as ev:
                async for _ in ev:
                    pass
        assert conv.session is None
        assert conv.committed_len == 0
        await run(conv, [Tokens([1, 2])])
        assert conv.committed_len == 10


async def test_breaking_out_early_loses_the_session(client: poc_api.ApiClient) -> None:
    async with client.conversation() as conv:
        async with conv.stream([Tokens([1, 2])], SamplingParams(max_tokens=100)) as ev:
            async for _ in ev:
                break
        assert conv.session is None


async def test_a_turn_that_decodes_nothing_left_unread_keeps_its_session(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    # stream()'s docstring said that leaving the block before StreamDone was read
    # closes the session. A turn with nothing to decode (max_tokens=0, a prefill
    # turn) has its Done in hand once the block is entered: the turn is complete
    # on both sides, and its session is kept, read or not (as the docstring now says).
    async with client.conversation() as conv:
        async with conv.stream([Tokens([1, 2, 3])], SamplingParams(max_tokens=0)):
            pass  # StreamDone never read
        session = conv.session
        assert session is not None and conv.committed_len == 3
        before = server.state().tokens_appended
        async with conv.stream([Tokens([1, 2, 3, 4])], SamplingParams(max_tokens=0)) as ev:
            assert [type(e) for e in [e async for e in ev]] == [StreamDone]
        assert conv.session is session
        assert server.state().tokens_appended - before == 1  # only the delta was sent


class _AfterTheTurn(Exception):
    pass


@pytest.mark.parametrize("how", ["raise", "cancel"])
async def test_a_body_that_raises_after_stream_done_keeps_the_session(
    client: poc_api.ApiClient, server: ReferenceServer, how: str
) -> None:
    # The turn is complete on both sides once StreamDone is seen: the session was
    # dropped all the same, and the next turn sent the whole prompt again
    # (Session.generate keeps its session in the same case).
    async with client.conversation() as conv:
        events: list[poc_api.StreamEvent] = []
        with trio.CancelScope() as scope:
            try:
                async with conv.stream([Tokens([1, 2, 3])], GREEDY8) as ev:
                    async for e in ev:
                        events.append(e)
                    if how == "cancel":
                        scope.cancel()
                        await trio.lowlevel.checkpoint()
                    raise _AfterTheTurn
            except _AfterTheTurn:
                pass
        assert isinstance(events[-1], StreamDone)
        assert conv.session is not None and conv.committed_len == 3 + 8
        before = server.state().tokens_appended
        await run(conv, [Tokens([1, 2, 3, *decoded(events), 4])])
        assert server.state().tokens_appended - before == 1  # the delta alone


async def test_a_body_that_raises_before_stream_done_drops_the_session(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    # Every token read, the end not seen: a failed turn (as before).
    async with client.conversation() as conv:
        with pytest.raises(_AfterTheTurn):
            async with conv.stream([Tokens([1, 2, 3])], GREEDY8) as ev:
                tokens = 0
                async for e in ev:
                    assert isinstance(e, TokenOut)
                    tokens += 1
                    if tokens == 8:  # the last one: StreamDone comes next
                        raise _AfterTheTurn
        assert conv.session is None


async def test_concurrent_streams_on_one_conversation_are_serialised(
    client: poc_api.ApiClient,
) -> None:
    log: list[tuple[int, str]] = []
    async with client.conversation() as conv:

        async def turn(i: int) -> None:
            async with conv.stream([Tokens([1, 2, 3])], GREEDY8) as ev:
                log.append((i, "start"))
                async for _ in ev:
                    await trio.lowlevel.checkpoint()
                log.append((i, "end"))

        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                for i in range(4):
                    n.start_soon(turn, i)
    # Each stream's start is followed by its own end: no interleaving.
    for k in range(0, len(log), 2):
        assert log[k][0] == log[k + 1][0] and log[k][1] == "start"


async def test_conversation_exit_closes_its_session(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    async with client.conversation() as conv:
        await run(conv, [Tokens([1])])
        assert conv.session is not None
        sid = conv.session.session_id
        assert sid in server.state().session_ids
    assert sid not in server.state().session_ids


async def test_stream_arguments_are_checked_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    before = server.state().rpc_counts.get("OpenSession", 0)
    async with client.conversation() as conv:
        with pytest.raises(TypeError):
            await run(conv, Tokens([1]))  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await run(conv, [[1, 2]])  # type: ignore[list-item]
        with pytest.raises(ValueError):
            await run(conv, [Tokens([1])], readout_shape=(0, 3))
        with pytest.raises(ValueError, match="int32"):
            await run(conv, [Tokens([1])], priority=2**40)
        # The same errors as Session.generate: a wrong type is a TypeError.
        with pytest.raises(TypeError, match="priority must be an int"):
            await run(conv, [Tokens([1])], priority="high")  # type: ignore[arg-type]
    assert server.state().rpc_counts.get("OpenSession", 0) == before


async def test_evicted_session_is_reopened_and_the_prompt_resent_transparently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="poc_api")
    async with ReferenceServer(ServerConfig(idle_timeout=0.2)) as srv:
        async with poc_api.ApiClient(srv.base_url, grpc_url=srv.grpc_url) as c:
            async with c.conversation() as conv:
                first = await run(conv, [Tokens([1, 2, 3])])
                assert conv.session is not None
                old = conv.session.session_id
                with trio.fail_after(5):
                    while old in srv.state().session_ids:  # noqa: ASYNC110 - server thread
                        await trio.sleep(0.05)
                before = srv.state().tokens_appended
                prompt = [Tokens([1, 2, 3]), Tokens(decoded(first)), Tokens([4])]
                events = await run(conv, prompt)
                assert conv.session is not None and conv.session.session_id != old
                # The whole prompt went again, to the new session.
                assert srv.state().tokens_appended - before >= 3 + 8 + 1
                assert conv.committed_len == 3 + 8 + 1 + 8
                assert isinstance(events[-1], StreamDone)
    assert "is gone on the server" in caplog.text


async def test_a_fresh_session_the_server_does_not_know_is_not_replaced() -> None:
    # Only a session held from an earlier turn may be gone (restart, eviction) and
    # be replaced: NOT_FOUND for the session just opened for this turn is raised,
    # not answered with another OpenSession.
    async with (
        misbehaving_server() as srv,
        poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, close_timeout=1.0) as c,
        c.conversation() as conv,
    ):
        srv.plan("Generate", Reply("trailers_only", status=5), Reply("trailers_only", status=5))
        with pytest.raises(poc_api.SessionNotFound):
            await run(conv, [Tokens([1, 2, 3])])
        assert conv.session is None
        assert len(srv.calls_to("OpenSession")) == 1
        assert len(srv.calls_to("Generate")) == 1


async def test_a_conversation_closed_while_a_turn_opens_its_session_closes_it() -> None:
    # Another task closed the conversation while the turn waited for OpenSession:
    # the turn went on, on a closed conversation, and its session stayed open
    # until the conversation's block ended.
    async with (
        misbehaving_server() as srv,
        poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, close_timeout=1.0) as c,
        c.conversation() as conv,
    ):
        srv.plan("OpenSession", Reply(first_delay=0.3))

        async def close_soon() -> None:
            await trio.sleep(0.1)
            await conv.aclose()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_soon)
                with pytest.raises(trio.ClosedResourceError, match="conversation is closed"):
                    await run(conv, [Tokens([1, 2, 3])])
            await wait_for(lambda: srv.closed == srv.opened)
        assert len(srv.opened) == 1
        assert srv.calls_to("Generate") == []
        assert conv.session is None


async def test_with_one_server_an_unavailable_turn_is_not_reopened_on_it() -> None:
    # A pool reopens the turn's session on another endpoint; with one server there
    # is no other: the error is the caller's (its retry policy, its backoff), not
    # an at-once second OpenSession on the server that just said UNAVAILABLE.
    async with (
        misbehaving_server() as srv,
        poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, close_timeout=1.0) as c,
        c.conversation() as conv,
    ):
        srv.plan("Generate", Reply("trailers_only", status=14))
        with pytest.raises(poc_api.ServerUnavailable):
            await run(conv, [Tokens([1, 2, 3])])
        assert conv.session is None
        assert len(srv.calls_to("OpenSession")) == 1
        # The next turn starts over, on a new session.
        events = await run(conv, [Tokens([1, 2, 3])])
        assert isinstance(events[-1], StreamDone)
        assert len(srv.calls_to("OpenSession")) == 2


async def test_stream_total_timeout_raises_and_drops_the_session(
    client: poc_api.ApiClient,
) -> None:
    async with client.conversation() as conv:
        with pytest.raises(poc_api.PocApiTimeout), trio.fail_after(10):
            async with conv.stream(
                [Tokens([1, 2])], SamplingParams(max_tokens=10**6), timeout=0.2
            ) as ev:
                async for _ in ev:
                    pass
        assert conv.session is None
        await run(conv, [Tokens([1])])


async def test_events_with_readouts_pickle_and_deep_copy_by_value(
    client: poc_api.ApiClient,
) -> None:
    # Events go to worker processes (ProcessPoolExecutor, trio-parallel): a
    # memoryview readout made pickle and deepcopy raise TypeError.
    import copy
    import pickle

    manifest = await client.readout_manifest()
    assert manifest is not None
    async with client.conversation() as conv:
        events = await run(conv, [Tokens(tokenize("Hi"))], readout_shape=manifest.shape)
    outs = [e for e in events if isinstance(e, TokenOut)]
    with trio.fail_after(10):
        async with (
            client.session() as s,
            s.generate(
                [65, 66], sampling=SamplingParams(max_tokens=1), readout_ranges=[(0, 10)]
            ) as ev,
        ):
            tokens = [e async for e in ev if isinstance(e, poc_api.Token)]
    assert outs and tokens and all(e.readout is not None for e in [*outs, *tokens])
    for event in [*outs, *tokens]:
        for back in (pickle.loads(pickle.dumps(event)), copy.deepcopy(event), copy.copy(event)):
            assert type(back) is type(event) and back == event and hash(back) == hash(event)
            assert back.readout is not None and event.readout is not None
            assert (back.readout.format, back.readout.shape) == ("f", event.readout.shape)
            assert back.readout.tolist() == event.readout.tolist()
    assert pickle.loads(pickle.dumps(outs)) == outs
    # The repr tells the readout's shape, not its address.
    n_layers, n_concepts = manifest.shape
    assert f"readout=<float32 ({n_layers}, {n_concepts})>" in repr(outs[0])
    assert f"readout=<float32 ({n_layers * n_concepts},)>" in repr(tokens[0])


async def test_conversation_and_stream_reprs_tell_the_session_and_state(
    client: poc_api.ApiClient,
) -> None:
    # They were <poc_api._conversation.Conversation object at 0x...>.
    with trio.fail_after(10):
        async with client.conversation() as conv:
            assert repr(conv) == "<Conversation no session rewind=True>"
            async with conv.stream([Tokens([65])], SamplingParams(max_tokens=2)) as ev:
                assert conv.session is not None
                sid = conv.session.session_id
                assert (
                    repr(conv)
                    == f"<Conversation session {sid} committed_len=0 rewind=True streaming>"
                )
                assert repr(ev) == f"<ConversationStream session {sid} decoded=0 streaming>"
                events = [e async for e in ev]
                assert repr(ev) == f"<ConversationStream session {sid} decoded=2 done>"
            assert isinstance(events[-1], StreamDone)
            assert repr(conv) == f"<Conversation session {sid} committed_len=3 rewind=True>"
            async with conv.stream([Tokens([65, 66])], SamplingParams(max_tokens=5)) as left:
                pass  # left before StreamDone: it said "streaming" for ever
            assert repr(left).endswith(" decoded=0 left before StreamDone>"), repr(left)
        assert repr(conv).endswith(" closed>")
        async with client.session() as s:
            async with s.generate([1], sampling=SamplingParams(max_tokens=1)) as g:
                assert repr(g) == f"<GenerateStream session {s.session_id} streaming>"
                _ = [e async for e in g]
                assert repr(g) == (
                    f"<GenerateStream session {s.session_id} done finish_reason='length'>"
                )


async def test_a_readout_shape_that_is_not_the_manifests_is_refused_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    # Only the element count was checked, by the stream, after sending: a swapped
    # (n_concepts, n_layers) gave readouts of the wrong shape without a word, and a
    # wrong count dropped every readout with a warning. With the manifest known
    # (fetched by this client), both are refused up front.
    manifest = await client.readout_manifest()
    assert manifest is not None
    n_layers, n_concepts = manifest.shape
    before = server.state().generate_calls
    async with client.conversation() as conv:
        for bad in ((n_concepts, n_layers), (n_layers, n_concepts + 1)):
            with pytest.raises(ValueError, match="readout manifest"):
                conv.stream(
                    [Tokens(tokenize("Hi"))], SamplingParams(max_tokens=1), readout_shape=bad
                )
        assert server.state().generate_calls == before
        async with conv.stream(
            [Tokens(tokenize("Hi"))], SamplingParams(max_tokens=1), readout_shape=manifest.shape
        ) as ev:
            outs = [e async for e in ev if isinstance(e, poc_api.TokenOut)]
    assert outs and all(o.readout is not None for o in outs)


async def test_logprob_top_k_reaches_a_conversations_tokens(client: poc_api.ApiClient) -> None:
    # SamplingParams(logprob_top_k=3) was taken by Conversation.stream and sent,
    # but TokenOut had nowhere to put the answer: dropped without a word.
    sampling = SamplingParams(max_tokens=3, logprob_top_k=3)
    async with client.session() as s, s.generate(tokenize("Hi"), sampling=sampling) as ev:
        raw = [e for e in [x async for x in ev] if isinstance(e, poc_api.Token)]
    async with client.conversation() as conv:
        events = await run(conv, [Tokens(tokenize("Hi"))], sampling)
    outs = [e for e in events if isinstance(e, TokenOut)]
    assert [o.top_logprobs for o in outs] == [t.top_logprobs for t in raw if not t.is_prefill]
    assert all(len(o.top_logprobs) == 3 for o in outs)
    assert TokenOut(1).top_logprobs == ()


async def test_stream_timeout_bounds_the_wait_for_another_tasks_turn() -> None:
    # The wait for another task's turn had no deadline: the second stream waited
    # out the whole first turn, then found its time gone at the session, raised
    # and closed the session the first turn had just kept (the next turn resent
    # the whole prompt).
    async with ReferenceServer(ServerConfig(token_delay_ms=50)) as srv:
        async with (
            poc_api.ApiClient(srv.base_url, grpc_url=srv.grpc_url) as c,
            c.conversation() as conv,
        ):
            with trio.fail_after(20):
                first: list[poc_api.StreamEvent] = []
                started = trio.Event()

                async def long_turn() -> None:  # 40 tokens: 2 s
                    async with conv.stream([Tokens([1, 2])], SamplingParams(max_tokens=40)) as ev:
                        started.set()
                        first.extend([e async for e in ev])

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(long_turn)
                    await started.wait()
                    assert conv.session is not None
                    session = conv.session
                    calls = srv.state().rpc_counts
                    t0 = trio.current_time()
                    nursery.start_soon(block_the_run, 0.1, 0.5)  # the timeout wakes late
                    with pytest.raises(poc_api.PocApiTimeout) as info:
                        async with conv.stream(
                            [Tokens([1, 2])], SamplingParams(max_tokens=2), timeout=0.3
                        ):
                            pytest.fail("the turn should not have started")
                    waited = trio.current_time() - t0
                    assert not first  # the other turn still runs
                    assert srv.state().rpc_counts == calls  # nothing was sent
                # A liveness bound, not a speed one: the other turn takes 2 s.
                assert 0.25 < waited < 1.5
                assert info.value.retriable
                assert "another task holds" in str(info.value)
                assert "nothing was sent" in str(info.value)
                # The bound set, not the time measured as the run woke late.
                assert "timeout after 0.3 s waiting" in str(info.value), info.value
                # The other turn ended normally, and kept its session.
                assert isinstance(first[-1], StreamDone) and len(decoded(first)) == 40
                assert conv.session is session and conv.committed_len == 2 + 40
                before = srv.state().tokens_appended
                await run(conv, [Tokens([1, 2]), Tokens(decoded(first)), Tokens([3])])
                assert srv.state().tokens_appended - before == 1  # only the delta
                assert conv.session is session


async def test_a_turn_refused_before_sending_keeps_the_session() -> None:
    # ContextOverflow "(refused before sending)" closed the session all the same:
    # the next, shorter turn sent the whole history again (210 tokens, not 10).
    history = [65 + (i % 26) for i in range(200)]
    async with (
        reference_server(max_context=256) as server,
        open_client(server) as client,
        client.conversation() as conv,
    ):
        async with conv.stream([Tokens(history)], SamplingParams(max_tokens=0)) as ev:
            async for _ in ev:
                pass
        session = conv.session
        before = server.state()
        with pytest.raises(poc_api.ContextOverflow, match="refused before sending"):
            async with conv.stream([Tokens(history + [66] * 100)], SamplingParams(max_tokens=4)):
                pass  # pragma: no cover
        # Nothing of the prompt sent, nothing closed: only an empty prefill asked
        # whether the held session (and so its window) is still the server's.
        after = server.state()
        assert after.tokens_appended == before.tokens_appended
        assert after.session_ids == before.session_ids
        assert {**before.rpc_counts, "Generate": before.rpc_counts["Generate"] + 1} == (
            after.rpc_counts
        )
        assert conv.session is session and session is not None
        async with conv.stream([Tokens(history + [66] * 10)], SamplingParams(max_tokens=0)) as ev:
            async for _ in ev:
                pass
        assert server.state().tokens_appended - before.tokens_appended == 10


@pytest.mark.parametrize("silent", ["OpenSession", "rewind", "AppendImage"])
async def test_first_token_timeout_bounds_the_turns_calls_before_its_generate(
    silent: str,
) -> None:
    # first_token_timeout bounded only the Generate call: a conversation turn whose
    # session open (or rewind, or image append) got no answer waited for ever,
    # although no token could come before it. It now bounds the turn up to its
    # first token, as the name says.
    async with misbehaving_server() as srv:
        async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url) as client:
            async with client.conversation() as conv:
                first: list[Chunk] = [Tokens([1, 2, 3])]
                if silent == "rewind":  # a first turn, then a prompt that diverges
                    async with conv.stream(first, SamplingParams(max_tokens=1)) as ev:
                        _ = [e async for e in ev]
                    first = [Tokens([1, 9])]
                if silent == "AppendImage":
                    first = [Tokens([1]), Image(make_png(8, 8), "image/png")]
                # (A rewind is a Generate with truncating set, before the turn's own.)
                srv.plan("Generate" if silent == "rewind" else silent, Reply("silent"))
                started = trio.current_time()
                # (It says which bound ran out: the OpenSession's own words did not.)
                with trio.fail_after(5), pytest.raises(PocApiTimeout, match="first-token"):
                    async with conv.stream(
                        first, SamplingParams(max_tokens=1), first_token_timeout=0.3
                    ) as ev:
                        _ = [e async for e in ev]
                assert trio.current_time() - started < 2


async def test_a_turns_first_token_timeout_says_the_whole_wait() -> None:
    # The turn's session open took 0.3 s of its 0.6 s, and the timeout said
    # "first-token timeout after 0.3 s": the Generate's part, not what was set.
    async with misbehaving_server() as srv:
        async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url) as client:
            async with client.conversation() as conv:
                srv.plan("OpenSession", Reply(first_delay=0.3))
                srv.plan("Generate", Reply("silent"))
                with trio.fail_after(5), pytest.raises(PocApiTimeout) as info:
                    async with conv.stream(
                        [Tokens([1])], SamplingParams(max_tokens=1), first_token_timeout=0.6
                    ) as ev:
                        _ = [e async for e in ev]
    assert re.search(r"first-token timeout after 0\.6\d* s", str(info.value)), info.value


async def test_a_turns_total_timeout_before_its_generate_names_the_turns_bound() -> None:
    # Opening the session took 0.15 s of the turn's 0.4 s; the image append that
    # then ran out of it said "AppendImage: no answer within 0.25 s": its own part
    # (and a Generate left no time to send, "timeout after 0 s").
    async with misbehaving_server() as srv:
        async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url) as client:
            async with client.conversation() as conv:
                srv.plan("OpenSession", Reply(first_delay=0.15))
                srv.plan("AppendImage", Reply("silent"))
                prompt = [Tokens([1]), Image(make_png(8, 8), "image/png")]
                with trio.fail_after(5), pytest.raises(PocApiTimeout) as info:
                    async with conv.stream(prompt, SamplingParams(max_tokens=1), timeout=0.4):
                        pass
    message = str(info.value)
    assert re.match(r"total timeout after 0\.4\d* s, before the Generate: AppendImage", message)
    assert not info.value.retriable  # (the append went out)
    assert conv.session is None


async def test_a_turns_total_timeout_names_the_turns_bound_not_the_generates_part() -> None:
    # The turn's timeout bounds its wait for another task's turn, opening the
    # session and the prefill too; the Generate got what was left of it, and its
    # message named that ("after 0.0659 s" for a 0.3 s timeout), and then what was
    # left after the wait for the turn ("after 0.299 s", under load).
    async with (
        reference_server(token_delay_ms=20) as server,
        open_client(server) as client,
        client.conversation() as conv,
    ):
        held = trio.Event()

        async def hold_the_turn() -> None:
            async with conv.stream([Tokens([1, 2, 3])], SamplingParams(max_tokens=1)) as ev:
                held.set()
                async for _ in ev:
                    pass
                await trio.sleep(0.1)  # the other turn waits this long for it

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold_the_turn)
                await held.wait()
                with pytest.raises(poc_api.PocApiTimeout) as info:
                    sampling = SamplingParams(max_tokens=1000)
                    async with conv.stream([Tokens([1, 2, 3])], sampling, timeout=0.3) as ev:
                        async for _ in ev:
                            pass
    assert "Generate: total timeout after 0.3 s" in str(info.value), info.value


async def test_a_servers_deadline_exceeded_before_the_generate_is_not_the_turns_timeout() -> None:
    # The server answered the image append DEADLINE_EXCEEDED at once (its own
    # bound): the turn's 30 s did not run out, and the error must not say it did.
    async with misbehaving_server() as srv:
        async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url) as client:
            async with client.conversation() as conv:
                srv.plan("AppendImage", Reply("trailers_only", status=4))
                prompt = [Tokens([1]), Image(make_png(8, 8), "image/png")]
                with trio.fail_after(5), pytest.raises(PocApiTimeout) as info:
                    async with conv.stream(prompt, SamplingParams(max_tokens=1), timeout=30):
                        pass
    assert "timeout after 30 s" not in str(info.value), str(info.value)


async def test_an_image_whose_mime_differs_only_in_case_is_not_sent_again(
    client: poc_api.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    # MIME types are case-insensitive (check_image_mime takes any case): the same
    # image given as "image/PNG" then "image/png" rewound to before it and sent it again.
    caplog.set_level(logging.INFO, logger="poc_api")
    png = make_png(56, 28)
    async with client.conversation() as conv:
        first = await run(conv, [Tokens([1]), Image(png, "image/PNG"), Tokens([2])])
        assert isinstance(first[0], ImageAppended)
        held = conv.committed_len
        second = await run(
            conv, [Tokens([1]), Image(png, "image/png"), Tokens([2, *decoded(first), 3])]
        )
        assert not any(isinstance(e, ImageAppended) for e in second)
        assert conv.committed_len == held + 1 + 8
    assert "rewinding" not in caplog.text


async def test_a_failed_turn_logs_that_its_session_is_dropped(
    client: poc_api.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    # The seed logged every failed turn ("... dropping session"); here the
    # caller got the exception and the log said nothing above DEBUG of which
    # session went, or why.
    caplog.set_level(logging.INFO, logger="poc_api.grpc")
    ids = tokenize("Hello there")
    with trio.fail_after(20):
        async with client.conversation() as conv:
            await run(conv, [Tokens(ids)])
            assert conv.session is not None
            sid = conv.session.session_id
            bad = Image(b"not an image", "image/png")
            with pytest.raises(poc_api.InvalidRequest):
                await run(conv, [Tokens(ids), bad])
            assert conv.session is None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any(sid in m and "InvalidRequest" in m and "dropping" in m for m in lines), lines


class _Mine(Exception):
    pass


@pytest.mark.parametrize("then", ["raised", "caught", "own_error", "own_poc_error"])
async def test_a_stream_error_mid_turn_logs_the_dropped_session_once(
    caplog: pytest.LogCaptureFixture, then: str
) -> None:
    # Nothing said which session went, or why; then, with the stream's error
    # caught in the block (or another raised), the line was lost or blamed the
    # caller's own error.
    caplog.set_level(logging.INFO, logger="poc_api.grpc")
    ids = tokenize("Hello there")
    with trio.fail_after(30):
        async with (
            reference_server(token_delay_ms=20) as srv,
            open_client(srv, close_timeout=0.5) as c,
            c.conversation() as conv,
        ):
            with (
                pytest.raises((_Mine, poc_api.PocApiTimeout, poc_api.ServerUnavailable))
                if then != "caught"
                else contextlib.nullcontext()
            ):
                async with conv.stream([Tokens(ids)], SamplingParams(max_tokens=50)) as ev:
                    assert conv.session is not None
                    sid = conv.session.session_id
                    n = 0
                    with (
                        contextlib.nullcontext()
                        if then == "raised"
                        else pytest.raises(poc_api.ServerUnavailable)
                    ):
                        async for _ in ev:
                            n += 1
                            if n == 2:
                                await trio.to_thread.run_sync(srv.stop)
                    if then == "own_error":
                        raise _Mine
                    if then == "own_poc_error":  # another call of the block's, say
                        raise poc_api.PocApiTimeout("the caller's own call", retriable=True)
            assert conv.session is None  # dropped
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    said = [m for m in lines if sid in m and "dropping" in m]
    assert len(said) == 1 and "ServerUnavailable" in said[0], lines


async def test_a_conversation_keeps_its_model_when_its_session_is_reopened(
    client: poc_api.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="poc_api.server.grpc")
    ids = tokenize("Hello there")
    with trio.fail_after(20):
        async with client.conversation(model="other-b") as conv:
            async with conv.stream([Tokens(ids)], SamplingParams(max_tokens=1)) as events:
                _ = [e async for e in events]
            with pytest.raises(poc_api.InvalidRequest):
                async with conv.stream(
                    [Tokens(ids), Image(b"x", "image/png")], SamplingParams(max_tokens=1)
                ) as events:
                    pass
            async with conv.stream([Tokens(ids)], SamplingParams(max_tokens=1)) as events:
                _ = [e async for e in events]
    opened = opened_models(caplog.records)
    assert opened == ["other-b", "other-b"], opened


async def test_a_manifest_cached_before_a_restart_with_other_layers_is_fetched_again() -> None:
    # The server restarted (same ports) with 2 layers instead of 3: the client
    # kept the manifest it had fetched, refused the server's new shape for ever
    # ("not the server's readout manifest's") and dropped every readout of the old one.
    async with reference_server(n_layers=3) as first:
        port = first.http_port
        async with open_client(first, close_timeout=1.0) as client:
            manifest = await client.readout_manifest()
            assert manifest is not None and manifest.shape == (3, 8)
            async with client.conversation() as conv:
                await run(conv, [Tokens([1, 2, 3])], readout_shape=manifest.shape)
                await trio.to_thread.run_sync(first.stop)
                second = await trio.to_thread.run_sync(
                    lambda: ReferenceServer(ServerConfig(port=port, n_layers=2))
                )
                await second.__aenter__()
                try:
                    events = await run(conv, [Tokens([1, 2, 3])], readout_shape=manifest.shape)
                    assert all(e.readout is None for e in events if isinstance(e, TokenOut))
                    manifest = await client.readout_manifest()
                    assert manifest is not None and manifest.shape == (2, 8)
                    events = await run(conv, [Tokens([1, 2, 3])], readout_shape=(2, 8))
                    readouts = [e.readout for e in events if isinstance(e, TokenOut)]
                    assert readouts and all(r is not None and r.shape == (2, 8) for r in readouts)
                finally:
                    await second.__aexit__(None, None, None)


async def test_a_generate_readout_of_another_length_drops_a_stale_cached_manifest() -> None:
    # Session.generate's readout_shape, the same: the cached manifest is dropped
    # once a vector shows the server's is no longer it.
    async with reference_server(n_layers=3) as first:
        port = first.http_port
        async with open_client(first, close_timeout=1.0) as client:
            assert await client.readout_manifest() is not None
            await trio.to_thread.run_sync(first.stop)
            second = await trio.to_thread.run_sync(
                lambda: ReferenceServer(ServerConfig(port=port, n_layers=2))
            )
            await second.__aenter__()
            try:
                with trio.fail_after(20):
                    async with client.session() as s:
                        with pytest.raises(ValueError, match="not the server's"):
                            s.generate([1], readout_shape=(2, 8))
                        sampling = SamplingParams(max_tokens=1)
                        ro = [(0, 10)]
                        async with s.generate(
                            [1], sampling=sampling, readout_ranges=ro, readout_shape=(3, 8)
                        ) as events:
                            [ev async for ev in events]
                        async with s.generate(
                            [2], sampling=sampling, readout_ranges=ro, readout_shape=(2, 8)
                        ) as events:
                            got = [ev async for ev in events if isinstance(ev, poc_api.Token)]
                    manifest = await client.readout_manifest()
            finally:
                await second.__aexit__(None, None, None)
    assert got and all(t.readout is not None and t.readout.shape == (2, 8) for t in got)
    assert manifest is not None and manifest.shape == (2, 8)


async def test_a_held_sessions_window_is_not_trusted_after_a_restart_with_a_larger_one() -> None:
    # The server restarted (same ports) with a larger context window: the held
    # session is gone, yet every longer turn was refused before sending with the
    # dead session's window, "past the context window of 64", for ever (until a
    # prompt short enough for the old window reached the server and found the
    # session gone).
    async with reference_server(max_context=64) as first:
        port = first.http_port
        async with open_client(first, close_timeout=1.0) as client:
            async with client.conversation() as conv:
                await run(conv, [Tokens([1, 2, 3])], SamplingParams(max_tokens=3))
                await trio.to_thread.run_sync(first.stop)
                second = await trio.to_thread.run_sync(
                    lambda: ReferenceServer(ServerConfig(port=port, max_context=4096))
                )
                await second.__aenter__()
                prompt = [Tokens([1 + i % 250 for i in range(100)])]
                events = await run(conv, prompt, SamplingParams(max_tokens=3))
                assert isinstance(events[-1], StreamDone)
                assert conv.session is not None and conv.session.max_length == 4096
                assert conv.committed_len == 103
            try:
                assert second.state().session_ids == frozenset()
            finally:
                await second.__aexit__(None, None, None)
