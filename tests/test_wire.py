"""Tests of poc_api._wire: the hand-written GenerateEvent decoder and RawCodec.

The decoder is checked three ways:

* against a model: the values a test encoded, readout bits compared exactly;
* against betterproto2's parser, where betterproto2 follows protobuf (one oneof
  member occurrence per message);
* against the reference protobuf parser (upb, via the ``protobuf`` package and a
  descriptor compiled from proto/salience.proto by grpcio-tools) for everything,
  including validity: each truncated prefix that upb rejects must raise
  ProtocolViolation, each it accepts must decode to the same event.
"""

from __future__ import annotations

import functools
import math
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import betterproto2
import pytest
from grpclib.encoding.base import CodecBase
from helpers import make_png, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import poc_api
from poc_api import SamplingParams, _wire
from poc_api._errors import ProtocolViolation
from poc_api._proto import salience as pb
from poc_api._proto.grpc.health.v1 import HealthCheckRequest
from poc_api._types import Done, Token, TopLogprob
from poc_api._wire import RawCodec, decode_generate_event
from poc_api.server import ReferenceServer

PROTO_DIR = Path(__file__).resolve().parent.parent / "proto"
U32 = 2**32 - 1
U64 = 2**64 - 1
FAST = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------- oracles


def _upb_event_class() -> Any:
    """GenerateEvent of the reference protobuf runtime, in a private descriptor pool."""
    return _upb_class("salience.GenerateEvent")


@functools.cache
def _upb_class(name: str) -> Any:
    """Message ``name`` of the reference protobuf runtime, in a private descriptor pool."""
    # grpcio-tools and protobuf are part of the test extra: a missing one is a
    # broken install, so import them plainly rather than skip.
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "salience.pb"
        rc = protoc.main(
            ["protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={out}", "salience.proto"]
        )
        assert rc == 0
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    # A private pool: other tests may register salience.proto in the default one.
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def _f32(bits: int) -> float:
    return float(struct.unpack("<f", struct.pack("<I", bits))[0])


def _bits(x: float) -> int:
    return int(struct.unpack("<I", struct.pack("<f", x))[0])


def _nf(x: float) -> object:
    """A float32 for comparison: its bits, or "nan" (runtimes may quiet NaN payloads)."""
    return "nan" if math.isnan(x) else _bits(x)


def _norm_parts(
    kind: str | None,
    scalars: tuple[Any, ...],
    tops: Any = (),
    readout: Any = (),
) -> tuple[Any, ...]:
    if kind == "token":
        tid, pos, prefill, lp = scalars
        return (
            "token",
            tid,
            pos,
            bool(prefill),
            _nf(lp),
            tuple((t.id, _nf(t.logprob)) for t in tops),
            tuple(_nf(x) for x in readout),
        )
    if kind == "done":
        return ("done", *scalars)
    return (None,)


def norm_ours(ev: Token | Done | None) -> tuple[Any, ...]:
    if isinstance(ev, Token):
        readout = () if ev.readout is None else ev.readout.tolist()
        scalars = (ev.id, ev.position, ev.is_prefill, ev.sampled_logprob)
        return _norm_parts("token", scalars, ev.top_logprobs, readout)
    if isinstance(ev, Done):
        scalars = (ev.prompt_tokens, ev.completion_tokens, ev.total_tokens, ev.finish_reason)
        return _norm_parts("done", scalars)
    assert ev is None
    return (None,)


def norm_bp(ev: pb.GenerateEvent) -> tuple[Any, ...]:
    name, v = betterproto2.which_one_of(ev, "event")
    if name == "token":
        scalars = (v.id, v.position, v.is_prefill, v.sampled_logprob)
        return _norm_parts("token", scalars, v.top_logprobs, v.readout)
    if name == "done":
        scalars = (v.prompt_tokens, v.completion_tokens, v.total_tokens, v.finish_reason)
        return _norm_parts("done", scalars)
    return (None,)


def norm_upb(ev: Any) -> tuple[Any, ...]:
    name = ev.WhichOneof("event")
    if name == "token":
        v = ev.token
        scalars = (v.id, v.position, v.is_prefill, v.sampled_logprob)
        return _norm_parts("token", scalars, v.top_logprobs, v.readout)
    if name == "done":
        v = ev.done
        scalars = (v.prompt_tokens, v.completion_tokens, v.total_tokens, v.finish_reason)
        return _norm_parts("done", scalars)
    return (None,)


def upb_parse(data: bytes) -> tuple[Any, ...] | None:
    """The reference decode normalized, or None when protobuf rejects ``data``."""
    from google.protobuf.message import DecodeError

    try:
        return norm_upb(_upb_event_class().FromString(data))
    except DecodeError:
        return None


