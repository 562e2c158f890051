"""OpenAI-compatible chat over HTTP: poc_api vs the ``openai`` package vs raw httpx.

Run by ``run.py`` (phase ``chat``) as a process of its own::

    python benchmarks/bench_chat.py run --params '{...}' --out result.json

which starts, each in its own process:

- ``bench_chat.py server``: a replay HTTP/1.1 server (asyncio, no h11). Every
  answer is pre-built bytes, cached per ``(stream, max_tokens)``: a streamed one
  is ``chat.completion.chunk`` events as OpenAI and vLLM send them, one HTTP
  chunk (``transfer-encoding: chunked``) per SSE event -- a role chunk,
  ``max_tokens`` chunks of one token each, a finish chunk, ``data: [DONE]`` --
  written at once, so the server does no per-event work and the client is what
  is measured (its CPU is in every row). ``GET /stats`` answers the connections
  it has accepted and the requests it has served.
- ``bench_chat.py worker CLIENT``: one client, one after another, each timing a
  stream phase (one streamed completion of ``chat_len`` token events per unit;
  every content delta is counted and its text touched) and a unary phase (one
  non-streamed ``chat_tokens``-token completion per unit), best of ``repeats``
  windows of ``box_s`` seconds, each after a warm-up request.
- paired rounds: poc_api and each peer of ``CHAT_PEERS`` in turn, both
  connected and warm, take turns (one stream window each, the order flipped
  every round), as ``run.py``'s ``paired`` phase does for gRPC; one
  CPU-per-event ratio and one rate ratio per round.

Clients (``CHAT_CLIENTS``):

* ``poc_api`` -- ``ApiClient.chat_stream(...)`` / ``ApiClient.chat(...)`` on trio.
* ``openai`` -- the official package's ``AsyncOpenAI().chat.completions.create``
  (``stream=True`` for the stream) on asyncio; the baseline of every ratio.
* ``httpx`` -- raw ``httpx.AsyncClient.stream`` on asyncio, ``aiter_lines``, the
  ``data:`` lines ``json.loads``-ed one by one: the floor of any httpx client.
* ``httpx_trio`` -- the same code on trio (httpcore's trio backend): with the
  row above it splits poc_api's cost into the runtime's and its own.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench_clients import (
    AsyncioRuntime,
    Meter,
    Serving,
    TrioRuntime,
    _timed,
    run_json_worker,
)

HERE = Path(__file__).resolve().parent
MODEL = "bench-chat"
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
# Token texts of the streamed completion, cycled (multi-byte ones included).
WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " café"]

CHAT_CLIENTS = ["poc_api", "openai", "httpx", "httpx_trio"]
CHAT_BASELINE = "openai"
CHAT_LABELS = {
    "poc_api": "poc_api `chat_stream` / `chat` (trio)",
    "openai": "openai `AsyncOpenAI` (asyncio)",
    "httpx": "raw httpx + SSE lines + `json.loads` (asyncio)",
    "httpx_trio": "raw httpx + SSE lines + `json.loads` (trio)",
}
CHAT_SHORT = {
    "poc_api": "poc_api",
    "openai": "openai",
    "httpx": "httpx",
    "httpx_trio": "httpx trio",
}
# Paired rounds: poc_api against each of these, on the stream phase.
CHAT_PEERS = ["openai", "httpx"]


# -- the replay server --------------------------------------------------------------


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk of ``transfer-encoding: chunked``."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(obj: dict[str, Any]) -> bytes:
    """One SSE event: ``data: {json}`` and the blank line, compact as OpenAI's."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def stream_answer(n: int) -> bytes:
    """The whole HTTP answer to a streamed request of ``n`` tokens."""
    base = {
        "id": "chatcmpl-bench0123456789abcdef",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _chunk(_event({**base, "choices": [choice]}))

    parts = [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
        b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
        chunk({"role": "assistant", "content": ""}),
    ]
    parts += [chunk({"content": WORDS[i % len(WORDS)]}) for i in range(n)]
    parts += [chunk({}, "length"), _chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n"]
    return b"".join(parts)


def unary_answer(n: int) -> bytes:
    """The whole HTTP answer to a non-streamed request of ``n`` tokens."""
    body = json.dumps(
        {
            "id": "chatcmpl-bench0123456789abcdef",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(WORDS[i % len(WORDS)] for i in range(n)),
                    },
                    "logprobs": None,
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n},
        },
        separators=(",", ":"),
    ).encode()
    return _json_answer(body)


