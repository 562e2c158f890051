"""Agents sharing one client, each running random calls, cancelled from other tasks
at random points (and now and then the client closed under them). Seeded.

Each round checks that nothing but a cancel (caught by its scope), a PocApiError, or
trio.ClosedResourceError after a close left a block; that nothing hung; that every
session is gone from the server; that the client's threads and trio tasks ended
with its block; and that what a call returned (or streamed before its cancel) is
what an uncancelled call gives. Shapes: random op sequences, cancels at the first
event, during an image upload, during a conversation's regeneration, during the
manifest's shared fetch, during the client's close, on a shared conversation, a
shared raw session, a crowded server, an evicted session, a pool losing a server.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from typing import ClassVar

import pytest
import trio
import trio.lowlevel
from reliability_helpers import trio_task_census, wait_for

import poc_api
from poc_api import Image, SamplingParams, Tokens, TrainSample
from poc_api.server import tokenize
from poc_api.testing import make_png, reference_server

HELLO = tokenize("The quick brown fox")
PNG = make_png(56, 56)
SP = SamplingParams(max_tokens=12)
OUTCOMES: Counter[tuple[str, str]] = Counter()


async def all_ended(servers, threads_before: set, tasks_before) -> None:
    """After a round: no session left on any server, the client's threads and trio
    tasks gone with its block."""
    await wait_for(lambda: not any(s.state().session_ids for s in servers))
    await wait_for(
        lambda: not ({t.ident for t in threading.enumerate() if t.is_alive()} - threads_before)
    )
    assert trio_task_census() == tasks_before


async def run_seeds(round_fn, server, seeds, **kwargs) -> None:
    """``round_fn(server, seed)`` for each seed, a failure noted with its seed."""
    for seed in seeds:
        try:
            await round_fn(server, seed, **kwargs)
        except BaseException as exc:
            exc.add_note(f"seed {seed}")
            raise


class Agent:
    def __init__(self, client, server, rng, expected, closed_flag):
        self.client = client
        self.server = server
        self.rng = rng
        self.expected = expected
        self.closed = closed_flag
        self.scope: trio.CancelScope | None = None
        self.errors: list[BaseException] = []
        self.session_ids: set[str] = set()

    async def op_generate(self) -> None:
        async with self.client.session() as s:
            self.session_ids.add(s.session_id)
            if self.rng.random() < 0.3:
                await s.append_image(PNG, "image/png")
                await s.prefill(HELLO)
                key = "gen_img"
            else:
                key = "gen"
                await s.prefill(HELLO)
            got = []
            async with s.generate(sampling=SP) as ev:
                async for e in ev:
                    if isinstance(e, poc_api.Token) and not e.is_prefill:
                        got.append(e.id)
                        # what arrived before a cancel is right
                        assert got == self.expected[key][: len(got)], (key, got)
            exp = self.expected[key]
            assert got == exp, (key, got, exp)

    async def op_stream_partial(self) -> None:
        async with self.client.session() as s:
            self.session_ids.add(s.session_id)
            async with s.generate(HELLO, sampling=SP) as ev:
                n = self.rng.choice([0, 1, 3])
                got = []
                async for e in ev:
                    if isinstance(e, poc_api.Token) and not e.is_prefill:
                        got.append(e.id)
                        assert got == self.expected["gen"][: len(got)], got
                    n -= 1
                    if n <= 0:
                        break

    async def op_score(self) -> None:
        r = await self.client.score(
            [Tokens(HELLO), Image(PNG, "image/png"), Tokens(HELLO)], [(1, 5), (20, 24)]
        )
        assert [x.logprob for x in r] == self.expected["score"]

    async def op_score_cont(self) -> None:
        r = await self.client.score_continuations([Tokens(HELLO)], [[1, 2, 3], [4, 5], []])
        assert [x.logprob for x in r] == self.expected["cont"]

    async def op_score_many(self) -> None:
        r = await self.client.score_many(
            [([Tokens([*HELLO, 7, 8])], [(2, 6)]), ([Tokens([*HELLO, 9])], [(2, 6)])],
            share_prefix=self.rng.random() < 0.5,
        )
        assert [[x.logprob for x in y] for y in r] == self.expected["many"]

    async def op_conversation(self) -> None:
        async with self.client.conversation() as conv:
            hist = [Tokens(HELLO)]
            for _turn in range(self.rng.randint(1, 3)):
                async with conv.stream(hist, SP) as ev:
                    dec = [e.id async for e in ev if isinstance(e, poc_api.TokenOut)]
                if conv.session is not None:
                    self.session_ids.add(conv.session.session_id)
                if self.rng.random() < 0.5:
                    # regenerate: same history again (rewinds)
                    async with conv.stream(hist, SP) as ev:
                        dec2 = [e.id async for e in ev if isinstance(e, poc_api.TokenOut)]
                    assert dec2 == dec
                hist = [*hist, Tokens(dec), Tokens([32])]

    async def op_conv_image(self) -> None:
        async with self.client.conversation() as conv:
            async with conv.stream(
                [Tokens(HELLO), Image(PNG, "image/png"), Tokens(HELLO)], SP
            ) as ev:
                async for _ in ev:
                    pass

    async def op_manifest(self) -> None:
        m = await self.client.readout_manifest()
        assert m is None or m == self.expected["manifest"]

    async def op_train(self) -> None:
        r = await self.client.train([TrainSample(HELLO, [(1, 3)])])
        assert r is not None

    async def op_chat(self) -> None:
        r = await self.client.chat([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
        assert r.text == self.expected["chat"]

    async def op_chat_stream(self) -> None:
        async with self.client.chat_stream(
            [{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
        ) as st:
            async for _ in st:
                pass

    async def op_tokenize(self) -> None:
        assert await self.client.tokenize("The quick brown fox") == HELLO

    OPS: ClassVar[list[str]] = [
        "op_generate",
        "op_stream_partial",
        "op_score",
        "op_score_cont",
        "op_score_many",
        "op_conversation",
        "op_conv_image",
        "op_manifest",
        "op_train",
        "op_chat",
        "op_chat_stream",
        "op_tokenize",
    ]

    async def run(self, n_ops: int) -> None:
        for _ in range(n_ops):
            name = self.rng.choice(self.OPS)
            delay = self.rng.choice([None, 0, 0.0005, 0.002, 0.01, 0.05])
            try:
                with trio.CancelScope() as scope:
                    self.scope = scope
                    if delay is not None:
                        scope.deadline = trio.current_time() + delay
                    await getattr(self, name)()
                OUTCOMES[name, "cancelled" if scope.cancelled_caught else "ok"] += 1
            except poc_api.PocApiError as exc:
                OUTCOMES[name, type(exc).__name__] += 1
            except trio.ClosedResourceError:
                OUTCOMES[name, "closed"] += 1
                if not self.closed[0]:
                    self.errors.append(AssertionError(f"{name}: ClosedResourceError before close"))
            except BaseException as exc:
                exc.add_note(f"op {name} delay {delay}")
                self.errors.append(exc)
            finally:
                self.scope = None
            await trio.lowlevel.checkpoint()


async def expectations(client) -> dict:
    exp = {}
    for key, img in (("gen", False), ("gen_img", True)):
        async with client.session() as s:
            if img:
                await s.append_image(PNG, "image/png")
            await s.prefill(HELLO)
            async with s.generate(sampling=SP) as ev:
                exp[key] = [
                    e.id async for e in ev if isinstance(e, poc_api.Token) and not e.is_prefill
                ]
    exp["score"] = [
        x.logprob
        for x in await client.score(
            [Tokens(HELLO), Image(PNG, "image/png"), Tokens(HELLO)], [(1, 5), (20, 24)]
        )
    ]
    exp["cont"] = [
        x.logprob
        for x in await client.score_continuations([Tokens(HELLO)], [[1, 2, 3], [4, 5], []])
    ]
    exp["many"] = [
        [x.logprob for x in y]
        for y in await client.score_many(
            [([Tokens([*HELLO, 7, 8])], [(2, 6)]), ([Tokens([*HELLO, 9])], [(2, 6)])]
        )
    ]
    exp["manifest"] = await client.readout_manifest()
    exp["chat"] = (
        await client.chat([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    ).text
    return exp


async def one_round(server, seed: int, servers=None, kill=None) -> None:
    rng = random.Random(seed)
    servers = servers or [server]
    threads_before = {t.ident for t in threading.enumerate()}
    tasks_before = trio_task_census()
    closed = [False]
    agents: list[Agent] = []
    with trio.fail_after(30):
        async with poc_api.ApiClient(
            server.base_url, grpc_url=[s.grpc_url for s in servers], close_timeout=2.0
        ) as client:
            exp = await expectations(client)
            agents = [
                Agent(client, server, random.Random(rng.random()), exp, closed) for _ in range(6)
            ]

            async def canceller() -> None:
                while True:
                    await trio.sleep(rng.choice([0, 0.0005, 0.001, 0.005, 0.02]))
                    a = rng.choice(agents)
                    if a.scope is not None:
                        a.scope.cancel()

            async def closer() -> None:
                await trio.sleep(rng.uniform(0, 0.3))
                closed[0] = True
                await client.aclose()

            async def killer() -> None:
                await trio.sleep(rng.uniform(0, 0.1))
                await trio.to_thread.run_sync(kill.stop)

            async with trio.open_nursery() as outer:
                outer.start_soon(canceller)
                if rng.random() < 0.3:
                    outer.start_soon(closer)
                if kill is not None:
                    outer.start_soon(killer)
                async with trio.open_nursery() as nursery:
                    for a in agents:
                        nursery.start_soon(a.run, rng.randint(3, 10))
                outer.cancel_scope.cancel()
    errors = [e for a in agents for e in a.errors]
    assert errors == [], errors[:3]
    await all_ended([s for s in servers if s is not kill], threads_before, tasks_before)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(3))
async def test_agents_cancelled_at_random(block: int) -> None:
    async with reference_server(seed=1) as server:
        await run_seeds(one_round, server, range(block * 20, block * 20 + 20))


BIG_PNG = make_png(1120, 1120, seed=3)


async def shaped_round(server, seed: int) -> None:
    """Cancellations at chosen points: first event, image upload, regeneration,
    the manifest's shared fetch, and the client's own close."""
    rng = random.Random(seed)
    threads_before = {t.ident for t in threading.enumerate()}
    tasks_before = trio_task_census()
    errors: list[BaseException] = []
    closed = [False]
    results: dict[str, list] = {"manifest": []}

    async def guarded(name, fn, deadline=None, scope_out=None):
        try:
            with trio.CancelScope() as scope:
                if scope_out is not None:
                    scope_out.append(scope)
                if deadline is not None:
                    scope.deadline = trio.current_time() + deadline
                await fn(scope)
            OUTCOMES[name, "cancelled" if scope.cancelled_caught else "ok"] += 1
        except poc_api.PocApiError as exc:
            OUTCOMES[name, type(exc).__name__] += 1
        except trio.ClosedResourceError:
            OUTCOMES[name, "closed"] += 1
            if not closed[0]:
                errors.append(AssertionError(f"{name}: ClosedResourceError before close"))
        except BaseException as exc:
            exc.add_note(f"{name}")
            errors.append(exc)

    with trio.fail_after(30):
        async with poc_api.ApiClient(
            server.base_url, grpc_url=server.grpc_url, close_timeout=2.0
        ) as client:

            async def first_event(scope):
                async with client.session() as s, s.generate(HELLO, sampling=SP) as ev:
                    scope.cancel()
                    async for _ in ev:
                        raise AssertionError("event after cancel")

            async def conv_first_event(scope):
                async with client.conversation() as conv:
                    async with conv.stream([Tokens(HELLO)], SP) as ev:
                        dec = [e.id async for e in ev if isinstance(e, poc_api.TokenOut)]
                    # regenerate from a shorter history: the session rewinds
                    hist = [Tokens(HELLO[:-1]), Tokens([5, 6])]
                    with trio.CancelScope() as inner:
                        inner.deadline = trio.current_time() + rng.choice([0, 0.0002, 0.001, 0.003])
                        async with conv.stream(hist, SP) as ev:
                            if rng.random() < 0.5:
                                inner.cancel()
                            async for _ in ev:
                                pass
                    if rng.random() < 0.3:
                        # cancelled at the first event of the regeneration's own turn
                        with trio.CancelScope() as inner:
                            async with conv.stream([Tokens(HELLO), Tokens([9])], SP) as ev:
                                inner.cancel()
                                async for _ in ev:
                                    raise AssertionError("event after cancel")
                    async with conv.stream([Tokens(HELLO)], SP) as ev:
                        dec2 = [e.id async for e in ev if isinstance(e, poc_api.TokenOut)]
                    assert dec2 == dec

            async def upload(scope):
                async with client.session() as s:
                    await s.prefill([1, 2])
                    scope.deadline = trio.current_time() + rng.choice([0, 0.001, 0.005, 0.02])
                    await s.append_image(BIG_PNG, "image/png")
                    await s.prefill([3])

            async def manifest(scope):
                m = await client.readout_manifest()
                results["manifest"].append(m)

            async def close(scope):
                await trio.sleep(rng.uniform(0, 0.05))
                closed[0] = True
                await client.aclose()

            async with trio.open_nursery() as nursery:
                scopes: list[trio.CancelScope] = []
                for _ in range(rng.randint(2, 6)):
                    nursery.start_soon(guarded, "manifest", manifest, None, scopes)
                for fn in (first_event, conv_first_event, upload, first_event, conv_first_event):
                    nursery.start_soon(guarded, fn.__name__, fn)
                if rng.random() < 0.5:
                    nursery.start_soon(guarded, "close", close, rng.choice([None, 0, 0.001, 0.01]))
                    if rng.random() < 0.5:
                        nursery.start_soon(guarded, "close2", close, rng.choice([None, 0, 0.001]))
                await trio.sleep(rng.choice([0, 0.0005, 0.002]))
                for sc in scopes:
                    if rng.random() < 0.5:
                        sc.cancel()
    assert errors == [], errors[:3]
    for m in results["manifest"]:
        assert m is not None and m.concepts, m
    await all_ended([server], threads_before, tasks_before)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(3))
async def test_cancelled_at_chosen_points(block: int) -> None:
    async with reference_server(seed=1) as server:
        await run_seeds(shaped_round, server, range(block * 20, block * 20 + 20))


async def shared_conversation_round(server, seed: int) -> None:
    """Several tasks take turns on one conversation; turns are cancelled, time out
    waiting, and the conversation (or the client) is closed from another task."""
    rng = random.Random(seed)
    threads_before = {t.ident for t in threading.enumerate()}
    tasks_before = trio_task_census()
    errors: list[BaseException] = []
    closed = [False]
    with trio.fail_after(30):
        async with poc_api.ApiClient(
            server.base_url, grpc_url=server.grpc_url, close_timeout=2.0
        ) as client:
            async with client.session() as s, s.generate(HELLO, sampling=SP) as ev:
                expected = [
                    e.id async for e in ev if isinstance(e, poc_api.Token) and not e.is_prefill
                ]
            async with client.conversation() as conv:

                async def turn(i: int) -> None:
                    name = f"turn{i}"
                    try:
                        with trio.CancelScope() as scope:
                            d = rng.choice([None, 0, 0.0005, 0.002, 0.01])
                            if d is not None:
                                scope.deadline = trio.current_time() + d
                            timeout = rng.choice([None, None, 0.001, 0.01])
                            async with conv.stream([Tokens(HELLO)], SP, timeout=timeout) as ev:
                                if rng.random() < 0.2:
                                    scope.cancel()
                                got = [e.id async for e in ev if isinstance(e, poc_api.TokenOut)]
                            assert got == expected, (got, expected)
                        OUTCOMES[name[:4], "cancelled" if scope.cancelled_caught else "ok"] += 1
                    except poc_api.PocApiError as exc:
                        OUTCOMES[name[:4], type(exc).__name__] += 1
                    except trio.ClosedResourceError:
                        OUTCOMES[name[:4], "closed"] += 1
                        if not closed[0]:
                            errors.append(
                                AssertionError(f"{name}: ClosedResourceError before close")
                            )
                    except BaseException as exc:
                        exc.add_note(name)
                        errors.append(exc)

                async def closer() -> None:
                    await trio.sleep(rng.uniform(0, 0.02))
                    closed[0] = True
                    with trio.move_on_after(rng.choice([0, 0.001, 1])):
                        if rng.random() < 0.5:
                            await conv.aclose()
                        else:
                            await client.aclose()

                async with trio.open_nursery() as nursery:
                    for i in range(rng.randint(2, 6)):
                        nursery.start_soon(turn, i)
                    if rng.random() < 0.4:
                        nursery.start_soon(closer)
    assert errors == [], errors[:3]
    await all_ended([server], threads_before, tasks_before)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(3))
async def test_shared_conversation_cancelled(block: int) -> None:
    async with reference_server(seed=1) as server:
        await run_seeds(shared_conversation_round, server, range(block * 20, block * 20 + 20))


async def crowded_round(server, seed: int) -> None:
    """A server capped at a few sessions, a small context: score_many backs off on
    RESOURCE_EXHAUSTED, some prompts overflow, and the calls are cancelled at random."""
    rng = random.Random(seed)
    threads_before = {t.ident for t in threading.enumerate()}
    tasks_before = trio_task_census()
    errors: list[BaseException] = []
    closed = [False]
    with trio.fail_after(30):
        async with poc_api.ApiClient(
            server.base_url, grpc_url=server.grpc_url, close_timeout=2.0
        ) as client:
            base = [([Tokens([*HELLO, i])], [(1, 5)]) for i in range(12)]
            want = [
                [x.logprob for x in y] for y in await client.score_many(base, max_concurrency=2)
            ]

            async def call(i: int) -> None:
                name = f"many{i}"
                prompts = list(base)
                overflow = rng.random() < 0.3
                if overflow:
                    prompts[rng.randrange(len(prompts))] = ([Tokens([1] * 300)], [(1, 5)])
                try:
                    with trio.CancelScope() as scope:
                        d = rng.choice([None, 0.001, 0.005, 0.02])
                        if d is not None:
                            scope.deadline = trio.current_time() + d
                        r = await client.score_many(
                            prompts,
                            max_concurrency=rng.choice([2, 4, 16]),
                            share_prefix=rng.random() < 0.5,
                        )
                        assert not overflow
                        assert [[x.logprob for x in y] for y in r] == want
                    OUTCOMES["many", "cancelled" if scope.cancelled_caught else "ok"] += 1
                except poc_api.PocApiError as exc:
                    OUTCOMES["many", type(exc).__name__] += 1
                except trio.ClosedResourceError:
                    OUTCOMES["many", "closed"] += 1
                    if not closed[0]:
                        errors.append(AssertionError(f"{name}: ClosedResourceError before close"))
                except BaseException as exc:
                    exc.add_note(name)
                    errors.append(exc)

            async def closer() -> None:
                await trio.sleep(rng.uniform(0, 0.05))
                closed[0] = True
                await client.aclose()

            async with trio.open_nursery() as nursery:
                for i in range(rng.randint(2, 5)):
                    nursery.start_soon(call, i)
                if rng.random() < 0.2:
                    nursery.start_soon(closer)
    assert errors == [], errors[:3]
    await all_ended([server], threads_before, tasks_before)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(3))
async def test_crowded_score_many_cancelled(block: int) -> None:
    async with reference_server(seed=1, max_sessions=3, max_context=256) as server:
        await run_seeds(crowded_round, server, range(block * 20, block * 20 + 20))


async def test_one_client_through_many_cancelled_rounds_keeps_no_slot() -> None:
    """Every stream slot and HTTP slot a cancelled call took is given back: after
    hundreds of cancelled calls on one client, it still runs its full concurrency."""
    async with reference_server(seed=1, token_delay_ms=0.5) as server:
        async with poc_api.ApiClient(
            server.base_url,
            grpc_url=server.grpc_url,
            max_concurrent_streams=8,
            max_http_connections=4,
        ) as client:
            exp = await expectations(client)
            rng = random.Random(7)
            closed = [False]
            for _ in range(15):
                agents = [
                    Agent(client, server, random.Random(rng.random()), exp, closed)
                    for _ in range(4)
                ]

                async def canceller(agents: list[Agent]) -> None:
                    while True:
                        await trio.sleep(rng.choice([0, 0.0005, 0.001, 0.005]))
                        a = rng.choice(agents)
                        if a.scope is not None:
                            a.scope.cancel()

                with trio.fail_after(30):
                    async with trio.open_nursery() as outer:
                        outer.start_soon(canceller, agents)
                        async with trio.open_nursery() as nursery:
                            for a in agents:
                                nursery.start_soon(a.run, 6)
                        outer.cancel_scope.cancel()
                errors = [
                    e for a in agents for e in a.errors if not isinstance(e, poc_api.LimitExceeded)
                ]
                assert errors == [], errors[:3]
            assert client._streams.used == 0
            assert client._http._calls.in_flight == 0
            # the full concurrency still runs
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(client.score, [Tokens(HELLO)], [(1, 3)])
                    for _ in range(4):
                        nursery.start_soon(client.tokenize, "abc")
        await wait_for(lambda: not (server.state().session_ids))


async def evicted_round(server, seed: int) -> None:
    """Turns on a conversation whose session the server evicted meanwhile: the
    transparent replacement (a new session, the whole prompt again) is cancelled
    at random points."""
    rng = random.Random(seed)
    threads_before = {t.ident for t in threading.enumerate()}
    tasks_before = trio_task_census()
    with trio.fail_after(30):
        async with poc_api.ApiClient(
            server.base_url, grpc_url=server.grpc_url, close_timeout=2.0
        ) as client:
            async with client.conversation() as conv:
                async with conv.stream([Tokens(HELLO)], SP) as ev:
                    first = [e.id async for e in ev if isinstance(e, poc_api.TokenOut)]
                hist = [Tokens(HELLO), Tokens(first), Tokens([32])]
                async with client.conversation() as ref:
                    async with ref.stream(hist, SP) as ev:
                        want = [e.id async for e in ev if isinstance(e, poc_api.TokenOut)]
                await trio.sleep(0.15)  # evicted meanwhile
                with trio.CancelScope() as scope:
                    scope.deadline = trio.current_time() + rng.choice(
                        [0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.03, 1]
                    )
                    async with conv.stream(hist, SP) as ev:
                        got = [e.id async for e in ev if isinstance(e, poc_api.TokenOut)]
                    assert got == want
                OUTCOMES["evicted", "cancelled" if scope.cancelled_caught else "ok"] += 1
                async with conv.stream(hist, SP) as ev:
                    got = [e.id async for e in ev if isinstance(e, poc_api.TokenOut)]
                assert got == want
    await all_ended([server], threads_before, tasks_before)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(2))
async def test_evicted_conversation_cancelled(block: int) -> None:
    async with reference_server(seed=1, idle_timeout=0.05) as server:
        await run_seeds(evicted_round, server, range(block * 10, block * 10 + 10))


@pytest.mark.slow
@pytest.mark.parametrize("block", range(3))
async def test_agents_cancelled_at_random_on_a_pool(block: int) -> None:
    from poc_api.testing import reference_servers

    async with reference_servers(3, seed=1) as servers:
        await run_seeds(one_round, servers[0], range(block * 20, block * 20 + 20), servers=servers)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
async def test_agents_cancelled_at_random_on_a_pool_losing_a_server(seed: int) -> None:
    from poc_api.testing import reference_servers

    async with reference_servers(3, seed=1) as servers:
        await one_round(servers[0], seed, servers, kill=servers[1 + seed % 2])


async def shared_session_round(server, seed: int) -> None:
    """Tasks share one raw session (each call waits for the one before); calls are
    cancelled at random and the session is closed under them from another task."""
    rng = random.Random(seed)
    threads_before = {t.ident for t in threading.enumerate()}
    tasks_before = trio_task_census()
    errors: list[BaseException] = []
    closed = [False]
    with trio.fail_after(30):
        async with poc_api.ApiClient(
            server.base_url, grpc_url=server.grpc_url, close_timeout=2.0
        ) as client:
            async with client.session() as s:

                async def user(i: int) -> None:
                    for _ in range(rng.randint(1, 4)):
                        k = rng.choice(["prefill", "image", "gen", "rewind", "score"])
                        try:
                            with trio.CancelScope() as scope:
                                d = rng.choice([None, 0, 0.0005, 0.002, 0.01])
                                if d is not None:
                                    scope.deadline = trio.current_time() + d
                                if k == "prefill":
                                    await s.prefill([1, 2, 3])
                                elif k == "image":
                                    await s.append_image(PNG, "image/png")
                                elif k == "rewind":
                                    await s.rewind(0)
                                elif k == "score":
                                    await s.prefill([4, 5])
                                else:
                                    async with s.generate([7], sampling=SP) as ev:
                                        async for _ in ev:
                                            pass
                            OUTCOMES[
                                "shared " + k, "cancelled" if scope.cancelled_caught else "ok"
                            ] += 1
                        except poc_api.PocApiError as exc:
                            OUTCOMES["shared " + k, type(exc).__name__] += 1
                        except trio.ClosedResourceError:
                            OUTCOMES["shared " + k, "closed"] += 1
                            if not closed[0]:
                                errors.append(
                                    AssertionError(f"{k}: ClosedResourceError before close")
                                )
                        except BaseException as exc:
                            exc.add_note(f"user{i} {k}")
                            errors.append(exc)

                async def closer() -> None:
                    await trio.sleep(rng.uniform(0, 0.02))
                    closed[0] = True
                    with trio.move_on_after(rng.choice([0, 0.001, 1])):
                        if rng.random() < 0.7:
                            await s.aclose()
                        else:
                            await client.aclose()

                async with trio.open_nursery() as nursery:
                    for i in range(rng.randint(2, 5)):
                        nursery.start_soon(user, i)
                    if rng.random() < 0.5:
                        nursery.start_soon(closer)
    assert errors == [], errors[:3]
    await all_ended([server], threads_before, tasks_before)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(3))
async def test_shared_session_cancelled_and_closed(block: int) -> None:
    async with reference_server(seed=1) as server:
        await run_seeds(shared_session_round, server, range(block * 20, block * 20 + 20))
