"""poc_api's HPACK encoder against hpack's own, on random call sequences.

The cache may only ever return bytes hpack itself would have produced; the
never-indexed literals must decode to the same headers and leave every table
alone. A peer's decoder is the judge of both.
"""

from __future__ import annotations

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from poc_api._hpack import CachingEncoder, never_indexed_literal

AFFINITY = b"x-session-affinity"

# A few names and values, so header lists repeat (the cache's case) and entries
# get evicted and added again (what must defeat it).
_names = st.sampled_from([b":path", b"content-type", b"te", b"user-agent", b"x-meta"])
_values = st.sampled_from([b"a", b"bb", b"/salience.Salience/OpenSession", b"x" * 40, b"y" * 300])
_header = st.tuples(_names, _values)
_header_list = st.lists(_header, max_size=6)
_affinity = st.lists(st.binary(min_size=0, max_size=200), max_size=2)
# A step: encode a header list (with affinity values), or resize the table.
_step = st.one_of(
    st.tuples(st.just("encode"), st.sampled_from(range(6)), _affinity),
    st.tuples(st.just("resize"), st.sampled_from([0, 64, 100, 256, 4096]), st.just([])),
)


def _decoded(decoder: hpack.Decoder, block: bytes) -> list[tuple[bytes, bytes, bool]]:
    return [
        (bytes(h[0]), bytes(h[1]), isinstance(h, NeverIndexedHeaderTuple))
        for h in decoder.decode(block, raw=True)
    ]


@settings(max_examples=300, deadline=None)
@given(lists=st.lists(_header_list, min_size=6, max_size=6), steps=st.lists(_step, max_size=40))
def test_blocks_decode_as_hpack_would_and_tables_stay_in_step(
    lists: list[list[tuple[bytes, bytes]]], steps: list[tuple[str, int, list[bytes]]]
) -> None:
    ours, reference = CachingEncoder([AFFINITY]), hpack.Encoder()
    peer = hpack.Decoder()
    resizes = 0  # since the last block
    for kind, arg, keys in steps:
        if kind == "resize":
            # Only real changes: hpack forgets a pending size update when the
            # same size is set twice (its own quirk, with or without our cache).
            if arg != reference.header_table_size:
                ours.header_table_size = reference.header_table_size = arg
                # A strict peer: no size update above the limit it acknowledged.
                peer.max_allowed_table_size = arg
                resizes += 1
            continue
        headers = lists[arg]
        sent = [*headers, *((AFFINITY, k) for k in keys)]
        block = ours.encode(sent)
        # Byte for byte what hpack sends for the same headers, then the
        # affinity literals (which do not depend on any table); but for several
        # resizes since the last block, where hpack signals every size and ours
        # the smallest and the last (RFC 7541 4.2), which the peer judges.
        expected = reference.encode(headers) + b"".join(
            never_indexed_literal(AFFINITY, k) for k in keys
        )
        assert block == expected or resizes > 1
        resizes = 0
        assert _decoded(peer, block) == [
            *((n, v, False) for n, v in headers),
            *((AFFINITY, k, True) for k in keys),
        ]
        assert list(peer.header_table.dynamic_entries) == list(
            reference.header_table.dynamic_entries
        )
        assert list(ours.header_table.dynamic_entries) == list(
            reference.header_table.dynamic_entries
        )


def test_a_header_evicted_and_added_again_is_a_new_table() -> None:
    """The front entry is told apart by identity: an equal one added again after
    evictions heads a different table, where a cached block's indexes would
    name other headers."""
    ours, reference = CachingEncoder(), hpack.Encoder()
    peer = hpack.Decoder()
    for enc in (ours, reference):
        enc.header_table_size = 160  # room for two 78-byte entries

    def entry(c: bytes) -> tuple[bytes, bytes]:
        return (b"x-meta", c * 40)

    x, a, y, z = entry(b"x"), entry(b"a"), entry(b"y"), entry(b"z")
    # [X, A] twice: cached for table [A, X]. Then the table becomes [A', Z]: the
    # same length, an equal front entry, another table.
    sequence = [[x, a], [x, a], [y], [z], [a], [x, a]]
    for headers in sequence:
        block = ours.encode(headers)
        assert block == reference.encode(headers)
        assert _decoded(peer, block) == [(n, v, False) for n, v in headers]


def test_a_table_shrunk_and_grown_back_lost_its_back_entries() -> None:
    """Same maximum size, same front entry, fewer entries: another table."""
    ours, reference = CachingEncoder(), hpack.Encoder()
    peer = hpack.Decoder()
    x, a = (b"x-meta", b"x" * 40), (b"x-meta", b"a" * 40)
    steps: list[int | list[tuple[bytes, bytes]]] = [160, [x, a], [x, a], 80, 160, [a], [x, a]]
    for step in steps:
        if isinstance(step, int):
            ours.header_table_size = reference.header_table_size = step
            continue
        block = ours.encode(step)
        assert block == reference.encode(step)
        assert _decoded(peer, block) == [(n, v, False) for n, v in step]