# --------------------------------------------------------------------------- model


@dataclass
class TokSpec:
    id: int = 0
    position: int = 0
    prefill: bool = False
    logprob: int = 0  # float32 bits
    tops: list[tuple[int, int]] = field(default_factory=list)  # (id, float32 bits)
    readout: list[int] = field(default_factory=list)  # float32 bits

    def norm(self) -> tuple[Any, ...]:
        tops = [TopLogprob(i, _f32(b)) for i, b in self.tops]
        scalars = (self.id, self.position, self.prefill, _f32(self.logprob))
        return _norm_parts("token", scalars, tops, [_f32(b) for b in self.readout])

    def readout_bytes(self) -> bytes:
        return struct.pack(f"<{len(self.readout)}I", *self.readout)

    def betterproto(self) -> pb.GenerateEvent:
        return pb.GenerateEvent(
            token=pb.Token(
                id=self.id,
                is_prefill=self.prefill,
                position=self.position,
                sampled_logprob=_f32(self.logprob),
                top_logprobs=[pb.TopLogprob(id=i, logprob=_f32(b)) for i, b in self.tops],
                readout=[_f32(b) for b in self.readout],
            )
        )


@dataclass
class DoneSpec:
    prompt: int = 0
    completion: int = 0
    total: int = 0
    reason: str = ""

    def norm(self) -> tuple[Any, ...]:
        return _norm_parts("done", (self.prompt, self.completion, self.total, self.reason))

    def betterproto(self) -> pb.GenerateEvent:
        return pb.GenerateEvent(
            done=pb.Done(
                prompt_tokens=self.prompt,
                completion_tokens=self.completion,
                total_tokens=self.total,
                finish_reason=self.reason,
            )
        )


SPECIAL_F32 = [
    0x00000000,  # +0
    0x80000000,  # -0
    0x7F800000,  # +inf
    0xFF800000,  # -inf
    0x7FC00000,  # quiet NaN
    0xFFC00001,  # negative NaN with payload
    0x7F800001,  # signalling NaN
    0x00000001,  # smallest subnormal
    0x7F7FFFFF,  # largest finite
    0xFF7FFFFF,  # most negative finite
    U32,  # all bits set (a NaN)
]
u32s = st.one_of(st.sampled_from([0, 1, 127, 128, 16383, 16384, 2**31, U32]), st.integers(0, U32))
f32_bits = st.one_of(
    st.sampled_from(SPECIAL_F32),
    st.integers(0, U32),
    st.floats(width=32, allow_nan=False).map(_bits),
)
tok_specs = st.builds(
    TokSpec,
    id=u32s,
    position=u32s,
    prefill=st.booleans(),
    logprob=f32_bits,
    tops=st.lists(st.tuples(u32s, f32_bits), max_size=5),
    readout=st.one_of(st.just([]), st.lists(f32_bits, max_size=40)),
)
done_specs = st.builds(
    DoneSpec,
    prompt=u32s,
    completion=u32s,
    total=u32s,
    reason=st.text(st.characters(codec="utf-8"), max_size=12),
)
event_specs = st.one_of(tok_specs, done_specs, st.none())
# Tokens are the interesting case: weight them up.
weighted_specs = st.integers(0, 5).flatmap(
    lambda i: tok_specs if i >= 2 else done_specs if i == 1 else st.none()
)

# --------------------------------------------------------------------------- encoders


def varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def draw_varint(draw: Any, v: int, *, u32: bool = False, limit: int = 10) -> bytes:
    """``v`` as a canonical, zero-padded, or (uint32 fields) high-bits-garbage varint."""
    mode = draw(st.integers(0, 2 if u32 else 1))
    if mode == 2:
        # Bits above 32 are dropped for uint32: 10-byte "negative" encodings and the like.
        high = draw(st.one_of(st.just(2**32 - 1), st.integers(0, 2**32 - 1)))
        return varint(v | (high << 32))
    b = varint(v)
    if mode == 0 or len(b) >= limit:
        return b
    pad = draw(st.integers(0, limit - len(b) - 1))
    return b[:-1] + bytes([b[-1] | 0x80]) + b"\x80" * pad + b"\x00"


def draw_tag(draw: Any, number: int, wire_type: int) -> bytes:
    return draw_varint(draw, number << 3 | wire_type, limit=5)


def draw_len(draw: Any, number: int, payload: bytes) -> bytes:
    # upb rejects length prefixes longer than 5 bytes, padded or not.
    return draw_tag(draw, number, 2) + draw_varint(draw, len(payload), limit=5) + payload


