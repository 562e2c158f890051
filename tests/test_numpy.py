"""numpy at the edges of the API: readouts it wraps without a copy, integers it makes.

numpy is optional for users (tests/test_wire.py checks poc_api works without it);
these tests hold the two promises made to those who have it.
"""

from __future__ import annotations

import decimal
import typing

import numpy as np
import pytest
import trio

import poc_api
from poc_api import SamplingParams, Token, TokenOut, Tokens
from poc_api._types import check_timeout
from poc_api.server import ReferenceServer, tokenize

HELLO = tokenize("Hello world")


def _same_buffer(view: memoryview) -> bool:
    # Two arrays over one memoryview share memory only if neither copied it.
    return bool(np.shares_memory(np.asarray(view), np.asarray(view)))


async def test_numpy_wraps_a_generate_readout_without_a_copy(client: poc_api.ApiClient) -> None:
    manifest = await client.readout_manifest()
    assert manifest is not None
    n_layers, n_concepts = manifest.shape
    with trio.fail_after(10):
        async with (
            client.session() as s,
            s.generate(HELLO, sampling=SamplingParams(max_tokens=2), readout_ranges=[(0, 9)]) as ev,
        ):
            tokens = [e async for e in ev if isinstance(e, Token) and e.readout is not None]
    assert len(tokens) == 9
    for t in tokens:
        assert t.readout is not None
        arr = np.asarray(t.readout)
        assert arr.dtype == np.float32 and arr.shape == (n_layers * n_concepts,)
        assert _same_buffer(t.readout)
        assert arr.tolist() == t.readout.tolist()
        assert arr.reshape(manifest.shape).shape == manifest.shape
        # The typed route the docs recommend copies nothing either; tolist() gives
        # floats (typeshed says list[int]).
        typed = np.asarray(t.readout, dtype=np.float32).reshape(manifest.shape)
        assert (
            np.shares_memory(typed, arr) and typed.tolist() == arr.reshape(manifest.shape).tolist()
        )
        assert all(type(x) is float for x in t.readout.tolist())


async def test_numpy_wraps_a_conversation_readout_as_layers_by_concepts(
    client: poc_api.ApiClient,
) -> None:
    manifest = await client.readout_manifest()
    assert manifest is not None
    with trio.fail_after(10):
        async with (
            client.conversation() as conv,
            conv.stream(
                [Tokens(HELLO)], SamplingParams(max_tokens=3), readout_shape=manifest.shape
            ) as events,
        ):
            tokens = [e async for e in events if isinstance(e, TokenOut)]
    assert len(tokens) == 3
    for t in tokens:
        assert t.readout is not None
        arr = np.asarray(t.readout)
        assert arr.dtype == np.float32 and arr.shape == manifest.shape
        assert _same_buffer(t.readout)
        assert arr.tolist() == t.readout.tolist()
        assert np.shares_memory(np.asarray(t.readout, dtype=np.float32), arr)
        assert all(type(x) is float for row in t.readout.tolist() for x in row)


def test_readout_docs_recommend_the_typed_numpy_route() -> None:
    # typeshed types memoryview.tolist() as list[int], and numpy.asarray(mv) is an
    # array of Any: the docs recommended both. asarray with dtype=numpy.float32 is
    # an NDArray[float32] (tests/typing/user_readouts.py checks it under mypy).
    from pathlib import Path

    from poc_api import _types

    route = "numpy.asarray(ev.readout, dtype=numpy.float32)"
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    readme = " ".join(readme.split())
    docs = {
        "poc_api._types": _types.__doc__ or "",
        "Token": Token.__doc__ or "",
        "TokenOut": TokenOut.__doc__ or "",
        "README.md": readme,
    }
    for where, doc in docs.items():
        doc = " ".join(doc.split()).replace("``", "`")
        assert route in doc, where
        if "tolist()" in doc:
            assert "list[int]" in doc, f"{where}: tolist() is typed list[int]"
    # ... and the fields' own docstrings (shown on hover), in the source.
    source = Path(_types.__file__).read_text(encoding="utf-8")
    fields = source.split("readout: _memoryview[float] | None = attrs.field(")[1:]
    assert len(fields) == 2
    for field in fields:
        docstring = field.split("\n", 1)[1].lstrip()
        assert docstring.startswith('"""') and route in docstring.split('"""')[1].replace("``", "`")


