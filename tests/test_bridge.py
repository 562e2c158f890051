"""The trio <-> asyncio bridge on its own: a loop thread, batched crossings."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from helpers import die_like_a_bug, kill_loop_thread, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from poc_api import _bridge as bridge_module
from poc_api._bridge import AsyncioBridge, Sink, _Mailbox, open_bridge


@pytest.fixture(autouse=True, params=["eventfd", "portable"])
def wake_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on both ways of waking the other thread (eventfds are Linux's)."""
    if request.param == "eventfd" and not bridge_module._USE_EVENTFD:
        pytest.skip("no eventfd here")
    monkeypatch.setattr(bridge_module, "_USE_EVENTFD", request.param == "eventfd")
    return str(request.param)


def _open_fds(collect: bool = False) -> set[int]:
    """The process's open fds; ``collect`` first closes what garbage still holds (an
    earlier test's, e.g. the client of a loop thread killed on purpose, which only
    the collector closes): it closed one mid-test, and the count came out short."""
    if collect:
        gc.collect()
    return {int(fd) for fd in os.listdir("/proc/self/fd")} if sys.platform == "linux" else set()


def _system_task_names() -> list[str]:
    root = trio.lowlevel.current_root_task()
    return [task.name for nursery in root.child_nurseries for task in nursery.child_tasks]


async def test_a_closed_bridge_leaves_no_file_descriptor_and_no_task(wake_path: str) -> None:
    async def noop() -> int:
        return 1

    with trio.fail_after(5):
        before_fds, before_tasks = _open_fds(collect=True), _system_task_names()
        async with open_bridge() as bridge:
            assert await bridge.run(noop) == 1
            during = _system_task_names()
        await trio.testing.wait_all_tasks_blocked()
        assert _open_fds() == before_fds
        assert _system_task_names() == before_tasks
    if wake_path == "eventfd":
        assert "poc_api bridge wake-ups" in during
        # A wake-up after the close raises (and is dropped by the caller); it
        # never writes to a number the process may have reused for another file.
        with pytest.raises(RuntimeError, match="closed"):
            bridge._wake_loop(None)


async def test_a_call_from_trio_starts_in_the_loop_iteration_that_woke_for_it(
    wake_path: str,
) -> None:
    """One trip through the loop's select per call, not one to wake and one more
    to start the task (Python 3.11 has no eager task start)."""
    if wake_path != "eventfd":
        pytest.skip("call_soon_threadsafe's callback starts the task one iteration late")

    async def noop() -> int:
        return 1

    with trio.fail_after(5):
        async with open_bridge() as bridge:
            selector: Any = bridge.loop._selector  # type: ignore[attr-defined]
            select = selector.select
            count = [0]

            def counting(timeout: float | None = None) -> Any:
                count[0] += 1
                return select(timeout)

            selector.select = counting
            for _ in range(50):
                await bridge.run(noop)
            selector.select = select
    assert count[0] <= 55, count[0]


async def test_a_finished_call_wakes_its_caller_in_the_pass_that_sees_it(wake_path: str) -> None:
    """One trio scheduler pass per call: the caller waits on an eventfd of its
    own, not on an event that the bridge's wake-up task sets one pass later."""
    if wake_path != "eventfd":
        pytest.skip("through the mailbox, the wake-up task runs first, then the caller")

    async def noop() -> int:
        return 1

    class CountPasses(trio.abc.Instrument):
        passes = 0

        def before_io_wait(self, timeout: float) -> None:
            self.passes += 1

    counter = CountPasses()
    with trio.fail_after(5):
        async with open_bridge() as bridge:
            await bridge.run(noop)
            trio.lowlevel.add_instrument(counter)
            for _ in range(50):
                await bridge.run(noop)
            trio.lowlevel.remove_instrument(counter)
    assert counter.passes <= 60, counter.passes


async def test_a_stale_wake_up_on_a_reused_eventfd_does_not_end_the_next_call(
    wake_path: str,
) -> None:
    """A call cancelled just as it finished leaves its write in the eventfd it
    hands back; the next call on that fd still waits for its own outcome."""
    if wake_path != "eventfd":
        pytest.skip("eventfds only")

    async def slow() -> int:
        await asyncio.sleep(0.05)
        return 42

    with trio.fail_after(5):
        async with open_bridge() as bridge:
            fd = bridge._take_fd()
            os.eventfd_write(fd, 1)  # what that cancelled call left behind
            bridge._free_fds.append(fd)
            assert await bridge.run(slow) == 42
            assert bridge._free_fds == [fd]


