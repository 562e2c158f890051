"""A call whose first attempt the server never processed (a GOAWAY above it) and
whose retry waits for a new connection has nothing on the server: given up on
then, its session is intact."""

from __future__ import annotations

import pytest
import trio
from helpers import make_png
from misbehaving import MisbehavingServer, Reply
from reliability_helpers import misbehaving_client as client_for
from reliability_helpers import slow_new_connections

import poc_api
from poc_api import SamplingParams, Tokens


@pytest.fixture
def slow_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    slow_new_connections(monkeypatch, 1.5)


async def _call(s: poc_api.Session, method: str, timeout: float | None = None) -> None:
    if method == "AppendImage":
        await s.append_image(make_png(4, 4), "image/png", timeout=timeout)
        return
    async with s.generate([3], sampling=SamplingParams(max_tokens=2), timeout=timeout) as ev:
        async for _ in ev:
            pass  # pragma: no cover - never answered


@pytest.mark.usefixtures("slow_reconnect")
@pytest.mark.parametrize("method", ["AppendImage", "Generate"])
@pytest.mark.parametrize("how", ["cancelled", "timed_out"])
async def test_a_call_given_up_on_between_attempts_keeps_the_session(
    bad_server: MisbehavingServer, method: str, how: str
) -> None:
    # Timed out there, the call says "nothing was sent": retriable.
    async with client_for(bad_server) as c, c.session() as s:
        await s.prefill([1, 2])
        bad_server.plan(method, Reply("goaway_open"))
        if how == "cancelled":
            with trio.move_on_after(0.4) as scope:
                await _call(s, method)
            assert scope.cancelled_caught
        else:
            with pytest.raises(poc_api.PocApiTimeout) as info:
                await _call(s, method, timeout=0.4)
            assert info.value.retriable, info.value
        # Never processed (a Generate's count has the prefill's too).
        assert len(bad_server.calls_to(method)) == (1 if method == "AppendImage" else 2)
        assert not s.lost
        with trio.fail_after(5):
            await s.prefill([4])


@pytest.mark.usefixtures("slow_reconnect")
async def test_an_open_session_timed_out_between_attempts_is_retriable(
    bad_server: MisbehavingServer,
) -> None:
    bad_server.plan("OpenSession", Reply("goaway_open"))
    async with client_for(bad_server) as c:
        with pytest.raises(poc_api.PocApiTimeout) as info:
            async with c.session(timeout=0.4):
                pass  # pragma: no cover - never answered
        assert info.value.retriable, info.value
        await trio.sleep(2.0)
        assert len(bad_server.calls_to("OpenSession")) == 1
        assert bad_server.opened == []


@pytest.mark.usefixtures("slow_reconnect")
async def test_a_score_timed_out_between_attempts_is_retriable(
    bad_server: MisbehavingServer,
) -> None:
    # Its one request went out, but the server never processed it: "nothing was sent".
    bad_server.plan("OpenSession", Reply("goaway_open"))
    async with client_for(bad_server) as c:
        with pytest.raises(poc_api.PocApiTimeout) as info:
            await c.score([Tokens([1, 2, 3])], [(1, 3)], timeout=0.4)
        assert info.value.retriable, info.value


def test_a_call_the_trio_side_gave_up_on_unsettled_stays_sent() -> None:
    # The bridge's `unsettled` (its asyncio side ran on past cancel_timeout) says
    # it may yet be sent: the trio side has judged the session by that, so a late
    # "never processed" from the wedged side must not make it unsent again.
    from poc_api._transport import _Progress

    progress = _Progress()
    progress.mark_sent()
    progress.mark_unsettled()
    progress.mark_between()
    assert not progress.unsent()