def draw_unknown(draw: Any, min_number: int, depth: int = 0) -> bytes:
    """One unknown field (any wire type, groups included) numbered above ``min_number``."""
    number = draw(st.one_of(st.integers(min_number + 1, 40), st.integers(41, 2**29 - 1)))
    wire_type = draw(st.sampled_from([0, 1, 2, 5] + ([3] if depth < 2 else [])))
    tag = draw_tag(draw, number, wire_type)
    if wire_type == 0:
        return tag + draw_varint(draw, draw(st.integers(0, U64)))
    if wire_type == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    if wire_type == 2:
        return draw_len(draw, number, draw(st.binary(max_size=12)))
    inner = [draw_unknown(draw, min_number, depth + 1) for _ in range(draw(st.integers(0, 2)))]
    return tag + b"".join(inner) + draw_tag(draw, number, 4)


def interleave(draw: Any, seqs: list[list[bytes]]) -> bytes:
    """Merge the sequences in a random order that keeps each one's own order."""
    labels = [i for i, s in enumerate(seqs) for _ in s]
    order = draw(st.permutations(labels))
    its = [iter(s) for s in seqs]
    return b"".join(next(its[i]) for i in order)


def draw_scalar(draw: Any, number: int, value: int, kind: str, decoys: Any) -> list[bytes]:
    """A scalar field, possibly after earlier values it overrides, possibly omitted if 0."""
    values = [*draw(st.lists(decoys, max_size=2)), value]
    if value == 0 and len(values) == 1 and draw(st.booleans()):
        return []
    out = []
    for v in values:
        if kind == "f32":
            out.append(draw_tag(draw, number, 5) + struct.pack("<I", v))
        elif kind == "bool":
            raw = draw(st.integers(1, U64)) if v else 0
            out.append(draw_tag(draw, number, 0) + draw_varint(draw, raw))
        else:
            out.append(draw_tag(draw, number, 0) + draw_varint(draw, v, u32=True))
    return out


def draw_unknowns(draw: Any, min_number: int, enabled: bool) -> list[bytes]:
    if not enabled:
        return []
    return [draw_unknown(draw, min_number) for _ in range(draw(st.integers(0, 3)))]


def encode_token(draw: Any, spec: TokSpec, unknown: bool) -> bytes:
    seqs = [
        draw_scalar(draw, 1, spec.id, "u32", u32s),
        draw_scalar(draw, 2, int(spec.prefill), "bool", st.booleans().map(int)),
        draw_scalar(draw, 3, spec.position, "u32", u32s),
        draw_scalar(draw, 4, spec.logprob, "f32", f32_bits),
        draw_unknowns(draw, 6, unknown),
    ]
    tops = []
    for tid, bits in spec.tops:
        body = interleave(
            draw,
            [
                draw_scalar(draw, 1, tid, "u32", u32s),
                draw_scalar(draw, 2, bits, "f32", f32_bits),
                draw_unknowns(draw, 2, unknown),
            ],
        )
        tops.append(draw_len(draw, 5, body))
    seqs.append(tops)
    # The readout in chunks, each packed or one fixed32 field per element.
    readout = []
    rest = spec.readout
    empties = draw(st.integers(0, 3)) // 2  # sometimes empty packed chunks
    while rest or empties:
        empties -= not rest
        n = draw(st.integers(0, len(rest)))
        chunk, rest = rest[:n], rest[n:]
        if chunk and draw(st.booleans()):
            readout += [draw_tag(draw, 6, 5) + struct.pack("<I", b) for b in chunk]
        else:
            readout.append(draw_len(draw, 6, struct.pack(f"<{n}I", *chunk)))
    seqs.append(readout)
    return interleave(draw, seqs)


def encode_done(draw: Any, spec: DoneSpec, unknown: bool) -> bytes:
    reasons = [*draw(st.lists(st.text(max_size=3), max_size=1)), spec.reason]
    if spec.reason == "" and len(reasons) == 1 and draw(st.booleans()):
        reasons = []
    seqs = [
        draw_scalar(draw, 1, spec.prompt, "u32", u32s),
        draw_scalar(draw, 2, spec.completion, "u32", u32s),
        draw_scalar(draw, 3, spec.total, "u32", u32s),
        [draw_len(draw, 4, r.encode()) for r in reasons],
        draw_unknowns(draw, 4, unknown),
    ]
    return interleave(draw, seqs)


def encode_event(draw: Any, spec: TokSpec | DoneSpec | None, unknown: bool = True) -> bytes:
    if isinstance(spec, TokSpec):
        member = [draw_len(draw, 1, encode_token(draw, spec, unknown))]
    elif isinstance(spec, DoneSpec):
        member = [draw_len(draw, 2, encode_done(draw, spec, unknown))]
    else:
        member = []
    return interleave(draw, [member, draw_unknowns(draw, 2, unknown)])


