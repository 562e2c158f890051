"""Many inference servers: session affinity keys and a client-side pool.

Every session lives on the one server that holds its KV cache, so every call of
a session must reach that server. Two ways to spread sessions over servers:

- **Behind an L7 proxy** (nginx ``hash $http_x_session_affinity consistent``,
  Envoy ``hash_policy``): each session gets a random *affinity key*, sent as
  gRPC metadata on ``OpenSession`` and on every later call of the session
  (``CloseSession`` included). A proxy hashing on it keeps the session on one
  backend. One ``grpc_url``.
- **Client-side pool**: ``ApiClient`` gets several endpoints (a list, or a
  ``dns:///host:port`` target re-resolved every ``dns_refresh`` seconds, as
  gRPC's DNS resolver does). Each endpoint has its own :class:`GrpcTransport`
  (one HTTP/2 connection, opened on first use) on the client's bridge. A new
  session goes to the less loaded of two random healthy endpoints (open
  sessions + calls in flight: "power of two choices"); its calls then stay there.

Health: while the pool has more than one endpoint (or a DNS target, however
many addresses it has now), an asyncio task on the bridge's loop re-resolves the
DNS target when due and asks each endpoint ``grpc.health.v1.Health/Check`` every
``health_interval`` seconds (the bridge cancels it when the client closes: no
trio nursery is held across user code). An endpoint that answers NOT_SERVING,
cannot be reached, or failed a call recently (exponential backoff) gets no new
sessions; its open sessions carry on until they fail.

Failover: an ``OpenSession`` that cannot reach its endpoint, or that the
endpoint refuses as full (``RESOURCE_EXHAUSTED``), is retried on another one
(nothing exists yet to lose). Conversations reopen elsewhere on
their next stream and send the whole prompt again; scoring retries a prompt
once elsewhere. Raw sessions raise as before: their state is gone. None of this
waits on a dead endpoint: within its transport's reconnect backoff a call fails
at once (only health checks wait the backoff out, to find the server back).

Thread-safety: endpoints are read on the trio side and updated by health checks
on the asyncio side. Counters written from both sides are changed under a lock;
the endpoint list is replaced, never mutated in place.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar, final
from urllib.parse import urlsplit

import attrs
import trio
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from . import _errors as e
from ._bridge import AsyncioBridge, BatchReceiver
from ._proto.grpc.health.v1 import HealthCheckResponseServingStatus
from ._transport import (
    GrpcTarget,
    GrpcTransport,
    Orphan,
    StreamCall,
    _Collect,
    _Progress,
    backoff,
    deadline,
    host_name_problem,
)
from ._wire import decode_health_check, encode_string_field

T = TypeVar("T")

if TYPE_CHECKING:
    from ._session import Session

__all__ = [
    "DEFAULT_AFFINITY_HEADER",
    "DnsTarget",
    "EndpointState",
    "EndpointStatus",
    "Router",
    "SessionRoute",
    "check_affinity_header",
    "parse_grpc_targets",
]

log = logging.getLogger("poc_api.grpc")

#: The metadata key that carries a session's affinity key (lower case: HTTP/2).
DEFAULT_AFFINITY_HEADER = "x-session-affinity"

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_HEALTH_SERVICE = "salience.Salience"
# Failed endpoints wait this long before they get new sessions again, doubling
# per consecutive failure (a health check that succeeds clears it).
_BACKOFF_BASE = 0.25
_BACKOFF_MAX = 10.0
# A health check's timeout is the interval (at most 5 s), but an endpoint's first
# check, which connects too, gets at least this long.
_FIRST_CHECK_TIMEOUT = 1.0
# An endpoint that refused a session as full is picked last for this long: it
# stays in rotation (it is no failure), but is not asked first again and again
# while it stays full.
_FULL_HOLD = 2.0
# How often an OpenSession comes back to an endpoint it left while it connected
# (see SessionRoute._open): each time, after a second or a "full" hold at least.
_COMEBACKS = 2
# Seconds a new client's first placement waits for the endpoints' first health
# answers (see Router.first_checks); a healthy server's come in milliseconds.
_FIRST_CHECKS_WAIT = 1.0


class EndpointState(enum.Enum):
    """What the pool knows about an endpoint."""

    UNKNOWN = "unknown"
    """Not checked yet: new sessions may go there. A single ``grpc_url`` is never
    health-checked: it stays here while it answers (UNREACHABLE when it does not)."""
    SERVING = "serving"
    """Its last health check said SERVING (or it has no health service)."""
    NOT_SERVING = "not_serving"
    """It said NOT_SERVING (draining): no new sessions."""
    UNREACHABLE = "unreachable"
    """A call or health check could not reach it: no new sessions until its
    backoff has passed."""
    RETIRED = "retired"
    """DNS no longer lists it: no new sessions; open ones carry on. Once it has
    none left (no session, no call) it is dropped and its connection closed."""


@final
@attrs.frozen
class EndpointStatus:
    """One endpoint of a client, as :attr:`ApiClient.endpoints` reports it.

    Attributes:
        url: the endpoint, e.g. ``http://10.0.0.7:8001``.
        state: an :class:`EndpointState`.
        sessions: sessions this client holds (or is opening) there.
        streams: calls in flight there.
        failures: calls and health checks that could not reach it, in total.
        full: it refused a new session as full (``RESOURCE_EXHAUSTED``) less
            than 2 s ago and has taken none since: new sessions ask it last.
    """

    url: str
    state: EndpointState
    sessions: int
    streams: int
    failures: int
    full: bool = False


@final
@attrs.frozen
class DnsTarget:
    """A ``dns:///host:port`` target: every A/AAAA record of ``host`` is an endpoint."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> DnsTarget:
        """Parse ``dns:///host:port`` (gRPC's syntax; ``dns:host:port`` too)."""
        if text != text.strip():
            raise ValueError(
                f"a DNS target must look like dns:///host:port, got {text!r}: it has "
                "leading or trailing whitespace (from a .env file?)"
            )
        rest = text[len("dns:") :]
        if rest.startswith("//"):
            authority, _, rest = rest[2:].partition("/")
            if authority:
                raise ValueError(f"DNS servers in a target are not supported: {text!r}")
        parts = urlsplit(f"http://{rest}")
        bad = f"a DNS target must look like dns:///host:port, got {text!r}"
        try:
            port = parts.port
        except ValueError:  # (urllib's "Port could not be cast to integer value")
            raise ValueError(f"{bad}: bad port") from None
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ValueError(bad)
        if port == 0:
            raise ValueError(f"{bad}: port 0, which no server listens on")
        # What getaddrinfo does to the name first (IDNA): an empty or over-long
        # label would surface as a bare UnicodeError from the first call; a space
        # would go to the resolver as it is.
        problem = host_name_problem(parts.hostname)
        if problem is not None:
            raise ValueError(f"{parts.hostname!r} in {text!r} is not a valid host name: {problem}")
        return cls(parts.hostname, port)

    @property
    def url(self) -> str:
        """The target as written."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"dns:///{host}:{self.port}"


def parse_grpc_targets(
    grpc_url: str | Sequence[str] | None,
) -> tuple[GrpcTarget, ...] | DnsTarget | None:
    """The pool a ``grpc_url`` argument asks for; ``None`` for one plain URL.

    Checks types and syntax (TypeError / ValueError) before anything connects.
    """
    if grpc_url is None:
        return None
    if isinstance(grpc_url, str):
        if grpc_url.startswith("dns:"):
            return DnsTarget.parse(grpc_url)
        return None
    if isinstance(grpc_url, bytes | bytearray) or not isinstance(grpc_url, Sequence):
        raise TypeError("grpc_url must be a str, a sequence of str, or None")
    if not grpc_url:
        raise ValueError("grpc_url must list at least one endpoint")
    targets = []
    for url in grpc_url:
        if not isinstance(url, str):
            raise TypeError(f"every grpc_url endpoint must be a str, got {url!r}")
        targets.append(GrpcTarget.from_url(url))
    if len(set(targets)) != len(targets):
        raise ValueError("grpc_url lists an endpoint twice")
    return tuple(targets)


def check_affinity_header(header: str | None) -> str | None:
    """Validate the ``affinity_header`` argument (``None`` turns affinity keys off)."""
    if header is None:
        return None
    if not isinstance(header, str):
        raise TypeError("affinity_header must be a str or None")
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")
    if not header or not set(header) <= allowed:
        raise ValueError(
            "affinity_header must be a lower-case HTTP/2 header name "
            f"(letters, digits, '-', '_', '.'), got {header!r}"
        )
    if header.startswith("grpc-") or header.endswith("-bin") or header in _RESERVED_HEADERS:
        raise ValueError(f"affinity_header {header!r} is reserved by gRPC or HTTP/2")
    return header


# Metadata keys grpclib refuses on every call (it sends them itself), the
# api_key's (a second authorization header; a proxy hashing it hashes the key),
# and the connection-specific fields HTTP/2 forbids (RFC 9113 8.2.2).
_RESERVED_HEADERS: Final = frozenset(
    {"te", "content-type", "user-agent", "authorization"}
    | {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)


class _Endpoint:
    """One server of the pool: its transport and what the pool knows about it."""

    __slots__ = (
        "_lock",
        "consecutive",
        "down_until",
        "failures",
        "full_until",
        "held_by_check",
        "opening",
        "state",
        "target",
        "transport",
    )

    def __init__(self, target: GrpcTarget, transport: GrpcTransport) -> None:
        self.target: GrpcTarget = target
        self.transport: GrpcTransport = transport
        self.opening: int = 0  # OpenSession calls in flight here (trio side only)
        self.failures: int = 0
        self.consecutive: int = 0
        self.down_until: float = 0.0  # time.monotonic(); both threads read it
        self.full_until: float = 0.0  # time.monotonic(); trio side only
        self.state: EndpointState = EndpointState.UNKNOWN
        # Its last health check failed or said NOT_SERVING (or one failed since the
        # last that said SERVING): only a check brings it back then (see ``answered``).
        self.held_by_check: bool = False
        self._lock = threading.Lock()

    @property
    def load(self) -> int:
        return self.opening + self.sessions + self.transport.open_streams

    @property
    def sessions(self) -> int:
        """Sessions open here: the transport counts them (keepalive needs it too)."""
        return self.transport.open_sessions

    def idle(self) -> bool:
        """Nothing of the client uses it: no session, no call, no cleanup pending."""
        transport = self.transport
        return (
            self.opening == 0
            and transport.open_sessions == 0
            and transport.open_streams == 0
            and not transport._reapers
            and not transport._unclosed  # (closes sent again: close_later)
        )

    def usable(self, now: float) -> bool:
        state = self.state
        return (
            state is EndpointState.SERVING or state is EndpointState.UNKNOWN
        ) and now >= self.down_until

    def failed(self, check: bool = False) -> None:
        """A call (``check``: a health check) could not reach it."""
        with self._lock:
            self.held_by_check = self.held_by_check or check
            self.failures += 1
            self.consecutive += 1
            wait = backoff(self.consecutive, _BACKOFF_BASE, _BACKOFF_MAX)
            self.down_until = time.monotonic() + wait
            if self.state is not EndpointState.RETIRED:
                self.state = EndpointState.UNREACHABLE

    def reached(self, serving: bool | None = None) -> None:
        """It answered; ``serving`` is what its health check said, if it was one."""
        if (
            serving is None
            and self.consecutive == 0
            and self.state is not EndpointState.UNREACHABLE
        ):
            return  # nothing to change: the common case, kept lock-free
        with self._lock:
            self.consecutive = 0
            self.down_until = 0.0
            if serving is not None:
                self.held_by_check = not serving  # (draining: a check brings it back)
            if self.state is EndpointState.RETIRED:
                return
            if serving is not None:
                self.state = EndpointState.SERVING if serving else EndpointState.NOT_SERVING
            elif self.state is EndpointState.UNREACHABLE:
                self.state = EndpointState.UNKNOWN

    def answered(self) -> None:
        """A session's call got its answer there (trio side). An endpoint out of
        rotation because a call failed (a connection cut under it, its server
        healthy) comes back at once, not at the next health check (up to
        ``health_check_interval`` away); one whose last health check failed or
        said NOT_SERVING waits for a check that says SERVING (a server that
        answers its calls but not its checks, or drains, stays out, as the
        checks say)."""
        if self.state is not EndpointState.UNREACHABLE:
            return  # the common case, kept lock-free
        with self._lock:  # (a check failing meanwhile: it stays out)
            if self.state is EndpointState.UNREACHABLE and not self.held_by_check:
                self.consecutive = 0
                self.down_until = 0.0
                self.state = EndpointState.UNKNOWN

    def listed(self, listed: bool) -> bool:
        """asyncio (a DNS refresh): whether its address is still listed; True if
        that retired it. Under the lock: ``failed``/``reached`` (trio thread)
        check for RETIRED before they write, so a retirement between the two
        would be overwritten."""
        with self._lock:
            retired = self.state is EndpointState.RETIRED
            if listed and retired:
                self.state = EndpointState.UNKNOWN
            elif not listed and not retired:
                self.state = EndpointState.RETIRED
                return True
            return False

    def status(self) -> EndpointStatus:
        return EndpointStatus(
            self.target.url,
            self.state,
            self.sessions + self.opening,
            self.transport.open_streams,
            self.failures,
            full=time.monotonic() < self.full_until,
        )


async def _timed(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """``asyncio.wait_for(coro, timeout)``, but what the coroutine's task ends with is
    always read. Cancelled, Python 3.11's wait_for cancels the task and waits for
    it without reading its outcome: an exception it ended with instead (grpclib
    raises StreamTerminatedError for a stream reset as it was cancelled) was logged
    as "Task exception was never retrieved" at the client's close."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_read_outcome)
    return await asyncio.wait_for(task, timeout)


