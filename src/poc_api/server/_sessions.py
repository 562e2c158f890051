"""Session store: id -> positions, with a session limit and idle eviction.

All methods are called from the server's event loop thread; a lock only guards
the id set that ``ServerState`` snapshots read from other threads.
"""

from __future__ import annotations

import enum
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import final

__all__ = ["ErrorKind", "Session", "SessionError", "SessionStore"]


class ErrorKind(enum.Enum):
    """Why a request was refused; each maps to one gRPC status."""

    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    INVALID_ARGUMENT = "invalid_argument"
    OUT_OF_RANGE = "out_of_range"
    RESOURCE_EXHAUSTED = "resource_exhausted"


class SessionError(Exception):
    """A request that breaks a protocol rule (proto/PROTOCOL.md §2)."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@final
class Session:
    """One server-side sequence of positions (its "KV cache")."""

    __slots__ = ("busy", "id", "last_used", "tokens")

    def __init__(self, session_id: str, now: float) -> None:
        self.id = session_id
        self.tokens: list[int] = []
        self.last_used = now
        self.busy = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def check_append(self, offset: int, truncating: bool, count: int, max_context: int) -> None:
        """Validate appending ``count`` positions at ``offset`` (raises SessionError)."""
        length = len(self.tokens)
        if offset > length or (offset < length and not truncating):
            raise SessionError(
                ErrorKind.FAILED_PRECONDITION,
                f"offset {offset} does not match session length {length}"
                + ("" if offset > length else " (set truncating to rewind)"),
            )
        if offset + count > max_context:
            raise SessionError(
                ErrorKind.OUT_OF_RANGE,
                f"{offset} + {count} positions exceed the context window of {max_context}",
            )

    def append_at(self, offset: int, items: Sequence[int]) -> None:
        """Drop positions >= offset, then append ``items`` (call check_append first)."""
        del self.tokens[offset:]
        self.tokens.extend(items)


@final
class SessionStore:
    """Live sessions, bounded by ``max_sessions``, evicted after ``idle_timeout`` s idle."""

    def __init__(
        self,
        max_sessions: int,
        idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def ids(self) -> frozenset[str]:
        """Snapshot of live session ids (safe from any thread)."""
        with self._lock:
            return frozenset(self._sessions)

    def open(self) -> Session:
        """Create an empty session, or raise RESOURCE_EXHAUSTED at the limit."""
        self.evict_idle()
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise SessionError(
                    ErrorKind.RESOURCE_EXHAUSTED,
                    f"too many open sessions (max {self.max_sessions})",
                )
            session = Session("sess-" + secrets.token_hex(8), self._clock())
            self._sessions[session.id] = session
            return session

    def close(self, session_id: str) -> bool:
        """Forget a session; unknown ids are fine. Returns whether it existed."""
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def get(self, session_id: str) -> Session:
        """The live session with this id, or raise NOT_FOUND."""
        self.evict_idle()
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SessionError(ErrorKind.NOT_FOUND, f"unknown session {session_id!r}")
        return session

    @contextmanager
    def use(self, session_id: str) -> Iterator[Session]:
        """Hold a session for one request: it is not evicted while in use.

        Requests on one session are serialised by refusing a second one while the
        first runs: interleaved appends would make positions meaningless.
        """
        session = self.get(session_id)
        if session.busy:
            raise SessionError(
                ErrorKind.FAILED_PRECONDITION, f"session {session_id!r} is busy with a request"
            )
        session.busy += 1
        try:
            yield session
        finally:
            session.busy -= 1
            session.last_used = self._clock()

    def evict_idle(self) -> list[str]:
        """Drop sessions idle for longer than ``idle_timeout`` (0: never); returns their ids."""
        if not self.idle_timeout:
            return []  # 0 is "off", as for the server's other knobs
        deadline = self._clock() - self.idle_timeout
        with self._lock:
            stale = [s.id for s in self._sessions.values() if not s.busy and s.last_used < deadline]
            for sid in stale:
                del self._sessions[sid]
        return stale
