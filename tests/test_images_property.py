"""Images in position accounting, against a brute-force oracle (the reference
server's own model, over the flat prompt with each image as its pad tokens)."""

from __future__ import annotations

import math
import struct

import pytest
import trio
from helpers import make_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import poc_api
from poc_api import Image, SamplingParams, Tokens
from poc_api.server import ReferenceServer
from poc_api.server._images import image_size, placeholder_count
from poc_api.server._model import IMAGE_PAD, default_model

MODEL = default_model()
# (width, height): 1, 2, 4 and 6 placeholders.
PNGS = [make_png(w, h, seed=i) for i, (w, h) in enumerate([(28, 28), (56, 28), (56, 56), (84, 56)])]
COUNTS = [placeholder_count(*image_size(p, "image/png")) for p in PNGS]


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def flat(chunks: list[poc_api.Chunk]) -> tuple[list[int], set[int]]:
    """The session's tokens for ``chunks`` and the positions images take."""
    out: list[int] = []
    pads: set[int] = set()
    for c in chunks:
        if isinstance(c, Tokens):
            out += c.ids
        else:
            n = COUNTS[PNGS.index(c.data)]
            pads.update(range(len(out), len(out) + n))
            out += [IMAGE_PAD] * n
    return out, pads


def oracle(chunks: list[poc_api.Chunk], ranges: list[tuple[int, int]]) -> list[tuple[float, int]]:
    tokens, pads = flat(chunks)
    out = []
    for s, t in ranges:
        ps = [p for p in range(s, t) if p > 0 and p not in pads]
        out.append((math.fsum(f32(MODEL.logprob(tokens, p)) for p in ps), len(ps)))
    return out


def image_chunk(i: int, said: bool) -> Image:
    return Image(PNGS[i], "image/png", COUNTS[i] if said else 0)


chunk_st = st.one_of(
    st.lists(st.integers(0, 255), min_size=1, max_size=6).map(Tokens),
    st.builds(image_chunk, st.integers(0, len(PNGS) - 1), st.booleans()),
)
prompt_st = st.lists(chunk_st, min_size=1, max_size=6)


def total_len(chunks: list[poc_api.Chunk]) -> int:
    return len(flat(chunks)[0])


settings_ = settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings_
@given(prompt=prompt_st, data=st.data())
async def test_score_sums_match_the_oracle(
    server: ReferenceServer, prompt: list[poc_api.Chunk], data: st.DataObject
) -> None:
    n = total_len(prompt)
    pair = st.tuples(st.integers(0, n), st.integers(0, n)).map(lambda p: (min(p), max(p)))
    ranges = data.draw(st.lists(pair, min_size=1, max_size=5))
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
        got = await client.score(prompt, ranges)
    want = oracle(prompt, ranges)
    assert [(r.start, r.end) for r in got] == ranges
    for r, (lp, count) in zip(got, want, strict=True):
        assert r.logprob == pytest.approx(lp, rel=1e-9, abs=1e-9)
        assert r.token_count == count


@settings_
@given(prompt=prompt_st, conts=st.lists(st.lists(chunk_st, max_size=3), min_size=1, max_size=4))
async def test_score_continuations_match_the_oracle(
    server: ReferenceServer, prompt: list[poc_api.Chunk], conts: list[list[poc_api.Chunk]]
) -> None:
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
        got = await client.score_continuations(prompt, conts)
    n = total_len(prompt)
    for r, cont in zip(got, conts, strict=True):
        ((lp, count),) = oracle(prompt + cont, [(n, n + total_len(cont))])
        assert (r.start, r.end) == (n, n + total_len(cont))
        assert r.logprob == pytest.approx(lp, rel=1e-9, abs=1e-9)
        assert r.token_count == count


@settings_
@given(
    prompts=st.lists(st.tuples(prompt_st, st.lists(chunk_st, max_size=3)), min_size=2, max_size=4),
    data=st.data(),
)
async def test_score_many_share_prefix_matches_the_oracle(
    server: ReferenceServer,
    prompts: list[tuple[list[poc_api.Chunk], list[poc_api.Chunk]]],
    data: st.DataObject,
) -> None:
    # A common head for all (so that they group), then each its own tail.
    head = prompts[0][0]
    full = [head + tail for _, tail in prompts]
    batch = []
    for chunks in full:
        n = total_len(chunks)
        pair = st.tuples(st.integers(0, n), st.integers(0, n)).map(lambda p: (min(p), max(p)))
        batch.append((chunks, data.draw(st.lists(pair, min_size=1, max_size=3))))
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
        got = await client.score_many(batch, share_prefix=True)
    for (chunks, ranges), results in zip(batch, got, strict=True):
        for r, (lp, count) in zip(results, oracle(chunks, ranges), strict=True):
            assert r.logprob == pytest.approx(lp, rel=1e-9, abs=1e-9)
            assert r.token_count == count


def units(chunks: list[poc_api.Chunk]) -> list[object]:
    out: list[object] = []
    for c in chunks:
        out += list(c.ids) if isinstance(c, Tokens) else [c.data]
    return out