async def test_numpy_integers_are_token_ids_and_become_plain_ints(
    client: poc_api.ApiClient,
) -> None:
    # Token ids come out of tokenizers and models as numpy arrays; they are ints
    # by operator.index, as Python's own sequences take them.
    ids = np.array(HELLO, dtype=np.int64)
    assert all(type(i) is int for i in Tokens(ids).ids)
    sampling = SamplingParams(max_tokens=np.int64(4), top_k=np.uint32(0), logprob_top_k=np.int8(2))
    assert (type(sampling.max_tokens), type(sampling.top_k), type(sampling.logprob_top_k)) == (
        int,
        int,
        int,
    )
    assert sampling == SamplingParams(max_tokens=4, top_k=0, logprob_top_k=2)

    async def decode(tokens: object, prefill: object) -> list[tuple[int, int]]:
        async with client.session() as s:
            await s.prefill(prefill)  # type: ignore[arg-type]
            async with s.generate(tokens, sampling=sampling) as ev:  # type: ignore[arg-type]
                return [(e.id, e.position) async for e in ev if isinstance(e, Token)]

    with trio.fail_after(10):
        plain = await decode(HELLO[3:], HELLO[:3])
        assert await decode(ids[3:], ids[:3]) == plain
        assert await decode(ids[3:].astype(np.int32), list(ids[:3])) == plain

        n = len(HELLO)
        [scored] = await client.score([Tokens(HELLO)], [(1, n)])
        ranges = [(np.int64(1), np.int64(n))]
        assert await client.score([Tokens(ids)], ranges) == [scored]
        assert await client.detokenize(ids) == await client.detokenize(HELLO)


@pytest.mark.parametrize("bad", [np.True_, np.float64(3.0), np.float32(3.0)])
def test_numpy_bools_and_floats_are_not_token_ids(bad: object) -> None:
    with pytest.raises(TypeError, match=r"^ids\[1\] must be an int"):
        Tokens([1, bad])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        SamplingParams(max_tokens=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("array", "error"),
    [
        (np.array([1.0, 2.0]), "ids\\[0\\] must be an int, not float"),
        (np.array([True]), "ids\\[0\\] must be an int, not bool"),
        (np.zeros((2, 2), dtype=np.int64), "ids\\[0\\] must be an int, not list"),
        (np.array([1, -1]), "ids\\[1\\] must be in"),
        (np.array([2**32], dtype=np.uint64), "ids\\[0\\] must be in"),
    ],
)
def test_numpy_arrays_of_anything_but_token_ids_are_refused(array: object, error: str) -> None:
    # Arrays are read whole (tolist: plain ints in one C call), then checked as a list.
    with pytest.raises((TypeError, ValueError), match=error):
        Tokens(array)  # type: ignore[arg-type]


async def test_a_0_d_array_is_refused_as_no_continuations_naming_them(
    client: poc_api.ApiClient,
) -> None:
    # An array is iterable to isinstance, but a 0-d one's tolist() is an int:
    # "'int' object is not iterable", naming neither the argument nor the array.
    prompt = [Tokens([1, 2])]
    with pytest.raises(TypeError, match="continuations must be a sequence of continuations"):
        await client.score_continuations(prompt, np.array(5))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="continuation 1 must be token ids"):
        await client.score_continuations(prompt, [[3], np.array(5)])  # type: ignore[list-item]


async def test_numpy_floats_are_floats_and_become_plain_floats(
    client: poc_api.ApiClient,
) -> None:
    # A temperature or a weight computed with numpy is a numpy float (float32 is
    # not a subclass of float, float64 is); both are taken and stored as floats.
    sampling = SamplingParams(max_tokens=2, temperature=np.float32(0.5), top_p=np.float16(1))
    assert (type(sampling.temperature), type(sampling.top_p)) == (float, float)
    assert sampling == SamplingParams(max_tokens=2, temperature=0.5, top_p=1.0)
    sample = poc_api.TrainSample(HELLO, [(1, 3)], weight=np.float32(2))
    assert type(sample.weight) is float and sample.weight == 2.0
    with trio.fail_after(10):
        async with client.session() as s:
            await s.prefill(HELLO, timeout=np.float32(5))
            async with s.generate([], sampling=sampling) as ev:
                assert [e async for e in ev if isinstance(e, Token)]
        answer = await client.chat(
            [{"role": "user", "content": "hi"}],
            max_tokens=2,
            temperature=np.float32(0.5),
            top_p=np.float64(0.5),
        )
        assert answer.finish_reason == "length"


