"""Runs ``poc-api`` in a process forked from one that has imported it already.

A ``python -m poc_api.cli`` costs about a second of CPU in imports before it does
anything, and the CLI tests ran forty of them per test cell: a quarter of a cell's
CPU. multiprocessing's forkserver imports the CLI once per test process, then forks
a child per command. The child is still a real process (its own main thread, signal
handlers, fds 0-2, environment and exit status), so the CLI runs as it does for a
user, less the interpreter's start. What only that start decides (PYTHONIOENCODING,
the console script, ``python -m``) is tested with real processes (``run_cli(...,
fork=False)`` in test_cli.py).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

_CTX = multiprocessing.get_context("forkserver")
# (A preload that fails to import is skipped silently: test_cli checks it held.)
_CTX.set_forkserver_preload(["poc_api.cli", "poc_api.server"])


def _child(argv: Sequence[str], env: dict[str, str], folder: str) -> None:
    """The command, in the forked child: fds 0-2 and the environment as a process's."""
    os.environ.clear()
    os.environ.update(env)
    for fd, name, flags in (
        (0, "stdin", os.O_RDONLY),
        (1, "stdout", os.O_WRONLY),
        (2, "stderr", os.O_WRONLY),
    ):
        opened = os.open(os.path.join(folder, name), flags)
        os.dup2(opened, fd)
        os.close(opened)
    # As the interpreter sets them up for files and pipes.
    sys.stdin = open(0, encoding=None, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding=None, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    preloaded = "poc_api.cli" in sys.modules
    import poc_api.cli

    sys.argv = [poc_api.cli.__file__, *argv]
    if env.get("POC_API_TEST_PRELOADED") == "1":
        print(f"preloaded={preloaded}", file=sys.stderr)
    poc_api.cli.main(argv)


async def run_forked(
    argv: Sequence[str], *, env: dict[str, str], stdin: bytes, timeout: float
) -> subprocess.CompletedProcess[str]:
    """``poc-api *argv`` in a forked child, as ``trio.run_process`` would report it."""
    # The interpreter read these as it started, long before the fork: a test that
    # sets one must start a fresh one, or it tests nothing.
    names = {k for k in (*env, *os.environ) if k.startswith("PYTHON")}
    if changed := sorted(k for k in names if env.get(k) != os.environ.get(k)):
        raise ValueError(f"{', '.join(changed)} set: that takes a fresh interpreter (fork=False)")
    with tempfile.TemporaryDirectory() as folder:
        _prepare(folder, stdin)
        child = _CTX.Process(target=_child, args=(list(argv), env, folder))
        # The first start starts the forkserver (its imports): off the trio thread.
        await trio.to_thread.run_sync(child.start)
        try:
            with trio.fail_after(timeout):
                await trio.lowlevel.wait_readable(child.sentinel)
        finally:
            if child.exitcode is None:
                child.kill()
            child.join()
        out, err = _collect(folder)
        return subprocess.CompletedProcess(
            [sys.executable, "-m", "poc_api.cli", *argv], child.exitcode, out, err
        )


# (Small files in a fresh temporary folder: not worth a thread each.)
def _prepare(folder: str, stdin: bytes) -> None:
    Path(folder, "stdin").write_bytes(stdin)
    Path(folder, "stdout").touch()
    Path(folder, "stderr").touch()


def _collect(folder: str) -> tuple[str, str]:
    return Path(folder, "stdout").read_text(), Path(folder, "stderr").read_text()
