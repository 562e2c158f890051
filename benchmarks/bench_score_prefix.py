"""Prefix-shared scoring vs one ``score`` call per full prompt, on the reference server.

Run by ``run.py`` (phase ``score_prefix``) as a worker process of its own::

    python benchmarks/bench_score_prefix.py --params '{...}' --out result.json

It starts ``python -m poc_api.server`` in a subprocess with a simulated prefill
cost per position (``--prefill-delay-us``: without it the reference server's
prefill is nearly free and there is nothing to save), then times, best of
``repeats``:

- ``separate``: N sequential ``client.score`` calls, each on the full prompt
  (prompt + continuation), over the continuation's positions;
- ``shared``: one ``client.score_continuations`` call (prompt prefilled once);
- ``concurrent``: ``client.score_many`` of the N full prompts (16 at once), for
  the record: the simulated server overlaps concurrent prefills for free, which
  a real GPU does not.

Every variant's results must be equal (exactly), and the server's
``tokens_appended`` counter (``GET /admin/state``) gives the positions each sent.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio

import poc_api
from poc_api import ScoreResult, Tokens
from poc_api.server import tokenize

T = TypeVar("T")

_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity, it was the season of Light, it was the season of Darkness. "
)


def start_server(delay_us: float, *extra: str) -> tuple[subprocess.Popen[str], str, str]:
    """``python -m poc_api.server`` on free ports with ``--prefill-delay-us delay_us``
    and the ``extra`` flags; returns it, base_url and grpc_url."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "poc_api.server",
            "--port",
            "0",
            "--prefill-delay-us",
            str(delay_us),
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    urls: dict[str, str] = {}
    try:
        while len(urls) < 2:
            key, _, value = lines.get(timeout=30).strip().partition(": ")
            urls[key] = value
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, urls["base_url"], urls["grpc_url"]


def stop_server(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, 10 s to exit, then SIGKILL."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def measure(base_url: str, grpc_url: str, p: dict[str, Any]) -> dict[str, Any]:
    """Time the three variants; check their results agree; read the server's counters."""
    n, cont_len, prompt_len = p["prefix_n"], p["prefix_cont"], p["prefix_prompt"]
    text = tokenize(_TEXT * (prompt_len // len(_TEXT) + 2))
    prompt = text[:prompt_len]
    conts = [text[7 * i : 7 * i + cont_len] for i in range(n)]
    full = [([Tokens(prompt + c)], [(prompt_len, prompt_len + cont_len)]) for c in conts]
    state_url = base_url.removesuffix("/v1") + "/admin/state"

    async def appended() -> int:
        r = await trio.to_thread.run_sync(lambda: httpx.get(state_url, timeout=10))
        return int(r.json()["tokens_appended"])

    async def timed(fn: Callable[[], Awaitable[T]]) -> tuple[float, int, T]:
        before = await appended()
        t0 = time.perf_counter()
        out = await fn()
        wall = time.perf_counter() - t0
        return wall, await appended() - before, out

    async with poc_api.ApiClient(base_url, grpc_url=grpc_url) as client:

        async def separate() -> list[ScoreResult]:
            return [(await client.score(c, r))[0] for c, r in full]

        async def shared() -> list[ScoreResult]:
            return await client.score_continuations([Tokens(prompt)], conts)

        async def concurrent() -> list[ScoreResult]:
            return [r for [r] in await client.score_many(full, max_concurrency=n)]

        await client.score([Tokens(prompt[:8])], [(1, 8)])  # connect, warm up
        best: dict[str, tuple[float, int]] = {}
        results: dict[str, list[ScoreResult]] = {}
        for _ in range(p["repeats"]):
            for name, fn in (
                ("separate", separate),
                ("shared", shared),
                ("concurrent", concurrent),
            ):
                wall, positions, out = await timed(fn)
                results[name] = out
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, positions)
    if not results["separate"] == results["shared"] == results["concurrent"]:
        raise SystemExit("score_continuations disagrees with separate score calls")
    return {
        "prompt": prompt_len,
        "n": n,
        "cont": cont_len,
        "delay_us": p["prefix_delay_us"],
        "repeats": p["repeats"],
        **{f"{k}_s": v[0] for k, v in best.items()},
        **{f"{k}_positions": v[1] for k, v in best.items()},
        "ratio": best["separate"][0] / best["shared"][0],
    }


def main() -> None:
    """Run the measurement against a fresh server process; write JSON to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="JSON: prefix_* keys and repeats")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    params = json.loads(args.params)
    proc, base_url, grpc_url = start_server(params["prefix_delay_us"], "--max-context", "1000000")
    try:
        result = trio.run(measure, base_url, grpc_url, params)
    finally:
        stop_server(proc)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
