"""Decode throughput of ``poc_api._wire.decode_generate_event`` vs betterproto2.

Usage::

    python benchmarks/bench_decode.py [--quick]

Prints events/s for each decoder and the speed-up, for four typical
``GenerateEvent``s, then the time betterproto2 takes to serialize a large
``GenerateRequest`` (8,192 append tokens and one readout range).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from poc_api._proto.salience import (
    Done,
    GenerateEvent,
    GenerateRequest,
    PositionRange,
    Token,
    TopLogprob,
)
from poc_api._wire import decode_generate_event


def _events() -> dict[str, bytes]:
    rng = random.Random(0)
    base: dict[str, Any] = {
        "id": 151_234,
        "is_prefill": False,
        "position": 4_321,
        "sampled_logprob": -0.123,
    }
    # 8 layers x 32 concepts, layer-major.
    readout = [rng.uniform(-4.0, 4.0) for _ in range(8 * 32)]
    tops = [TopLogprob(id=rng.randrange(152_000), logprob=-0.5 * i) for i in range(5)]
    return {
        "plain token": bytes(GenerateEvent(token=Token(**base))),
        "token + 256-float readout": bytes(GenerateEvent(token=Token(**base, readout=readout))),
        "token + top_logprobs k=5": bytes(GenerateEvent(token=Token(**base, top_logprobs=tops))),
        "done": bytes(
            GenerateEvent(
                done=Done(
                    prompt_tokens=1_234,
                    completion_tokens=256,
                    total_tokens=1_490,
                    finish_reason="length",
                )
            )
        ),
    }


def _rate(fn: Callable[[], object], min_time: float, repeats: int) -> float:
    """Best-of-``repeats`` calls per second, each repeat running >= ``min_time`` s."""
    n = 1
    while True:  # calibrate the loop count
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_time / 5:
            break
        n *= 2
    n *= 5
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    args = parser.parse_args()
    min_time, repeats = (0.05, 2) if args.quick else (0.3, 5)

    print(f"{'event':<28}{'bytes':>7}{'ours ev/s':>13}{'betterproto2':>14}{'ratio':>8}")
    for name, data in _events().items():
        ours = _rate(partial(decode_generate_event, data), min_time, repeats)
        theirs = _rate(partial(GenerateEvent.parse, data), min_time, repeats)
        print(f"{name:<28}{len(data):>7}{ours:>13,.0f}{theirs:>14,.0f}{ours / theirs:>7.1f}x")

    request = GenerateRequest(
        session_id="0123456789abcdef",
        append_tokens=list(range(100_000, 100_000 + 8_192)),
        offset=4_096,
        max_tokens=256,
        readout_ranges=[PositionRange(start=4_096, end=4_096 + 8_192)],
    )
    per_call = 1.0 / _rate(lambda: bytes(request), min_time, repeats)
    print(
        f"\nbytes(GenerateRequest) with 8,192 append tokens + 1 range: "
        f"{per_call * 1e3:.2f} ms ({len(bytes(request)):,} bytes)"
    )


if __name__ == "__main__":
    main()
