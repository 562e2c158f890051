"""The ``poc-api`` command line, run as a real process: forked from one that imported
it already (cli_fork.py), or started afresh (``python -m poc_api.cli``) where the
interpreter's start is the subject.

Expected outputs are computed with the library against an in-process reference
server of the same configuration as the CLI's embedded one, so the tests check
the CLI's plumbing, not the toy model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
import trio
from cli_fork import run_forked
from helpers import http_server, read_request, refusing_port, wait_for
from misbehaving import Reply, misbehaving_server

import poc_api
from poc_api import SamplingParams, Token, Tokens
from poc_api.cli import _count, sparkline
from poc_api.cli import main as cli_main
from poc_api.server import ReferenceServer
from poc_api.testing import open_client, reference_server

CLI = (sys.executable, "-m", "poc_api.cli")
TIMEOUT = 60
UNREACHABLE = "http://127.0.0.1:1/v1"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment without connection settings that could redirect the CLI."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("POC_BASE_URL", "POC_API_KEY", "POC_GRPC_URL", "POC_MODEL", "POC_DEBUG")
    }
    env.update(extra)
    return env


async def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes = b"", fork: bool = True
) -> subprocess.CompletedProcess[str]:
    """``poc-api *args``: forked from a process that imported it (cli_fork.py) unless
    ``fork=False``, for what only a fresh interpreter shows."""
    env = cli_env() if env is None else env
    if fork:
        return await run_forked(args, env=env, stdin=stdin, timeout=TIMEOUT)
    with trio.fail_after(TIMEOUT):
        proc = await trio.run_process(
            [*CLI, *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def json_answer(status: int, body: bytes) -> bytes:
    """A whole HTTP/1.1 answer of ``status`` with a JSON ``body``; the connection closes."""
    return (
        f"HTTP/1.1 {status} Canned\r\ncontent-type: application/json\r\n".encode()
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )


async def greedy_text(client: poc_api.ApiClient, prompt: str, n: int, **sampling: float) -> str:
    ids = await client.tokenize(prompt)
    async with client.session() as s:
        async with s.generate(ids, sampling=SamplingParams(max_tokens=n, **sampling)) as ev:  # type: ignore[arg-type]
            out = [e.id async for e in ev if isinstance(e, Token) and not e.is_prefill]
    return await client.detokenize(out)


# -- pure helpers -----------------------------------------------------------------------


def test_a_count_of_one_is_singular() -> None:
    # The demo said "1 tokens" (a prompt of one token, a server's short context).
    assert [_count(n, "token") for n in (0, 1, 2)] == ["0 tokens", "1 token", "2 tokens"]


def test_sparkline_scales_from_lowest_to_highest_block() -> None:
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([2.0, 2.0]) == "▁▁"
    assert sparkline([]) == ""
    assert sparkline([0.0, float("nan"), 1.0]) == "▁ █"
    assert sparkline([5.0], low=0.0, high=10.0) == "▅"


# -- demo ------------------------------------------------------------------------------


async def test_demo_tours_the_library_and_exits_zero() -> None:
    result = await run_cli("demo", fork=False)  # the main job, as a user runs it
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "\x1b[" not in out, "no terminal codes when stdout is not a TTY"
    for needle in (
        "embedded reference server",
        "1. Session",
        "placeholder_count 4",  # the demo's 56x56 PNG
        "vision_start [258]",  # bracketed with the ids from GET /tokenizer
        "2. Streaming generation",
        "3. Readouts",
        "readout shape (3, 8)",
        "4. Scoring",
        "more likely",
        "5. Reusing the conversation",
        "session reused: yes",
        "6. Timings",
        "time to first token",
        "tokens/s",
    ):
        assert needle in out, needle
    # Sparklines for the concepts, one block per generated token.
    spark_rows = [line for line in out.splitlines() if re.search(r"[▁▂▃▄▅▆▇█]{8,}", line)]
    assert len(spark_rows) == 8
    # Only the new user text was sent in the second turn.
    m = re.search(r"sent (\d+) of (\d+) prompt tokens \(delta = (\d+) new tokens\)", out)
    assert m is not None, out
    sent, total, delta = map(int, m.groups())
    assert sent == delta < total
    assert f"the server counted {delta} appended tokens" in out
    # Scoring sent the prompt once: what was sent is what the server counted.
    m = re.search(
        r"positions sent: ([\d,]+) .*would send ([\d,]+)\); the server counted ([\d,]+)", out
    )
    assert m is not None, out
    sent, separate, counted = (int(g.replace(",", "")) for g in m.groups())
    assert sent == counted < separate


async def test_the_embedded_server_is_reached_past_a_proxy_variable() -> None:
    # Behind a corporate proxy (HTTP_PROXY set, NO_PROXY naming localhost at
    # most) `poc-api demo`, the README's first command, and every command
    # without --url sent the embedded loopback server's HTTP calls to the proxy.
    proxy = f"http://127.0.0.1:{refusing_port()}"
    result = await run_cli("demo", env=cli_env(HTTP_PROXY=proxy, NO_PROXY="localhost"))
    assert result.returncode == 0, result.stderr
    assert "5. Reusing the conversation" in result.stdout


async def test_demo_against_a_url_without_readout_skips_readouts_gracefully() -> None:
    async with reference_server(readout=False, api_key="demo-key") as server:
        result = await run_cli("demo", "--url", server.base_url, "--api-key", "demo-key")
    assert result.returncode == 0, result.stderr
    assert "readout is disabled on this server" in result.stdout
    assert "server: remote" in result.stdout
    assert "session reused: yes" in result.stdout
    assert "demo-key" not in result.stdout + result.stderr


async def test_the_demo_takes_vision_brackets_from_a_tokenizer_answer_of_the_right_shape() -> None:
    # tokenizer_info() checks its answer's shape now (TokenizerInfo, else a
    # ProtocolViolation); the demo, which skipped an answer of another shape,
    # still skips it, and an endpoint that is not there.
    from poc_api.cli import _vision_brackets

    class Answering:
        def __init__(self, answer: object) -> None:
            self.answer = answer

        async def tokenizer_info(self) -> object:
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer

    def http_error(status: int) -> poc_api.HttpError:
        return poc_api.HttpError("no", http_status=status, url="u", body_excerpt="")

    special = {"vision_start": 258, "vision_end": 259, "bos": 256}
    cases: list[tuple[object, tuple[list[int], list[int]]]] = [
        ({"vocab_size": 261, "special": special}, ([258], [259])),
        ({"vocab_size": 261, "special": {"bos": 256}}, ([], [])),
        (poc_api.ProtocolViolation("GET /v1/tokenizer: expected ..."), ([], [])),
        (http_error(404), ([], [])),
    ]
    for answer, brackets in cases:
        assert await _vision_brackets(Answering(answer)) == brackets  # type: ignore[arg-type]
    with pytest.raises(poc_api.HttpError):
        await _vision_brackets(Answering(http_error(500)))  # type: ignore[arg-type]


# -- how these tests run it ------------------------------------------------------------


async def test_a_forked_command_runs_as_a_fresh_process_would() -> None:
    # The forked child (cli_fork.py) must show what a real process shows, or these
    # tests test the emulation: same output, same error lines, same exit status.
    for args in (
        ["generate", "Once upon a time", "--max-tokens", "5", "--readout"],
        ["generate", "hi", "--url", UNREACHABLE, "--api-key", "k"],
    ):
        forked = await run_cli(*args)
        real = await run_cli(*args, fork=False)
        assert (forked.returncode, forked.stdout, forked.stderr) == (
            real.returncode,
            real.stdout,
            real.stderr,
        ), args


async def test_a_forked_command_is_spared_the_imports() -> None:
    # (multiprocessing skips a preload that fails to import, silently: the tests
    # would run, each a second slower.)
    result = await run_cli("--help", env=cli_env(POC_API_TEST_PRELOADED="1"))
    assert result.returncode == 0, result.stderr
    assert "Usage: poc-api" in result.stdout
    assert result.stderr == "preloaded=True\n"


# -- generate --------------------------------------------------------------------------


async def test_generate_prints_the_greedy_completion() -> None:
    async with reference_server() as server, open_client(server) as client:
        expected = await greedy_text(client, "Once upon a time", 20)
    result = await run_cli("generate", "Once upon a time", "--max-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize(
    "args",
    [["generate", "Once upon a time", "--max-tokens", "100000"], ["demo"]],
    ids=["generate", "demo"],
)
async def test_output_piped_into_head_ends_quietly_as_unix_tools_do(args: list[str]) -> None:
    # `poc-api generate ... | head -c 10`: the reader goes away mid-stream. That is
    # the reader's choice, not an error: no "error: Broken pipe" line, and the exit
    # status of a process killed by SIGPIPE (141), as `yes | head` has. (demo
    # writes through rich, which caught the broken pipe itself: exit 1.)
    with trio.fail_after(TIMEOUT):
        proc = await trio.lowlevel.open_process(
            [*CLI, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        first = await proc.stdout.receive_some(10)
        assert first
        await proc.stdout.aclose()
        err = b""
        while chunk := await proc.stderr.receive_some():
            err += chunk
        status = await proc.wait()
    assert err.decode() == ""
    assert status == 141


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["--version"]])
def test_text_click_writes_to_a_reader_that_left_ends_as_unix_tools_do(args: list[str]) -> None:
    # `poc-api --help | true`: click wrote its help to a pipe whose reader had gone,
    # and ended with status 1, where the command's own output ends with 141.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [*CLI, *args], stdout=write_end, stderr=subprocess.PIPE, env=cli_env(), timeout=60
        )
    finally:
        os.close(write_end)
    assert proc.stderr.decode() == ""
    assert proc.returncode == 141


async def test_generate_seed_reaches_the_embedded_server() -> None:
    async with reference_server(seed=7) as server, open_client(server) as client:
        expected = await greedy_text(client, "It was", 24, temperature=1.0)
    result = await run_cli(
        "generate", "It was", "--max-tokens", "24", "--temperature", "1", "--seed", "7"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


async def test_generate_does_not_print_the_special_token_it_stops_on() -> None:
    # A completion that ended on the model's end-of-sequence token printed it
    # ("... came down.<|eos|>"): the tokenizer's special tokens are not text.
    args = ("The quick brown fox", 200)
    async with reference_server(seed=3) as server, open_client(server) as client:
        expected = await greedy_text(client, *args, temperature=0.8)
    assert expected.endswith("<|eos|>")
    result = await run_cli(
        "generate", args[0], "--max-tokens", str(args[1]), "--temperature", "0.8", "--seed", "3"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.removesuffix("<|eos|>") + "\n"


async def test_generate_with_readout_shows_a_sparkline_per_concept() -> None:
    result = await run_cli("generate", "Hello there", "--max-tokens", "12", "--readout")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    concepts = {r[0]: r[1] for r in rows if len(r) == 4 and re.fullmatch("[▁▂▃▄▅▆▇█]+", r[1])}
    assert set(concepts) >= {"vowel", "consonant", "space"}
    assert all(len(spark) == 12 for spark in concepts.values())


async def test_generate_with_readout_and_no_tokens_says_none_were_decoded() -> None:
    # "the server sent no readout vectors of the manifest's shape": a server fault,
    # for what --max-tokens 0 asked (readouts come with decoded tokens).
    result = await run_cli("generate", "Hello there", "--max-tokens", "0", "--readout")
    assert result.returncode == 0, result.stderr
    assert "no token was decoded, so there are no readouts to show" in result.stdout
    assert "manifest's shape" not in result.stdout


# -- score -----------------------------------------------------------------------------


async def test_score_prints_continuations_best_first_with_their_logprobs() -> None:
    prompt, conts = "The cat sat on the", [" xylophone.", " mat.", " dog"]
    async with reference_server() as server, open_client(server) as client:
        p = await client.tokenize(prompt)
        expected = {}
        for c in conts:
            ids = await client.tokenize(c)
            [r] = await client.score([Tokens(p + ids)], [(len(p), len(p) + len(ids))])
            expected[c] = (r.logprob, len(ids))
    args = ["score", prompt]
    for c in conts:
        args += ["--continuation", c]
    result = await run_cli(*args)
    assert result.returncode == 0, result.stderr
    header, *lines, blank, positions = result.stdout.splitlines()
    assert header.split() == ["rank", "logprob", "per-token", "tokens", "continuation"]
    # The prompt went once: the server counted its tokens plus the continuations'.
    n_prompt, n_conts = len(p), sum(n for _, n in expected.values())
    assert blank == ""
    assert positions == (
        f"positions sent: {n_prompt + n_conts:,} (prompt {n_prompt:,} once + continuations "
        f"{n_conts:,}; one full prompt each would send {3 * n_prompt + n_conts:,}); "
        f"the server counted {n_prompt + n_conts:,}"
    )
    rows = []
    for line in lines:
        rank, logprob, per_token, n, cont = line.split(maxsplit=4)
        rows.append((int(rank), float(logprob), float(per_token), int(n), json.loads(cont)))
    assert [r[0] for r in rows] == [1, 2, 3]
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    for _, logprob, per_token, n, cont in rows:
        assert logprob == pytest.approx(expected[cont][0], abs=1e-4)
        assert n == expected[cont][1]
        assert per_token == pytest.approx(logprob / n, abs=1e-3)


# -- chat ------------------------------------------------------------------------------


async def test_chat_prints_the_streamed_reply() -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    async with reference_server() as server, open_client(server) as client:
        expected = (await client.chat(messages, max_tokens=30)).text
    result = await run_cli("chat", "Tell me a story", "--max-tokens", "30")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


async def test_chat_sends_the_model_named_by_model_or_poc_model() -> None:
    # A server serving two models: without --model there is no way to name one.
    bodies: list[dict[str, object]] = []

    async def handler(stream: trio.SocketStream) -> None:
        _, body = await read_request(stream)
        bodies.append(json.loads(body))
        chunk = json.dumps({"choices": [{"index": 0, "delta": {"content": "hi"}}]})
        sse = f"data: {chunk}\n\ndata: [DONE]\n\n".encode()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            + f"content-length: {len(sse)}\r\nconnection: close\r\n\r\n".encode()
            + sse
        )

    async with http_server(handler) as url:
        flag = await run_cli("chat", "x", "--url", url, "--model", "b")
        env = await run_cli("chat", "x", "--url", url, env=cli_env(POC_MODEL="a"))
    assert (flag.returncode, flag.stdout, env.returncode) == (0, "hi\n", 0), flag.stderr
    assert [b["model"] for b in bodies] == ["b", "a"]


@pytest.mark.parametrize(
    ("models", "says"),
    [
        (b'{"data": [{"id": "a"}, {"id": "b"}]}', "lists 2 models (['a', 'b'])"),
        (b'{"data": [{"id": 7}]}', "lists 1 model with no usable id ([7])"),
        (b'{"data": []}', "lists no models"),
        (None, "failed, so there is no model to name: HTTP 503"),
    ],
    ids=["two", "no-usable-id", "none", "503"],
)
async def test_chat_without_a_model_to_name_says_model_as_the_cli_spells_it(
    models: bytes | None, says: str
) -> None:
    # The library's words came through as they are: "bad argument: model= is not
    # set ... pass model= to name one" (a Python parameter, and not a bad
    # argument: a missing one), and "lists 1 models" for a lone id that is no name.
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        status, body = (503, b'{"error": "busy"}') if models is None else (200, models)
        await stream.send_all(json_answer(status, body))

    async with http_server(handler) as url:
        result = await run_cli("chat", "x", "--url", url)
    assert result.returncode == 1, result.stderr
    assert says in result.stderr
    assert result.stderr.startswith("error: --model (or POC_MODEL) is not set and GET "), (
        result.stderr
    )
    assert "model=" not in result.stderr and "bad argument" not in result.stderr
    if models is not None:
        assert result.stderr.rstrip().endswith("pass --model to name one")


async def no_tokenizer(stream: trio.SocketStream) -> None:
    """An HTTP side that answers 404 (no tokenizer: the byte-level rule is used)."""
    await read_request(stream)
    await stream.send_all(json_answer(404, b'{"detail": "Not Found"}'))


@pytest.mark.parametrize("silent", ["http", "OpenSession", "Generate", "CloseSession"])
async def test_timeout_bounds_each_wait_of_a_command(silent: str) -> None:
    # There was no --timeout: a server gone silent held generate for the client's
    # 600 s (an HTTP call) or for ever (a Generate stream that sends no token).
    async def http(stream: trio.SocketStream) -> None:
        if silent == "http":
            await read_request(stream)
            await trio.sleep_forever()
        await no_tokenizer(stream)

    async with http_server(http) as url, misbehaving_server() as srv:
        if silent != "http":
            srv.plan(silent, Reply("silent"))
        # (2 s where the command must get through a call first, its tokenizer
        # question or a Generate: a loaded CI machine once took more than 0.5 s
        # to a first token.)
        timeout = "0.5" if silent == "http" else "2"
        started = trio.current_time()
        result = await run_cli(
            "generate", "hi", "--url", url, "--grpc-url", srv.url, "--timeout", timeout
        )
        took = trio.current_time() - started
    if silent == "CloseSession":  # the command is done: the close waits --timeout, not 5 s
        assert result.returncode == 0, result.stderr
        assert "CloseSession" in result.stderr and took < 5
        return
    assert result.returncode == 1, result.stderr
    assert "did not answer in time" in result.stderr
    assert re.search(rf"\b{timeout}(\.\d*)? s\b", result.stderr), result.stderr
    assert took < 10  # (a fresh interpreter's start included)
    methods = [c.method for c in srv.calls]
    assert ("OpenSession" in methods) == (silent != "http"), methods


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "x"])
async def test_timeout_must_be_a_positive_number_of_seconds(value: str) -> None:
    result = await run_cli("generate", "hi", "--timeout", value)
    assert result.returncode == 2, result.stderr
    assert "--timeout" in result.stderr


@pytest.mark.parametrize("command", ["generate", "score", "chat"])
async def test_text_dash_reads_standard_input(command: str) -> None:
    # "-" was sent as the prompt itself: a long prompt had to fit on the command line.
    text = "Once upon a time,\nin a small town"
    extra = {
        "generate": ["--temperature", "0", "--max-tokens", "12"],
        "score": ["-c", " there", "-c", " lived"],
        "chat": ["--max-tokens", "12", "--seed", "3"],
    }[command]
    given = await run_cli(command, text, *extra)
    piped = await run_cli(command, "-", *extra, stdin=text.encode() + b"\n")
    assert (given.returncode, piped.returncode) == (0, 0), piped.stderr
    assert piped.stdout == given.stdout and given.stdout.strip()  # (one final newline dropped)


@pytest.mark.skipif(not Path("/proc/self/syscall").exists(), reason="needs /proc/<pid>/syscall")
@pytest.mark.parametrize(
    ("signum", "said"),
    [
        (signal.SIGINT, "interrupted"),
        (signal.SIGTERM, "terminated"),
        (signal.SIGHUP, "hung up"),
    ],
)
async def test_a_signal_while_text_dash_waits_for_stdin_ends_as_any_command(
    signum: int, said: str
) -> None:
    # The read ran in click's argument handling, before the command's own: Ctrl-C
    # there printed click's "Aborted!" and exited 1, not "error: interrupted", 130.
    # SIGTERM and SIGHUP, before trio.run, killed the process: no "error:" line.
    with trio.fail_after(TIMEOUT):
        proc = await trio.lowlevel.open_process(
            [*CLI, "generate", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
            # A shell without job control (CI) starts background jobs with SIGINT
            # ignored, and a child inherits that: Python then keeps it ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            syscall = trio.Path(f"/proc/{proc.pid}/syscall")
            # Polled: another process, blocked in read(0, ...), has no event to give.
            while not (await syscall.read_text()).startswith("0 0x0 "):  # noqa: ASYNC110
                await trio.sleep(0.05)
            proc.send_signal(signum)
            assert await proc.wait() == 128 + signum
            assert proc.stderr is not None
            err = b""
            while chunk := await proc.stderr.receive_some():
                err += chunk
        finally:
            proc.kill()
            await proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()
    assert err.decode() == f"error: {said}\n"


async def test_text_dash_with_an_unreadable_stdin_is_one_error_line(tmp_path: Path) -> None:
    # A read error (stdin open for writing only) ended in a traceback.
    with (tmp_path / "w").open("wb") as write_only, trio.fail_after(TIMEOUT):
        proc = await trio.run_process(
            [*CLI, "generate", "-"],
            stdin=write_only,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=cli_env(),
        )
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.startswith("error: cannot read TEXT from standard input: "), err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("stdin", "says"),
    [(b"", "must not be empty"), (b"\n", "must not be empty"), (b"a\xffb", "not UTF-8")],
)
async def test_text_dash_refuses_what_the_argument_would(stdin: bytes, says: str) -> None:
    result = await run_cli("generate", "-", stdin=stdin)
    assert result.returncode == 2, result.stderr
    assert "TEXT" in result.stderr and says in result.stderr


@pytest.mark.parametrize("fails", [True, False])
async def test_a_failed_close_is_told_after_the_commands_own_error(fails: bool) -> None:
    # The CloseSession warning, three lines long on a terminal, came first and
    # the command's own error last: what went wrong was the last thing to find.
    async with http_server(no_tokenizer) as url, misbehaving_server() as srv:
        if fails:
            srv.plan("Generate", Reply("trailers_only", status=14))
        srv.plan("CloseSession", Reply("trailers_only", status=13))
        result = await run_cli("generate", "hi", "--url", url, "--grpc-url", srv.url)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert result.returncode == (1 if fails else 0), result.stderr
    if fails:
        assert lines[0].startswith("error: the server at "), result.stderr
        assert lines[1:] == [
            "poc_api warning: session mis-1-1 was not closed either (CloseSession failed); "
            "the server frees it when idle"
        ], result.stderr
    else:  # (the whole warning: it is the only thing that went wrong)
        assert len(lines) == 1 and lines[0].startswith(
            "poc_api warning: CloseSession mis-1-1 failed: "
        )


async def test_a_close_that_timed_out_is_told_after_the_commands_own_error() -> None:
    # A CloseSession that timed out is sent again, and the client's close then
    # logs how many sessions are left to idle eviction: that line came before the
    # command's own error (the README: a session the command could not close is
    # told last).
    async with http_server(no_tokenizer) as url, misbehaving_server() as srv:
        srv.plan("Generate", Reply("trailers_only", status=14))
        srv.plan("CloseSession", Reply("silent"), Reply("silent"), Reply("silent"))
        result = await run_cli(
            "generate", "hi", "--url", url, "--grpc-url", srv.url, "--timeout", "0.5"
        )
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert result.returncode == 1, result.stderr
    assert lines[0].startswith("error: the server at "), result.stderr
    assert all(line.startswith("poc_api warning: ") for line in lines[1:]), result.stderr


async def test_a_redirect_asks_whether_the_url_option_is_right() -> None:
    # It asked "is base_url right?", the library's argument, not the option.
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(
            b"HTTP/1.1 307 Moved\r\nlocation: http://elsewhere/v2/models\r\n"
            b"content-length: 0\r\nconnection: close\r\n\r\n"
        )

    async with http_server(handler) as url:
        result = await run_cli("chat", "x", "--url", url)
    assert result.returncode == 1, result.stderr
    assert "a redirect to 'http://elsewhere/v2/models', not followed (is --url right?)" in (
        result.stderr
    )
    assert "base_url" not in result.stderr


@pytest.mark.parametrize(
    ("status", "says"),
    [(401, "refused the api key"), (403, "refused the request: permission denied")],
)
async def test_a_refusal_says_whether_the_key_was_wrong_or_not_allowed(
    status: int, says: str
) -> None:
    # 403 (and PERMISSION_DENIED) was told as a wrong key: the key was fine.
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(json_answer(status, b'{"error": "no"}'))

    async with http_server(handler) as url:
        result = await run_cli("chat", "x", "--url", url, "--api-key", "k")
    assert result.returncode == 1, result.stderr
    assert says in result.stderr, result.stderr


async def test_an_unreachable_url_with_a_password_is_named_and_redacted() -> None:
    # The error named the gRPC endpoint (the redacted message never held the raw
    # URL it looked for), and demo printed the password.
    result = await run_cli("generate", "hi", "--url", "http://user:s3cret@127.0.0.1:1/v1")
    assert result.returncode == 1
    assert "cannot reach the server at http://user:***@127.0.0.1:1/v1" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout


async def serve_urls(stdout: trio.abc.ReceiveStream) -> dict[str, str]:
    """``{"base_url": ..., "grpc_url": ...}`` from ``poc-api serve``'s first lines."""
    buf = b""
    while b"grpc_url:" not in buf:
        chunk = await stdout.receive_some()
        assert chunk, "serve exited before listening"
        buf += chunk
    return dict(line.split(": ", 1) for line in buf.decode().splitlines() if ": " in line)