def to_chunks(us: list[object]) -> list[poc_api.Chunk]:
    out: list[poc_api.Chunk] = []
    for u in us:
        if isinstance(u, int):
            if out and isinstance(out[-1], Tokens):
                out[-1] = Tokens([*out[-1].ids, u])
            else:
                out.append(Tokens([u]))
        else:
            out.append(Image(u, "image/png"))  # (length unknown: the server's)
    return out


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    turns=st.lists(
        st.tuples(st.floats(0, 1), st.lists(chunk_st, max_size=3), st.integers(0, 3)),
        min_size=1,
        max_size=5,
    )
)
async def test_conversation_sends_only_the_delta_and_tracks_positions(
    server: ReferenceServer, turns: list[tuple[float, list[poc_api.Chunk], int]]
) -> None:
    # Each turn: keep a fraction of what the session holds (cut at a unit: a rewind
    # into the middle of the history, never inside an image), add new chunks.
    held: list[object] = []  # the session's content as units (ids, image bytes)
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
        async with client.conversation() as conv:
            for keep, new, max_tokens in turns:
                kept = held[: int(keep * len(held))]
                prompt = to_chunks(kept + units(new))
                if not prompt:
                    prompt = [Tokens([1])]
                # The images past the shared units are the ones to upload.
                shared = 0
                for a, b in zip(held, units(prompt), strict=False):
                    if a != b:
                        break
                    shared += 1
                want_images = sum(1 for u in units(prompt)[shared:] if isinstance(u, bytes))
                before = server.state().rpc_counts.get("AppendImage", 0)
                decoded: list[int] = []
                images = 0
                async with conv.stream(prompt, SamplingParams(max_tokens=max_tokens)) as ev:
                    async for e in ev:
                        if isinstance(e, poc_api.TokenOut):
                            decoded.append(e.id)
                        elif isinstance(e, poc_api.ImageAppended):
                            images += 1
                        elif isinstance(e, poc_api.StreamDone):
                            done = e
                after = server.state().rpc_counts.get("AppendImage", 0)
                assert images == after - before == want_images
                held = units(prompt) + decoded
                n = total_len(to_chunks(held)) if held else 0
                assert conv.committed_len == n == done.usage.total_tokens
                # The decoded tokens are the model's greedy picks after the prompt.
                tokens, _ = flat(prompt)
                for tok in decoded:
                    assert tok == MODEL.dist(tokens).argmax
                    tokens.append(tok)
            await trio.lowlevel.checkpoint()


op_st = st.one_of(
    st.tuples(
        st.just("text"), st.lists(st.integers(0, 255), max_size=5), st.floats(0, 1), st.booleans()
    ),
    st.tuples(st.just("image"), st.integers(0, len(PNGS) - 1), st.floats(0, 1), st.booleans()),
    st.tuples(st.just("decode"), st.integers(1, 3), st.floats(0, 1), st.booleans()),
)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op_st, min_size=1, max_size=8), data=st.data())
async def test_session_positions_events_and_rewinds_into_images(
    server: ReferenceServer, ops: list[tuple[str, object, float, bool]], data: st.DataObject
) -> None:
    # The session's tokens as the server holds them (images as their pads).
    held: list[int] = []
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
        async with client.session() as s:
            for kind, arg, cut, rewinding in ops:
                rewind_to = int(cut * len(held)) if rewinding else None
                at = len(held) if rewind_to is None else rewind_to
                if kind == "image":
                    assert isinstance(arg, int)
                    r = await s.append_image(PNGS[arg], "image/png", rewind_to=rewind_to)
                    held = held[:at] + [IMAGE_PAD] * COUNTS[arg]
                    assert (r.placeholder_count, r.total_length) == (COUNTS[arg], len(held))
                    assert s.committed_len == len(held)
                    continue
                ids = arg if kind == "text" else []
                assert isinstance(ids, list)
                n = len(held[:at]) + len(ids)
                pair = st.tuples(st.integers(0, n + 4), st.integers(0, n + 4)).filter(
                    lambda p: p[0] != p[1]
                )
                lp = data.draw(st.lists(pair.map(lambda p: (min(p), max(p))), max_size=3))
                ro = data.draw(st.lists(pair.map(lambda p: (min(p), max(p))), max_size=2))
                max_tokens = arg if kind == "decode" else 0
                events = []
                async with s.generate(
                    ids,
                    sampling=SamplingParams(max_tokens=max_tokens),
                    logprobs_ranges=lp,
                    readout_ranges=ro,
                    rewind_to=rewind_to,
                ) as ev:
                    async for e in ev:
                        events.append(e)
                held = held[:at] + list(ids)
                inside = lambda p, rs: any(a <= p < b for a, b in rs)  # noqa: E731
                want = [p for p in range(at, len(held)) if inside(p, lp) or inside(p, ro)]
                prefill = [e for e in events if isinstance(e, poc_api.Token) and e.is_prefill]
                assert [e.position for e in prefill] == want
                for e in prefill:
                    assert e.id == held[e.position]
                    if inside(e.position, lp):
                        assert e.sampled_logprob == pytest.approx(
                            f32(MODEL.logprob(held, e.position)), abs=1e-6
                        )
                    assert bool(e.readout) == inside(e.position, ro)
                for e in events:
                    if isinstance(e, poc_api.Token) and not e.is_prefill:
                        assert e.position == len(held)
                        assert e.id == MODEL.dist(held).argmax
                        held.append(e.id)
                done = events[-1]
                assert isinstance(done, poc_api.Done)
                assert done.total_tokens == len(held) == s.committed_len