def _json_answer(body: bytes, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Replay:
    """The server's state: cached answers and counters."""

    def __init__(self) -> None:
        self.answers: dict[tuple[bool, int], bytes] = {}
        self.connections = 0
        self.requests = 0

    def answer(self, method: str, path: str, body: bytes) -> bytes:
        if method == "GET" and path == "/stats":
            stats = {"connections_opened": self.connections, "requests": self.requests}
            return _json_answer(json.dumps(stats).encode())
        if method != "POST" or path != "/v1/chat/completions":
            return _json_answer(b'{"error":{"message":"not found"}}', "404 Not Found")
        self.requests += 1
        req = json.loads(body)
        key = (bool(req.get("stream")), int(req.get("max_tokens") or 16))
        got = self.answers.get(key)
        if got is None:
            got = self.answers[key] = stream_answer(key[1]) if key[0] else unary_answer(key[1])
        return got


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: requests in, pre-built answers out."""

    def __init__(self, replay: _Replay) -> None:
        self.replay = replay
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.replay.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            assert self.transport is not None
            self.transport.write(self.replay.answer(method, path, body))


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:``port`` (0: any free one), say ``PORT <n>``, serve until SIGTERM."""
    loop = asyncio.get_running_loop()
    replay = _Replay()
    server = await loop.create_server(lambda: _Connection(replay), "127.0.0.1", port)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


# -- clients ------------------------------------------------------------------------


def _check(count: int, chars: int, n: int) -> None:
    want = sum(len(WORDS[i % len(WORDS)]) for i in range(n))
    if count != n or chars != want:
        raise AssertionError(f"expected {n} deltas of {want} chars, got {count} of {chars}")


class _ChatClient:
    """What every client offers: one streamed and one non-streamed completion."""

    def __init__(self, port: int) -> None:
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.client: Any = None  # set by open()

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def stream(self, n: int) -> int:
        """One streamed completion of ``n`` tokens; returns the content deltas read."""
        raise NotImplementedError

    async def unary(self, n: int) -> int:
        """One non-streamed completion of ``n`` tokens; returns 1."""
        raise NotImplementedError


class _Trio(TrioRuntime, _ChatClient):
    pass


class _Asyncio(AsyncioRuntime, _ChatClient):
    pass


class PocApiChat(_Trio):
    """poc_api on trio: ``ApiClient.chat_stream`` and ``ApiClient.chat``."""

    async def open(self) -> None:
        import poc_api

        self.delta_t = poc_api.ChatDelta
        self.client = poc_api.ApiClient(self.base_url, model=MODEL)
        await self.client.__aenter__()

    async def close(self) -> None:
        await self.client.__aexit__(None, None, None)

    async def stream(self, n: int) -> int:
        delta_t = self.delta_t
        count = chars = 0
        async with self.client.chat_stream(MESSAGES, max_tokens=n) as events:
            async for ev in events:
                if type(ev) is delta_t:
                    count += 1
                    chars += len(ev.text)
        _check(count, chars, n)
        return count

    async def unary(self, n: int) -> int:
        done = await self.client.chat(MESSAGES, max_tokens=n)
        _check(n, len(done.text), n)
        return 1


class OpenAIChat(_Asyncio):
    """The official ``openai`` package on asyncio (no retries: a failure is a failure)."""

    async def open(self) -> None:
        import openai

        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key="bench", max_retries=0)

    async def close(self) -> None:
        await self.client.close()

    async def stream(self, n: int) -> int:
        count = chars = 0
        stream = await self.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=n, stream=True
        )
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    content = choice.delta.content
                    if content:
                        count += 1
                        chars += len(content)
        _check(count, chars, n)
        return count

    async def unary(self, n: int) -> int:
        done = await self.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=n
        )
        _check(n, len(done.choices[0].message.content or ""), n)
        return 1