async def test_many_concurrent_calls_use_a_bounded_number_of_eventfds(wake_path: str) -> None:
    async def echo(i: int) -> int:
        await asyncio.sleep(0.02)
        return i

    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await bridge.run(echo, i)

    with trio.fail_after(10):
        before = _open_fds(collect=True)
        async with open_bridge() as bridge:
            async with trio.open_nursery() as nursery:
                for i in range(3 * bridge_module._MAX_CALL_FDS):
                    nursery.start_soon(one, i)
            made = len(bridge._call_fds)
            during = _open_fds()
        assert _open_fds() == before
    assert results == {i: i for i in range(3 * bridge_module._MAX_CALL_FDS)}
    assert made == (bridge_module._MAX_CALL_FDS if wake_path == "eventfd" else 0)
    if sys.platform == "linux":
        assert len(during - before) <= made + 8  # the loop's own, eventfds, epolls


async def test_calls_still_work_when_no_eventfd_can_be_made(
    wake_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def noop() -> int:
        return 1

    def out_of_fds(*args: object) -> int:
        raise OSError(24, "Too many open files")

    with trio.fail_after(5):
        async with open_bridge() as bridge:
            monkeypatch.setattr(bridge_module.os, "eventfd", out_of_fds)
            assert [await bridge.run(noop) for _ in range(3)] == [1, 1, 1]
            assert bridge._call_fds == []


def _count_wakes(bridge: AsyncioBridge) -> list[int]:
    """Count how often the loop thread woke the trio thread."""
    count = [0]
    wake = bridge._to_trio._wake

    def counting(fn: object) -> object:
        count[0] += 1
        return wake(fn)  # type: ignore[arg-type]

    bridge._to_trio._wake = counting
    return count


async def test_run_returns_the_result_and_raises_the_error_unchanged() -> None:
    async def ok(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    async def bad() -> None:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise ValueError("outer") from exc

    with trio.fail_after(5):
        async with open_bridge() as bridge:
            assert await bridge.run(ok, 21) == 42
            with pytest.raises(ValueError, match="outer") as info:
                await bridge.run(bad)
    assert isinstance(info.value.__cause__, KeyError)


async def test_the_loop_runs_in_its_own_thread_which_ends_with_the_block() -> None:
    async def where() -> threading.Thread:
        return threading.current_thread()

    with trio.fail_after(5):
        async with open_bridge() as bridge:
            thread = await bridge.run(where)
            assert thread is bridge.thread
            assert thread is not threading.current_thread()
    assert not thread.is_alive()
    assert bridge.loop.is_closed()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal masks")
async def test_signals_are_blocked_in_the_loop_thread() -> None:
    # Ctrl-C must only ever reach the trio thread.
    async def mask() -> set[signal.Signals]:
        return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))

    async with open_bridge() as bridge:
        blocked = await bridge.run(mask)
    assert {signal.SIGINT, signal.SIGTERM} <= blocked


async def test_cancelling_run_waits_for_the_asyncio_side_to_clean_up() -> None:
    cleaned: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0.05)  # cleanup that takes a while (a stream reset, say)
            cleaned.append("done")

    async with open_bridge() as bridge:
        with trio.move_on_after(0.05) as scope:
            await bridge.run(slow)
        assert scope.cancelled_caught
        assert cleaned == ["done"]  # before run() raised, not later


async def test_a_call_cancelled_before_it_started_never_runs() -> None:
    ran: list[int] = []
    gate = threading.Event()

    async def record() -> None:
        ran.append(1)

    async with open_bridge() as bridge:
        bridge.call_soon(lambda: gate.wait(5))  # the loop is busy: the call cannot start
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, lambda: (time.sleep(0.05), gate.set()))
            with trio.CancelScope() as scope:
                scope.cancel()
                await bridge.run(record)
    assert ran == []


