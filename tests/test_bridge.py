"""The trio <-> asyncio bridge on its own: batching of asyncio callbacks."""

from __future__ import annotations

import asyncio

import trio
import trio.lowlevel

from poc_api._bridge import open_bridge


class _StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if "_main_loop" in task.name:  # trio-asyncio's loop task
            self.steps += 1


async def test_ready_asyncio_callbacks_run_in_one_trio_step_each_batch() -> None:
    # A grpclib call is many small asyncio callbacks; running one per trio
    # scheduling pass cost most of a unary call's CPU.
    counter = _StepCounter()
    async with open_bridge() as bridge:

        async def schedule_many() -> list[int]:
            loop = asyncio.get_running_loop()
            order: list[int] = []
            done = loop.create_future()
            for i in range(500):
                loop.call_soon(order.append, i)
            loop.call_soon(done.set_result, None)
            await done
            return order

        trio.lowlevel.add_instrument(counter)
        try:
            order = await bridge.run(schedule_many)
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert order == list(range(500))  # FIFO, every one ran
    assert counter.steps < 50  # one per callback before batching (500+)


async def test_timers_still_fire_in_order_between_ready_callbacks() -> None:
    async with open_bridge() as bridge:

        async def mixed() -> list[str]:
            loop = asyncio.get_running_loop()
            seen: list[str] = []
            done = loop.create_future()
            loop.call_later(0.02, seen.append, "late")
            loop.call_later(0.01, seen.append, "early")
            for i in range(50):
                loop.call_soon(seen.append, f"soon{i}")
            loop.call_later(0.03, done.set_result, None)
            await done
            return seen

        seen = await bridge.run(mixed)
    assert seen == [f"soon{i}" for i in range(50)] + ["early", "late"]