def _read_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # (read: asyncio then logs nothing of it)


async def _lookup(host: str, port: int) -> list[str]:
    """asyncio: the A/AAAA addresses of ``host``, in the resolver's order, no repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@final
class LiveSessions:
    """The sessions that blocks hold, and their session calls in flight (trio side).

    What the client's close closes (``close_live_sessions``): the sessions held,
    and those still opening once their reply comes; it also waits for the
    ``CloseSession`` of a block that is leaving.
    """

    __slots__ = ("_changed", "closing", "held", "in_flight")

    def __init__(self) -> None:
        self.held: set[Session] = set()
        self.in_flight: int = 0  # OpenSession and a block's own CloseSession calls
        self.closing: bool = False  # the client's close has begun: no new OpenSession
        self._changed: trio.Event | None = None  # only while the close waits

    def changed(self) -> None:
        """One of the calls in flight ended: wake the close waiting for it."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_changed(self) -> None:
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()


@final
class Router:
    """Where sessions go: one endpoint, or a pool of them. Owned by an ``ApiClient``.

    ``open_session`` asks it for a :class:`SessionRoute` per session
    (:func:`bind_session`).
    """

    def __init__(
        self,
        bridge: AsyncioBridge,
        make_transport: Callable[[GrpcTarget], GrpcTransport],
        endpoints: Sequence[GrpcTransport] | DnsTarget,
        *,
        affinity_header: str | None,
        max_message_size: int,
        health_interval: float = 5.0,
        dns_refresh: float = 30.0,
        owned: Sequence[GrpcTransport] = (),
    ) -> None:
        """``owned``: the transports this router closes (all the client made)."""
        self.max_message_size: int = max_message_size
        """The client's, which every endpoint's transport has (for checks before sending)."""
        self._bridge = bridge
        self._make_transport = make_transport
        self._header = affinity_header
        # Affinity keys are to be unique, not secret: no syscall per session (it
        # would also hand the GIL to the loop thread, mid-call).
        self._keys = random.Random(os.urandom(16))
        self._health_interval = health_interval
        self._dns_refresh = dns_refresh
        self._owned: list[GrpcTransport] = list(owned)  # the router closes these
        self._dns: DnsTarget | None = None
        self._endpoints: list[_Endpoint] = []
        # Retired, idle endpoints already out of the list, to close on the next pass.
        self._leaving: list[_Endpoint] = []
        if isinstance(endpoints, DnsTarget):
            self._dns = endpoints
        else:
            self._endpoints = [_Endpoint(t.target, t) for t in endpoints]
        self._health_task: asyncio.Task[None] | None = None
        # Set (asyncio side) once every endpoint has answered its first health check
        # or failed it, or the first round has ended; read on the trio side.
        self._first_checks: asyncio.Event | None = None
        self.first_checks_done: bool = False
        self._resolved_at = -float("inf")
        self._lookup_error: OSError | None = None  # the last lookup's, if it failed
        self._resolving: asyncio.Future[None] | None = None
        self.live_sessions: LiveSessions = LiveSessions()
        """The sessions opened through this router (trio side)."""

    @property
    def closed(self) -> bool:
        """True once the client began closing."""
        return self._bridge.closed

    def check_run(self) -> None:
        """``RuntimeError`` unless called from the client's own trio run."""
        self._bridge.check_run()

    @property
    def failover(self) -> bool:
        """Whether a lost session or call can be placed on another endpoint."""
        return self._dns is not None or len(self._endpoints) > 1

    @property
    def failover_attempts(self) -> int:
        """How often a scoring call may run when its server dies: twice in a pool, else once."""
        return 2 if self.failover else 1

    def endpoints(self) -> tuple[EndpointStatus, ...]:
        """Every endpoint's state and load (a snapshot)."""
        return tuple(ep.status() for ep in self._endpoints)

    def other_ready(self, tried: list[_Endpoint]) -> bool:
        """Whether an endpoint not in ``tried`` is connected, usable and not full
        (a call may go there at once; either thread)."""
        now = time.monotonic()
        return any(
            other not in tried
            and other.usable(now)
            and now >= other.full_until
            and other.transport.connected
            for other in self._endpoints
        )

    def bind_session(self) -> SessionRoute | GrpcTransport:
        """A route for one new session, with a fresh affinity key.

        One endpoint and no affinity key: the endpoint's transport itself (the
        single-server path stays exactly as it was).
        """
        if self._header is None:
            if len(self._endpoints) == 1 and self._dns is None:
                return self._endpoints[0].transport
            return SessionRoute(self, ())
        return SessionRoute(self, ((self._header, f"{self._keys.getrandbits(64):016x}"),))

    # -- placement (trio side) -----------------------------------------------

    def pick(self, exclude: Sequence[_Endpoint] = ()) -> _Endpoint:
        """The endpoint for a new session: the less loaded of two random usable ones.

        Usable first (SERVING or not checked yet, not in backoff); if none is,
        any endpoint out of backoff, then any at all: a call that fails there
        fails as it would on one server. Among those, one that refused a session
        as full within ``_FULL_HOLD`` only when all did, and one neither
        connected nor answering its health checks only when no other is (the
        checks connect every endpoint: one that never speaks gets no session
        while another can take it). Raises
        :class:`ServerUnavailable` when every endpoint was tried already (or DNS
        listed none).
        """
        endpoints = self._endpoints
        if len(endpoints) == 1 and not exclude:
            return endpoints[0]
        now = time.monotonic()
        left = [ep for ep in endpoints if ep not in exclude]
        live = [ep for ep in left if ep.state is not EndpointState.RETIRED]
        candidates = (
            [ep for ep in live if ep.usable(now)]
            or [
                ep
                for ep in live
                if ep.state is not EndpointState.NOT_SERVING and now >= ep.down_until
            ]
            or live
            or left
        )
        if not candidates:
            what = self._dns.url if self._dns is not None else "the endpoint list"
            raise e.ServerUnavailable(f"no endpoint of {what} is left to try")
        if len(candidates) > 1:
            candidates = [ep for ep in candidates if now >= ep.full_until] or candidates
        if len(candidates) > 1:
            # Not one that never answered yet while another can take it (one
            # SERVING whose connection dropped reconnects on demand, as it did).
            candidates = [
                ep
                for ep in candidates
                if ep.transport.connected or ep.state is EndpointState.SERVING
            ] or candidates
        if len(candidates) == 1:
            return candidates[0]
        a, b = random.sample(candidates, 2)
        return b if b.load < a.load else a

    async def ready(self) -> None:
        """Resolve a DNS target the first time (a checkpoint only when it resolves)."""
        if self._dns is not None and not self._endpoints:
            # Nothing sent yet: the client's close need not wait for it.
            await self._bridge.run(self._resolve, abortable=True)
            if not self._endpoints:
                why = self._lookup_error
                raise e.ServerUnavailable(
                    f"{self._dns.url} resolved to no address"
                    if why is None
                    else f"{self._dns.url} could not be resolved: {why}"
                )

    # -- asyncio side ------------------------------------------------------------

    async def _resolve(self) -> None:
        """asyncio: (re)resolve the DNS target; concurrent callers share one lookup.

        The lookup runs in a task of its own: run by the first caller's task, it
        ended for everyone when that caller gave up (cancelled), and the others
        found no endpoint ("resolved to no address").
        """
        await asyncio.shield(self._lookup_task())

    def _lookup_task(self) -> asyncio.Future[None]:
        """asyncio: the lookup in progress, or a new one."""
        task = self._resolving
        if task is None:
            task = self._resolving = asyncio.ensure_future(self._resolve_now())
            task.add_done_callback(self._resolved)
        return task

    def _resolved(self, task: asyncio.Future[None]) -> None:
        if self._resolving is task:
            self._resolving = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Its callers have it, if any wait (a refresh of the health checks' does not).
            dns = self._dns.url if self._dns is not None else "the DNS target"
            log.error("resolving %s failed unexpectedly", dns, exc_info=exc)

    async def _resolve_now(self) -> None:
        dns = self._dns
        assert dns is not None
        loop = asyncio.get_running_loop()
        try:
            addresses = await _lookup(dns.host, dns.port)
        except OSError as exc:
            log.warning("resolving %s failed: %s", dns.url, exc)
            self._lookup_error = exc
            return
        finally:
            self._resolved_at = loop.time()
        self._lookup_error = None
        known = {ep.target.host: ep for ep in self._endpoints}
        endpoints = list(self._endpoints)
        for address in addresses:
            ep = known.get(address)
            if ep is None:
                target = GrpcTarget(address, dns.port, False)
                transport = self._make_transport(target)
                self._owned.append(transport)
                endpoints.append(_Endpoint(target, transport))
                log.info("%s: new endpoint %s", dns.url, target.url)
            else:
                ep.listed(True)
        for ep in endpoints:
            if ep.target.host not in addresses and ep.listed(False):
                # Its open sessions carry on; it only gets no new ones, and is
                # dropped once it has none (_forget_retired).
                log.info("%s: endpoint %s is gone from DNS", dns.url, ep.target.url)
        self._endpoints = endpoints  # replaced whole: the trio side reads it unlocked

    def _forget_retired(self) -> None:
        """asyncio: drop the retired endpoints nothing uses any more; close their connections.

        In two passes, a health interval apart: an idle one first leaves the list
        (no new session can be placed there), and its connection is closed on a
        later pass once it is still idle, so a session the trio side was just
        placing there (read from the old list) is not cut. While DNS lists no live
        endpoint the retired ones stay: ``pick`` still tries them then.
        """
        dns = self._dns
        assert dns is not None
        for ep in list(self._leaving):
            if ep.idle():
                self._leaving.remove(ep)
                self._owned.remove(ep.transport)
                ep.transport._shut()
                log.info("%s: retired endpoint %s dropped", dns.url, ep.target.url)
        endpoints = self._endpoints
        gone = [ep for ep in endpoints if ep.state is EndpointState.RETIRED and ep.idle()]
        if gone and any(ep.state is not EndpointState.RETIRED for ep in endpoints):
            self._endpoints = [ep for ep in endpoints if ep not in gone]  # replaced whole
            self._leaving += gone

    async def first_checks(self) -> None:
        """Start the health checks, and wait, at most ``_FIRST_CHECKS_WAIT``, for
        every endpoint's first answer (a pool's first placement does).

        Until then an endpoint is UNKNOWN, which placement takes as usable: a new
        client put sessions on a draining (NOT_SERVING) server. gRPC's clients
        too take a health-checked endpoint as ready only once it has answered.
        The bound keeps an endpoint that never speaks from holding the first
        session up (its check times out only after the check interval). A DNS
        target that resolved to one address is a pool too: the checks' task
        re-resolves it.
        """

        async def wait() -> None:
            self._start_health()
            done = self._first_checks
            if done is not None:
                try:
                    await asyncio.wait_for(done.wait(), _FIRST_CHECKS_WAIT)
                except TimeoutError:
                    pass
            self.first_checks_done = True

        # A wait, nothing sent: the client's close ends it at once.
        await self._bridge.run(wait, abortable=True)

    def _start_health(self) -> None:
        if not self._bridge.closed and self._health_task is None:
            self._first_checks = asyncio.Event()
            self._health_task = asyncio.ensure_future(self._health_loop())

    def _note_first_checks(self, round_ended: bool = False) -> None:
        """asyncio: after a check, whether every endpoint's first answer is in."""
        done = self._first_checks
        if done is None or done.is_set():
            return
        if round_ended or all(ep.state is not EndpointState.UNKNOWN for ep in self._endpoints):
            done.set()

    async def _health_loop(self) -> None:
        """asyncio: check every endpoint periodically (cancelled when the bridge closes)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            if self._dns is not None and started - self._resolved_at >= self._dns_refresh:
                # Not awaited: a lookup that hangs (a DNS server gone: the resolver's
                # timeouts and retries) held every endpoint's checks up as long. The
                # addresses it finds are checked from the next round on.
                self._lookup_task()
            if self._dns is not None:
                self._forget_retired()
            endpoints = [ep for ep in self._endpoints if ep.transport is not None]
            await self._check_all(endpoints)
            self._note_first_checks(round_ended=True)
            # A cycle every interval: a check that times out (a silent endpoint,
            # up to the interval) no longer delays the next check of every other.
            await self._wait_for_round(started + self._health_interval, set(endpoints))

    async def _check_all(self, endpoints: list[_Endpoint]) -> None:
        results = await asyncio.gather(
            *(self._check(ep) for ep in endpoints), return_exceptions=True
        )
        me = asyncio.current_task()
        for ep, result in zip(endpoints, results, strict=True):
            # A check's own cancellation, this loop not cancelled: a check
            # whose timeout was turned into one (grpclib's swallowed cancels).
            stray = isinstance(result, asyncio.CancelledError) and not (me and me.cancelling())
            if isinstance(result, Exception) or stray:
                # A bug: one check's exception ended the loop of them all, and
                # the pool saw no endpoint change state again. Said, and on.
                log.error(
                    "health check of %s failed unexpectedly (checks go on)",
                    ep.target.url,
                    exc_info=result,
                )
            elif isinstance(result, BaseException):
                raise result

    async def _wait_for_round(self, due: float, checked: set[_Endpoint]) -> None:
        """asyncio: sleep until ``due`` (the next round of checks), starting the
        re-resolutions of a DNS target that come due meanwhile: every
        ``dns_refresh`` seconds, not once per ``health_check_interval`` when that
        is the longer. The addresses they find are checked at once: unchecked
        (not connected), placement passed them over until the next round."""
        loop = asyncio.get_running_loop()
        while (now := loop.time()) < due:
            fresh = [ep for ep in self._endpoints if ep not in checked and ep.transport is not None]
            if fresh:
                checked.update(fresh)
                await self._check_all(fresh)
                continue
            wake = due
            if self._dns is not None:
                resolving = self._resolving
                if resolving is not None:
                    await asyncio.wait((resolving,), timeout=due - now)  # (never cancels it)
                    continue
                if now - self._resolved_at >= self._dns_refresh:
                    self._lookup_task()
                    continue
                wake = min(due, self._resolved_at + self._dns_refresh)
            await asyncio.sleep(wake - now)

    async def _check(self, ep: _Endpoint) -> None:
        try:
            await self._check_once(ep)
        finally:
            self._note_first_checks()

    async def _check_once(self, ep: _Endpoint) -> None:
        sink = _Collect("Check")
        request = encode_string_field(_HEALTH_SERVICE)  # HealthCheckRequest
        progress = _Progress()
        timeout = min(self._health_interval, 5.0)
        if ep.state is EndpointState.UNKNOWN:
            # Its first check connects too (in a cold process, 0.33 s was seen): timed
            # out by a short interval, a healthy endpoint sat out its backoff.
            timeout = max(timeout, _FIRST_CHECK_TIMEOUT)
        try:
            # Waits out the transport's reconnect backoff and tries (where other
            # calls fail at once): the check is what finds the server back.
            await _timed(
                ep.transport._exchange(
                    _HEALTH_CHECK,
                    Cardinality.UNARY_UNARY,
                    request,
                    sink,
                    progress,
                    wait_for_ready=True,
                ),
                timeout,
            )
            status = decode_health_check(sink.items[0]) if sink.items else None
        except GRPCError as exc:
            if exc.status in (Status.UNIMPLEMENTED, Status.NOT_FOUND):
                # A server without the health service (or without this entry) that
                # answers at all is taken as serving.
                ep.reached(serving=True)
            else:
                ep.reached(serving=False)
            return
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            if progress.queued:
                # Never sent: every stream the server allows is taken by this
                # client's own calls. A busy server is no failed one.
                log.debug("health check of %s skipped: its streams are all busy", ep.target.url)
                return
            log.debug("health check of %s timed out", ep.target.url)
            ep.failed(check=True)
            # Calls already sent there would wait out keepalive_time if it froze.
            if ep.transport.probe():
                log.debug("pinging %s: calls in flight there wait on its answer", ep.target.url)
            return
        except Exception as exc:
            log.debug("health check of %s failed: %s", ep.target.url, exc)
            ep.failed(check=True)
            return
        serving = status == HealthCheckResponseServingStatus.SERVING
        ep.reached(serving=serving)

    async def aclose(self) -> None:
        """Stop health checks and close the transports this router made (trio side).

        The transports close together: each waits up to its ``reap_timeout`` for
        the cleanups of abandoned calls, which one after another took N times that.
        """

        async def close() -> None:
            for task in (self._health_task, self._resolving):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            self._health_task = self._resolving = None
            owned = list(self._owned)
            results = await asyncio.gather(
                *(t.close_in_loop() for t in owned), return_exceptions=True
            )
            for transport, result in zip(owned, results, strict=True):
                if isinstance(result, Exception):  # the others still closed
                    log.warning(
                        "closing the channel to %s failed: %s", transport.target.url, result
                    )
                elif isinstance(result, BaseException):
                    raise result

        await self._bridge.run(close, defer_ki=True)


@final
class SessionRoute:
    """The calls of one session: its endpoint and its affinity metadata.

    Quacks like the :class:`GrpcTransport` a :class:`Session` uses. The endpoint
    is chosen by ``OpenSession`` (retried on another endpoint when it cannot reach
    the chosen one, or the chosen one is full) and never changes after that.
    """

    __slots__ = ("_endpoint", "_metadata", "_router")

    def __init__(self, router: Router, metadata: tuple[tuple[str, str], ...]) -> None:
        self._router = router
        self._metadata = metadata
        self._endpoint: _Endpoint | None = None

    @property
    def closed(self) -> bool:
        """True once the client began closing."""
        return self._router.closed

    def check_run(self) -> None:
        """``RuntimeError`` unless called from the client's own trio run."""
        self._router.check_run()

    @property
    def affinity_key(self) -> str | None:
        """The session's affinity key (``None`` when affinity keys are off)."""
        return self._metadata[0][1] if self._metadata else None

    @property
    def url(self) -> str | None:
        """The endpoint the session lives on (``None`` before ``OpenSession``)."""
        return self._endpoint.target.url if self._endpoint is not None else None

    @property
    def open_sessions(self) -> int:
        """Sessions open on this session's connection (keepalive pings while > 0)."""
        return self._current().transport.open_sessions

    @open_sessions.setter
    def open_sessions(self, value: int) -> None:
        self._current().transport.open_sessions = value

    def close_later(self, session_id: str, *, timed_out: bool) -> bool:
        """:meth:`GrpcTransport.close_later` on this session's endpoint, with its
        affinity key."""
        return self._current().transport.close_later(
            session_id, timed_out=timed_out, extra_metadata=self._metadata
        )

    def warn_now(self, what: str) -> bool:
        """:meth:`GrpcTransport.warn_now` of this session's endpoint."""
        return self._current().transport.warn_now(what)

    def first_loss_of_outage(self) -> bool:
        """:meth:`GrpcTransport.first_loss_of_outage` of this session's endpoint."""
        return self._current().transport.first_loss_of_outage()

    def _current(self) -> _Endpoint:
        if self._endpoint is None:
            raise RuntimeError("no OpenSession went through this route yet")
        return self._endpoint

    @property
    def max_message_size(self) -> int:
        """The client's (every endpoint's transport has it)."""
        return self._router.max_message_size

    def check_sendable(self, method: str, request: bytes) -> None:
        """:meth:`GrpcTransport.check_sendable` on this session's endpoint."""
        self._current().transport.check_sendable(method, request)

    async def unary(
        self,
        method: str,
        request: bytes,
        *,
        timeout: float | None = None,
        orphan: Orphan | None = None,
        cleanup: bool = False,
        abortable: bool = False,
        abort_unsent: bool = False,
        progress: _Progress | None = None,
    ) -> bytes:
        """A unary call of this session, on its endpoint; see :meth:`GrpcTransport.unary`."""
        if method == "OpenSession":
            return await self._open(request, timeout, orphan, abort_unsent)
        ep = self._current()
        try:
            reply = await ep.transport.unary(
                method,
                request,
                timeout=timeout,
                orphan=orphan,
                cleanup=cleanup,
                abortable=abortable,
                abort_unsent=abort_unsent,
                extra_metadata=self._metadata,
                progress=progress,
            )
        except e.ServerUnavailable:
            ep.failed()
            raise
        ep.answered()
        return reply

    async def _open(
        self,
        request: bytes,
        timeout: float | None,
        orphan: Orphan | None,
        abort_unsent: bool,
        progress: _Progress | None = None,
    ) -> bytes:
        if timeout is not None:
            # Retriable if it ran out before any attempt's request went out.
            progress = _Progress()
            with deadline(timeout, "OpenSession", unsent=progress.unsent):
                return await self._open(request, None, orphan, abort_unsent, progress)
        router = self._router
        tried: list[_Endpoint] = []  # not to be picked again (but see "left")
        unreachable: list[_Endpoint] = []  # failed in this call: never again
        # Left while they connected, for one that was ready (connected, and not
        # full or its hold passed): when every endpoint has been tried, the call
        # comes back to one (at most _COMEBACKS times), and may leave it again.
        left: list[_Endpoint] = []
        comebacks = 0
        # An endpoint's refusal as full: what the caller gets if every endpoint
        # failed, rather than the last one's being unreachable (score_many waits
        # in line on RESOURCE_EXHAUSTED; a ServerUnavailable ends it).
        refused: e.ResourceExhausted | None = None
        if router._dns is not None:
            await router.ready()
        if router.failover and not router.first_checks_done:
            await router.first_checks()
        while True:
            ep = self._endpoint = router.pick(tried)
            ep.opening += 1  # counted while opening, so concurrent picks see it
            attempt = _Progress()
            if router.failover and not ep.transport.connected:
                attempt.hedge = partial(router.other_ready, [ep, *unreachable])
            try:
                reply = await ep.transport.unary(
                    "OpenSession",
                    request,
                    orphan=orphan,
                    abort_unsent=abort_unsent,
                    extra_metadata=self._metadata,
                    progress=attempt,
                )
            except BaseException as exc:
                # Either way no session is left there (one the server made before
                # the call failed is closed by ``orphan``): nothing is lost by
                # opening it on another endpoint.
                if attempt.left:  # no failure: it is slow, or it never speaks
                    level, why = logging.DEBUG, "is still connecting"
                    left.append(ep)
                elif isinstance(exc, e.ServerUnavailable):
                    ep.failed()
                    level, why = logging.INFO, "is unreachable"
                    unreachable.append(ep)
                elif isinstance(exc, e.ResourceExhausted):
                    # Full (max sessions) is no failure: it stays in rotation and
                    # takes sessions again once some close (which can be often:
                    # DEBUG).
                    level, why = logging.DEBUG, "refused a new session"
                    ep.full_until = time.monotonic() + _FULL_HOLD
                    refused = exc
                else:
                    raise
                tried.append(ep)
                if not router.failover:
                    raise
                if len(tried) >= len(router._endpoints):
                    if not left or comebacks >= _COMEBACKS:
                        if refused is not None and refused is not exc:
                            raise refused from None
                        raise
                    # Every endpoint tried: back to one this call left (pick() gives
                    # it, or a full one whose hold has passed), waiting for its
                    # connection, or for a full one's hold to pass.
                    comebacks += 1
                    again = left.pop(0)
                    tried = [*unreachable, *left]
                    log.log(
                        level,
                        "OpenSession: %s %s (%s); back to %s",
                        ep.target.url,
                        why,
                        exc,
                        again.target.url,
                    )
                    continue
                log.log(
                    level,
                    "OpenSession: %s %s (%s); trying another endpoint",
                    ep.target.url,
                    why,
                    exc,
                )
                continue
            finally:
                ep.opening -= 1
                # (Not for an attempt given up on between two of its own: its
                # last one was never processed, nothing of it is on the server.)
                if progress is not None and not attempt.unsent():
                    progress.mark_unsettled()  # (trio side: sent for good, no count)
            ep.reached()
            ep.full_until = 0.0  # it took a session: it has room again
            return reply

    async def unary_in_loop(self, method: str, request: bytes) -> bytes:
        """asyncio: a unary call of this session (for cleanups on the loop)."""
        ep = self._current()
        return await ep.transport.unary_in_loop(method, request, extra_metadata=self._metadata)

    def server_stream(self, method: str, request: bytes, *, max_items: int) -> StreamCall:
        """A streaming call of this session; see :meth:`GrpcTransport.server_stream`."""
        ep = self._current()
        cm = ep.transport.server_stream(
            method, request, max_items=max_items, extra_metadata=self._metadata
        )
        if not self._router.failover:
            return cm  # nothing to learn from a failure: one endpoint
        return _Observed(cm, ep)


@final
class _Observed:
    """Marks the endpoint failed when a stream on it finds the server gone.

    Only the stream's own failure counts: a ``ServerUnavailable`` raised by the
    block's body (another client's call, say) says nothing about this endpoint.
    A class, not an ``@asynccontextmanager``: see ``StreamBlock``.
    """

    __slots__ = ("_cm", "_ep", "_rx")

    def __init__(self, cm: StreamCall, ep: _Endpoint) -> None:
        self._cm = cm
        self._ep = ep
        self._rx: BatchReceiver[bytes] | None = None

    @property
    def sent(self) -> bool:
        """See :attr:`StreamCall.sent`."""
        return self._cm.sent

    @property
    def server_ended(self) -> bool:
        """See :attr:`StreamCall.server_ended`."""
        return self._cm.server_ended

    @trio.lowlevel.enable_ki_protection
    async def __aenter__(self) -> BatchReceiver[bytes]:
        try:
            rx = self._rx = await self._cm.__aenter__()
        except e.ServerUnavailable:
            self._ep.failed()
            raise
        return rx

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lost = False
        try:
            await self._cm.__aexit__(exc_type, exc, tb)
        except e.ServerUnavailable:
            lost = True
            raise
        finally:
            # The stream is settled by now: its error, if any, is the RPC's own.
            rx = self._rx
            if lost or (rx is not None and isinstance(rx.error, e.ServerUnavailable)):
                self._ep.failed()
            elif self._cm.server_ended:
                self._ep.answered()
