"""Auth: a missing or wrong key is AuthenticationError on every transport, and the
key never shows up in logs, reprs or exception messages."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
from helpers import make_png
from misbehaving import DUMMY_BASE_URL, MisbehavingServer, Reply

import poc_api
from poc_api import SamplingParams, Tokens, TrainSample
from poc_api.server import ReferenceServer, ServerConfig

SERVER_KEY = "sk-server-secret-7f3a9c"
WRONG_KEY = "sk-wrong-secret-51d2e8"


@pytest.fixture
async def keyed() -> AsyncIterator[ReferenceServer]:
    async with ReferenceServer(ServerConfig(api_key=SERVER_KEY)) as srv:
        yield srv


async def grpc_session(c: poc_api.ApiClient) -> None:
    async with c.session() as s:
        await s.prefill([1])


async def grpc_score(c: poc_api.ApiClient) -> None:
    await c.score([Tokens([1, 2, 3])], [(1, 3)])


async def grpc_conversation(c: poc_api.ApiClient) -> None:
    async with c.conversation() as conv:
        async with conv.stream([Tokens([1, 2])], SamplingParams(max_tokens=2)) as ev:
            async for _ in ev:
                pass


async def http_manifest(c: poc_api.ApiClient) -> None:
    await c.readout_manifest()


async def http_train(c: poc_api.ApiClient) -> None:
    await c.train([TrainSample(tokens=[1, 2], target_ranges=[(0, 2)])])


async def http_chat(c: poc_api.ApiClient) -> None:
    await c.chat([{"role": "user", "content": "hi"}], max_tokens=2)


async def http_chat_stream(c: poc_api.ApiClient) -> None:
    async with c.chat_stream([{"role": "user", "content": "hi"}], max_tokens=2) as events:
        async for _ in events:
            pass


CALLS = [
    grpc_session,
    grpc_score,
    grpc_conversation,
    http_manifest,
    http_train,
    http_chat,
    http_chat_stream,
]


def chained(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception chained to it, causes and contexts (an error
    tracker shows a suppressed context too: it is still there)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def exception_texts(exc: BaseException) -> str:
    """Everything an exception would print, every chained one included."""
    return "\n".join(f"{e}\n{e!r}\n{e.args!r}" for e in chained(exc))


@pytest.mark.parametrize("call", CALLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("key", ["", WRONG_KEY], ids=["no-key", "wrong-key"])
async def test_missing_or_wrong_key_is_authentication_error(
    keyed: ReferenceServer, call: object, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="poc_api")
    assert callable(call)
    async with poc_api.ApiClient(keyed.base_url, api_key=key, grpc_url=keyed.grpc_url) as c:
        with trio.fail_after(5), pytest.raises(poc_api.AuthenticationError) as info:
            await call(c)
        err = info.value
        assert err.grpc_status == "UNAUTHENTICATED" or err.http_status == 401
        text = exception_texts(err) + repr(c) + caplog.text
    assert SERVER_KEY not in text
    if key:
        assert key not in text


async def test_the_right_key_works_everywhere_and_never_leaks(
    keyed: ReferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="poc_api")
    async with poc_api.ApiClient(keyed.base_url, api_key=SERVER_KEY, grpc_url=keyed.grpc_url) as c:
        with trio.fail_after(10):
            for call in CALLS:
                await call(c)
            async with c.session() as s:
                reprs = repr(c) + repr(s)
    assert SERVER_KEY not in caplog.text + reprs
    assert "Bearer" not in caplog.text


async def test_every_rpc_carries_the_key_close_session_included(
    bad_server: MisbehavingServer,
) -> None:
    # A CloseSession without the key is refused, and a refused close is only
    # logged: the session would stay on the server until its idle eviction. The
    # headers as the server read them show the key on each call.
    async with poc_api.ApiClient(DUMMY_BASE_URL, api_key=SERVER_KEY, grpc_url=bad_server.url) as c:
        with trio.fail_after(10):
            async with c.session() as s:
                await s.prefill([1, 2])
                await s.append_image(make_png(8, 8), "image/png")
            await grpc_score(c)
            await grpc_conversation(c)
    methods = {call.method for call in bad_server.calls}
    assert methods == {"OpenSession", "Generate", "AppendImage", "CloseSession"}
    assert len(bad_server.closed) == len(bad_server.opened) == 3
    for call in bad_server.calls:
        assert dict(call.headers).get("authorization") == f"Bearer {SERVER_KEY}", call


async def test_a_keyed_server_frees_every_session_the_client_closes(
    keyed: ReferenceServer,
) -> None:
    async with poc_api.ApiClient(keyed.base_url, api_key=SERVER_KEY, grpc_url=keyed.grpc_url) as c:
        with trio.fail_after(10):
            for call in (grpc_session, grpc_score, grpc_conversation):
                await call(c)
                assert keyed.state().session_ids == frozenset(), call.__name__


@pytest.mark.parametrize(
    "key", [SERVER_KEY + " ", " " + SERVER_KEY, SERVER_KEY + "\n", "sk-\x00x", "sk-é", "a\tb"]
)
def test_a_key_no_header_can_carry_is_refused_up_front_without_showing_it(key: str) -> None:
    # httpx (h11) and grpclib refuse such header values themselves, quoting them
    # in their messages: a trailing space from a .env file would print the key.
    with pytest.raises(ValueError, match="api_key") as info:
        poc_api.ApiClient("http://127.0.0.1:9/v1", api_key=key)
    assert key.strip() not in str(info.value)


async def test_a_base_url_password_does_not_replace_the_key_on_http(
    keyed: ReferenceServer,
) -> None:
    # httpx makes user:password@ into Basic auth, which replaced the Bearer header.
    url = keyed.base_url.replace("http://", "http://user:pa55@")
    async with poc_api.ApiClient(url, api_key=SERVER_KEY, grpc_url=keyed.grpc_url) as c:
        with trio.fail_after(10):
            for call in CALLS:
                await call(c)


async def test_a_client_is_refused_after_a_failed_auth_and_does_not_retry_forever(
    keyed: ReferenceServer,
) -> None:
    async with poc_api.ApiClient(keyed.base_url, api_key=WRONG_KEY, grpc_url=keyed.grpc_url) as c:
        before = keyed.state().rpc_counts.get("OpenSession", 0)
        for _ in range(3):
            with trio.fail_after(5), pytest.raises(poc_api.AuthenticationError):
                await grpc_session(c)
        assert keyed.state().rpc_counts.get("OpenSession", 0) - before == 3


SCRIPT = textwrap.dedent(
    """
    import sys, trio, poc_api
    from poc_api.server import ReferenceServer, ServerConfig

    RIGHT, WRONG = sys.argv[1], sys.argv[2]

    async def main():
        async with ReferenceServer(ServerConfig(api_key=RIGHT)) as srv:
            async with poc_api.ApiClient(srv.base_url, api_key=RIGHT, grpc_url=srv.grpc_url) as c:
                async with c.session() as s:
                    await s.prefill([1, 2])
                await c.score([poc_api.Tokens([1, 2, 3])], [(1, 3)])
                await c.readout_manifest()
                await c.chat([{"role": "user", "content": "hi"}], max_tokens=2)
                print(repr(c))
            async with poc_api.ApiClient(srv.base_url, api_key=WRONG, grpc_url=srv.grpc_url) as c:
                for call in (c.readout_manifest(), c.score([poc_api.Tokens([1, 2])], [(0, 1)])):
                    try:
                        await call
                    except poc_api.AuthenticationError as exc:
                        print("refused:", exc, repr(exc))

    trio.run(main)
    """
)


def test_debug_output_of_a_whole_run_never_contains_the_key() -> None:
    env = dict(os.environ, POC_DEBUG="1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, SERVER_KEY, WRONG_KEY],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("refused:") == 2
    # Debug output really was on, and talked about what happened.
    assert "poc_api" in proc.stderr and "DEBUG" in proc.stderr
    assert "opening new session" in proc.stderr
    for secret in (SERVER_KEY, WRONG_KEY):
        assert secret not in proc.stderr
        assert secret not in proc.stdout


@pytest.mark.parametrize("method", ["OpenSession", "Generate"])
async def test_a_key_the_grpc_server_echoes_in_its_message_is_redacted(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A server that quotes the key it refused ("invalid key sk-...") had it printed
    # in the AuthenticationError and in the grpclib error chained to it.
    from misbehaving import DUMMY_BASE_URL, Reply, misbehaving_server

    caplog.set_level(logging.DEBUG)
    echoed = f"invalid%20key%20{WRONG_KEY}%20(Bearer%20{WRONG_KEY})"
    async with misbehaving_server() as srv:
        srv.plan(method, Reply("trailers_only", status=16, message=echoed))
        async with poc_api.ApiClient(DUMMY_BASE_URL, api_key=WRONG_KEY, grpc_url=srv.url) as c:
            with trio.fail_after(5), pytest.raises(poc_api.AuthenticationError) as info:
                await grpc_conversation(c)
    assert WRONG_KEY not in exception_texts(info.value)
    # hpack's encoder logged "Adding b'authorization'=b'Bearer sk-...'" as it put
    # the key in its dynamic table; it is now a never-indexed literal that hpack
    # never sees. (Decoders log what they receive: the test server's, and the
    # client's of the echoing grpc-message, are not ours to silence.)
    logged = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("hpack") and not r.getMessage().startswith("Decod")
    ]
    assert any(line.startswith("Encoded header block") for line in logged)
    assert not [line for line in logged if "authorization" in line and WRONG_KEY in line]
    assert not [
        r for r in caplog.records if r.name.startswith("poc_api") and WRONG_KEY in r.getMessage()
    ]
    assert "invalid key <redacted> (Bearer <redacted>)" in str(info.value)


def _locals_with(exc: BaseException, secret: str) -> list[str]:
    """Frames of ``exc``'s chain (causes and contexts too) with ``secret`` in a
    local's repr: what traceback tools that show locals print (rich's
    show_locals, pytest -l, error trackers)."""
    import traceback

    found: list[str] = []
    for e in chained(exc):
        for frame, _ in traceback.walk_tb(e.__traceback__):
            for name, value in frame.f_locals.items():
                try:
                    shown = repr(value)
                except Exception:
                    continue
                if secret in shown:
                    found.append(f"{frame.f_code.co_name}: {name}")
    return found


async def test_the_key_is_in_no_traceback_local_of_a_failed_call(
    bad_server: MisbehavingServer,
) -> None:
    # The gRPC call's frame held the metadata tuple, ('authorization', 'Bearer
    # <key>'), as a local: any failed call's traceback printed with its locals
    # showed the key.
    bad_server.plan("OpenSession", Reply("trailers_only", status=13, message="internal"))
    async with poc_api.ApiClient(DUMMY_BASE_URL, api_key=SERVER_KEY, grpc_url=bad_server.url) as c:
        with trio.fail_after(10), pytest.raises(poc_api.RpcError) as info:
            async with c.session():
                pass
    assert _locals_with(info.value, SERVER_KEY) == []


async def test_a_key_echoed_by_a_refused_close_as_the_client_closes_is_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The sessions still open as the client closes are closed from the asyncio
    # side (unary_in_loop), which skipped the redaction of the grpc-message: the
    # WARNING "CloseSession ... (client closing) failed" printed grpclib's
    # GRPCError, key and all.
    from misbehaving import misbehaving_server

    caplog.set_level(logging.DEBUG)
    echoed = f"invalid%20key%20{WRONG_KEY}"
    async with misbehaving_server() as srv:
        srv.plan("CloseSession", Reply("trailers_only", status=16, message=echoed))
        c = poc_api.ApiClient(DUMMY_BASE_URL, api_key=WRONG_KEY, grpc_url=srv.url)
        with trio.fail_after(10):
            async with c, trio.open_nursery() as nursery:

                async def hold(task_status: trio.TaskStatus[None]) -> None:
                    async with c.session():
                        task_status.started()
                        await trio.sleep_forever()

                await nursery.start(hold)
                await c.aclose()
                nursery.cancel_scope.cancel()
    assert srv.calls_to("CloseSession")
    closes = [r.getMessage() for r in caplog.records if "CloseSession" in r.getMessage()]
    assert any("failed" in line for line in closes), closes
    leaked = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("poc_api") and WRONG_KEY in r.getMessage()
    ]
    assert leaked == []


async def test_a_key_echoed_in_goaway_debug_data_is_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from misbehaving import misbehaving_server

    caplog.set_level(logging.DEBUG, logger="poc_api")
    debug = f"invalid key {WRONG_KEY}".encode()
    async with misbehaving_server() as srv:
        srv.plan("OpenSession", Reply("goaway", status=11, debug_data=debug))
        async with poc_api.ApiClient(DUMMY_BASE_URL, api_key=WRONG_KEY, grpc_url=srv.url) as c:
            with trio.fail_after(5):
                await grpc_session(c)  # (retried on a new connection)
    lines = [caplog.handler.format(r) for r in caplog.records if r.name.startswith("poc_api")]
    assert any("GOAWAY" in line for line in lines)
    assert [line for line in lines if WRONG_KEY in line] == []


async def test_a_key_echoed_by_a_refused_close_of_an_orphaned_session_is_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The same for the close of a session whose OpenSession failed after its
    # reply (sent from the asyncio side): "CloseSession ... (its OpenSession's
    # caller never got it) failed: (<Status.UNAUTHENTICATED: 16>, 'invalid key sk-...')".
    from misbehaving import misbehaving_server

    caplog.set_level(logging.DEBUG, logger="poc_api")
    echoed = f"invalid%20key%20{WRONG_KEY}"
    async with misbehaving_server() as srv:
        srv.plan("OpenSession", Reply("reply_then_status", status=13, message="x"))
        srv.plan("CloseSession", Reply("trailers_only", status=16, message=echoed))
        async with poc_api.ApiClient(DUMMY_BASE_URL, api_key=WRONG_KEY, grpc_url=srv.url) as c:
            with trio.fail_after(5), pytest.raises(poc_api.RpcError):
                await grpc_session(c)
    assert srv.calls_to("CloseSession")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("poc_api")]
    assert any("never got it) failed" in line for line in lines), lines
    assert [line for line in lines if WRONG_KEY in line] == []
