"""``poc_api.testing``: context managers, pytest fixtures, and the PNG helper."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import trio
from helpers import refusing_port, stray_cancelled_fails

import poc_api
from poc_api._png import encode_png
from poc_api.server import ServerConfig
from poc_api.server import __main__ as server_main
from poc_api.testing import NGINX, make_png, open_client, reference_server

TIMEOUT = 60
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PNG into (type, data) chunks, checking every CRC."""
    assert data.startswith(PNG_SIGNATURE)
    i, out = len(PNG_SIGNATURE), []
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + n]
        (crc,) = struct.unpack(">I", data[i + 8 + n : i + 12 + n])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        i += 12 + n
    return out


async def test_reference_server_and_open_client_talk_to_each_other() -> None:
    with trio.fail_after(20):
        async with reference_server(seed=1, api_key="k1") as server:
            assert server.config.seed == 1
            async with open_client(server, model="m") as client:
                assert client.model == "m"
                assert client.grpc_url == server.grpc_url
                async with client.session() as s:
                    await s.prefill(await client.tokenize("Hello"))
                    assert s.committed_len == 5
                assert await client.readout_manifest() is not None


async def test_open_client_uses_the_servers_api_key() -> None:
    with trio.fail_after(20):
        async with reference_server(api_key="secret") as server:
            async with open_client(server) as client:
                assert await client.tokenize("a") == [97]
            async with open_client(server, api_key="wrong") as client:
                with pytest.raises(poc_api.AuthenticationError):
                    await client.tokenize("a")


async def test_open_client_takes_a_grpc_url_of_the_callers() -> None:
    # (It raised "got multiple values for keyword argument 'grpc_url'".)
    with trio.fail_after(20):
        async with reference_server() as a, reference_server() as b:
            async with open_client(a, grpc_url=b.grpc_url) as client:
                async with client.session() as s:
                    await s.prefill([1, 2])
                    assert s.session_id in b.state().session_ids
                    assert not a.state().session_ids


def test_the_helpers_keywords_are_typed_as_server_config_and_api_client_take_them() -> None:
    # They took **config: Any and **client_options: Any: a misspelt keyword
    # passed both type checkers (tests/typing/user_testing.py). The TypedDicts
    # must follow ServerConfig's fields and ApiClient's options: a new one added
    # there and not here fails this test.
    import inspect
    import typing
    from collections.abc import Callable

    from poc_api.testing import ApiClientOptions, ServerConfigFields, reference_servers

    def keywords(fn: Callable[..., object], skip: set[str]) -> dict[str, object]:
        hints = typing.get_type_hints(fn)
        params = inspect.signature(fn).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {p.name: hints[p.name] for p in params if p.kind in kinds and p.name not in skip}

    assert typing.get_type_hints(ServerConfigFields) == keywords(ServerConfig.__init__, {"self"})
    assert typing.get_type_hints(ApiClientOptions) == keywords(
        poc_api.ApiClient.__init__, {"self", "base_url"}
    )
    assert ServerConfigFields.__required_keys__ == ApiClientOptions.__required_keys__ == set()
    for fn, typed in (
        (reference_server, ServerConfigFields),
        (reference_servers, ServerConfigFields),
        (open_client, ApiClientOptions),
    ):
        [variadic] = [
            p for p in inspect.signature(fn).parameters.values() if p.kind is p.VAR_KEYWORD
        ]
        assert typing.get_type_hints(fn)[variadic.name] == typing.Unpack[typed], fn


def test_a_server_port_must_leave_room_for_grpc_on_the_next_one() -> None:
    # 70000 wrapped to 4464; 65535 put gRPC on a random port.
    for port in (-1, 65535, 70000):
        with pytest.raises(ValueError, match="port"):
            ServerConfig(port=port)
    with pytest.raises(SystemExit) as exited:  # python -m poc_api.server: a usage error
        server_main.parse_args(["--port", "70000"])
    assert exited.value.code == 2


async def test_reference_server_stops_when_the_block_exits() -> None:
    with trio.fail_after(20):
        async with reference_server() as server:
            base_url, grpc_url = server.base_url, server.grpc_url
        async with poc_api.ApiClient(base_url, grpc_url=grpc_url) as client:
            with pytest.raises(poc_api.ServerUnavailable):
                await client.tokenize("a")


async def test_reference_server_stops_when_the_block_is_left_by_cancellation() -> None:
    # A test's timeout (or a failing sibling) cancels the block: its exit's worker
    # thread was refused by the cancellation, and the server ran on, serving.
    with trio.move_on_after(0.5):
        async with reference_server() as server:
            await trio.sleep_forever()
    assert server._thread is not None and not server._thread.is_alive()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", server.http_port)


