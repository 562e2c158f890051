"""Session affinity through a real L7 proxy: nginx, ``hash ... consistent``, ``grpc_pass``.

nginx comes from Debian's packages (``.ci/run`` installs ``nginx-light``). On CI
a missing nginx fails these tests; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import collections
import os
import random
from collections.abc import AsyncIterator

import pytest
import trio
from helpers import resource_warnings

import poc_api
from poc_api import SamplingParams, StreamDone, TokenOut, Tokens
from poc_api.server import ReferenceServer, tokenize
from poc_api.testing import NGINX, nginx_grpc_proxy, reference_servers

if not os.path.exists(NGINX) and not os.environ.get("CI"):
    pytest.skip(
        f"nginx is not installed at {NGINX} (apt-get install nginx-light; required when CI is set)",
        allow_module_level=True,
    )

TURN = SamplingParams(max_tokens=4)


@pytest.fixture
async def backends() -> AsyncIterator[list[ReferenceServer]]:
    async with reference_servers(3, ignore_eos=True) as servers:
        yield servers


@pytest.fixture
async def proxy(backends: list[ReferenceServer]) -> AsyncIterator[str]:
    async with nginx_grpc_proxy([s.grpc_url for s in backends]) as url:
        yield url


async def three_turns(client: poc_api.ApiClient, i: int) -> tuple[int, int]:
    """Three turns of one conversation; (prompt tokens of turn 1, user tokens after)."""
    rng = random.Random(i)
    prompt = tokenize(f"conversation {i}:")
    first = later = 0
    async with client.conversation() as conv:
        for t in range(3):
            user = [rng.randrange(32, 127) for _ in range(5)]
            prompt = prompt + user
            if t == 0:
                first = len(prompt)
            else:
                later += len(user)
            async with conv.stream([Tokens(prompt)], TURN, timeout=30) as events:
                out = [e async for e in events]
            assert isinstance(out[-1], StreamDone)
            prompt = prompt + [e.id for e in out if isinstance(e, TokenOut)]
    return first, later


@pytest.mark.heavy
async def test_200_conversations_through_nginx_send_only_deltas_on_one_backend(
    backends: list[ReferenceServer], proxy: str
) -> None:
    sent = [0, 0]
    async with poc_api.ApiClient(backends[0].base_url, grpc_url=proxy) as client:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def one(i: int) -> None:
                    first, later = await three_turns(client, i)
                    sent[0] += first
                    sent[1] += later

                for i in range(200):
                    nursery.start_soon(one, i)
    states = [s.state() for s in backends]
    # Turns 2 and 3 sent their new tokens only: no prompt was ever resent.
    assert sum(s.tokens_appended for s in states) == sent[0] + sent[1]
    assert sum(s.rpc_counts.get("OpenSession", 0) for s in states) == 200
    # Every session's calls (each key) landed on one backend, and all were used.
    homes: dict[str, set[int]] = collections.defaultdict(set)
    for n, state in enumerate(states):
        for _, key in state.affinity:
            homes[key].add(n)
    assert len(homes) == 200
    assert all(len(h) == 1 for h in homes.values())
    assert all(s.rpc_counts.get("OpenSession", 0) > 0 for s in states)
    assert all(not s.session_ids for s in states)


async def test_without_the_affinity_header_nginx_loses_sessions(
    backends: list[ReferenceServer], proxy: str
) -> None:
    """The control: with no key nginx spreads calls round-robin, and sessions go missing."""
    async with poc_api.ApiClient(
        backends[0].base_url, grpc_url=proxy, affinity_header=None
    ) as client:
        not_found = 0
        with trio.fail_after(30):
            for _ in range(12):
                async with client.session() as s:
                    try:
                        await s.prefill([1, 2, 3])
                        await s.prefill([4])
                    except poc_api.SessionNotFound:
                        not_found += 1
            # The conversation test above fails the same way without the key.
            failed = 0
            for i in range(12):
                try:
                    await three_turns(client, i)
                except poc_api.SessionNotFound:
                    failed += 1
    assert not_found > 0
    assert failed > 0


@pytest.mark.heavy
async def test_many_concurrent_calls_survive_nginx_ending_connections_with_goaway() -> None:
    # nginx sends a graceful GOAWAY after keepalive_requests calls on a connection;
    # calls it never processed, queued or in flight at that moment, are sent again.
    async with reference_servers(1) as [server]:
        async with nginx_grpc_proxy([server.grpc_url], keepalive_requests=50) as url:
            with resource_warnings() as caught:
                async with poc_api.ApiClient(server.base_url, grpc_url=url) as client:
                    prompts = [([Tokens(tokenize("hello there") * 3)], [(1, 20)])] * 400
                    with trio.fail_after(60):
                        results = await client.score_many(prompts, max_concurrency=100)
    assert len(results) == 400 and all(r == results[0] for r in results)
    # A call that came late to a channel closed under it (the connection lost) used
    # to connect it again, and nothing closed that connection.
    unclosed = [w for w in caught if "Unclosed connection" in w]
    assert not unclosed, f"{len(unclosed)} connections left unclosed"
