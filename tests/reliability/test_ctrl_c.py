"""Ctrl-C (SIGINT) in the middle of every kind of call unwinds and exits.

A child process runs ``trio.run`` again and again; each run opens a client, starts
a call, says READY, and keeps the call going. The test sends SIGINT at a random
moment. Each run must end with KeyboardInterrupt out of ``trio.run`` within 5 s,
with the client's loop thread gone; the child checks that and says UNWOUND. The
last run does not catch it, so the process itself must exit. The server (in this
process) must be left with no session: every block closed its session.

CPython drops an exception raised inside a weakref callback ("Exception ignored
in ...", python/cpython#95959), and trio frees every async generator through one
(its WeakSet of live generators): a SIGINT handled right there is lost, in any trio
program. The child reports such a loss (LOST) and the test then sends SIGINT again.
poc_api itself must add no such place: see test_bridge's check that no asyncio task
is freed in the trio thread.
"""

from __future__ import annotations

import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from poc_api.server import ReferenceServer, ServerConfig

RUNS = 10

CHILD = textwrap.dedent(
    """
    import signal, sys, threading, time, trio, poc_api
    from poc_api import SamplingParams, Tokens

    # A shell without job control starts background jobs with SIGINT ignored, and
    # Python then installs no handler: take the default one back.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def unraisable(u):
        if u.exc_type is KeyboardInterrupt:  # CPython dropped it: say so
            print("LOST", repr(u.object), flush=True)
        else:
            sys.__unraisablehook__(u)

    sys.unraisablehook = unraisable

    mode, base_url, grpc_url, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    LONG = SamplingParams(max_tokens=10**7)

    async def main(i):
        async with poc_api.ApiClient(base_url, grpc_url=grpc_url, close_timeout=2) as c:
            if mode == "generate":
                async with c.session() as s:
                    async with s.generate([72, 101, 108], sampling=LONG) as ev:
                        print("READY", i, flush=True)
                        async for _ in ev:
                            pass
            elif mode == "conversation":
                async with c.conversation() as conv:
                    async with conv.stream([Tokens([72, 101, 108])], LONG) as ev:
                        print("READY", i, flush=True)
                        async for _ in ev:
                            pass
            elif mode == "score":
                chunks = [Tokens([72 + (k % 20) for k in range(20000)])]
                print("READY", i, flush=True)
                while True:
                    await c.score(chunks, [(1, 19999)])
            elif mode == "chat_stream":
                msgs = [{"role": "user", "content": "Hello"}]
                async with c.chat_stream(msgs, max_tokens=10**7) as ev:
                    print("READY", i, flush=True)
                    async for _ in ev:
                        pass
            elif mode == "unary":
                print("READY", i, flush=True)
                while True:
                    async with c.session():
                        pass
        raise AssertionError("the call ended by itself")

    for i in range(runs):
        started = None
        try:
            trio.run(main, i)
        except KeyboardInterrupt:
            pass
        left = [t.name for t in threading.enumerate() if t.name == "poc_api-asyncio"]
        assert not left, left
        print("UNWOUND", i, flush=True)
    trio.run(main, runs)  # not caught: the process must exit
    """
)


def _expect(lines: queue.Queue[str], word: str, i: int, within: float) -> str:
    try:
        line = lines.get(timeout=within)
    except queue.Empty:
        raise AssertionError(f"no {word} {i} within {within} s") from None
    if line.startswith("LOST ") and word == "UNWOUND":
        return line
    assert line.split() == [word, str(i)], f"expected {word} {i}, got {line!r}"
    return ""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
@pytest.mark.parametrize("mode", ["generate", "conversation", "score", "unary", "chat_stream"])
def test_ctrl_c_mid_call_unwinds_every_block_and_the_process_exits(mode: str) -> None:
    rng = random.Random(f"ctrl-c-{mode}")
    srv = ReferenceServer(ServerConfig(max_context=10**8, ignore_eos=True))
    srv.start()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, srv.base_url, srv.grpc_url, str(RUNS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True)
    reader.start()
    try:
        for i in range(RUNS + 1):
            _expect(lines, "READY", i, 30)
            time.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGINT)
            if i < RUNS and _expect(lines, "UNWOUND", i, 5):
                proc.send_signal(signal.SIGINT)  # the first one was lost (see above)
                assert not _expect(lines, "UNWOUND", i, 5), "lost twice"
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            assert _expect(lines, "UNWOUND", RUNS, 0), "the process did not exit within 5 s"
            proc.send_signal(signal.SIGINT)  # the first one was lost (see above)
            code = proc.wait(5)
        # Uncaught KeyboardInterrupt: Python exits by SIGINT (or 1 on old versions).
        assert code in (-signal.SIGINT, 1, 130), code
        # Every block closed its session before its trio.run ended.
        deadline = time.monotonic() + 5
        while srv.state().session_ids and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not srv.state().session_ids
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        err = proc.communicate()[1]
        print(err[-4000:])
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        srv.stop()
