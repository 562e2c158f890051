"""Benchmark worker: runs every phase for ONE client, in its own process.

``run.py`` starts this once per client, one after another, against the same
replay server, so each client's RSS is its own. Usage (normally via run.py)::

    python benchmarks/bench_clients.py CLIENT --port P --server-pid PID \\
        --gen-dir DIR --params JSON --out FILE

With ``--serve PHASE`` instead of ``--out``, the worker times one window of
that phase each time run.py writes ``go`` on its stdin (see ``run.py``'s
paired rounds).

Clients:

* ``poc_api`` — poc_api on trio: ``ApiClient`` + ``session().generate()``,
  ``client.score()``, ``session()`` for the unary pairs.
* ``poc_api_conv`` — poc_api on trio through ``conversation().stream()``
  (streaming phases only).
* ``grpclib_bp2`` — grpclib ``Channel.request`` on plain asyncio, betterproto2
  ``GenerateEvent.parse`` (what poc_api's bridge is built on, with the stock decoder).
* ``grpclib_wire`` — the same, decoding with ``poc_api._wire.decode_generate_event``.
* ``grpclib_raw`` — poc_api's former read path on bare asyncio: messages read
  from grpclib's HTTP/2 stream with ``recv_data`` (no per-message codec or
  dispatch), decoded with ``_wire``. Bridge v2's stream goal is stated against it.
* ``grpclib_chunk`` — poc_api's read path today on bare asyncio: 1 MiB DATA
  frames, messages cut out of whole chunks by ``_transport._Reader``, decoded
  with ``_wire``. poc_api's cost above this is trio + the bridge alone.
* ``grpcio`` — ``grpc.aio`` with protobuf (upb) classes generated from proto/.

Every client does the same work per phase: a fresh session per stream
(``OpenSession``, one ``Generate``, ``CloseSession``), and it touches each
event's token id (and the readout's length) so a lazy decoder gets no free ride.
Timings: wall clock (``perf_counter``), the client process's CPU time
(``process_time``: every thread, so grpcio's C-core threads count) and the
server's CPU time read from ``/proc/<server pid>/stat``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

U32_MAX = 2**32 - 1
READOUT_SHAPE = (8, 32)
READOUT_FLOATS = READOUT_SHAPE[0] * READOUT_SHAPE[1]
SERVICE = "/salience.Salience/"
_TICK = os.sysconf("SC_CLK_TCK")


# -- process measurements -----------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (stat field 3): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_mb() -> tuple[float, float]:
    """This process's (VmRSS, VmHWM) in MiB."""
    rss = hwm = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


