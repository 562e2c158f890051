"""The trio <-> asyncio bridge: grpclib's asyncio loop, in a thread the client owns.

grpclib only runs on asyncio. An :class:`AsyncioBridge` starts a plain stdlib
asyncio event loop in a dedicated daemon thread and offers the trio side two
operations:

* :meth:`AsyncioBridge.run` — await an asyncio coroutine from trio. Cancelling
  the trio scope cancels the asyncio task and waits (shielded, bounded) until it
  has finished its cleanup, so an RPC's stream reset is on the wire before
  ``run`` raises.
* :meth:`AsyncioBridge.stream` — run an asyncio *producer* that pushes items into
  a bounded buffer which the trio side drains in batches.

Every crossing between the threads goes through a :class:`_Mailbox`: the first
message posted to an empty mailbox wakes the other thread; messages posted
before it has woken ride along. On Linux a wake-up is one write to an eventfd
the other side waits on (the loop as a reader, trio in a system task of the
bridge's own); elsewhere it is ``call_soon_threadsafe`` or
``TrioToken.run_sync_soon``, whose socket pairs and, on the trio side, extra
task hop cost about a quarter more CPU per round trip. Many calls and streams
finishing in the same instant cost one wake-up, and a stream that produces
faster than trio drains costs one wake-up per batch, not per item. One thing
skips the mailbox on Linux: a :meth:`~AsyncioBridge.run` caller waits on an
eventfd of its own (from a small reused set), so trio's I/O wait wakes it
directly, in the scheduler pass that sees the call finish, instead of waking
the wake-up task that then sets the caller's event for the next pass. Shared
state is guarded by locks, so it stays correct without the GIL too.

Signals are blocked in the loop thread: Ctrl-C only ever lands in the trio
thread, where trio turns it into ``KeyboardInterrupt`` at a checkpoint, and
nothing the library holds on the asyncio side can swallow it. Importing this
module changes nothing in asyncio: no policy, no patched functions.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import os
import select
import selectors
import signal
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import partial
from typing import Any, Final, Generic, TypeAlias, TypeVar, final

import sniffio
import trio

from ._clock import hold_clock
from ._errors import PocApiError, check_run, closed_under_call, protected_asynccontextmanager

__all__ = ["AsyncioBridge", "BatchReceiver", "Sink", "open_bridge"]

log = logging.getLogger("poc_api.grpc")

T = TypeVar("T")

# Signals that must reach the trio (main) thread, never the loop thread.
_BLOCKED_SIGNALS = (
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
    if sys.platform != "win32"
    else set()
)


# The least time the client's close gives its loop thread to stop (its tasks
# cancelled, its executor shut down), whatever the cancel_timeout.
_STOP_MIN = 1.0

# One eventfd per direction where there are eventfds (Linux); tests turn this off
# to run the portable path too.
_USE_EVENTFD = hasattr(os, "eventfd")
# At most this many eventfds per bridge for run() calls to wait on (_take_fd).
_MAX_CALL_FDS = 32

# A busy trio (tasks runnable, so its I/O check does not block) releases and
# retakes the GIL at every check, and CPython then never lets a thread that waits
# for the GIL (woken from select, or back from any syscall) take it: each release
# restarts that thread's wait for a switch (5 ms). The loop thread could wait
# seconds with replies in hand. When it has made no progress for this long, and is
# not idle in select, trio sleeps to hand it over until it is back in select.
_GIL_STARVED_AFTER = 0.002
_GIL_HANDOVER_STEP = 0.0001
_GIL_HANDOVER_MAX = 0.002


class _Mailbox:
    """Thread-safe queue of callbacks run in another thread, one wake-up per batch.

    Posting never wakes the other thread by itself: :meth:`flush` does, and the
    posting thread calls it right before it blocks (trio: ``before_io_wait``;
    asyncio: its selector's ``select``). A thread woken while the poster still
    holds the GIL would only go back to sleep waiting for it, and on a VM each
    cross-CPU wake-up is dear; posted so, one wake-up also carries everything
    posted in that scheduler pass.
    """

    __slots__ = ("_armed", "_items", "_lock", "_wake")

    def __init__(self, wake: Callable[[Callable[[], None]], object]) -> None:
        self._lock = threading.Lock()
        self._items: list[Callable[[], None]] = []
        self._armed = False  # items wait that the other side was not woken for
        self._wake = wake

    def post(self, fn: Callable[[], None]) -> None:
        """Queue ``fn``; the next :meth:`flush` wakes the other side."""
        with self._lock:
            self._items.append(fn)
            if len(self._items) == 1:
                self._armed = True

    def flush(self) -> None:
        """Wake the other side if something was posted since it last ran.

        Raises whatever ``wake`` raises when the other side is gone
        (``RuntimeError`` for a closed loop, ``trio.RunFinishedError``); the
        queued callbacks are then dropped.
        """
        if not self._armed:  # unlocked peek: set only by this thread's posts
            return
        with self._lock:
            self._armed = False
        try:
            self._wake(self._run)
        except BaseException:
            with self._lock:
                # Nobody will run these; forget them so a later post wakes again.
                self._items.clear()
            raise

    def drop(self) -> None:
        """Forget what is queued (the other side will never run it)."""
        with self._lock:
            self._items.clear()
            self._armed = False

    def _run(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for fn in items:
            try:
                fn()
            except Exception:  # pragma: no cover - callbacks here never raise
                log.exception("poc_api bridge callback failed")


#: A call's outcome: (result, returned, error).
_Outcome: TypeAlias = tuple[Any, bool, BaseException | None]


class _Call:
    """One coroutine crossing to asyncio; its outcome crosses back."""

    __slots__ = (
        "aborted",
        "cancel_requested",
        "detach",
        "done",
        "error",
        "fd",
        "finished",
        "may_abort",
        "on_done",
        "result",
        "returned",
        "task",
    )

    def __init__(
        self,
        on_done: Callable[[_Call], None] | None = None,
        detach: Callable[[asyncio.Task[Any]], bool] | None = None,
        fd: int = -1,
    ) -> None:
        self.on_done = on_done
        self.detach = detach
        # The outcome reaches trio as a write to this eventfd of the bridge's (when
        # >= 0), or else as ``done.set`` through the mailbox.
        self.fd = fd
        self.done = trio.Event()
        self.finished = False
        self.result: Any = None
        self.returned = False  # the coroutine returned ``result``
        self.error: BaseException | None = None
        self.task: asyncio.Task[Any] | None = None
        self.cancel_requested = False  # by its caller: it ends as cancelled
        self.aborted = False  # by the client's close: it ends as closed (abort_calls)
        # Asked on the loop when the close aborts a running call: False, it runs on.
        self.may_abort: Callable[[], bool] | None = None


@final
class StreamBlock(Generic[T]):
    """The block of :meth:`AsyncioBridge.stream`.

    A class, not an ``@asynccontextmanager``: an async generator per call costs
    time, and trio frees each one through a weakref callback, where CPython
    drops a Ctrl-C (python/cpython#95959).
    """

    __slots__ = ("_bridge", "_call", "_max_bytes", "_max_items", "_producer", "_unsettled")

    def __init__(
        self,
        bridge: AsyncioBridge,
        producer: Callable[[Sink[T]], Coroutine[Any, Any, None]],
        max_items: int,
        max_bytes: int,
        unsettled: Callable[[], None] | None = None,
    ) -> None:
        self._bridge = bridge
        self._producer = producer
        self._unsettled = unsettled
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._call: _Call | None = None

    @trio.lowlevel.enable_ki_protection  # a submitted producer is always settled
    async def __aenter__(self) -> BatchReceiver[T]:
        bridge = self._bridge
        bridge.check_caller()
        if self._call is not None:
            raise RuntimeError("a stream block can be entered only once")
        if bridge._aborted:
            raise trio.ClosedResourceError("the ApiClient is closed")
        buf: _Buffer[T] = _Buffer(bridge, self._max_items, self._max_bytes)
        sink = Sink(buf)

        def on_done(call: _Call) -> None:
            sink.flush()  # what the producer pushed last comes before its end
            with buf.lock:
                buf.error = call.error
                buf.finished = True
                waiter, buf.trio_waiter = buf.trio_waiter, None
            if waiter is not None:
                bridge._to_trio.post(waiter.set)

        self._call = call = bridge._submit(self._producer, (sink,), on_done)
        bridge._abortable.add(call)
        return BatchReceiver(buf)

    @trio.lowlevel.enable_ki_protection
    async def __aexit__(self, *exc_info: object) -> None:
        call = self._call
        assert call is not None, "exited a stream block never entered"
        try:
            if not call.done.is_set():
                name = getattr(self._producer, "__name__", "stream")
                await self._bridge._settle(call, name, self._unsettled)
        finally:
            self._bridge._live.discard(call)
            self._bridge._abortable.discard(call)


@final
class Sink(Generic[T]):
    """The asyncio-side end of a stream buffer (one producer).

    Pushed items collect in a list of the producer's own and reach the shared
    buffer in one locked step per loop iteration (right before the loop
    selects), not one per item: a stream's messages arrive thousands per read.
    With a byte bound, items are weighed by ``len()``.
    """

    __slots__ = ("_buf", "_pending", "_pending_bytes", "_room", "_room_bytes")

    def __init__(self, buffer: _Buffer[T]) -> None:
        self._buf = buffer
        self._pending: list[T] = []
        self._pending_bytes = 0
        self._room = buffer.max_items  # free places in the buffer at the last flush
        self._room_bytes = buffer.max_bytes  # and free bytes (0: not weighed)

    def push(self, item: T) -> bool:
        """Append one item; the consumer gets it before the loop next waits.

        Returns True when the buffer is full: the producer should then
        ``await`` :meth:`wait_space` before it pushes more.
        """
        pending = self._pending
        pending.append(item)
        if len(pending) == 1:
            self._buf.bridge.before_select(self.flush)
        if self._room_bytes:
            self._pending_bytes += len(item)  # type: ignore[arg-type]
            if self._pending_bytes >= self._room_bytes:
                return True
        return len(pending) >= self._room

    def flush(self) -> None:
        """asyncio: hand the pushed items to the consumer now (and wake it if it waits)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        buf = self._buf
        with buf.lock:
            items = buf.items
            items.extend(pending)
            self._room = buf.max_items - len(items)
            if buf.max_bytes:
                buf.nbytes += self._pending_bytes
                self._pending_bytes = 0
                self._room_bytes = max(buf.max_bytes - buf.nbytes, 1)
            waiter = buf.trio_waiter
            if waiter is not None:
                buf.trio_waiter = None
        if waiter is not None:
            buf.bridge._to_trio.post(waiter.set)

    async def wait_space(self) -> None:
        """asyncio: wait until the consumer drained the buffer below its bound."""
        self.flush()
        buf = self._buf
        while True:
            with buf.lock:
                free = buf.max_items - len(buf.items)
                free_bytes = buf.max_bytes - buf.nbytes
                if free > 0 and (not buf.max_bytes or free_bytes > 0):
                    self._room = free
                    if buf.max_bytes:
                        self._room_bytes = free_bytes
                    return
                space = buf.space = asyncio.get_running_loop().create_future()
            await space


class _Buffer(Generic[T]):
    __slots__ = (
        "bridge",
        "error",
        "finished",
        "items",
        "lock",
        "max_bytes",
        "max_items",
        "nbytes",
        "space",
        "trio_waiter",
    )

    def __init__(self, bridge: AsyncioBridge, max_items: int, max_bytes: int = 0) -> None:
        self.bridge: AsyncioBridge = bridge
        self.lock: threading.Lock = threading.Lock()
        self.items: collections.deque[T] = collections.deque()
        self.max_items: int = max_items
        self.max_bytes: int = max_bytes  # 0: items are not weighed
        self.nbytes: int = 0  # the items' weight (with max_bytes)
        self.trio_waiter: trio.Event | None = None
        self.space: asyncio.Future[None] | None = None  # the producer waits on it
        self.finished: bool = False
        self.error: BaseException | None = None


def _wake_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@final
class BatchReceiver(Generic[T]):
    """The trio-side end of a stream buffer."""

    __slots__ = ("_buf", "_interrupted", "_waiting")

    def __init__(self, buffer: _Buffer[T]) -> None:
        self._buf = buffer
        self._waiting = False  # a task waits in receive_batch
        self._interrupted: Callable[[], BaseException] | None = None

    @property
    def interrupted(self) -> bool:
        """Whether :meth:`interrupt` was called."""
        return self._interrupted is not None

    def interrupt(self, error: Callable[[], BaseException]) -> None:
        """trio: make every later :meth:`receive_batch` raise ``error()``, and wake
        the task waiting in one now (its resource was closed under it)."""
        self._interrupted = error
        with self._buf.lock:
            waiter, self._buf.trio_waiter = self._buf.trio_waiter, None
        if waiter is not None:
            waiter.set()

    @property
    def error(self) -> BaseException | None:
        """The producer's own exception, once it ended with one (else ``None``)."""
        return self._buf.error

    @property
    def ended(self) -> bool:
        """Whether the producer has ended: all it will push is buffered (or taken),
        so :meth:`receive_batch` no longer waits."""
        with self._buf.lock:
            return self._buf.finished

    @property
    def ready(self) -> bool:
        """Whether items are buffered (:meth:`receive_batch` would not wait for them)."""
        with self._buf.lock:
            return bool(self._buf.items)

    def receive_nowait(self) -> list[T]:
        """Take whatever is buffered now (maybe nothing), without waiting."""
        buf = self._buf
        with buf.lock:
            items = list(buf.items)
            buf.items.clear()
            buf.nbytes = 0
            space, buf.space = buf.space, None
        if space is not None:
            buf.bridge._to_loop.post(lambda: _wake_future(space))
        return items

    async def receive_batch(self) -> list[T]:
        """Wait for items and take all that are buffered.

        Returns an empty list once the producer finished; raises the producer's
        exception if it failed. A checkpoint only when it has to wait.
        """
        buf = self._buf
        if self._waiting:
            # As trio's own streams: one waiter only (a second one would take the
            # first one's wake-up, and the first would wait forever).
            raise trio.BusyResourceError("another task is already reading this stream")
        # Once per batch, not per event: the Event a reader of another trio.run
        # waits on would be set from this bridge's run (an internal error in
        # trio), and that reader would wait for ever.
        buf.bridge.check_run()
        while True:
            if self._interrupted is not None:
                raise self._interrupted()
            with buf.lock:
                if buf.items:
                    break
                if buf.error is not None:
                    raise buf.error
                if buf.finished:
                    return []
                waiter = buf.trio_waiter = trio.Event()
            self._waiting = True
            try:
                with hold_clock():
                    await waiter.wait()
            finally:
                self._waiting = False
        # One consumer: the items found above are still there (maybe more).
        return self.receive_nowait()


def require_trio(what: str) -> None:
    """Raise a ``RuntimeError`` naming the problem unless trio runs this task.

    Under asyncio, trio's first checkpoint failed with asyncio's "Task got bad
    yield" about a trio internal.
    """
    try:
        library: str | None = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        library = None
    if library != "trio":
        here = f"this is {library}" if library else "no async library runs here"
        raise RuntimeError(f"{what} needs trio (trio.run): {here}")


# How often the dead loop's last run is resumed after a callback raised in it.
_DEAD_LOOP_RERUNS: Final = 10


async def _cancel_other_tasks(bound: float) -> None:
    """asyncio: cancel every task of the loop but this one; wait ``bound`` s at most."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=bound)


def _thread_died() -> trio.ClosedResourceError:
    return trio.ClosedResourceError(
        "poc_api's asyncio thread has ended unexpectedly (a bug: see the log); "
        "close the ApiClient and open a new one"
    )


@final
class AsyncioBridge:
    """An asyncio loop running in its own thread; see the module docstring.

    Made by :func:`open_bridge` or :meth:`start`; belongs to the trio run that
    made it. ``cancel_timeout`` bounds how long a cancelled call waits for its
    asyncio side to finish cleaning up.
    """

    def __init__(self, *, cancel_timeout: float = 5.0) -> None:
        self._cancel_timeout = cancel_timeout
        self._token = trio.lowlevel.current_trio_token()
        # Not new_event_loop(): the process-wide policy may belong to someone else
        # (trio-asyncio installs one that refuses to make loops inside trio).
        self._idle_callbacks: list[Callable[[], object]] = []  # loop side only
        selector = _FlushingSelector(self._before_select)
        self._loop = asyncio.SelectorEventLoop(selector)
        # Its own, so that the close can wait for it bounded (_stop_loop).
        self._executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="asyncio")
        self._loop.set_default_executor(self._executor)
        self._loop.set_exception_handler(_log_loop_exception)
        # The eventfds, while open (-1 otherwise): the loop side's is written by
        # trio only, trio's by the loop thread only.
        self._loop_fd = self._trio_fd = -1
        # Set (trio side) when the wake-up task must end: also before its first step.
        self._wakeups_ended = False
        if _USE_EVENTFD:
            self._loop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._trio_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            selector.watch_wake_fd(self._loop_fd, self._on_loop_wake)
            self._to_loop = _Mailbox(self._wake_loop)
            self._to_trio = _Mailbox(self._wake_trio)
        else:
            self._to_loop = _Mailbox(self._loop.call_soon_threadsafe)
            self._to_trio = _Mailbox(self._token.run_sync_soon)
        # Eventfds that report one run() call each (see _take_fd): every one made,
        # those free, and (loop side) those to write before the loop next selects.
        self._call_fds: list[int] = []
        self._free_fds: list[int] = []
        self._fd_wakes: list[int] = []
        self._selector = selector
        # Is the loop's I/O ready (trio side)? Linux: poll its epoll fd.
        self._probe: Any = None
        if isinstance(selector, selectors.EpollSelector):
            self._probe = select.poll()
            self._probe.register(selector.fileno(), select.POLLIN)
        self._seen_selects = 0
        self._seen_at = 0.0
        self._starved_after = _GIL_STARVED_AFTER
        self._instrument = _FlushBeforeIoWait(self._flush_to_loop, self._hand_over_gil)
        self._closing = False
        self._live: set[_Call] = set()  # trio side: calls whose outcome is awaited
        self._finish_lock = threading.Lock()  # see _claim
        self._abortable: set[_Call] = set()  # trio side: what abort_calls ends
        self._aborted = False
        self._closed = trio.Event()
        self._thread_done = trio.Event()
        self._stop_asked = False  # trio side: the close has told the loop to stop
        self._thread_died = False  # trio side: the loop thread ended unasked
        # What closes the loop's connections, run only if its thread dies (see
        # _close_dead_loop); weak: a pool's retired endpoints go.
        self._if_dead: list[weakref.WeakMethod[Callable[[], None]]] = []
        self._thread = threading.Thread(
            target=self._thread_main, name="poc_api-asyncio", daemon=True
        )

    @classmethod
    def start(cls, *, cancel_timeout: float = 5.0) -> AsyncioBridge:
        """Start a bridge (its loop thread) owned by the current trio run."""
        bridge = cls(cancel_timeout=cancel_timeout)
        try:
            bridge._thread.start()
        except BaseException:  # (no thread left to start: nothing else has begun)
            bridge._loop.close()
            bridge._close_eventfds()
            raise
        if bridge._trio_fd >= 0:
            trio.lowlevel.spawn_system_task(
                bridge._run_trio_wakeups, name="poc_api bridge wake-ups"
            )
        trio.lowlevel.add_instrument(bridge._instrument)
        return bridge

    # -- eventfd wake-ups (Linux) ------------------------------------------------

    def _wake_loop(self, _run: object) -> None:
        """trio: wake the loop thread (its reader runs the mailbox)."""
        fd = self._loop_fd
        if fd < 0:
            raise RuntimeError("the asyncio loop is closed")
        os.eventfd_write(fd, 1)

    def _on_loop_wake(self) -> None:
        """asyncio, inside the selector: the loop's eventfd is readable."""
        try:
            os.eventfd_read(self._loop_fd)
        except BlockingIOError:  # pragma: no cover - only this reader reads it
            return
        self._to_loop._run()

    def _wake_trio(self, _run: object) -> None:
        """asyncio: wake trio (the wake-up task runs the mailbox)."""
        os.eventfd_write(self._trio_fd, 1)  # closed only after this thread ended

    async def _run_trio_wakeups(self) -> None:
        """trio, a system task (protected from Ctrl-C): run what the loop posts."""
        try:
            await self._serve_trio_wakeups()
        except trio.Cancelled:
            # The run is ending (trio cancels its system tasks then) and the bridge
            # is still open: its client is being closed now (ApiClient's watch),
            # and that close waits for these wake-ups. Served on, for a while.
            with trio.CancelScope(shield=True, relative_deadline=3 * self._cancel_timeout):
                await self._serve_trio_wakeups()
            raise

    async def _serve_trio_wakeups(self) -> None:
        fd = self._trio_fd
        # Checked first too: a close in the scheduler pass that started this task
        # may come before its first step (the fd is then -1, or left to a wedged thread).
        while not self._wakeups_ended:
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:  # the bridge closed (notify_closing)
                return
            if self._wakeups_ended:  # closed while this task was being woken
                return
            try:
                os.eventfd_read(fd)
            except BlockingIOError:  # pragma: no cover - only this task reads it
                continue
            self._to_trio._run()

    def _close_eventfds(self) -> None:
        """trio, once the loop thread has ended and the loop is closed."""
        loop_fd, trio_fd = self._loop_fd, self._trio_fd
        self._loop_fd = self._trio_fd = -1
        self._wakeups_ended = True
        call_fds, self._call_fds, self._free_fds = self._call_fds, [], []
        for fd in call_fds:
            trio.lowlevel.notify_closing(fd)  # a waiter left behind wakes (closed)
            os.close(fd)
        if trio_fd >= 0:
            trio.lowlevel.notify_closing(trio_fd)
            os.close(trio_fd)
        if loop_fd >= 0:
            os.close(loop_fd)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The asyncio loop (runs in the bridge's thread; touch it only from there)."""
        return self._loop

    @property
    def thread(self) -> threading.Thread:
        """The thread the loop runs in."""
        return self._thread

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has begun."""
        return self._closing

    @property
    def calls_aborted(self) -> bool:
        """True once :meth:`abort_calls` has run (the client's close has begun)."""
        return self._aborted

    def _thread_main(self) -> None:
        if _BLOCKED_SIGNALS:
            signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_SIGNALS)
        try:
            self._loop.run_forever()
        finally:
            self._flush_to_trio()
            try:
                self._token.run_sync_soon(self._thread_ended)
            except trio.RunFinishedError:
                pass

    def _thread_ended(self) -> None:
        """trio: the loop thread has ended. Unasked (an exception escaped a loop
        callback: a bug), nothing will run there any more: the calls waiting on it
        fail now, and later ones at once (see ``_submit``), not for ever."""
        self._thread_done.set()
        if not self._stop_asked:
            log.error("poc_api's asyncio thread ended unexpectedly; close the ApiClient")
            self._thread_died = True
        self._fail_unfinished()  # also during a close: its shutdown step will not finish

    def check_caller(self) -> None:
        """Raise unless called from the trio run that owns this bridge, while open."""
        self.check_run()
        if self._closing:
            raise trio.ClosedResourceError("the ApiClient is closed")

    def check_run(self) -> None:
        """``RuntimeError`` unless called from the trio run that owns this bridge
        (open or closed: what a closed client does is the caller's to say)."""
        check_run(self._token)

    def close_if_loop_dies(self, close: Callable[[], None]) -> None:
        """Have the close run ``close()`` (a bound method, kept weakly) in the loop,
        should its thread have died (a bug): the loop is run once more for it."""
        self._if_dead = [ref for ref in self._if_dead if ref() is not None]
        self._if_dead.append(weakref.WeakMethod(close))

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` in the loop thread soon; dropped if the loop has closed."""
        self._to_loop.post(fn)

    def _flush_to_loop(self) -> None:
        """trio, right before it waits for I/O: wake the loop for what was posted."""
        try:
            self._to_loop.flush()
        except RuntimeError:  # the loop closed: nothing left to wake
            pass

    def _hand_over_gil(self) -> None:
        """trio, about to check I/O without blocking: let a starved loop thread run.

        See ``_GIL_STARVED_AFTER``. Looks at most once per that interval: one
        poll of the loop's epoll fd, and a sleep only if the loop thread is
        stuck with its I/O ready or in the middle of its work. A hand-over that
        brings no progress (the thread is wedged, or blocked elsewhere) doubles
        the interval, up to a second: trio is not slowed for nothing.
        """
        probe = self._probe
        if probe is None:
            return
        now = time.perf_counter()
        selector = self._selector
        seen = selector.selects
        if seen != self._seen_selects:
            self._seen_selects, self._seen_at = seen, now
            self._starved_after = _GIL_STARVED_AFTER
            return
        if now - self._seen_at < self._starved_after:
            return
        self._seen_at = now
        if seen & 1 and time.monotonic() < selector.idle_until and not probe.poll(0):
            return  # idle in select: no I/O ready, no timer due
        if self._closing or not self._thread.is_alive():
            return
        # Starved, in select with its I/O ready or in the middle of its work: let it
        # run up to its next select (bounded).
        until = now + _GIL_HANDOVER_MAX
        while True:
            time.sleep(_GIL_HANDOVER_STEP)
            now_seen = selector.selects
            if now_seen != seen and now_seen & 1:
                return  # (the next look notices the progress)
            if time.perf_counter() > until:
                break
        self._seen_at = time.perf_counter()
        if now_seen == seen:  # not a step: wedged, or blocked without the GIL
            self._starved_after = min(2 * self._starved_after, 1.0)

    def before_select(self, fn: Callable[[], object]) -> None:
        """asyncio side: run ``fn()`` once, right before the loop next selects.

        That is, after every callback that is ready now has run: writes queued
        so are coalesced across everything this loop iteration did. ``fn``
        returns True when it made the loop ready work (a write that failed:
        asyncio ``call_soon``s the connection's loss): the loop then does not block.
        """
        self._idle_callbacks.append(fn)

    def _before_select(self) -> bool:
        """Run the before-select callbacks; True when one made the loop ready work."""
        ready = False
        callbacks = self._idle_callbacks
        if callbacks:
            self._idle_callbacks = []
            for fn in callbacks:
                try:
                    if fn():
                        ready = True
                except Exception:  # pragma: no cover - callbacks here never raise
                    log.exception("poc_api before-select callback failed")
        self._flush_to_trio()
        return ready

    def _flush_to_trio(self) -> None:
        """asyncio, right before it selects: wake trio for what was posted."""
        wakes = self._fd_wakes
        if wakes:
            self._fd_wakes = []
            for fd in wakes:
                os.eventfd_write(fd, 1)  # closed only after this thread ended
        try:
            self._to_trio.flush()
        except trio.RunFinishedError:  # the trio run ended: nobody waits any more
            pass

    def _submit(
        self,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        args: tuple[Any, ...],
        on_done: Callable[[_Call], None] | None = None,
        detach: Callable[[asyncio.Task[Any]], bool] | None = None,
        fd: int = -1,
    ) -> _Call:
        call = _Call(on_done, detach, fd)

        async def body() -> None:
            # The outcome is recorded inside the task, not by a done callback, so
            # the trio side hears of it one loop iteration sooner. A call already
            # finished (detached) keeps its outcome to itself.
            outcome: _Outcome | None = None
            try:
                outcome = (await fn(*args), True, None)
            except asyncio.CancelledError:
                outcome = (None, False, None if call.cancel_requested else closed_under_call())
                raise
            except BaseException as exc:
                outcome = (None, False, exc)
            finally:
                self._forget(call, outcome)

        def begin() -> None:
            if call.cancel_requested or call.aborted or self._loop.is_closed():
                aborted = call.aborted and not call.cancel_requested
                self._finish(call, (None, False, closed_under_call()) if aborted else None)
                return
            task = _start_task(self._loop, body())
            if not task.done():  # an eager start may have finished it already
                call.task = task

        if self._loop.is_closed():
            raise trio.ClosedResourceError("the ApiClient is closed")
        if self._thread_died:
            raise _thread_died()
        self._to_loop.post(begin)
        self._live.add(call)
        return call

    def _claim(self, call: _Call, outcome: _Outcome | None) -> bool:
        """Record ``outcome`` (if any) and mark ``call`` finished, in one step; False,
        and nothing recorded, if it was finished already. Locked: a close fails the
        calls of a wedged loop thread (trio side) while that thread may un-wedge and
        finish them itself (a result recorded just after the close's check went
        out as the close's error): one outcome, the first to claim."""
        with self._finish_lock:
            if call.finished:
                return False
            if outcome is not None:
                call.result, call.returned, call.error = outcome
            call.finished = True
            return True

    def _finish(self, call: _Call, outcome: _Outcome | None = None) -> None:
        """asyncio side: record ``outcome`` and tell the trio side, once (nothing for
        a call finished already: detached, or failed by a close, its outcome is
        that)."""
        if not self._claim(call, outcome):
            return
        if call.on_done is not None:
            call.on_done(call)
        if call.fd >= 0:
            self._fd_wakes.append(call.fd)
        else:
            self._to_trio.post(call.done.set)

    def _take_fd(self) -> int:
        """trio: an eventfd for one run() call to wait on, or -1 for the mailbox.

        A caller that waits on an eventfd of its own is woken by trio's I/O wait
        itself and runs in the same scheduler pass; woken through the mailbox it
        waits one more pass (the wake-up task runs, then sets its event). The fds
        are reused, and only so many are made: past that, calls share the mailbox.
        """
        free = self._free_fds
        if free:
            return free.pop()
        if self._trio_fd < 0 or len(self._call_fds) >= _MAX_CALL_FDS:
            return -1
        try:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:  # out of file descriptors: the mailbox still works
            return -1
        self._call_fds.append(fd)
        return fd

    async def _wait(self, call: _Call) -> None:
        """trio: return once the call's outcome has reached this side (a checkpoint)."""
        with hold_clock():  # (the loop thread's work, which a MockClock cannot see)
            fd = call.fd
            if fd < 0:
                await call.done.wait()
                return
            while True:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except trio.ClosedResourceError:  # the bridge closed; _stop_loop ended it
                    if not call.finished:  # pragma: no cover - _stop_loop ends every call
                        raise
                    break
                if self._wakeups_ended and call.finished:
                    # Closed in the pass that woke this task, before its step: the
                    # fd is closed (its number perhaps reused), or a wedged thread's.
                    break
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:  # pragma: no cover - only this task reads it
                    continue
                # A write left by the fd's last user (cancelled as its call finished)
                # wakes this one too early: its own call finishes before its write.
                if call.finished:
                    break
        call.done.set()

    def _forget(self, call: _Call, outcome: _Outcome | None = None) -> None:
        """asyncio side: the task is ending; drop the trio side's reference, then finish.

        Dropped here, in the loop thread: a task freed in the trio thread runs
        asyncio's WeakSet callback there, and a Ctrl-C landing in that callback
        is lost ("Exception ignored in ...").
        """
        call.task = None
        self._finish(call, outcome)

    def _cancel(self, call: _Call) -> None:
        # Set here too, not only on the loop: a call whose start is still queued
        # behind other work then never starts at all.
        call.cancel_requested = True
        self._to_loop.post(partial(self._cancel_task, call))

    def abort_calls(self) -> None:
        """trio: end every running stream and abortable call, and every later one,
        as closed under it.

        The client's close does this first: each stream is reset (CANCEL) as if
        its block had left, and its consumer gets ``trio.ClosedResourceError``
        from its next ``receive_batch`` (no event is taken after the reset); a
        :meth:`run` call made ``abortable`` raises it. The connection stays up
        for what the close still sends (``CloseSession``).
        """
        self._aborted = True
        for call in self._abortable:
            if not call.finished:
                call.aborted = True
                self._to_loop.post(partial(self._cancel_task, call))

    def _cancel_task(self, call: _Call) -> None:
        """asyncio: cancel the task of a call its caller gave up (``_cancel``) or the
        client's close ended (``abort_calls``)."""
        task = call.task
        if task is None or task.done() or call.finished:
            return  # not started (begin() sees the flags), or over
        if not call.cancel_requested and call.may_abort is not None and not call.may_abort():
            return  # aborted by the close, and it has gone too far: it runs on
        if call.cancel_requested and call.detach is not None and call.detach(task):
            # The task runs on by itself; the trio side stops waiting now.
            self._finish(call)
            return
        task.cancel()

        def ended(_: object) -> None:
            # A task cancelled before its first step never runs `body`: its
            # outcome is recorded here, as `body` would have.
            error = None if call.cancel_requested else closed_under_call()
            self._forget(call, (None, False, error))

        task.add_done_callback(ended)

    async def _settle(
        self, call: _Call, what: str, unsettled: Callable[[], None] | None = None
    ) -> None:
        """Cancel ``call`` and wait, shielded and bounded, for its asyncio side to end.

        If it did not, it may still go on, and send, after this: ``unsettled()``
        is called then (a Ctrl-C that came meanwhile is raised after it).
        """
        self._cancel(call)
        ki: KeyboardInterrupt | None = None
        # A CancelScope, not move_on_after: that is a @contextmanager, which a Ctrl-C
        # landing in its exit leaves half-closed ("Cancel scope stack corrupted").
        with trio.CancelScope(relative_deadline=self._cancel_timeout, shield=True) as scope:
            while not call.done.is_set():
                try:
                    await self._wait(call)
                except KeyboardInterrupt as exc:  # finish the cleanup first
                    ki = exc
        if not call.done.is_set() and unsettled is not None:
            unsettled()
        if ki is not None:
            raise ki
        if scope.cancelled_caught:
            log.warning(
                "%s: its asyncio side did not finish within %.1f s of being cancelled",
                what,
                self._cancel_timeout,
            )

    @trio.lowlevel.enable_ki_protection  # a submitted call is always awaited or settled
    async def run(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        *args: Any,
        abandoned: Callable[[T], None] | None = None,
        detach: Callable[[asyncio.Task[Any]], bool] | None = None,
        defer_ki: bool = False,
        abortable: bool | Callable[[], bool] = False,
        unsettled: Callable[[], None] | None = None,
    ) -> T:
        """Run ``await fn(*args)`` on the asyncio loop and return its result.

        A trio checkpoint. Cancellation (or Ctrl-C) cancels the asyncio task and
        waits for it to finish (shielded, at most ``cancel_timeout`` seconds)
        before the cancellation propagates. If the coroutine had already
        returned when the cancellation came, its result is handed to
        ``abandoned`` (in the trio thread) instead of being lost. If it was still
        running, ``detach(task)`` (in the loop thread) may take the task over by
        returning True: it is then not cancelled but left to finish on its own,
        and the cancellation propagates at once. Raises
        ``trio.ClosedResourceError`` if the bridge is closed, or closes under
        the call. If the wait runs out with the task still going, ``unsettled()``
        is called: what the task does from then on goes unseen.

        With ``defer_ki`` (cleanup calls such as ``CloseSession``), Ctrl-C does
        not interrupt the call: its ``KeyboardInterrupt`` is raised once the call
        has finished, so the cleanup still happens. An ``abortable`` call ends
        as closed under it when :meth:`abort_calls` runs; given a function, only
        if the call has not started yet or the function (asked on the loop, as the
        abort comes) returns True.
        """
        self.check_caller()
        if abortable and self._aborted:
            raise trio.ClosedResourceError("the ApiClient is closed")
        fd = self._take_fd()
        try:
            call = self._submit(fn, args, detach=detach, fd=fd)
        except BaseException:
            if fd >= 0:  # refused at once (closed, or its thread died): fd unused
                self._free_fds.append(fd)
            raise
        if abortable:
            if callable(abortable):
                call.may_abort = abortable
            self._abortable.add(call)
        ki: KeyboardInterrupt | None = None
        try:
            while True:
                try:
                    await self._wait(call)
                    break
                except KeyboardInterrupt as exc:
                    if not defer_ki:
                        raise
                    ki = exc
        except BaseException:
            try:
                if not call.finished:
                    await self._settle(call, getattr(fn, "__name__", "call"), unsettled)
            finally:
                # Also when a Ctrl-C came during the settle (it raises that): the
                # result that came meanwhile is not lost.
                if call.finished and call.returned and abandoned is not None:
                    abandoned(call.result)
            if ki is not None:
                raise ki  # noqa: B904 - Ctrl-C outranks what came after it
            raise
        finally:
            self._live.discard(call)
            self._abortable.discard(call)
            if call.fd >= 0:
                self._free_fds.append(call.fd)
        if ki is not None:
            if call.returned and abandoned is not None:
                abandoned(call.result)
            raise ki
        if call.error is not None:
            raise call.error
        result: T = call.result
        return result

    def stream(
        self,
        producer: Callable[[Sink[T]], Coroutine[Any, Any, None]],
        *,
        max_items: int,
        max_bytes: int = 0,
        unsettled: Callable[[], None] | None = None,
    ) -> StreamBlock[T]:
        """Run ``producer(sink)`` on asyncio while the block drains its items.

        ``max_items`` bounds the buffer, and ``max_bytes`` (if not 0) bounds the
        items' total ``len()``; one item is always taken, however big. A
        producer that finds the buffer full waits in :meth:`Sink.wait_space`,
        which stops reading from the network and so lets HTTP/2 flow control
        slow the server down.

        Leaving the block cancels the producer (if still running) and waits
        (shielded, bounded) for it to finish; ``unsettled()`` if it did not. The
        producer's exception is raised
        from :meth:`BatchReceiver.receive_batch`, never from this block's exit,
        and the block's own exception leaves it untouched.
        """
        return StreamBlock(self, producer, max_items, max_bytes, unsettled)

    async def aclose(self) -> None:
        """Cancel every asyncio task, stop the loop and join its thread (idempotent).

        Shielded: always closes, even when cancelled. Calls still waiting in
        other tasks fail with ``trio.ClosedResourceError``.
        """
        if self._closing:
            with trio.CancelScope(shield=True):
                await self._closed.wait()
            return
        self._closing = True
        try:
            with trio.CancelScope(shield=True):
                await self._stop_loop()
        finally:
            # Also when the thread died or was left behind wedged.
            try:
                trio.lowlevel.remove_instrument(self._instrument)
            except KeyError:  # pragma: no cover - someone removed it for us
                pass
            self._closed.set()

    def _fail_unfinished(self) -> None:
        """trio, once the loop thread has ended (or is left wedged): fail every call
        still waiting on it (each with an exception of its own: its traceback will
        be its caller's), and run what the loop posted last."""
        error = _thread_died if self._thread_died else closed_under_call
        for left in list(self._live):
            if left.done.is_set():
                continue
            # (Not claimed: the loop finished it meanwhile, its outcome kept.)
            claimed = not left.finished and self._claim(left, (None, False, error()))
            if claimed and left.on_done is not None:
                left.on_done(left)
            left.done.set()
            if left.fd >= 0:
                # Its waiter wakes, also if the fds stay open (a wedged thread).
                os.eventfd_write(left.fd, 1)
        # on_done posts (a stream's waiting consumer) and whatever the loop posted
        # last: the loop will flush nothing any more, so run them here (trio side).
        self._to_trio._run()

    async def _close_dead_loop(self, bound: float) -> bool:
        """trio, the loop thread having died: run the loop once more, in a thread
        of its own and bounded, to close what it still holds (its connections,
        else left to the garbage collector: "unclosed transport"; its tasks).
        False if that run did not end in time (the loop is then left as it is)."""
        loop, ended = self._loop, trio.Event()
        # What trio posted since is never run: the calls it starts have failed.
        self._selector.unwatch_wake_fd()
        self._to_loop.drop()
        closes = [ref() for ref in self._if_dead]

        async def last() -> None:
            for close in closes:
                if close is not None:
                    close()
            await _cancel_other_tasks(bound)
            await asyncio.sleep(0)  # (the connections' connection_lost: sockets close)

        def main() -> None:
            if _BLOCKED_SIGNALS:
                signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_SIGNALS)
            try:
                task = loop.create_task(last())
                # A callback the dead run left in the ready queue (the bug's own,
                # posted twice, say) may raise again, SystemExit too: that stops
                # this run, not the close (the task goes on in the next one).
                for _ in range(_DEAD_LOOP_RERUNS):
                    try:
                        loop.run_until_complete(task)
                    except BaseException:
                        log.warning(
                            "closing the dead asyncio loop's connections: a callback failed",
                            exc_info=True,
                        )
                    if task.done():
                        break
            finally:
                self._executor.shutdown(wait=False)
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(ended.set)

        self._thread = threading.Thread(target=main, name="poc_api-asyncio", daemon=True)
        self._thread.start()
        with hold_clock(), trio.CancelScope(relative_deadline=bound * 2):
            await ended.wait()
        self._to_trio._run()  # (what that run posted: calls failed already)
        return ended.is_set()

    async def _stop_loop(self) -> None:
        loop = self._loop
        # The bounds guard against a wedged loop thread, not a slow server: a
        # cancel_timeout (close_timeout) of 0.1 ms left a healthy thread behind.
        bound = max(self._cancel_timeout, _STOP_MIN)

        async def shutdown() -> None:
            await _cancel_other_tasks(bound)
            await loop.shutdown_asyncgens()
            # Its worker threads (getaddrinfo of a host name) end with the client,
            # not when the garbage collector gets to the executor. Bounded: a
            # lookup stuck on a dead DNS server is left to finish on its own.
            # Not loop.shutdown_default_executor() under wait_for: cancelled, it
            # joins its helper thread on this loop, until the lookup ends.
            executor, ended = self._executor, loop.create_future()

            def end() -> None:
                if not ended.done():
                    ended.set_result(None)

            def shut_down() -> None:
                executor.shutdown(wait=True)
                with contextlib.suppress(RuntimeError):  # (the loop is gone)
                    loop.call_soon_threadsafe(end)

            threading.Thread(target=shut_down, name="poc_api-executor", daemon=True).start()
            done, _ = await asyncio.wait({ended}, timeout=bound)
            if not done:
                log.debug("a getaddrinfo of the client's still runs; not waiting for it")

        wedged = False
        if not self._thread.is_alive() or self._thread_died:
            # It died (an exception escaped the loop), and may still be exiting.
            with hold_clock(), trio.CancelScope(relative_deadline=bound):
                await self._thread_done.wait()
            self._thread.join(bound)
            wedged = self._thread.is_alive() or not await self._close_dead_loop(bound)
        else:
            call = self._submit(shutdown, ())
            with hold_clock(), trio.CancelScope(relative_deadline=bound * 2):
                await call.done.wait()
            self._stop_asked = True
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass
            with hold_clock(), trio.CancelScope(relative_deadline=bound) as scope:
                await self._thread_done.wait()
            wedged = scope.cancelled_caught
        # Whatever did not finish (a task that ignored cancellation) will never
        # report back: fail its waiter instead of leaving it hanging. A call that
        # did finish keeps its outcome, though a wedged thread never sent it.
        self._fail_unfinished()
        if wedged:  # a wedged asyncio callback
            log.warning("the asyncio thread did not stop; leaving it (daemon) behind")
            if self._trio_fd >= 0:
                # The wake-up task ends (the fds stay open: the thread may yet write).
                self._wakeups_ended = True
                trio.lowlevel.notify_closing(self._trio_fd)
            return
        self._thread.join()
        loop.close()
        self._close_eventfds()


if sys.version_info >= (3, 12):

    def _start_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> Any:
        # Run the first step now, not one loop iteration later.
        return asyncio.Task(coro, loop=loop, eager_start=True)

else:

    def _start_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> Any:
        return loop.create_task(coro)


class _FlushBeforeIoWait(trio.abc.Instrument):
    """Wakes the loop thread for the bridge's posts right before trio blocks, and
    lets it have the GIL while trio is busy (``_GIL_STARVED_AFTER``)."""

    def __init__(self, flush: Callable[[], None], busy: Callable[[], None]) -> None:
        self._flush = flush
        self._busy = busy

    def before_io_wait(self, timeout: float) -> None:
        self._flush()
        if not timeout:  # tasks are runnable: trio keeps the GIL but for an instant
            self._busy()


class _FlushingSelector(selectors.DefaultSelector):
    """The loop's selector: wakes trio for the bridge's posts right before it blocks,
    and runs trio's posts as soon as it wakes for them.

    Run from ``select`` itself, trio's posts come before the loop counts the
    callbacks it will run this iteration: the first step of a task they start
    runs in this iteration, not after one more trip through ``select`` (Python
    3.11 has no eager task start), and no reader callback is scheduled for it.
    """

    def __init__(self, flush: Callable[[], bool]) -> None:
        super().__init__()
        self._flush = flush
        # The loop thread's progress, for trio: odd while it is in select, which
        # it may leave for no I/O before idle_until (time.monotonic()).
        self.selects = 0
        self.idle_until = 0.0
        self._wake_fd = -1
        self._on_wake: Callable[[], None] = _nothing

    def watch_wake_fd(self, fd: int, on_wake: Callable[[], None]) -> None:
        """Call ``on_wake()`` from ``select`` whenever ``fd`` is readable (not a loop reader)."""
        self.register(fd, selectors.EVENT_READ)
        self._wake_fd, self._on_wake = fd, on_wake

    def unwatch_wake_fd(self) -> None:
        """Stop watching the fd of :meth:`watch_wake_fd` (if any)."""
        if self._wake_fd >= 0:
            self.unregister(self._wake_fd)
            self._wake_fd, self._on_wake = -1, _nothing

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self._flush():
            # asyncio chose ``timeout`` before the flush, with nothing ready; a
            # write that failed there (ECONNRESET: the peer reset the connection)
            # made it drop the socket's reader and call_soon its loss. Blocking
            # would leave every call on the connection waiting for another wake-up
            # (the keepalive's, 300 s; none without it).
            timeout = 0
        self.idle_until = math.inf if timeout is None else time.monotonic() + timeout
        self.selects += 1
        events = super().select(timeout)
        self.selects += 1
        fd = self._wake_fd
        if fd >= 0:
            for i, (key, _) in enumerate(events):
                if key.fd == fd:
                    del events[i]  # not the loop's: it has no reader for it
                    self._on_wake()
                    break
        return events


def _nothing() -> None:  # pragma: no cover - replaced before the loop runs
    pass


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    if isinstance(exc, PocApiError | ConnectionError | asyncio.CancelledError):
        log.debug("asyncio: %s", context.get("message"), exc_info=exc)
        return
    log.warning("asyncio: %s", context.get("message"), exc_info=exc)


@protected_asynccontextmanager
async def open_bridge(*, cancel_timeout: float = 5.0) -> AsyncIterator[AsyncioBridge]:
    """Start an asyncio loop thread for the duration of the block.

    Every asyncio task started through the bridge has ended, and the thread has
    stopped, when the block exits.
    """
    bridge = AsyncioBridge.start(cancel_timeout=cancel_timeout)
    try:
        yield bridge
    finally:
        await bridge.aclose()
