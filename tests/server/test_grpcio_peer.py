"""grpcio (the C-core stack) as an independent peer: same answers as grpclib sees."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest

from poc_api.server import ReferenceServer, tokenize

from .conftest import ServerFactory, SyncSalience, wait_until

PROMPT = tokenize("In the morning the fishermen ")
TIMEOUT = 10.0


@pytest.fixture
def peer(pb: tuple[ModuleType, ModuleType], server: ReferenceServer) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield pb[1].SalienceStub(channel)


def test_grpcio_generate_matches_grpclib(
    peer: Any, pb: tuple[ModuleType, ModuleType], client: SyncSalience
) -> None:
    pb2 = pb[0]
    sid = peer.OpenSession(pb2.OpenSessionRequest(), timeout=TIMEOUT).session_id
    req = pb2.GenerateRequest(
        session_id=sid,
        append_tokens=PROMPT,
        max_tokens=20,
        logprobs_ranges=[pb2.PositionRange(start=1, end=5)],
        readout_ranges=[pb2.PositionRange(start=0, end=40)],
        logprob_top_k=4,
    )
    events = list(peer.Generate(req, timeout=TIMEOUT))
    assert events[-1].WhichOneof("event") == "done"
    assert events[-1].done.finish_reason == "length"
    ours, done = client.generate(
        client.open(),
        append_tokens=PROMPT,
        max_tokens=20,
        logprobs_ranges=[(1, 5)],
        readout_ranges=[(0, 40)],
        logprob_top_k=4,
    )
    theirs = [e.token for e in events[:-1]]
    assert [(t.id, t.position, t.is_prefill) for t in theirs] == [
        (t.id, t.position, t.is_prefill) for t in ours
    ]
    assert [t.sampled_logprob for t in theirs] == [t.sampled_logprob for t in ours]
    assert [list(t.readout) for t in theirs] == [list(t.readout) for t in ours]
    assert [[x.id for x in t.top_logprobs] for t in theirs] == [
        [x.id for x in t.top_logprobs] for t in ours
    ]
    assert events[-1].done.total_tokens == done.total_tokens
    peer.CloseSession(pb2.CloseSessionRequest(session_id=sid), timeout=TIMEOUT)


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda pb2, sid: pb2.GenerateRequest(session_id="missing"), grpc.StatusCode.NOT_FOUND),
        (
            lambda pb2, sid: pb2.GenerateRequest(session_id=sid, offset=3),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            lambda pb2, sid: pb2.GenerateRequest(session_id=sid, append_tokens=[999]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda pb2, sid: pb2.GenerateRequest(session_id=sid, append_tokens=[1] * 9000),
            grpc.StatusCode.OUT_OF_RANGE,
        ),
    ],
    ids=["not-found", "offset", "token-id", "context"],
)
def test_grpcio_sees_the_error_statuses(
    peer: Any, pb: tuple[ModuleType, ModuleType], build: Any, code: grpc.StatusCode
) -> None:
    pb2 = pb[0]
    sid = peer.OpenSession(pb2.OpenSessionRequest(), timeout=TIMEOUT).session_id
    with pytest.raises(grpc.RpcError) as info:
        list(peer.Generate(build(pb2, sid), timeout=TIMEOUT))
    assert info.value.code() == code


def test_grpcio_image_and_auth(
    make_server: ServerFactory, pb: tuple[ModuleType, ModuleType]
) -> None:
    from .test_images import jpeg

    pb2, pb2_grpc = pb
    srv = make_server(api_key="k1")
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = pb2_grpc.SalienceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenSession(pb2.OpenSessionRequest(), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", "Bearer k1"),)
        sid = stub.OpenSession(pb2.OpenSessionRequest(), timeout=TIMEOUT, metadata=md).session_id
        res = stub.AppendImage(
            pb2.AppendImageRequest(session_id=sid, image=jpeg(280, 56), mime="image/jpeg"),
            timeout=TIMEOUT,
            metadata=md,
        )
        assert (res.placeholder_count, res.total_length) == (20, 20)


def test_grpcio_cancel_sends_rst_cancel(
    make_server: ServerFactory, pb: tuple[ModuleType, ModuleType]
) -> None:
    pb2, pb2_grpc = pb
    srv = make_server(max_context=2_000_000, ignore_eos=True)
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = pb2_grpc.SalienceStub(channel)
        sid = stub.OpenSession(pb2.OpenSessionRequest(), timeout=TIMEOUT).session_id
        call = stub.Generate(
            pb2.GenerateRequest(session_id=sid, append_tokens=PROMPT, max_tokens=1_000_000),
            timeout=TIMEOUT,
        )
        for _, _ev in zip(range(50), call, strict=False):
            pass
        t0 = time.monotonic()
        call.cancel()
        assert wait_until(lambda: srv.state().cancelled_streams == 1)
        assert time.monotonic() - t0 < 1.0
    state = srv.state()
    assert [code for _, code in state.resets] == [8]
    assert state.tokens_decoded < 1_000_000


def test_grpcio_normalized_top_logprobs(peer: Any, pb: tuple[ModuleType, ModuleType]) -> None:
    pb2 = pb[0]
    sid = peer.OpenSession(pb2.OpenSessionRequest(), timeout=TIMEOUT).session_id
    events = list(
        peer.Generate(
            pb2.GenerateRequest(
                session_id=sid, append_tokens=PROMPT, max_tokens=2, logprob_top_k=261
            ),
            timeout=TIMEOUT,
        )
    )
    for ev in events[:-1]:
        total = sum(math.exp(x.logprob) for x in ev.token.top_logprobs)
        assert math.isclose(total, 1.0, abs_tol=1e-4)


def start_grpcio_server(
    pb: tuple[ModuleType, ModuleType],
    generate: Callable[[Any], Iterator[Any]],
    options: Sequence[tuple[str, Any]] = (),
    compression: Any = None,
) -> tuple[Any, int]:
    """A grpcio (C-core) salience server of one session id, answering Generate with
    ``generate(request)``; started, on a free loopback port: (server, port)."""
    from concurrent import futures

    pb2, pb2_grpc = pb

    class Servicer(pb2_grpc.SalienceServicer):  # type: ignore[misc]
        def OpenSession(self, request: Any, context: Any) -> Any:
            return pb2.OpenSessionResponse(session_id="s1", max_length=1 << 20)

        def CloseSession(self, request: Any, context: Any) -> Any:
            return pb2.CloseSessionResponse()

        def Generate(self, request: Any, context: Any) -> Iterator[Any]:
            return generate(request)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=list(options), compression=compression
    )
    pb2_grpc.add_SalienceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_grpcio_server_graceful_stop_lets_a_poc_api_stream_finish(
    pb: tuple[ModuleType, ModuleType],
) -> None:
    """grpcio's server.stop(grace) sends GOAWAY and lets running calls finish."""
    import threading

    import trio

    import poc_api

    pb2 = pb[0]

    def generate(request: Any) -> Iterator[Any]:
        start = request.offset + len(request.append_tokens)
        for i in range(request.max_tokens):
            time.sleep(0.01)
            yield pb2.GenerateEvent(
                token=pb2.Token(id=65, position=start + i, sampled_logprob=-0.5)
            )
        n = request.max_tokens
        yield pb2.GenerateEvent(
            done=pb2.Done(prompt_tokens=start, completion_tokens=n, total_tokens=start + n)
        )

    server, port = start_grpcio_server(pb, generate)

    async def main() -> list[Any]:
        async with poc_api.ApiClient(
            "http://127.0.0.1:9/v1", grpc_url=f"http://127.0.0.1:{port}", close_timeout=1.0
        ) as c:
            async with c.session() as s:
                with trio.fail_after(TIMEOUT):
                    async with s.generate(
                        [1, 2], sampling=poc_api.SamplingParams(max_tokens=60)
                    ) as ev:
                        events = []
                        async for e in ev:
                            events.append(e)
                            if len(events) == 6:
                                # stop(grace) blocks until done: from a thread.
                                threading.Thread(target=lambda: server.stop(5.0)).start()
                        return events

    try:
        events = trio.run(main)
    finally:
        server.stop(None)
    assert isinstance(events[-1], poc_api.Done) and events[-1].completion_tokens == 60