def tcp_connections_to(port: int) -> int:
    """ESTABLISHED TCP connections from this process to ``port`` (via /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            if remote_port == port and parts[3] == "01" and parts[9] in inodes:
                n += 1
    return n


def machine_busy() -> float:
    """CPU seconds all processes on the machine have used (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    # user nice system idle iowait irq softirq steal: everything but idle and iowait.
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / _TICK


def run_json_worker(cmd: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run a worker process that writes its results as JSON to ``out``; return them,
    or ``{"error": ...}`` with the end of its output if it failed or timed out."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return dict(json.loads(out.read_text()))


class Meter:
    """Wall, client CPU, server CPU and other processes' CPU over one interval.

    ``others`` is the machine's busy time minus client and server: on a shared
    machine it says how much the rates were squeezed by someone else.
    """

    def __init__(self, server_pid: int) -> None:
        self._pid = server_pid
        self._t0 = self._c0 = self._s0 = self._b0 = 0.0

    def start(self) -> None:
        self._b0 = machine_busy()
        self._s0 = proc_cpu(self._pid)
        self._c0 = time.process_time()
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._t0
        cpu = time.process_time() - self._c0
        srv = proc_cpu(self._pid) - self._s0
        others = max(0.0, machine_busy() - self._b0 - cpu - srv)
        return {"wall": wall, "cpu": cpu, "srv_cpu": srv, "others": others}


class Serving:
    """A worker in paired mode (``--serve``), for the driver: a window per :meth:`window`.

    ``cmd`` starts it; it prints one JSON line when ready and one per ``go`` line
    written on its stdin (any other line ends it). ``run.py``'s paired rounds and
    ``bench_chat.py``'s use it.
    """

    def __init__(self, client: str, cmd: list[str], timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self.err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # A file, not a pipe: a worker that logs more than a pipe holds
            # would block while this process waits on its stdout.
            stderr=self.err,
            text=True,
        )

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            self.proc.wait()
            self.err.seek(0)
            err = self.err.read()
            tail = " | ".join((err or "no answer").strip().splitlines()[-8:])
            raise RuntimeError(f"{self.client}: {tail}")
        return dict(json.loads(line))

    def ready(self) -> None:
        self._line()

    def window(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()


# -- clients ------------------------------------------------------------------------


def _score_tokens(n: int) -> list[int]:
    return [(i * 7919) % 150_000 + 1 for i in range(n)]


class TrioRuntime:
    """A worker's event loop when its client runs on trio: the main loop, tasks at
    once, sleeping, and reading a line of stdin (a paired run's "go") without
    blocking the loop."""

    @staticmethod
    async def gather(fns: Sequence[Callable[[], Awaitable[Any]]]) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            for fn in fns:
                nursery.start_soon(fn)

    @staticmethod
    async def sleep(seconds: float) -> None:
        import trio

        await trio.sleep(seconds)

    @staticmethod
    async def read_line() -> str:
        import trio

        return await trio.to_thread.run_sync(sys.stdin.readline)

    @staticmethod
    def run(main: Callable[[], Awaitable[Any]]) -> Any:
        import trio

        return trio.run(main)


class AsyncioRuntime:
    """The same on asyncio."""

    @staticmethod
    async def gather(fns: Sequence[Callable[[], Awaitable[Any]]]) -> None:
        import asyncio

        await asyncio.gather(*(fn() for fn in fns))

    @staticmethod
    async def sleep(seconds: float) -> None:
        import asyncio

        await asyncio.sleep(seconds)

    @staticmethod
    async def read_line() -> str:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    @staticmethod
    def run(main: Callable[[], Awaitable[Any]]) -> Any:
        import asyncio

        return asyncio.run(main())  # type: ignore[arg-type]


class _Client:
    """What every client offers; ``stream`` is a fresh session around one ``generate``."""

    async def open_session(self) -> Any:
        raise NotImplementedError

    async def close_session(self, handle: Any) -> None:
        raise NotImplementedError

    async def generate(self, handle: Any, n: int, readout: bool) -> int:
        """One Generate of ``n`` decoded events on an open session; returns the count."""
        raise NotImplementedError

    async def stream(self, n: int, readout: bool) -> int:
        handle = await self.open_session()
        try:
            return await self.generate(handle, n, readout)
        finally:
            await self.close_session(handle)


class PocApi(TrioRuntime, _Client):
    """poc_api on trio: sessions and ``generate``."""

    runtime = "trio"

    def __init__(self, port: int, gen_dir: str) -> None:
        import poc_api

        self.poc_api = poc_api
        self.url = f"http://127.0.0.1:{port}"
        self.client: Any = None
        self.prompt = [1]
        self.plain = poc_api.SamplingParams(max_tokens=0)

    async def open(self) -> None:
        self.client = self.poc_api.ApiClient("http://127.0.0.1:1/v1", grpc_url=self.url)
        await self.client.__aenter__()

    async def close(self) -> None:
        await self.client.__aexit__(None, None, None)

    async def open_session(self) -> Any:
        cm = self.client.session()
        return cm, await cm.__aenter__()

    async def close_session(self, handle: Any) -> None:
        await handle[0].__aexit__(None, None, None)

    async def generate(self, handle: Any, n: int, readout: bool) -> int:
        token_t = self.poc_api.Token
        sampling = self.poc_api.SamplingParams(max_tokens=n)
        session = handle[1]
        ro = [(session.committed_len + 1, U32_MAX)] if readout else []
        count = floats = 0
        async with session.generate(self.prompt, sampling=sampling, readout_ranges=ro) as events:
            async for ev in events:
                if type(ev) is token_t:
                    count += ev.id > 0
                    if readout:
                        floats += len(ev.readout)  # type: ignore[arg-type]
        _check(count, floats, n, readout)
        return count

    async def score(self, tokens: list[int]) -> float:
        p = self.poc_api
        results = await self.client.score([p.Tokens(tokens)], [(0, len(tokens))])
        return float(results[0].logprob)

    async def unary_pair(self) -> None:
        async with self.client.session():
            pass


class PocApiConversation(PocApi):
    """poc_api on trio through ``conversation().stream()``: one turn per conversation."""

    async def stream(self, n: int, readout: bool) -> int:
        p = self.poc_api
        out_t = p.TokenOut
        sampling = p.SamplingParams(max_tokens=n)
        shape = READOUT_SHAPE if readout else None
        count = floats = 0
        async with (
            self.client.conversation() as conv,
            conv.stream([p.Tokens((1,))], sampling, readout_shape=shape) as events,
        ):
            async for ev in events:
                if type(ev) is out_t:
                    count += ev.id > 0
                    if readout:
                        floats += ev.readout.nbytes // 4
        _check(count, floats, n, readout)
        return count


class _Asyncio(AsyncioRuntime, _Client):
    runtime = "asyncio"


class GrpclibBetterproto(_Asyncio):
    """grpclib ``Channel.request`` on asyncio with betterproto2 messages.

    Requests and replies cross grpclib as bytes (a pass-through codec, as in
    poc_api's transport); events are parsed with ``GenerateEvent.parse``.
    """

    def __init__(self, port: int, gen_dir: str) -> None:
        from grpclib.const import Cardinality
        from grpclib.encoding.base import CodecBase

        from poc_api._proto import salience as pb

        class Passthrough(CodecBase):
            __content_subtype__ = "proto"

            def encode(self, message: Any, message_type: Any) -> bytes:
                return bytes(message)

            def decode(self, data: bytes, message_type: Any) -> bytes:
                return data

        self.pb = pb
        self.codec = Passthrough()
        self.unary_c = Cardinality.UNARY_UNARY
        self.stream_c = Cardinality.UNARY_STREAM
        self.port = port
        self.channel: Any = None

    async def open(self) -> None:
        from grpclib.client import Channel

        self.channel = Channel("127.0.0.1", self.port, codec=self.codec)

    async def close(self) -> None:
        self.channel.close()

    async def _unary(self, method: str, request: bytes) -> bytes:
        async with self.channel.request(SERVICE + method, self.unary_c, bytes, bytes) as stream:
            await stream.send_message(request, end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
        assert reply is not None
        return bytes(reply)

    async def open_session(self) -> list[Any]:
        raw = await self._unary("OpenSession", bytes(self.pb.OpenSessionRequest()))
        return [str(self.pb.OpenSessionResponse.parse(raw).session_id), 0]  # [id, length]

    async def close_session(self, handle: list[Any]) -> None:
        req = self.pb.CloseSessionRequest(session_id=handle[0])
        await self._unary("CloseSession", bytes(req))

    async def _generate(self, request: bytes, on_event: Callable[[bytes], None]) -> None:
        async with self.channel.request(
            SERVICE + "Generate", self.stream_c, bytes, bytes
        ) as stream:
            await stream.send_message(request, end=True)
            while True:
                raw = await stream.recv_message()
                if raw is None:
                    break
                on_event(raw)
            await stream.recv_trailing_metadata()

    def _request(self, handle: list[Any], n: int, readout: bool) -> bytes:
        pb = self.pb
        ro = [pb.PositionRange(start=handle[1] + 1, end=U32_MAX)] if readout else []
        return bytes(
            pb.GenerateRequest(
                session_id=handle[0],
                append_tokens=[1],
                offset=handle[1],
                max_tokens=n,
                readout_ranges=ro,
            )
        )

    def _score_request(self, sid: str, tokens: list[int]) -> bytes:
        pb = self.pb
        return bytes(
            pb.GenerateRequest(
                session_id=sid,
                append_tokens=tokens,
                max_tokens=0,
                logprobs_ranges=[pb.PositionRange(start=0, end=len(tokens))],
            )
        )

    async def generate(self, handle: list[Any], n: int, readout: bool) -> int:
        count = floats = 0
        parse = self.pb.GenerateEvent.parse

        def on_event(raw: bytes) -> None:
            nonlocal count, floats
            ev = parse(raw)
            tok = ev.token
            if tok is not None:
                count += tok.id > 0
                if readout:
                    floats += len(tok.readout)
            elif ev.done is not None:
                handle[1] = ev.done.total_tokens

        await self._generate(self._request(handle, n, readout), on_event)
        _check(count, floats, n, readout)
        return count

    async def score(self, tokens: list[int]) -> float:
        handle = await self.open_session()
        logprobs: dict[int, float] = {}
        parse = self.pb.GenerateEvent.parse

        def on_event(raw: bytes) -> None:
            tok = parse(raw).token
            if tok is not None:
                logprobs[tok.position] = tok.sampled_logprob

        try:
            await self._generate(self._score_request(handle[0], tokens), on_event)
        finally:
            await self.close_session(handle)
        return _sum_scores(logprobs, tokens)

    async def unary_pair(self) -> None:
        await self.close_session(await self.open_session())


class GrpclibWire(GrpclibBetterproto):
    """The same grpclib code, decoding events with poc_api's hand-written decoder."""

    def __init__(self, port: int, gen_dir: str) -> None:
        super().__init__(port, gen_dir)
        from poc_api._types import Token
        from poc_api._wire import decode_generate_event

        self.token_t = Token
        self.decode = decode_generate_event

    async def generate(self, handle: list[Any], n: int, readout: bool) -> int:
        decode, token_t = self.decode, self.token_t
        count = floats = 0

        def on_event(raw: bytes) -> None:
            nonlocal count, floats
            ev = decode(raw)
            if type(ev) is token_t:
                count += ev.id > 0
                if readout:
                    floats += len(ev.readout)  # type: ignore[arg-type]
            elif ev is not None:
                handle[1] = ev.total_tokens  # type: ignore[union-attr]

        await self._generate(self._request(handle, n, readout), on_event)
        _check(count, floats, n, readout)
        return count

    async def score(self, tokens: list[int]) -> float:
        decode, token_t = self.decode, self.token_t
        handle = await self.open_session()
        logprobs: dict[int, float] = {}

        def on_event(raw: bytes) -> None:
            ev = decode(raw)
            if type(ev) is token_t:
                logprobs[ev.position] = ev.sampled_logprob

        try:
            await self._generate(self._score_request(handle[0], tokens), on_event)
        finally:
            await self.close_session(handle)
        return _sum_scores(logprobs, tokens)


class GrpclibRaw(GrpclibWire):
    """poc_api's former read path on bare asyncio: no trio, no bridge.

    As poc_api's transport did until the chunk reader, it reads each
    length-prefixed message straight from grpclib's HTTP/2 stream
    (``recv_data``) instead of ``recv_message`` (which adds codec and event
    dispatch per message), and decodes with ``_wire``. Bridge v2's stream goal
    (>= 0.85x this column) was set against it; ``grpclib_chunk`` is the
    same-read-path reference now.
    """

    async def _generate(self, request: bytes, on_event: Callable[[bytes], None]) -> None:
        async with self.channel.request(
            SERVICE + "Generate", self.stream_c, bytes, bytes
        ) as stream:
            await stream.send_message(request, end=True)
            await stream.recv_initial_metadata()
            raw = stream._stream  # grpclib's HTTP/2 stream (private API, as poc_api uses)
            recv = raw.recv_data
            with stream._wrapper:
                while True:
                    header = await recv(5)
                    if not header:
                        break
                    on_event(await recv(int.from_bytes(header[1:5], "big")))
            await stream.recv_trailing_metadata()


class GrpclibChunk(GrpclibWire):
    """poc_api's read path since the chunk reader, on bare asyncio: no trio, no bridge.

    The connection takes DATA frames up to 1 MiB, as poc_api's does, and each
    stream's messages are cut out of whole chunks by poc_api's own
    ``_transport._Reader``, decoded with ``_wire``. poc_api minus this is the
    cost of trio and the bridge alone.
    """

    async def open(self) -> None:
        import h2.settings

        from poc_api._transport import _MAX_FRAME_SIZE

        await super().open()
        await self.unary_pair()  # connect, then ask for the frames poc_api asks for
        protocol = self.channel._protocol
        protocol.connection._connection.update_settings(
            {h2.settings.SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME_SIZE}
        )
        protocol.connection.flush()

    async def _generate(self, request: bytes, on_event: Callable[[bytes], None]) -> None:
        from poc_api._transport import _Reader

        class Sink:
            @staticmethod
            def push(raw: bytes) -> bool:
                on_event(raw)
                return False

            async def wait_space(self) -> None:  # pragma: no cover - never full
                return

        async with self.channel.request(
            SERVICE + "Generate", self.stream_c, bytes, bytes
        ) as stream:
            await stream.send_message(request, end=True)
            await stream.recv_initial_metadata()
            reader = _Reader(stream._stream, 1 << 30, SERVICE + "Generate")
            with stream._wrapper:
                await reader.pump(Sink())
            await stream.recv_trailing_metadata()


class Grpcio(_Asyncio):
    """``grpc.aio`` with protobuf classes generated by grpc_tools.protoc."""

    def __init__(self, port: int, gen_dir: str) -> None:
        sys.path.insert(0, gen_dir)
        import salience_pb2  # type: ignore[import-not-found]
        import salience_pb2_grpc  # type: ignore[import-not-found]

        self.pb = salience_pb2
        self.grpc_mod = salience_pb2_grpc
        self.target = f"127.0.0.1:{port}"
        self.channel: Any = None
        self.stub: Any = None

    async def open(self) -> None:
        import grpc  # type: ignore[import-untyped]

        self.channel = grpc.aio.insecure_channel(
            self.target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self.stub = self.grpc_mod.SalienceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def open_session(self) -> list[Any]:
        resp = await self.stub.OpenSession(self.pb.OpenSessionRequest())
        return [resp.session_id, 0]

    async def close_session(self, handle: list[Any]) -> None:
        await self.stub.CloseSession(self.pb.CloseSessionRequest(session_id=handle[0]))

    async def generate(self, handle: list[Any], n: int, readout: bool) -> int:
        pb = self.pb
        ro = [pb.PositionRange(start=handle[1] + 1, end=U32_MAX)] if readout else []
        call = self.stub.Generate(
            pb.GenerateRequest(
                session_id=handle[0],
                append_tokens=[1],
                offset=handle[1],
                max_tokens=n,
                readout_ranges=ro,
            )
        )
        count = floats = 0
        async for ev in call:
            if ev.HasField("token"):
                tok = ev.token
                count += tok.id > 0
                if readout:
                    floats += len(tok.readout)
            else:
                handle[1] = ev.done.total_tokens
        _check(count, floats, n, readout)
        return count

    async def score(self, tokens: list[int]) -> float:
        pb = self.pb
        handle = await self.open_session()
        logprobs: dict[int, float] = {}
        try:
            call = self.stub.Generate(
                pb.GenerateRequest(
                    session_id=handle[0],
                    append_tokens=tokens,
                    max_tokens=0,
                    logprobs_ranges=[pb.PositionRange(start=0, end=len(tokens))],
                )
            )
            async for ev in call:
                if ev.HasField("token"):
                    tok = ev.token
                    logprobs[tok.position] = tok.sampled_logprob
        finally:
            await self.close_session(handle)
        return _sum_scores(logprobs, tokens)

    async def unary_pair(self) -> None:
        await self.close_session(await self.open_session())


def _sum_scores(logprobs: dict[int, float], tokens: list[int]) -> float:
    if len(logprobs) != len(tokens):
        raise AssertionError(f"scored {len(logprobs)} of {len(tokens)} positions")
    return sum(logprobs.values())


def _check(count: int, floats: int, n: int, readout: bool) -> None:
    if count != n or (readout and floats != n * READOUT_FLOATS):
        raise AssertionError(f"expected {n} tokens, got {count} (readout floats {floats})")


CLIENTS: dict[str, type[Any]] = {
    "poc_api": PocApi,
    "poc_api_conv": PocApiConversation,
    "grpclib_bp2": GrpclibBetterproto,
    "grpclib_wire": GrpclibWire,
    "grpclib_raw": GrpclibRaw,
    "grpclib_chunk": GrpclibChunk,
    "grpcio": Grpcio,
}

# Phases each client runs (poc_api_conv has no score/unary API of its own).
PHASES: dict[str, tuple[str, ...]] = {
    "poc_api": ("rss", "stream_plain", "stream_readout", "score", "unary", "concurrency"),
    "poc_api_conv": ("rss", "stream_plain", "stream_readout"),
    "grpclib_bp2": ("rss", "stream_plain", "stream_readout", "score", "unary", "concurrency"),
    "grpclib_wire": ("stream_plain", "stream_readout", "score", "concurrency"),
    "grpclib_raw": ("stream_plain", "stream_readout", "score", "concurrency"),
    "grpclib_chunk": ("stream_plain", "stream_readout", "score", "concurrency"),
    "grpcio": ("rss", "stream_plain", "stream_readout", "score", "unary", "concurrency"),
}


# -- phases -------------------------------------------------------------------------


async def _timed(
    meter: Meter, unit: Callable[[], Awaitable[int]], box_s: float, repeats: int
) -> dict[str, float]:
    """Best of ``repeats`` windows: run ``unit`` until ``box_s`` passed (at least once)."""
    best: dict[str, float] | None = None
    for _ in range(repeats):
        work = units = 0
        meter.start()
        deadline = time.perf_counter() + box_s
        while True:
            work += await unit()
            units += 1
            if time.perf_counter() >= deadline:
                break
        m = meter.stop()
        m.update(work=work, units=units, rate=work / m["wall"])
        if best is None or m["rate"] > best["rate"]:
            best = m
    assert best is not None
    return best


async def phase_rss(c: Any, meter: Meter, p: dict[str, Any]) -> dict[str, Any]:
    """Stream ``rss_events`` plain events; RSS after the first stream and at the end."""
    n = p["stream_len"]
    await c.stream(n, False)  # warm-up: imports, connection, first allocations
    rss0, _ = rss_mb()
    samples = [rss0]
    done = n
    meter.start()
    while done < p["rss_events"]:
        done += await c.stream(n, False)
        if len(samples) < 1000:
            samples.append(rss_mb()[0])
    m: dict[str, Any] = meter.stop()
    rss1, hwm = rss_mb()
    m.update(
        events=done,
        rss_start=rss0,
        rss_end=rss1,
        rss_hwm=hwm,
        growth=rss1 - rss0,
        rss_max=max(samples),
        rate=(done - n) / m["wall"],
    )
    return m


async def _warm_stream_unit(
    c: Any, p: dict[str, Any], readout: bool
) -> Callable[[], Awaitable[int]]:
    """Warm up (one shorter stream), then the timed unit: one stream of the phase's length."""
    n = p["readout_len"] if readout else p["stream_len"]
    await c.stream(min(n, 1000), readout)
    return lambda: c.stream(n, readout)


async def phase_stream(c: Any, meter: Meter, p: dict[str, Any], readout: bool) -> dict[str, Any]:
    unit = await _warm_stream_unit(c, p, readout)
    return await _timed(meter, unit, p["box_s"], p["repeats"])


async def phase_score(c: Any, meter: Meter, p: dict[str, Any]) -> dict[str, Any]:
    tokens = _score_tokens(p["score_positions"])
    await c.score(tokens)  # warm-up

    async def unit() -> int:
        await c.score(tokens)
        return len(tokens)

    m = await _timed(meter, unit, p["box_s"], p["repeats"])
    m["us_per_pos_cpu"] = m["cpu"] / m["work"] * 1e6
    m["us_per_pos_wall"] = m["wall"] / m["work"] * 1e6
    return m


async def _warm_unary_unit(c: Any, callers: int = 1) -> Callable[[], Awaitable[int]]:
    """Warm up (one pair), then the timed unit: ``callers`` Open+Close pairs at once."""
    await c.unary_pair()

    async def pair() -> None:
        await c.unary_pair()

    async def unit() -> int:
        if callers == 1:
            await pair()
        else:
            await c.gather([pair] * callers)
        return 2 * callers

    return unit


async def phase_unary(c: Any, meter: Meter, p: dict[str, Any]) -> dict[str, Any]:
    unit = await _warm_unary_unit(c)
    return await _timed(meter, unit, p["box_s"], p["repeats"])


async def _concurrent_round(
    c: Any, meter: Meter, p: dict[str, Any], port: int, conc: int
) -> dict[str, Any]:
    """One timed window of ``conc`` sessions each looping ``conc_len``-event Generates."""
    n = p["conc_len"]
    handles: list[Any] = []

    async def opener() -> None:
        handles.append(await c.open_session())

    await c.gather([opener] * conc)
    events = 0
    in_flight = 0
    probe: dict[str, int] = {}
    deadline = 0.0

    def task(handle: Any) -> Callable[[], Awaitable[None]]:
        async def loop() -> None:
            nonlocal events, in_flight
            while True:
                in_flight += 1
                got = await c.generate(handle, n, False)  # not `events += await`: tasks race
                events += got
                in_flight -= 1
                if time.perf_counter() >= deadline:
                    return

        return loop

    async def sampler() -> None:
        await c.sleep(p["box_s"] / 2)
        probe["in_flight"] = in_flight
        probe["connections"] = tcp_connections_to(port)

    def closer(handle: Any) -> Callable[[], Awaitable[None]]:
        return lambda: c.close_session(handle)

    meter.start()
    deadline = time.perf_counter() + p["box_s"]
    await c.gather([task(h) for h in handles] + [sampler])
    m: dict[str, Any] = meter.stop()
    m.update(work=events, rate=events / m["wall"], **probe)
    await c.gather([closer(h) for h in handles])
    return m


async def phase_concurrency(c: Any, meter: Meter, p: dict[str, Any], port: int) -> dict[str, Any]:
    """For each C: C sessions, each looping ``conc_len``-event Generates until the box ends.

    The sessions are opened before and closed after the timed window, so the
    figure is streaming alone; the offsets grow from call to call as in a chat.
    """
    out: dict[str, Any] = {}
    for conc in p["concurrency"]:
        rounds = [await _concurrent_round(c, meter, p, port, conc) for _ in range(p["repeats"])]
        out[str(conc)] = max(rounds, key=lambda m: m["rate"])
    return out


async def run_all(name: str, args: argparse.Namespace, p: dict[str, Any]) -> dict[str, Any]:
    c = CLIENTS[name](args.port, args.gen_dir)
    meter = Meter(args.server_pid)
    results: dict[str, Any] = {}
    await c.open()
    try:
        for phase in PHASES[name]:
            if phase not in p["phases"]:
                continue
            gc.collect()
            if phase == "rss":
                results[phase] = await phase_rss(c, meter, p)
            elif phase == "stream_plain":
                results[phase] = await phase_stream(c, meter, p, False)
            elif phase == "stream_readout":
                results[phase] = await phase_stream(c, meter, p, True)
            elif phase == "score":
                results[phase] = await phase_score(c, meter, p)
            elif phase == "unary":
                results[phase] = await phase_unary(c, meter, p)
            elif phase == "concurrency":
                results[phase] = await phase_concurrency(c, meter, p, args.port)
    finally:
        await c.close()
    return results


# Phases a paired run (``--serve``) can time, each with the phase of PHASES it
# needs: run.py alternates two workers' windows of one of these, so that the
# machine's drift hits both alike. "unary_16": 16 tasks at once, each an
# Open+Close pair, per unit (agents sharing a client).
SERVE_PHASES = {
    "unary": "unary",
    "unary_16": "unary",
    "stream_plain": "stream_plain",
    "stream_readout": "stream_readout",
}
UNARY_CALLERS = 16


async def serve_windows(name: str, args: argparse.Namespace, p: dict[str, Any]) -> dict[str, Any]:
    """Paired mode: warm up, say ready, then time one window per ``go`` line on stdin.

    Each window's measurements go to stdout as one JSON line; any other line
    (or the end of stdin) ends the run.
    """
    c = CLIENTS[name](args.port, args.gen_dir)
    meter = Meter(args.server_pid)
    phase = args.serve
    await c.open()
    try:
        if SERVE_PHASES[phase] == "unary":
            unit = await _warm_unary_unit(c, UNARY_CALLERS if phase == "unary_16" else 1)
        else:
            unit = await _warm_stream_unit(c, p, phase == "stream_readout")
        print(json.dumps({"ready": True}), flush=True)
        while (await c.read_line()).strip() == "go":
            gc.collect()
            m = await _timed(meter, unit, p["paired_box_s"], 1)
            print(json.dumps(m), flush=True)
    finally:
        await c.close()
    return {}


def main() -> None:
    """Run one client's phases and write the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("client", choices=sorted(CLIENTS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--gen-dir", required=True)
    parser.add_argument("--params", required=True, help="JSON: event counts and time boxes")
    parser.add_argument("--out", required=False)
    parser.add_argument(
        "--serve",
        choices=SERVE_PHASES,
        help="paired mode: time one window of this phase per 'go' line on stdin",
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="run on this CPU only (every thread of the process, set before any starts)",
    )
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    params = json.loads(args.params)
    cls = CLIENTS[args.client]
    if args.serve:
        if SERVE_PHASES[args.serve] not in PHASES[args.client]:
            parser.error(f"{args.client} has no {args.serve} phase")
        cls.run(lambda: serve_windows(args.client, args, params))
        return
    if not args.out:
        parser.error("--out is required (unless --serve)")
    t0 = time.perf_counter()
    results = cls.run(lambda: run_all(args.client, args, params))
    results["total_wall"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
