"""The standard gRPC health checking protocol (``grpc.health.v1.Health``).

Load balancers, Kubernetes probes and poc_api's client-side pool ask a server
whether it takes new work. The reference server answers ``SERVING`` for the
whole server (service ``""``) and for ``salience.Salience`` until it is told to
drain (:meth:`ReferenceServer.set_serving`), then ``NOT_SERVING``; ``Watch``
streams every change.

Health is answered without an api key, as gRPC's own health services do:
probes (kubelet, nginx, Envoy) carry no credentials, and the answer reveals
nothing but up or down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, final

import grpclib.const
import grpclib.server
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from .._proto.grpc.health.v1 import (
    HealthCheckRequest,
    HealthCheckResponse,
    HealthCheckResponseServingStatus,
    HealthListRequest,
    HealthListResponse,
)

__all__ = ["HealthService", "HealthStatus"]

#: The services this server reports on ("" is the server as a whole).
SERVICES: Final = ("", "salience.Salience")

_Stream = grpclib.server.Stream[Any, Any]


@final
class HealthStatus:
    """Whether the server takes new work; lives on the server's asyncio loop."""

    def __init__(self) -> None:
        self.serving = True
        # One event per Watch stream, set on every change; a Watch re-reads the
        # current status (a change and its reversal in between need not both show).
        self._watchers: set[asyncio.Event] = set()

    def set(self, serving: bool) -> None:
        """Change the status (on the server's loop) and wake every ``Watch``."""
        if serving == self.serving:
            return
        self.serving = serving
        for event in self._watchers:
            event.set()

    def status(self, service: str) -> HealthCheckResponseServingStatus:
        if service not in SERVICES:
            return HealthCheckResponseServingStatus.SERVICE_UNKNOWN
        if self.serving:
            return HealthCheckResponseServingStatus.SERVING
        return HealthCheckResponseServingStatus.NOT_SERVING

    def watcher(self) -> asyncio.Event:
        event = asyncio.Event()
        self._watchers.add(event)
        return event

    def unwatch(self, event: asyncio.Event) -> None:
        self._watchers.discard(event)


@final
class HealthService:
    """grpclib handler mapping for ``grpc.health.v1.Health``."""

    def __init__(self, status: HealthStatus) -> None:
        self._status = status

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        def h(func: Callable[[_Stream], Any], card: Cardinality, req: Any, rep: Any) -> Any:
            return grpclib.const.Handler(func, card, req, rep)

        base = "/grpc.health.v1.Health/"
        return {
            base + "Check": h(
                self._check, Cardinality.UNARY_UNARY, HealthCheckRequest, HealthCheckResponse
            ),
            base + "List": h(
                self._list, Cardinality.UNARY_UNARY, HealthListRequest, HealthListResponse
            ),
            base + "Watch": h(
                self._watch, Cardinality.UNARY_STREAM, HealthCheckRequest, HealthCheckResponse
            ),
        }

    async def _check(self, stream: _Stream) -> None:
        req: HealthCheckRequest | None = await stream.recv_message()
        service = req.service if req is not None else ""
        status = self._status.status(service)
        if status is HealthCheckResponseServingStatus.SERVICE_UNKNOWN:
            # The protocol: Check on an unknown service is NOT_FOUND.
            raise GRPCError(Status.NOT_FOUND, f"unknown service {service!r}")
        await stream.send_message(HealthCheckResponse(status=status))

    async def _list(self, stream: _Stream) -> None:
        await stream.recv_message()
        statuses = {s: HealthCheckResponse(status=self._status.status(s)) for s in SERVICES}
        await stream.send_message(HealthListResponse(statuses=statuses))

    async def _watch(self, stream: _Stream) -> None:
        req: HealthCheckRequest | None = await stream.recv_message()
        service = req.service if req is not None else ""
        event = self._status.watcher()
        try:
            last = None
            while True:
                event.clear()
                status = self._status.status(service)
                if status != last:
                    await stream.send_message(HealthCheckResponse(status=status))
                    last = status
                await event.wait()
        finally:
            self._status.unwatch(event)