async def test_a_second_stop_returns_once_the_server_has_stopped() -> None:
    # A test draining with stop(grace=...) in one thread while a call runs, and the
    # block's exit calling stop() in another: the second returned at once, with
    # the server still up.
    import threading

    with trio.fail_after(20):
        async with reference_server(token_delay_ms=50) as server, open_client(server) as client:

            async def long_call() -> None:
                with contextlib.suppress(poc_api.PocApiError, trio.ClosedResourceError):
                    async with client.session() as s:
                        sampling = poc_api.SamplingParams(max_tokens=20)  # 1 s
                        async with s.generate([65], sampling=sampling) as events:
                            async for _ in events:
                                pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_call)
                await trio.sleep(0.3)
                threading.Thread(target=server.stop, kwargs={"grace": 5}).start()
                await trio.sleep(0.1)
                await trio.to_thread.run_sync(server.stop)
                assert server._thread is not None and not server._thread.is_alive()


async def test_reference_server_passes_config_through() -> None:
    with trio.fail_after(20):
        async with reference_server(readout=False) as server, open_client(server) as client:
            assert await client.readout_manifest() is None


def test_make_png_is_a_valid_png_of_the_requested_size() -> None:
    data = make_png(57, 30, seed=3)
    chunks = png_chunks(data)
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (width, height, depth, colour) == (57, 30, 8, 2)
    raw = zlib.decompress(chunks[1][1])
    assert len(raw) == 30 * (1 + 57 * 3)
    assert make_png(57, 30, seed=3) == data
    assert make_png(57, 30, seed=4) != data


def test_encode_png_checks_its_input() -> None:
    assert png_chunks(encode_png(1, 1, b"\x01\x02\x03"))
    with pytest.raises(ValueError):
        encode_png(2, 1, b"\x00\x00\x00")
    with pytest.raises(ValueError):
        encode_png(0, 1, b"")
    with pytest.raises(TypeError):
        encode_png(1.0, 1, b"\x00\x00\x00")  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "positions"), [((56, 56), 4), ((57, 28), 3), ((1, 1), 1)])
async def test_the_reference_server_accepts_make_png_images(
    size: tuple[int, int], positions: int
) -> None:
    with trio.fail_after(20):
        async with reference_server() as server, open_client(server) as client:
            async with client.session() as s:
                appended = await s.append_image(make_png(*size), "image/png")
    assert appended.placeholder_count == positions


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POC_", "PYTEST_")) and k not in ("PY_COLORS", "FORCE_COLOR")
    }
    env["NO_COLOR"] = "1"  # pytest's summary lines are matched as plain text
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_pytest_plugin_fixtures_work_in_a_users_project(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from poc_api.server import ServerConfig

            pytest_plugins = ["poc_api.testing"]


            @pytest.fixture(scope="session")
            def poc_server_config():
                return ServerConfig(api_key="user-key", seed=2)
            """
        )
    )
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import trio

            import poc_api


            def test_server_is_shared_and_configured(poc_server):
                assert poc_server.config.api_key == "user-key"
                assert poc_server.base_url.startswith("http://127.0.0.1:")


            async def test_client_is_connected(poc_client, poc_png):
                async with poc_client.session() as s:
                    await s.prefill(await poc_client.tokenize("Hi"))
                    image = await s.append_image(poc_png, "image/png")
                assert image.total_length == 2 + 4


            async def test_scoring_from_the_docstring(poc_client):
                results = await poc_client.score([poc_api.Tokens(list(b"Hi there"))], [(2, 8)])
                assert results[0].logprob < 0


            async def test_an_agent_with_backoff_under_autojump(poc_client, autojump_clock):
                # An hour of backoff runs at once; the calls' timeouts do not fire.
                for _ in range(3):
                    async with poc_client.session(timeout=5) as s:
                        await s.prefill(await poc_client.tokenize("Hi", timeout=5))
                    await trio.sleep(1200)
            """
        )
    )
    result = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