class HttpxChat(_Asyncio):
    """Raw httpx on asyncio: SSE ``data:`` lines, ``json.loads`` each; the floor."""

    async def open(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(base_url=self.base_url, timeout=60.0)

    async def close(self) -> None:
        await self.client.aclose()

    async def stream(self, n: int) -> int:
        count = chars = 0
        payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": n, "stream": True}
        headers = {"accept": "text/event-stream"}
        loads = json.loads
        async with self.client.stream(
            "POST", "/chat/completions", json=payload, headers=headers
        ) as r:
            r.raise_for_status()
            # Read to the body's end (past [DONE]): the connection goes back to the pool.
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].lstrip()
                if data == "[DONE]":
                    continue
                for choice in loads(data)["choices"]:
                    content = choice["delta"].get("content")
                    if content:
                        count += 1
                        chars += len(content)
        _check(count, chars, n)
        return count

    async def unary(self, n: int) -> int:
        payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": n}
        r = await self.client.post("/chat/completions", json=payload)
        r.raise_for_status()
        _check(n, len(r.json()["choices"][0]["message"]["content"]), n)
        return 1


class HttpxTrioChat(_Trio, HttpxChat):
    """The same raw httpx code on trio (``_Trio`` first: its ``run`` and ``read_line``)."""


CLIENTS: dict[str, type[Any]] = {
    "poc_api": PocApiChat,
    "openai": OpenAIChat,
    "httpx": HttpxChat,
    "httpx_trio": HttpxTrioChat,
}


# -- the worker ---------------------------------------------------------------------


async def _warm_units(
    c: Any, p: dict[str, Any]
) -> tuple[Callable[[], Awaitable[int]], Callable[[], Awaitable[int]]]:
    """Warm up (one request of each kind), then the timed units: stream and unary."""
    n, k = p["chat_len"], p["chat_tokens"]
    await c.stream(min(n, 1000))
    await c.unary(k)
    return (lambda: c.stream(n)), (lambda: c.unary(k))


async def measure(name: str, args: argparse.Namespace, p: dict[str, Any]) -> dict[str, Any]:
    """Both phases for one client; best of ``repeats`` windows each."""
    c = CLIENTS[name](args.port)
    meter = Meter(args.server_pid)
    await c.open()
    try:
        stream, unary = await _warm_units(c, p)
        gc.collect()
        results = {"stream": await _timed(meter, stream, p["box_s"], p["repeats"])}
        gc.collect()
        results["unary"] = await _timed(meter, unary, p["box_s"], p["repeats"])
    finally:
        await c.close()
    return results


async def serve_windows(name: str, args: argparse.Namespace, p: dict[str, Any]) -> None:
    """Paired mode: warm up, say ready, then time one stream window per ``go`` line."""
    c = CLIENTS[name](args.port)
    meter = Meter(args.server_pid)
    await c.open()
    try:
        stream, _ = await _warm_units(c, p)
        print(json.dumps({"ready": True}), flush=True)
        while (await c.read_line()).strip() == "go":
            gc.collect()
            m = await _timed(meter, stream, p["paired_box_s"], 1)
            print(json.dumps(m), flush=True)
    finally:
        await c.close()


# -- the driver ---------------------------------------------------------------------


def _worker_cmd(client: str, port: int, server_pid: int, params: dict[str, Any]) -> list[str]:
    return [
        sys.executable,
        str(HERE / "bench_chat.py"),
        "worker",
        client,
        "--port",
        str(port),
        "--server-pid",
        str(server_pid),
        "--params",
        json.dumps(params),
    ]


