"""Canary: every private name of grpclib/h2 that poc_api uses still exists.

A dependency upgrade that removes or renames one of them must fail here, loudly,
not silently switch off the flow-control split, SETTINGS detection, CANCEL resets
or error mapping. The list lives in ``poc_api._private``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path
from typing import Any

import grpclib.server
import h2.connection
import h2.exceptions
import hpack
import trio
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.protocol import Buffer
from grpclib.protocol import Stream as RawStream

import poc_api
from poc_api._private import PRIVATE_NAMES
from poc_api._transport import SERVICE, GrpcTransport
from poc_api.server import ReferenceServer

SRC = Path(poc_api.__file__).parent


def _resolve(dotted: str) -> Any:
    module, _, attr = dotted.rpartition(".")
    try:
        return importlib.import_module(dotted)
    except ImportError:
        return getattr(importlib.import_module(module), attr)


async def _live_objects(client: poc_api.ApiClient) -> dict[str, object]:
    """A real channel, stream and h2 connection from a real call (one that leaves
    nothing behind on the shared server: closing an unknown session succeeds)."""
    transport = client._transport
    assert isinstance(transport, GrpcTransport)

    async def grab() -> dict[str, object]:
        channel = await transport._ready_channel()
        async with channel.request(
            SERVICE + "CloseSession", Cardinality.UNARY_UNARY, bytes, bytes
        ) as stream:
            found = {
                "grpclib.protocol.Connection instance": channel._protocol.connection,
                "grpclib.protocol.EventsProcessor instance": channel._protocol.processor,
                "grpclib.server.Server instance": grpclib.server.Server([]),
                "grpclib.server.Handler instance": grpclib.server.Handler({}, None, None, None),  # type: ignore[arg-type]
                "grpclib.client.Channel instance": channel,
                "grpclib.client.Stream instance": stream,
                "h2.connection.H2Connection instance": h2.connection.H2Connection(),
                "h2.exceptions.StreamClosedError instance": h2.exceptions.StreamClosedError(1),
                "hpack.Encoder instance": hpack.Encoder(),
                "hpack.table.HeaderTable instance": hpack.Encoder().header_table,
            }
            await stream.send_message(b"", end=True)
            found["grpclib.protocol.Buffer instance"] = stream._stream.buffer
            found["grpclib.protocol.Stream instance"] = stream._stream
            found["grpclib.server.Stream instance"] = grpclib.server.Stream(
                stream._stream,  # (a protocol stream, as a server's is)
                "/m",
                Cardinality.UNARY_UNARY,
                bytes,
                bytes,
                codec=None,  # type: ignore[arg-type]
                status_details_codec=None,
                dispatch=None,  # type: ignore[arg-type]
            )
            await stream.recv_message()
            return found

    return await client._bridge.run(grab)  # type: ignore[union-attr]


async def test_every_private_name_poc_api_uses_exists(server: ReferenceServer) -> None:
    with trio.fail_after(10):
        async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
            live = await _live_objects(client)
    missing = []
    for owner, name, why in PRIVATE_NAMES:
        target = live[owner] if owner in live else _resolve(owner)
        if dataclasses.is_dataclass(target) and isinstance(target, type):
            ok = name in {f.name for f in dataclasses.fields(target)}
        else:
            ok = hasattr(target, name)
        if not ok:
            missing.append(f"{owner}.{name} ({why})")
    assert not missing, "private names gone from the installed dependencies: " + ", ".join(missing)


def test_the_raw_stream_methods_used_are_there() -> None:
    # grpclib.protocol.Stream is internal as a whole; these are what _transport calls.
    for name in ("reset_nowait", "closable", "send_data"):  # (send_data: the server's)
        assert hasattr(RawStream, name), name
    assert hasattr(Channel, "request")


def test_a_stream_buffer_queues_data_chunks_as_the_reader_takes_them() -> None:
    # _Reader takes (data, data_size, ack_size) items off Buffer._unacked itself,
    # returns the window through _ack_callback, and knows the end by _eof.
    acked: list[int] = []
    buffer = Buffer(acked.append)
    buffer.add(b"abc", 8)  # a padded frame: 8 bytes of window for 3 of data
    assert not buffer._eof
    buffer.eof()
    assert buffer._eof
    assert tuple(buffer._unacked.get_nowait()) == (b"abc", 3, 8)
    assert tuple(buffer._unacked.get_nowait()) == (b"", 0, 0)  # the end mark
    assert buffer._unacked.empty()
    buffer._ack_callback(8)
    assert acked == [8]


def test_the_list_names_every_private_attribute_the_transport_touches() -> None:
    # Any `x._name` in _transport.py on something other than self/cls must be listed.
    tree = ast.parse((SRC / "_transport.py").read_text())
    listed = {name for _, name, _ in PRIVATE_NAMES}
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr.startswith("__") and node.attr != "__connect__":
                continue
            used.add(node.attr)
        if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("."):
            for alias in node.names:
                if alias.name.startswith("_"):
                    used.add(alias.name)
        if isinstance(node, ast.keyword) and node.arg and node.arg.startswith("_"):
            used.add(node.arg)
    ours = {
        # poc_api's own private attributes read on objects that are not `self`.
        "_bridge",
        "_channel",
        "_check_size",
        "_closed",
        "_exchange",
        "_give_slot",
        "_redact",
        "_take_slot",
        "_transport",
    }
    assert used - ours <= listed, sorted(used - ours - listed)