async def test_a_numpy_float32_timeout_becomes_a_plain_float_trio_deadline(
    client: poc_api.ApiClient,
) -> None:
    # chat_stream, and append_image waiting for its session, made a trio deadline
    # of the timeout as given: a float32 one, which trio's I/O wait refused
    # ("TypeError: timeout must be an integer or None") once it was the nearest
    # deadline, and trio.run died. (The types now take any real number.)
    import time
    from functools import partial

    import trio.testing

    from poc_api.testing import make_png

    async def block_a_while() -> None:
        # The nearest deadline is the call's while trio waits for this thread.
        await trio.to_thread.run_sync(time.sleep, 0.05)

    with trio.fail_after(30):
        messages = [{"role": "user", "content": "hi"}]
        async with client.chat_stream(messages, max_tokens=2, timeout=np.float32(20)) as events:
            await block_a_while()
            assert [e async for e in events]
        async with client.session() as s:
            async with trio.open_nursery() as nursery:
                async with s.generate(HELLO, sampling=SamplingParams(max_tokens=2)) as ev:
                    # The append waits for the session, which this block holds.
                    append = partial(s.append_image, timeout=np.float32(20))
                    nursery.start_soon(append, make_png(), "image/png")
                    await trio.testing.wait_all_tasks_blocked()
                    await block_a_while()
                    async for _ in ev:
                        pass
            assert s.committed_len == len(HELLO) + 2 + 4  # the image's 4 placeholders


