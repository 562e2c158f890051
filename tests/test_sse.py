"""The SSE decoder: WHATWG event-stream interpretation, independent of chunking."""

from __future__ import annotations

import itertools
from unittest import mock

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poc_api import _sse
from poc_api._errors import LimitExceeded
from poc_api._sse import SSEDecoder, SSEEvent


def decode_all(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- example-based ---------------------------------------------------------------


def test_single_event_has_default_type_and_empty_id() -> None:
    assert decode_all([b"data: hello\n\n"]) == [SSEEvent("message", "hello", "")]


def test_multiline_data_is_joined_with_newline() -> None:
    assert decode_all([b"data: a\ndata: b\ndata:\n\n"]) == [SSEEvent(data="a\nb\n")]


def test_only_one_leading_space_is_stripped() -> None:
    assert decode_all([b"data:  two\ndata:none\n\n"]) == [SSEEvent(data=" two\nnone")]


def test_comments_are_ignored() -> None:
    assert decode_all([b": keep-alive\ndata: x\n:another\n\n"]) == [SSEEvent(data="x")]


def test_event_field_names_the_event_and_resets_after_dispatch() -> None:
    events = decode_all([b"event: delta\ndata: 1\n\ndata: 2\n\n"])
    assert events == [SSEEvent("delta", "1"), SSEEvent("message", "2")]


def test_id_persists_across_events() -> None:
    events = decode_all([b"id: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\n"])
    assert [e.id for e in events] == ["7", "7", ""]


def test_id_containing_nul_is_ignored() -> None:
    assert decode_all([b"id: 1\n\nid: a\x00b\ndata: x\n\n"]) == [SSEEvent(data="x", id="1")]


def test_retry_sets_reconnection_time_only_for_digits() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"retry: 1500\n")
    assert decoder.retry == 1500
    decoder.feed(b"retry: 15x\nretry: -1\nretry:\n")
    assert decoder.retry == 1500
    decoder.feed(b"retry: " + b"9" * 5000 + b"\n")  # more digits than int() takes
    assert decoder.retry == 1500


def test_retry_keeps_18_digits_and_ignores_19() -> None:
    # 18 digits is the cap (no usable delay has more): the 19-digit value is ignored.
    decoder = SSEDecoder()
    decoder.feed(b"retry: " + b"9" * 18 + b"\n")
    assert decoder.retry == 10**18 - 1
    decoder.feed(b"retry: 1" + b"0" * 18 + b"\n")
    assert decoder.retry == 10**18 - 1


def test_event_without_data_is_not_dispatched_but_its_id_counts() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: ping\nid: 9\n\n") == []
    assert decoder.last_event_id == "9"
    assert decoder.feed(b"data: x\n\n") == [SSEEvent("message", "x", "9")]


def test_line_without_colon_is_a_field_with_empty_value() -> None:
    assert decode_all([b"data\ndata\n\n"]) == [SSEEvent(data="\n")]


