"""Chunks, prompt_to_chunks and the chunk walk: pure logic, checked against simple models."""

from __future__ import annotations

import itertools

import attrs
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from poc_api import Image, SessionDivergence, Tokens, prompt_to_chunks
from poc_api._chunks import (
    Chunk,
    chunk_len,
    chunks_before,
    common_prefix_len,
    plan_delta,
    walk_chunks,
)

VS, VE = 258, 259
PNG_A = b"\x89PNG-a"
PNG_B = b"\x89PNG-b"

text_ids = st.lists(st.integers(0, 255), max_size=6)


@st.composite
def flat_prompts(draw: st.DrawFn) -> tuple[list[int], list[tuple[bytes, str]], list[int]]:
    """A flat prompt with bracketed images, the images, and each image's inner length."""
    tokens: list[int] = []
    images: list[tuple[bytes, str]] = []
    inner_lens: list[int] = []
    for _ in range(draw(st.integers(0, 4))):
        tokens += draw(text_ids)
        if draw(st.booleans()):
            n = draw(st.integers(0, 5))
            tokens += [VS] + [260] * n + [VE]
            images.append((bytes([len(images)]), "image/png"))
            inner_lens.append(n)
    tokens += draw(text_ids)
    return tokens, images, inner_lens


@given(flat_prompts())
def test_prompt_to_chunks_reconstructs_the_flat_prompt(
    case: tuple[list[int], list[tuple[bytes, str]], list[int]],
) -> None:
    tokens, images, inner_lens = case
    chunks = prompt_to_chunks(tokens, images, VS, VE)
    rebuilt: list[int] = []
    seen_images = []
    for c in chunks:
        if isinstance(c, Tokens):
            rebuilt += c.ids
        else:
            rebuilt += [260] * c.known_expanded_len
            seen_images.append((c.data, c.mime, c.known_expanded_len))
    assert rebuilt == tokens
    assert seen_images == [(d, m, n) for (d, m), n in zip(images, inner_lens, strict=True)]
    # No two token chunks in a row, no empty token chunk.
    for a, b in itertools.pairwise(chunks):
        assert not (isinstance(a, Tokens) and isinstance(b, Tokens))
    assert all(len(c.ids) > 0 for c in chunks if isinstance(c, Tokens))


def test_prompt_to_chunks_keeps_vision_start_as_text_and_end_with_what_follows() -> None:
    chunks = prompt_to_chunks([1, VS, 260, 260, VE, 2], [(PNG_A, "image/png")], VS, VE)
    assert chunks == [
        Tokens([1, VS]),
        Image(PNG_A, "image/png", 2),
        Tokens([VE, 2]),
    ]


