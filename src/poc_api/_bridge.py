"""The trio <-> asyncio bridge: the one place that knows about trio-asyncio.

grpclib only runs on asyncio. An :class:`AsyncioBridge` owns an asyncio loop
hosted inside the trio run (trio-asyncio today) and offers two things:

* :meth:`AsyncioBridge.run` — await an asyncio coroutine from trio. Cancelling
  the trio scope cancels the asyncio task and waits until it has finished its
  cleanup (so an RPC's stream reset is on the wire before ``run`` returns).
* :meth:`AsyncioBridge.stream` — run an asyncio *producer* that pushes items into
  a bounded buffer which the trio side drains in batches. One crossing per batch
  instead of one per item is what keeps streaming near native asyncio speed.

Only these two operations cross; everything else in poc_api is trio code or
asyncio code, so replacing trio-asyncio (it does not import on Python 3.14 yet)
means rewriting this module alone.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar, final

import trio
import trio_asyncio

__all__ = ["AsyncioBridge", "BatchReceiver", "Sink", "open_bridge"]

T = TypeVar("T")


@final
class Sink(Generic[T]):
    """The asyncio-side end of a stream buffer (one producer)."""

    def __init__(self, buffer: _Buffer[T]) -> None:
        self._buf = buffer

    def push(self, item: T) -> None:
        """Append one item and wake the trio consumer if it waits."""
        buf = self._buf
        buf.items.append(item)
        waiter = buf.trio_waiter
        if waiter is not None:
            buf.trio_waiter = None
            waiter.set()

    @property
    def full(self) -> bool:
        """True when the producer should wait for :meth:`wait_space`."""
        return len(self._buf.items) >= self._buf.max_items

    async def wait_space(self) -> None:
        """asyncio: wait until the consumer drained the buffer below its bound."""
        buf = self._buf
        while len(buf.items) >= buf.max_items:
            buf.space.clear()
            await buf.space.wait()


class _Buffer(Generic[T]):
    __slots__ = ("error", "finished", "items", "max_items", "space", "trio_waiter")

    def __init__(self, max_items: int) -> None:
        self.items: collections.deque[T] = collections.deque()
        self.max_items = max_items
        self.trio_waiter: trio.Event | None = None
        self.space = asyncio.Event()
        self.finished = False
        self.error: BaseException | None = None


@final
class BatchReceiver(Generic[T]):
    """The trio-side end of a stream buffer."""

    def __init__(self, buffer: _Buffer[T]) -> None:
        self._buf = buffer

    async def receive_batch(self) -> list[T]:
        """Wait for items and take all that are buffered.

        Returns an empty list once the producer finished; raises the producer's
        exception if it failed. A checkpoint only when it has to wait.
        """
        buf = self._buf
        while not buf.items:
            if buf.error is not None:
                raise buf.error
            if buf.finished:
                return []
            waiter = buf.trio_waiter = trio.Event()
            await waiter.wait()
        items = list(buf.items)
        buf.items.clear()
        # asyncio.Event.set only schedules callbacks; it is safe from the trio side
        # because trio-asyncio runs the asyncio loop in this same thread.
        buf.space.set()
        return items


@final
class AsyncioBridge:
    """An asyncio loop hosted in the current trio run; see the module docstring."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the asyncio loop and return its result.

        A trio checkpoint. Cancellation cancels the asyncio task and waits for it
        to finish before raising ``trio.Cancelled``.
        """
        result: T = await self._loop.run_aio_coroutine(fn(*args))
        return result

    @asynccontextmanager
    async def stream(
        self,
        producer: Callable[[Sink[T]], Coroutine[Any, Any, None]],
        *,
        max_items: int,
    ) -> AsyncIterator[BatchReceiver[T]]:
        """Run ``producer(sink)`` on asyncio while the block drains its items.

        ``max_items`` bounds the buffer: a producer that finds it full waits in
        :meth:`Sink.wait_space`, which stops reading from the network and so
        lets HTTP/2 flow control slow the server down.

        Leaving the block cancels the producer (if still running) and waits for it
        to finish. The producer's exception is raised from
        :meth:`BatchReceiver.receive_batch`, never from this block's exit.
        """
        buf: _Buffer[T] = _Buffer(max_items)

        async def run_producer() -> None:
            try:
                await self._loop.run_aio_coroutine(producer(Sink(buf)))
            except BaseException as exc:
                if isinstance(exc, trio.Cancelled):
                    raise
                buf.error = exc
            finally:
                buf.finished = True
                waiter = buf.trio_waiter
                if waiter is not None:
                    buf.trio_waiter = None
                    waiter.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_producer)
                try:
                    yield BatchReceiver(buf)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # run_producer never raises (it stores errors in the buffer), so a group
            # holds just the block's own exception: surface it unwrapped.
            raise _single(group) from None


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The lone leaf of a group, or the group itself when there are several."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def open_bridge() -> AsyncIterator[AsyncioBridge]:
    """Open an asyncio loop for the duration of the block.

    Every asyncio task started through the bridge has ended when the block exits.
    """
    async with trio_asyncio.open_loop() as loop:
        _batch_callbacks(loop)
        yield AsyncioBridge(loop)


def _batch_callbacks(loop: Any) -> None:
    """Make trio-asyncio run every asyncio callback that is ready in one trio step.

    trio-asyncio's main loop takes one callback per trio scheduling pass (a
    memory-channel receive, which is a full checkpoint, per callback); asyncio's
    own loop runs all callbacks that are ready at the start of an iteration. A
    grpclib call is a dozen or so callbacks, so one pass per callback was most of
    poc_api's CPU per unary call. The drain is bounded by what was queued when it
    began, like asyncio's, so trio tasks still run between passes.
    """
    one = loop._main_loop_one  # trio-asyncio's own step: waits, runs one callback
    receive = loop._q_recv

    async def main_loop_one(no_wait: bool = False) -> None:
        await one(no_wait)
        if no_wait:
            return
        # trio-asyncio's own no-wait step runs one ready callback (expired timers
        # first) without a checkpoint, and raises WouldBlock when none is left.
        for _ in range(receive.statistics().current_buffer_used):
            try:
                await one(True)
            except trio.WouldBlock:
                return

    loop._main_loop_one = main_loop_one
