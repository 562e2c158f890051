"""A trio program that keeps the CPU busy, and the client's loop thread beside it."""

from __future__ import annotations

import time

import pytest
import trio
from reliability_helpers import ServerProcess

import poc_api


@pytest.mark.parametrize("call", ["unary", "stream"])
async def test_calls_go_on_beside_a_trio_task_that_keeps_the_cpu_busy(
    server_process: type[ServerProcess], port_pair: int, call: str
) -> None:
    # A trio task doing CPU work in 1 ms slices and checkpointing between them (good
    # trio manners; no poc_api in it) froze every gRPC call for seconds (up to 9 s
    # seen; one run made 2 calls in 5 s). CPython's GIL starves a thread woken from
    # I/O while another releases and retakes the GIL within its 5 ms switch
    # interval, as trio does with its non-blocking I/O check between batches. The
    # server is a process of its own: in this one its thread would starve too.
    proc = server_process(port_pair)
    proc.start()
    async with poc_api.ApiClient(proc.base_url, grpc_url=proc.grpc_url) as client:
        async with client.session() as s:
            await s.prefill([65, 66])
            worst = 0.0
            calls = 0
            async with trio.open_nursery() as nursery:

                async def busy() -> None:
                    while True:
                        t = time.perf_counter()
                        while time.perf_counter() - t < 0.001:
                            pass
                        await trio.lowlevel.checkpoint()

                nursery.start_soon(busy)
                end = time.perf_counter() + 3
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    with trio.fail_after(30):
                        if call == "unary":
                            await s.rewind(1)
                        else:  # the gap between one event and the next
                            sampling = poc_api.SamplingParams(max_tokens=20)
                            async with s.generate(sampling=sampling, rewind_to=2) as events:
                                async for _ in events:
                                    worst = max(worst, time.perf_counter() - t0)
                                    t0 = time.perf_counter()
                    worst = max(worst, time.perf_counter() - t0)
                    calls += 1
                nursery.cancel_scope.cancel()
    # A liveness bound, not a speed target: the starved calls took seconds each.
    assert worst < 1.0, f"{calls} calls in 3 s, the slowest {worst:.1f} s"
