"""Scale-out: ``score_many`` throughput on 1, 2 and 4 servers, via the pool and via nginx.

Run by ``run.py`` (phase ``scale_out``) as a worker process of its own::

    python benchmarks/bench_scale_out.py --params '{...}' --out result.json

It starts four ``python -m poc_api.server`` processes, each with a simulated
prefill cost and ``--prefill-slots 1`` (a GPU that prefills one request at a
time: without a bound, one sleeping reference server would absorb any
concurrency and adding servers would change nothing). Then, for 1, 2 and 4 of
them, it times ``score_many`` of ``scale_per_server`` prompts per server at a
fixed concurrency, through the client-side pool (``grpc_url=[...]``) and
through nginx (``hash $http_x_session_affinity consistent`` + ``grpc_pass``,
when ``/usr/sbin/nginx`` exists). Results must equal the one-server results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import trio
from bench_score_prefix import start_server, stop_server

import poc_api
from poc_api import ScoreResult, Tokens
from poc_api.testing import NGINX, nginx_grpc_proxy

Prompt = tuple[list[poc_api.Chunk], list[tuple[int, int]]]


async def timed_score_many(
    base_url: str, grpc_url: str | list[str], prompts: list[Prompt], concurrency: int
) -> tuple[float, list[list[ScoreResult]]]:
    async with poc_api.ApiClient(base_url, grpc_url=grpc_url) as client:
        # Connect to every endpoint first (not part of the timing).
        await client.score_many(prompts[: 2 * concurrency], max_concurrency=concurrency)
        t0 = time.perf_counter()
        out = await client.score_many(prompts, max_concurrency=concurrency)
        return time.perf_counter() - t0, out


async def measure(servers: list[tuple[str, str]], p: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(12)
    n_max = max(p["scale_servers"])
    length = p["scale_prompt"]
    prompts: list[Prompt] = [
        ([Tokens([rng.randrange(32, 127) for _ in range(length)])], [(1, length)])
        for _ in range(p["scale_per_server"] * n_max)
    ]
    base_url = servers[0][0]
    rows: dict[str, dict[str, float]] = {"pool": {}, "nginx": {}}
    reference: list[list[ScoreResult]] | None = None
    have_nginx = os.path.exists(NGINX)  # noqa: ASYNC240 - once, before anything runs
    for n in p["scale_servers"]:
        todo = prompts[: p["scale_per_server"] * n]
        urls = [g for _, g in servers[:n]]
        wall, out = await timed_score_many(base_url, urls, todo, p["scale_concurrency"])
        rows["pool"][str(n)] = len(todo) / wall
        if reference is None:
            reference = out
        elif out[: len(reference)] != reference:
            raise SystemExit(f"the pool of {n} servers scored differently from one server")
        if have_nginx:
            async with nginx_grpc_proxy(urls) as proxy:
                wall, out = await timed_score_many(base_url, proxy, todo, p["scale_concurrency"])
            rows["nginx"][str(n)] = len(todo) / wall
            assert reference is not None
            if out[: len(reference)] != reference:
                raise SystemExit(f"nginx over {n} servers scored differently from one server")
    return {
        "servers": p["scale_servers"],
        "prompt": length,
        "per_server": p["scale_per_server"],
        "concurrency": p["scale_concurrency"],
        "delay_us": p["scale_delay_us"],
        "rates": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    p = json.loads(args.params)
    procs = []
    try:
        servers = []
        for _ in range(max(p["scale_servers"])):
            # One prefill at a time: each server has a bounded capacity to scale out.
            proc, base_url, grpc_url = start_server(p["scale_delay_us"], "--prefill-slots", "1")
            procs.append(proc)
            servers.append((base_url, grpc_url))
        result = trio.run(measure, servers, p)
    finally:
        for proc in procs:
            stop_server(proc)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
