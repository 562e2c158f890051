"""Configuration, observable state, and the runtime shared by the gRPC and HTTP sides."""

from __future__ import annotations

import asyncio
import hmac
import math
import threading
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any, Final, cast, final

import attrs

from .._types import _sequence
from ._health import HealthStatus
from ._model import DEFAULT_CONCEPTS, NGramModel, Readout, default_model
from ._sessions import SessionStore

__all__ = ["Runtime", "ServerConfig", "ServerState", "Stats"]


def _concepts(value: Iterable[str]) -> tuple[str, ...]:
    # A typed converter, not a bare ``tuple``, whose TypeVar mypy's attrs plugin
    # cannot solve: ``ServerConfig(concepts=["a", "b"])`` type-checks under --strict.
    # A str is iterable, but concepts="vowel" is not five one-letter concepts:
    # refused as the client's ReadoutManifest refuses it.
    return cast("tuple[str, ...]", _sequence("concepts", value, "str"))


def _check_concepts(_: object, __: object, value: tuple[str, ...]) -> None:
    if not value or not all(isinstance(c, str) and c for c in value):
        raise ValueError("concepts must be a non-empty tuple of names")


def _model_name(_: object, attribute: attrs.Attribute[str], value: object) -> None:
    # An empty (or blank) name is one no client can ask for: /models lists it, and
    # chat clients that take the listed id send "" (refused as no model at all).
    if not isinstance(value, str):
        raise TypeError(f"{attribute.name} must be a str")
    if not value.strip():
        raise ValueError(f"{attribute.name} must not be empty")


