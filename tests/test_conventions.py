"""API conventions (issue: the structured-concurrency contract, item 11 and 8)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import poc_api
from poc_api import SamplingParams, Tokens
from poc_api.server import ReferenceServer


def test_arguments_after_the_first_two_are_keyword_only_with_a_deprecation() -> None:
    with pytest.warns(DeprecationWarning, match="model, grpc_url"):
        c = poc_api.ApiClient("http://127.0.0.1:8000/v1", "", "m", "http://127.0.0.1:9")
    assert c.model == "m" and c.grpc_url == "http://127.0.0.1:9"
    with pytest.raises(TypeError, match="multiple values"), pytest.warns(DeprecationWarning):
        poc_api.ApiClient("http://127.0.0.1:8000/v1", "", "m", model="n")  # type: ignore[misc]
    # The keyword form warns about nothing.
    poc_api.ApiClient("http://127.0.0.1:8000/v1", "k", model="m", grpc_url=None)


async def test_conversation_stream_takes_priority_and_shape_by_keyword(
    client: poc_api.ApiClient,
) -> None:
    async with client.conversation() as conv:
        with pytest.warns(DeprecationWarning, match="priority"):
            async with conv.stream([Tokens([1, 2])], SamplingParams(max_tokens=2), 3) as ev:  # type: ignore[misc]
                async for _ in ev:
                    pass
        async with conv.stream([Tokens([1, 2])], SamplingParams(max_tokens=2), priority=3) as ev:
            async for _ in ev:
                pass


def test_credentials_in_urls_are_redacted() -> None:
    c = poc_api.ApiClient("http://user:hunter2@127.0.0.1:8000/v1")
    assert "hunter2" not in repr(c) and "user:***@" in repr(c)
    with pytest.raises(ValueError) as info:
        poc_api.resolve_grpc_url("ftp://user:hunter2@host/v1")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValueError) as info:
        poc_api.ApiClient("http://h:1/v1", grpc_url="ftp://user:hunter2@host:1")
    assert "hunter2" not in str(info.value)


async def test_reentering_a_session_inside_its_own_generate_block_is_a_clear_error(
    client: poc_api.ApiClient,
) -> None:
    async with client.session() as s:
        async with s.generate([1, 2], sampling=SamplingParams(max_tokens=2)) as ev:
            with pytest.raises(RuntimeError, match="busy in this task"):
                await s.prefill([3])
            async for _ in ev:
                pass
        await s.prefill([3])  # and usable afterwards


async def test_a_refused_connection_is_retriable() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        async with poc_api.ApiClient(
            "http://127.0.0.1:9/v1", grpc_url=f"http://127.0.0.1:{port}"
        ) as c:
            with trio.fail_after(5), pytest.raises(poc_api.ServerUnavailable) as info:
                async with c.session():
                    pass
    assert info.value.retriable


async def test_a_connection_that_cannot_be_made_is_retriable() -> None:
    # A name that does not resolve fails the connect too: nothing was sent, so
    # safe to send again (as HTTP's calls say of a failed connect). It was not.
    async with poc_api.ApiClient(
        "http://127.0.0.1:9/v1", grpc_url="http://no-such-host.invalid:50051"
    ) as c:
        with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable) as info:
            async with c.session():
                pass
    assert info.value.retriable
    assert "no-such-host.invalid" in str(info.value)


async def test_close_session_does_not_count_against_max_concurrent_streams(
    server: ReferenceServer,
) -> None:
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, max_concurrent_streams=1
    ) as c:
        with trio.fail_after(10):
            async with c.session() as s, s.generate([1], sampling=SamplingParams(max_tokens=10**5)):
                # The one slot is taken by the stream; leaving must still close the session.
                sid = s.session_id
        assert sid not in server.state().session_ids


async def test_calls_with_nothing_to_do_are_still_checkpoints(
    server: ReferenceServer, client: poc_api.ApiClient
) -> None:
    with trio.testing.assert_checkpoints():
        assert await client.score([Tokens([1, 2, 3])], []) == []
    async with client.conversation() as conv:
        with trio.testing.assert_checkpoints():
            await conv.aclose()  # holds no session
    async with client.session() as s:
        pass
    with trio.testing.assert_checkpoints():
        await s.aclose()  # second close
    unopened = poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url)
    with trio.testing.assert_checkpoints():
        await unopened.aclose()
    with trio.testing.assert_checkpoints():
        await unopened.aclose()


async def test_iterating_a_stream_stops_at_once_when_its_scope_is_cancelled(
    client: poc_api.ApiClient,
) -> None:
    async with client.session() as s:
        async with s.generate([1, 2], sampling=SamplingParams(max_tokens=200)) as ev:
            await trio.sleep(0.2)  # a whole batch is buffered
            seen = 0
            with trio.CancelScope() as scope:
                async for _ in ev:
                    seen += 1
                    if seen == 3:
                        scope.cancel()
            assert seen == 3  # not the rest of the buffered batch


def test_every_runtime_dependency_is_pinned_at_its_lower_bound_in_lowest_txt() -> None:
    # The lowest cells install with .ci/lowest.txt as constraints: a dependency
    # missing there is tested at its latest only, and a pin that is not the
    # declared lower bound tests a version users may not have.
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    declared = {}
    for spec in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(,<[0-9.]+)?", spec)
        assert m, f"unexpected dependency spec {spec!r}"
        declared[m[1].lower()] = m[2]
    pins = {}
    for line in (root / ".ci" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()

    def norm(v: str) -> tuple[int, ...]:
        parts = [int(x) for x in v.split(".")]
        return tuple(parts + [0] * (3 - len(parts)))

    assert declared.keys() == pins.keys(), declared.keys() ^ pins.keys()
    assert {n: norm(v) for n, v in declared.items()} == {n: norm(v) for n, v in pins.items()}


def test_a_deprecation_raised_in_any_runtime_dependency_fails_the_run() -> None:
    # README (Supported versions): every test run turns a DeprecationWarning raised
    # by poc_api or a runtime dependency into a failure. pytest's filter matches the
    # module the warning is attributed to, which is the import name, not the
    # distribution's: attrs's code lives in `attr`.
    import re
    import tomllib
    import warnings
    from importlib.metadata import packages_distributions
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    deps = {"poc-api"}
    for spec in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]:
        m = re.match(r"[A-Za-z0-9_.-]+", spec)
        assert m
        deps.add(m[0].lower().replace("_", "-"))
    modules = {"poc_api"} | {
        top
        for top, dists in packages_distributions().items()
        if not top.startswith("_") and any(d.lower().replace("_", "-") in deps for d in dists)
    }
    assert {"attr", "attrs", "h2", "trio"} <= modules
    missed = []
    for top in sorted(modules):
        try:
            warnings.warn_explicit("slated for removal", DeprecationWarning, "x.py", 1, module=top)
        except DeprecationWarning:
            continue
        missed.append(top)
    assert not missed, f"a DeprecationWarning from {missed} does not fail the run"


async def test_conversation_stream_deprecation_names_the_callers_line(
    client: poc_api.ApiClient,
) -> None:
    # The warning is attributed to the caller (its module decides whether the
    # default filters show it: __main__'s are shown), not to poc_api's wrapper.
    async with client.conversation() as conv:
        with pytest.warns(DeprecationWarning, match="priority") as record:
            async with conv.stream([Tokens([1, 2])], SamplingParams(max_tokens=2), 3) as ev:  # type: ignore[misc]
                async for _ in ev:
                    pass
    assert record[0].filename == __file__
