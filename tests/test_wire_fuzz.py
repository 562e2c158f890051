"""Gaps of tests/test_wire.py and tests/test_hpack.py, closed by differential fuzzing.

* random corruptions (byte overwrites, bit flips, insertions, deletions, cuts) of
  valid messages, for every decoder of poc_api._wire, judged by upb: where it
  refuses the bytes, ProtocolViolation and nothing else; where it accepts them,
  the same values (the unary replies had no upb oracle at all, only betterproto2
  on well-formed input);
* CachingEncoder against a peer decoder with table size changes as a server's
  SETTINGS may send them: the same size again, several in a row, 0, and 2**32-1;
  and header lists given as str, 3-tuples and HeaderTuples, not only bytes pairs.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hpack
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st
from test_wire import FAST, PROTO_DIR, _upb_class, norm_ours, upb_parse

from poc_api import _wire
from poc_api._errors import ProtocolViolation
from poc_api._hpack import CachingEncoder
from poc_api._proto import salience as pb
from poc_api._proto.grpc.health.v1 import HealthCheckResponse


@functools.cache
def _upb_health() -> Any:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "health.pb"
        proto = "grpc/health/v1/health.proto"
        assert protoc.main(["protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={out}", proto]) == 0
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    name = "grpc.health.v1.HealthCheckResponse"
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def _upb(cls: Any, fields: Callable[[Any], Any]) -> Callable[[bytes], Any]:
    from google.protobuf.message import DecodeError

    def parse(data: bytes) -> Any:
        try:
            return fields(cls().FromString(data))
        except DecodeError:
            return None

    return parse


_f32s = st.sampled_from([0.0, -0.0, 1.5, -2.25, math.inf, -math.inf, math.nan, 3.4e38, 1e-45])
_u32 = st.integers(0, 2**32 - 1)

# (valid message bytes, our decoder and how to compare its result, upb's verdict)
_CASES: dict[str, tuple[st.SearchStrategy[bytes], Callable[[bytes], Any], Callable[[bytes], Any]]]
_CASES = {
    "GenerateEvent": (
        st.one_of(
            st.builds(
                lambda *a: bytes(
                    pb.GenerateEvent(
                        token=pb.Token(
                            id=a[0],
                            is_prefill=a[1],
                            position=a[2],
                            sampled_logprob=a[3],
                            top_logprobs=[pb.TopLogprob(id=i, logprob=f) for i, f in a[4]],
                            readout=a[5],
                        )
                    )
                ),
                _u32,
                st.booleans(),
                _u32,
                _f32s,
                st.lists(st.tuples(_u32, _f32s), max_size=3),
                st.lists(_f32s, max_size=8),
            ),
            st.builds(
                lambda p, c, t, r: bytes(
                    pb.GenerateEvent(
                        done=pb.Done(
                            prompt_tokens=p, completion_tokens=c, total_tokens=t, finish_reason=r
                        )
                    )
                ),
                _u32,
                _u32,
                _u32,
                st.text(max_size=6),
            ),
        ),
        lambda d: norm_ours(_wire.decode_generate_event(d)),
        upb_parse,
    ),
    "OpenSessionResponse": (
        st.builds(
            lambda s, m: bytes(pb.OpenSessionResponse(session_id=s, max_length=m)),
            st.text(max_size=10),
            _u32,
        ),
        _wire.decode_open_session,
        lambda d: _upb(
            lambda: _upb_class("salience.OpenSessionResponse"),
            lambda m: (m.session_id, m.max_length),
        )(d),
    ),
    "AppendImageResponse": (
        st.builds(
            lambda c, t: bytes(pb.AppendImageResponse(placeholder_count=c, total_length=t)),
            _u32,
            _u32,
        ),
        _wire.decode_append_image,
        lambda d: _upb(
            lambda: _upb_class("salience.AppendImageResponse"),
            lambda m: (m.placeholder_count, m.total_length),
        )(d),
    ),
    "HealthCheckResponse": (
        st.builds(
            lambda s: bytes(HealthCheckResponse(status=s)),
            st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, 2, 3, -1]),
        ),
        _wire.decode_health_check,
        lambda d: _upb(_upb_health, lambda m: m.status)(d),
    ),
}


@st.composite
def _corrupted(draw: Any, valid: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 4))
        if op == 0 and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == 1 and data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == 2:
            data.insert(draw(st.integers(0, len(data))), draw(st.integers(0, 255)))
        elif op == 3 and data:
            del data[draw(st.integers(0, len(data) - 1))]
        else:
            del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


@settings(FAST, max_examples=300)
@given(st.data())
def test_corrupted_messages_are_refused_or_decoded_as_upb_does(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(_CASES)))
    valid, ours, upb = _CASES[name]
    blob = data.draw(_corrupted(valid))
    want = upb(blob)
    try:
        got = ours(blob)
    except ProtocolViolation as exc:
        assert want is None, (name, blob, exc)
        assert name in str(exc)
        return
    # (any other exception fails the test: IndexError, struct.error, ValueError, ...)
    assert got == want, (name, blob)


# --------------------------------------------------------------------------- HPACK

_names = st.sampled_from([":path", b"content-type", "te", b"user-agent", "x-meta", b"x-aff"])
_values = st.sampled_from(["a", b"bb", "/salience.Salience/Generate", b"x" * 40, "y" * 300, "é"])


def _as_header(kind: int, name: str | bytes, value: str | bytes) -> Any:
    if kind == 0:
        return (name, value)
    if kind == 1:
        return (name, value, False)
    if kind == 2:
        return HeaderTuple(name, value)
    if kind == 3:
        return (name, value, True)
    return NeverIndexedHeaderTuple(name, value)


_any_header = st.builds(_as_header, st.sampled_from([0, 0, 1, 2, 3, 4]), _names, _values)
# As a server's SETTINGS_HEADER_TABLE_SIZE may come: the same size again, several
# in a row, 0, or the largest a SETTINGS value can carry.
_sizes = st.lists(st.sampled_from([0, 1, 64, 256, 4096, 65536, 2**32 - 1]), min_size=1, max_size=3)
_step = st.one_of(st.integers(0, 4), _sizes)


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode()


@settings(max_examples=300, deadline=None)
@given(
    lists=st.lists(st.lists(_any_header, max_size=5), min_size=5, max_size=5),
    steps=st.lists(_step, max_size=40),
)
def test_any_header_form_and_any_table_size_sequence_stay_in_step_with_the_peer(
    lists: list[list[Any]], steps: list[int | list[int]]
) -> None:
    ours, peer = CachingEncoder([b"x-aff"]), hpack.Decoder()
    for step in steps:
        if isinstance(step, list):
            for size in step:
                ours.header_table_size = size
            # A strict peer: no size update above the last one it acknowledged.
            peer.max_allowed_table_size = step[-1]
            continue
        headers = lists[step]
        got = [(bytes(h[0]), bytes(h[1])) for h in peer.decode(ours.encode(headers), raw=True)]
        want = [(_b(h[0]), _b(h[1])) for h in headers]
        # The unindexed header goes last, as a never-indexed literal.
        want = [h for h in want if h[0] != b"x-aff"] + [h for h in want if h[0] == b"x-aff"]
        assert got == want
        assert peer.header_table.maxsize == ours.header_table.maxsize
        assert list(peer.header_table.dynamic_entries) == list(ours.header_table.dynamic_entries)
