"""Raw sessions against a model of what the server holds: random prefills, image
appends, generations (read to the end, left by break, an exception or a cancel at a
random event), rewinds, refusals, eviction, a server restart and closes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.lowlevel
from helpers import make_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import poc_api
from poc_api import Done, SamplingParams, Token
from poc_api.server import IMAGE_PAD, ReferenceServer, ServerConfig

PNG = make_png(28, 28, seed=3)
MAX_CONTEXT = 96


class Servers:
    """One reference server, restarted on the same ports on demand."""

    def __init__(self) -> None:
        self.srv = ReferenceServer(ServerConfig(max_context=MAX_CONTEXT))
        self.srv.start()

    def restart(self) -> None:
        port = self.srv.http_port
        self.srv.stop()
        self.srv = ReferenceServer(ServerConfig(port=port, max_context=MAX_CONTEXT))
        self.srv.start()

    def held(self, sid: str) -> list[int] | None:
        rt = self.srv._rt
        assert rt is not None
        try:
            return list(rt.store.get(sid).tokens)
        except Exception:
            return None


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        s.srv.stop()


toks = st.lists(st.integers(1, 200), min_size=0, max_size=8)
op = st.one_of(
    st.tuples(st.just("prefill"), toks, st.none() | st.floats(0, 1)),
    st.tuples(st.just("image"), st.none() | st.floats(0, 1)),
    st.tuples(st.just("generate"), toks, st.integers(0, 6), st.none() | st.floats(0, 1)),
    st.tuples(
        st.just("leave"),
        st.sampled_from(["break", "raise", "cancel", "timeout", "before", "raise_after"]),
        st.integers(0, 8),
        st.integers(1, 12),
    ),
    st.tuples(st.just("rewind"), st.floats(0, 1.3)),
    st.tuples(st.just("waiter"), st.sampled_from(["full", "break", "cancel"]), st.integers(0, 8)),
    st.tuples(st.just("close_under"), st.integers(0, 8)),
    st.tuples(st.just("overflow")),
    st.tuples(st.just("evict"), st.sampled_from(["close", "idle", "restart"])),
)


class Boom(Exception):
    pass


async def run(s: poc_api.Session, ids: list[int], n: int, rewind_to: int | None) -> None:
    async with s.generate(ids, sampling=SamplingParams(max_tokens=n), rewind_to=rewind_to) as ev:
        async for _ in ev:
            pass


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=12))
def test_random_session_calls_keep_committed_len_and_the_server_in_step(
    servers: Servers, ops: list[tuple[object, ...]]
) -> None:
    async def main() -> None:
        async with poc_api.ApiClient(
            servers.srv.base_url, grpc_url=servers.srv.grpc_url, close_timeout=1.0
        ) as c:
            async with c.session() as s:
                model: list[int] = []
                lost_why: str | None = None  # a fragment SessionLost must name
                gone = False  # the server no longer holds the session

                def offset_of(frac: object) -> int | None:
                    return None if frac is None else int(float(frac) * len(model))  # type: ignore[arg-type]

                def check() -> None:
                    if lost_why is not None:
                        assert s.lost
                        return
                    assert not s.lost
                    assert s.committed_len == len(model)
                    if not gone:
                        assert servers.held(s.session_id) == model

                async def expect_lost() -> None:
                    assert lost_why is not None
                    for call in (
                        lambda: s.prefill([1]),
                        lambda: s.rewind(0),
                        lambda: s.append_image(PNG, "image/png"),
                    ):
                        with pytest.raises(poc_api.SessionLost) as info:
                            await call()
                        assert lost_why in str(info.value), (lost_why, str(info.value))
                    with pytest.raises(poc_api.SessionLost):
                        async with s.generate([1]) as ev:
                            async for _ in ev:
                                pass  # pragma: no cover

                async def not_found(call: object) -> None:
                    nonlocal lost_why
                    with pytest.raises(poc_api.SessionNotFound):
                        await call()  # type: ignore[operator]
                    lost_why = "the server does not know it"

                for o in ops:
                    kind = o[0]
                    with trio.fail_after(10):
                        if lost_why is not None:
                            await expect_lost()
                            break
                        if kind == "prefill":
                            ids, frac = list(o[1]), offset_of(o[2])  # type: ignore[call-overload]
                            at = len(model) if frac is None else frac
                            if gone:
                                await not_found(lambda: s.prefill(ids, rewind_to=frac))  # noqa: B023
                            elif at + len(ids) > MAX_CONTEXT:
                                with pytest.raises(poc_api.ContextOverflow):
                                    await s.prefill(ids, rewind_to=frac)
                            else:
                                d = await s.prefill(ids, rewind_to=frac)
                                model = model[:at] + ids
                                assert (d.prompt_tokens, d.total_tokens) == (len(model), len(model))
                        elif kind == "image":
                            frac = offset_of(o[1])
                            at = len(model) if frac is None else frac
                            if gone:
                                await not_found(
                                    lambda: s.append_image(PNG, "image/png", rewind_to=frac)  # noqa: B023
                                )
                            else:
                                try:
                                    r = await s.append_image(PNG, "image/png", rewind_to=frac)
                                except poc_api.ContextOverflow:
                                    assert at + 16 > MAX_CONTEXT
                                else:
                                    model = model[:at] + [IMAGE_PAD] * r.placeholder_count
                                    assert r.total_length == len(model)
                        elif kind == "generate":
                            ids, n, frac = list(o[1]), int(o[2]), offset_of(o[3])  # type: ignore[call-overload]
                            at = len(model) if frac is None else frac
                            if gone:
                                await not_found(lambda: run(s, ids, n, frac))  # noqa: B023
                            elif at + len(ids) > MAX_CONTEXT:
                                with pytest.raises(poc_api.ContextOverflow):
                                    async with s.generate(
                                        ids, sampling=SamplingParams(max_tokens=n), rewind_to=frac
                                    ):
                                        pass  # pragma: no cover
                                assert not s.lost
                            else:
                                out: list[int] = []
                                async with s.generate(
                                    ids, sampling=SamplingParams(max_tokens=n), rewind_to=frac
                                ) as ev:
                                    got = [e async for e in ev]
                                for e in got:
                                    if isinstance(e, Token) and not e.is_prefill:
                                        out.append(e.id)
                                assert isinstance(got[-1], Done)
                                model = model[:at] + ids + out
                        elif kind == "leave":
                            how, k, n = str(o[1]), int(o[2]), int(o[3])  # type: ignore[call-overload]
                            if gone or len(model) + 2 + n > MAX_CONTEXT:
                                continue
                            ids = [5, 6]
                            seen: list[object] = []
                            events = None
                            raised: Exception | None = None
                            try:
                                with trio.CancelScope() as cs:
                                    if how == "before":
                                        cs.cancel()
                                    async with s.generate(
                                        ids,
                                        sampling=SamplingParams(max_tokens=n),
                                        timeout=1e-4 if how == "timeout" else None,
                                    ) as events:
                                        async for e in events:
                                            seen.append(e)
                                            if len(seen) > k:
                                                if how == "break":
                                                    break
                                                if how == "raise":
                                                    raise Boom
                                                if how == "cancel":
                                                    cs.cancel()
                                        if how == "raise_after":
                                            raise Boom
                            except (Boom, poc_api.PocApiTimeout) as exc:
                                raised = exc
                            if how == "raise" and len(seen) > k:
                                assert isinstance(raised, Boom)
                            if how == "raise_after":
                                assert isinstance(raised, Boom)
                            if how == "before":
                                assert not s.lost and not seen
                            elif isinstance(raised, poc_api.PocApiTimeout) and raised.retriable:
                                # Out of time before the server saw it: nothing changed.
                                assert not s.lost and not seen, raised
                            elif events is not None and events.done is not None:
                                # Done arrived (read, or buffered): the session is kept.
                                assert not s.lost, (how, k, n, seen)
                                held = servers.held(s.session_id)
                                assert held is not None
                                assert held[: len(model) + 2] == model + ids
                                assert len(held) == events.done.total_tokens
                                model = held
                            else:
                                assert s.lost, (how, k, n, seen)
                                lost_why = {
                                    "break": "left before its Done",
                                    "raise": "left by Boom before its Done",
                                    "cancel": "cancelled before it finished",
                                    "timeout": "PocApiTimeout",
                                }[how]
                        elif kind == "waiter":
                            how, k = str(o[1]), int(o[2])  # type: ignore[call-overload]
                            if gone or len(model) + 2 + 8 + 1 > MAX_CONTEXT:
                                continue
                            outcome: list[object] = []

                            async def waiter() -> None:
                                try:
                                    outcome.append(await s.prefill([9]))  # noqa: B023
                                except poc_api.PocApiError as exc:
                                    outcome.append(exc)  # noqa: B023

                            async with trio.open_nursery() as nursery:
                                with trio.CancelScope() as cs:
                                    async with s.generate(
                                        [5, 6], sampling=SamplingParams(max_tokens=8)
                                    ) as events:
                                        nursery.start_soon(waiter)
                                        await trio.lowlevel.checkpoint()
                                        n_seen = 0
                                        async for _ in events:
                                            n_seen += 1
                                            if n_seen > k and how == "break":
                                                break
                                            if n_seen > k and how == "cancel":
                                                cs.cancel()
                            assert events is not None
                            if events.done is not None:
                                assert not s.lost
                                assert isinstance(outcome[0], Done), outcome
                                held = servers.held(s.session_id)
                                assert held is not None and held[-1] == 9
                                assert held[: len(model) + 2] == [*model, 5, 6]
                                assert len(held) == events.done.total_tokens + 1
                                model = held
                            else:
                                assert s.lost
                                assert isinstance(outcome[0], poc_api.SessionLost), outcome
                                lost_why = "left before its Done" if how == "break" else "cancelled"
                        elif kind == "close_under":
                            k = int(o[1])  # type: ignore[call-overload]
                            if gone or len(model) + 2 + 8 > MAX_CONTEXT:
                                continue
                            closed_err: BaseException | None = None
                            async with trio.open_nursery() as nursery:
                                try:
                                    async with s.generate(
                                        [5, 6], sampling=SamplingParams(max_tokens=8)
                                    ) as events:
                                        n_seen = 0
                                        async for _ in events:
                                            n_seen += 1
                                            if n_seen == k + 1:
                                                nursery.start_soon(s.aclose)
                                                await trio.sleep(0.01)
                                except trio.ClosedResourceError as exc:
                                    closed_err = exc
                            assert events is not None
                            assert closed_err is not None or events.done is not None
                            assert s.session_id not in servers.srv.state().session_ids
                            with pytest.raises(trio.ClosedResourceError, match="closed"):
                                await s.prefill([1])
                            with pytest.raises(trio.ClosedResourceError, match="closed"):
                                await s.rewind(0)
                            break
                        elif kind == "rewind":
                            length = int(float(o[1]) * len(model))  # type: ignore[arg-type]
                            if length > len(model):
                                with pytest.raises(ValueError, match="past the session's end"):
                                    await s.rewind(length)
                                with pytest.raises(ValueError, match="past the session's end"):
                                    await s.prefill([1], rewind_to=length)
                            elif gone:
                                await not_found(lambda: s.rewind(length))  # noqa: B023
                            else:
                                d = await s.rewind(length)
                                assert d.total_tokens == length
                                model = model[:length]
                        elif kind == "overflow":
                            with pytest.raises(poc_api.ContextOverflow):
                                await s.prefill([1] * (MAX_CONTEXT - len(model) + 1))
                            with pytest.raises(poc_api.ContextOverflow):
                                async with s.generate([1] * (MAX_CONTEXT + 1 - len(model))):
                                    pass  # pragma: no cover
                            assert not s.lost
                        elif kind == "evict":
                            how = str(o[1])
                            if how == "close":
                                assert servers.srv._rt is not None
                                servers.srv._rt.store.close(s.session_id)
                            elif how == "idle":
                                # The server's idle eviction, with a short idle_timeout
                                # for this op only (a loaded machine must not evict it
                                # between other ops).
                                store = servers.srv._rt.store  # type: ignore[union-attr]
                                store.idle_timeout = 0.02
                                try:
                                    await trio.sleep(0.05)
                                    store.evict_idle()  # (or the server's own sweep did)
                                    assert s.session_id not in store.ids()
                                finally:
                                    store.idle_timeout = servers.srv.config.idle_timeout
                            else:
                                await trio.to_thread.run_sync(servers.restart)
                            gone = True
                    check()
                if lost_why is not None:
                    await expect_lost()
            # The block's close: the server no longer holds it, later calls are refused.
            assert s.session_id not in servers.srv.state().session_ids
            with pytest.raises(trio.ClosedResourceError):
                await s.prefill([1])

    trio.run(main)


class SlowServers(Servers):
    def __init__(self) -> None:
        self.cfg = dict(max_context=MAX_CONTEXT, prefill_delay_us=1500, token_delay_ms=1.5)
        self.srv = ReferenceServer(ServerConfig(**self.cfg))  # type: ignore[arg-type]
        self.srv.start()

    def restart(self) -> None:
        port = self.srv.http_port
        self.srv.stop()
        self.srv = ReferenceServer(ServerConfig(port=port, **self.cfg))  # type: ignore[arg-type]
        self.srv.start()


@pytest.fixture(scope="module")
def slow() -> Iterator[SlowServers]:
    s = SlowServers()
    try:
        yield s
    finally:
        s.srv.stop()


timed = st.tuples(
    st.sampled_from(["prefill", "image", "rewind", "generate", "restart_mid"]),
    st.sampled_from(["cancel", "timeout", "first_token", "token"]),
    st.floats(0, 0.03),
)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(timed, min_size=1, max_size=8))
def test_calls_cut_at_random_times_leave_the_session_lost_or_in_step(
    slow: SlowServers, ops: list[tuple[str, str, float]]
) -> None:
    async def main() -> None:
        async with poc_api.ApiClient(
            slow.srv.base_url, grpc_url=slow.srv.grpc_url, close_timeout=1.0
        ) as c:
            async with c.session() as s:
                model: list[int] = []
                for what, how, delay in ops:
                    if len(model) + 40 > MAX_CONTEXT:
                        await s.rewind(0)
                        model = []
                    ids = [3, 4, 5, 6, 7, 8, 9, 10]
                    result: object = None
                    raised: Exception | None = None
                    seen: list[object] = []
                    events = None
                    if what == "restart_mid":
                        how = "restart"  # cut by the server, not by the client
                    to = delay if how == "timeout" else None
                    try:
                        with trio.move_on_after(delay if how == "cancel" else 10):
                            if what == "prefill":
                                result = await s.prefill(ids, timeout=to)
                            elif what == "image":
                                result = await s.append_image(PNG, "image/png", timeout=to)
                            elif what == "rewind":
                                result = await s.rewind(len(model) // 2, timeout=to)
                            else:
                                async with trio.open_nursery() as nursery:
                                    if what == "restart_mid":

                                        async def kill() -> None:
                                            await trio.sleep(delay)  # noqa: B023
                                            await trio.to_thread.run_sync(slow.restart)

                                        nursery.start_soon(kill)
                                    try:
                                        async with s.generate(
                                            ids,
                                            sampling=SamplingParams(max_tokens=6),
                                            timeout=to,
                                            first_token_timeout=delay
                                            if how == "first_token"
                                            else None,
                                            token_timeout=delay if how == "token" else None,
                                        ) as events:
                                            async for e in events:
                                                seen.append(e)
                                    except poc_api.PocApiError as exc:
                                        raised = exc
                    except poc_api.PocApiError as exc:
                        raised = exc
                    if what == "restart_mid":
                        if events is not None and events.done is not None:
                            # Done in before the restart: the session was kept, but the
                            # server that held it is gone.
                            assert not s.lost
                        elif not s.lost:
                            # Sent while the server was down: never processed.
                            assert isinstance(raised, poc_api.PocApiError), (raised, seen)
                            assert raised.retriable, (raised, seen)
                            while True:  # (connecting again may wait out a backoff)
                                try:
                                    await s.prefill([1])
                                except poc_api.ServerUnavailable as exc:
                                    assert exc.retriable and not s.lost
                                    await trio.sleep(0.05)
                                except poc_api.SessionNotFound:
                                    break
                            assert s.lost
                        break
                    if isinstance(result, Done | poc_api.ImageAppend) or (
                        events is not None and events.done is not None
                    ):
                        assert not s.lost
                        rt = slow.srv._rt
                        assert rt is not None
                        model = list(rt.store.get(s.session_id).tokens)
                        assert s.committed_len == len(model)
                        continue
                    if s.lost:
                        with pytest.raises(poc_api.SessionLost):
                            await s.prefill([1])
                        break
                    # Neither returned nor lost: the server never saw the call, or the
                    # call finished (its Done in) as the cancel came.
                    await trio.sleep(0.05)  # (a call that did go out would land by now)
                    rt = slow.srv._rt
                    assert rt is not None
                    held = list(rt.store.get(s.session_id).tokens)
                    assert s.committed_len == len(held), (what, how, delay, held, model)
                    # A timeout that ran out as Done came in (buffered, unread) raises,
                    # and the session is kept with the state Done told.
                    finished = raised is None or isinstance(raised, poc_api.PocApiTimeout)
                    if held != model:
                        assert finished, raised
                        if what == "prefill":
                            assert held == model + ids
                        elif what == "image":
                            assert held[: len(model)] == model and set(held[len(model) :]) == {
                                IMAGE_PAD
                            }
                        elif what == "rewind":
                            assert held == model[: len(model) // 2]
                        else:
                            assert held[: len(model) + len(ids)] == model + ids
                    else:
                        noop = what == "rewind" and len(model) // 2 == len(model)
                        retriable = isinstance(raised, poc_api.PocApiError) and raised.retriable
                        assert raised is None or retriable or (noop and finished), raised
                    model = held

    trio.run(main)
