"""Soak test: long mixed traffic with random cancellations; watches RSS and fds.

Usage (``nox -s soak`` runs it)::

    python benchmarks/soak.py [--minutes 10] [--seconds S] [--concurrency 16] [--seed N]

It starts a reference server process (``python -m poc_api.server``), then drives
one ``ApiClient`` from ``--concurrency`` tasks doing a random mix of sessions
(prefill, image appends, generate streams), multi-turn conversations, scores and
readout-manifest fetches, cancelling a third of them at a random moment.
Every ``--interval`` seconds (default 10) it prints the client's RSS
(``/proc/self/status``) and open file descriptors (``/proc/self/fd``).

After the run it stops the traffic, lets the client settle, takes a last sample
and exits non-zero when, compared with the sample at the end of the warm-up
(the first fifth of the run, at least one interval):

- RSS grew by more than ``--max-rss-growth-mb`` (default 20 MB), or
- the number of open fds grew, or
- any call failed with something other than cancellation.

Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

import poc_api
from poc_api import Image, SamplingParams, Tokens
from poc_api.server._app import bind_port_pair

HELLO = list(b"The quick brown fox jumps over the lazy dog. ")


def make_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\x80" * (width * 3) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


PNG = make_png(56, 28)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Sample:
    elapsed: float
    rss_mb: float
    fds: int
    ops: int


@dataclass
class Stats:
    ops: Counter[str] = field(default_factory=Counter)
    cancelled: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class Traffic:
    """The mix of operations; each may be cancelled at a random moment."""

    def __init__(self, client: poc_api.ApiClient, rng: random.Random, stats: Stats) -> None:
        self.client = client
        self.rng = rng
        self.stats = stats

    async def session(self) -> None:
        async with self.client.session() as s:
            await s.prefill(HELLO[: self.rng.randint(1, len(HELLO))])
            if self.rng.random() < 0.3:
                await s.append_image(PNG, "image/png")
            budget = self.rng.choice([1, 8, 64, 512])
            async with s.generate(
                [32],
                sampling=SamplingParams(max_tokens=budget, logprob_top_k=self.rng.choice([0, 3])),
                logprobs_ranges=[(0, 4)],
            ) as events:
                async for _ in events:
                    pass

    async def conversation(self) -> None:
        async with self.client.conversation() as conv:
            history: list[poc_api.Chunk] = [Tokens(HELLO)]
            if self.rng.random() < 0.3:
                history.append(Image(PNG, "image/png"))
            for _ in range(self.rng.randint(1, 4)):
                async with conv.stream(
                    history, SamplingParams(max_tokens=self.rng.choice([4, 16, 64]))
                ) as events:
                    decoded = [e.id async for e in events if isinstance(e, poc_api.TokenOut)]
                history = [*history, Tokens(decoded), Tokens([32])]

    async def score(self) -> None:
        chunks: list[poc_api.Chunk] = [Tokens(HELLO)]
        if self.rng.random() < 0.3:
            chunks += [Image(PNG, "image/png"), Tokens(HELLO[:8])]
        await self.client.score(chunks, [(1, 5), (3, 20)])

    async def long_stream(self) -> None:
        async with (
            self.client.session() as s,
            s.generate(HELLO, sampling=SamplingParams(max_tokens=100_000)) as events,
        ):
            n, stop = 0, self.rng.randint(10, 5000)
            async for _ in events:
                n += 1
                if n >= stop:
                    break  # leave early: the stream is reset

    async def stalled_reader(self) -> None:
        # An agent that stops reading: its stream's window fills while the other
        # tasks' calls on the same connection must go on (their fail_after guards it).
        async with (
            self.client.session() as s,
            s.generate(HELLO, sampling=SamplingParams(max_tokens=1_000_000)) as events,
        ):
            await events.__anext__()
            await trio.sleep(self.rng.uniform(0.2, 2.0))

    async def manifest(self) -> None:
        await self.client.readout_manifest()

    async def one(self) -> None:
        name, op = self.rng.choice(
            [
                ("session", self.session),
                ("session", self.session),
                ("conversation", self.conversation),
                ("conversation", self.conversation),
                ("score", self.score),
                ("long_stream", self.long_stream),
                ("stalled_reader", self.stalled_reader),
                ("manifest", self.manifest),
            ]
        )
        cancel_after = self.rng.uniform(0, 0.05) if self.rng.random() < 1 / 3 else None
        self.stats.ops[name] += 1
        try:
            with trio.CancelScope() as scope:
                if cancel_after is not None:
                    scope.deadline = trio.current_time() + cancel_after
                with trio.fail_after(60):  # a hang is an error, not a slow soak
                    await op()
            if scope.cancelled_caught:
                self.stats.cancelled[name] += 1
        except Exception as exc:
            self.stats.errors.append(f"{name}: {type(exc).__name__}: {exc}")


async def soak(args: argparse.Namespace, base_url: str, grpc_url: str) -> int:
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    warmup = max(args.interval, duration / 5)
    rng = random.Random(args.seed)
    stats = Stats()
    samples: list[Sample] = []
    started = time.monotonic()

    def sample() -> Sample:
        s = Sample(time.monotonic() - started, rss_mb(), open_fds(), stats.total)
        samples.append(s)
        print(
            f"t={s.elapsed:7.1f}s  rss={s.rss_mb:7.1f} MB  fds={s.fds:4d}  ops={s.ops:7d}  "
            f"cancelled={sum(stats.cancelled.values()):6d}  errors={len(stats.errors)}",
            flush=True,
        )
        return s

    async with poc_api.ApiClient(base_url, grpc_url=grpc_url, close_timeout=2.0) as client:
        traffic = Traffic(client, rng, stats)
        baseline: Sample | None = None

        async def worker() -> None:
            while time.monotonic() - started < duration:
                await traffic.one()

        async def sampler() -> None:
            nonlocal baseline
            while time.monotonic() - started < duration:
                await trio.sleep(args.interval)
                s = sample()
                if baseline is None and s.elapsed >= warmup:
                    baseline = s
                    print(f"-- warm-up over: baseline rss={s.rss_mb:.1f} MB fds={s.fds}")

        sample()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler)
            for _ in range(args.concurrency):
                nursery.start_soon(worker)
        # Traffic stopped; let background cleanup (resets, closes) finish.
        await trio.sleep(1.0)
        final = sample()

    print(f"ops by kind: {dict(stats.ops)}")
    print(f"cancelled by kind: {dict(stats.cancelled)}")
    failed = False
    if stats.errors:
        failed = True
        print(f"FAIL: {len(stats.errors)} calls failed; first ones:")
        for line in stats.errors[:10]:
            print("   ", line)
    if baseline is None:
        baseline = samples[min(1, len(samples) - 1)]
        print("note: run shorter than the warm-up; comparing with the first interval")
    growth = final.rss_mb - baseline.rss_mb
    print(
        f"RSS {baseline.rss_mb:.1f} -> {final.rss_mb:.1f} MB ({growth:+.1f} MB), "
        f"fds {baseline.fds} -> {final.fds}"
    )
    if growth > args.max_rss_growth_mb:
        failed = True
        print(f"FAIL: RSS grew by {growth:.1f} MB (> {args.max_rss_growth_mb} MB) after warm-up")
    if final.fds > baseline.fds:
        failed = True
        print(f"FAIL: open fds grew from {baseline.fds} to {final.fds} after warm-up")
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=None, help="overrides --minutes")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-rss-growth-mb", type=float, default=20.0)
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        help="the server's idle-session eviction (default: the server's own, 600 s)",
    )
    args = p.parse_args(argv)

    http, grpc = bind_port_pair("127.0.0.1", 0)
    port = http.getsockname()[1]
    http.close()
    grpc.close()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "poc_api.server",
            "--port",
            str(port),
            "--max-context",
            "2000000",
            "--ignore-eos",
            *(["--idle-timeout", str(args.idle_timeout)] if args.idle_timeout else []),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        urls: dict[str, str] = {}
        while len(urls) < 2:
            line = server.stdout.readline()
            if not line:
                print("the reference server did not start", file=sys.stderr)
                return 2
            key, _, value = line.partition(": ")
            if key in ("base_url", "grpc_url"):
                urls[key] = value.strip()
        print(f"reference server pid {server.pid}: {urls['base_url']} {urls['grpc_url']}")
        return trio.run(soak, args, urls["base_url"], urls["grpc_url"])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