@st.composite
def exotic_events(draw: Any) -> tuple[TokSpec | DoneSpec | None, bytes]:
    spec = draw(weighted_specs)
    return spec, encode_event(draw, spec)


# --------------------------------------------------------------------------- differential


def expected(spec: TokSpec | DoneSpec | None) -> tuple[Any, ...]:
    return (None,) if spec is None else spec.norm()


def check_token_readout(ev: Token | Done | None, spec: TokSpec | DoneSpec | None) -> None:
    if not isinstance(spec, TokSpec):
        return
    assert isinstance(ev, Token)
    if not spec.readout:
        assert ev.readout is None
        return
    assert ev.readout is not None
    assert ev.readout.format == "f"
    assert ev.readout.readonly
    # Bit-exact, NaN payloads included.
    assert ev.readout.tobytes() == spec.readout_bytes()


def _drop_neg_zero(bits: int) -> int:
    return 0 if bits == 0x80000000 else bits


@FAST
@given(event_specs)
def test_decodes_betterproto2_encoding(spec: TokSpec | DoneSpec | None) -> None:
    if isinstance(spec, TokSpec):
        # betterproto2 takes a singular -0.0 for the default and does not send it.
        spec.logprob = _drop_neg_zero(spec.logprob)
        spec.tops = [(i, _drop_neg_zero(b)) for i, b in spec.tops]
        # It packs Python floats, so signalling NaNs arrive quieted on the wire.
        spec.readout = [_bits(_f32(b)) for b in spec.readout]
    msg = pb.GenerateEvent() if spec is None else spec.betterproto()
    data = bytes(msg)
    ours = decode_generate_event(data)
    assert norm_ours(ours) == expected(spec) == norm_bp(pb.GenerateEvent.parse(data))
    check_token_readout(ours, spec)
    if isinstance(spec, TokSpec) and spec.readout:
        assert isinstance(ours, Token) and ours.readout is not None
        assert ours.readout.obj is data  # one packed chunk: a view, no copy


@FAST
@given(exotic_events())
def test_exotic_encodings_match_model_betterproto2_and_upb(
    case: tuple[TokSpec | DoneSpec | None, bytes],
) -> None:
    spec, data = case
    ours = decode_generate_event(data)
    want = expected(spec)
    assert norm_ours(ours) == want
    check_token_readout(ours, spec)
    assert norm_bp(pb.GenerateEvent.parse(data)) == want
    assert upb_parse(data) == want


@settings(FAST, max_examples=50)
@given(st.data())
def test_oneof_last_member_wins_and_repeats_merge(data: st.DataObject) -> None:
    # betterproto2 neither merges repeated members nor clears the other one: upb only.
    specs = data.draw(st.lists(st.one_of(tok_specs, done_specs), min_size=1, max_size=4))
    blob = b"".join(encode_event(data.draw, s, unknown=data.draw(st.booleans())) for s in specs)
    assert norm_ours(decode_generate_event(blob)) == upb_parse(blob)


@settings(FAST, max_examples=60)
@given(exotic_events())
def test_every_truncation_raises_protocol_violation_or_decodes_the_prefix(
    case: tuple[TokSpec | DoneSpec | None, bytes],
) -> None:
    _, data = case
    for k in range(len(data)):
        prefix = data[:k]
        want = upb_parse(prefix)
        if want is None:
            with pytest.raises(ProtocolViolation):
                decode_generate_event(prefix)
        else:
            assert norm_ours(decode_generate_event(prefix)) == want
            assert norm_bp(pb.GenerateEvent.parse(prefix)) == want


def test_truncations_of_a_readout_event() -> None:
    spec = TokSpec(151_234, 4_321, False, _bits(-0.25), [(7, _bits(-1.5))], list(range(256)))
    data = bytes(spec.betterproto())
    assert norm_ours(decode_generate_event(data)) == spec.norm()
    for k in range(len(data)):
        prefix = data[:k]
        if k == 0:
            assert decode_generate_event(prefix) is None
        else:
            with pytest.raises(ProtocolViolation):
                decode_generate_event(prefix)
            assert upb_parse(prefix) is None


# --------------------------------------------------------------------------- edge cases