# -- serve -----------------------------------------------------------------------------


async def test_a_server_killed_mid_stream_is_told_in_error_and_warning_lines_only() -> None:
    # `poc-api generate --url ...` with the server killed mid-stream: stderr began
    # with a bare log line (logging's last resort: "CloseSession ... failed"), the
    # error said "cannot reach the server" of a server it had reached, and on a
    # terminal the error line went on the line the generated text had left open.
    with trio.fail_after(TIMEOUT):
        proc = await trio.lowlevel.open_process(
            [*CLI, "serve", "--port", "0", "--token-delay-ms", "20"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=cli_env(),
        )
        try:
            assert proc.stdout is not None
            urls = await serve_urls(proc.stdout)
            gen = await trio.lowlevel.open_process(
                [*CLI, "generate", "Once", "--url", urls["base_url"], "--max-tokens", "1000"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=cli_env(),
            )
            assert gen.stdout is not None and gen.stderr is not None
            out = await gen.stdout.receive_some()
            assert out  # it streams: now the server goes
            proc.kill()
            while chunk := await gen.stdout.receive_some():
                out += chunk
            err = b""
            while chunk := await gen.stderr.receive_some():
                err += chunk
            assert await gen.wait() == 1
        finally:
            proc.kill()
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()
    lines = err.decode().splitlines()
    assert lines and all(line.startswith(("error: ", "poc_api warning: ")) for line in lines)
    # (The session's failed close, if told, is told after the error: see below.)
    assert lines[0].startswith("error: ") and "cannot reach" not in lines[0], lines
    assert out  # (in a pipe, the text as generated: see the terminal's case below)


def test_a_lost_server_is_unavailable_not_unreachable_once_it_has_answered() -> None:
    # The test above failed in CI now and then: with the server killed, the
    # printer's next /detokenize (a new connection, refused) could fail before
    # the stream did, and that error said "cannot reach" of the server that had
    # just streamed. "Cannot reach" is for an endpoint never heard from.
    from poc_api.cli import _describe, _Where

    where = _Where()
    where.base_url, where.grpc_url = "http://127.0.0.1:9/v1", "http://127.0.0.1:10"
    refused = poc_api.ServerUnavailable(
        "POST http://127.0.0.1:9/v1/detokenize: ConnectError: all attempts to connect "
        "to 127.0.0.1:9 failed",
        retriable=True,
    )
    stream = poc_api.ServerUnavailable("Generate: cannot reach the server: refused", retriable=True)
    assert (_describe(refused, where) or "").startswith(
        "cannot reach the server at http://127.0.0.1:9/v1 "
    )
    where.answered(where.base_url)
    assert (_describe(refused, where) or "").startswith(
        "the server at http://127.0.0.1:9/v1 is unavailable ("
    )
    # Each endpoint on its own: a gRPC URL never reached is still "cannot reach".
    assert (_describe(stream, where) or "").startswith(
        "cannot reach the server at http://127.0.0.1:10 "
    )
    where.answered(where.grpc_url)
    assert (_describe(stream, where) or "").startswith(
        "the server at http://127.0.0.1:10 is unavailable"
    )


@pytest.mark.parametrize("tty", [False, True])
def test_a_warning_or_error_ends_the_line_streamed_text_left_open_on_a_terminal_only(
    tty: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # On a terminal, a warning or an error after streamed text ran on in its line;
    # the first fix ended the line in a file or pipe too, adding a newline to the
    # generated text there (also in the middle of it, for a warning).
    from poc_api.cli import _Stdout, _write_stdout

    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    _write_stdout("once upon")
    _Stdout.end_line()
    _Stdout.end_line()  # (once)
    _write_stdout(" a time\n")
    _Stdout.end_line()  # (a line the text ended: nothing)
    out = capsys.readouterr().out
    assert out == ("once upon\n a time\n" if tty else "once upon a time\n")


def test_poc_api_log_records_print_as_one_line_and_only_while_a_command_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A warning came out bare (logging's last resort); an ERROR record's traceback,
    # printed in one line as "error: ...", read as the command's own failure.
    import logging

    from poc_api.cli import _WarningLines

    handler = _WarningLines()
    record = logging.LogRecord("poc_api.grpc", logging.ERROR, "f", 1, "it broke", (), None)
    try:
        raise OSError("no route")
    except OSError:
        record.exc_info = sys.exc_info()
    handler.emit(record)
    warning = logging.LogRecord("poc_api.grpc", logging.WARNING, "f", 1, "%d lost", (2,), None)
    handler.emit(warning)
    assert capsys.readouterr().err == (
        "poc_api error: it broke: OSError: no route\npoc_api warning: 2 lost\n"
    )


def test_the_cli_log_handler_is_there_while_a_command_runs_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It was added to the poc_api logger for good: a program that runs the CLI in
    # its own process kept it (and another for each command it ran).
    import logging

    from poc_api.cli import _run, _WarningLines

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # (pytest's own: none)
    logger = logging.getLogger("poc_api")
    before = list(logger.handlers)
    seen: list[list[logging.Handler]] = []
    _run(lambda where: seen.append(list(logger.handlers)))
    _run(lambda where: seen.append(list(logger.handlers)), warning_lines=False)
    assert [type(h) for h in seen[0]] == [*map(type, before), _WarningLines]
    assert seen[1] == before and logger.handlers == before


async def test_generate_shows_special_tokens_when_the_server_will_not_list_them() -> None:
    # The special ids are for display only: a /tokenizer that refused the key (or
    # timed out, or lost its connection) failed the whole `generate`.
    from poc_api.cli import _Codec, _Where

    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(json_answer(403, b'{"error": "no"}'))

    async with http_server(handler) as url:
        async with poc_api.ApiClient(url, grpc_url="http://127.0.0.1:1") as client:
            with trio.fail_after(10):
                assert await _Codec(client, _Where()).specials() == frozenset()


async def test_serve_runs_a_server_that_clients_reach_until_terminated() -> None:
    secret = "serve-secret-123"
    with trio.fail_after(TIMEOUT):
        proc = await trio.lowlevel.open_process(
            [
                *CLI,
                *("serve", "--port", "0", "--api-key", secret, "--seed", "3"),
                *("--n-layers", "5", "--model-name", "served-model", "--max-message-size", "99999"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            urls = await serve_urls(proc.stdout)
            base_url = urls["base_url"]

            async with poc_api.ApiClient(
                base_url, api_key=secret, grpc_url=urls["grpc_url"]
            ) as client:
                async with client.session() as s:
                    await s.prefill(await client.tokenize("hello"))
                    assert s.committed_len == 5
                manifest = await client.readout_manifest()
                assert manifest is not None and manifest.layers == tuple(range(5))
            async with httpx.AsyncClient() as http:
                models = await http.get(
                    f"{base_url}/models", headers={"authorization": f"Bearer {secret}"}
                )
            assert [m["id"] for m in models.json()["data"]] == ["served-model"]

            # A wrong key: one line on stderr, exit 1, and no key is ever printed.
            bad = await run_cli("generate", "hi", "--url", base_url, "--api-key", "wrong-key-456")
            assert bad.returncode == 1
            assert bad.stdout == ""
            assert len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith("error: ")
            assert "wrong-key-456" not in bad.stderr and secret not in bad.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
            rest = await proc.stderr.receive_some() if proc.stderr is not None else b""
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()
    assert code == 0
    assert b"ready" in rest and secret.encode() not in rest


@pytest.mark.parametrize(("host", "every"), [("0.0.0.0", True), ("127.0.0.1", False)])
async def test_serve_says_when_it_listens_on_every_interface(host: str, every: bool) -> None:
    # The printed URLs name 127.0.0.1 (what this machine connects to) also when
    # the server listens on every interface: the ready line says so.
    with trio.fail_after(TIMEOUT):
        proc = await trio.lowlevel.open_process(
            [*CLI, "serve", "--port", "0", "--host", host],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=cli_env(),
        )
        assert proc.stderr is not None
        err = b""
        try:
            while not re.search(rb"ready.*\n", err):  # (the whole line)
                chunk = await proc.stderr.receive_some()
                assert chunk, "serve exited before listening"
                err += chunk
        finally:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
            await proc.stderr.aclose()
    assert (b"ready on every interface" in err) is every, err


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["demo"],
        ["generate", "hi"],
        ["score", "hi", "--continuation", " there"],
        ["chat", "hi"],
    ],
    ids=lambda a: a[0],
)
async def test_unreachable_server_is_one_line_on_stderr(args: list[str]) -> None:
    result = await run_cli("--url", UNREACHABLE, *args, "--api-key", "k-should-not-show")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot reach the server at http://127.0.0.1:")
    assert "Traceback" not in result.stderr
    assert "k-should-not-show" not in result.stdout + result.stderr


async def test_base_url_comes_from_the_environment() -> None:
    result = await run_cli("generate", "hi", env=cli_env(POC_BASE_URL=UNREACHABLE))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot reach the server at {UNREACHABLE}")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["nope"],
        ["score", "hi"],
        ["generate"],
        ["generate", "hi", "--url", "not-a-url"],
        # A URL the client refuses (exited 1, "bad argument: ..."); a base URL on the
        # last port has no gRPC port (exited 1 on a gRPC URL the user never gave).
        ["generate", "hi", "--url", "http://h:1/v1?x=1"],
        ["generate", "hi", "--url", "http://h:65535/v1"],
        ["generate", ""],  # as score's empty TEXT (exited 1 after starting a server)
        ["generate", "hi", "--url", "http://[::1/v1"],  # (a traceback from urlsplit)
        ["generate", "hi", "--url", "http://h:1/v1", "--grpc-url", "http://[::1:10"],
        ["generate", "hi", "--url", "http://h:1/v1", "--grpc-url", "http://u:p@h:10"],
        ["generate", "hi", "--url", UNREACHABLE, "--seed", "1"],
        ["generate", "hi", "--grpc-url", "http://127.0.0.1:2"],
        ["generate", "hi", "--max-tokens", "-1"],
        ["generate", "hi", "--top-p", "2"],
        ["serve", "--port", "70000"],
        ["serve", "--prefill-delay-us", "-1"],
        ["serve", "--token-delay-ms", "nope"],
        # NaN passed click's ranges and crashed in a constructor with a traceback:
        ["generate", "hi", "--temperature", "nan"],
        ["generate", "hi", "--top-p", "nan"],
        ["serve", "--prefill-delay-us", "nan"],
        ["serve", "--token-delay-ms", "nan"],
        ["serve", "--idle-timeout", "nan"],
        # Found only by the client or the server (exit 1, after starting a server),
        # or not at all (chat sent an empty message and exited 0):
        ["chat", ""],
        ["chat", "hi", "--max-tokens", "0"],
        ["chat", "hi", "--max-tokens", "99999999999"],
        ["chat", "hi", "--max-tokens", "2147483648"],  # (the server's 400, exit 1)
        ["generate", "a\udcff"],  # argv bytes that are not UTF-8
        ["chat", "a\udcff"],
        ["chat", "hi", "--system", "\udcff"],
        ["score", "a\udcff", "-c", "x"],
        ["score", "hi", "-c", "\udcff"],
        ["generate", "hi", "--url", "http://h:1/v1", "--grpc-url", "dns:///no-port"],
        # An api key no header can carry: exit 1 from the client, after starting
        # the embedded server.
        ["--api-key", "k\n", "generate", "hi"],
        ["score", "hi", "-c", "x", "--api-key", " k"],
        ["chat", "hi", "--url", UNREACHABLE, "--api-key", "k\u00e9"],
        ["demo", "--api-key", "k k\t"],
        # serve runs a server: a client's URL given to it was silently ignored.
        ["--url", "http://127.0.0.1:8000/v1", "serve", "--port", "0"],
        ["--grpc-url", "http://127.0.0.1:8001", "serve", "--port", "0"],
        ["--model", "m", "serve", "--port", "0"],  # (ignored; serve takes --model-name)
        ["--timeout", "5", "serve", "--port", "0"],  # (ignored)
        # A key no client can send: a server no poc_api client could use.
        ["serve", "--port", "0", "--api-key", " k"],
        ["--api-key", "k\u00e9", "serve", "--port", "0"],
        # The library's range check, after starting a server (exit 1):
        ["chat", "hi", "--seed", str(2**64)],
        # A .env file's trailing space: calls went to /v1%20/... (chat: a 404; generate
        # and score: the byte-level fallback, exit 0).
        ["generate", "hi", "--url", "http://h:1/v1 "],
    ],
    ids=lambda a: " ".join(a) or "no-args",
)
def test_usage_errors_exit_2(
    args: Sequence[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # In this process (a subprocess each cost ~1 s of imports); the next test runs
    # one through a real process.
    for name in ("POC_BASE_URL", "POC_API_KEY", "POC_GRPC_URL", "POC_MODEL", "POC_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exited:
        cli_main(args)
    out = capsys.readouterr()
    assert exited.value.code == 2, (out.out, out.err)
    assert out.err.strip(), "a usage error says what is wrong"


async def test_a_usage_error_exits_2_from_the_process() -> None:
    result = await run_cli("generate", "hi", "--top-p", "2", fork=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "top-p" in result.stderr


async def test_python_dash_m_poc_api_is_the_command() -> None:
    # Where the console script is not on PATH (a venv not activated).
    with trio.fail_after(TIMEOUT):
        proc = await trio.run_process(
            [sys.executable, "-m", "poc_api", "--help"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=cli_env(),
        )
    assert proc.returncode == 0, proc.stderr
    assert "Usage: poc-api" in proc.stdout.decode()


async def test_the_installed_console_script_runs() -> None:
    bindir = os.path.dirname(sys.executable)
    exe = shutil.which("poc-api", path=bindir + os.pathsep + os.environ.get("PATH", ""))
    assert exe is not None, "the poc-api console script is not installed"
    with trio.fail_after(TIMEOUT):
        proc = await trio.run_process(
            [exe, "generate", "Once upon a time", "--max-tokens", "5"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=cli_env(),
        )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.decode()) >= 5


def test_a_usage_error_about_a_url_does_not_print_its_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # "invalid POC_BASE_URL: bad port in 'http://me:S3CRETPASS@host:x/v1'".
    for name in ("POC_BASE_URL", "POC_API_KEY", "POC_GRPC_URL", "POC_MODEL", "POC_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    for url in ("http://me:S3CRETPASS@host:x/v1", "ftp://me:S3CRETPASS@host/v1"):
        with pytest.raises(SystemExit) as exited:
            cli_main(["--url", url, "generate", "hi"])
        out = capsys.readouterr()
        assert exited.value.code == 2, (out.out, out.err)
        assert "S3CRETPASS" not in out.err + out.out and "me:***@" in out.err


def test_a_servers_control_characters_do_not_reach_the_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Generated text and error messages come from the server: written as they came,
    # its escape sequences cleared the screen, set the window title, wrote the
    # clipboard (OSC 52), or rewrote the "error:" line into a fake success.
    import io

    import poc_api
    from poc_api import cli as cli_module

    hostile = "ok\x1b]52;c;ZXZpbA==\x07\x1b[2J\rdone\n\tnext"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    cli_module._write_stdout(hostile)
    shown = terminal.getvalue()
    assert "\x1b" not in shown and "\x07" not in shown and "\r" not in shown
    assert shown.startswith("ok") and "done\n\tnext" in shown  # newlines, tabs kept

    def fail(_where: object) -> None:
        raise poc_api.RpcError(f"server said: {hostile}")

    with pytest.raises(SystemExit):
        cli_module._run(fail)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "\x1b" not in err and "\x07" not in err


def test_ctrl_c_in_a_command_exits_130_saying_interrupted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 128 + SIGINT, as a shell reports a process Ctrl-C ended: not 1, a failure.
    from poc_api import cli as cli_module

    def interrupted(_where: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        cli_module._run(interrupted)  # type: ignore[arg-type]
    assert exited.value.code == 130
    assert capsys.readouterr().err == "error: interrupted\n"


@pytest.mark.parametrize("kind", [RuntimeError, ValueError])
def test_an_unexpected_errors_control_characters_do_not_reach_the_terminal(
    kind: type[Exception], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a PocApiError: the "unexpected ..." line (RuntimeError) and the "bad
    # argument" line (ValueError) carry the exception's text, which can hold a
    # server's or an argument's escape sequences.
    from poc_api import cli as cli_module

    monkeypatch.delenv("POC_DEBUG", raising=False)

    def fail(_where: object) -> None:
        raise kind("x\x1b]52;c;ZQ==\x07\x1b[2Jy")

    with pytest.raises(SystemExit) as exited:
        cli_module._run(fail)  # type: ignore[arg-type]
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "x" in err and "y" in err
    assert "\x1b" not in err and "\x07" not in err


def test_model_reaches_the_embedded_server_too(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --model was dropped when no --url was given ("Model name to send").
    for name in ("POC_BASE_URL", "POC_API_KEY", "POC_GRPC_URL", "POC_MODEL", "POC_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.DEBUG, logger="poc_api.server")
    with pytest.raises(SystemExit) as exited:
        cli_main(["generate", "hi", "--max-tokens", "1", "--model", "other"])
    assert exited.value.code == 0
    assert any("OpenSession for model 'other'" in r.getMessage() for r in caplog.records)


def test_a_dns_grpc_target_is_taken_as_the_client_takes_it(
    server: ReferenceServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was a usage error ("expected http(s)://host:port/..."), where
    # ApiClient(grpc_url="dns:///...") makes a pool of the name's addresses.
    for name in ("POC_BASE_URL", "POC_API_KEY", "POC_GRPC_URL", "POC_MODEL", "POC_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    grpc = f"dns:///127.0.0.1:{server.grpc_port}"
    with pytest.raises(SystemExit) as exited:
        cli_main(
            ["generate", "hi", "--max-tokens", "2", "--url", server.base_url, "--grpc-url", grpc]
        )
    out = capsys.readouterr()
    assert exited.value.code == 0, out.err
    assert out.out.strip()


def test_serve_takes_an_idle_timeout_of_0_for_never() -> None:
    from poc_api.cli import cli

    ctx = cli.make_context("poc-api", ["serve", "--idle-timeout", "0"])
    with ctx:
        sub = cli.get_command(ctx, "serve")
        assert sub is not None
        sub_ctx = sub.make_context("serve", ["--idle-timeout", "0"], parent=ctx)
        assert sub_ctx.params["idle_timeout"] == 0.0


@pytest.mark.parametrize("field", ["max_sessions", "max_context", "max_message_size"])
def test_a_server_config_of_0_sessions_context_or_message_size_is_refused(field: str) -> None:
    # A server of 0 refused every session or request (python -m poc_api.server).
    from poc_api.server import ServerConfig

    with pytest.raises(ValueError, match=field):
        ServerConfig(**{field: 0})  # type: ignore[arg-type]


def test_an_empty_model_name_is_refused_by_serve_and_the_server_config() -> None:
    # `serve --model-name ""` ran a server whose /models listed "", which no chat
    # could name ("lists 1 model with no usable id"; --model "" means none).
    from click.testing import CliRunner

    from poc_api.cli import cli
    from poc_api.server import ServerConfig

    with socket.socket() as taken:  # (without the check, serve fails there, not runs on)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = CliRunner().invoke(cli, ["serve", "--port", port, "--model-name", " "])
    assert result.exit_code == 2 and "--model-name must not be empty" in result.output
    for bad in ("", "  "):
        with pytest.raises(ValueError, match="model_name must not be empty"):
            ServerConfig(model_name=bad)
    with pytest.raises(TypeError, match="model_name must be a str"):
        ServerConfig(model_name=None)  # type: ignore[arg-type]


def _readme_command_line() -> tuple[str, str]:
    """README's "## Command line" section: its synopsis block, and the rest."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    before, block, after = section.split("```", 2)
    return block, before + after


def test_every_option_has_help_and_is_in_the_readme_synopsis() -> None:
    # The synopsis lagged behind the commands (generate --seed, chat's sampling
    # options, serve --max-sessions ... --ignore-eos were missing), and serve's
    # --max-sessions and --max-context showed no help at all.
    import click

    from poc_api.cli import cli

    block, prose = _readme_command_line()
    shared = {opt for p in cli.params for opt in p.opts}  # --url etc.: in the prose
    missing: list[str] = []
    unhelped: list[str] = []
    for name, command in cli.commands.items():
        # The command's synopsis: its line and the indented lines continuing it.
        synopsis = re.search(rf"^poc-api {name}\b.*(?:\n[ \t]+\S.*)*", block, re.MULTILINE)
        assert synopsis is not None, f"README's synopsis has no line for {name!r}"
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            if not param.help:
                unhelped.append(f"{name} {param.opts[-1]}")
            for opt in param.opts + param.secondary_opts:
                if not opt.startswith("--"):
                    continue
                mentioned = rf"(?<![\w-]){re.escape(opt)}(?![\w-])"
                if not re.search(mentioned, synopsis.group()) and not (
                    opt in shared and re.search(mentioned, prose)
                ):
                    missing.append(f"{name} {opt}")
    unhelped += [
        f"poc-api {p.opts[-1]}" for p in cli.params if isinstance(p, click.Option) and not p.help
    ]
    assert not missing, f"options missing from README's synopsis: {missing}"
    assert not unhelped, f"options without a help text: {unhelped}"


def test_an_api_key_from_the_environment_that_no_header_can_carry_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A .env file's trailing newline: exit 1 from the client, after the embedded
    # server had started; now exit 2 naming the variable, before any work.
    for name in ("POC_BASE_URL", "POC_GRPC_URL", "POC_MODEL", "POC_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POC_API_KEY", "secret\n")
    with pytest.raises(SystemExit) as exited:
        cli_main(["generate", "hi"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "invalid POC_API_KEY" in err and "secret" not in err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
async def test_sigterm_and_sighup_mid_stream_close_the_session_as_ctrl_c_does(
    sig: signal.Signals,
) -> None:
    # Only SIGINT unwound: SIGTERM (timeout, systemd, docker stop) and SIGHUP (a
    # closed terminal) killed the process with its session left on the server.
    async with reference_server(token_delay_ms=20) as server:
        with trio.fail_after(TIMEOUT):
            proc = await trio.lowlevel.open_process(
                [*CLI, "generate", "Once", "--max-tokens", "5000", "--url", server.base_url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=cli_env(),
            )
            assert proc.stdout is not None and proc.stderr is not None
            try:
                assert await proc.stdout.receive_some(), "generate printed nothing"
                assert len(server.state().session_ids) == 1
                proc.send_signal(sig)
                code = await proc.wait()
                err = b""
                while chunk := await proc.stderr.receive_some():
                    err += chunk
            finally:
                with trio.CancelScope(shield=True):
                    proc.kill()
                    await proc.wait()
                    await proc.stdout.aclose()
                    await proc.stderr.aclose()
            assert code == 128 + sig, err
            assert err.decode().endswith(
                "error: terminated\n" if sig == signal.SIGTERM else "error: hung up\n"
            ), err
            assert server.state().session_ids == frozenset()


@pytest.mark.parametrize(
    "command",
    [
        ["demo"],
        ["generate", "héllo", "--max-tokens", "20", "--temperature", "2", "--seed", "3"],
        # score's table is click.echo'd: click swaps an ASCII stdout for UTF-8.
        ["score", "The cat", "--continuation", " sat on the mät"],
    ],
)
async def test_output_the_terminal_cannot_encode_is_replaced(command: list[str]) -> None:
    # PYTHONIOENCODING=ascii (or an old locale): a character it cannot encode
    # (the demo's "·", a sampled U+FFFD) ended the command as "error: bad
    # argument: 'ascii' codec can't encode ...".
    done = await run_cli(*command, env=cli_env(PYTHONIOENCODING="ascii"), fork=False)
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr, done.stderr
    assert "?" in done.stdout  # (what could not be encoded)


async def test_generate_with_stdout_closed_is_no_bug(server: ReferenceServer) -> None:
    # sys.stdout is None with fd 1 closed: "unexpected AttributeError ... this is
    # a bug in poc_api", where score and demo printed nothing (as print() does).
    with trio.fail_after(TIMEOUT):
        proc = await trio.run_process(
            [*CLI, "generate", "hi", "--max-tokens", "3", "--url", server.base_url],
            capture_stderr=True,
            check=False,
            env=cli_env(),
            preexec_fn=lambda: os.close(1),
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""


async def test_serve_into_a_reader_that_stops_ends_quietly_as_sigpipe() -> None:
    # `poc-api serve --port 0 | head -1` (to learn the port): "error: Broken pipe"
    # and status 1, where the client commands end quietly with 141. (A reader
    # gone before the first line, so that the write surely fails.)
    with trio.fail_after(TIMEOUT):
        done = await trio.run_process(
            [
                "bash",
                "-c",
                f"{' '.join(CLI)} serve --port 0 | true; echo ${{PIPESTATUS[0]}}",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=cli_env(),
        )
    assert done.stdout.strip() == b"141", done
    assert b"error" not in done.stderr, done.stderr


@pytest.mark.parametrize(("option", "value"), [("--idle-timeout", "inf"), ("--n-layers", "100000")])
async def test_serve_refuses_out_of_range_values_as_usage_errors(option: str, value: str) -> None:
    # --idle-timeout inf: a ValueError traceback and status 1. --n-layers 1000:
    # "unexpected OverflowError ... a bug in poc_api".
    done = await run_cli("serve", "--port", "0", option, value)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr and option in done.stderr


@pytest.mark.parametrize(
    "command", [["generate", "hi", "--max-tokens", "3"], ["score", "hi", "-c", " x"]]
)
async def test_the_byte_level_fallback_warns_outside_the_demo(
    server: ReferenceServer, command: list[str]
) -> None:
    # A base_url missing its /v1 (so /tokenize answers 404) fell back to byte ids
    # in silence and exited 0: against a real server, wrong tokens throughout.
    done = await run_cli(*command, "--url", server.base_url.removesuffix("/v1"))
    assert done.returncode == 0, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("warning: ") and "404" in line, line
    assert "byte-level rule" in line
    assert line.endswith("(does --url lack its /v1?)"), line  # (its path is empty)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["generate", "--help"]])
def test_help_text_that_cannot_be_written_is_one_error_line(args: list[str]) -> None:
    # click writes these itself, outside _run: a full disk gave a Python traceback.
    # Buffered (no PYTHONUNBUFFERED, as on CI), the exit's flush failed again: 120.
    env = {k: v for k, v in cli_env().items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [*CLI, *args],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=TIMEOUT,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr == "error: No space left on device\n"


@pytest.mark.parametrize(
    "command", [["generate", "hi"], ["chat", "hi"], ["score", "hi", "-c", "x"]]
)
async def test_a_model_name_that_is_not_utf8_is_a_usage_error(command: list[str]) -> None:
    # TEXT and --system were checked; --model went on to the first call that sent
    # it, after the embedded server had started: "bad argument: 'utf-8' codec ...", 1.
    result = await run_cli(*command, "--model", "\udcff")
    assert result.returncode == 2, result.stderr
    assert "--model" in result.stderr and "not UTF-8" in result.stderr


async def tokenizes_only(stream: trio.SocketStream) -> None:
    """An HTTP side that tokenizes every text as [1, 2] (no gRPC server beside it)."""
    await read_request(stream)
    await stream.send_all(json_answer(200, b'{"tokens": [1, 2]}'))


async def test_a_derived_grpc_url_that_cannot_connect_names_the_options() -> None:
    # The library's "(base_url's port + 1: pass grpc_url if the gRPC server is
    # elsewhere)" came through as it was: the CLI has --url and --grpc-url.
    for _ in range(10):
        async with http_server(tokenizes_only) as url:
            port = int(url.rsplit(":", 1)[1].removesuffix("/v1"))
            with socket.socket() as held:  # port + 1 bound, not listening: refused
                try:
                    held.bind(("127.0.0.1", port + 1))
                except OSError:  # (another worker's): another try
                    continue
                proc = await run_cli("--url", url, "generate", "hi")
                break
    assert proc.returncode == 1, proc.stderr
    assert "--url's port + 1: pass --grpc-url" in proc.stderr, proc.stderr
    assert "base_url" not in proc.stderr and "grpc_url" not in proc.stderr, proc.stderr


def test_a_url_on_the_last_port_says_to_pass_the_grpc_url_option(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # "invalid --url: base_url '...' is on port 65535: there is no port + 1 for
    # gRPC; pass grpc_url": no such option.
    for name in ("POC_BASE_URL", "POC_API_KEY", "POC_GRPC_URL", "POC_MODEL", "POC_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exited:
        cli_main(["--url", "http://127.0.0.1:65535/v1", "generate", "hi"])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "pass --grpc-url" in err and "grpc_url" not in err, err


async def test_the_cli_says_a_grpc_url_that_cannot_connect_came_from_poc_grpc_url() -> None:
    grpc = f"http://127.0.0.1:{refusing_port()}"
    async with http_server(tokenizes_only) as url:
        proc = await run_cli("--url", url, "generate", "hi", env=cli_env(POC_GRPC_URL=grpc))
    assert proc.returncode == 1, proc.stderr
    assert f"{grpc} (from POC_GRPC_URL): cannot connect" in proc.stderr, proc.stderr


@pytest.mark.parametrize("byte_level", [False, True], ids=["tokenizer", "byte-level"])
async def test_streamed_text_does_not_split_a_character_that_arrives_in_two_batches(
    byte_level: bool,
) -> None:
    # The printer decodes what has queued up in one go. A batch of 4 or more ids
    # that ended in the first bytes of a character was written at once, its
    # U+FFFD included, and the character's last bytes then decoded on their own:
    # "abc日" printed as "abc\ufffd\ufffd" (a stream faster than /detokenize
    # batches up, so non-ASCII output was garbled at random).
    from poc_api.cli import _Codec, _LiveText, _Where

    written: list[str] = []
    async with reference_server() as server, open_client(server) as client:
        codec = _Codec(client, _Where(), on_fallback=lambda: None)
        codec.byte_level = byte_level
        live = _LiveText(codec, written.append)
        data = list("abc日本".encode())
        send, receive = trio.open_memory_channel[int](len(data))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(live.run, receive)
            async with send:
                for batch in (data[:4], data[4:6], data[6:]):  # "abc" + 1st byte, ...
                    for i in batch:
                        send.send_nowait(i)
                    await trio.testing.wait_all_tasks_blocked()
    assert "".join(written) == "abc日本"


@pytest.mark.parametrize("byte_level", [False, True], ids=["tokenizer", "byte-level"])
@pytest.mark.parametrize(
    "batches",
    [
        # Invalid bytes, then a character's first bytes: all of a batch's heads
        # ended in U+FFFD, so the whole batch was written and "€" lost.
        [[0xFF, 0xFF, 0xFF, 0xE2, 0x82], [0xAC]],
        [[0x80, 0x80, 0x80, 0x80, 0xC3], [0xA9]],
        [[0x80, 0xA9], [0x82, 0xE2], [0xBF]],
        # A special token inside a character's bytes: left out, as in a decode.
        [[0x61, 0xE2], [0x82, 257], [0xAC]],
    ],
    ids=["invalid-then-char", "continuations-then-char", "split-invalid", "special-inside"],
)
async def test_streamed_text_is_the_decode_of_all_its_ids(
    batches: list[list[int]], byte_level: bool
) -> None:
    # What the printer writes, batch by batch, is what /detokenize makes of all the
    # (non-special) ids at once.
    from poc_api.cli import _Codec, _LiveText, _Where

    written: list[str] = []
    async with reference_server() as server, open_client(server) as client:
        ids = [i for b in batches for i in b]
        codec = _Codec(client, _Where(), on_fallback=lambda: None)
        codec.byte_level = byte_level
        # (The byte-level rule knows no special ids: it shows them, as its decode.)
        specials = await codec.specials()
        expected = await codec.decode([i for i in ids if i not in specials])
        live = _LiveText(codec, written.append)
        send, receive = trio.open_memory_channel[int](100)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(live.run, receive)
            async with send:
                for batch in batches:
                    for i in batch:
                        send.send_nowait(i)
                    await trio.testing.wait_all_tasks_blocked()
    assert "".join(written) == expected


@pytest.mark.parametrize("byte_level", [False, True], ids=["tokenizer", "byte-level"])
async def test_each_stream_of_a_live_text_is_the_decode_of_its_own_ids(byte_level: bool) -> None:
    # The demo prints three streams through one _LiveText. A stream cut short in a
    # character's bytes (max_tokens) ends in U+FFFD; the next one's text was decoded
    # after it (one TextDecoder for all): its first byte completed the last one's
    # character ("€"), a character neither stream has.
    from poc_api.cli import _Codec, _LiveText, _Where

    streams = [[0x61, 0xE2, 0x82], [0xAC, 0x62]]
    outputs: list[str] = []
    async with reference_server() as server, open_client(server) as client:
        codec = _Codec(client, _Where(), on_fallback=lambda: None)
        codec.byte_level = byte_level
        expected = [await codec.decode(ids) for ids in streams]
        written: list[str] = []
        live = _LiveText(codec, written.append)
        for ids in streams:
            send, receive = trio.open_memory_channel[int](100)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(live.run, receive)
                async with send:
                    for i in ids:
                        send.send_nowait(i)
            outputs.append("".join(written))
            written.clear()
    assert outputs == expected


async def test_with_stderr_closed_warnings_and_errors_do_not_go_to_stdout() -> None:
    # sys.stderr is None with fd 2 closed, and click.echo(file=None) writes to
    # stdout: the byte-level fallback's warning and the error line went into the
    # generated text (`poc-api generate - 2>&- > story.txt`).
    async with http_server(no_tokenizer) as url:
        grpc_url = f"http://127.0.0.1:{refusing_port()}"
        with trio.fail_after(TIMEOUT):
            proc = await trio.run_process(
                [*CLI, "generate", "hi", "--url", url, "--grpc-url", grpc_url],
                capture_stdout=True,
                check=False,
                env=cli_env(),
                preexec_fn=lambda: os.close(2),
            )
    assert proc.returncode == 1
    assert proc.stdout == b""


async def test_demo_with_stdout_closed_ends_on_a_signal_as_any_command() -> None:
    # The demo's live text marks the line open even when fd 1 is closed; the
    # error line then ended it with sys.stdout.isatty() on None: "AttributeError"
    # and a traceback (status 1), not "error: terminated" (143).
    async with reference_server(token_delay_ms=20) as server:
        with trio.fail_after(TIMEOUT):
            proc = await trio.lowlevel.open_process(
                [*CLI, "demo", "--url", server.base_url],
                stderr=subprocess.PIPE,
                env=cli_env(),
                preexec_fn=lambda: os.close(1),
            )
            assert proc.stderr is not None
            try:
                await wait_for(lambda: server.state().tokens_decoded > 0, timeout=TIMEOUT)
                proc.send_signal(signal.SIGTERM)
                code = await proc.wait()
                err = b""
                while chunk := await proc.stderr.receive_some():
                    err += chunk
            finally:
                with trio.CancelScope(shield=True):
                    proc.kill()
                    await proc.wait()
                    await proc.stderr.aclose()
    assert err.decode() == "error: terminated\n"
    assert code == 128 + signal.SIGTERM


@pytest.mark.skipif(not Path("/proc/self/syscall").exists(), reason="needs /proc/<pid>/syscall")
async def test_an_ignored_sighup_stays_ignored_while_text_dash_waits_for_stdin() -> None:
    # nohup (or `trap '' HUP`) starts the command with SIGHUP ignored, so that it
    # outlives its terminal. The handler put in for the read of stdin replaced
    # SIG_IGN: the hang-up ended the command ("error: hung up", 129). Python keeps
    # an ignored SIGINT ignored; an ignored SIGHUP or SIGTERM should stay so too.
    url = f"http://127.0.0.1:{refusing_port()}"
    with trio.fail_after(TIMEOUT):
        proc = await trio.lowlevel.open_process(
            [*CLI, "generate", "-", "--url", url, "--grpc-url", url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
        )
        try:
            syscall = trio.Path(f"/proc/{proc.pid}/syscall")
            while not (await syscall.read_text()).startswith("0 0x0 "):  # noqa: ASYNC110
                await trio.sleep(0.05)
            proc.send_signal(signal.SIGHUP)
            assert proc.stdin is not None and proc.stderr is not None
            await proc.stdin.send_all(b"hi\n")
            await proc.stdin.aclose()
            code = await proc.wait()
            err = b""
            while chunk := await proc.stderr.receive_some():
                err += chunk
        finally:
            proc.kill()
            await proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()
    # It read its text and went on: the server's refusal ends it, not the hang-up.
    assert code == 1, err
    assert b"hung up" not in err, err


async def test_an_ignored_sighup_mid_stream_does_not_end_the_command() -> None:
    # As above, under trio.run: open_signal_receiver replaced the SIG_IGN nohup
    # set, and the hang-up cancelled the generation ("error: hung up", 129).
    async with reference_server(token_delay_ms=5) as server:
        with trio.fail_after(TIMEOUT):
            proc = await trio.lowlevel.open_process(
                [*CLI, "generate", "Once", "--max-tokens", "200", "--url", server.base_url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=cli_env(),
                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
            )
            assert proc.stdout is not None and proc.stderr is not None
            try:
                assert await proc.stdout.receive_some(), "generate printed nothing"
                proc.send_signal(signal.SIGHUP)
                while await proc.stdout.receive_some():
                    pass
                code = await proc.wait()
                err = b""
                while chunk := await proc.stderr.receive_some():
                    err += chunk
            finally:
                with trio.CancelScope(shield=True):
                    proc.kill()
                    await proc.wait()
                    await proc.stdout.aclose()
                    await proc.stderr.aclose()
            assert code == 0, err


def test_the_cli_targets_repr_hides_the_api_key() -> None:
    # A locals-printing traceback (rich's show_locals, pytest -l) showed it.
    from poc_api.cli import _Globals, _Target

    for value in (_Target("u", "sk-cli-secret", "g"), _Globals("u", "sk-cli-secret", "g")):
        assert "sk-cli-secret" not in repr(value)
