"""``python -m poc_api.server`` as a real subprocess (later SIGKILLed by client tests)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading

import httpx
import pytest

TIMEOUT = 20.0


def test_module_entry_point_serves_http_and_grpc() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "poc_api.server", "--port", "0", "--seed", "3", "--api-key", "k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        urls: dict[str, str] = {}
        while len(urls) < 2:
            key, _, value = lines.get(timeout=TIMEOUT).strip().partition(": ")
            urls[key] = value
        base, grpc_url = urls["base_url"], urls["grpc_url"]
        http_port = int(base.rsplit(":", 1)[1].removesuffix("/v1"))
        assert grpc_url == f"http://127.0.0.1:{http_port + 1}"
        auth = {"authorization": "Bearer k"}
        r = httpx.get(base + "/models", headers=auth, timeout=TIMEOUT)
        assert r.status_code == 200
        assert httpx.get(base + "/models", timeout=TIMEOUT).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)
            reader.join(TIMEOUT)  # (at the pipe's end), then the pipes are closed
            for pipe in (proc.stdout, proc.stderr):
                assert pipe is not None
                pipe.close()
    assert proc.returncode == 0


def test_a_busy_port_is_one_line_that_names_it_once() -> None:
    # The front end prefixed the bind error with its own "cannot listen on ...",
    # which the bind error now says itself: the line said it twice, the first time
    # with the wrong port.
    from poc_api.server._app import bind_port_pair

    http, grpc = bind_port_pair("127.0.0.1", 0)
    port = http.getsockname()[1]
    http.close()  # free; the gRPC port next to it stays taken
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "poc_api.server", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        grpc.close()
    assert proc.returncode != 0
    assert proc.stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{port + 1} (gRPC, the HTTP port + 1): "
        "Address already in use"
    ), proc.stderr


def test_the_module_entry_point_takes_the_options_of_poc_api_serve() -> None:
    # The README calls them the same command: `serve` lacked --max-message-size,
    # --n-layers and --model-name, and most of the module's options had no help.
    from poc_api.cli import serve
    from poc_api.server.__main__ import _parser

    parser = _parser()
    module = {
        opt: action.help
        for action in parser._actions  # (argparse lists them nowhere public)
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }
    assert all(module.values()), [opt for opt, text in module.items() if not text]
    served = {opt for param in serve.params for opt in param.opts if opt.startswith("--")}
    assert set(module) == served


def test_the_module_entry_points_help_shows_defaults_but_never_the_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from poc_api.server.__main__ import _config, _parser

    monkeypatch.setenv("POC_API_KEY", "sekrit-key")
    text = _parser().format_help()
    assert "(default: 8000)" in text and "(default: 1024)" in text, text
    assert "sekrit" not in text
    # The variable still sets the key; the option wins over it.
    assert _config(_parser().parse_args([])).api_key == "sekrit-key"
    assert _config(_parser().parse_args(["--api-key", "k"])).api_key == "k"
    monkeypatch.delenv("POC_API_KEY")
    assert _config(_parser().parse_args([])).api_key is None


@pytest.mark.parametrize("key", [" k", "k\n", "kéy"])
def test_the_module_entry_point_refuses_a_key_no_client_can_send_as_serve_does(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # `poc-api serve --api-key " k"` is a usage error; `python -m poc_api.server`,
    # "the same command" (README), started a server that no client could use.
    from poc_api.server.__main__ import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--api-key", key])
    assert info.value.code == 2
    assert "api_key must be printable ASCII" in capsys.readouterr().err


def test_an_empty_api_key_option_means_no_auth_over_the_environment_as_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `poc-api serve --api-key ""` runs without auth when POC_API_KEY is set; the
    # module entry point took the environment's key instead.
    from poc_api.server.__main__ import parse_args

    monkeypatch.setenv("POC_API_KEY", "k")
    assert parse_args(["--api-key", ""]).api_key is None
    assert parse_args([]).api_key == "k"
