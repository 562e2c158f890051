"""poc_api's h2 ``_receive_frame`` (h2's own, less its per-frame repr) does what h2's does.

Two client connections, stock h2 and stock h2 with poc_api's ``_receive_frame``,
go through the same random sequence of client actions and server frames: the
events, the bytes they send and the errors they raise must be the same. An h2
release that changes its ``_receive_frame`` fails here (the canary of
``tests/test_private_names.py`` only sees names disappear).
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.exceptions
import hpack
from hyperframe.frame import (
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from poc_api._transport import _SplitWindowH2Connection


class _Ours(h2.connection.H2Connection):
    _receive_frame = _SplitWindowH2Connection._receive_frame


class _OursReceiving(_Ours):
    # receive_data too (h2's, keeping the events before a bad frame), with the
    # connection-level window returned on receipt: its bytes differ, not its events.
    receive_data = _SplitWindowH2Connection.receive_data
    _check_header_blocks = _SplitWindowH2Connection._check_header_blocks
    _frame_left, _frame_head, _header_block = 0, b"", 0
    data_at = _SplitWindowH2Connection.data_at
    events_before_error = None


_REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/salience.v1.Salience/OpenSession"),
    (":authority", "localhost"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
]
_RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]
_TRAILERS = [("grpc-status", "0")]

_stream = st.integers(0, 3)  # client stream ids 1, 3, 5, 7
_op = st.one_of(
    st.tuples(st.just("open"), st.booleans()),
    st.tuples(st.just("client_reset"), _stream),
    st.tuples(st.just("client_end"), _stream),
    st.tuples(st.just("headers"), _stream, st.booleans()),
    st.tuples(st.just("trailers"), _stream),
    st.tuples(st.just("data"), _stream, st.integers(0, 40), st.booleans()),
    st.tuples(st.just("rst"), _stream, st.sampled_from([0, 1, 7, 8])),
    st.tuples(st.just("window"), st.integers(0, 3), st.integers(1, 1000)),
    st.tuples(st.just("ping")),
    st.tuples(st.just("badpad"), _stream),
)


def _frame(op: tuple[Any, ...], encoder: hpack.Encoder) -> bytes:
    kind = op[0]
    sid = 2 * op[1] + 1 if len(op) > 1 else 0
    f: Any
    if kind in ("headers", "trailers"):
        f = HeadersFrame(sid)
        f.data = encoder.encode(_RESPONSE if kind == "headers" else _TRAILERS)
        f.flags.add("END_HEADERS")
        if kind == "trailers" or op[2]:
            f.flags.add("END_STREAM")
    elif kind == "data":
        f = DataFrame(sid)
        f.data = b"d" * op[2]
        if op[3]:
            f.flags.add("END_STREAM")
    elif kind == "rst":
        f = RstStreamFrame(sid)
        f.error_code = op[2]
    elif kind == "window":
        f = WindowUpdateFrame(2 * op[1] - 1 if op[1] else 0)  # 0: the connection
        f.window_increment = op[2]
    elif kind == "badpad":
        # A DATA frame whose padding is longer than the frame: invalid padding.
        # (length 3, type DATA, flags PADDED; pad length 5, then 2 bytes)
        return b"\x00\x00\x03\x00\x08" + sid.to_bytes(4, "big") + b"\x05ab"
    else:
        f = PingFrame(0)
        f.opaque_data = b"12345678"
    return bytes(f.serialize())


def _run(cls: type[h2.connection.H2Connection], ops: list[tuple[Any, ...]]) -> list[Any]:
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    conn = cls(config=config)
    conn.initiate_connection()
    encoder = hpack.Encoder()
    record: list[Any] = [conn.data_to_send()]
    steps: list[Any] = [("settings",), *ops]
    for op in steps:
        try:
            if op[0] == "settings":
                events = conn.receive_data(SettingsFrame(0).serialize())
            elif op[0] == "open":
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, _REQUEST, end_stream=op[1])
                events = []
            elif op[0] == "client_reset":
                conn.reset_stream(2 * op[1] + 1)
                events = []
            elif op[0] == "client_end":
                conn.end_stream(2 * op[1] + 1)
                events = []
            else:
                events = conn.receive_data(_frame(op, encoder))
            record.append(("events", [repr(event) for event in events]))
        except Exception as exc:
            record.append(("raised", type(exc).__name__, str(exc)))
        record.append(conn.data_to_send())
    return record


@settings(max_examples=400, deadline=None)
@given(st.lists(_op, max_size=14))
# Each way out of h2's frame dispatch (found by search): StreamClosedError on a
# stream closed by a reset (with and without events to pass on) and not; and
# StreamIDTooLowError on a stream closed by a reset, by its end, and implicitly.
@example([("open", False), ("client_reset", 0), ("headers", 0, False)])
@example([("open", False), ("headers", 0, True), ("headers", 0, False)])
@example([("open", False), ("data", 0, 3, False), ("headers", 0, False)])
@example([("open", False), ("client_reset", 0), ("open", False), ("headers", 0, False)])
@example([("open", True), ("headers", 0, True), ("open", False), ("headers", 0, False)])
@example([("open", False), ("data", 0, 3, False), ("open", False), ("headers", 0, False)])
def test_poc_apis_receive_frame_does_what_h2s_does(ops: list[tuple[Any, ...]]) -> None:
    assert _run(_Ours, ops) == _run(h2.connection.H2Connection, ops)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=14))
@example([("open", False), ("badpad", 0)])
@example([("open", False), ("client_reset", 0), ("headers", 0, False)])
def test_poc_apis_receive_data_gives_the_events_and_errors_h2s_does(
    ops: list[tuple[Any, ...]],
) -> None:
    def seen(record: list[Any]) -> list[Any]:
        return [r for r in record if isinstance(r, tuple)]

    assert seen(_run(_OursReceiving, ops)) == seen(_run(h2.connection.H2Connection, ops))


def test_the_events_of_the_frames_before_a_bad_one_are_kept() -> None:
    # h2 drops them with its exception: a reply among them was lost.
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    conn = _OursReceiving(config=config)
    conn.initiate_connection()
    conn.receive_data(SettingsFrame(0).serialize())
    conn.send_headers(1, _REQUEST, end_stream=True)
    encoder = hpack.Encoder()
    good = _frame(("headers", 0, False), encoder) + _frame(("data", 0, 5, False), encoder)
    try:
        conn.receive_data(good + _frame(("badpad", 0), encoder))
    except h2.exceptions.ProtocolError:
        pass
    else:  # pragma: no cover
        raise AssertionError("invalid padding was taken")
    kept = conn.events_before_error
    assert kept is not None
    assert [type(e).__name__ for e in kept] == ["ResponseReceived", "DataReceived"]


def test_it_skips_the_repr_of_every_frame() -> None:
    # What it is for: h2's formats each frame for a trace log, logger or not.
    calls: list[str] = []

    class Counting(h2.connection.H2Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.config.logger.trace = lambda *a: calls.append("trace")  # type: ignore[method-assign]

    class CountingOurs(Counting):
        _receive_frame = _SplitWindowH2Connection._receive_frame

    ops: list[tuple[Any, ...]] = [("open", True), ("headers", 0, False), ("trailers", 0)]
    _run(Counting, ops)
    assert "trace" in calls
    calls.clear()
    _run(CountingOurs, ops)
    assert calls.count("trace") < 4  # receive_data's own, lazily formatted, stays