def _non_negative_finite(_: object, attribute: attrs.Attribute[float], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{attribute.name} must be a number")
    # As a float: an int past float's range compares below math.inf, then fails
    # every use (OverflowError in the eviction loop, in each OpenSession).
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not 0 <= seconds < math.inf:
        raise ValueError(f"{attribute.name} must be >= 0 and finite, got {value}")


def _port_pair(_: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int")
    # HTTP on the port, gRPC on the next one: both must be ports.
    if not 0 <= value <= 65534:
        raise ValueError(f"{attribute.name} must be 0 (any free pair) or 1-65534, got {value}")


@final
@attrs.frozen(kw_only=True)
class ServerConfig:
    """How to run a :class:`ReferenceServer`.

    ``port = 0`` picks a free pair of ports (HTTP on ``p``, gRPC on ``p + 1``).
    ``api_key`` set means every request must carry ``authorization: Bearer <key>``.
    ``readout = False`` makes the manifest 404 and readout ranges yield no vectors.
    A session unused for ``idle_timeout`` seconds is evicted (0: never).

    Simulated GPU time, both 0 (off) by default: ``prefill_delay_us`` microseconds per
    position a session takes in (text tokens and image placeholders alike) and
    ``token_delay_ms`` milliseconds per decoded token (``Generate`` and the
    OpenAI-compatible completions alike). The server waits with
    ``asyncio.sleep``, so it burns no CPU, and concurrent requests overlap as if the
    GPU had unlimited batch capacity; a request cancelled mid-wait stops at once (an
    HTTP completion when its client closes the connection, or half-closes it while
    the decode runs: a read cannot tell the two apart).
    """

    host: str = "127.0.0.1"
    port: int = attrs.field(default=0, validator=_port_pair)
    # Shown as set or not, never itself: a config's repr lands in logs and test output.
    api_key: str | None = attrs.field(
        default=None, repr=lambda key: "'<redacted>'" if key else repr(key)
    )
    readout: bool = True
    seed: int = 0
    # At least 1 each: a server of 0 would refuse every session or request.
    max_sessions: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    idle_timeout: float = attrs.field(default=600.0, validator=_non_negative_finite)
    # Positions are uint32 on the wire: a window past that was reported modulo 2**32
    # (OpenSessionResponse.max_length), and clients refused prompts that fit.
    max_context: int = attrs.field(
        default=8192, validator=[attrs.validators.ge(1), attrs.validators.le(2**32 - 1)]
    )
    max_message_size: int = attrs.field(default=64 * 1024 * 1024, validator=attrs.validators.ge(1))
    ignore_eos: bool = False
    n_layers: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    concepts: tuple[str, ...] = attrs.field(
        default=DEFAULT_CONCEPTS, converter=_concepts, validator=_check_concepts
    )
    model_name: str = attrs.field(default="poc-reference", validator=_model_name)
    prefill_delay_us: float = attrs.field(default=0.0, validator=_non_negative_finite)
    token_delay_ms: float = attrs.field(default=0.0, validator=_non_negative_finite)
    #: At most this many simulated prefills run at once (0: unlimited). With 1 the
    #: server behaves like a GPU that prefills one request at a time, so its
    #: throughput is bounded and adding servers adds capacity (the scale-out bench).
    prefill_slots: int = attrs.field(default=0, validator=attrs.validators.ge(0))


@final
@attrs.frozen(kw_only=True)
class ServerState:
    """A consistent snapshot of what the server has seen (for tests and debugging).

    ``resets`` lists ``(stream_id, h2_error_code)`` for the RST_STREAMs clients sent
    (8 is CANCEL), the latest :data:`KEPT_RECORDS` of them; ``cancelled_streams``
    counts Generate calls stopped by one.
    ``tokens_appended`` counts tokens sessions took in (a refused call adds none);
    ``generate_calls`` counts every Generate, refused or not.
    """

    session_ids: frozenset[str]
    connections_total: int
    connections_open: int
    cancelled_streams: int
    resets: tuple[tuple[int, int], ...]
    tokens_appended: int
    generate_calls: int
    rpc_counts: dict[str, int]
    http_requests: dict[str, int]
    train_samples: int
    tokens_decoded: int
    #: gRPC payload bytes the server has written on Generate streams (grows while
    #: a stream flows, stands still while the client's flow-control window is shut).
    bytes_streamed: int = 0
    #: ``(method, key)`` for the latest calls that carried an ``x-session-affinity``
    #: header (the latest KEPT_RECORDS): what a proxy hashing on it would have seen.
    affinity: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (sets and tuples become sorted lists)."""
        return {
            "session_ids": sorted(self.session_ids),
            "connections_total": self.connections_total,
            "connections_open": self.connections_open,
            "cancelled_streams": self.cancelled_streams,
            "resets": [list(r) for r in self.resets],
            "tokens_appended": self.tokens_appended,
            "generate_calls": self.generate_calls,
            "rpc_counts": dict(self.rpc_counts),
            "http_requests": dict(self.http_requests),
            "train_samples": self.train_samples,
            "tokens_decoded": self.tokens_decoded,
            "bytes_streamed": self.bytes_streamed,
            "affinity": [list(a) for a in self.affinity],
        }


#: Records of ``resets`` and ``affinity`` a server keeps (the latest).
KEPT_RECORDS: Final = 100_000


@final
class Stats:
    """Mutable counters, written on the server thread and read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections_total = 0
        self.connections_open = 0
        self.cancelled_streams = 0
        # Bounded: a server that runs for days under cancelling clients must not grow.
        self.resets: deque[tuple[int, int]] = deque(maxlen=KEPT_RECORDS)
        self.tokens_appended = 0
        self.generate_calls = 0
        self.rpc_counts: Counter[str] = Counter()
        self.http_requests: Counter[str] = Counter()
        self.train_samples = 0
        self.tokens_decoded = 0
        self.bytes_streamed = 0
        self.affinity: deque[tuple[str, str]] = deque(maxlen=KEPT_RECORDS)

    def connection_opened(self) -> None:
        with self._lock:
            self.connections_total += 1
            self.connections_open += 1

    def connection_closed(self) -> None:
        with self._lock:
            self.connections_open -= 1

    def stream_reset(self, stream_id: int, error_code: int) -> None:
        with self._lock:
            self.resets.append((stream_id, error_code))

    def stream_cancelled(self) -> None:
        with self._lock:
            self.cancelled_streams += 1

    def rpc(self, method: str, affinity: str | None = None) -> None:
        with self._lock:
            self.rpc_counts[method] += 1
            if affinity is not None:
                self.affinity.append((method, affinity))

    def generate(self) -> None:
        with self._lock:
            self.generate_calls += 1

    def appended(self, n: int) -> None:
        with self._lock:
            self.tokens_appended += n

    def decoded(self, n: int) -> None:
        with self._lock:
            self.tokens_decoded += n

    def streamed(self, n: int) -> None:
        with self._lock:
            self.bytes_streamed += n

    def http(self, path: str) -> None:
        with self._lock:
            self.http_requests[path] += 1

    def trained(self, n: int) -> None:
        with self._lock:
            self.train_samples += n

    def snapshot(self, session_ids: frozenset[str]) -> ServerState:
        with self._lock:
            return ServerState(
                session_ids=session_ids,
                connections_total=self.connections_total,
                connections_open=self.connections_open,
                cancelled_streams=self.cancelled_streams,
                resets=tuple(self.resets),
                tokens_appended=self.tokens_appended,
                generate_calls=self.generate_calls,
                rpc_counts=dict(self.rpc_counts),
                http_requests=dict(self.http_requests),
                train_samples=self.train_samples,
                tokens_decoded=self.tokens_decoded,
                bytes_streamed=self.bytes_streamed,
                affinity=tuple(self.affinity),
            )


@final
class Runtime:
    """Everything a request handler needs: config, model, sessions, counters."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model: NGramModel = default_model()
        self.readout: Readout | None = (
            Readout(config.concepts, config.n_layers) if config.readout else None
        )
        self.store = SessionStore(config.max_sessions, config.idle_timeout)
        self.stats = Stats()
        self.train_jobs = 0
        self.health = HealthStatus()
        self.prefill_slots: asyncio.Semaphore | None = (
            asyncio.Semaphore(config.prefill_slots) if config.prefill_slots else None
        )

    def state(self) -> ServerState:
        """Snapshot of the observable state (thread-safe)."""
        return self.stats.snapshot(self.store.ids())

    def authorized(self, header: str | None) -> bool:
        """Whether an ``authorization`` header value passes the configured key."""
        key = self.config.api_key
        if not key:
            return True
        # The scheme is case-insensitive (RFC 9110 §11.1): "bearer k" is "Bearer k".
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant-time compare: the key is a secret, however toy the server.
        return hmac.compare_digest(token.strip().encode(), key.encode())

    def manifest(self) -> dict[str, Any] | None:
        """The readout manifest, or None when readout is disabled."""
        if self.readout is None:
            return None
        return {
            "concepts": list(self.readout.concepts),
            "layers": list(range(self.readout.n_layers)),
        }
