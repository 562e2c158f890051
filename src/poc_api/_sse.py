"""An incremental Server-Sent-Events parser: pure, no I/O.

It follows the WHATWG HTML "event stream interpretation" algorithm
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):

- the byte stream is decoded as UTF-8 (invalid bytes become U+FFFD) and one
  leading byte-order mark is dropped;
- lines end in CRLF, LF or CR, and a CR at the end of one chunk followed by an LF
  at the start of the next is one line ending, not two;
- ``:`` lines are comments; ``field: value`` has one leading space of the value
  stripped; a line without a colon is a field with an empty value;
- ``data`` lines are joined with ``\\n``; ``event`` names the event (``"message"``
  when absent); ``id`` sets the last event id, which persists across events, and is
  ignored when it contains NUL; ``retry`` sets :attr:`SSEDecoder.retry` when it is
  all ASCII digits (at most 18 of them); other fields are ignored;
- a blank line dispatches the event, unless no ``data`` line was seen;
- an event the stream ends in the middle of is discarded (``close(flush=True)``
  dispatches it instead, for a body known to be complete).

Feeding is the caller's job, so the same decoder serves any transport::

    decoder = SSEDecoder()
    async for chunk in response.aiter_bytes():
        for event in decoder.feed(chunk):
            ...
    decoder.close()
"""

from __future__ import annotations

import codecs
import re
from typing import Final, final

import attrs

from ._errors import LimitExceeded

__all__ = ["DEFAULT_MAX_BUFFER", "SSEDecoder", "SSEEvent"]

#: Default bound on a pending line plus the pending event's data, in characters.
DEFAULT_MAX_BUFFER: Final = 16 * 1024 * 1024

_EOL: Final = re.compile(r"\r\n|\r|\n")
_BOM: Final = "\ufeff"


def _lines(text: str) -> list[str]:
    """The pieces of ``text`` between its line endings (CRLF, LF or CR), in order:
    the last one is what follows the last ending (``""`` when ``text`` ends in one)."""
    if "\r" in text:
        return _EOL.split(text)
    return text.split("\n")  # the usual text: the same pieces, without the regex


@final
@attrs.frozen
class SSEEvent:
    """One dispatched event.

    Attributes:
        event: the event type; ``"message"`` unless an ``event:`` field named one.
        data: the ``data:`` lines joined with ``\\n``.
        id: the last event id seen on the stream so far (``""`` if none), as the
            WHATWG ``lastEventId``: it carries over to later events.
    """

    event: str = "message"
    data: str = ""
    id: str = ""