def test_a_compressed_request_is_unimplemented_without_an_error_log(
    pb: tuple[ModuleType, ModuleType], server: ReferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A grpcio peer with compression on: grpclib raised NotImplementedError from
    # recv_message, answered UNKNOWN "Internal Server Error" and logged an ERROR
    # traceback (a test failing on error logs failed for the server's sake).
    with grpc.insecure_channel(
        f"127.0.0.1:{server.grpc_port}", compression=grpc.Compression.Gzip
    ) as channel:
        stub = pb[1].SalienceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenSession(pb[0].OpenSessionRequest(model="m" * 300), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "compressed" in info.value.details()
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_a_grpcio_server_that_refuses_pings_between_calls_gets_them_only_during_calls(
    pb: tuple[ModuleType, ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    """C-core's ping policy: with no call running, a ping is allowed every 2 hours
    (unless ``keepalive_permit_without_calls``); the third too early earns GOAWAY
    ENHANCE_YOUR_CALM "too_many_pings". poc_api pings between calls while
    sessions are open (``keepalive_idle``): it doubled ``keepalive_time`` on each
    such GOAWAY, so an agent between turns ended a connection again and again, and
    the rate during calls (what finds a frozen server mid-call) went to 2 hours."""
    import logging

    import trio

    import poc_api

    pb2 = pb[0]

    def generate(request: Any) -> Iterator[Any]:
        time.sleep(0.8)  # long enough for pings during the call
        n = request.offset + len(request.append_tokens)
        yield pb2.GenerateEvent(done=pb2.Done(prompt_tokens=n, total_tokens=n))

    # Pings during calls every 100 ms are fine; between calls, C-core's default.
    server, port = start_grpcio_server(
        pb, generate, [("grpc.http2.min_ping_interval_without_data_ms", 100)]
    )
    caplog.set_level(logging.WARNING, logger="poc_api")

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if "too_many_pings" in r.getMessage()]

    async def main() -> float | None:
        async with poc_api.ApiClient(
            "http://127.0.0.1:9/v1",
            grpc_url=f"http://127.0.0.1:{port}",
            keepalive_time=0.2,
            keepalive_timeout=5.0,
        ) as c:
            async with c.session() as s:
                with trio.fail_after(TIMEOUT):
                    while not warned():  # noqa: ASYNC110 - idle pings: a GOAWAY after ~4
                        await trio.sleep(0.05)
                    for _ in range(2):  # a turn, then think between turns
                        await s.prefill([1, 2])
                        await trio.sleep(1.5)
            keepalive = c._transport._keepalive if c._transport is not None else None
            return keepalive.time if keepalive is not None else None

    try:
        time_after = trio.run(main)
    finally:
        server.stop(None)
    [message] = warned()  # one: it came once, not at each thinking pause
    assert "while no call ran" in message, message
    assert time_after == 0.2  # the rate during calls is kept


def test_a_grpcio_server_with_gzip_compression_is_read(
    pb: tuple[ModuleType, ModuleType],
) -> None:
    """``grpc.server(compression=grpc.Compression.Gzip)`` (the channel argument
    ``grpc.default_compression_algorithm``) makes C-core compress every reply,
    whatever the client's ``grpc-accept-encoding`` says (even ``identity``): every
    call failed with ProtocolViolation "compressed messages are not supported"
    once a reply (a token with its readout) was large enough for gzip to shrink:
    C-core sends a message uncompressed when compression would not."""
    import trio

    import poc_api

    pb2 = pb[0]

    def generate(request: Any) -> Iterator[Any]:
        start = request.offset + len(request.append_tokens)
        for i in range(request.max_tokens):
            yield pb2.GenerateEvent(
                token=pb2.Token(
                    id=65, position=start + i, sampled_logprob=-0.5, readout=[0.5] * 256
                )
            )
        n = request.max_tokens
        yield pb2.GenerateEvent(
            done=pb2.Done(prompt_tokens=start, completion_tokens=n, total_tokens=start + n)
        )

    server, port = start_grpcio_server(pb, generate, compression=grpc.Compression.Gzip)

    async def main() -> list[Any]:
        async with poc_api.ApiClient(
            "http://127.0.0.1:9/v1", grpc_url=f"http://127.0.0.1:{port}", close_timeout=1.0
        ) as c:
            async with c.session() as s:
                with trio.fail_after(TIMEOUT):
                    async with s.generate(
                        [1, 2],
                        sampling=poc_api.SamplingParams(max_tokens=5),
                        readout_ranges=[(0, 7)],
                        readout_shape=(16, 16),
                    ) as ev:
                        return [e async for e in ev]

    try:
        events = trio.run(main)
    finally:
        server.stop(None)
    assert isinstance(events[-1], poc_api.Done) and events[-1].completion_tokens == 5
