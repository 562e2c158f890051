"""A deterministic reference server for the salience protocol (gRPC + HTTP).

For tests, demos and ``poc-api serve``: a byte-level character n-gram model
behind the exact wire contract of ``proto/salience.proto`` and the HTTP endpoints
of proto/PROTOCOL.md §5. No GPU, no extra dependencies.

Example::

    from poc_api.server import ReferenceServer, ServerConfig

    async with ReferenceServer(ServerConfig(api_key="k")) as srv:
        print(srv.base_url, srv.grpc_url)   # http://127.0.0.1:P/v1  http://127.0.0.1:P+1
        print(srv.state().connections_total)

``GET /admin/state`` on the HTTP port serves the same snapshot as JSON, without
auth: it exists for tests and must not be exposed beyond a test machine.
"""

from ._app import ReferenceServer, run_forever
from ._model import (
    BOS,
    EOS,
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    VOCAB_SIZE,
    detokenize,
    tokenize,
)
from ._state import ServerConfig, ServerState

__all__ = [
    "BOS",
    "EOS",
    "IMAGE_PAD",
    "VISION_END",
    "VISION_START",
    "VOCAB_SIZE",
    "ReferenceServer",
    "ServerConfig",
    "ServerState",
    "detokenize",
    "run_forever",
    "tokenize",
]