def test_unknown_fields_are_ignored() -> None:
    assert decode_all([b"foo: bar\ndata: x\nDATA: y\n\n"]) == [SSEEvent(data="x")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_each_line_ending_works(eol: bytes) -> None:
    stream = b"data: a" + eol + b"data: b" + eol + eol
    assert decode_all([stream]) == [SSEEvent(data="a\nb")]


def test_cr_at_chunk_end_and_lf_at_next_chunk_start_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r") == [SSEEvent(data="a")]
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: b\n\n") == [SSEEvent(data="b")]


def test_cr_ending_dispatches_without_waiting_for_the_next_chunk() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [SSEEvent(data="a")]


def test_cr_then_empty_chunk_then_lf_is_still_one_line_ending() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: a\r")
    decoder.feed(b"")
    decoder.feed(b"\xc3")  # first byte of "é": decodes to nothing yet
    assert decoder.feed(b"\xa9\n\n") == [SSEEvent(data="a")]


def test_leading_bom_is_dropped_once() -> None:
    assert decode_all([b"\xef\xbb\xbfdata: x\n\n"]) == [SSEEvent(data="x")]
    # a second BOM is part of the field name, so the line is an unknown field
    assert decode_all([b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n"]) == []


def test_bom_split_across_chunks_is_dropped() -> None:
    assert decode_all([b"\xef", b"\xbb", b"\xbfdata: x\n\n"]) == [SSEEvent(data="x")]


def test_bom_in_the_middle_of_data_is_kept() -> None:
    assert decode_all([b"data: \xef\xbb\xbfx\n\n"]) == [SSEEvent(data="\ufeffx")]


def test_a_bom_opening_a_later_chunk_is_data_not_dropped() -> None:
    # Only the stream's first character may be a BOM to drop: a chunk boundary
    # is where TCP happened to cut, not a new stream.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a") == []
    assert decoder.feed("\ufeffb\n\n".encode()) == [SSEEvent(data="a\ufeffb")]


def test_multibyte_utf8_split_across_chunks() -> None:
    stream = "data: h€llo 🦀\n\n".encode()
    assert decode_all([bytes([b]) for b in stream]) == [SSEEvent(data="h€llo 🦀")]


def test_invalid_utf8_becomes_replacement_character() -> None:
    assert decode_all([b"data: a\xffb\n\n"]) == [SSEEvent(data="a\ufffdb")]


def test_incomplete_event_at_end_of_stream_is_discarded() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == [SSEEvent(data="a")]
    assert decoder.close() == []


def test_feed_after_close_raises() -> None:
    decoder = SSEDecoder()
    decoder.close()
    assert decoder.close() == []
    with pytest.raises(RuntimeError):
        decoder.feed(b"data: x\n\n")


def test_unterminated_line_longer_than_bound_raises_limit_exceeded() -> None:
    decoder = SSEDecoder(max_buffer=10)
    decoder.feed(b"data: 1234")
    with pytest.raises(LimitExceeded):
        decoder.feed(b"5")


def test_event_data_longer_than_bound_raises_limit_exceeded() -> None:
    decoder = SSEDecoder(max_buffer=10)
    with pytest.raises(LimitExceeded):
        decoder.feed(b"data: 12345\ndata: 12345\n")


def test_sse_event_is_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        SSEEvent().data = "x"  # type: ignore[misc]


# --- property-based: an oracle and chunking invariance ---------------------------

# Field text: no line breaks (they would end the line); includes multibyte chars.
field_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
    max_size=12,
)
id_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\x00"),
    max_size=6,
)
eol = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    """A random event stream and the events a WHATWG parser must produce from it."""
    lines: list[str] = []  # each line without its ending
    expected: list[SSEEvent] = []
    last_id = ""
    for _ in range(draw(st.integers(0, 5))):
        event_type = ""
        data: list[str] = []
        for _ in range(draw(st.integers(0, 5))):
            kind = draw(st.sampled_from(["data", "data", "comment", "event", "id", "unknown"]))
            value = draw(id_text if kind == "id" else field_text)
            if kind == "comment":
                lines.append(":" + value)
                continue
            name = "x-unknown" if kind == "unknown" else kind
            # "name: value" strips the added space; "name:value" is only used when
            # the value's own first char is not a space (it would be stripped).
            if value.startswith(" ") or draw(st.booleans()):
                lines.append(f"{name}: {value}")
            else:
                lines.append(f"{name}:{value}")
            if kind == "data":
                data.append(value)
            elif kind == "event":
                event_type = value
            elif kind == "id":
                last_id = value
        lines.append("")  # the blank line that dispatches
        if data:
            expected.append(SSEEvent(event_type or "message", "\n".join(data), last_id))
    if draw(st.booleans()):
        # a trailing incomplete event: never dispatched
        lines.append("data: " + draw(field_text))
    text: list[str] = []
    prev_end = ""
    for line in lines:
        end = draw(eol)
        if prev_end == "\r" and line == "" and end.startswith("\n"):
            end = "\r"  # "\r" + "\n" would be one line ending, not an empty line
        text.append(line + end)
        prev_end = end
    if lines and lines[-1] != "" and draw(st.booleans()):
        text[-1] = text[-1].rstrip("\r\n")  # the stream ends in the middle of a line
    body = "".join(text).encode()
    if draw(st.booleans()):
        body = b"\xef\xbb\xbf" + body
    return body, expected


@given(event_streams())
def test_decoder_matches_the_oracle(stream: tuple[bytes, list[SSEEvent]]) -> None:
    body, expected = stream
    assert decode_all([body]) == expected


@settings(max_examples=50)
@given(event_streams())
def test_every_single_split_position_gives_the_same_events(
    stream: tuple[bytes, list[SSEEvent]],
) -> None:
    body, expected = stream
    for cut in range(len(body) + 1):
        assert decode_all([body[:cut], body[cut:]]) == expected, cut


@given(event_streams(), st.data())
def test_random_multi_splits_give_the_same_events(
    stream: tuple[bytes, list[SSEEvent]], data: st.DataObject
) -> None:
    body, expected = stream
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=20))
    assert decode_all(split_at(body, cuts)) == expected


@given(event_streams())
def test_byte_at_a_time_gives_the_same_events(stream: tuple[bytes, list[SSEEvent]]) -> None:
    body, expected = stream
    assert decode_all([body[i : i + 1] for i in range(len(body))]) == expected


@given(st.binary(max_size=200), st.data())
def test_arbitrary_bytes_never_crash_and_are_split_invariant(
    body: bytes, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=10))
    assert decode_all(split_at(body, cuts)) == decode_all([body])


# -- one whole event per chunk: the usual chat stream's shape (a shortcut in feed) -------