@pytest.mark.parametrize(
    ("tokens", "n_images", "match"),
    [
        ([1, VS, 2], 1, "without a matching vision_end"),
        ([1, VE], 0, "without a matching vision_start"),
        ([VS, VE], 0, "more image brackets"),
        ([1, 2], 1, "more images given"),
        ([VS, VS, VE], 1, "nested"),
    ],
)
def test_prompt_to_chunks_rejects_unbalanced_prompts(
    tokens: list[int], n_images: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        prompt_to_chunks(tokens, [(PNG_A, "image/png")] * n_images, VS, VE)


@pytest.mark.parametrize("images", [[None], [(PNG_A, "image/png"), None]])
def test_prompt_to_chunks_refuses_a_none_past_the_last_bracket_pair(images: list[object]) -> None:
    # A None past the brackets is one image too many (as any other item there is),
    # not the end of the images: it was dropped without a word.
    tokens = [1, VS, 260, VE] if len(images) == 2 else [1, 2]
    with pytest.raises(ValueError, match="more images given"):
        prompt_to_chunks(tokens, images, VS, VE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("vs", "ve", "exc"), [("258", 259, TypeError), (258, None, TypeError), (258, 258, ValueError)]
)
def test_prompt_to_chunks_checks_its_special_ids(vs: object, ve: object, exc: type) -> None:
    # (Even where no bracket occurs: a wrong id would split the next prompt wrong.)
    with pytest.raises(exc, match="vision_"):
        prompt_to_chunks([1, 2], [], vs, ve)  # type: ignore[arg-type]


def test_chunk_constructors_validate_before_anything_is_sent() -> None:
    with pytest.raises(ValueError):
        Tokens([-1])
    with pytest.raises(ValueError):
        Tokens([2**32])
    with pytest.raises(TypeError):
        Tokens("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Tokens([1.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="image type"):
        Image(PNG_A, "text/plain")
    with pytest.raises(TypeError):
        Image("not bytes", "image/png")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Image(PNG_A, "image/png", -1)


chunk_st = st.one_of(
    st.builds(Tokens, st.lists(st.integers(0, 300), min_size=0, max_size=5)),
    st.builds(
        Image,
        st.sampled_from([PNG_A, PNG_B]),
        st.just("image/png"),
        st.integers(0, 4),
    ),
)


def _model_walk(chunks: list[Chunk], committed: int) -> tuple[str, int]:
    """The simple model: prefix sums of lengths; an unknown length poisons what follows.

    Only an image's length is unknown (0); an empty token run is known: 0 (spec §4).
    """
    acc = 0
    for i, c in enumerate(chunks):
        if acc == committed:
            return ("ok", i)
        n = chunk_len(c)
        if isinstance(c, Image) and n == 0:
            return ("unknown_length", i)
        if acc + n > committed:
            return ("straddle", i)
        acc += n
    return ("ok", len(chunks)) if acc == committed else ("short", -1)


@given(st.lists(chunk_st, max_size=8), st.integers(0, 30))
@example([Tokens([1, 2]), Tokens([]), Tokens([3]), Tokens([4])], 3)
def test_walk_chunks_matches_the_prefix_sum_model(chunks: list[Chunk], committed: int) -> None:
    kind, index = _model_walk(chunks, committed)
    if kind == "ok":
        assert walk_chunks(chunks, committed) == index
    else:
        with pytest.raises(SessionDivergence) as info:
            walk_chunks(chunks, committed)
        assert info.value.reason == kind
        assert info.value.committed_len == committed
        if kind != "short":
            assert info.value.chunk_index == index


@pytest.mark.parametrize(
    ("chunks", "committed", "reason", "numbers"),
    [
        ([Image(PNG_A, "image/png"), Tokens([1])], 3, "unknown_length", (0, 0, 0)),
        ([Tokens([1, 2, 3])], 2, "straddle", (0, 0, 3)),
        ([Tokens([1]), Tokens([2])], 5, "short", (None, 2, 0)),
    ],
)
def test_walk_chunks_reports_each_divergence_with_its_numbers(
    chunks: list[Chunk], committed: int, reason: str, numbers: tuple[int | None, int, int]
) -> None:
    with pytest.raises(SessionDivergence) as info:
        walk_chunks(chunks, committed)
    err = info.value
    assert (err.reason, err.chunk_index, err.accumulated, err.chunk_len) == (reason, *numbers)
    assert str(committed) in str(err)


def _flatten(chunks: list[Chunk] | tuple[Chunk, ...]) -> list[object]:
    out: list[object] = []
    for c in chunks:
        if isinstance(c, Tokens):
            out += list(c.ids)
        else:
            assert c.known_expanded_len > 0
            out += [(c.data, i) for i in range(c.known_expanded_len)]
    return out


known_chunk_st = st.one_of(
    st.builds(Tokens, st.lists(st.integers(0, 3), min_size=1, max_size=5)),
    st.builds(Image, st.sampled_from([PNG_A, PNG_B]), st.just("image/png"), st.integers(1, 3)),
)


# The server's placeholder count follows from an image's bytes; a session's
# history records it. A prompt's image may say 0 (unknown), the truth, or a wrong
# number of the caller's own.
SERVER_LEN = {PNG_A: 2, PNG_B: 3}
history_chunk_st = st.one_of(
    st.builds(Tokens, st.lists(st.integers(0, 3), min_size=1, max_size=5)),
    st.sampled_from([PNG_A, PNG_B]).map(lambda d: Image(d, "image/png", SERVER_LEN[d])),
)
prompt_chunk_st = st.one_of(
    st.builds(Tokens, st.lists(st.integers(0, 3), min_size=1, max_size=5)),
    st.builds(Image, st.sampled_from([PNG_A, PNG_B]), st.just("image/png"), st.integers(0, 4)),
)


def _served(chunks: list[Chunk] | tuple[Chunk, ...]) -> list[object]:
    """The positions a server holds for the chunks: each image at its real length."""
    return _flatten(
        [
            attrs.evolve(c, known_expanded_len=SERVER_LEN[c.data]) if isinstance(c, Image) else c
            for c in chunks
        ]
    )


@settings(max_examples=300)
@given(st.lists(history_chunk_st, max_size=6), st.lists(prompt_chunk_st, max_size=6))
def test_rewind_plan_keeps_exactly_the_shared_prefix(
    history: list[Chunk], prompt: list[Chunk]
) -> None:
    committed = sum(chunk_len(c) for c in history)
    plan = plan_delta(prompt, committed, history, rewind=True)
    h, p = _flatten(history), _served(prompt)
    # What stays on the server is a prefix both share ...
    assert plan.offset <= committed
    assert h[: plan.offset] == p[: plan.offset]
    assert plan.truncating == (plan.offset < committed)
    # ... and the delta is exactly the rest of the prompt, whatever lengths the
    # prompt's images claim.
    assert _served(plan.delta) == p[plan.offset :]
    # The shared prefix is maximal (an image of equal bytes is the same image).
    if plan.offset < min(len(h), len(p)):
        assert h[plan.offset] != p[plan.offset]


@settings(max_examples=300)
@given(st.lists(history_chunk_st, max_size=6), st.lists(prompt_chunk_st, max_size=6))
def test_plan_without_rewind_raises_or_sends_exactly_the_rest(
    history: list[Chunk], prompt: list[Chunk]
) -> None:
    committed = sum(chunk_len(c) for c in history)
    try:
        plan = plan_delta(prompt, committed, history, rewind=False)
    except SessionDivergence:
        return
    h, p = _flatten(history), _served(prompt)
    assert (plan.offset, plan.truncating) == (committed, False)
    assert p[:committed] == h
    assert _served(plan.delta) == p[committed:]


def test_plan_does_not_trust_wrong_lengths_that_cancel_out() -> None:
    # The walk by the caller's lengths (1 + 2 = 3, + 1 = 4) ends after Tokens([3]),
    # which the session does not hold (the image took 2 positions).
    history: list[Chunk] = [Image(PNG_A, "image/png", 2), Tokens([1, 2])]
    prompt: list[Chunk] = [Image(PNG_A, "image/png", 1), Tokens([1, 2]), Tokens([3])]
    for rewind in (True, False):
        plan = plan_delta(prompt, 4, history, rewind=rewind)
        assert (plan.offset, plan.truncating, plan.delta) == (4, False, (Tokens([3]),))


@pytest.mark.parametrize(
    "history",
    [[Tokens([1, 2]), Image(PNG_A, "image/png")], [Tokens([1, 2, 3])], [Tokens([1, 2, 3, 4, 5])]],
    ids=["unknown-image-length", "short", "long"],
)
def test_a_history_that_does_not_add_up_is_not_trusted(history: list[Chunk]) -> None:
    prompt: list[Chunk] = [Tokens([1, 2]), Image(PNG_A, "image/png", 2), Tokens([5])]
    plan = plan_delta(prompt, 4, history, rewind=True)
    assert (plan.offset, plan.truncating, plan.delta) == (0, True, tuple(prompt))
    with pytest.raises(SessionDivergence) as info:
        plan_delta(prompt, 4, history, rewind=False)
    assert info.value.reason == "content"


@given(st.lists(known_chunk_st, max_size=6), st.data())
def test_chunks_before_a_boundary_is_that_prefix(chunks: list[Chunk], data: st.DataObject) -> None:
    flat = _flatten(chunks)
    # Any position not inside an image: the end, or one not at an image's 2nd+ unit.
    inside = [isinstance(u, tuple) and u[1] > 0 for u in flat] + [False]
    pos = data.draw(st.sampled_from([i for i, x in enumerate(inside) if not x]))
    assert _flatten(chunks_before(chunks, pos)) == flat[:pos]


def test_rewind_plan_without_divergence_sends_just_the_new_tail() -> None:
    history: list[Chunk] = [Tokens([1, 2]), Image(PNG_A, "image/png", 3), Tokens([4])]
    prompt: list[Chunk] = [
        Tokens([1, 2]),
        Image(PNG_A, "image/png"),  # the caller did not track the length
        Tokens([4, 5, 6]),
    ]
    plan = plan_delta(prompt, 6, history, rewind=True)
    assert plan.offset == 6 and not plan.truncating
    assert plan.delta == (Tokens([5, 6]),)


def test_content_divergence_is_raised_without_rewind() -> None:
    history: list[Chunk] = [Tokens([1, 2, 3])]
    with pytest.raises(SessionDivergence) as info:
        plan_delta([Tokens([1, 9, 3]), Tokens([4])], 3, history, rewind=False)
    assert info.value.reason == "content"
    assert "at position 1" in str(info.value)
    # The chunk that holds the first position that differs (it was None: code that
    # indexes the prompt with it for every reason but "short" failed).
    err = info.value
    assert (err.chunk_index, err.accumulated, err.chunk_len) == (0, 0, 3)
    history = [Tokens([1, 2]), Image(PNG_A, "image/png", 3), Tokens([4, 5])]
    prompt: list[Chunk] = [Tokens([1, 2]), Image(PNG_A, "image/png", 3), Tokens([4, 6])]
    with pytest.raises(SessionDivergence) as info:
        plan_delta(prompt, 7, history, rewind=False)
    err = info.value
    assert (err.reason, err.chunk_index, err.accumulated, err.chunk_len) == ("content", 2, 5, 2)


def test_common_prefix_never_cuts_an_image() -> None:
    a: list[Chunk] = [Tokens([1]), Image(PNG_A, "image/png", 4)]
    b: list[Chunk] = [Tokens([1]), Image(PNG_B, "image/png", 4)]
    assert common_prefix_len(a, b) == 1


@pytest.mark.parametrize(
    "images",
    ["0", [b"\x89PNG"], [(PNG_A,)], [(PNG_A, "image/png", 3)], [42], [None]],
    ids=["str", "bare-bytes", "one-tuple", "three-tuple", "int", "none"],
)
def test_prompt_to_chunks_rejects_images_that_are_not_image_or_pairs(images: object) -> None:
    with pytest.raises(TypeError, match=r"Image or a \(bytes, mime\) pair"):
        prompt_to_chunks([VS, VE], images, VS, VE)  # type: ignore[arg-type]


def test_a_long_run_of_ids_has_a_short_repr_and_a_short_one_an_evaluable_repr() -> None:
    # A 100k-token prompt's repr (in a traceback or a log line) printed every id.
    from poc_api import Tokens, TrainSample

    long = Tokens(range(100_000))
    assert repr(long) == (
        "Tokens(ids=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, ... 99984 more))"
    )
    assert len(repr(TrainSample(range(100_000), [(0, 1)]))) < 150
    short = Tokens([5, 6, 7])
    assert eval(repr(short), {"Tokens": Tokens}) == short


@pytest.mark.parametrize(
    ("tokens", "images", "match"),
    [
        (b"\x01\x02", [], "^tokens must be a sequence of token ids, not bytes$"),
        (bytearray(b"\x01"), [], "^tokens must be a sequence of token ids, not bytearray$"),
        ("12", [], "^tokens must be a sequence of token ids, not a string$"),
        ({3, 1, 2}, [], "^tokens must be a sequence of token ids, not set: its order"),
        ({1: "a", 2: "b"}, [], "^tokens must be a sequence of token ids, not dict: its order"),
        (
            [VS, VE, VS, VE],
            {Image(PNG_A, "image/png"), Image(PNG_A + b"\0", "image/png")},
            "^images must be a sequence of images, not set: its order",
        ),
    ],
)
def test_prompt_to_chunks_refuses_bytes_and_unordered_tokens_or_images(
    tokens: object, images: object, match: str
) -> None:
    # As Tokens, SamplingParams and TrainSample refuse them: b"..." became ids of
    # its bytes, a set of ids a prompt in hash order, and a set of images went to
    # the brackets in an order PYTHONHASHSEED decided.
    with pytest.raises(TypeError, match=match):
        prompt_to_chunks(tokens, images, VS, VE)  # type: ignore[arg-type]