MALFORMED = {
    "field number 0": b"\x00\x01",
    "field number 0 inside Token": b"\x0a\x02\x00\x01",
    "wire type 6": b"\x1e",
    "wire type 7": b"\x0a\x01\x0f",
    "stray end-group": b"\x1c",
    "mismatched end-group": b"\x1b\x24",
    "truncated group": b"\x1b\x08\x01",
    "11-byte varint": b"\x0a\x0c\x08" + b"\xff" * 10 + b"\x01",
    "tag above 32 bits": b"\x80\x80\x80\x80\x10\x00",
    "6-byte tag": b"\x8a\x80\x80\x80\x80\x00\x00",
    "packed readout not a multiple of 4": b"\x0a\x05\x32\x03abc",
    "finish_reason not UTF-8": b"\x12\x03\x22\x01\xff",
    "length past the end": b"\x0a\x05\x08\x01",
    "6-byte length prefix": b"\x1a\x80\x80\x80\x80\x80\x00",
    "6-byte Token length prefix": b"\x0a\x80\x80\x80\x80\x80\x00",
    "6-byte packed readout length": b"\x0a\x07\x32\x80\x80\x80\x80\x80\x00",
    "huge length": b"\x1a\xff\xff\xff\xff\x0f",
    "truncated tag": b"\x80",
    "truncated varint value": b"\x08\x80",
    "truncated fixed32": b"\x0a\x03\x25\x00\x00",
    "truncated fixed64": b"\x19\x00",
    "truncated TopLogprob": b"\x0a\x03\x2a\x02\x15",
    "truncated TopLogprob float": b"\x0a\x04\x2a\x02\x15\x00",
    "truncated unpacked readout": b"\x0a\x03\x35\x00\x00",
    "truncated Done counter": b"\x12\x02\x08\xff",
    "deep groups": b"\x1b" * 150 + b"\x1c" * 150,
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_raises_protocol_violation(data: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="malformed GenerateEvent"):
        decode_generate_event(data)
    assert upb_parse(data) is None


ACCEPTED = {
    "empty": b"",
    "unknown fields only": b"\x18\x05\x21" + bytes(8) + b"\x2d" + bytes(4) + b"\x1a\x01x",
    "skipped groups": b"\x1b\x08\x01\x12\x01a\x23\x24\x1c\x0a\x02\x08\x05",
    "known number, wrong wire type": b"\x0a\x10\x0d\x01\x00\x00\x00\x30\x01\x31" + bytes(8),
    "oneof member as varint": b"\x08\x01\x10\x02",
    "10-byte uint32": b"\x0a\x0b\x08" + b"\xff" * 9 + b"\x7f",
    "bool whose low 64 bits are 0": b"\x0a\x0b\x10" + b"\x80" * 9 + b"\x02",
    "5-byte length prefix": b"\x1a\x80\x80\x80\x80\x00",
    "5-byte tag": b"\x8a\x80\x80\x80\x00\x00",
    "largest field number": b"\xf8\xff\xff\xff\x0f\x00",
    "token, done, token": b"\x0a\x02\x08\x05\x12\x02\x08\x07\x0a\x02\x18\x03",
    "token, token merge": (
        b"\x0a\x07\x08\x05\x35\x00\x00\x80\x3f" + b"\x0a\x07\x18\x03\x35\x00\x00\x00\x40"
    ),
    "done, done merge": b"\x12\x04\x22\x02ab\x12\x02\x08\x07",
    "empty token": b"\x0a\x00",
    "empty packed readout": b"\x0a\x02\x32\x00",
}


@pytest.mark.parametrize("data", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_edge_cases_agree_with_upb(data: bytes) -> None:
    want = upb_parse(data)
    assert want is not None
    assert norm_ours(decode_generate_event(data)) == want


def test_examples() -> None:
    assert decode_generate_event(b"") is None
    want = norm_ours(Token(0, 3, False, 0.0))
    assert norm_ours(decode_generate_event(ACCEPTED["token, done, token"])) == want
    merged = decode_generate_event(ACCEPTED["token, token merge"])
    assert isinstance(merged, Token)
    assert (merged.id, merged.position) == (5, 3)
    assert merged.readout is not None and merged.readout.tolist() == [1.0, 2.0]
    assert decode_generate_event(ACCEPTED["done, done merge"]) == Done(7, 0, 0, "ab")
    big = decode_generate_event(ACCEPTED["10-byte uint32"])
    assert isinstance(big, Token) and big.id == U32
    empty = decode_generate_event(b"\x0a\x02\x32\x00")
    assert isinstance(empty, Token) and empty.readout is None


def test_readout_is_a_zero_copy_view() -> None:
    msg = TokSpec(1, 2, False, 0, [], [_bits(float(i)) for i in range(256)]).betterproto()
    data = bytes(msg)
    ev = decode_generate_event(data)
    assert isinstance(ev, Token) and ev.readout is not None
    assert ev.readout.obj is data
    assert (ev.readout.format, ev.readout.itemsize, len(ev.readout)) == ("f", 4, 256)
    assert ev.readout.tolist() == [float(i) for i in range(256)]
    # Also over a view of a larger buffer (e.g. a received frame).
    frame = b"\x00\x00\x00\x04\x00" + data
    view = memoryview(frame)[5:]
    ev = decode_generate_event(view)  # type: ignore[arg-type]
    assert isinstance(ev, Token) and ev.readout is not None
    assert ev.readout.obj is frame
    assert ev.readout.tolist() == [float(i) for i in range(256)]


def test_big_endian_fallback_swaps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend to be big-endian: the readout must then be a byte-swapped native copy.
    monkeypatch.setattr(_wire, "_LITTLE_ENDIAN", False)
    values = [1.0, -2.5, 3.25]
    data = bytes(pb.GenerateEvent(token=pb.Token(readout=values)))
    ev = decode_generate_event(data)
    assert isinstance(ev, Token) and ev.readout is not None
    assert ev.readout.format == "f"
    wire = struct.pack("<3f", *values)
    swapped = b"".join(wire[i : i + 4][::-1] for i in range(0, len(wire), 4))
    assert ev.readout.tobytes() == swapped


def test_numpy_is_not_needed() -> None:
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from poc_api._wire import decode_generate_event\n"
        "ev = decode_generate_event(b'\\x0a\\x06\\x32\\x04\\x00\\x00\\x80\\x3f')\n"
        "assert ev.readout.tolist() == [1.0], ev\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------- RawCodec


def test_raw_codec_round_trip() -> None:
    codec = RawCodec()
    assert isinstance(codec, CodecBase)
    assert codec.__content_subtype__ == "proto"

    req = pb.GenerateRequest(session_id="s", append_tokens=[1, 2, 3], max_tokens=4)
    wire = codec.encode(req, pb.GenerateRequest)
    assert wire == bytes(req)
    assert codec.encode(wire, pb.GenerateRequest) is wire
    assert codec.encode(bytearray(wire), pb.GenerateRequest) == wire
    assert codec.decode(wire, pb.GenerateRequest) is wire
    assert bytes(pb.GenerateRequest.parse(codec.decode(wire, pb.GenerateRequest))) == wire
    with pytest.raises(TypeError):
        codec.encode(pb.Done(), pb.GenerateRequest)
    with pytest.raises(TypeError):
        codec.encode("text", pb.GenerateRequest)

    event = pb.GenerateEvent(token=pb.Token(id=9, position=3, readout=[0.5, 1.5]))
    raw = codec.decode(codec.encode(event, pb.GenerateEvent), pb.GenerateEvent)
    ev = decode_generate_event(raw)
    assert isinstance(ev, Token) and (ev.id, ev.position) == (9, 3)
    assert ev.readout is not None and ev.readout.tolist() == [0.5, 1.5]

    resp = pb.OpenSessionResponse(session_id="abc", max_length=4096)
    raw = codec.decode(codec.encode(resp, pb.OpenSessionResponse), pb.OpenSessionResponse)
    back = pb.OpenSessionResponse.parse(raw)
    assert (back.session_id, back.max_length) == ("abc", 4096)


# -- the session messages (sent and read once per OpenSession / CloseSession) -------


@given(st.text())
def test_encode_string_field_matches_betterproto2(value: str) -> None:
    encoded = _wire.encode_string_field(value)
    assert encoded == bytes(pb.OpenSessionRequest(model=value))
    assert encoded == bytes(pb.CloseSessionRequest(session_id=value))
    assert encoded == bytes(HealthCheckRequest(service=value))


# -- the other requests: byte for byte betterproto2's, and what upb reads back -------

_U32S = st.integers(0, U32) | st.sampled_from([0, 1, 127, 128, 16383, 16384, U32])
_RANGES = st.lists(st.tuples(_U32S, _U32S), max_size=3)


def _same_float(a: float, b: float) -> bool:
    return _nf(a) == _nf(b) or a == b == 0.0  # (-0.0 is left out, and reads back as 0.0)


@FAST
@given(
    session_id=st.text(),
    append_tokens=st.lists(_U32S, max_size=20),
    offset=_U32S,
    truncating=st.booleans(),
    max_tokens=_U32S,
    logprobs_ranges=_RANGES,
    logprob_top_k=_U32S,
    readout_ranges=_RANGES,
    temperature=st.floats(width=32),
    top_p=st.floats(width=32),
    top_k=_U32S,
    stop_token_ids=st.lists(_U32S, max_size=5),
    priority=st.integers(-(2**31), 2**31 - 1) | st.sampled_from([-1, -(2**31), 2**31 - 1]),
)
def test_encode_generate_request_matches_betterproto2_and_upb(**fields: Any) -> None:
    encoded = _wire.encode_generate_request(**fields)
    ranges = {
        k: [pb.PositionRange(start=a, end=b) for a, b in fields[k]]
        for k in ("logprobs_ranges", "readout_ranges")
    }
    assert encoded == bytes(pb.GenerateRequest(**{**fields, **ranges}))
    back = _upb_class("salience.GenerateRequest").FromString(encoded)
    for name, value in fields.items():
        got = getattr(back, name)
        if name.endswith("_ranges"):
            assert [(r.start, r.end) for r in got] == value, name
        elif isinstance(value, float):
            assert _same_float(got, value), (name, got, value)
        elif isinstance(value, list):
            assert list(got) == value, name
        else:
            assert got == value, name


@FAST
@given(
    session_id=st.text(),
    image=st.binary(max_size=300),
    mime=st.text(),
    offset=_U32S,
    truncating=st.booleans(),
)
def test_encode_append_image_request_matches_betterproto2_and_upb(**fields: Any) -> None:
    encoded = _wire.encode_append_image_request(**fields)
    assert encoded == bytes(pb.AppendImageRequest(**fields))
    back = _upb_class("salience.AppendImageRequest").FromString(encoded)
    assert {name: getattr(back, name) for name in fields} == fields


async def test_the_client_encodes_no_request_with_betterproto2(
    server: ReferenceServer, eos_server: ReferenceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # betterproto2's bytes(message) imports pydantic.dataclasses on its first call
    # where pydantic is installed: 50-200 ms inside a first Generate's first-token
    # wait, which a CLI test's 0.5 s --timeout ran out on in CI.
    encoded: list[str] = []
    to_bytes = betterproto2.Message.__bytes__

    def spy(message: betterproto2.Message) -> bytes:
        encoded.append(type(message).__name__)
        return to_bytes(message)

    monkeypatch.setattr(betterproto2.Message, "__bytes__", spy)
    urls = [server.grpc_url, eos_server.grpc_url]  # two endpoints: a pool, health-checked
    async with poc_api.ApiClient(
        server.base_url, grpc_url=urls, health_check_interval=0.05
    ) as client:
        async with client.session() as s:
            await s.append_image(make_png(8, 8), "image/png")
            sampling = SamplingParams(max_tokens=2, temperature=0.5, stop_token_ids=(300,))
            async with s.generate(
                [1, 2], sampling=sampling, logprobs_ranges=[(0, 2)], readout_ranges=[(1, 3)]
            ) as events:
                assert [e async for e in events]
        serving = {poc_api.EndpointState.SERVING}
        await wait_for(lambda: {ep.state for ep in client.endpoints} == serving)
    requests = {"OpenSessionRequest", "CloseSessionRequest", "HealthCheckRequest"}
    requests |= {"GenerateRequest", "AppendImageRequest"}
    assert not requests & set(encoded), encoded


@given(st.text(), st.integers(0, 2**32 - 1), st.binary(max_size=8))
def test_decode_open_session_matches_betterproto2(
    session_id: str, max_length: int, unknown: bytes
) -> None:
    data = bytes(pb.OpenSessionResponse(session_id=session_id, max_length=max_length))
    # An unknown length-delimited field 9 is skipped, before or after.
    extra = b"\x4a" + bytes([len(unknown)]) + unknown
    for wire in (data, extra + data, data + extra):
        assert _wire.decode_open_session(wire) == (session_id, max_length)
        parsed = pb.OpenSessionResponse.parse(wire)
        assert (parsed.session_id, parsed.max_length) == (session_id, max_length)


@given(st.text(min_size=1))
def test_decode_open_session_refuses_a_session_id_cut_short(session_id: str) -> None:
    data = bytes(pb.OpenSessionResponse(session_id=session_id))
    for cut in range(1, len(data)):
        with pytest.raises(ProtocolViolation, match="OpenSessionResponse"):
            _wire.decode_open_session(data[:cut])


def test_decode_open_session_refuses_a_session_id_that_is_not_utf8() -> None:
    with pytest.raises(ProtocolViolation, match="not UTF-8"):
        _wire.decode_open_session(b"\x0a\x02\xff\xfe")


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=20))
def test_decode_append_image_matches_betterproto2(count: int, total: int, unknown: bytes) -> None:
    data = bytes(pb.AppendImageResponse(placeholder_count=count, total_length=total))
    extra = b"\x4a" + bytes([len(unknown)]) + unknown
    for wire in (data, extra + data, data + extra):
        assert _wire.decode_append_image(wire) == (count, total)


@pytest.mark.parametrize(
    "tail",
    [
        b"\x12\x01\x03",  # field 2 length-delimited: betterproto2 made total_length [3]
        b"\x15\x00\x00\x00\x00",  # field 2 as fixed32: betterproto2 raised KeyError
        b"\x11" + bytes(8),  # field 2 as fixed64
        b"\x0a\x00",  # field 1 length-delimited
    ],
)
def test_decode_append_image_skips_a_known_field_of_another_wire_type(tail: bytes) -> None:
    # protobuf treats it as an unknown field (upb: (4, 7)).
    assert _wire.decode_append_image(b"\x08\x04\x10\x07" + tail) == (4, 7)


def test_decode_append_image_keeps_uint32s_low_bits_and_refuses_truncation() -> None:
    assert _wire.decode_append_image(b"\x10" + b"\xff" * 9 + b"\x01") == (0, 2**32 - 1)
    for bad in (b"\x08", b"\x08\x80", b"\x12\x05ab", b"\x0b"):
        with pytest.raises(ProtocolViolation, match="AppendImageResponse"):
            _wire.decode_append_image(bad)


@given(st.integers(-(2**31), 2**31 - 1), st.binary(max_size=20))
def test_decode_health_check_matches_betterproto2(status: int, unknown: bytes) -> None:
    from poc_api._proto.grpc.health.v1 import HealthCheckResponse

    data = bytes(HealthCheckResponse(status=status))  # type: ignore[arg-type]
    extra = b"\x4a" + bytes([len(unknown)]) + unknown
    for wire in (data, extra + data, data + extra):
        assert _wire.decode_health_check(wire) == status
        assert HealthCheckResponse.parse(wire).status == status


@pytest.mark.parametrize(
    "tail",
    [
        b"\x0a\x00",  # length-delimited: betterproto2 made the status []
        b"\x0d\x00\x00\x00\x00",  # fixed32: betterproto2 raised KeyError
        b"\x09" + bytes(8),  # fixed64
    ],
)
def test_decode_health_check_skips_field_1_of_another_wire_type(tail: bytes) -> None:
    assert _wire.decode_health_check(b"\x08\x01" + tail) == 1
    assert _wire.decode_health_check(tail + b"\x08\x02") == 2


def test_decode_health_check_refuses_truncation() -> None:
    assert _wire.decode_health_check(b"") == 0  # UNKNOWN: every field at its default
    for bad in (b"\x08", b"\x08\x80", b"\x0a\x05ab", b"\x0b"):
        with pytest.raises(ProtocolViolation, match="HealthCheckResponse"):
            _wire.decode_health_check(bad)


def _length_delimited(tag: int, body: bytes) -> bytes:
    size, prefix = len(body), b""
    while size >= 0x80:
        prefix += bytes([size & 0x7F | 0x80])
        size >>= 7
    return bytes([tag]) + prefix + bytes([size]) + body


@pytest.mark.parametrize("groups", [97, 98, 99, 100, 101])
@pytest.mark.parametrize("where", ["event", "token", "top_logprob"])
def test_nested_groups_are_refused_at_upbs_depth(groups: int, where: str) -> None:
    # upb counts a sub-message as one level of nesting, as a group is: 99 groups
    # inside a TopLogprob went through here and were refused there.
    data = b"\x1b" * groups + b"\x1c" * groups  # unknown field 3, a group
    if where in ("token", "top_logprob"):
        if where == "top_logprob":
            data = _length_delimited(0x2A, data)
        data = _length_delimited(0x0A, data)
    refused = upb_parse(data) is None
    if refused:
        with pytest.raises(ProtocolViolation, match="nested too deeply"):
            decode_generate_event(data)
    else:
        decode_generate_event(data)
    # (the limit itself: upb's 100 levels in all)
    assert refused == (groups + ("event", "token", "top_logprob").index(where) > 100)


def test_big_endian_readout_is_read_only_as_the_little_endian_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A decoded readout is a read-only view on a little-endian host (of the bytes
    # received) and after a pickle round trip; the big-endian copy was writable:
    # np.asarray(ev.readout)[0] = 9 changed a frozen Token's value there.
    monkeypatch.setattr(_wire, "_LITTLE_ENDIAN", False)
    data = bytes(pb.GenerateEvent(token=pb.Token(readout=[1.0, -2.5, 3.25])))
    for d in (data, data + data):  # one packed chunk, and two (merged)
        ev = decode_generate_event(d)
        assert isinstance(ev, Token) and ev.readout is not None
        assert ev.readout.readonly
        assert ev.readout.format == "f" and ev.readout.c_contiguous