def _record_where_tasks_die(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """Every task the bridge starts: the thread idents where they were freed."""
    started: list[int] = []
    freed_in: list[int] = []
    real = bridge_module._start_task

    def start(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
        task = real(loop, coro)
        started.append(1)
        weakref.finalize(task, lambda: freed_in.append(threading.get_ident()))
        return task

    monkeypatch.setattr(bridge_module, "_start_task", start)
    return started, freed_in


async def test_no_asyncio_task_is_freed_in_the_trio_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before 3.14 a task's death runs asyncio's WeakSet callback in that thread: in
    # the trio thread a Ctrl-C landing there is printed and lost (a CI run hung so).
    started, freed_in = _record_where_tasks_die(monkeypatch)

    async def now() -> int:
        return 1

    async def later() -> int:
        await asyncio.sleep(0.001)
        return 2

    async def fails() -> None:
        await asyncio.sleep(0)
        raise LookupError("x")

    async def produce(sink: Sink[int]) -> None:
        for i in range(50):
            sink.push(i)
            await asyncio.sleep(0)

    async def forever(sink: Sink[int]) -> None:
        await asyncio.sleep(3600)

    trio_thread = threading.get_ident()
    with trio.fail_after(10):
        async with open_bridge() as bridge:
            for _ in range(20):
                assert await bridge.run(now) == 1
                assert await bridge.run(later) == 2
                with pytest.raises(LookupError):
                    await bridge.run(fails)
                with trio.move_on_after(0.002):
                    await bridge.run(asyncio.sleep, 3600)
                async with bridge.stream(produce, max_items=8) as rx:
                    while await rx.receive_batch():
                        pass
                with trio.move_on_after(0.002):
                    async with bridge.stream(forever, max_items=8) as rx:
                        await rx.receive_batch()
    assert len(started) >= 20 * 4  # those cancelled at once may never have started
    # Freed by refcount as they ended: a reference cycle would leave them to the
    # garbage collector, which runs in whichever thread allocates at the time.
    assert len(freed_in) == len(started)
    assert trio_thread not in freed_in


async def test_a_result_that_loses_the_race_with_a_cancel_goes_to_abandoned() -> None:
    got: list[int] = []
    started = threading.Event()
    release = threading.Event()

    async def quick() -> int:
        started.set()
        release.wait(5)  # blocks the loop: the trio cancel arrives meanwhile
        return 7

    async with open_bridge() as bridge:
        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_when_started() -> None:
                    await trio.to_thread.run_sync(started.wait, 5)
                    scope.cancel()
                    release.set()

                nursery.start_soon(cancel_when_started)
                await bridge.run(quick, abandoned=got.append)
    assert got == [7]


@pytest.mark.usefixtures("python_handles_sigint")
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT")
def test_a_result_that_comes_during_a_ctrl_c_in_the_settle_goes_to_abandoned() -> None:
    # As above, and a Ctrl-C lands while the cancelled call settles: run() raises
    # KeyboardInterrupt, and the result that came meanwhile (an OpenSession's reply,
    # whose session the abandoned callback closes) is still handed over.
    got: list[int] = []
    started = threading.Event()
    release = threading.Event()

    async def quick() -> int:
        started.set()
        release.wait(5)  # blocks the loop: the trio cancel arrives meanwhile
        return 7

    def ctrl_c_then_release() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # handled in the trio thread, while it settles
        time.sleep(0.1)
        release.set()

    async def main() -> None:
        async with open_bridge() as bridge:
            with trio.move_on_after(5) as scope:
                async with trio.open_nursery() as nursery:

                    async def cancel_when_started() -> None:
                        await trio.to_thread.run_sync(started.wait, 5)
                        scope.cancel()
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(ctrl_c_then_release)

                    nursery.start_soon(cancel_when_started)
                    await bridge.run(quick, abandoned=got.append)

    with pytest.raises(BaseException) as info:
        trio.run(main)
    exc = info.value
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]  # (the test's own nursery)
    assert isinstance(exc, KeyboardInterrupt), repr(info.value)
    assert got == [7]


@pytest.mark.parametrize("take_over", [True, False])
async def test_a_detached_call_runs_on_while_the_cancel_propagates_at_once(take_over: bool) -> None:
    """``detach`` returning True keeps the task running (OpenSession's orphan
    handling); returning False cancels it as usual."""
    outcome: list[str] = []
    detached: list[asyncio.Task[object]] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(0.3)
            outcome.append("finished")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    def detach(task: asyncio.Task[object]) -> bool:
        detached.append(task)
        return take_over

    async with open_bridge() as bridge:
        with trio.fail_after(5):
            with trio.move_on_after(0.05):
                await bridge.run(slow, detach=detach)
            gave_up = trio.current_time()
            assert len(detached) == 1
            await wait_for(lambda: bool(outcome), timeout=2)
            # A detached call does not hold the caller for its remaining 0.25 s.
            assert outcome == (["finished"] if take_over else ["cancelled"])
            if take_over:
                assert trio.current_time() - gave_up > 0.1


def test_posting_wakes_the_other_side_only_at_flush_and_once_per_batch() -> None:
    wakes: list[object] = []
    box = _Mailbox(wakes.append)
    ran: list[int] = []
    for i in range(3):
        box.post(lambda i=i: ran.append(i))  # type: ignore[misc]
    assert wakes == []  # nothing wakes until the posting thread is about to block
    box.flush()
    box.flush()
    assert len(wakes) == 1
    wakes[0]()  # type: ignore[operator]
    assert ran == [0, 1, 2]
    box.post(lambda: ran.append(3))
    box.flush()
    assert len(wakes) == 2


async def test_many_calls_finishing_together_share_wake_ups() -> None:
    async def nap() -> None:
        await asyncio.sleep(0.05)

    async with open_bridge() as bridge:
        wakes = _count_wakes(bridge)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(bridge.run, nap)
    # One wake-up per call would be 200.
    assert wakes[0] < 50, wakes[0]


async def test_a_stream_is_drained_in_batches_in_order() -> None:
    async def produce(sink: Sink[int]) -> None:
        for i in range(5000):
            if sink.push(i):  # the buffer is full
                await sink.wait_space()

    async with open_bridge() as bridge:
        wakes = _count_wakes(bridge)
        got: list[int] = []
        batches = 0
        with trio.fail_after(10):
            async with bridge.stream(produce, max_items=256) as rx:
                while batch := await rx.receive_batch():
                    batches += 1
                    got.extend(batch)
    assert got == list(range(5000))
    assert batches < 200 and wakes[0] < 200, (batches, wakes[0])


@settings(max_examples=40)
@given(
    sizes=st.lists(st.integers(0, 3000), max_size=300),
    max_items=st.integers(1, 64),
    max_bytes=st.integers(1, 8000),
    consumer_naps=st.booleans(),
)
def test_a_byte_bounded_stream_keeps_every_batch_within_its_bounds(
    sizes: list[int], max_items: int, max_bytes: int, consumer_naps: bool
) -> None:
    # Each batch the consumer takes is what the buffer held: at most max_items
    # items, and under max_bytes before its last item (one item always fits).
    items = [bytes([i % 256]) * n for i, n in enumerate(sizes)]

    async def produce(sink: Sink[bytes]) -> None:
        for item in items:
            if sink.push(item):
                await sink.wait_space()

    async def main() -> list[list[bytes]]:
        batches = []
        async with open_bridge() as bridge:
            with trio.fail_after(10):
                async with bridge.stream(produce, max_items=max_items, max_bytes=max_bytes) as rx:
                    while batch := await rx.receive_batch():
                        batches.append(batch)
                        if consumer_naps:
                            await trio.sleep(0.001)
        return batches

    batches = trio.run(main)
    assert [item for batch in batches for item in batch] == items
    for batch in batches:
        assert len(batch) <= max_items
        assert sum(map(len, batch[:-1])) < max_bytes


@pytest.mark.parametrize("when", ["running", "not yet started"])
async def test_aborted_streams_end_as_closed_and_later_ones_do_not_start(when: str) -> None:
    # The client's close aborts the streams first (abort_calls): each consumer
    # gets ClosedResourceError, not an end that looks like the stream's own.
    produced = 0

    async def produce(sink: Sink[int]) -> None:
        nonlocal produced
        while True:
            produced += 1
            sink.push(produced)
            await asyncio.sleep(0.001)

    async with open_bridge() as bridge:
        with trio.fail_after(5):
            async with bridge.stream(produce, max_items=1000) as rx:
                if when == "running":
                    assert await rx.receive_batch()
                bridge.abort_calls()  # "not yet started": its start is still queued
                with pytest.raises(trio.ClosedResourceError):
                    while True:
                        await rx.receive_batch()
            if when == "not yet started":
                assert produced == 0
            with pytest.raises(trio.ClosedResourceError):
                async with bridge.stream(produce, max_items=1000):
                    raise AssertionError("a stream started after the abort")


async def test_abort_calls_ends_abortable_runs_only() -> None:
    async def nap() -> str:
        await asyncio.sleep(30)
        return "slept"

    async def quick() -> str:
        return "done"

    async with open_bridge() as bridge:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def abortable() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await bridge.run(nap, abortable=True)

                nursery.start_soon(abortable)
                await trio.sleep(0.05)
                bridge.abort_calls()
            with pytest.raises(trio.ClosedResourceError):
                await bridge.run(quick, abortable=True)
            assert await bridge.run(quick) == "done"  # the close's own calls still run


async def test_a_full_buffer_pauses_the_producer_until_the_consumer_reads() -> None:
    produced: list[int] = []

    async def produce(sink: Sink[int]) -> None:
        for i in range(100):
            full = sink.push(i)
            produced.append(i)
            if full:
                await sink.wait_space()

    async with open_bridge() as bridge:
        async with bridge.stream(produce, max_items=10) as rx:
            await trio.sleep(0.1)
            assert len(produced) == 10  # stopped at the bound
            total = 0
            with trio.fail_after(5):
                while batch := await rx.receive_batch():
                    total += len(batch)
    assert total == 100


@pytest.mark.skipif(sys.version_info < (3, 12), reason="needs asyncio's eager task start")
async def test_items_pushed_as_the_producer_ends_reach_a_consumer_that_looks_at_once() -> None:
    # Pushes reach the buffer right before the loop selects; the producer's end
    # must bring them along, or a trio consumer looking between the two (in its own
    # thread) finds the stream finished and empty: events lost.
    holding, release = threading.Event(), threading.Event()

    async def produce(sink: Sink[int]) -> None:
        for i in range(3):
            sink.push(i)

    def hold() -> None:  # the loop thread, right after the producer ended
        holding.set()
        release.wait(5)

    async with open_bridge() as bridge:
        try:
            async with bridge.stream(produce, max_items=10) as rx:
                bridge.call_soon(hold)  # the same wake-up as the producer's start
                assert await trio.to_thread.run_sync(holding.wait, 5)
                with trio.fail_after(5):
                    assert await rx.receive_batch() == [0, 1, 2]
                    assert await rx.receive_batch() == []
        finally:
            release.set()


async def test_items_pushed_in_a_producers_last_step_arrive_before_its_end() -> None:
    # As the test above, on any Python: the producer's last step pushes and returns,
    # and the loop is held right after it in the same iteration, before the flush
    # that runs as the loop selects. Its end must bring the items along.
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(5)

    async def produce(sink: Sink[int]) -> None:
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()

        def go() -> None:
            wake.set_result(None)  # queues this task's next step ...
            loop.call_soon(hold)  # ... and the hold right after it

        loop.call_soon(go)
        await wake
        for i in range(3):
            sink.push(i)

    async with open_bridge() as bridge:
        try:
            async with bridge.stream(produce, max_items=10) as rx:
                assert await trio.to_thread.run_sync(holding.wait, 5)
                with trio.fail_after(5):
                    batch = await rx.receive_batch()
                    release.set()  # the rest needs the loop
                    assert batch == [0, 1, 2]
                    assert await rx.receive_batch() == []
        finally:
            release.set()


async def test_the_producers_error_comes_from_receive_batch() -> None:
    async def produce(sink: Sink[int]) -> None:
        sink.push(1)
        raise LookupError("producer failed")

    async with open_bridge() as bridge:
        async with bridge.stream(produce, max_items=10) as rx:
            with trio.fail_after(5):
                assert await rx.receive_batch() == [1]
                with pytest.raises(LookupError, match="producer failed"):
                    await rx.receive_batch()


async def test_leaving_a_stream_block_cancels_the_producer_and_keeps_the_exception() -> None:
    state: list[str] = []

    async def produce(sink: Sink[int]) -> None:
        try:
            while True:
                sink.push(1)
                await asyncio.sleep(0.001)
        finally:
            state.append("producer ended")

    mine = ExceptionGroup("mine", [ValueError("x")])
    async with open_bridge() as bridge:
        with pytest.raises(ExceptionGroup) as info:
            async with bridge.stream(produce, max_items=10) as rx:
                await rx.receive_batch()
                raise mine
    # The user's own group leaves as it was raised, and the producer is gone.
    assert info.value is mine
    assert state == ["producer ended"]


async def test_closing_fails_waiting_calls_with_closed_resource_error() -> None:
    async def forever() -> None:
        await asyncio.sleep(3600)

    bridge = AsyncioBridge.start(cancel_timeout=1.0)

    async def waiter() -> None:
        await bridge.run(forever)

    assert await _closed_under(bridge, waiter) == 1
    with pytest.raises(trio.ClosedResourceError):
        await bridge.run(forever)


async def test_closing_wakes_a_stream_consumer_whose_producer_ignores_cancellation() -> None:
    async def stubborn(sink: Sink[int]) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # a producer that will not stop: the loop is stopped under it

    bridge = AsyncioBridge.start(cancel_timeout=0.2)

    async def consumer() -> None:
        async with bridge.stream(stubborn, max_items=4) as rx:
            await rx.receive_batch()

    assert await _closed_under(bridge, consumer) == 1


async def test_closing_wakes_a_caller_whose_coroutine_ignores_cancellation() -> None:
    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # will not stop: the loop is stopped under it

    bridge = AsyncioBridge.start(cancel_timeout=0.2)

    async def caller() -> None:
        await bridge.run(stubborn)

    assert await _closed_under(bridge, caller) == 1


async def test_closing_under_a_wedged_loop_thread_keeps_outcomes_and_wakes_every_caller() -> None:
    # A call that finished just before the loop thread wedged (a callback that
    # blocks it) never had its outcome flushed to trio: the close must still wake
    # its caller, with its own result, not a ClosedResourceError in its place.
    hold, release = threading.Event(), threading.Event()

    async def held() -> None:
        hold.wait(5)  # blocks the loop thread while trio queues the next two calls

    async def quick() -> int:
        return 7

    async def wedge() -> None:
        release.wait(30)  # blocks the loop thread before it flushes quick's outcome

    bridge = AsyncioBridge.start(cancel_timeout=0.1)
    outcomes: dict[str, object] = {}

    async def call(name: str, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            outcomes[name] = await bridge.run(fn)
        except trio.ClosedResourceError:
            outcomes[name] = "closed"

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "held", held)
                await trio.sleep(0.05)
                # Posted in this order in separate passes, both start in the one
                # loop iteration after `held` returns: quick ends, then wedge blocks.
                nursery.start_soon(call, "quick", quick)
                await trio.sleep(0.05)
                nursery.start_soon(call, "wedge", wedge)
                await trio.sleep(0.05)
                hold.set()
                await trio.sleep(0.1)
                await bridge.aclose()
            # Its wake-up task has ended too: left, it would serve on at the run's
            # end (3 x cancel_timeout) for a thread that will never post again.
            await trio.testing.wait_all_tasks_blocked()
            root = trio.lowlevel.current_root_task()
            assert root is not None
            assert not [
                task
                for nursery in root.child_nurseries
                for task in nursery.child_tasks
                if task.name == "poc_api bridge wake-ups"
            ]
    finally:
        release.set()
        bridge.thread.join(5)
        _close_left_behind(bridge)
    assert outcomes == {"held": None, "quick": 7, "wedge": "closed"}


async def test_a_wedged_call_that_ends_as_the_close_fails_it_is_finished_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The close fails the calls a wedged loop thread holds (_fail_unfinished) while
    # that thread may un-wedge and finish them itself (_finish): both tested, then
    # set, `finished` unlocked. The loop is let go right between trio's test and
    # set (as the close makes the call's error): it finished the call, returned 7,
    # and the close then failed it again, its outcome replaced and on_done run twice.
    release, finished_there = threading.Event(), threading.Event()
    done_in: list[str] = []

    async def wedged() -> int:
        release.wait(30)
        return 7

    def on_done(call: Any) -> None:
        done_in.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            finished_there.set()

    def error() -> BaseException:
        # (Only for this call: the close's own shutdown call is failed too.)
        if sys._getframe(1).f_locals.get("left") is call and not release.is_set():
            release.set()
            finished_there.wait(5)
        return trio.ClosedResourceError("closed under the call")

    bridge = AsyncioBridge.start(cancel_timeout=0.1)
    try:
        with trio.fail_after(10):
            call = bridge._submit(wedged, (), on_done)
            await trio.sleep(0.05)  # the loop thread is now wedged in `wedged`
            monkeypatch.setattr(bridge_module, "closed_under_call", error)
            await bridge.aclose()
    finally:
        release.set()
        bridge.thread.join(5)
        _close_left_behind(bridge)
    assert len(done_in) == 1
    assert call.error is None and call.result == 7


async def test_a_wedged_call_returning_as_the_close_fails_it_keeps_one_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The loop thread un-wedges, its call returns 7, and the close fails the call
    # before the loop finishes it (_forget, _finish): the result was recorded first,
    # unlocked, and the close's error went next to it (returned and failed at once:
    # the caller got ClosedResourceError for a call that returned). One outcome, the
    # first to claim the call: recorded and finished in one locked step now.
    release, recorded, failed = threading.Event(), threading.Event(), threading.Event()

    async def wedged() -> int:
        release.wait(30)
        return 7

    bridge = AsyncioBridge.start(cancel_timeout=0.1)
    forget = bridge._forget

    def slow_forget(call: Any, *outcome: Any) -> None:
        if call is wedged_call:
            recorded.set()  # the call has returned; _finish not yet run
            failed.wait(5)
        forget(call, *outcome)

    def error() -> BaseException:
        if sys._getframe(1).f_locals.get("left") is wedged_call and not release.is_set():
            release.set()
            recorded.wait(5)
        return trio.ClosedResourceError("closed under the call")

    try:
        with trio.fail_after(10):
            wedged_call = bridge._submit(wedged, ())
            await trio.sleep(0.05)  # the loop thread is now wedged in `wedged`
            monkeypatch.setattr(bridge, "_forget", slow_forget)
            monkeypatch.setattr(bridge_module, "closed_under_call", error)
            await bridge.aclose()
    finally:
        failed.set()
        release.set()
        bridge.thread.join(5)
        _close_left_behind(bridge)
    assert wedged_call.finished
    assert wedged_call.returned != (wedged_call.error is not None), (
        wedged_call.returned,
        wedged_call.error,
    )


def _close_left_behind(bridge: AsyncioBridge) -> None:
    """After a close that left a wedged loop thread behind (now ended): end its
    loop's tasks here, then close it. (Its queued shutdown may start meanwhile and
    cancel this drain: go again.)"""
    loop = bridge.loop

    async def drain(tasks: set[asyncio.Task[Any]]) -> None:
        await asyncio.wait(tasks)

    for _ in range(5):
        tasks = asyncio.all_tasks(loop)
        if not tasks:
            break
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(drain(tasks))
    loop.close()
    bridge._close_eventfds()


async def _closed_under(bridge: AsyncioBridge, user: Callable[[], Awaitable[None]]) -> int:
    """Close ``bridge`` while ``user`` waits on it; how many ClosedResourceErrors it got."""
    failures: list[BaseException] = []

    async def run_user() -> None:
        try:
            await user()
        except trio.ClosedResourceError as exc:
            failures.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_user)
            await trio.sleep(0.05)
            await bridge.aclose()
    return len(failures)


