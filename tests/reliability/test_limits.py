"""Size limits: big requests go through, oversized replies are refused up front."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import trio
from helpers import uploads_ended_during_a_small_call, wait_until_streaming_stalls
from misbehaving import DUMMY_BASE_URL, Kind, MisbehavingServer, Reply
from reliability_helpers import make_png, wait_for

import poc_api
from poc_api import SamplingParams, Token, Tokens
from poc_api import _transport as transport_module
from poc_api._transport import _PocH2Protocol
from poc_api.server import ReferenceServer, tokenize
from poc_api.server._grpc import encode_token

HELLO = tokenize("The quick brown fox")
MB = 1024 * 1024


async def test_a_20_mb_image_append_goes_through(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    png = make_png(56, 28, padding=20 * MB)
    assert len(png) > 20 * MB
    with trio.fail_after(20):
        async with client.session() as s:
            await s.prefill([1, 2])
            appended = await s.append_image(png, "image/png")
            assert appended == poc_api.ImageAppend(placeholder_count=2, total_length=4)
            assert s.committed_len == 4
            await s.prefill([3])  # the session goes on after the big message
        # ... and a scored prompt carrying it too.
        results = await client.score(
            [Tokens([1, 2]), poc_api.Image(png, "image/png"), Tokens([3, 4])], [(0, 2), (4, 6)]
        )
    assert [(r.start, r.end) for r in results] == [(0, 2), (4, 6)]


async def test_a_small_call_is_not_starved_by_big_uploads_on_the_same_connection(
    client: poc_api.ApiClient,
) -> None:
    # grpclib sends a message a DATA frame at a time without yielding between frames
    # while the connection has window, and a connection WINDOW_UPDATE wakes the
    # oldest streams first: each update went to the uploads, and a new call's few
    # bytes (its OpenSession, its CloseSession) waited until they had all ended.
    png = make_png(56, 28, padding=12 * MB)
    # Done long before the uploads (before: 9 of 10 ended first).
    assert await uploads_ended_during_a_small_call(client, png, 10, 0.2) <= 2


@pytest.mark.parametrize("method", ["OpenSession", "Generate"])
async def test_an_announced_oversized_reply_is_refused_before_its_body_arrives(
    bad_server: MisbehavingServer, method: str
) -> None:
    """The length prefix says 100 MB; only 16 bytes follow and the server stalls.
    A client that waited for the body would hang: the limit applies to the prefix."""
    async with poc_api.ApiClient(
        DUMMY_BASE_URL, grpc_url=bad_server.url, max_message_size=MB, close_timeout=0.5
    ) as c:
        bad_server.plan(method, Reply("oversized", claimed_size=100 * MB))
        started = time.monotonic()
        with trio.fail_after(5), pytest.raises(poc_api.LimitExceeded, match="max_message_size"):
            async with (
                c.session() as s,
                s.generate([1], sampling=SamplingParams(max_tokens=3)) as ev,
            ):
                async for _ in ev:
                    pass
        assert time.monotonic() - started < 1.0
        # The refused stream was reset, so the server stops sending.
        await wait_for(lambda: any(code == 8 for _, _, code in bad_server.resets), timeout=2)
        with trio.fail_after(5):
            async with c.session() as s:
                await s.prefill([1, 2])
    assert bad_server.connections == 1  # no reconnect was needed


async def test_a_complete_oversized_reply_is_refused_too(bad_server: MisbehavingServer) -> None:
    async with poc_api.ApiClient(
        DUMMY_BASE_URL, grpc_url=bad_server.url, max_message_size=MB, close_timeout=0.5
    ) as c:
        bad_server.plan("Generate", Reply("oversized", claimed_size=2 * MB, send_body=True))
        with trio.fail_after(5), pytest.raises(poc_api.LimitExceeded):
            async with (
                c.session() as s,
                s.generate([1], sampling=SamplingParams(max_tokens=3)) as ev,
            ):
                async for _ in ev:
                    pass
        with trio.fail_after(5):
            async with c.session() as s:
                await s.prefill([1, 2])


async def test_a_reply_just_under_the_limit_is_accepted(bad_server: MisbehavingServer) -> None:
    async with poc_api.ApiClient(
        DUMMY_BASE_URL, grpc_url=bad_server.url, max_message_size=MB, close_timeout=0.5
    ) as c:
        bad_server.plan("OpenSession", Reply("oversized", claimed_size=MB, send_body=True))
        with trio.fail_after(5), pytest.raises(poc_api.ProtocolViolation, match="empty session"):
            # Accepted and parsed: it is just padding, so the session id is empty.
            async with c.session():
                pass


async def test_a_reply_three_times_the_stream_window_arrives(bad_server: MisbehavingServer) -> None:
    # The window of a message's gathered chunks goes back before the next is awaited,
    # or a message bigger than the stream window would wait forever for its rest.
    async with poc_api.ApiClient(
        DUMMY_BASE_URL, grpc_url=bad_server.url, max_message_size=4 * MB, close_timeout=0.5
    ) as c:
        bad_server.plan("OpenSession", Reply("oversized", claimed_size=3 * MB, send_body=True))
        with trio.fail_after(10), pytest.raises(poc_api.ProtocolViolation, match="empty session"):
            async with c.session():
                pass
    assert bad_server.data_sent > 3 * MB


async def test_an_oversized_request_is_refused_before_sending(
    server: ReferenceServer,
) -> None:
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, max_message_size=MB
    ) as c:
        async with c.session() as s:
            before = server.state().rpc_counts.get("AppendImage", 0)
            with trio.fail_after(5), pytest.raises(poc_api.LimitExceeded):
                await s.append_image(make_png(56, 28, padding=2 * MB), "image/png")
            assert server.state().rpc_counts.get("AppendImage", 0) == before
            # Nothing was sent: the session is as it was (it was marked lost).
            assert not s.lost
            await s.prefill([3])
            assert s.committed_len == 1
        async with c.session() as s:
            await s.append_image(make_png(56, 28), "image/png")


async def test_an_append_image_refused_for_want_of_a_call_slot_leaves_the_session_usable(
    server: ReferenceServer,
) -> None:
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, max_concurrent_streams=1
    ) as c:
        async with c.session() as s, c.session() as busy:
            await s.prefill([1, 2])
            with trio.fail_after(10):
                async with busy.generate(HELLO, sampling=SamplingParams(max_tokens=10**6)) as ev:
                    await ev.__anext__()
                    with pytest.raises(poc_api.LimitExceeded, match="max_concurrent_streams"):
                        await s.append_image(make_png(56, 28), "image/png")
                    assert not s.lost
            appended = await s.append_image(make_png(56, 28), "image/png")
            assert appended.total_length == 4


async def test_a_generate_refused_before_sending_leaves_the_session_usable(
    server: ReferenceServer,
) -> None:
    # Nothing reached the server, so the session's state is known: not lost.
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, max_message_size=1000
    ) as c:
        async with c.session() as s:
            await s.prefill([1, 2])
            with trio.fail_after(5), pytest.raises(poc_api.LimitExceeded):
                async with s.generate([7] * 1000, sampling=SamplingParams(max_tokens=1)):
                    raise AssertionError("the block must not run")
            assert not s.lost
            await s.prefill([3])
            assert s.committed_len == 3


@pytest.mark.parametrize(
    ("server_name", "client_kw"),
    [
        ("server", {"max_buffered_events": 1}),
        # Every event (~2 KiB) is bigger than the bound: one at a time all the same.
        ("wide_server", {"max_buffered_bytes": 100}),
    ],
    ids=["one-event", "bytes-below-one-event"],
)
async def test_a_buffer_of_one_event_still_delivers_every_event_in_order(
    request: pytest.FixtureRequest, server_name: str, client_kw: dict[str, int]
) -> None:
    server: ReferenceServer = request.getfixturevalue(server_name)
    readout = server_name == "wide_server"
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url, **client_kw) as c:
        with trio.fail_after(30):
            async with c.session() as s:
                positions = []
                async with s.generate(
                    HELLO,
                    sampling=SamplingParams(max_tokens=3000),
                    readout_ranges=[(0, 10**7)] if readout else [],
                ) as ev:
                    async for e in ev:
                        if isinstance(e, Token):
                            positions.append(e.position)
                            assert (e.readout is not None) == readout
                        if len(positions) % 500 == 0:
                            await trio.sleep(0.01)  # a consumer that stalls now and then
                first = 0 if readout else len(HELLO)  # readouts bring the prompt's events
                assert positions == list(range(first, len(HELLO) + 3000))
            async with c.conversation() as conv:
                async with conv.stream([Tokens(HELLO)], SamplingParams(max_tokens=500)) as ev:
                    out = [e async for e in ev]
                assert len(out) == 501 and isinstance(out[-1], poc_api.StreamDone)


async def _bytes_an_unread_stream_holds(server: ReferenceServer, **client_kw: int) -> int:
    """What the server wrote to one stream nobody reads, until flow control stopped it.

    The stream has 20,000 events (~41 MB): one the client never stops ends first.
    """
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url, **client_kw) as c:
        async with c.session() as s:
            await s.prefill(HELLO)
            before = server.state().bytes_streamed
            sampling = SamplingParams(max_tokens=20_000)
            async with s.generate(sampling=sampling, readout_ranges=[(0, 10**7)]) as ev:
                first = await ev.__anext__()
                assert isinstance(first, Token) and first.readout is not None
                assert first.readout.nbytes == 64 * 8 * 4
                return await wait_until_streaming_stalls(server) - before


# A token event of the wide server: 512 floats and ~30 bytes of the rest.
WIDE_EVENT = 64 * 8 * 4 + 32


@pytest.mark.parametrize(
    ("client_kw", "bound"),
    [
        # The default byte bound, with the event count out of the way.
        ({"max_buffered_events": 10**6}, 4 * MB),
        ({"max_buffered_bytes": 256 * 1024}, 256 * 1024),
    ],
    ids=["default-bytes", "256KiB"],
)
async def test_an_unread_stream_of_big_events_holds_its_byte_bound_plus_its_window(
    wide_server: ReferenceServer, client_kw: dict[str, int], bound: int
) -> None:
    # Events are counted (max_buffered_events) and weighed: with real models' readouts
    # (tens of KiB a token) 4,096 buffered events alone would be hundreds of MiB per
    # stream. A stream nobody reads holds at most: the batch its first event came in
    # (in the consumer's hands), the buffer, each up to `bound` and one event, and the
    # 1 MiB stream window. Counted alone, the 256 KiB case held 9 MB, and the other
    # never stopped.
    held = await _bytes_an_unread_stream_holds(wide_server, **client_kw)
    assert bound < held <= 2 * (bound + WIDE_EVENT) + 1 * MB


async def test_a_stream_in_big_data_frames_holds_no_more_than_its_window_beyond_its_buffers(
    bad_server: MisbehavingServer,
) -> None:
    # A server may pack the whole stream window into one DATA frame (the client takes
    # frames up to 1 MiB). The client takes such a frame whole and cuts the messages
    # out as its buffer has room: the window for the frame's uncut rest goes back only
    # when it is cut, or an unread stream would hold that rest *beyond* its window
    # (it held two windows here, and the ReferenceServer's 128 KiB writes went over
    # the bound of the test above on a loaded machine).
    bound = 32 * 1024
    event = 5 + len(encode_token(65, False, 10_000, -0.5, readout=[0.5] * 128)[5:])
    bad_server.plan("Generate", Reply("flood", tokens=5_000))  # ~2.6 MB
    kw = {"max_buffered_bytes": bound, "max_buffered_events": 10**6}
    async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=bad_server.url, **kw) as c:
        async with c.session() as s:
            async with s.generate(HELLO, sampling=SamplingParams(max_tokens=5_000)) as ev:
                assert isinstance(await ev.__anext__(), Token)
                with trio.fail_after(30):
                    last = -1
                    while bad_server.data_sent != last:  # until flow control stops it
                        last = bad_server.data_sent
                        await trio.sleep(0.3)
    # More than the window: what was cut into the buffers went back at once (with the
    # whole frame's window held until it was all cut, a server that sends
    # window-sized frames could not send on while a slow consumer worked through one).
    # The buffers weigh messages, the window counts their 5-byte prefixes too.
    assert 1 * MB + bound < last <= 2 * (bound + event) * event / (event - 5) + 1 * MB


@pytest.mark.parametrize("kind", ["dribble", "dribble_ping"])
async def test_an_unread_stream_of_tiny_and_empty_data_frames_holds_little(
    bad_server: MisbehavingServer, kind: Kind
) -> None:
    # grpclib queues one entry (~130 bytes) per DATA frame: a stream window's worth of
    # 1-byte frames held ~140 MiB, and empty frames (no window at all) without bound.
    # A stream's frames that came in one read are now one entry, and empty ones
    # none, also with frames of no concern to the stream between them (PINGs).
    bad_server.plan("Generate", Reply(kind, tokens=1_000))  # 17 kB, a byte per frame
    kw = {"max_buffered_events": 2, "close_timeout": 1.0}
    async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=bad_server.url, **kw) as c:
        async with c.session() as s:
            sampling = SamplingParams(max_tokens=1_000)
            async with s.generate(HELLO, sampling=sampling) as ev:
                assert isinstance(await ev.__anext__(), Token)

                async def queued() -> int:
                    protocol = c._transport._channel._protocol  # type: ignore[union-attr]
                    streams = protocol.processor.streams.values()
                    return sum(st.buffer._unacked.qsize() for st in streams)

                with trio.fail_after(60):
                    await wait_for(lambda: bad_server.dribbled, timeout=60)  # all of it is out
                    entries = -1
                    while entries != (entries := await c._bridge.run(queued)):  # type: ignore[union-attr]  # noqa: ASYNC110
                        await trio.sleep(0.5)  # until the client has taken it all in
    assert entries < 2_000, entries  # it was 17,000-34,000 (an entry per frame)


@pytest.fixture
def small_send_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's sockets get a fixed 16 KiB kernel send buffer.

    A "ping_flood" server reads nothing, so the client's answers back up in its
    kernel send buffer before its own write buffer: on loopback that buffer grows
    to 4 MiB, 250,000 PINGs the client decodes (seconds of CPU) before the cutoff
    under test even starts counting.
    """
    connection_made = _PocH2Protocol.connection_made

    def made(self: _PocH2Protocol, transport: asyncio.BaseTransport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        connection_made(self, transport)

    monkeypatch.setattr(_PocH2Protocol, "connection_made", made)


@pytest.mark.usefixtures("small_send_buffer")
async def test_a_server_that_floods_pings_and_reads_no_answer_is_cut_off(
    bad_server: MisbehavingServer,
) -> None:
    # The client answered every PING into its write buffer, which a server that
    # reads nothing never drains: memory grew with the flood (~3 MiB/s here, 1:1
    # with what the server sent) for as long as it went on.
    flood = 256 * MB
    bad_server.plan("OpenSession", Reply("ping_flood", claimed_size=flood))
    async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=bad_server.url) as c:
        with trio.fail_after(60), pytest.raises(poc_api.ProtocolViolation, match="PING"):
            async with c.session():
                pass
        # Cut off after ~1 MiB of unread answers, plus what the socket buffers held.
        assert bad_server.flood_sent < 32 * MB, bad_server.flood_sent