def _stats(port: int) -> dict[str, int]:
    """The replay server's counters (over a connection of our own)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as r:
        return dict(json.loads(r.read()))


def _run_worker(
    client: str, port: int, server_pid: int, params: dict[str, Any], tmp: Path
) -> dict[str, Any]:
    out = tmp / f"chat-{client}.json"
    cmd = [*_worker_cmd(client, port, server_pid, params), "--out", str(out)]
    before = _stats(port)
    res = run_json_worker(cmd, out, params["worker_timeout"])
    if "error" in res:
        return res
    after = _stats(port)
    # The "before" query's own connection is counted in "after".
    res["server_connections"] = after["connections_opened"] - before["connections_opened"] - 1
    return res


def _per_event(m: dict[str, Any]) -> float:
    return float(m["cpu"]) / max(1, int(m["work"]))


def _paired(port: int, server_pid: int, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Alternating stream windows of poc_api and each of ``CHAT_PEERS``, peer by peer.

    The workers (poc_api's shared by every peer) start at once and stay connected
    and warm; only one of them streams at a time. One ratio poc_api / peer per round.
    """
    timeout = float(params["worker_timeout"])
    workers = {
        c: Serving(c, [*_worker_cmd(c, port, server_pid, params), "--serve"], timeout)
        for c in ["poc_api", *CHAT_PEERS]
    }
    out: dict[str, dict[str, Any]] = {}
    try:
        for w in workers.values():
            w.ready()
        a = workers["poc_api"]
        for peer in CHAT_PEERS:
            b = workers[peer]
            rounds: list[dict[str, Any]] = []
            for i in range(params["paired_rounds"]):
                got = {w.client: w.window() for w in ((a, b) if i % 2 == 0 else (b, a))}
                mine, theirs = got["poc_api"], got[peer]
                rounds.append(
                    {
                        "cpu_ratio": _per_event(mine) / _per_event(theirs),
                        "rate_ratio": mine["rate"] / theirs["rate"],
                        "poc_api": mine,
                        "peer": theirs,
                    }
                )
            cpu = [r["cpu_ratio"] for r in rounds]
            out[peer] = {
                "rounds": rounds,
                "box_s": params["paired_box_s"],
                "cpu_median": statistics.median(cpu),
                "cpu_min": min(cpu),
                "cpu_max": max(cpu),
                "rate_median": statistics.median(r["rate_ratio"] for r in rounds),
            }
    except (RuntimeError, OSError, ValueError) as exc:
        out.update({peer: {"error": str(exc)} for peer in CHAT_PEERS if peer not in out})
    finally:
        for w in workers.values():
            w.close()
    return out


def drive(params: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Start the replay server; run every client's worker, then the paired rounds."""
    server = subprocess.Popen(
        [sys.executable, str(HERE / "bench_chat.py"), "server"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise SystemExit(f"the chat replay server did not start (said {line!r})")
        port = int(line.split()[1])
        clients = {c: _run_worker(c, port, server.pid, params, tmp) for c in CHAT_CLIENTS}
        paired = _paired(port, server.pid, params)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {
        "chat_len": params["chat_len"],
        "chat_tokens": params["chat_tokens"],
        "box_s": params["box_s"],
        "repeats": params["repeats"],
        "clients": clients,
        "paired": paired,
    }


def main() -> None:
    """``run`` (the driver), ``server`` or ``worker CLIENT``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    run = sub.add_parser("run", help="the whole phase: server, workers, paired rounds")
    run.add_argument("--params", required=True, help="JSON: chat_*, box_s, repeats, paired_*")
    run.add_argument("--out", required=True)
    srv = sub.add_parser("server", help="the replay HTTP server; prints PORT <n>")
    srv.add_argument("--port", type=int, default=0)
    work = sub.add_parser("worker", help="one client's measurements")
    work.add_argument("client", choices=sorted(CLIENTS))
    work.add_argument("--port", type=int, required=True)
    work.add_argument("--server-pid", type=int, required=True)
    work.add_argument("--params", required=True)
    work.add_argument("--out", help="write both phases' results here")
    work.add_argument(
        "--serve", action="store_true", help="paired mode: one stream window per 'go' line"
    )
    args = parser.parse_args()
    if args.role == "server":
        asyncio.run(serve(args.port))
        return
    params = json.loads(args.params)
    if args.role == "run":
        with tempfile.TemporaryDirectory(prefix="poc-bench-chat-") as tmp:
            result = drive(params, Path(tmp))
        Path(args.out).write_text(json.dumps(result))
        return
    cls = CLIENTS[args.client]
    if args.serve:
        cls.run(lambda: serve_windows(args.client, args, params))
        return
    if not args.out:
        parser.error("--out is required (unless --serve)")
    results = cls.run(lambda: measure(args.client, args, params))
    Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