@final
class SSEDecoder:
    """Turns chunks of an ``text/event-stream`` body into :class:`SSEEvent` s.

    Pure and synchronous: no I/O, no checkpoints, nothing for cancellation to
    interrupt. The result does not depend on how the byte stream is cut into chunks.
    ``error_field=True`` (off by default: it is not WHATWG) also dispatches a
    non-standard ``error: ...`` line, as llama.cpp's server sends one, as an event of
    type ``"error"``. ``max_buffer`` bounds memory: a single unterminated line, or one event's data,
    longer than that many characters raises :class:`~poc_api.LimitExceeded`
    (a peer that never sends a line ending must not grow the buffer forever);
    the events a chunk completed before that point are returned first, and the
    next :meth:`feed` or :meth:`close` raises it;
    ``what`` (e.g. ``"POST https://host/v1/chat/completions"``) begins its message.

    Example::

        d = SSEDecoder()
        d.feed(b"data: a\\r")      # []
        d.feed(b"\\ndata: b\\n\\n")  # [SSEEvent(event="message", data="a\\nb", id="")]
    """

    def __init__(
        self, *, max_buffer: int = DEFAULT_MAX_BUFFER, error_field: bool = False, what: str = ""
    ) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be positive, got {max_buffer}")
        self._max_buffer = max_buffer
        self._prefix = f"{what}: " if what else ""
        self._error_field = error_field
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True  # no character decoded yet: a BOM may still come
        self._skip_lf = False  # the last chunk ended in CR: a leading LF belongs to it
        self._partial: list[str] = []  # pieces of the current, unterminated line
        self._partial_len = 0
        self._event_type = ""
        self._data: list[str] = []
        self._data_len = 0
        self._last_id = ""
        self._closed = False
        # The bound passed after a chunk's first events: raised by the next call.
        self._error: LimitExceeded | None = None
        #: The last valid ``retry:`` value in milliseconds, or ``None``.
        self.retry: int | None = None

    @property
    def unfinished(self) -> bool:
        """An event (or a line) is under way: the stream ending now would cut it."""
        return bool(self._partial_len or self._data or self._event_type)

    @property
    def last_event_id(self) -> str:
        """The last ``id:`` value seen (``""`` if none); a reconnect would send it."""
        return self._last_id

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume the next chunk of bytes; return the events it completed, in order."""
        if self._closed:
            raise RuntimeError("SSEDecoder.feed() after close()")
        if self._error is not None:
            raise self._error
        return self._feed_text(self._utf8.decode(chunk))

    @property
    def error(self) -> LimitExceeded | None:
        """The bound passed after the last chunk's events (the next :meth:`feed`
        or :meth:`close` raises it), else ``None``: a reader that would wait for
        more bytes first raises it now."""
        return self._error

    def close(self, *, flush: bool = False) -> list[SSEEvent]:
        """End of stream: return what completed, then forget any unfinished event.

        Under the WHATWG algorithm an event needs its terminating blank line, and
        every complete line was already handled by :meth:`feed`, so by default this
        returns ``[]`` and an unfinished line or event is discarded. With
        ``flush=True`` the end of the stream also ends the last line and the last
        event, which are dispatched: for a body whose end is known to be complete
        (an HTTP response that finished cleanly) whose server left out the final
        blank line -- a bare ``data: [DONE]`` is common. Calling it twice is harmless.
        """
        if self._closed:
            return []
        self._closed = True
        if self._error is not None:
            raise self._error
        events = self._feed_text(self._utf8.decode(b"", final=True))
        if flush:
            if self._partial:
                line = "".join(self._partial)
                self._partial.clear()
                self._process_line(line, events)
            self._dispatch(events)
        self._partial.clear()
        self._partial_len = 0
        self._data.clear()
        self._data_len = 0
        self._event_type = ""
        return events

    def _feed_text(self, text: str) -> list[SSEEvent]:
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            if text.startswith(_BOM):
                text = text[1:]
        if self._skip_lf and text:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        if not text:
            return []
        if (
            text[-2:] == "\n\n"
            and text.startswith("data: ")
            and not self._partial
            and not self._data
            and not self._event_type
        ):
            # The usual chunk, one whole event ("data: {json}" and its blank line)
            # with nothing under way: the event the lines below would give.
            value = text[6:-2]
            if "\n" not in value and "\r" not in value and len(value) < self._max_buffer:
                return [SSEEvent("message", value, self._last_id)]
        events: list[SSEEvent] = []
        lines = _lines(text)
        rest = lines.pop()  # after the last line ending: "" if the text ends in one
        try:
            if lines:
                if self._partial:
                    self._partial.append(lines[0])
                    lines[0] = "".join(self._partial)
                    self._partial.clear()
                    self._partial_len = 0
                for line in lines:
                    self._process_line(line, events)
            if rest:
                self._partial.append(rest)
                self._partial_len += len(rest)
                if self._partial_len > self._max_buffer:
                    raise LimitExceeded(
                        f"{self._prefix}SSE line longer than {self._max_buffer} characters "
                        "without a line ending"
                    )
        except LimitExceeded as exc:
            if not events:
                raise
            # The events completed before it come out first, as they would have
            # from a stream cut before the over-long part; the next call raises.
            self._error = exc
            return events
        if not rest and text[-1] == "\r":
            # The CR already ended its line; an LF opening the next chunk is its partner.
            self._skip_lf = True
        return events

    def _process_line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line[0] == ":":
            return
        if line.startswith("data: "):  # the usual line, parsed as below without partition
            field, value = "data", line[6:]
        else:
            field, colon, value = line.partition(":")
            if colon and value[:1] == " ":
                value = value[1:]
        if field == "data":
            self._data.append(value)
            self._data_len += len(value) + 1
            if self._data_len > self._max_buffer:
                raise LimitExceeded(
                    f"{self._prefix}SSE event data longer than {self._max_buffer} characters"
                )
        elif field == "event":
            self._event_type = value
        elif field == "id":
            if "\0" not in value:
                self._last_id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            # int() refuses over 4300 digits; no usable delay has more than 18.
            if len(value) <= 18:
                self.retry = int(value)
        elif field == "error" and self._error_field:
            # llama.cpp's server writes a failure as an ``error: {json}`` line, a
            # field the standard ignores; opted in, it is an ``error`` event at once.
            events.append(SSEEvent(event="error", data=value, id=self._last_id))

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._data:
            events.append(
                SSEEvent(
                    event=self._event_type or "message",
                    data="\n".join(self._data),
                    id=self._last_id,
                )
            )
        self._data.clear()
        self._data_len = 0
        self._event_type = ""
