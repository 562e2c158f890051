"""Task runner. `nox` runs the default sessions: tests (the whole matrix), lint,
typecheck and proto. `nox -s bench` and `nox -s soak` run on demand."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint", "typecheck", "proto"]
nox.options.reuse_existing_virtualenvs = False

ROOT = Path(__file__).parent


# Every Python with the latest deps; the lowest pins on the two ends of the range.
# (The middle cell with the lowest pins found nothing the ends did not.)
MATRIX = [
    ("3.11", "lowest"),
    ("3.11", "latest"),
    ("3.12", "latest"),
    ("3.13", "lowest"),
    ("3.13", "latest"),
]
# Tests marked `slow` whose subject does not depend on the Python or dependency
# versions (the bench harness, the pool's balance, a long cancellation storm) run
# in this cell only. Tests marked `heavy` depend on the dependency versions (HTTP/2
# flow control, GOAWAYs through nginx, the pool's failover) but not on Python's:
# they run in this Python's cells, lowest and latest pins. Every other test runs in
# every cell. (CI time is budgeted: a cell costs two to three minutes there.)
SLOW_CELL = ("3.11", "latest")
HEAVY_PYTHON = "3.11"
# Test processes per cell (pytest-xdist). Five on CI's 2 cores: many tests wait on
# sockets and timers, and with three the cores were idle a third of the time (a
# 3.12 cell here: 139 s with three workers, 122 with four, 99 with five, 101 with
# six; with two, 200 s). Five, not a count per core, so a bigger machine runs the
# configuration CI runs (the tests' own time limits assume it); one on a single core.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
WORKERS = 5 if _CORES >= 2 else 1


@nox.session
@nox.parametrize("python,deps", MATRIX, ids=[f"{python}-{deps}" for python, deps in MATRIX])
def tests(session: nox.Session, deps: str) -> None:
    """The test suite, against the lowest supported and the latest runtime deps."""
    if deps == "lowest":
        session.install("-e", ".[test]", "-c", ".ci/lowest.txt")
    else:
        session.install("--upgrade", "-e", ".[test]")
    args = session.posargs
    if not args:
        if (session.python, deps) != SLOW_CELL:
            heavy = session.python == HEAVY_PYTHON
            args = ["-m", "not slow" if heavy else "not slow and not heavy"]
        if WORKERS > 1:
            args = [*args, "-n", str(WORKERS)]
    session.run("python", "-m", "pytest", "-q", *args)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff==0.17.6")  # pinned: a new ruff release must not turn main red
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src/, on the benchmarks and on the user programs of tests/typing;
    pyright on those programs and on the completeness of the public API's types."""
    session.install("-e", ".[test]", "mypy==2.4.1", "pyright==1.1.414")
    session.run("mypy", "--strict", "src/poc_api")
    session.run("mypy", "--strict", "benchmarks")
    # Programs a user would write against the public API (never run, nor collected
    # by pytest): their typing.assert_type()s hold, and a call the API must refuse
    # carries a `# type: ignore[code]`, which --strict (warn_unused_ignores) checks
    # is still needed. MYPYPATH: this tree's poc_api, however it is installed.
    session.run("mypy", "--strict", "tests/typing", env={"MYPYPATH": "src"})
    # Pylance's checker, as many users see the API: those programs strict (see
    # [tool.pyright]), and no public name whose type pyright cannot tell (a missing
    # annotation it would have to infer). Its wheel brings pyright; node runs it.
    session.run("pyright")
    session.run("pyright", "--verifytypes", "poc_api", "--ignoreexternal")


@nox.session(python="3.11")
def proto(session: nox.Session) -> None:
    """Regenerate the betterproto2 code from proto/ and fail if it differs."""
    session.install("betterproto2-compiler==0.10.1", "grpcio-tools")
    committed = ROOT / "src" / "poc_api" / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        session.run(
            "python",
            "-m",
            "grpc_tools.protoc",
            "-I",
            "proto",
            f"--python_betterproto2_out={tmp}",
            "--python_betterproto2_opt=client_generation=async",
            "--python_betterproto2_opt=server_generation=async",
            "proto/salience.proto",
            # The standard gRPC health checking protocol (issue 12), generated here
            # so that neither side needs protobuf at run time.
            "proto/grpc/health/v1/health.proto",
        )
        if "--write" in session.posargs:
            shutil.rmtree(committed)
            shutil.copytree(tmp, committed)
            return

        def files(root: Path) -> dict[str, bytes]:
            return {
                str(f.relative_to(root)): f.read_bytes()
                for f in sorted(root.rglob("*"))
                if f.is_file() and "__pycache__" not in f.parts
            }

        want, have = files(Path(tmp)), files(committed)
        if want != have:
            changed = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
            session.error(
                f"generated code is stale: {changed}; run `nox -s proto -- --write` and commit"
            )


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks (poc_api on trio vs grpclib on asyncio vs grpcio)."""
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python="3.11")
def soak(session: nox.Session) -> None:
    """Long mixed traffic with random cancellations; reports RSS and fd counts."""
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/soak.py", *session.posargs)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run this file with nox")
