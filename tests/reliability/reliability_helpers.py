"""Helpers shared by the reliability tests: server processes, task census, polling."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import trio
from helpers import asyncio_tasks_pending
from misbehaving import DUMMY_BASE_URL, MisbehavingServer

import poc_api
from poc_api.server._app import bind_port_pair

__all__ = [
    "ServerProcess",
    "asyncio_tasks_pending",
    "free_port_pair",
    "make_png",
    "trio_task_census",
    "wait_for",
]


def free_port_pair() -> int:
    """An HTTP port ``p`` such that ``p`` and ``p + 1`` were both free a moment ago.

    Picked below the kernel's range of ports for outgoing connections: in it, any
    connection made meanwhile (the suite makes thousands) may take ``p + 1`` before
    the server process binds it (seen in CI: "cannot listen on ...: Address already
    in use"). Here only another explicit bind can, and picks are random.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:  # not Linux: IANA's dynamic range starts at 49152
        low = 32768
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(10_000, max(low, 10_002) - 1)
        try:
            http, grpc = bind_port_pair("127.0.0.1", port)
        except OSError:
            continue
        http.close()
        grpc.close()
        return port
    raise OSError("no free pair of adjacent ports below the ephemeral range")


class ServerProcess:
    """``python -m poc_api.server --port P ...`` as a child process.

    stdout and stderr go to temporary files (``stderr_text()`` reads them), so a
    chatty server can never block on a full pipe.
    """

    def __init__(self, port: int, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.args = args
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="poc-server-")
        self._out = Path(self._dir.name) / "stdout"
        self._err = Path(self._dir.name) / "stderr"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def grpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port + 1}"

    def start(self, timeout: float = 20.0) -> None:
        """Start the process; return once it has printed its URLs (both ports listen)."""
        env = dict(os.environ if self.env is None else self.env)
        # Only this start's output counts: a restart appends to the first one's.
        seen = self._out.stat().st_size if self._out.exists() else 0
        with self._out.open("ab") as out, self._err.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "poc_api.server", "--port", str(self.port), *self.args],
                stdout=out,
                stderr=err,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}: {self.stderr_text()}"
                )
            with self._out.open("rb") as out:
                out.seek(seen)
                started = b"grpc_url:" in out.read()
            if started:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.stderr_text()}")
            time.sleep(0.02)

    def state(self) -> dict[str, Any]:
        """The server's ``GET /admin/state`` snapshot."""
        url = f"http://127.0.0.1:{self.port}/admin/state"
        with urllib.request.urlopen(url, timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
        return data

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, in case it was stopped) and reap. Idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)

    def stderr_text(self) -> str:
        return self._err.read_text(errors="replace") if self._err.exists() else ""

    def stdout_text(self) -> str:
        return self._out.read_text(errors="replace") if self._out.exists() else ""

    def close(self) -> None:
        self.kill()
        self._dir.cleanup()


def trio_task_census() -> Counter[str]:
    """Names of every live trio task, walked from the root task's nurseries."""
    names: Counter[str] = Counter()
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        names[task.name] += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return names


async def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.005) -> None:
    """Poll a condition that another thread or process makes true."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the state lives in another thread/process
            await trio.sleep(interval)


def make_png(width: int, height: int, *, padding: int = 0) -> bytes:
    """A complete RGB PNG (the reference server decodes it) with an optional
    ancillary chunk of ``padding`` bytes to make it as large as a test needs."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(b"\x00" + b"\x80" * (width * 3) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    extra = chunk(b"tEXt", b"pad\x00" + b"p" * padding) if padding else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + extra
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def grpc_port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def slow_new_connections(monkeypatch: Any, seconds: float) -> None:
    """Every connection after the first sends its SETTINGS ``seconds`` late (a server
    coming back slowly): a call retried on a new connection waits that long."""
    import misbehaving

    run = misbehaving._Connection.run

    async def slow_run(self: misbehaving._Connection) -> None:
        if self.server.connections > 1:
            await trio.sleep(seconds)
        await run(self)

    monkeypatch.setattr(misbehaving._Connection, "run", slow_run)


def misbehaving_client(srv: MisbehavingServer, **kw: object) -> poc_api.ApiClient:
    """A client of ``srv`` (its gRPC side; no HTTP server), close_timeout 0.5 s
    unless given."""
    kw.setdefault("close_timeout", 0.5)
    return poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url, **kw)  # type: ignore[arg-type]
