"""Fast wire decoding of ``salience.GenerateEvent``, the client's request encoders,
and a pass-through grpclib codec.

betterproto2 parses a token event carrying a 256-float readout in ~220 µs because
it walks packed floats one by one in Python. :func:`decode_generate_event` is a
hand-written decoder for that one message that builds :class:`poc_api._types.Token`
and :class:`poc_api._types.Done` directly and hands the readout out as a
zero-copy float32 ``memoryview`` over the received buffer.

It follows protobuf's parsing rules (as the reference upb parser does), not
betterproto2's looser ones:

* varints may take up to 10 bytes; values are truncated to 64 bits, uint32
  fields then to 32 bits, and a bool is ``value != 0`` of the 64-bit value;
* a tag may take up to 5 bytes and must fit in 32 bits, and so may a length
  prefix; field number 0 and wire types 6 and 7 are malformed;
* unknown fields of every wire type are skipped, groups (wire types 3/4)
  included; a known field number with an unexpected wire type is treated as an
  unknown field, as protobuf does;
* a repeated scalar field given twice: the last value wins;
* ``repeated float readout`` is accepted packed (any number of chunks) and
  unpacked (one fixed32 per element), in any mix, concatenated in wire order;
* the oneof: the last of ``token``/``done`` seen wins; when the *same* member
  appears more than once in a row, the occurrences are merged as protobuf merges
  sub-messages (scalars present later override, repeated fields concatenate).
  A member that follows the other member starts from empty, because setting a
  oneof member clears the other one. (betterproto2 instead keeps the last
  occurrence only and does not clear the other member.)

Anything truncated or malformed raises :class:`~poc_api._errors.ProtocolViolation`.

:class:`RawCodec` lets grpclib hand the raw message bytes to the caller, which
decodes them lazily with :func:`decode_generate_event` (streams),
:func:`decode_open_session`, :func:`decode_append_image` and
:func:`decode_health_check` (unary replies, by the same rules: betterproto2 took
a known field of another wire type for its own there too).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Any

import betterproto2
from grpclib.encoding.base import CodecBase

from ._errors import ProtocolViolation
from ._types import Done, Token, TopLogprob

__all__ = [
    "RawCodec",
    "decode_append_image",
    "decode_generate_event",
    "decode_health_check",
    "decode_open_session",
    "encode_append_image_request",
    "encode_generate_request",
    "encode_string_field",
]

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
# upb's limit for nested groups; keeps hostile input from exhausting the stack.
_MAX_GROUP_DEPTH = 100
_LITTLE_ENDIAN = sys.byteorder == "little"
_unpack_f32 = struct.Struct("<f").unpack_from


def _malformed(what: str, pos: int) -> ProtocolViolation:
    return ProtocolViolation(f"malformed GenerateEvent: {what} (at byte {pos})")


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Read a varint starting at ``pos`` that must end before ``end``; slow path."""
    if end - pos >= 3:
        # Unrolled for the 2- and 3-byte varints of token ids, positions and lengths.
        b = data[pos]
        if b < 0x80:
            return b, pos + 1
        c = data[pos + 1]
        if c < 0x80:
            return (b & 0x7F) | (c << 7), pos + 2
        d = data[pos + 2]
        if d < 0x80:
            return (b & 0x7F) | ((c & 0x7F) << 7) | (d << 14), pos + 3
    start = pos
    result = 0
    shift = 0
    while pos < end:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            # protobuf keeps the low 64 bits of an over-long 10th byte.
            return result & _MASK64, pos
        shift += 7
        if shift == 70:
            raise _malformed("varint longer than 10 bytes", start)
    raise _malformed("truncated varint", start)


