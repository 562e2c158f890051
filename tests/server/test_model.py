"""The toy model, sampler, readouts and hand-written wire encoding (pure, no I/O)."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from poc_api._proto.salience import GenerateEvent
from poc_api.server._grpc import encode_done, encode_token
from poc_api.server._model import (
    BOS,
    DEFAULT_CONCEPTS,
    EOS,
    IMAGE_PAD,
    READOUT_WINDOW,
    VOCAB_SIZE,
    Readout,
    SamplingSpec,
    default_model,
    detokenize,
    tokenize,
)

PROMPT = tokenize("The keeper climbed the steps ")


def test_tokenize_is_utf8_bytes_and_round_trips() -> None:
    text = "héllo, wörld ✓"
    assert tokenize(text) == list(text.encode())
    assert detokenize(tokenize(text)) == text


def test_detokenize_renders_specials_and_replaces_bad_bytes() -> None:
    assert detokenize([BOS, 72, 105, EOS, IMAGE_PAD]) == "<|bos|>Hi<|eos|><|image_pad|>"
    assert detokenize([0xFF, 65]) == "\ufffdA"


def test_every_distribution_is_normalized_over_the_whole_vocab() -> None:
    model = default_model()
    for ctx in ([], PROMPT, [IMAGE_PAD] * 4, [1, 2, 3, 250]):
        d = model.dist(ctx)
        assert len(d.probs) == VOCAB_SIZE
        assert all(p > 0 for p in d.probs)
        assert math.isclose(sum(math.exp(lp) for lp in d.logprobs), 1.0, rel_tol=1e-9)


def test_top_is_most_likely_first_and_argmax_matches() -> None:
    d = default_model().dist(PROMPT)
    top = d.top(VOCAB_SIZE)
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert top[0][0] == d.argmax
    assert sorted(i for i, _ in top) == list(range(VOCAB_SIZE))


def test_logprob_uses_only_the_prefix() -> None:
    model = default_model()
    seq = PROMPT + tokenize("and lit")
    for p in range(1, len(seq)):
        assert model.logprob(seq, p) == model.dist(seq[:p]).logprobs[seq[p]]
    assert model.logprob(seq, 0) == 0.0


def _decode(spec: SamplingSpec, n: int = 80) -> list[int]:
    model, toks = default_model(), list(PROMPT)
    for _ in range(n):
        toks.append(spec.pick(model.dist(toks), len(toks), toks))
    return toks[len(PROMPT) :]


def test_greedy_text_is_readable() -> None:
    text = detokenize(_decode(SamplingSpec()))
    assert text.replace(" ", "").replace(",", "").replace(".", "").isalpha(), text


def test_sampling_is_deterministic_per_seed_and_differs_from_greedy() -> None:
    hot = SamplingSpec(temperature=1.0, seed=7)
    assert _decode(hot) == _decode(hot)
    assert _decode(hot) != _decode(SamplingSpec())
    assert _decode(hot) != _decode(SamplingSpec(temperature=1.0, seed=8))


@pytest.mark.parametrize(
    ("a", "b"),
    [(-1, -2), (5, 5 + (1 << 61) - 1), (-(1 << 63), -(1 << 63) + (1 << 61) - 1)],
)
def test_distinct_seeds_sample_distinct_text(a: int, b: int) -> None:
    # The draw hashed the seed with hash(), which is an int modulo 2**61 - 1 and
    # maps -1 to -2: seeds -1 and -2 sampled the same text, and a completion with
    # seed=-2 and n=2 (choice i samples with seed + i) gave two identical choices.
    assert _decode(SamplingSpec(temperature=1.0, seed=a)) != _decode(
        SamplingSpec(temperature=1.0, seed=b)
    )


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    greedy = _decode(SamplingSpec())
    assert _decode(SamplingSpec(temperature=1.5, top_k=1, seed=3)) == greedy
    assert _decode(SamplingSpec(temperature=1.0, top_p=1e-9, seed=3)) == greedy


def test_top_k_restricts_choices_to_the_k_most_likely() -> None:
    model, toks = default_model(), list(PROMPT)
    spec = SamplingSpec(temperature=2.0, top_k=3, seed=1)
    for _ in range(200):
        d = model.dist(toks)
        tok = spec.pick(d, len(toks), toks)
        assert tok in {i for i, _ in d.top(3)}
        toks.append(tok)


def test_readout_shape_and_range() -> None:
    r = Readout(DEFAULT_CONCEPTS, 3)
    v = r.vector(PROMPT, 5)
    assert len(v) == 3 * len(DEFAULT_CONCEPTS)
    assert all(0.0 <= x <= 1.0 + 1e-9 for x in v)


def test_readout_depends_only_on_the_prefix() -> None:
    r = Readout(DEFAULT_CONCEPTS, 3)
    long = PROMPT + tokenize("XYZ 123")
    for p in range(len(PROMPT)):
        assert r.vector(long, p) == r.vector(PROMPT[: p + 1], p)


def test_readout_sees_image_positions() -> None:
    r = Readout(DEFAULT_CONCEPTS, 2)
    image = DEFAULT_CONCEPTS.index("image")
    v = r.vector([IMAGE_PAD, IMAGE_PAD], 1)
    assert v[image] == 1.0 and v[len(DEFAULT_CONCEPTS) + image] == 1.0


@given(
    tokens=st.lists(st.integers(-2, VOCAB_SIZE + 2), min_size=1, max_size=40),
    at=st.floats(0, 1),
    layers=st.sampled_from([1, 3, 64]),
    concepts=st.sampled_from([DEFAULT_CONCEPTS, ("image", "vowel", "xyz")]),
)
@example(tokens=PROMPT, at=1.0, layers=64, concepts=DEFAULT_CONCEPTS)  # a full window
def test_readout_is_its_definition_to_the_last_bit(
    tokens: list[int], at: float, layers: int, concepts: tuple[str, ...]
) -> None:
    # vector() adds a layer-tuple at a time: the readouts a server sends must stay
    # those of the definition (each concept's weights summed youngest token first,
    # then divided by the window's total weight), not merely close to them.
    r = Readout(concepts, layers)
    position = min(int(at * len(tokens)), len(tokens) - 1)
    n_c = len(concepts)
    expected = [0.0] * (layers * n_c)
    start = max(0, position - READOUT_WINDOW + 1)
    for age, t in enumerate(reversed(tokens[start : position + 1])):
        for ci in r._active[t] if 0 <= t < VOCAB_SIZE else ():
            for layer in range(layers):
                expected[layer * n_c + ci] += r._weights[layer][age]
    for layer in range(layers):
        for ci in range(n_c):
            expected[layer * n_c + ci] /= r._cum_weights[layer][position - start]
    got = r.vector(tokens, position)
    assert [x.hex() for x in got] == [x.hex() for x in expected]


@given(
    token_id=st.integers(0, 2**32 - 1),
    prefill=st.booleans(),
    position=st.integers(0, 2**32 - 1),
    logprob=st.floats(-1000.0, 0.0, width=32),
    top=st.lists(st.tuples(st.integers(0, 300), st.floats(-50, 0, width=32)), max_size=4),
    readout=st.lists(st.floats(0, 1, width=32), max_size=24),
)
def test_hand_encoded_token_event_parses_with_betterproto2(
    token_id: int,
    prefill: bool,
    position: int,
    logprob: float,
    top: list[tuple[int, float]],
    readout: list[float],
) -> None:
    framed = encode_token(token_id, prefill, position, logprob, top, readout)
    assert framed[0] == 0 and int.from_bytes(framed[1:5], "big") == len(framed) - 5
    tok = GenerateEvent.parse(framed[5:]).token
    assert tok is not None
    assert (tok.id, tok.is_prefill, tok.position) == (token_id, prefill, position)
    assert tok.sampled_logprob == logprob
    assert [(t.id, t.logprob) for t in tok.top_logprobs] == top
    assert list(tok.readout) == readout


def test_hand_encoded_done_parses_with_betterproto2() -> None:
    done = GenerateEvent.parse(encode_done(3, 0, 300, "eos")[5:]).done
    assert done is not None
    assert (done.prompt_tokens, done.completion_tokens, done.total_tokens) == (3, 0, 300)
    assert done.finish_reason == "eos"


def test_the_reference_readout_takes_many_layers() -> None:
    # 3.0**layer overflowed from layer 647: ServerConfig(n_layers=1000) failed as
    # the server started ("OverflowError: Numerical result out of range").
    readout = Readout(("a",), 1000)
    assert len(readout.vector([1, 2, 3], 2)) == 1000
