"""An autojumping ``trio.testing.MockClock`` held while poc_api waits for its server.

A MockClock with ``autojump_threshold`` (pytest-trio's ``autojump_clock``: 0)
jumps to the next deadline as soon as every task has been blocked that long. It
cannot see I/O in flight in another thread or process, and poc_api's always is:
a gRPC call waits for the loop thread, an HTTP call for a server. Jumping then,
every timeout of the call fires at once, a cancelled call's bounded cleanup is
cut short, and the client's exit leaves its thread behind.

trio's docs ask for a threshold that avoids such false alarms "where some I/O is
in flight". poc_api knows when its own is, so while it waits, :class:`hold_clock`
holds the clock: its threshold goes up to :data:`HOLD_SECONDS` of real time, and
its ``rate`` to 1, so that virtual time flows as real time does while the I/O
runs (an agent that keeps calling never lets the run idle, and a deadline around
it must still come). The user's values come back when the last wait ends.
Between poc_api's calls, the user's sleeps and timeouts jump as before; a server
that never answers still times out, after the run has been idle that long. A
clock that does not autojump, and any other clock, is left alone, at the cost
of one ``current_clock()`` per wait.

Also :class:`FairSlice`: how often a stream's reader that finds events ready
lets other tasks run (in real time, whatever the clock).
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, final

import trio

if TYPE_CHECKING:
    from trio.testing import MockClock

__all__ = ["FAIR_SLICE", "HOLD_SECONDS", "FairSlice", "autojumping", "hold_clock"]

# Real seconds the whole run must sit idle, while poc_api waits, before a held
# clock jumps: far above a test server's answer, low enough that a test of a
# silent server still ends soon.
HOLD_SECONDS = 1.0


def _mock_clock() -> MockClock | None:
    """This run's clock if it is a MockClock.

    trio.testing is not imported for it (it imports pytest's internals: 40 ms of
    every ``import poc_api``): a program that never imported it has no MockClock.
    """
    testing = sys.modules.get("trio.testing")
    if testing is None:
        return None
    clock = trio.lowlevel.current_clock()
    return clock if isinstance(clock, testing.MockClock) else None


def autojumping() -> bool:
    """Whether this run's clock is a MockClock that jumps by itself (held or not)."""
    clock = _mock_clock()
    return clock is not None and clock.autojump_threshold < math.inf


@final
class _Hold:
    __slots__ = ("count", "held", "rate", "threshold")

    def __init__(self) -> None:
        self.count = 0  # waits in progress
        self.held = False  # the clock's values are the hold's (the user's saved)
        self.threshold = 0.0
        self.rate = 0.0


_HOLDS: trio.lowlevel.RunVar[_Hold | None] = trio.lowlevel.RunVar(
    "poc_api_clock_hold", default=None
)


@final
class hold_clock:
    """``with hold_clock():`` around a wait for the loop thread or a server.

    Nests, and counts across tasks: the clock's own threshold and rate come
    back when the last hold of the run ends (each unless someone set another
    one meanwhile; one set to the hold's own value, 1 s or rate 1, cannot be
    told from it and is undone too).
    A class, not a ``@contextmanager``: it runs on every call's path, and its
    enter and exit must not be split by a Ctrl-C.
    """

    __slots__ = ("_clock",)

    def __init__(self) -> None:
        self._clock: MockClock | None = None

    @trio.lowlevel.enable_ki_protection
    def __enter__(self) -> None:
        clock = _mock_clock()
        if clock is None:
            return
        hold = _HOLDS.get()
        if hold is None:
            hold = _Hold()
            _HOLDS.set(hold)
        # At every wait, not only the first: the user may lower the threshold while
        # waits are in progress (trio lets it change at any time), and a stream
        # read on and on would otherwise leave it lowered for good.
        if clock.autojump_threshold < HOLD_SECONDS:
            if not hold.held:
                hold.held = True
                hold.rate = clock.rate
            hold.threshold = clock.autojump_threshold
            clock.autojump_threshold = HOLD_SECONDS
        if hold.held and clock.rate < 1.0:
            hold.rate = clock.rate
            clock.rate = 1.0
        hold.count += 1
        self._clock = clock

    @trio.lowlevel.enable_ki_protection
    def __exit__(self, *exc_info: object) -> None:
        clock, self._clock = self._clock, None
        if clock is None:
            return
        hold = _HOLDS.get()
        assert hold is not None and hold.count > 0, "hold_clock released more than held"
        hold.count -= 1
        if hold.count or not hold.held:
            return
        hold.held = False
        # The user's values back, unless they set others of their own meanwhile.
        if clock.autojump_threshold == HOLD_SECONDS:
            clock.autojump_threshold = hold.threshold
        if clock.rate == max(hold.rate, 1.0):
            clock.rate = hold.rate


# Longest a stream's iteration runs on events already received without letting
# other tasks run (seconds): one trip through the scheduler per slice costs ~0.5 %.
FAIR_SLICE = 0.001


@final
class FairSlice:
    """When a stream's reader last let other tasks run (``GenerateStream``,
    ``ChatStream``).

    An event already received comes out with no wait, so with no trip through
    trio's scheduler: a consumer slower than the server always finds one ready,
    and would hold trio's only thread for as long as the server keeps ahead
    (other tasks, and deadlines, wait meanwhile). The reader takes one
    (``cancel_shielded_checkpoint``) whenever :meth:`due` says so. Not an async
    method: it runs on every event, and a coroutine each would cost more.
    """

    __slots__ = ("_yielded",)

    def __init__(self) -> None:
        self._yielded = time.perf_counter()

    def due(self) -> bool:
        """Whether over ``FAIR_SLICE`` has passed since the last trip (counted
        from now when it has: the caller takes one)."""
        now = time.perf_counter()
        if now - self._yielded > FAIR_SLICE:
            self._yielded = now
            return True
        return False
