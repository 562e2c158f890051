"""Every private name of a dependency that poc_api relies on, in one place.

grpclib offers no public way to reset a stream with CANCEL, to read messages
without its per-message codec (or a stream's DATA a chunk at a time), to swap
the h2 connection class (the flow-control split), to know whether the peer's
SETTINGS arrived, or to set keepalive; h2 offers no public way to return
connection-level window apart from stream-level window, nor to receive frames
without formatting each one for a trace log nobody reads; hpack documents neither
its encoder's table nor how h2 holds its encoder. ``_transport.py`` and
``_hpack.py`` use the names below for that, and nothing else private
(``server/_grpc.py`` uses the last four for the reference server's graceful
shutdown, its release of calls reset before they ran and its pre-encoded writes).
``tests/test_private_names.py`` checks every one of them against the installed
versions (on real objects from a real call), so an upgrade that drops one fails
loudly there instead of silently disabling a feature. ``pyproject.toml`` caps
grpclib, h2, hpack and hyperframe below their next release lines.
"""

from __future__ import annotations

__all__ = ["PRIVATE_NAMES"]

#: (owner, name, what poc_api needs it for); the reference server's own uses
#: last. ``owner`` is a module, a class, or "<class> instance" for attributes
#: that only exist on instances.
PRIVATE_NAMES: tuple[tuple[str, str, str], ...] = (
    ("grpclib.protocol", "_set_nodelay", "TCP_NODELAY in our own connection_made"),
    ("grpclib.config.Configuration", "_keepalive_time", "keepalive interval"),
    ("grpclib.config.Configuration", "_keepalive_timeout", "keepalive ping timeout"),
    ("grpclib.config.Configuration", "_keepalive_permit_without_calls", "keepalive"),
    ("grpclib.config.Configuration", "_http2_max_pings_without_data", "keepalive"),
    (
        "grpclib.config.Configuration",
        "_http2_min_sent_ping_interval_without_data",
        "keepalive",
    ),
    ("grpclib.protocol.Connection", "_is_need_send_ping", "keepalive between turns"),
    ("grpclib.protocol.Connection instance", "last_ping_sent", "keepalive between turns"),
    (
        "grpclib.protocol.Connection instance",
        "_close_by_ping_handler",
        "tell a keepalive close from others (messages)",
    ),
    ("grpclib.protocol.Connection instance", "_config", "keepalive between turns"),
    (
        "grpclib.protocol.Connection instance",
        "write_ready",
        "wake a call waiting to write when its connection dies; share the send window",
    ),
    (
        "grpclib.protocol.Connection instance",
        "data_sent",
        "tell a bulk send (share the send window) from small calls",
    ),
    (
        "grpclib.protocol.Connection",
        "data_send_process",
        "a turn for other calls' frames after a bulk DATA frame (share the send window)",
    ),
    ("grpclib.client.Channel", "_protocol_factory", "install the split-window protocol"),
    ("grpclib.client.Channel", "__connect__", "bounded connect; never reconnect a closed one"),
    ("grpclib.client.Channel instance", "_protocol", "the connection's SETTINGS state"),
    ("grpclib.client.Channel instance", "_connected", "reuse a live connection"),
    ("grpclib.client.Channel instance", "_config", "protocol factory arguments"),
    ("grpclib.client.Channel instance", "_h2_config", "protocol factory arguments"),
    ("grpclib.client.Stream instance", "_stream", "raw reads and CANCEL resets"),
    ("grpclib.client.Stream instance", "_send_request_done", "reset only sent calls"),
    ("grpclib.protocol.Buffer instance", "_unacked", "take DATA chunks whole (_Reader)"),
    ("grpclib.protocol.Buffer instance", "_ack_callback", "return window per chunk (_Reader)"),
    ("grpclib.protocol.Buffer instance", "_eof", "a stream's end (_Reader, server_ended)"),
    ("grpclib.client.Stream instance", "_wrapper", "wake a reader when the connection dies"),
    ("grpclib.client.Stream instance", "_recv_initial_metadata_done", "finish after GOAWAY"),
    ("grpclib.client.Stream instance", "_recv_trailing_metadata_done", "finish after GOAWAY"),
    ("grpclib.client.Stream", "_raise_for_status", "finish a call after GOAWAY"),
    ("grpclib.client.Stream", "_raise_for_content_type", "finish a call after GOAWAY"),
    ("grpclib.client.Stream", "_process_grpc_status", "finish a call after GOAWAY"),
    ("grpclib.client.Stream", "_raise_for_grpc_status", "finish a call after GOAWAY"),
    ("h2.connection.H2Connection", "_get_stream_by_id", "stream-level window acks"),
    ("h2.connection.H2Connection", "_prepare_for_sending", "send WINDOW_UPDATE frames"),
    (
        "h2.connection.H2Connection",
        "_receive_goaway_frame",
        "keep a connection open after a graceful GOAWAY",
    ),
    ("grpclib.protocol.Stream", "__terminated__", "end streams above a GOAWAY's last id"),
    # h2's _receive_frame, taken over less its per-frame repr (see _transport.py),
    # and what it calls; tests/test_h2_receive_frame.py runs both on the same frames.
    ("h2.connection.H2Connection", "_receive_frame", "receive frames without a repr each"),
    ("h2.connection.H2Connection instance", "_frame_dispatch_table", "receive frames"),
    # h2's receive_data, taken over to keep the events of the frames before a bad
    # one (a reply among them: its session is closed, not lost with the connection).
    ("h2.connection.H2Connection instance", "incoming_buffer", "receive frames"),
    ("h2.connection.H2Connection", "_terminate_connection", "receive frames"),
    ("h2.connection.H2Connection", "_stream_is_closed_by_reset", "receive frames"),
    ("h2.connection.H2Connection", "_stream_is_closed_by_end", "receive frames"),
    ("h2.exceptions.StreamClosedError instance", "_events", "receive frames"),
    (
        "h2.connection.H2Connection instance",
        "_inbound_flow_control_window_manager",
        "return connection-level window on receipt",
    ),
    # Undocumented (though not underscored) names of grpclib, h2 and hpack: the bytes
    # a stream received; _hpack.py's encoder is installed on the connection and
    # watches hpack's dynamic table.
    (
        "grpclib.protocol.Stream instance",
        "data_received",
        "a refusal after an answer is no refusal (never sent again)",
    ),
    (
        "grpclib.protocol.Stream instance",
        "headers",
        "the grpc-encoding of a compressed reply (a C-core server compresses unasked)",
    ),
    (
        "grpclib.protocol.Stream instance",
        "id",
        "a stream above a GOAWAY's last stream id was not processed (sent again)",
    ),
    (
        "grpclib.protocol.Stream instance",
        "window_updated",
        "wake the calls that sent least first on a connection WINDOW_UPDATE",
    ),
    (
        "grpclib.protocol.Stream instance",
        "data_sent",
        "wake the calls that sent least first on a connection WINDOW_UPDATE",
    ),
    (
        "grpclib.protocol.EventsProcessor",
        "process_window_updated",
        "wake the calls that sent least first on a connection WINDOW_UPDATE",
    ),
    (
        "grpclib.protocol.EventsProcessor instance",
        "streams",
        "a connection's open calls (GOAWAY refusals, idle checks, too_many_pings, "
        "the resets before a keepalive close)",
    ),
    ("h2.connection.H2Connection instance", "encoder", "install the caching HPACK encoder"),
    ("hpack.Encoder instance", "header_table", "the table a cached block depends on"),
    ("hpack.table.HeaderTable instance", "dynamic_entries", "the table's state (_hpack)"),
    ("hpack.table.HeaderTable instance", "resized", "a table size update is pending"),
    (
        "hpack.Encoder instance",
        "table_size_changes",
        "the table size updates to signal: the smallest and the last (RFC 7541 4.2)",
    ),
    ("hpack.table.HeaderTable", "maxsize", "the table's state (_hpack)"),
    # The reference server (poc_api.server): graceful shutdown.
    ("grpclib.server.Server instance", "_server", "stop accepting before the grace period"),
    (
        "grpclib.protocol.Connection instance",
        "_connection",
        "the h2 connection's last stream id; a ping when a health check goes unanswered; "
        "the resets before a keepalive close",
    ),
    (
        "grpclib.server.Handler instance",
        "_tasks",
        "release the stream of a call reset before its handler's first step",
    ),
    (
        "grpclib.server.Stream instance",
        "_stream",
        "write a Generate's events as DATA already encoded (_Generation._flush)",
    ),
)