@pytest.mark.parametrize(
    "bad",
    [
        np.True_,
        np.array([0.5]),
        np.timedelta64(200, "ms"),
        np.timedelta64(3, "D"),  # (with a unit: numpy deprecates the generic one)
        np.datetime64(1, "s"),
    ],
)
def test_numpy_bools_arrays_and_times_are_not_floats_or_ints(bad: object) -> None:
    # A timedelta64 is an integer to numpy (numbers.Real): taken, a 200 ms
    # timeout became 200 s, or 200,000,000 s in nanoseconds.
    with pytest.raises(TypeError, match="temperature must be a float"):
        SamplingParams(temperature=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout must be a number of seconds"):
        check_timeout("timeout", bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        SamplingParams(max_tokens=bad)  # type: ignore[arg-type]


async def test_numpy_arrays_and_integers_everywhere_ids_ranges_and_counts_are_taken(
    client: poc_api.ApiClient,
) -> None:
    # Where the API takes token ids, (start, end) ranges or a count, numpy's
    # forms of them (an array of ids, a 2-D array of ranges, an int64) work as
    # the lists and ints they stand for.
    ids = np.array(HELLO, dtype=np.int64)
    n = len(HELLO)
    manifest = await client.readout_manifest()
    assert manifest is not None
    with trio.fail_after(20):
        plain = await client.score_continuations([Tokens(HELLO[:3])], [HELLO[3:]])
        assert await client.score_continuations([Tokens(ids[:3])], [ids[3:]]) == plain
        assert await client.score_continuations([Tokens(HELLO[:3])], [iter(HELLO[3:])]) == plain
        # A 2-D array of candidates, a row each (it was refused: not a sequence).
        rows = np.array([HELLO[3:6], HELLO[4:7]], dtype=np.int64)
        two = await client.score_continuations([Tokens(HELLO[:3])], [HELLO[3:6], HELLO[4:7]])
        assert await client.score_continuations([Tokens(ids[:3])], rows) == two
        assert await client.score_continuations([Tokens(ids[:3])], iter(rows)) == two

        scored = await client.score([Tokens(HELLO)], [(1, n), (2, 4)])
        assert await client.score([Tokens(ids)], np.array([[1, n], [2, 4]])) == scored
        many = await client.score_many([([Tokens(HELLO)], [(1, n)])] * 2, max_concurrency=2)
        assert many == await client.score_many(
            [([Tokens(ids)], np.array([[1, n]]))] * 2,  # type: ignore[list-item]
            max_concurrency=np.int64(2),
        )

        async with client.session() as s:
            async with s.generate(
                ids,
                sampling=SamplingParams(max_tokens=1, logprob_top_k=np.int64(1)),
                logprobs_ranges=np.array([[1, n]]),
                readout_ranges=np.array([[0, 2]]),
            ) as ev:
                got = [e async for e in ev if isinstance(e, Token)]
            assert {e.position for e in got if e.is_prefill} == set(range(n))
            assert sum(e.readout is not None for e in got) == 2

        sample = poc_api.TrainSample(ids, np.array([[1, 3]]))
        assert sample.target_ranges == ((1, 3),) and type(sample.target_ranges[0][0]) is int

        shape = np.array(manifest.shape)
        async with (
            client.conversation() as conv,
            conv.stream(
                [Tokens(ids)],
                SamplingParams(max_tokens=1),
                readout_shape=(shape[0], shape[1]),
            ) as events,
        ):
            assert [e async for e in events]

        answer = await client.chat(
            [{"role": "user", "content": "hi"}],
            max_tokens=np.int64(2),
            seed=np.int32(7),
        )
        assert answer.finish_reason == "length"


def test_type_hints_take_numpy_arrays_of_ids_and_numpy_positions() -> None:
    # mypy --strict refused s.prefill(np.array(ids)) (Sequence[int]: an ndarray is
    # only Iterable) and s.rewind(np.int64(3)) (int), which run as the README says;
    # then a list of numpy ids (Iterable[int]), a numpy priority, a numpy float
    # timeout and a bytearray image (tests/typing/user_numpy.py).
    import typing
    from collections.abc import Iterable, Sequence
    from typing import SupportsFloat, SupportsIndex

    def hints(fn: object) -> dict[str, object]:
        return typing.get_type_hints(fn)

    ids = Iterable[SupportsIndex]
    assert hints(poc_api.Session.prefill)["tokens"] == ids
    assert hints(poc_api.Session.generate)["tokens"] == ids
    assert hints(poc_api.ApiClient.detokenize)["tokens"] == ids
    assert hints(poc_api.Tokens.__init__)["ids"] == ids
    assert hints(poc_api.TrainSample.__init__)["tokens"] == ids
    assert hints(poc_api.SamplingParams.__init__)["stop_token_ids"] == ids
    assert hints(poc_api.ReadoutManifest.__init__)["layers"] == ids
    assert ids in typing.get_args(
        typing.get_args(hints(poc_api.ApiClient.score_continuations)["continuations"])[0]
    )
    prompt = hints(poc_api.prompt_to_chunks)
    assert prompt["tokens"] == ids  # read once: any iterable
    assert prompt["vision_start"] == prompt["vision_end"] == SupportsIndex
    assert hints(poc_api.Session.rewind)["length"] == SupportsIndex
    for fn in (poc_api.Session.generate, poc_api.Session.append_image):
        assert hints(fn)["rewind_to"] == SupportsIndex | None
    assert hints(poc_api.Session.generate)["priority"] == SupportsIndex
    stream = hints(poc_api.Conversation.stream)
    assert stream["priority"] == SupportsIndex | None
    assert stream["readout_shape"] == tuple[SupportsIndex, SupportsIndex] | None
    assert hints(poc_api.Session.append_image)["data"] == bytes | bytearray | memoryview
    # Every per-call timeout is checked by check_timeout, which takes any real number.
    timed = [
        poc_api.ApiClient.session,
        poc_api.ApiClient.score,
        poc_api.ApiClient.score_many,
        poc_api.ApiClient.score_continuations,
        poc_api.ApiClient.readout_manifest,
        poc_api.ApiClient.train,
        poc_api.ApiClient.chat,
        poc_api.ApiClient.chat_stream,
        poc_api.ApiClient.tokenize,
        poc_api.ApiClient.detokenize,
        poc_api.ApiClient.tokenizer_info,
        poc_api.Session.prefill,
        poc_api.Session.rewind,
        poc_api.Session.append_image,
        poc_api.Session.generate,
        poc_api.Conversation.stream,
    ]
    for fn in timed:
        timeouts = {k: v for k, v in hints(fn).items() if k.endswith("timeout")}
        assert timeouts and set(timeouts.values()) == {SupportsFloat | None}, fn
    # chat's numbers, which it checks as the gRPC side does.
    for fn in (poc_api.ApiClient.chat, poc_api.ApiClient.chat_stream):
        chat = hints(fn)
        for name in ("max_tokens", "n", "top_logprobs", "seed"):
            assert chat[name] == SupportsIndex | None, name
        assert chat["temperature"] == chat["top_p"] == SupportsFloat | None
    # A float32 temperature, and ranges as lists or a 2-D array, which run.
    init = hints(poc_api.SamplingParams.__init__)
    assert init["temperature"] == init["top_p"] == typing.SupportsFloat
    assert hints(poc_api.TrainSample.__init__)["weight"] == typing.SupportsFloat
    ranges = Iterable[Sequence[typing.SupportsIndex]]
    assert hints(poc_api.ApiClient.score)["ranges"] == ranges
    assert hints(poc_api.Session.generate)["readout_ranges"] == ranges
    assert hints(poc_api.TrainSample.__init__)["target_ranges"] == ranges


class _OnlyFloat:
    def __float__(self) -> float:
        return 0.5


@pytest.mark.parametrize(
    "value",
    [decimal.Decimal("0.5"), np.array(0.5), _OnlyFloat()],
    ids=["Decimal", "0-d array", "__float__"],
)
def test_what_supports_float_admits_runs_too(value: typing.SupportsFloat) -> None:
    # The hints say SupportsFloat (timeouts, temperature, top_p, chat numbers); the
    # run time took only numbers.Real: a Decimal, a 0-d array or any __float__
    # passed the type checker and raised TypeError.
    from poc_api._http import _check_number

    assert check_timeout("timeout", value) == 0.5
    assert poc_api.SamplingParams(temperature=value).temperature == 0.5
    assert _check_number("temperature", value, 0.0, 2.0) == 0.5


@pytest.mark.parametrize(
    "value", [np.True_, np.array([0.5, 1.0]), np.timedelta64(200, "ms"), "0.5", 1j]
)
def test_what_is_no_real_number_is_still_refused(value: object) -> None:
    with pytest.raises(TypeError, match="timeout"):
        check_timeout("timeout", value)  # type: ignore[arg-type]


async def test_a_numpy_max_concurrency_is_clamped_to_the_stream_limit_too(
    server: ReferenceServer,
) -> None:
    # The clamp to max_concurrent_streams took only plain ints: np.int64(8) went
    # through unclamped, and the third call in flight failed with LimitExceeded.
    text = tokenize("It was the best of times, it was the worst of times")
    prompts = [([Tokens(text[: 4 + i])], [(1, 4 + i)]) for i in range(8)]
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, max_concurrent_streams=2
    ) as client:
        with trio.fail_after(20):
            got = await client.score_many(prompts, max_concurrency=np.int64(8))
    assert len(got) == 8


async def test_an_empty_two_dimensional_image_buffer_is_refused_as_empty(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    # len() of a 5 x 0 view is 5: it passed the "image data is empty" check, and an
    # empty AppendImage went out (InvalidRequest).
    empty = memoryview(np.zeros((5, 0), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        poc_api.Image(empty, "image/png")
    async with client.session() as s:
        before = server.state().rpc_counts.get("AppendImage", 0)
        with pytest.raises(ValueError, match="empty"):
            await s.append_image(empty, "image/png")
        assert server.state().rpc_counts.get("AppendImage", 0) == before
        assert not s.lost


async def test_a_0_d_array_is_refused_as_ranges_naming_them(client: poc_api.ApiClient) -> None:
    # (As score_continuations' above: an int from tolist(), then "not iterable".)
    with pytest.raises(TypeError, match=r"ranges must be a sequence of .* not a 0-d ndarray"):
        await client.score([Tokens([1, 2])], np.array(5))  # type: ignore[arg-type]


def test_a_0_d_array_is_refused_as_tokens_naming_it() -> None:
    # (tolist() of a 0-d array is an int: the error said "not int".)
    with pytest.raises(TypeError, match="ids must be a sequence of token ids, not a 0-d ndarray"):
        Tokens(np.array(5))  # type: ignore[arg-type]
