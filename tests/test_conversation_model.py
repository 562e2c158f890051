"""Conversations against a model of what the server holds: random turns (append, edit
at a random point, regenerate, cancel, eviction, a session out of step)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from helpers import make_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import poc_api
from poc_api import Image, SamplingParams, StreamDone, TokenOut, Tokens
from poc_api.server import IMAGE_PAD, ReferenceServer, ServerConfig

PNGS = [make_png(28, 28, seed=1), make_png(56, 28, seed=2)]


@pytest.fixture(scope="module")
def slow_server() -> Iterator[ReferenceServer]:
    srv = ReferenceServer(ServerConfig(max_context=100_000, ignore_eos=True, prefill_delay_us=300))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def flat(chunks: list[poc_api.Chunk], counts: dict[bytes, int]) -> list[int]:
    out: list[int] = []
    for c in chunks:
        out.extend(c.ids if isinstance(c, Tokens) else [IMAGE_PAD] * counts[c.data])
    return out


def items(chunks: list[poc_api.Chunk], counts: dict[bytes, int]) -> list[object]:
    out: list[object] = []
    for c in chunks:
        if isinstance(c, Tokens):
            out.extend(c.ids)
        else:
            out.extend((c.data, k) for k in range(counts[c.data]))
    return out


def expected_sent(
    held: list[poc_api.Chunk] | None, new: list[poc_api.Chunk], counts: dict[bytes, int]
) -> tuple[int, int]:
    """(text tokens, images) a turn sends for ``new`` when the session holds ``held``."""
    a, b = items(held or [], counts), items(new, counts)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while 0 < n < len(b) and isinstance(x := b[n], tuple) and x[1] != 0:
        n -= 1  # not inside an image
    rest = b[n:]
    return sum(isinstance(x, int) for x in rest), sum(
        isinstance(x, tuple) and x[1] == 0 for x in rest
    )


def held_tokens(srv: ReferenceServer, sid: str) -> list[int]:
    assert srv._rt is not None
    return list(srv._rt.store.get(sid).tokens)


text = st.lists(st.integers(0, 255), min_size=1, max_size=6).map(Tokens)
image = st.sampled_from(PNGS).map(lambda d: Image(d, "image/png"))
op = st.one_of(
    st.tuples(st.just("append"), st.lists(st.one_of(text, image), min_size=1, max_size=3)),
    st.tuples(st.just("edit"), st.floats(0, 1), text),
    st.tuples(st.just("regenerate")),
    st.tuples(st.just("cancel"), st.sampled_from(["before", "mid", "timed"]), st.floats(0, 0.03)),
    st.tuples(st.just("evict")),
    st.tuples(st.just("desync"), st.sampled_from(["longer", "shorter"]), st.booleans()),
    st.tuples(st.just("readout")),
)


def cut(chunks: list[poc_api.Chunk], frac: float, counts: dict[bytes, int]) -> list[poc_api.Chunk]:
    """The chunks up to a random position (images whole)."""
    total = len(flat(chunks, counts))
    pos = int(frac * total)
    out: list[poc_api.Chunk] = []
    acc = 0
    for c in chunks:
        n = len(c.ids) if isinstance(c, Tokens) else counts[c.data]
        if acc + n <= pos:
            out.append(c)
            acc += n
            continue
        if isinstance(c, Tokens):
            out.append(Tokens(c.ids[: pos - acc]))
        break
    return out


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=12))
def test_random_turns_keep_the_server_holding_prompt_plus_reply(
    slow_server: ReferenceServer, ops: list[tuple[object, ...]]
) -> None:
    srv = slow_server
    counts: dict[bytes, int] = {}

    async def main() -> None:
        async with poc_api.ApiClient(srv.base_url, grpc_url=srv.grpc_url) as c:
            for d in PNGS:
                async with c.session() as s:
                    counts[d] = (await s.append_image(d, "image/png")).placeholder_count
            async with c.conversation() as conv:
                prompt: list[poc_api.Chunk] = [Tokens([1, 2, 3])]
                full: list[poc_api.Chunk] = []  # prompt + reply of the last good turn

                async def turn(chunks: list[poc_api.Chunk], max_tokens: int = 3) -> list[int]:
                    with trio.fail_after(20):
                        async with conv.stream(chunks, SamplingParams(max_tokens=max_tokens)) as ev:
                            got = [e async for e in ev]
                    assert isinstance(got[-1], StreamDone)
                    return [e.id for e in got if isinstance(e, TokenOut)]

                async def good(chunks: list[poc_api.Chunk], evicted: bool = False) -> None:
                    nonlocal prompt, full
                    want = expected_sent(
                        None if conv.session is None or evicted else full, chunks, counts
                    )
                    st0 = srv.state()
                    reply = await turn(chunks)
                    st1 = srv.state()
                    got = (
                        st1.tokens_appended - st0.tokens_appended,
                        st1.rpc_counts.get("AppendImage", 0) - st0.rpc_counts.get("AppendImage", 0),
                    )
                    assert got == want, (chunks, full)
                    prompt = chunks
                    assert conv.session is not None
                    held = held_tokens(srv, conv.session.session_id)
                    full = [*chunks, Tokens(reply)]
                    assert held == flat(full, counts)
                    assert conv.committed_len == len(held)
                    assert len(reply) == 3

                await good(prompt)
                for o in ops:
                    kind = o[0]
                    if kind == "append":
                        await good([*full, *o[1]])  # type: ignore[misc]
                    elif kind == "edit":
                        await good([*cut(full, o[1], counts), o[2]])  # type: ignore[arg-type,list-item]
                    elif kind == "regenerate":
                        await good(prompt)
                    elif kind == "cancel":
                        how, delay = str(o[1]), float(o[2])  # type: ignore[arg-type]
                        sid = conv.session.session_id if conv.session else None
                        chunks = [*full, Image(PNGS[0], "image/png"), Tokens([7, 8])]
                        done = False
                        reply: list[int] = []
                        if how == "before":
                            with trio.CancelScope() as cs:
                                cs.cancel()
                                async with conv.stream(chunks, SamplingParams(max_tokens=3)) as ev:
                                    async for _ in ev:
                                        pass
                        elif how == "mid":
                            async with conv.stream(chunks, SamplingParams(max_tokens=50)) as ev:
                                async for _ in ev:
                                    break
                        else:
                            with trio.move_on_after(delay):
                                async with conv.stream(chunks, SamplingParams(max_tokens=3)) as ev:
                                    async for e in ev:
                                        done = isinstance(e, StreamDone)
                                        if isinstance(e, TokenOut):
                                            reply.append(e.id)
                        early = how == "before" or (how == "timed" and delay < 1e-3)
                        if done:
                            full = [*chunks, Tokens(reply)]
                            prompt = chunks
                            assert conv.session is not None
                        elif how == "before" and sid is not None:
                            # Cancelled before its turn: nothing was sent, the session stands.
                            assert conv.session is not None and conv.session.session_id == sid
                            assert held_tokens(srv, sid) == flat(full, counts)
                        elif not early:
                            assert conv.session is None, how
                            if sid is not None:
                                assert sid not in srv.state().session_ids
                        if conv.session is None:
                            full = []
                    elif kind == "readout":
                        m = await c.readout_manifest()
                        assert m is not None
                        async with conv.stream(
                            [*full, Tokens([10])],
                            SamplingParams(max_tokens=2),
                            readout_shape=m.shape,
                        ) as ev:
                            got = [e async for e in ev]
                        outs = [e for e in got if isinstance(e, TokenOut)]
                        assert len(outs) == 2
                        assert all(
                            e.readout is not None and e.readout.shape == m.shape for e in outs
                        )
                        full = [*full, Tokens([10]), Tokens([e.id for e in outs])]
                        prompt = [*full]
                        assert conv.session is not None
                        assert held_tokens(srv, conv.session.session_id) == flat(full, counts)
                    elif kind == "evict":
                        if conv.session is not None:
                            assert srv._rt is not None
                            srv._rt.store.close(conv.session.session_id)
                            await good([*full, Tokens([4])], evicted=True)
                    elif kind == "desync" and conv.session is not None:
                        assert srv._rt is not None
                        held = srv._rt.store.get(conv.session.session_id).tokens
                        if o[1] == "longer":
                            held.append(5)
                        else:
                            del held[-1:]
                        if o[2]:
                            with pytest.raises(poc_api.PocApiError):
                                await turn([*full, Tokens([9])])
                            assert conv.session is None
                        else:
                            # a rewind that the server can follow
                            await good(cut(full, 0.5, counts))
                    if not full:
                        # after a failure the model knows no reply: start again from the prompt
                        await good(prompt)

    trio.run(main)