@given(st.lists(st.tuples(st.one_of(st.none(), id_text), field_text), max_size=6))
def test_one_whole_event_per_chunk_gives_the_events_of_the_lines(
    events: list[tuple[str | None, str]],
) -> None:
    # Each event a chunk of its own ("data: v" and its blank line), an id line now
    # and then in a chunk before it: the ids carry over into the events.
    chunks: list[bytes] = []
    expected: list[SSEEvent] = []
    last_id = ""
    for ident, value in events:
        if ident is not None:
            chunks.append(f"id: {ident}\n".encode())
            last_id = ident
        chunks.append(f"data: {value}\n\n".encode())
        expected.append(SSEEvent("message", value, last_id))
    assert decode_all(chunks) == expected
    assert decode_all([b"".join(chunks)]) == expected


@pytest.mark.parametrize(
    ("before", "expected"),
    [
        (b"event: delta\n", [SSEEvent("delta", "v")]),  # the event's type came first
        (b"data: a\n", [SSEEvent("message", "a\nv")]),  # a data line came first
        (b"x-", []),  # a line's first bytes: "x-data: v" is an unknown field
        (b"\r", [SSEEvent("message", "v")]),  # a CR ended the line before
    ],
)
def test_a_whole_event_chunk_after_an_event_under_way_joins_it(
    before: bytes, expected: list[SSEEvent]
) -> None:
    # A chunk shaped as a whole event is one only when nothing is under way.
    assert decode_all([before, b"data: v\n\n"]) == expected


def test_a_whole_event_chunk_over_the_bound_raises() -> None:
    d = SSEDecoder(max_buffer=8)
    assert d.feed(b"data: 1234567\n\n") == [SSEEvent("message", "1234567")]
    with pytest.raises(LimitExceeded, match="event data longer than 8"):
        d.feed(b"data: 12345678\n\n")


# -- close(flush=True) and error_field: for bodies known to be complete ----------------


@pytest.mark.parametrize("tail", [b"data: [DONE]\n", b"data: [DONE]", b"data: [DONE]\r"])
def test_flush_dispatches_the_event_the_body_ended_in(tail: bytes) -> None:
    body = b"data: a\n\n" + tail
    for cut in range(len(body) + 1):
        d = SSEDecoder()
        events = d.feed(body[:cut]) + d.feed(body[cut:])
        events += d.close(flush=True)
        assert [e.data for e in events] == ["a", "[DONE]"], cut


def test_close_without_flush_still_discards_the_unfinished_event() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: [DONE]\n") == []
    assert d.close() == []


def test_error_field_is_an_error_event_only_when_asked_for() -> None:
    line = b'error: {"message": "slot unavailable"}\n\n'
    assert SSEDecoder().feed(line) == []  # WHATWG: an unknown field, ignored
    for cut in range(len(line) + 1):
        d = SSEDecoder(error_field=True)
        events = d.feed(line[:cut]) + d.feed(line[cut:])
        assert events == [SSEEvent(event="error", data='{"message": "slot unavailable"}')], cut


# -- the line splitter's fast path (no CR: str.split) against the general one (regex) --


@given(st.text(alphabet=st.sampled_from("ab\n\r\u2028\x85é"), max_size=40))
def test_the_line_splitter_cuts_as_the_line_ending_regex_does(text: str) -> None:
    pieces, start = [], 0
    for m in _sse._EOL.finditer(text):  # the pieces the spec's line endings make
        pieces.append(text[start : m.start()])
        start = m.end()
    pieces.append(text[start:])
    assert _sse._lines(text) == pieces
    assert _sse._lines(text.replace("\r", "")) == _sse._EOL.split(text.replace("\r", ""))


@given(event_streams(), st.data())
def test_the_fast_path_decodes_as_the_general_one(
    stream: tuple[bytes, list[SSEEvent]], data: st.DataObject
) -> None:
    body, expected = stream
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=10))
    for text in (body, body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")):
        chunks = split_at(text, cuts)
        fast = decode_all(chunks)
        with mock.patch.object(_sse, "_lines", _sse._EOL.split):  # the regex for every text
            assert decode_all(chunks) == fast
    assert decode_all(split_at(body, cuts)) == expected


@pytest.mark.parametrize(
    "over",
    [b"data: 0123456789\n", b"data: 01234567890123"],  # event data, line without end
)
def test_events_completed_before_the_bound_is_passed_come_out_first(over: bytes) -> None:
    # The events of the chunk before the over-long part were dropped with the
    # LimitExceeded: the result depended on where the stream was cut.
    whole = SSEDecoder(max_buffer=10)
    assert whole.feed(b"data: a\n\n" + over) == [SSEEvent("message", "a")]
    with pytest.raises(LimitExceeded):
        whole.feed(b"more\n\n")
    cut = SSEDecoder(max_buffer=10)
    assert cut.feed(b"data: a\n\n") == [SSEEvent("message", "a")]
    with pytest.raises(LimitExceeded):
        cut.feed(over)
    # The bound passed in the last chunk: close() raises it.
    last = SSEDecoder(max_buffer=10)
    assert last.feed(b"data: a\n\n" + over) == [SSEEvent("message", "a")]
    with pytest.raises(LimitExceeded):
        last.close(flush=True)