def test_importing_poc_api_changes_nothing_in_asyncio() -> None:
    code = textwrap.dedent(
        """
        import asyncio, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        before = (asyncio.get_event_loop_policy(), asyncio.get_running_loop,
                  asyncio.get_event_loop, asyncio.current_task, asyncio.new_event_loop)
        import poc_api, trio
        after = (asyncio.get_event_loop_policy(), asyncio.get_running_loop,
                 asyncio.get_event_loop, asyncio.current_task, asyncio.new_event_loop)
        assert before == after, (before, after)

        async def main():
            loop = asyncio.new_event_loop()   # trio-asyncio's policy refused this
            loop.close()

        trio.run(main)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="trio-asyncio does not import on 3.14+")
def test_a_program_that_also_uses_trio_asyncio_can_use_the_client_and_server() -> None:
    # trio-asyncio swaps the process-wide asyncio policy and refuses to make loops
    # inside trio; neither the client's loop thread nor the server's may care.
    code = textwrap.dedent(
        """
        import trio, trio_asyncio, poc_api
        from poc_api.testing import open_client, reference_server

        async def main():
            async with trio_asyncio.open_loop():
                async with reference_server() as srv, open_client(srv) as client:
                    async with client.session() as s:
                        done = await s.prefill([1, 2, 3])
                    print(done.total_tokens)

        trio.run(main)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


# -- the GIL hand-over (a busy trio beside the loop thread) -------------------------


async def _busy(seconds: float) -> None:
    """A trio task that keeps the CPU busy, checkpointing every 50 µs."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.00005:
            pass
        await trio.lowlevel.checkpoint()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="epoll only")
async def test_a_loop_thread_blocked_elsewhere_does_not_slow_a_busy_trio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The hand-over sleeps only help a thread that waits for the GIL. One blocked
    # without it (here on an Event; a wedged callback) made trio sleep ~2 ms every
    # 2 ms for as long as it lasted: a busy trio task ran at a fortieth of its speed.
    sleeps: list[float] = []
    real_sleep = time.sleep

    def counted(seconds: float) -> None:
        sleeps.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(bridge_module.time, "sleep", counted)
    release = threading.Event()
    async with bridge_module.open_bridge() as bridge:
        bridge.call_soon(lambda: release.wait(5))
        try:
            await _busy(0.5)
        finally:
            release.set()
    # With backoff (starved after 2 ms, 4 ms, ... 1 s) 0.5 s of busy trio sees at most
    # ~9 hand-overs of at most _GIL_HANDOVER_MAX / _GIL_HANDOVER_STEP = 20 sleeps each
    # (each sleep lasts at least its step), so < 200; without it, one every ~4 ms:
    # ~125 hand-overs, ~2,500 sleeps. (< 100 failed in CI at 108: a loaded machine's
    # hand-over can take all its 20 steps.)
    per_hand_over = round(bridge_module._GIL_HANDOVER_MAX / bridge_module._GIL_HANDOVER_STEP)
    assert len(sleeps) < 10 * (per_hand_over + 1), len(sleeps)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_closed_bridge_leaves_no_instrument_behind_also_when_its_thread_died() -> None:
    # The instrument (wake-ups, the GIL hand-over) was removed only by a clean stop:
    # after a loop thread that died (or was left wedged) it stayed for the whole run,
    # handing the GIL over to nobody.
    bridge = bridge_module.AsyncioBridge.start()
    bridge.call_soon(die_like_a_bug)
    await wait_for(lambda: not bridge.thread.is_alive(), timeout=5)
    await bridge.aclose()
    with pytest.raises(KeyError):
        trio.lowlevel.remove_instrument(bridge._instrument)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_bridge_closed_before_its_wake_up_task_first_ran_ends_that_task(
    wake_path: str,
) -> None:
    # CI: the wake-up task's first step came after a close in the same scheduler pass
    # (trio runs a batch in either order): it waited on the closed eventfd, -1, and
    # the run died with TrioInternalError. Here nothing checkpoints between start and
    # close, so that task's first step always comes after it.
    bridge = bridge_module.AsyncioBridge.start()
    kill_loop_thread(bridge)
    await bridge.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert "poc_api bridge wake-ups" not in _system_task_names()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_loop_thread_that_died_fails_waiting_and_later_calls_at_once() -> None:
    # Nothing noticed the death until aclose(): a call waiting then, and every call
    # made later, waited for ever (and ApiClient.aclose with them: see test_lifetime).
    # Each waiter gets an exception of its own (one shared would mix their tracebacks).
    started = threading.Semaphore(0)

    async def forever() -> None:
        started.release()
        await asyncio.Event().wait()

    async def work() -> int:
        return 42

    bridge = bridge_module.AsyncioBridge.start()
    try:
        with trio.fail_after(3):
            assert await bridge.run(work) == 42
            async with trio.open_nursery() as nursery:
                waiting: list[BaseException] = []

                async def wait_forever() -> None:
                    with pytest.raises(trio.ClosedResourceError) as caught:
                        await bridge.run(forever)
                    waiting.append(caught.value)

                for _ in range(2):
                    nursery.start_soon(wait_forever)
                for _ in range(2):
                    await wait_for(lambda: started.acquire(blocking=False))
                kill_loop_thread(bridge)
            assert all("asyncio thread" in str(exc) for exc in waiting)
            assert waiting[0] is not waiting[1]
            with pytest.raises(trio.ClosedResourceError, match="asyncio thread"):
                await bridge.run(work)
            # A call refused at once gives its eventfd back: each one made a new
            # eventfd (until 32 were open), kept until the close.
            made = len(bridge._call_fds)
            for _ in range(40):
                with pytest.raises(trio.ClosedResourceError, match="asyncio thread"):
                    await bridge.run(work)
            assert len(bridge._call_fds) == made
    finally:
        await bridge.aclose()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_call_woken_as_a_bridge_with_a_dead_thread_closes_keeps_its_outcome(
    wake_path: str,
) -> None:
    # A caller woken by its eventfd in the scheduler pass of a close that comes first
    # (trio runs a batch in either order; a close after the thread died has no
    # checkpoint) read the closed fd: OSError(EBADF), or another fd reusing its number.
    # Twenty closes: each comes first half of the time.
    async def gated() -> int:
        gate.append(asyncio.get_running_loop().create_future())
        await gate[-1]
        return 42

    def release_and_die() -> None:
        gate[-1].set_result(None)
        asyncio.get_running_loop().call_soon(die_like_a_bug)

    for _ in range(20):
        gate: list[asyncio.Future[None]] = []
        bridge = bridge_module.AsyncioBridge.start()
        outcome: list[object] = []

        async def caller(bridge: AsyncioBridge = bridge, outcome: list[object] = outcome) -> None:
            try:
                outcome.append(await bridge.run(gated))
            except (trio.ClosedResourceError, OSError) as exc:
                outcome.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller)
                await wait_for(lambda gate=gate: bool(gate))  # type: ignore[misc]
                bridge.loop.call_soon_threadsafe(release_and_die)
                bridge.thread.join(5)
                # The caller's fd is readable: both tasks run in the next pass.
                await trio.lowlevel.checkpoint()
                await bridge.aclose()
        # (It finished before the thread died: its outcome is 42, not a failure.)
        assert outcome == [42]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_loop_thread_that_dies_during_the_close_does_not_hold_it_up() -> None:
    # The close waited twice cancel_timeout for its shutdown step, which the dead
    # thread would never finish.
    started = threading.Event()

    async def dies_when_cancelled() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            asyncio.get_running_loop().call_soon(die_like_a_bug)

    bridge = bridge_module.AsyncioBridge.start(cancel_timeout=5)
    async with trio.open_nursery() as nursery:

        async def run_it() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await bridge.run(dies_when_cancelled)

        nursery.start_soon(run_it)
        await wait_for(started.is_set)
        began = trio.current_time()
        await bridge.aclose()  # (shielded: a fail_after could not end it)
        assert trio.current_time() - began < 2
    assert not bridge.thread.is_alive()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_bridge_closed_while_its_dead_thread_is_still_exiting_closes() -> None:
    # The death is known in trio before the thread is done exiting: the close took
    # the thread for alive, submitted its shutdown step and failed with the death.
    bridge = bridge_module.AsyncioBridge.start()
    token, exiting, released = bridge._token, threading.Event(), threading.Event()

    class Lingering:
        def run_sync_soon(self, fn: Callable[[], object]) -> None:
            token.run_sync_soon(fn)
            if fn == bridge._thread_ended:
                exiting.set()
                released.wait(5)  # the thread lingers after telling trio

    bridge._token = Lingering()  # type: ignore[assignment]
    bridge.loop.call_soon_threadsafe(die_like_a_bug)
    try:
        await wait_for(exiting.is_set)
        await trio.testing.wait_all_tasks_blocked()  # _thread_ended has run
        assert bridge.thread.is_alive()
        threading.Timer(0.05, released.set).start()  # (the close joins the thread)
        await bridge.aclose()
    finally:
        released.set()
    assert not bridge.thread.is_alive()