@pytest.mark.usefixtures("small_send_buffer")
async def test_a_call_waiting_to_write_when_its_connection_is_cut_off_goes_elsewhere(
    bad_server: MisbehavingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A call that had its connection but waited for the full write buffer to drain
    # (before its HEADERS) was woken by nothing when the connection died: it hung
    # (a flooding server cut off, or any connection lost while its buffer was full).
    paused = threading.Event()
    pause_writing = _PocH2Protocol.pause_writing

    def pausing(self: _PocH2Protocol) -> None:
        pause_writing(self)
        paused.set()

    monkeypatch.setattr(_PocH2Protocol, "pause_writing", pausing)
    # (A longer flood before the cutoff: the second call is surely waiting by then.)
    monkeypatch.setattr(transport_module, "_MAX_UNREAD_ANSWERS", 2 * MB)
    bad_server.plan("OpenSession", Reply("ping_flood", claimed_size=256 * MB))
    async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=bad_server.url) as c:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def flooded() -> None:
                    with pytest.raises(poc_api.ProtocolViolation, match="PING"):
                        async with c.session():
                            pass

                nursery.start_soon(flooded)
                await wait_for(paused.is_set, timeout=30)
                async with c.session() as s:  # nothing of it was sent: sent again
                    await s.prefill([1, 2])
        assert bad_server.connections == 2


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "4"])
def test_max_buffered_bytes_must_be_a_positive_int(value: object) -> None:
    with pytest.raises(ValueError if value in (0, -1) else TypeError, match="max_buffered_bytes"):
        poc_api.ApiClient("http://127.0.0.1:1/v1", max_buffered_bytes=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "client_kw",
    [{"max_buffered_events": 8}, {"max_buffered_bytes": 300}],
    ids=["events", "bytes"],
)
async def test_a_stream_the_server_ended_in_time_is_not_cut_by_timeout_for_slow_reading(
    server: ReferenceServer, client_kw: dict[str, int]
) -> None:
    # The server sends all 60 tokens, Done and its trailers within milliseconds; the
    # consumer reads them slowly, past timeout=. generate()'s contract: a call whose
    # stream had ended in time is not cut by your own slow reading of its events.
    # With the client's own buffer bound holding back the (already received) rest,
    # the call raised PocApiTimeout and the session was marked lost.
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url, **client_kw) as c:
        async with c.session() as s:
            n = 0
            sampling = SamplingParams(max_tokens=60)
            async with s.generate(HELLO, sampling=sampling, timeout=0.5) as ev:
                async for _ in ev:
                    n += 1
                    await trio.sleep(0.02)  # 61 events: ~1.3 s of slow reading
            assert n == 61 and not s.lost
            assert s.committed_len == len(HELLO) + 60


@pytest.mark.parametrize("trickle", [False, True])
async def test_a_small_call_is_not_starved_when_the_connection_window_comes_back_in_bits(
    bad_server: MisbehavingServer, trickle: bool
) -> None:
    # A connection WINDOW_UPDATE woke the streams waiting for window oldest first
    # (grpclib), each woken upload took a frame of it, and a server that returns
    # the window in updates smaller than a frame per upload (h2's own: 32 KiB at a
    # time; trickle: 16 MiB stream windows, each DATA frame's bytes given back as
    # it arrives) left a new call none, update after update, until most uploads
    # had ended.
    bad_server.trickle_window = trickle
    png = make_png(56, 28, padding=8 * MB)
    async with poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=bad_server.url) as c:
        # Done long before the uploads (before: 5 or 6 of 8 ended first).
        assert await uploads_ended_during_a_small_call(c, png, 8, 0.05) <= 2