def test_importing_without_pytest_still_gives_the_context_managers(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["pytest"] = None  # as if pytest were not installed
        import trio
        import poc_api.testing as t

        assert not hasattr(t, "poc_server") and not hasattr(t, "poc_client")

        async def main():
            async with t.reference_server() as server, t.open_client(server) as client:
                print(await client.tokenize("ok"))

        trio.run(main)
        """
    )
    result = run_python(["-c", script], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[111, 107]"


async def test_an_in_process_reference_server_keeps_api_keys_out_of_debug_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # hpack logs every header block it decodes at DEBUG: with the reference server
    # in the process and DEBUG logging on, the server's side printed each call's
    # "authorization: Bearer <key>" (also a client's wrong key).
    import logging

    caplog.set_level(logging.DEBUG)
    key, wrong = "sk-SECRET-KEY-123", "sk-WRONG-KEY-999"
    with trio.fail_after(20):
        # A server without a key beside it: hpack's other lines still show.
        async with reference_server() as open_server, reference_server(api_key=key) as server:
            async with open_client(open_server) as client:
                await client.tokenize("x")
            async with open_client(server, api_key=key) as client:
                async with client.session() as s:
                    await s.prefill([1, 2])
            async with open_client(server, api_key=wrong) as client:
                with pytest.raises(poc_api.AuthenticationError):
                    async with client.session():
                        pass  # pragma: no cover
            # A client that indexes its authorization header sees it evicted from
            # hpack's table (hpack.table logs that): as hpack logs it.
            logging.getLogger("hpack.table").debug(
                "Evicting %s: %s from the header table", b"authorization", f"Bearer {key}"
            )
        logging.getLogger("hpack.table").debug("Evicting %s after the servers", b"x-after")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Evicting b'x-after'") for m in messages)  # filter removed
    assert any(r.name.startswith("hpack") for r in caplog.records)  # it does log
    assert any(m.startswith("Decoded (b':path'") for m in messages)
    assert not [m for m in messages if key in m or wrong in m or "Bearer" in m]


# -- the suite's own guard (tests/conftest.py) -------------------------------------------


async def _leak_a_cancelled() -> None:
    """Raise a trio.Cancelled whose scope has already ended (what a cancellation
    bug in code under test lets out)."""
    caught: list[BaseException] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            caught.append(exc)
    raise caught[0]


async def test_a_stray_cancelled_fails_a_test_and_a_real_cancellation_does_not() -> None:
    # pytest-trio swallows a Cancelled that leaves a test: one leaked by the code
    # under test passed. The guard turns it into a failure, and lets through one
    # that a cancelled scope around the test caused.
    with pytest.raises(AssertionError, match="no cancelled scope"):
        await stray_cancelled_fails(_leak_a_cancelled)()

    async def cancelled_from_outside() -> None:
        await trio.sleep_forever()

    with trio.CancelScope() as scope:
        scope.cancel()
        await stray_cancelled_fails(cancelled_from_outside)()
    assert scope.cancelled_caught


async def test_reference_servers_wants_at_least_one() -> None:
    from poc_api.testing import reference_servers

    for n in (0, -1):
        with pytest.raises(ValueError, match="at least 1"):
            async with reference_servers(n):
                pytest.fail("reference_servers(0) ran its block")  # pragma: no cover


async def test_reference_servers_stop_every_server_when_the_block_exits() -> None:
    from poc_api.testing import reference_servers

    with trio.fail_after(20):
        async with reference_servers(2) as servers:
            assert all(s._thread is not None and s._thread.is_alive() for s in servers)
    for server in servers:
        assert server._thread is not None and not server._thread.is_alive()
        for port in (server.http_port, server.grpc_port):
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)


def test_make_png_takes_numpy_integer_sides() -> None:
    # Counts elsewhere may be numpy integers (README); make_png refused them.
    np = pytest.importorskip("numpy")
    assert make_png(np.int64(57), np.uint16(30), seed=3) == make_png(57, 30, seed=3)
    with pytest.raises(TypeError):
        make_png(True, 1)


@pytest.mark.skipif(sys.platform == "win32", reason="trio's SIGINT handler")
@pytest.mark.usefixtures("python_handles_sigint")
@pytest.mark.parametrize("helper", ["reference_server", "reference_servers"])
def test_a_ctrl_c_landing_in_the_blocks_exit_still_stops_the_servers(helper: str) -> None:
    # trio delivers a Ctrl-C to the main task at its next checkpoint, shielded or
    # not: one that came as the block exited hit the checkpoint that starts the
    # worker thread of stop(), and the server ran on, its ports open.
    import signal

    from poc_api.testing import reference_servers

    servers: list[poc_api.server.ReferenceServer] = []

    @trio.lowlevel.enable_ki_protection
    async def exit_under_ctrl_c(cm: contextlib.AbstractAsyncContextManager[object]) -> None:
        signal.raise_signal(signal.SIGINT)  # protected here: pending until a checkpoint
        await cm.__aexit__(None, None, None)

    async def main() -> None:
        cm: contextlib.AbstractAsyncContextManager[object]
        cm = reference_server() if helper == "reference_server" else reference_servers(2)
        got = await cm.__aenter__()
        servers.extend(got if isinstance(got, list) else [got])  # type: ignore[arg-type]
        await exit_under_ctrl_c(cm)

    with pytest.raises(KeyboardInterrupt):
        trio.run(main)
    for server in servers:
        assert server._thread is not None and not server._thread.is_alive(), server


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
async def test_open_client_reaches_its_server_past_a_proxy_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # Behind a corporate proxy (HTTP_PROXY set; NO_PROXY, if at all, naming
    # localhost, which httpx does not match to 127.0.0.1) the HTTP calls to the
    # program's own loopback server went to the proxy and failed, naming the
    # proxy's address: the README's quick start and the poc_client fixture.
    monkeypatch.setenv(variable, f"http://127.0.0.1:{refusing_port()}")
    monkeypatch.setenv("NO_PROXY", "localhost")
    with trio.fail_after(20):
        async with reference_server() as server, open_client(server) as client:
            assert await client.tokenize("Hi") == [72, 105]
            assert await client.readout_manifest() is not None
        # A client of its own still honours the variable (as httpx does) ...
        async with reference_server() as server:
            async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
                with pytest.raises(poc_api.ServerUnavailable):
                    await client.tokenize("Hi")
            # ... unless told not to.
            async with poc_api.ApiClient(
                server.base_url, grpc_url=server.grpc_url, trust_env=False
            ) as client:
                assert await client.tokenize("Hi") == [72, 105]
    with pytest.raises(TypeError, match="trust_env must be a bool"):
        poc_api.ApiClient("http://127.0.0.1:9/v1", trust_env="no")  # type: ignore[arg-type]


def test_a_client_left_open_fails_a_users_test_under_filterwarnings_error(
    tmp_path: Path,
) -> None:
    # A strict suite (filterwarnings = error) made the ResourceWarning of a client
    # left open an error, which the run's end swallowed: the leak passed silently,
    # where the default filters at least warned.
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\nfilterwarnings = error\n")
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["poc_api.testing"]\n')
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import poc_api


            async def test_forgets_to_close(poc_server):
                client = poc_api.ApiClient(
                    poc_server.base_url, grpc_url=poc_server.grpc_url, trust_env=False
                )
                await client.__aenter__()
                await client.tokenize("Hi")


            async def test_closes(poc_client):
                await poc_client.tokenize("Hi")
            """
        )
    )
    result = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider"], tmp_path)
    assert "1 failed, 1 passed" in result.stdout, result.stdout + result.stderr
    assert "FAILED test_user.py::test_forgets_to_close" in result.stdout
    assert "was not closed before its trio.run ended" in result.stdout


