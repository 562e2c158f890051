"""A user's tests built on ``poc_api.testing``: keywords are checked, typos refused.

Checked by ``mypy --strict tests/typing`` (nox's typecheck session), never run.
"""

from __future__ import annotations

from typing import assert_type

import poc_api
from poc_api.server import ReferenceServer
from poc_api.testing import open_client, reference_server, reference_servers


async def configured_server_and_client() -> None:
    async with reference_server(seed=1, readout=False, concepts=["a", "b"]) as server:
        assert_type(server, ReferenceServer)
        async with open_client(server, model="m", timeout=5.0, grpc_url=None) as client:
            assert_type(client, poc_api.ApiClient)
    async with reference_servers(3, token_delay_ms=2.0, prefill_slots=1) as servers:
        assert_type(servers, list[ReferenceServer])
        async with open_client(servers[0], grpc_url=[s.grpc_url for s in servers]):
            pass


async def typos_and_wrong_types_are_refused(server: ReferenceServer) -> None:
    reference_server(sede=1)  # type: ignore[call-arg]
    reference_server(seed="1")  # type: ignore[arg-type]
    reference_servers(2, token_delay=2.0)  # type: ignore[call-arg]
    open_client(server, timout=5)  # type: ignore[call-arg]
    open_client(server, keepalive_idle="yes")  # type: ignore[arg-type]
