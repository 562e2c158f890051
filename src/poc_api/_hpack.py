"""The HPACK encoder of poc_api's HTTP/2 connections: hpack's, minus repeated work.

A gRPC client sends nearly the same request headers on every call (``:path``,
``content-type``, ``te``, ``user-agent``, ...). Once they are all in the
dynamic table, hpack encodes each of them as a one-byte index, yet spends about
10 µs per call getting there (a table search and a debug log per header).
:class:`CachingEncoder` remembers the block of each header list whose encoding
left the table untouched, and sends it again while the table is unchanged: the
bytes are exactly what hpack would produce.

Headers named in ``unindexed`` (the per-session affinity key) are sent as
never-indexed literals with a literal name and no Huffman coding: they never
touch the dynamic table, so their bytes do not depend on it and cost no Huffman
pass (hpack's is pure Python, ~8 µs per header) on every call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, final

import hpack
from hpack import HeaderTuple

__all__ = ["CachingEncoder", "never_indexed_literal"]

# Header lists remembered per connection: a client sends a handful of distinct
# ones (one per method and metadata set); the bound only guards against a
# caller whose metadata changes on every call.
_MAX_BLOCKS = 256


def _prefixed_int(value: int, first: int) -> bytes:
    """``value`` as an HPACK integer with a 7-bit prefix; ``first`` holds the top bit."""
    if value < 0x7F:
        return bytes((first | value,))
    out = bytearray((first | 0x7F,))
    value -= 0x7F
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def never_indexed_literal(name: bytes, value: bytes) -> bytes:
    """A "literal header field never indexed — new name" (RFC 7541 §6.2.3), no Huffman."""
    return b"\x10" + _prefixed_int(len(name), 0) + name + _prefixed_int(len(value), 0) + value


def _as_bytes(s: bytes | str) -> bytes:
    return s if type(s) is bytes else str(s).encode("utf-8") if isinstance(s, str) else bytes(s)


@final
class _State:
    """The dynamic table, pinned down cheaply.

    The table changes only by an entry added at its front (a new tuple object,
    told apart by identity: the state holds a reference, so its address cannot
    be reused) or by a new maximum size, which evicts from the back (the length
    tells). Equal by identity of the front entry, never by its value: a header
    evicted and added again is a different table.
    """

    __slots__ = ("front", "length", "maxsize")

    def __init__(self, maxsize: int, length: int, front: object) -> None:
        self.maxsize = maxsize
        self.length = length
        self.front = front

    def same(self, other: _State) -> bool:
        return (
            self.front is other.front
            and self.length == other.length
            and self.maxsize == other.maxsize
        )


@final
class CachingEncoder(hpack.Encoder):
    """``hpack.Encoder`` with the two shortcuts of the module docstring."""

    def __init__(self, unindexed: Iterable[str | bytes] = ()) -> None:
        super().__init__()
        # Pseudo-headers must lead the block: never moved to its end.
        self.unindexed = frozenset(
            b for b in (_as_bytes(n) for n in unindexed) if not b.startswith(b":")
        )
        # header list -> (table state it was encoded in, block)
        self._blocks: dict[tuple[tuple[bytes, bytes], ...], tuple[_State, bytes]] = {}

    @property
    def header_table_size(self) -> int:
        """The dynamic table's maximum size (set by h2 from the peer's SETTINGS)."""
        return int(self.header_table.maxsize)

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # hpack's setter signals every size set since the last block: two quick
        # SETTINGS (8192, then 0) sent an update to 8192 that a strict peer,
        # having acknowledged 0 last, refuses (COMPRESSION_ERROR: the connection
        # dies). RFC 7541 4.2: the smallest size of the interval, then the final
        # one. And the same size set again cleared ``resized``, so a pending
        # update was never sent and the two tables went out of step.
        table, changes = self.header_table, self.table_size_changes
        table.maxsize = value  # (evicts; resized: whether the size changed)
        if table.resized:
            changes.append(value)
        if changes:
            table.resized = True  # still to signal, whatever this set changed
            smallest = min(changes)
            changes[:] = [smallest] if smallest == value else [smallest, value]

    def _state(self) -> _State:
        table = self.header_table
        entries = table.dynamic_entries
        return _State(table.maxsize, len(entries), entries[0] if entries else None)

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        """Encode ``headers`` into a header block, as :meth:`hpack.Encoder.encode` does."""
        if isinstance(headers, dict) or not huffman:
            return super().encode(headers, huffman)
        unindexed = self.unindexed
        kept: list[tuple[bytes, bytes]] = []
        others: list[Any] = []  # the headers not in ``unindexed``, as given
        any_sensitive = False
        tail = b""
        for header in headers:
            if isinstance(header, HeaderTuple):
                sensitive = not header.indexable
            elif len(header) > 2:
                sensitive = bool(header[2])
            else:
                sensitive = False
            name = _as_bytes(header[0])
            if name in unindexed:
                tail += never_indexed_literal(name, _as_bytes(header[1]))
                continue
            others.append(header)
            if sensitive:
                any_sensitive = True
            else:
                kept.append((name, _as_bytes(header[1])))
        if any_sensitive:
            # Sensitive headers of the caller's own: hpack, uncached; the
            # ``unindexed`` ones still as literals of their own, out of hpack's
            # table (and its debug log), as on every other path.
            return super().encode(others, huffman) + tail
        key = tuple(kept)
        if self.header_table.resized:  # a table size update must lead the block
            return super().encode(kept, huffman) + tail
        state = self._state()
        cached = self._blocks.get(key)
        if cached is not None and cached[0].same(state):
            # Same headers, same table: hpack would produce these very bytes
            # (all indexed, nothing added).
            return cached[1] + tail
        block = super().encode(kept, huffman)
        if self._state().same(state):
            if len(self._blocks) >= _MAX_BLOCKS:
                self._blocks.clear()
            self._blocks[key] = (state, block)
        return block + tail
