"""poc_api's client against a grpcio.aio (C-core) salience server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
import trio
from helpers import uploads_ended_during_a_small_call

import poc_api

TIMEOUT = 10.0
SHAPE = (12, 20)


class AioPeer:
    """A grpcio.aio salience server on its own loop thread, with session state."""

    def __init__(
        self,
        pb: tuple[ModuleType, ModuleType],
        options: Any = (),
        compression: Any = None,
        hooks: dict[str, Callable[..., Any]] | None = None,
        token_delay: float = 0.0,
    ) -> None:
        self.pb2, self.pb2_grpc = pb
        self.sessions: dict[str, int] = {}
        self.opened = 0
        self.closed: list[str] = []
        self.cancelled = 0
        self.hooks = hooks or {}
        self.token_delay = token_delay
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(options, compression, ready), daemon=True
        )
        self.thread.start()
        assert ready.wait(10)

    def _run(self, options: Any, compression: Any, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.server = grpc.aio.server(options=list(options), compression=compression)
            self.pb2_grpc.add_SalienceServicer_to_server(self._servicer(), self.server)
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()
            ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def open_sessions(self) -> set[str]:
        return set(self.sessions)

    def _servicer(self) -> Any:
        peer = self
        pb2 = self.pb2

        class Servicer(self.pb2_grpc.SalienceServicer):  # type: ignore[misc,name-defined]
            async def OpenSession(self, request: Any, context: Any) -> Any:
                if "open" in peer.hooks:
                    await peer.hooks["open"](request, context)
                peer.opened += 1
                sid = f"s{peer.opened}"
                peer.sessions[sid] = 0
                return pb2.OpenSessionResponse(session_id=sid, max_length=4096)

            async def CloseSession(self, request: Any, context: Any) -> Any:
                peer.sessions.pop(request.session_id, None)
                peer.closed.append(request.session_id)
                return pb2.CloseSessionResponse()

            async def AppendImage(self, request: Any, context: Any) -> Any:
                if "image" in peer.hooks:
                    await peer.hooks["image"](request, context)
                n = peer.sessions.get(request.session_id)
                if n is None:
                    await context.abort(grpc.StatusCode.NOT_FOUND, "no session")
                if request.offset != n and not (request.truncating and request.offset <= n):
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "offset")
                count = 4
                peer.sessions[request.session_id] = request.offset + count
                return pb2.AppendImageResponse(
                    placeholder_count=count, total_length=request.offset + count
                )

            async def Generate(self, request: Any, context: Any) -> Any:
                if "generate" in peer.hooks:
                    await peer.hooks["generate"](request, context)
                sid = request.session_id
                n = peer.sessions.get(sid)
                if n is None:
                    await context.abort(grpc.StatusCode.NOT_FOUND, "no session")
                if request.offset != n and not (request.truncating and request.offset <= n):
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "offset")
                start = request.offset
                peer.sessions[sid] = start

                def inr(ranges: Any, p: int) -> bool:
                    return any(r.start <= p < r.end for r in ranges)

                try:
                    for i, tid in enumerate(request.append_tokens):
                        p = start + i
                        peer.sessions[sid] = p + 1
                        if inr(request.logprobs_ranges, p) or inr(request.readout_ranges, p):
                            yield pb2.GenerateEvent(
                                token=pb2.Token(
                                    id=tid,
                                    is_prefill=True,
                                    position=p,
                                    sampled_logprob=-1.0
                                    if (p and inr(request.logprobs_ranges, p))
                                    else 0.0,
                                    readout=[float(p)] * 6 * 40
                                    if inr(request.readout_ranges, p)
                                    else [],
                                )
                            )
                    prompt = peer.sessions[sid]
                    for k in range(request.max_tokens):
                        if peer.token_delay:
                            await asyncio.sleep(peer.token_delay)
                        p = prompt + k
                        peer.sessions[sid] = p + 1
                        yield pb2.GenerateEvent(
                            token=pb2.Token(
                                id=65 + k % 20,
                                position=p,
                                sampled_logprob=-0.5,
                                top_logprobs=[pb2.TopLogprob(id=65, logprob=-0.5)]
                                * request.logprob_top_k,
                                readout=[float(p)] * 6 * 40
                                if inr(request.readout_ranges, p)
                                else [],
                            )
                        )
                    total = peer.sessions[sid]
                    yield pb2.GenerateEvent(
                        done=pb2.Done(
                            prompt_tokens=prompt,
                            completion_tokens=total - prompt,
                            total_tokens=total,
                            finish_reason="length" if request.max_tokens else "prefill",
                        )
                    )
                except asyncio.CancelledError:
                    peer.cancelled += 1
                    raise

        return Servicer()


@pytest.fixture
def make_peer(pb: tuple[ModuleType, ModuleType]) -> Iterator[Callable[..., AioPeer]]:
    peers: list[AioPeer] = []

    def make(**kw: Any) -> AioPeer:
        p = AioPeer(pb, **kw)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.stop()


def client_for(peer: AioPeer, **kw: Any) -> poc_api.ApiClient:
    kw.setdefault("close_timeout", 2.0)
    return poc_api.ApiClient(
        "http://127.0.0.1:9/v1", grpc_url=f"http://127.0.0.1:{peer.port}", **kw
    )


def run(fn: Callable[[], Any]) -> Any:
    async def main() -> Any:
        with trio.fail_after(TIMEOUT * 2):
            return await fn()

    return trio.run(main)


def test_basic_session_generate_readouts_logprobs(make_peer: Callable[..., AioPeer]) -> None:
    peer = make_peer()

    async def main() -> Any:
        async with client_for(peer) as c:
            async with c.session() as s:
                await s.prefill([1, 2, 3])
                img = await s.append_image(b"\x89PNG fake", "image/png")
                async with s.generate(
                    [4, 5],
                    sampling=poc_api.SamplingParams(max_tokens=5, logprobs=2)
                    if False
                    else poc_api.SamplingParams(max_tokens=5),
                    logprobs_ranges=[(8, 14)],
                    readout_ranges=[(0, 14)],
                    readout_shape=SHAPE,
                ) as ev:
                    events = [e async for e in ev]
                return img, events, s.committed_len

    img, events, committed = run(main)
    assert img.placeholder_count == 4
    assert isinstance(events[-1], poc_api.Done)
    assert committed == 14
    assert peer.open_sessions() == set()


def test_score_and_conversation(make_peer: Callable[..., AioPeer]) -> None:
    peer = make_peer()

    async def main() -> Any:
        async with client_for(peer) as c:
            r1 = await c.score([poc_api.Tokens([1, 2, 3, 4])], [(1, 4)])
            r2 = await c.score_many(
                [([poc_api.Tokens([1, 2, 3])], [(1, 3)])] * 5, share_prefix=True
            )
            r3 = await c.score_continuations([poc_api.Tokens([1, 2, 3])], [[4, 5], [6]])
            async with c.conversation() as conv:
                for _ in range(2):
                    async with conv.stream(
                        [poc_api.Tokens([1, 2, 3])], poc_api.SamplingParams(max_tokens=3)
                    ) as ev:
                        out = [e async for e in ev]
            return r1, r2, r3, out

    r1, r2, r3, _out = run(main)
    assert r1[0].logprob == -3.0
    assert len(r2) == 5 and len(r3) == 2
    assert peer.open_sessions() == set()


def test_cancel_mid_stream(make_peer: Callable[..., AioPeer]) -> None:
    peer = make_peer(token_delay=0.01)

    async def main() -> Any:
        async with client_for(peer) as c:
            async with c.session() as s:
                async with s.generate(
                    [1, 2], sampling=poc_api.SamplingParams(max_tokens=100000)
                ) as ev:
                    n = 0
                    async for _ in ev:
                        n += 1
                        if n == 5:
                            break
                lost = s.lost

            return lost

    run(main)
    time.sleep(0.3)
    assert peer.cancelled == 1
    assert peer.open_sessions() == set()


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_abort_each_status(make_peer: Callable[..., AioPeer], code: Any) -> None:
    async def gen(request: Any, context: Any) -> None:
        context.set_trailing_metadata((("x-bin", b"\x00\xff"), ("x-info-bin", b"\x01")))
        await context.abort(code, "boom " + code.name)

    peer = make_peer(hooks={"generate": gen})

    async def main() -> Any:
        async with client_for(peer) as c:
            async with c.session() as s:
                with pytest.raises(poc_api.PocApiError) as info:
                    await s.prefill([1, 2])
                return info.value

    err = run(main)
    assert err.grpc_status == code.name and f"boom {code.name}" in str(err), err
    assert peer.open_sessions() == set()


def test_initial_metadata_then_error(make_peer: Callable[..., AioPeer]) -> None:
    async def gen(request: Any, context: Any) -> None:
        await context.send_initial_metadata((("x-a", "1"),))
        await asyncio.sleep(0.05)
        await context.abort(grpc.StatusCode.INTERNAL, "after headers")

    peer = make_peer(hooks={"generate": gen})

    async def main() -> Any:
        async with client_for(peer) as c:
            async with c.session() as s:
                with pytest.raises(poc_api.RpcError) as info:
                    async with s.generate([1], sampling=poc_api.SamplingParams(max_tokens=3)) as ev:
                        [e async for e in ev]
                return info.value

    err = run(main)
    assert "after headers" in str(err)
    assert peer.open_sessions() == set()


def test_big_image_refused_by_max_receive(make_peer: Callable[..., AioPeer]) -> None:
    peer = make_peer(options=[("grpc.max_receive_message_length", 64 * 1024)])

    async def main() -> Any:
        async with client_for(peer) as c:
            async with c.session() as s:
                await s.prefill([1, 2])
                with pytest.raises(poc_api.PocApiError) as info:
                    await s.append_image(b"x" * 200_000, "image/png")
                err = info.value
                # still usable? (state must be consistent either way)
                lost = s.lost
                committed = s.committed_len
            return err, lost, committed

    err, lost, committed = run(main)
    assert isinstance(err, poc_api.ResourceExhausted)
    assert lost and committed == 2  # (whether the image went in is unknown: lost)
    assert peer.open_sessions() == set()


def test_max_concurrent_streams_2(make_peer: Callable[..., AioPeer]) -> None:
    peer = make_peer(options=[("grpc.max_concurrent_streams", 2)], token_delay=0.005)

    async def main() -> Any:
        async with client_for(peer) as c:
            results = []

            async def one() -> None:
                async with c.session() as s:
                    async with s.generate(
                        [1, 2], sampling=poc_api.SamplingParams(max_tokens=10)
                    ) as ev:
                        results.append([e async for e in ev][-1])

            async with trio.open_nursery() as n:
                for _ in range(20):
                    n.start_soon(one)
            r = await c.score_many([([poc_api.Tokens([1, 2, 3])], [(1, 3)])] * 20)
            return results, r

    results, r = run(main)
    assert len(results) == 20 and len(r) == 20
    assert peer.open_sessions() == set()


def test_max_connection_age(make_peer: Callable[..., AioPeer]) -> None:
    peer = make_peer(
        options=[("grpc.max_connection_age_ms", 300), ("grpc.max_connection_age_grace_ms", 200)],
        token_delay=0.01,
    )

    async def main() -> Any:
        async with client_for(peer) as c:
            outcomes = []
            for _ in range(8):
                async with c.session() as s:
                    try:
                        async with s.generate(
                            [1, 2], sampling=poc_api.SamplingParams(max_tokens=15)
                        ) as ev:
                            outcomes.append(type([e async for e in ev][-1]).__name__)
                    except poc_api.PocApiError as e:
                        outcomes.append(f"{type(e).__name__}: {e}")
                await trio.sleep(0.1)
            return outcomes

    outcomes = run(main)
    assert peer.open_sessions() == set()
    assert all(o == "Done" for o in outcomes), outcomes


@pytest.mark.parametrize("algo", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_server_compression_gzip(make_peer: Callable[..., AioPeer], algo: Any) -> None:
    peer = make_peer(compression=algo)

    async def main() -> Any:
        async with client_for(peer) as c:
            async with c.session() as s:
                async with s.generate(
                    [1, 2],
                    sampling=poc_api.SamplingParams(max_tokens=5),
                    readout_ranges=[(0, 7)],
                    readout_shape=SHAPE,
                ) as ev:
                    return [e async for e in ev]

    events = run(main)
    assert isinstance(events[-1], poc_api.Done)
    assert peer.open_sessions() == set()


def test_too_many_pings(make_peer: Callable[..., AioPeer]) -> None:
    peer = make_peer(
        options=[
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ],
        token_delay=0.01,
    )

    async def main() -> Any:
        async with client_for(peer, keepalive_time=0.1, keepalive_timeout=5.0) as c:
            async with c.session() as s:
                for _ in range(5):
                    async with s.generate(
                        [1], sampling=poc_api.SamplingParams(max_tokens=30)
                    ) as ev:
                        [e async for e in ev]
                    await trio.sleep(0.5)
                return s.committed_len

    assert run(main) == 5 * 31
    assert peer.open_sessions() == set()


@pytest.mark.parametrize("details_bin", [b"\xff\xfe garbage", b"\x08\x03\x12\x03bad"])
def test_status_details_bin(make_peer: Callable[..., AioPeer], details_bin: bytes) -> None:
    async def gen(request: Any, context: Any) -> None:
        context.set_trailing_metadata((("grpc-status-details-bin", details_bin),))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "h\u00e9llo \u2603\n%zz")

    peer = make_peer(hooks={"generate": gen})

    async def main() -> Any:
        async with client_for(peer) as c:
            async with c.session() as s:
                with pytest.raises(poc_api.PocApiError) as info:
                    await s.prefill([1, 2])
                return info.value

    err = run(main)
    assert isinstance(err, poc_api.InvalidRequest)
    assert "h\u00e9llo \u2603" in str(err)
    assert peer.open_sessions() == set()


def test_stream_cut_by_max_connection_age_grace(make_peer: Callable[..., AioPeer]) -> None:
    peer = make_peer(
        options=[("grpc.max_connection_age_ms", 300), ("grpc.max_connection_age_grace_ms", 100)],
        token_delay=0.01,
    )

    async def main() -> Any:
        async with client_for(peer) as c:
            async with c.session() as s:
                with pytest.raises(poc_api.PocApiError) as info:
                    async with s.generate(
                        [1, 2], sampling=poc_api.SamplingParams(max_tokens=1000)
                    ) as ev:
                        [e async for e in ev]
                err = info.value
            async with c.session() as s2:
                await s2.prefill([1])
            return err

    err = run(main)
    assert isinstance(err, poc_api.ServerUnavailable), err
    time.sleep(0.3)
    assert peer.open_sessions() == set()


def test_open_session_cap_in_score_many(make_peer: Callable[..., AioPeer]) -> None:
    peer: AioPeer

    async def opener(request: Any, context: Any) -> None:
        if len(peer.sessions) >= 2:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many sessions")

    peer = make_peer(hooks={"open": opener}, token_delay=0.0)

    async def main() -> Any:
        async with client_for(peer) as c:
            return await c.score_many(
                [([poc_api.Tokens([1, 2, 3, i])], [(1, 4)]) for i in range(10)]
            )

    r = run(main)
    assert len(r) == 10
    assert peer.open_sessions() == set()


def test_deadline_from_client_timeout(make_peer: Callable[..., AioPeer]) -> None:
    peer = make_peer(token_delay=0.05)

    async def main() -> Any:
        async with client_for(peer) as c:
            async with c.session() as s:
                with pytest.raises(poc_api.PocApiTimeout):
                    async with s.generate(
                        [1], sampling=poc_api.SamplingParams(max_tokens=1000), timeout=0.3
                    ) as ev:
                        [e async for e in ev]

    run(main)
    time.sleep(0.3)
    assert peer.open_sessions() == set()
    assert peer.cancelled == 1


def test_max_concurrent_streams_1_with_cancels(make_peer: Callable[..., AioPeer]) -> None:
    peer = make_peer(options=[("grpc.max_concurrent_streams", 1)], token_delay=0.002)

    async def main() -> Any:
        async with client_for(peer) as c:
            done = []

            async def one(i: int) -> None:
                async with c.session() as s:
                    with trio.move_on_after(0.01 * (i % 5)):
                        async with s.generate(
                            [1, 2], sampling=poc_api.SamplingParams(max_tokens=20)
                        ) as ev:
                            [e async for e in ev]
                    done.append(i)

            async with trio.open_nursery() as n:
                for i in range(12):
                    n.start_soon(one, i)
            return done

    assert len(run(main)) == 12
    time.sleep(0.3)
    assert peer.open_sessions() == set()


def test_conversation_image_refused_then_next_turn(make_peer: Callable[..., AioPeer]) -> None:
    peer = make_peer(
        options=[("grpc.max_receive_message_length", 64 * 1024)], compression=grpc.Compression.Gzip
    )

    async def main() -> Any:
        async with client_for(peer) as c:
            async with c.conversation() as conv:
                big = poc_api.Image(b"x" * 100_000, "image/png")
                with pytest.raises(poc_api.ResourceExhausted):
                    async with conv.stream(
                        [poc_api.Tokens([1, 2]), big], poc_api.SamplingParams(max_tokens=3)
                    ) as ev:
                        [e async for e in ev]
                small = poc_api.Image(b"x" * 1000, "image/png")
                async with conv.stream(
                    [poc_api.Tokens([1, 2]), small, poc_api.Tokens([3])],
                    poc_api.SamplingParams(max_tokens=3),
                ) as ev:
                    out = [e async for e in ev]
                async with conv.stream(
                    [
                        poc_api.Tokens([1, 2]),
                        small,
                        poc_api.Tokens([3]),
                        *[poc_api.Tokens([65 + k]) for k in range(3)],
                        poc_api.Tokens([9]),
                    ],
                    poc_api.SamplingParams(max_tokens=3),
                ) as ev:
                    out2 = [e async for e in ev]
            return out, out2

    out, out2 = run(main)
    assert isinstance(out[-1], poc_api.StreamDone) and isinstance(out2[-1], poc_api.StreamDone)
    assert peer.open_sessions() == set()
    assert peer.opened == 2


@pytest.mark.heavy  # (h2's and grpclib's framing; 160 MiB through the peer)
def test_a_small_call_is_not_starved_by_uploads_sent_in_huge_frames(
    make_peer: Callable[..., AioPeer],
) -> None:
    # grpcio takes DATA frames up to 16 MiB: grpclib sent each connection
    # WINDOW_UPDATE whole, in one frame, to the oldest upload, and the turns between
    # frames never came; a new call's few bytes waited until every upload had ended.
    peer = make_peer(options=[("grpc.max_receive_message_length", 1 << 26)])

    async def main() -> Any:
        async with client_for(peer) as c:
            return await uploads_ended_during_a_small_call(c, b"x" * (16 << 20), 10, 0.05)

    assert run(main) <= 2  # done long before the uploads