@pytest.mark.skipif(not os.path.exists(NGINX), reason=f"nginx is not installed at {NGINX}")
async def test_nginx_grpc_proxy_finds_nginx_on_path_and_says_when_it_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default path was bound when the module was imported (setting NGINX did
    # nothing), and an nginx elsewhere on PATH (Homebrew, Nix, conda) was never
    # tried: a bare "No such file or directory: '/usr/sbin/nginx'".
    import poc_api.testing as t

    real, marker = NGINX, tmp_path / "ran"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "nginx"
    wrapper.write_text(f'#!/bin/sh\ntouch {marker}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(t, "NGINX", str(tmp_path / "no-such-nginx"))
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    async with t.reference_servers(1) as servers:
        async with t.nginx_grpc_proxy([s.grpc_url for s in servers]) as url:
            async with open_client(servers[0], grpc_url=url) as client:
                async with client.session() as s:
                    await s.prefill([1, 2, 3])
        assert marker.exists()
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        with pytest.raises(FileNotFoundError, match="nginx-light"):
            async with t.nginx_grpc_proxy([s.grpc_url for s in servers]):
                pass


def test_a_conftest_may_import_the_helpers_it_names_as_a_plugin(tmp_path: Path) -> None:
    # pytest loads a conftest (its imports) before its pytest_plugins: importing a
    # helper from poc_api.testing there warned that the module could not be
    # rewritten, and under filterwarnings = error the run stopped before any test.
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\nfilterwarnings = error\n")
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(
            """
            import pytest

            from poc_api.testing import make_png

            pytest_plugins = ["poc_api.testing"]


            @pytest.fixture
            def big_png():
                return make_png(112, 112)
            """
        )
    )
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            async def test_image(poc_client, big_png):
                async with poc_client.session() as s:
                    image = await s.append_image(big_png, "image/png")
                assert image.total_length == 16
            """
        )
    )
    result = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "PytestAssertRewriteWarning" not in result.stdout + result.stderr