def _size(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Read a length prefix: at most 5 bytes, as protobuf (upb) requires; slow path."""
    if pos + 1 < end:
        b = data[pos]
        if b < 0x80:
            return b, pos + 1
        c = data[pos + 1]
        if c < 0x80:
            return (b & 0x7F) | (c << 7), pos + 2
    n, new = _varint(data, pos, end)
    if new - pos > 5:
        raise _malformed("length prefix longer than 5 bytes", pos)
    return n, new


def _tag(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """Read a multi-byte tag: at most 5 bytes and 32 bits, as protobuf requires."""
    start = pos
    tag, pos = _varint(data, pos, end)
    if pos - start > 5 or tag > _MASK32:
        raise _malformed("tag does not fit in 32 bits", start)
    return tag, pos


def _skip(data: bytes, pos: int, end: int, tag: int, depth: int = 0) -> int:
    """Skip the value of an unknown field whose ``tag`` was just read; return the new pos."""
    wire_type = tag & 7
    if tag >> 3 == 0:
        raise _malformed("field number 0", pos)
    if wire_type == 0:
        _, pos = _varint(data, pos, end)
        return pos
    if wire_type == 2:
        length, pos = _size(data, pos, end)
        pos += length
    elif wire_type == 5:
        pos += 4
    elif wire_type == 1:
        pos += 8
    elif wire_type == 3:
        return _skip_group(data, pos, end, tag >> 3, depth + 1)
    elif wire_type == 4:
        raise _malformed("end-group tag without a matching start-group", pos)
    else:
        raise _malformed(f"invalid wire type {wire_type}", pos)
    if pos > end:
        raise _malformed(f"truncated field {tag >> 3}", end)
    return pos


def _skip_group(data: bytes, pos: int, end: int, number: int, depth: int) -> int:
    if depth > _MAX_GROUP_DEPTH:
        raise _malformed("groups nested too deeply", pos)
    while pos < end:
        tag, pos = _tag(data, pos, end)
        if tag & 7 == 4:
            if tag >> 3 != number:
                raise _malformed(f"end-group tag {tag >> 3} closes group {number}", pos)
            return pos
        pos = _skip(data, pos, end, tag, depth)
    raise _malformed(f"truncated group {number}", end)


def encode_string_field(value: str) -> bytes:
    """Encode a message whose only field is ``string ... = 1``.

    ``OpenSessionRequest``, ``CloseSessionRequest`` (sent twice per session) and
    ``HealthCheckRequest``: built here in about a microsecond, where betterproto2
    takes ten or more.
    """
    out = bytearray()
    _put_str(out, 0x0A, value)
    return bytes(out)


# The client encodes every request itself, not with betterproto2: its
# ``bytes(message)`` asks pydantic whether the message is a pydantic dataclass,
# and where pydantic is installed (openai, fastapi, ... bring it) the first ask
# imports ``pydantic.dataclasses``: 50-200 ms of CPU inside a first Generate's
# first-token wait. The output is byte for byte betterproto2's (tests/test_wire.py).


def _put_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _put_bytes(out: bytearray, tag: int, data: bytes | bytearray) -> None:
    out.append(tag)
    _put_varint(out, len(data))
    out += data


def _put_str(out: bytearray, tag: int, value: str) -> None:
    if value:  # proto3 leaves a default field out
        _put_bytes(out, tag, value.encode())


def _put_packed(out: bytearray, tag: int, values: Sequence[int]) -> None:
    if not values:
        return  # proto3 leaves an empty repeated field out
    body = bytearray()
    for v in values:
        if v < 0x80:
            body.append(v)
        else:
            _put_varint(body, v)
    _put_bytes(out, tag, body)


def _put_ranges(out: bytearray, tag: int, ranges: Sequence[tuple[int, int]]) -> None:
    for start, end in ranges:
        item = bytearray()
        _put_uint(item, 0x08, start)
        _put_uint(item, 0x10, end)
        _put_bytes(out, tag, item)


def _put_uint(out: bytearray, tag: int, value: int) -> None:
    if value:  # proto3 leaves a default field out
        out.append(tag)
        _put_varint(out, value)


_pack_f32 = struct.Struct("<f").pack


def _put_f32(out: bytearray, tag: int, value: float) -> None:
    if value:  # (-0.0 == 0.0: left out too, as betterproto2 leaves it out)
        out.append(tag)
        out += _pack_f32(value)


def encode_generate_request(
    *,
    session_id: str,
    append_tokens: Sequence[int],
    offset: int,
    truncating: bool,
    max_tokens: int,
    logprobs_ranges: Sequence[tuple[int, int]],
    logprob_top_k: int,
    readout_ranges: Sequence[tuple[int, int]],
    temperature: float,
    top_p: float,
    top_k: int,
    stop_token_ids: Sequence[int],
    priority: int,
) -> bytes:
    """Encode a ``GenerateRequest`` (values already checked: uint32s in range,
    floats that fit a float32, ``priority`` an int32)."""
    out = bytearray()
    _put_str(out, 0x0A, session_id)
    _put_packed(out, 0x12, append_tokens)
    _put_uint(out, 0x18, offset)
    _put_uint(out, 0x20, int(truncating))
    _put_uint(out, 0x28, max_tokens)
    _put_ranges(out, 0x32, logprobs_ranges)
    _put_uint(out, 0x38, logprob_top_k)
    _put_ranges(out, 0x42, readout_ranges)
    _put_f32(out, 0x4D, temperature)
    _put_f32(out, 0x55, top_p)
    _put_uint(out, 0x58, top_k)
    _put_packed(out, 0x62, stop_token_ids)
    _put_uint(out, 0x68, priority & _MASK64)  # a negative int32 takes ten bytes
    return bytes(out)


def encode_append_image_request(
    *, session_id: str, image: bytes, mime: str, offset: int, truncating: bool
) -> bytes:
    """Encode an ``AppendImageRequest`` (``offset`` a checked uint32)."""
    head = bytearray()
    _put_str(head, 0x0A, session_id)
    if image:  # (the image itself is copied once, by the join)
        head.append(0x12)
        _put_varint(head, len(image))
    tail = bytearray()
    _put_str(tail, 0x1A, mime)
    _put_uint(tail, 0x20, offset)
    _put_uint(tail, 0x28, int(truncating))
    return b"".join((head, image, tail))


def append_image_request_size(
    *, session_id: str, image_len: int, mime: str, max_offset: int = _MASK32
) -> int:
    """Bytes of the ``AppendImageRequest`` for an image of ``image_len`` bytes at
    an offset up to ``max_offset``, truncating: no request for it is larger (one
    not truncating, or at a smaller offset, is at most 8 bytes smaller)."""
    size = len(
        encode_append_image_request(
            session_id=session_id, image=b"", mime=mime, offset=max_offset, truncating=True
        )
    )
    if image_len:
        head = bytearray()
        _put_varint(head, image_len)
        size += 1 + len(head) + image_len
    return size


def decode_open_session(data: bytes) -> tuple[str, int]:
    """Decode an ``OpenSessionResponse``: ``(session_id, max_length)``, strictly.

    Unknown fields (and known ones of an unexpected wire type) are skipped, as
    protobuf does; anything truncated or malformed raises
    :class:`ProtocolViolation`.
    """
    session_id, max_length = "", 0
    pos, end = 0, len(data)
    try:
        while pos < end:
            tag, pos = _tag(data, pos, end)
            if tag == 0x0A:  # 1: session_id, length-delimited
                size, pos = _size(data, pos, end)
                if pos + size > end:
                    raise _malformed("truncated field 1", end)
                session_id = data[pos : pos + size].decode()
                pos += size
            elif tag == 0x10:  # 2: max_length, varint (uint32 keeps the low bits)
                value, pos = _varint(data, pos, end)
                max_length = value & _MASK32
            else:
                pos = _skip(data, pos, end, tag)
    except ProtocolViolation as exc:
        raise ProtocolViolation(str(exc).replace("GenerateEvent", "OpenSessionResponse")) from None
    except UnicodeDecodeError:
        raise ProtocolViolation("malformed OpenSessionResponse: session_id is not UTF-8") from None
    return session_id, max_length


def decode_append_image(data: bytes) -> tuple[int, int]:
    """Decode an ``AppendImageResponse``: ``(placeholder_count, total_length)``, strictly.

    As :func:`decode_open_session`. betterproto2 took a known field of another
    wire type for its own: a length-delimited field 2 became a *list* in
    ``total_length`` (and the session's ``committed_len``), a fixed32 one a KeyError.
    """
    count, total = 0, 0
    pos, end = 0, len(data)
    try:
        while pos < end:
            tag, pos = _tag(data, pos, end)
            if tag == 0x08:  # 1: placeholder_count, uint32
                value, pos = _varint(data, pos, end)
                count = value & _MASK32
            elif tag == 0x10:  # 2: total_length, uint32
                value, pos = _varint(data, pos, end)
                total = value & _MASK32
            else:
                pos = _skip(data, pos, end, tag)
    except ProtocolViolation as exc:
        raise ProtocolViolation(str(exc).replace("GenerateEvent", "AppendImageResponse")) from None
    return count, total


def decode_health_check(data: bytes) -> int:
    """Decode a ``grpc.health.v1.HealthCheckResponse``: its ``status`` number, strictly.

    As :func:`decode_open_session` (a known field of another wire type is
    skipped, as protobuf does; betterproto2 failed the check on it). An enum is
    an int32: a negative value comes as ten varint bytes.
    """
    status = 0
    pos, end = 0, len(data)
    try:
        while pos < end:
            tag, pos = _tag(data, pos, end)
            if tag == 0x08:  # 1: status, enum (int32)
                value, pos = _varint(data, pos, end)
                value &= _MASK32
                status = value - (1 << 32) if value >> 31 else value
            else:
                pos = _skip(data, pos, end, tag)
    except ProtocolViolation as exc:
        raise ProtocolViolation(str(exc).replace("GenerateEvent", "HealthCheckResponse")) from None
    return status


def _top_logprob(data: bytes, pos: int, end: int) -> TopLogprob:
    """Decode one ``TopLogprob`` occupying ``data[pos:end]``."""
    tid = 0
    logprob = 0.0
    while pos < end:
        tag = data[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _tag(data, pos, end)
        if tag == 0x08:  # id: uint32
            if pos < end and (v := data[pos]) < 0x80:
                pos += 1
                tid = v
            else:
                v, pos = _varint(data, pos, end)
                tid = v & _MASK32
        elif tag == 0x15:  # logprob: float (fixed32)
            if pos + 4 > end:
                raise _malformed("truncated TopLogprob.logprob", pos)
            (logprob,) = _unpack_f32(data, pos)
            pos += 4
        else:
            pos = _skip(data, pos, end, tag, 2)  # (nesting: GenerateEvent > Token > here)
    return TopLogprob(tid, logprob)


def _readout(data: bytes, chunks: list[int]) -> memoryview[float]:
    """Build the float32 readout from ``chunks`` (flat ``[start, end, ...]`` byte offsets)."""
    if len(chunks) == 2:
        # The normal case, one packed chunk: a view of the input, no copy.
        buf = memoryview(data)[chunks[0] : chunks[1]]
    else:
        # Unpacked or split encodings are not contiguous on the wire: one copy.
        buf = memoryview(
            b"".join([data[chunks[i] : chunks[i + 1]] for i in range(0, len(chunks), 2)])
        )
    if _LITTLE_ENDIAN:
        return buf.cast("f")
    # The wire is little-endian; a big-endian host needs swapped native floats.
    arr = array("f")
    arr.frombytes(buf)
    arr.byteswap()
    # Read-only, as the view of the received bytes is: a Token is a frozen value.
    return memoryview(arr).toreadonly().cast("B").cast("f")


def decode_generate_event(data: bytes) -> Token | Done | None:
    """Decode a serialized ``salience.GenerateEvent``.

    Args:
        data: the message bytes as received (any contiguous bytes-like object).

    Returns:
        The set oneof member as a :class:`~poc_api._types.Token` or
        :class:`~poc_api._types.Done`, or ``None`` when neither is set. A token's
        ``readout`` is a float32 ``memoryview`` (``None`` when empty); for the usual
        single packed encoding it is a view of ``data`` without a copy.

    Raises:
        ProtocolViolation: the bytes are truncated or not valid protobuf for this
            message (see the module docstring for the exact rules).
    """
    # Everything hot is inlined into this one function: a Python call per field
    # would cost more than the field's decoding.
    size = len(data)
    pos = 0
    which = 0  # set oneof member: 0 none, 1 token, 2 done
    t_id = t_position = 0
    t_prefill = False
    t_logprob = 0.0
    tops: list[TopLogprob] | None = None
    chunks: list[int] | None = None
    d_prompt = d_completion = d_total = 0
    d_reason = ""
    unpack_f32 = _unpack_f32
    varint = _varint
    size_ = _size
    while pos < size:
        tag = data[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _tag(data, pos, size)
        if tag != 0x0A and tag != 0x12:
            pos = _skip(data, pos, size, tag)
            continue
        if pos < size and (end := data[pos]) < 0x80:
            pos += 1
        else:
            end, pos = size_(data, pos, size)
        end += pos
        if end > size:
            raise _malformed("truncated " + ("Token" if tag == 0x0A else "Done"), pos)

        if tag == 0x0A:  # token = 1
            if which != 1:
                # Setting a oneof member clears the other one: start from empty.
                which = 1
                t_id = t_position = 0
                t_prefill = False
                t_logprob = 0.0
                tops = chunks = None
            while pos < end:
                tag = data[pos]
                if tag < 0x80:
                    pos += 1
                else:
                    tag, pos = _tag(data, pos, end)
                if tag == 0x08:  # id: uint32
                    if pos < end and (v := data[pos]) < 0x80:
                        pos += 1
                        t_id = v
                    else:
                        v, pos = varint(data, pos, end)
                        t_id = v & _MASK32
                elif tag == 0x18:  # position: uint32
                    if pos < end and (v := data[pos]) < 0x80:
                        pos += 1
                        t_position = v
                    else:
                        v, pos = varint(data, pos, end)
                        t_position = v & _MASK32
                elif tag == 0x10:  # is_prefill: bool
                    if pos < end and (v := data[pos]) < 0x80:
                        pos += 1
                    else:
                        v, pos = varint(data, pos, end)
                    t_prefill = v != 0
                elif tag == 0x25:  # sampled_logprob: float
                    if pos + 4 > end:
                        raise _malformed("truncated Token.sampled_logprob", pos)
                    (t_logprob,) = unpack_f32(data, pos)
                    pos += 4
                elif tag == 0x32:  # readout, packed
                    if pos < end and (n := data[pos]) < 0x80:
                        pos += 1
                    else:
                        n, pos = size_(data, pos, end)
                    if pos + n > end:
                        raise _malformed("truncated Token.readout", pos)
                    if n & 3:
                        raise _malformed(f"packed Token.readout of {n} bytes", pos)
                    if n:
                        if chunks is None:
                            chunks = [pos, pos + n]
                        else:
                            chunks += (pos, pos + n)
                        pos += n
                elif tag == 0x2A:  # top_logprobs: repeated TopLogprob
                    if pos < end and (n := data[pos]) < 0x80:
                        pos += 1
                    else:
                        n, pos = size_(data, pos, end)
                    if pos + n > end:
                        raise _malformed("truncated Token.top_logprobs", pos)
                    if tops is None:
                        tops = [_top_logprob(data, pos, pos + n)]
                    else:
                        tops.append(_top_logprob(data, pos, pos + n))
                    pos += n
                elif tag == 0x35:  # readout, unpacked: one fixed32 element
                    if pos + 4 > end:
                        raise _malformed("truncated Token.readout", pos)
                    if chunks is None:
                        chunks = [pos, pos + 4]
                    else:
                        chunks += (pos, pos + 4)
                    pos += 4
                else:
                    pos = _skip(data, pos, end, tag, 1)  # (a sub-message: one level, as upb)
        else:  # done = 2
            if which != 2:
                which = 2
                d_prompt = d_completion = d_total = 0
                d_reason = ""
            while pos < end:
                tag = data[pos]
                if tag < 0x80:
                    pos += 1
                else:
                    tag, pos = _tag(data, pos, end)
                if tag == 0x08 or tag == 0x10 or tag == 0x18:  # the uint32 counters
                    if pos < end and (v := data[pos]) < 0x80:
                        pos += 1
                    else:
                        v, pos = varint(data, pos, end)
                        v &= _MASK32
                    if tag == 0x08:
                        d_prompt = v
                    elif tag == 0x10:
                        d_completion = v
                    else:
                        d_total = v
                elif tag == 0x22:  # finish_reason: string
                    n, pos = size_(data, pos, end)
                    if pos + n > end:
                        raise _malformed("truncated Done.finish_reason", pos)
                    try:
                        d_reason = str(data[pos : pos + n], "utf-8")
                    except UnicodeDecodeError:
                        raise _malformed("Done.finish_reason is not UTF-8", pos) from None
                    pos += n
                else:
                    pos = _skip(data, pos, end, tag, 1)

    if which == 1:
        return Token(
            t_id,
            t_position,
            t_prefill,
            t_logprob,
            () if tops is None else tuple(tops),
            None if chunks is None else _readout(data, chunks),
        )
    if which == 2:
        return Done(d_prompt, d_completion, d_total, d_reason)
    return None


class RawCodec(CodecBase):
    """A grpclib codec that leaves decoding to the caller.

    ``decode`` returns the message bytes untouched, so a client can parse stream
    events with :func:`decode_generate_event` and unary responses with
    ``MessageType.parse(data)``. ``encode`` accepts ready bytes or a betterproto2
    message.

    Example::

        channel = grpclib.client.Channel(host, port, codec=RawCodec())
    """

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        """Serialize ``message``: bytes-like pass through, betterproto2 messages via ``bytes()``."""
        if isinstance(message, bytes):
            return message
        if isinstance(message, bytearray | memoryview):
            return bytes(message)
        if isinstance(message, betterproto2.Message):
            if (
                isinstance(message_type, type)
                and issubclass(message_type, betterproto2.Message)
                and not isinstance(message, message_type)
            ):
                raise TypeError(
                    f"message must be of type {message_type.__name__}, not {type(message).__name__}"
                )
            return bytes(message)
        raise TypeError(
            f"RawCodec encodes bytes or betterproto2 messages, not {type(message).__name__}"
        )

    def decode(self, data: bytes, message_type: Any) -> bytes:
        """Return ``data`` as received; ``message_type`` is ignored."""
        return data