@pytest.mark.parametrize(
    ("sizes", "updates"),
    [
        ([8192, 0], [0]),
        ([0, 4096, 0], [0]),
        ([8192, 100], [100]),
        ([100, 8192], [100, 8192]),
        ([0, 100, 4096], [0, 4096]),
        ([8192, 8192], [8192]),
        ([4096], []),
    ],
)
def test_several_table_size_changes_between_blocks_signal_the_smallest_and_the_last(
    sizes: list[int], updates: list[int]
) -> None:
    # Two SETTINGS_HEADER_TABLE_SIZE changes (8192, then 0) before a request:
    # hpack signalled both, and a strict peer refused the 8192 it had not
    # acknowledged last (COMPRESSION_ERROR: the connection died). RFC 7541 4.2:
    # the smallest size of the interval, then the final one. And one set to the
    # same size again kept its update (hpack forgot it: tables out of step).
    enc = CachingEncoder()
    for size in sizes:
        enc.header_table_size = size
    block = enc.encode([(b":path", b"/x")])
    expected = b""
    for size in updates:
        expected += _prefixed_int(size, 0x20, 5)
    rest = block[len(expected) :]
    assert block.startswith(expected) and rest[0] & 0xE0 != 0x20  # (no more updates)
    peer = hpack.Decoder()
    peer.max_allowed_table_size = sizes[-1]
    assert _decoded(peer, block) == [(b":path", b"/x", False)]
    assert peer.header_table.maxsize == sizes[-1]


def _prefixed_int(value: int, flags: int, bits: int) -> bytes:
    from hpack.hpack import encode_integer

    out = encode_integer(value, bits)
    out[0] |= flags
    return bytes(out)


@pytest.mark.parametrize("length", [0, 1, 126, 127, 128, 300, 20_000])
def test_never_indexed_literals_of_any_length(length: int) -> None:
    value = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
    name = b"n" * length + b"x"
    block = never_indexed_literal(name, value)
    decoder = hpack.Decoder(max_header_list_size=1 << 20)
    decoder.max_allowed_table_size = 4096
    assert _decoded(decoder, block) == [(name, value, True)]
    assert not decoder.header_table.dynamic_entries


def test_sensitive_headers_of_the_caller_go_to_hpack_unchanged() -> None:
    ours, reference = CachingEncoder([AFFINITY]), hpack.Encoder()
    headers = [
        HeaderTuple(b":path", b"/p"),
        NeverIndexedHeaderTuple(b"authorization", b"secret"),
        (b"x-three", b"v", True),
    ]
    for _ in range(3):
        assert ours.encode(headers) == reference.encode(headers)
    assert not ours._blocks


def test_pseudo_headers_are_never_moved_to_the_end() -> None:
    ours = CachingEncoder([b":authority", AFFINITY])
    assert ours.unindexed == frozenset([AFFINITY])


def test_a_repeated_header_list_is_served_from_the_cache() -> None:
    """The point of the cache: once its headers are indexed, a list is looked up."""
    ours = CachingEncoder([AFFINITY])
    headers = [(b":path", b"/salience.Salience/OpenSession"), (b"te", b"trailers")]
    first = ours.encode(headers)  # adds to the table: not cached
    assert not ours._blocks
    second = ours.encode(headers)  # all indexed now: cached
    assert len(ours._blocks) == 1 and second != first
    assert ours.encode([*headers, (AFFINITY, b"k1")]) == second + never_indexed_literal(
        AFFINITY, b"k1"
    )


def test_an_iterator_of_headers_with_a_sensitive_one_loses_none() -> None:
    # On a sensitive header the encoder handed the rest to hpack: the same,
    # partly read iterator, so the headers before it were lost (h2 passes a
    # generator when it normalises outbound headers).
    headers = [
        HeaderTuple(b":method", b"POST"),
        HeaderTuple(b":path", b"/x"),
        NeverIndexedHeaderTuple(b"proxy-authorization", b"k"),
    ]
    block = CachingEncoder().encode(iter(headers))
    assert hpack.Decoder().decode(block, raw=True) == [(h[0], h[1]) for h in headers]


def test_unindexed_headers_stay_out_of_the_table_beside_a_sensitive_one() -> None:
    # A sensitive header of the caller's sent the whole list to hpack, which
    # indexed the affinity key and the api key (and logged them: "Adding
    # authorization=Bearer ... to the header table").
    ours = CachingEncoder([AFFINITY, b"authorization"])
    headers = [
        (b":path", b"/p"),
        (b"authorization", b"Bearer secret"),
        (AFFINITY, b"k1"),
        NeverIndexedHeaderTuple(b"cookie", b"a=1"),
    ]
    peer = hpack.Decoder()
    for _ in range(2):
        block = ours.encode(headers)
        assert sorted(_decoded(peer, block)) == sorted(
            [
                (b":path", b"/p", False),
                (b"authorization", b"Bearer secret", True),
                (AFFINITY, b"k1", True),
                (b"cookie", b"a=1", True),
            ]
        )
    assert list(ours.header_table.dynamic_entries) == [(b":path", b"/p")]
    assert list(peer.header_table.dynamic_entries) == [(b":path", b"/p")]
