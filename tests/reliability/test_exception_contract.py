"""One rule for every public call: a single error or a cancellation leaves as itself.

Never a ``BaseExceptionGroup`` the library made; a user's own exception (or group)
raised inside a block leaves it exactly as it was raised, ``__cause__`` and
``__context__`` intact.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from reliability_helpers import make_png

import poc_api
from poc_api import SamplingParams, Tokens
from poc_api._errors import collapse_cancellation
from poc_api.server import ReferenceServer, tokenize
from poc_api.testing import open_client, reference_server

HELLO = tokenize("Hello there, general")
LONG = SamplingParams(max_tokens=300)
PNG = make_png(8, 8)


@pytest.fixture
async def srv() -> AsyncIterator[ReferenceServer]:
    async with reference_server(ignore_eos=True) as server:
        yield server


def _calls(client: poc_api.ApiClient) -> dict[str, Callable[[], Awaitable[object]]]:
    async def prefill() -> None:
        async with client.session() as s:
            await s.prefill(HELLO * 20)

    async def generate() -> None:
        async with client.session() as s, s.generate(HELLO, sampling=LONG) as ev:
            async for _ in ev:
                pass

    async def append_image() -> None:
        async with client.session() as s:
            await s.append_image(PNG, "image/png")

    async def conversation() -> None:
        async with client.conversation() as conv:
            for _ in range(2):
                async with conv.stream([Tokens(HELLO)], SamplingParams(max_tokens=50)) as ev:
                    async for _ in ev:
                        pass

    async def score() -> None:
        await client.score([Tokens(HELLO * 20)], [(1, 50), (60, 100)])

    async def score_many() -> None:
        await client.score_many([([Tokens(HELLO * 5)], [(1, 20)])] * 12, max_concurrency=4)

    async def manifest() -> None:
        await client.readout_manifest()

    async def chat() -> None:
        await client.chat([{"role": "user", "content": "hi"}], max_tokens=20)

    async def chat_stream() -> None:
        async with client.chat_stream([{"role": "user", "content": "hi"}], max_tokens=40) as ev:
            async for _ in ev:
                pass

    return {
        "prefill": prefill,
        "generate": generate,
        "append_image": append_image,
        "conversation": conversation,
        "score": score,
        "score_many": score_many,
        "readout_manifest": manifest,
        "chat": chat,
        "chat_stream": chat_stream,
    }


async def test_a_cancel_at_a_random_point_of_every_public_call_leaves_as_cancelled(
    srv: ReferenceServer,
) -> None:
    rng = random.Random(20261130)
    escaped: list[tuple[str, BaseException]] = []
    async with open_client(srv, model=srv.config.model_name) as client:
        calls = _calls(client)
        with trio.fail_after(60):
            for _ in range(400):
                name = rng.choice(sorted(calls))
                with trio.move_on_after(rng.choice([0, 0, 1e-4, 5e-4, 1e-3, 3e-3, 1e-2])):
                    try:
                        await calls[name]()
                    except BaseException as exc:
                        if isinstance(exc, BaseExceptionGroup):
                            escaped.append((name, exc))
                        raise
    assert not escaped, escaped[:3]


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(["prefill", "generate", "conversation", "score", "score_many", "chat_stream"]),
    st.floats(0, 0.01),
)
def test_outer_cancellation_leaves_every_call_as_trio_cancelled(name: str, delay: float) -> None:
    # Cancelled from outside, by another task, however deep it lands.
    seen: list[BaseException] = []

    async def main() -> None:
        async with reference_server(ignore_eos=True) as server:
            async with open_client(server, model=server.config.model_name) as client:
                call = _calls(client)[name]
                with trio.CancelScope() as scope:

                    async def cancel_later() -> None:
                        await trio.sleep(delay)
                        scope.cancel()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(cancel_later)
                        try:
                            await call()
                        except BaseException as exc:
                            seen.append(exc)
                            raise
                        nursery.cancel_scope.cancel()

    trio.run(main)
    assert all(isinstance(x, trio.Cancelled) for x in seen), seen


def _chained() -> ValueError:
    try:
        raise KeyError("inner")
    except KeyError as inner:
        try:
            raise ValueError("outer") from inner
        except ValueError as outer:
            return outer


async def _raise_in_blocks(client: poc_api.ApiClient, exc: BaseException) -> None:
    async with client.session() as s, s.generate(HELLO, sampling=LONG) as ev:
        async for _ in ev:
            raise exc


async def _raise_in_conversation(client: poc_api.ApiClient, exc: BaseException) -> None:
    async with client.conversation() as conv:
        async with conv.stream([Tokens(HELLO)], LONG) as ev:
            async for _ in ev:
                raise exc


async def _raise_in_chat(client: poc_api.ApiClient, exc: BaseException) -> None:
    async with client.chat_stream([{"role": "user", "content": "hi"}], max_tokens=40) as ev:
        async for _ in ev:
            raise exc


@pytest.mark.parametrize("where", [_raise_in_blocks, _raise_in_conversation, _raise_in_chat])
async def test_a_users_exception_leaves_every_block_untouched(
    srv: ReferenceServer,
    where: Callable[[poc_api.ApiClient, BaseException], Awaitable[None]],
) -> None:
    async with open_client(srv, model=srv.config.model_name) as client:
        with trio.fail_after(10):
            chained = _chained()
            with pytest.raises(ValueError) as info:
                await where(client, chained)
            assert info.value is chained
            assert isinstance(info.value.__cause__, KeyError)
            assert info.value.__suppress_context__

            mine = ExceptionGroup("mine", [ValueError("a")])
            with pytest.raises(ExceptionGroup) as group_info:
                await where(client, mine)
            assert group_info.value is mine


def test_an_error_made_from_something_not_a_str_has_its_text() -> None:
    # As Exception(x) does; escaping control characters (str.translate) made
    # PocApiError(123) an AttributeError.
    assert str(poc_api.PocApiError(123)) == "123"  # type: ignore[arg-type]
    cause = ValueError("bad\nthing")
    assert str(poc_api.ServerUnavailable(cause)) == "bad\\x0athing"  # type: ignore[arg-type]


# -- collapse_cancellation: the library's own nurseries ----------------------------------


async def test_a_nursery_group_with_an_error_besides_cancellation_is_not_collapsed() -> None:
    # An error raised as an outer cancellation lands must reach the caller: only
    # groups of nothing but cancellation (and Ctrl-C) become one exception.
    async def fail(outer: trio.CancelScope) -> None:
        outer.cancel()
        raise ValueError("boom")  # no checkpoint between: raised, not cancelled

    left: list[BaseException] = []
    with trio.CancelScope() as outer:
        try:
            with collapse_cancellation():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.sleep_forever)
                    nursery.start_soon(fail, outer)
        except BaseException as exc:  # whatever left, to look at below
            left.append(exc)
    assert len(left) == 1
    group = left[0]
    assert isinstance(group, BaseExceptionGroup), repr(group)
    errors, rest = group.split(ValueError)
    assert errors is not None and str(errors.exceptions[0]) == "boom"
    # It held a cancellation too, so this was the case to get right.
    assert rest is not None and rest.split(trio.Cancelled)[1] is None


async def test_ctrl_c_wins_over_cancellation_when_a_group_of_both_is_collapsed() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            cancelled = exc  # a real one: trio.Cancelled has no public constructor
    ki = KeyboardInterrupt()
    left: list[BaseException] = []
    try:
        with collapse_cancellation():
            raise BaseExceptionGroup("both", [cancelled, ki])
    except BaseException as exc:  # a Cancelled leaving would not fail the test by itself
        left.append(exc)
    assert len(left) == 1 and left[0] is ki, repr(left)
