"""Fuzzing every public entry point that takes user data.

Whatever comes in, the only exceptions out are PocApiError, ValueError and
TypeError (plus the SessionLost / trio.ClosedResourceError a test provokes on
purpose); nothing hangs, and the client keeps working.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reliability_helpers import make_png

import poc_api
from poc_api import Image, SamplingParams, Tokens, TrainSample, prompt_to_chunks
from poc_api.server import VISION_END, VISION_START, ReferenceServer

# What these find (a check missing before a request is sent) does not depend on the
# Python or dependency versions: one cell of the CI matrix runs them (CI time).
pytestmark = pytest.mark.slow

OK_ERRORS = (poc_api.PocApiError, ValueError, TypeError)
# POC_FUZZ_EXAMPLES raises the count for a longer local hunt.
FUZZ = settings(
    max_examples=int(os.environ.get("POC_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(FUZZ, max_examples=40)

PNG = make_png(56, 28)  # complete: the reference server decodes it

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(min_value=-5, max_value=300), max_size=4),
    st.tuples(st.integers(-3, 300), st.integers(-3, 300)),
)
token_id = st.one_of(
    st.integers(min_value=0, max_value=260),
    st.integers(min_value=-(2**33), max_value=2**33),
    anything,
)
token_list = st.one_of(st.lists(token_id, max_size=12), anything)
a_range = st.one_of(
    st.tuples(st.integers(-2, 40), st.integers(-2, 40)),
    st.lists(st.integers(-2, 40), max_size=3),
    anything,
)
ranges = st.one_of(st.lists(a_range, max_size=4), anything)
image = st.builds(
    lambda data, mime: (data, mime),
    st.one_of(st.just(PNG), st.binary(max_size=40), st.just(b""), anything),
    st.one_of(
        st.sampled_from(["image/png", "image/gif", "image/x-nope", "text/plain", ""]), anything
    ),
)


def build_chunk(kind: str, tokens: Any, img: tuple[Any, Any]) -> Any:
    if kind == "tokens":
        return Tokens(tokens)
    if kind == "image":
        return Image(*img)
    return tokens  # not a chunk at all


chunk_spec = st.tuples(st.sampled_from(["tokens", "tokens", "image", "raw"]), token_list, image)


def chunks_of(specs: Any) -> Any:
    """Build the chunks a spec list describes; constructors may refuse (typed)."""
    if not isinstance(specs, list):
        return specs
    out = []
    for spec in specs:
        if isinstance(spec, tuple) and len(spec) == 3 and isinstance(spec[0], str):
            try:
                out.append(build_chunk(*spec))
            except OK_ERRORS:
                continue
        else:
            out.append(spec)
    return out


safe_chunk = st.one_of(
    st.builds(Tokens, st.lists(st.integers(0, 260), min_size=1, max_size=8)),
    st.just(Image(PNG, "image/png")),
)


def sampling_kwargs() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "max_tokens": st.one_of(st.integers(-2, 6), anything),
            "temperature": st.one_of(st.floats(-1, 3), anything),
            "top_p": st.one_of(st.floats(-0.5, 1.5), anything),
            "top_k": st.one_of(st.integers(-2, 50), anything),
            "stop_token_ids": token_list,
            "logprob_top_k": st.one_of(st.integers(-1, 5), anything),
        },
    )


# -- constructors and pure functions ----------------------------------------------------


@FUZZ
@given(
    base_url=st.one_of(
        st.sampled_from(
            [
                "http://127.0.0.1:8000/v1",
                "https://h/v1",
                "ftp://x",
                "",
                "http://",
                "http://[::1]:1/v1",
            ]
        ),
        anything,
    ),
    api_key=st.one_of(st.text(max_size=10), anything),
    model=st.one_of(st.text(max_size=5), anything),
    grpc_url=st.one_of(st.none(), st.sampled_from(["http://h:1", "nope", "https://h"]), anything),
    numbers=st.dictionaries(
        st.sampled_from(
            [
                "connect_timeout",
                "timeout",
                "close_timeout",
                "max_buffered_events",
                "max_message_size",
                "keepalive_time",
                "keepalive_timeout",
            ]
        ),
        anything,
        max_size=3,
    ),
)
def test_api_client_constructor(
    base_url: Any, api_key: Any, model: Any, grpc_url: Any, numbers: dict[str, Any]
) -> None:
    try:
        c = poc_api.ApiClient(base_url, api_key, model=model, grpc_url=grpc_url, **numbers)
    except OK_ERRORS:
        return
    assert len(api_key) < 4 or api_key not in repr(c)  # (a short key is in any port)


@FUZZ
@given(kwargs=sampling_kwargs())
def test_sampling_params(kwargs: dict[str, Any]) -> None:
    try:
        SamplingParams(**kwargs)
    except OK_ERRORS:
        pass


@FUZZ
@given(tokens=token_list, img=image, expanded=st.one_of(st.integers(-1, 5), anything))
def test_tokens_and_image(tokens: Any, img: tuple[Any, Any], expanded: Any) -> None:
    for make in (
        lambda: Tokens(tokens),
        lambda: Image(*img),
        lambda: Image(img[0], img[1], known_expanded_len=expanded),
    ):
        try:
            make()
        except OK_ERRORS:
            pass


@FUZZ
@given(
    tokens=st.one_of(
        st.lists(st.sampled_from([1, 2, VISION_START, VISION_END, 300, -1]), max_size=14),
        token_list,
    ),
    images=st.one_of(st.lists(image, max_size=3), anything),
    specials=st.tuples(token_id, token_id),
)
@example(tokens=[VISION_START, VISION_END], images="0", specials=(None, None))  # found by this test
def test_prompt_to_chunks(tokens: Any, images: Any, specials: tuple[Any, Any]) -> None:
    for start, end in ((VISION_START, VISION_END), specials):
        try:
            prompt_to_chunks(tokens, images, start, end)
        except OK_ERRORS:
            pass


@FUZZ
@given(tokens=token_list, target=ranges, weight=anything)
def test_train_sample(tokens: Any, target: Any, weight: Any) -> None:
    try:
        TrainSample(tokens=tokens, target_ranges=target, weight=weight)
    except OK_ERRORS:
        pass


# -- calls over the network (one reference server for the run; a client per example) ------


@FEW
@given(
    tokens=token_list,
    kwargs=sampling_kwargs(),
    lp=ranges,
    ro=ranges,
    priority=st.one_of(st.integers(-(2**32), 2**32), anything),
    rewind_to=st.one_of(st.none(), st.integers(-1, 5), anything),
)
async def test_session_generate(
    server: ReferenceServer,
    tokens: Any,
    kwargs: dict[str, Any],
    lp: Any,
    ro: Any,
    priority: Any,
    rewind_to: Any,
) -> None:
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        with trio.fail_after(10):
            async with c.session() as s:
                await s.prefill([1, 2, 3])
                try:
                    sampling = SamplingParams(**kwargs)
                except OK_ERRORS:
                    sampling = SamplingParams(max_tokens=2)
                try:
                    async with s.generate(
                        tokens,
                        sampling=SamplingParams(
                            max_tokens=min(sampling.max_tokens, 8),
                            temperature=sampling.temperature,
                            top_p=sampling.top_p,
                            top_k=sampling.top_k,
                            stop_token_ids=sampling.stop_token_ids,
                            logprob_top_k=sampling.logprob_top_k,
                        ),
                        logprobs_ranges=lp,
                        readout_ranges=ro,
                        priority=priority,
                        rewind_to=rewind_to,
                    ) as ev:
                        async for _ in ev:
                            pass
                except OK_ERRORS:
                    pass
            async with c.session() as s:  # still usable
                await s.prefill([1])


@FEW
@given(
    turns=st.lists(st.lists(st.one_of(chunk_spec, safe_chunk), max_size=4), min_size=1, max_size=3),
    kwargs=sampling_kwargs(),
    priority=st.one_of(st.none(), st.integers(-(2**32), 2**32), anything),
    shape=st.one_of(st.none(), st.tuples(st.integers(-1, 4), st.integers(-1, 9)), anything),
)
async def test_conversation_stream(
    server: ReferenceServer,
    turns: list[list[Any]],
    kwargs: dict[str, Any],
    priority: Any,
    shape: Any,
) -> None:
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        with trio.fail_after(20):
            async with c.conversation() as conv:
                for turn in turns:
                    try:
                        sampling = SamplingParams(**kwargs)
                        sampling = SamplingParams(
                            max_tokens=min(sampling.max_tokens, 8), top_k=sampling.top_k
                        )
                    except OK_ERRORS:
                        sampling = SamplingParams(max_tokens=3)
                    try:
                        async with conv.stream(
                            chunks_of(turn), sampling, priority=priority, readout_shape=shape
                        ) as ev:
                            async for _ in ev:
                                pass
                    except OK_ERRORS:
                        pass
                async with conv.stream([Tokens([1, 2])], SamplingParams(max_tokens=2)) as ev:
                    async for _ in ev:
                        pass


@FEW
@given(
    chunks=st.one_of(st.lists(st.one_of(chunk_spec, safe_chunk), max_size=4), anything),
    rs=ranges,
)
async def test_score(server: ReferenceServer, chunks: Any, rs: Any) -> None:
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        with trio.fail_after(10):
            try:
                results = await c.score(chunks_of(chunks), rs)
            except OK_ERRORS:
                pass
            else:
                assert len(results) == len(rs)
            await c.score([Tokens([1, 2, 3])], [(0, 2)])


message = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "", "tool"]),
            "content": st.one_of(st.text(max_size=10), anything),
        }
    ),
    st.dictionaries(st.text(max_size=5), anything, max_size=3),
    anything,
)


@FEW
@given(
    messages=st.one_of(st.lists(message, max_size=3), anything),
    max_tokens=st.one_of(st.none(), st.integers(-1, 5), anything),
    temperature=st.one_of(st.none(), st.floats(-1, 3), anything),
    stop=st.one_of(
        st.none(), st.text(max_size=3), st.lists(st.text(max_size=2), max_size=2), anything
    ),
    stream=st.booleans(),
)
async def test_chat(
    server: ReferenceServer,
    messages: Any,
    max_tokens: Any,
    temperature: Any,
    stop: Any,
    stream: bool,
) -> None:
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        with trio.fail_after(10):
            try:
                if stream:
                    async with c.chat_stream(
                        messages, max_tokens=max_tokens, temperature=temperature, stop=stop
                    ) as events:
                        async for _ in events:
                            pass
                else:
                    await c.chat(
                        messages, max_tokens=max_tokens, temperature=temperature, stop=stop
                    )
            except OK_ERRORS:
                pass
            await c.chat([{"role": "user", "content": "hi"}], max_tokens=2)
