"""ApiClient, sessions and streaming generate against the reference server over TCP."""

from __future__ import annotations

import contextlib
import decimal
import inspect
import json
import logging
import re
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from fractions import Fraction

import numpy as np
import pytest
import trio
import trio.testing
from helpers import (
    asyncio_tasks_pending,
    block_the_run,
    consume_busily,
    heartbeat,
    http_server,
    kill_for_good,
    opened_models,
    read_beside_a_second_reader,
    read_request,
    refusing_port,
    wait_for,
    wait_until_streaming_stalls,
)
from misbehaving import DUMMY_BASE_URL, misbehaving_server

import poc_api
from poc_api import SamplingParams, Token, Tokens
from poc_api._proto import salience as pb
from poc_api.server import EOS, ReferenceServer, ServerConfig, tokenize
from poc_api.testing import open_client, reference_server

HELLO = tokenize("The quick brown fox")


# -- construction and URLs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8001"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8001"),
        ("http://example.com/v1", "http://example.com:81"),
        ("https://example.com/v1", "https://example.com:444"),
        ("https://example.com:9443", "https://example.com:9444"),
        ("http://[::1]:8000/v1", "http://[::1]:8001"),
    ],
)
def test_grpc_url_is_derived_from_base_url(base: str, expected: str) -> None:
    assert poc_api.resolve_grpc_url(base, env={}) == expected


def test_a_base_url_on_the_last_port_has_no_grpc_port_to_derive() -> None:
    # Port + 1 = 65536 was returned, and failed later as a "bad port" of a gRPC
    # URL the user never gave.
    with pytest.raises(ValueError, match=r"65535.*grpc_url"):
        poc_api.resolve_grpc_url("http://h:65535/v1", env={})
    with pytest.raises(ValueError, match=r"65535.*grpc_url"):
        poc_api.ApiClient("http://h:65535/v1")
    # With a grpc_url of its own, such a base_url is fine.
    assert poc_api.resolve_grpc_url("http://h:65535/v1", "http://h:1", env={}) == "http://h:1"


def test_grpc_url_precedence_is_argument_then_env_then_derived() -> None:
    env = {"POC_GRPC_URL": "http://env:1"}
    assert poc_api.resolve_grpc_url("http://h:8000/v1", "http://arg:2", env) == "http://arg:2"
    assert poc_api.resolve_grpc_url("http://h:8000/v1", None, env) == "http://env:1"


async def test_api_client_itself_takes_its_grpc_url_from_poc_grpc_url(
    server: ReferenceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # §1 for the client, not only resolve_grpc_url(env=...): the variable wins
    # over the port derived from base_url, on which nothing listens here ...
    nothing = refusing_port()
    base_url = f"http://127.0.0.1:{nothing - 1}/v1"
    monkeypatch.setenv("POC_GRPC_URL", server.grpc_url)
    with trio.fail_after(10):
        async with poc_api.ApiClient(base_url) as c:
            assert c.grpc_url == server.grpc_url
            async with c.session() as s:
                await s.prefill([1, 2])
        # ... and grpc_url, given, wins over the variable.
        monkeypatch.setenv("POC_GRPC_URL", f"http://127.0.0.1:{nothing}")
        async with poc_api.ApiClient(base_url, grpc_url=server.grpc_url) as c:
            async with c.session() as s:
                await s.prefill([1, 2])


@pytest.mark.parametrize("origin", ["argument", "POC_GRPC_URL", "derived"])
async def test_a_grpc_url_that_cannot_be_reached_says_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch, origin: str
) -> None:
    # "http://127.0.0.1:8001: cannot connect: [Errno 111] ..." did not say that
    # the URL was base_url's port + 1, or a POC_GRPC_URL left in the environment.
    nothing = refusing_port()
    base_url = f"http://127.0.0.1:{nothing - 1}/v1"
    grpc_url = f"http://127.0.0.1:{nothing}"
    monkeypatch.delenv("POC_GRPC_URL", raising=False)
    if origin == "POC_GRPC_URL":
        monkeypatch.setenv("POC_GRPC_URL", grpc_url)
    given = grpc_url if origin == "argument" else None
    with trio.fail_after(10):
        async with poc_api.ApiClient(base_url, grpc_url=given) as c:
            with pytest.raises(poc_api.ServerUnavailable) as info:
                await c.score([poc_api.Tokens([1, 2])], [(1, 2)])
    said = {
        "argument": f"{grpc_url}: cannot connect",
        "POC_GRPC_URL": f"{grpc_url} (from POC_GRPC_URL): cannot connect",
        "derived": f"{grpc_url} (base_url's port + 1: pass grpc_url if the gRPC",
    }
    assert str(info.value).startswith(said[origin]), info.value


def test_client_trims_base_url_and_hides_the_api_key() -> None:
    c = poc_api.ApiClient("http://127.0.0.1:8000/v1/", api_key="sk-secret-123")
    assert c.base_url == "http://127.0.0.1:8000/v1"
    assert c.grpc_url == "http://127.0.0.1:8001"
    assert "sk-secret-123" not in repr(c)


@pytest.mark.parametrize(
    "base",
    [
        "http://me:s3 cret@127.0.0.1:8000/v1",  # a raw space: httpx takes it
        "http://me:s3cret @127.0.0.1:8000/v1",
        "http://me:s3/cret@127.0.0.1:8000/v1",  # httpx refuses these: "Invalid port: 's3'"
        "http://me:s3#cret@127.0.0.1:8000/v1",
        "http://me:s3?cret@127.0.0.1:8000/v1",
        # Digits before the raw "/": a valid URL to httpx (host "me", port 12), so
        # the password was shown unchanged.
        "http://me:12/s3cret@127.0.0.1:8000/v1",
        "https://me:1/s3cret@127.0.0.1:8000/v1",
    ],
)
def test_a_password_in_base_url_is_never_shown_whatever_it_holds(base: str) -> None:
    # A URL password is cut at whitespace or "/?#" by the free-text redaction (error
    # messages quote URLs among words): the client's repr showed "me:s3 cret@", and a
    # raw "/" showed all of it in the ValueError, and httpx's "Invalid port: 's3'".
    try:
        shown = repr(poc_api.ApiClient(base))
    except ValueError as exc:
        shown = str(exc)
        assert "percent-encode" in shown
    assert "s3" not in shown and "cret" not in shown
    assert "me:***@" in shown


def test_a_bad_base_url_with_a_password_names_its_own_fault() -> None:
    # Any invalid URL with a password got the hint to percent-encode it, also one
    # whose fault is a trailing newline (a .env file's).
    with pytest.raises(ValueError, match="non-printable") as info:
        poc_api.ApiClient("http://me:s3cret@127.0.0.1:8000/v1\n")
    assert "percent-encode" not in str(info.value) and "s3cret" not in str(info.value)


@pytest.mark.parametrize("grpc", ["http://me:s3/cret@127.0.0.1:1", "http://me:s3cret@127.0.0.1:1"])
def test_a_password_in_grpc_url_is_refused_and_never_shown(grpc: str) -> None:
    # It was dropped without a word (gRPC calls carry api_key), or, with a raw "/",
    # quoted by urllib's "Port could not be cast to integer value as 's3'".
    with pytest.raises(ValueError, match="gRPC URL") as info:
        poc_api.ApiClient("http://127.0.0.1:8000/v1", grpc_url=grpc)
    assert "s3" not in str(info.value) and "cret" not in str(info.value)


@pytest.mark.parametrize(
    "base",
    [
        "http://127.0.0.1:8000/v1\n",  # a .env file's newline
        "http://127.0.0.1:8000/v1 ",  # a .env file's space: calls went to /v1%20/...
        " http://127.0.0.1:8000/v1",
        "http://127.0.0.1:8000/v\x00",
        "http://[::1:8000/v1",
        "http://127.0.0.1:8000/v1?api-version=2024",  # calls would go to /v1?...=2024/...
        "http://127.0.0.1:8000/v1#x",  # calls would go to /v1
        "ftp://127.0.0.1:8000/v1",
        # Host names getaddrinfo refuses (IDNA): each HTTP call raised a bare
        # UnicodeError naming no URL; a bad A-label: the idna package's IDNAError.
        "http://a..b/v1",
        "http://" + "a" * 64 + ".example/v1",
        "http://xn--zz.example/v1",
        "http://exa mple.com/v1",  # sent to the resolver as it was
    ],
)
def test_a_base_url_the_http_calls_cannot_use_is_a_value_error_at_once(base: str) -> None:
    # Even with grpc_url given (which used to skip every check of base_url): every
    # HTTP call would otherwise fail with httpx's raw InvalidURL, or hit a wrong path.
    with pytest.raises(ValueError, match="base_url"):
        poc_api.ApiClient(base, grpc_url="http://127.0.0.1:1")


@pytest.mark.parametrize(
    "grpc",
    [
        "http://a..b:1",
        "http://" + "a" * 64 + ".example:1",
        "http://exa mple.com:1",
        ["http://127.0.0.1:1", "http://a..b:1"],
    ],
)
def test_a_grpc_host_name_no_connection_can_use_is_a_value_error_at_once(grpc: object) -> None:
    # The first call raised a bare UnicodeError (from getaddrinfo, in the loop thread).
    with pytest.raises(ValueError, match=r"gRPC URL .* host name"):
        poc_api.ApiClient("http://127.0.0.1:8000/v1", grpc_url=grpc)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "grpc",
    [
        "http://127.0.0.1:1 ",
        " http://127.0.0.1:1",
        ["http://127.0.0.1:1", "http://[::1]:1\t"],
        "dns:///localhost:1\n",
        "dns:///localhost:1 ",
    ],
)
def test_a_grpc_url_with_spaces_around_it_is_a_value_error_that_says_so(grpc: object) -> None:
    # A leading space, or a DNS target's trailing newline, passed (urllib strips
    # them); a trailing space said "bad port", or urllib's own "could not be cast".
    with pytest.raises(
        ValueError, match=r"(gRPC URL|DNS target) .* leading or trailing whitespace"
    ):
        poc_api.ApiClient("http://127.0.0.1:8000/v1", grpc_url=grpc)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("base", "grpc", "which"),
    [
        ("http://127.0.0.1:0/v1", "http://127.0.0.1:8001", "base_url"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:0", "gRPC URL"),
        ("http://127.0.0.1:8000/v1", ["http://127.0.0.1:8001", "http://[::1]:0"], "gRPC URL"),
        ("http://127.0.0.1:8000/v1", "dns:///localhost:0", "DNS target"),
    ],
)
def test_port_0_is_a_value_error(base: str, grpc: object, which: str) -> None:
    # httpx took port 0 for the default port: "all attempts to connect to
    # 127.0.0.1:80 failed"; gRPC tried port 0 itself, with as puzzling an error.
    with pytest.raises(ValueError, match=rf"{which} .*port 0, which no server listens on"):
        poc_api.ApiClient(base, grpc_url=grpc)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "::1", "fe80::1%eth0", "localhost", "xn--bcher-kva.example", "a_b.c"]
)
def test_host_names_and_addresses_that_may_connect_pass(host: str) -> None:
    url = f"[{host}]" if ":" in host else host
    poc_api.ApiClient(f"http://{url}:8000/v1", grpc_url=f"http://{url}:8001")


_COUNTS = (
    "max_buffered_events",
    "max_buffered_bytes",
    "max_message_size",
    "max_concurrent_streams",
    "max_http_connections",
)


@pytest.mark.parametrize("name", _COUNTS)
@pytest.mark.parametrize(
    ("value", "exc_type"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("8", TypeError)],
)
def test_a_count_setting_below_one_or_not_an_int_is_refused_by_name_at_construction(
    name: str, value: object, exc_type: type[Exception]
) -> None:
    before = set(threading.enumerate())
    with pytest.raises(exc_type, match=rf"^{name} must be"):
        poc_api.ApiClient("http://127.0.0.1:9/v1", **{name: value})  # type: ignore[arg-type]
    # Nothing was started (another test's idle worker thread may have ended).
    assert not set(threading.enumerate()) - before
    poc_api.ApiClient("http://127.0.0.1:9/v1", **{name: 1})  # type: ignore[arg-type]


_SECONDS = (
    "connect_timeout",
    "timeout",
    "close_timeout",
    "keepalive_time",
    "keepalive_timeout",
    "health_check_interval",
    "dns_refresh",
)


@pytest.mark.parametrize("name", _SECONDS)
@pytest.mark.parametrize(
    ("value", "exc_type"),
    [
        (0, ValueError),
        (float("inf"), ValueError),
        pytest.param(10**400, ValueError, id="10**400"),  # (past float's range)
        (True, TypeError),
        ("5", TypeError),
        (np.True_, TypeError),
        (np.timedelta64(200, "ms"), TypeError),
    ],
)
def test_a_seconds_setting_that_is_no_positive_real_number_is_refused_by_name(
    name: str, value: object, exc_type: type[Exception]
) -> None:
    with pytest.raises(exc_type, match=rf"^{name} must be a"):
        poc_api.ApiClient("http://127.0.0.1:9/v1", **{name: value})  # type: ignore[arg-type]


async def test_the_constructor_takes_numpy_numbers_and_fractions_as_the_rest_of_the_api(
    server: ReferenceServer,
) -> None:
    # The README says timeouts may be any real number (numpy's float32 included)
    # and counts numpy integers, as SamplingParams and generate take them; the
    # constructor refused them ("timeout must be a number of seconds").
    c = poc_api.ApiClient(
        server.base_url,
        grpc_url=server.grpc_url,
        connect_timeout=np.float32(3),
        timeout=np.float32(20),
        close_timeout=Fraction(1, 2),
        keepalive_time=np.float64(60),
        keepalive_timeout=decimal.Decimal("2.5"),
        health_check_interval=np.float32(5),
        dns_refresh=np.int64(30),
        max_buffered_events=np.int64(64),
        max_buffered_bytes=np.int32(1 << 20),
        max_message_size=np.uint32(1 << 24),
        max_concurrent_streams=np.int16(8),
    )
    async with c:
        async with c.session() as s:
            async with s.generate(HELLO, sampling=SamplingParams(max_tokens=2)) as ev:
                assert [e async for e in ev]
        assert await c.tokenize("hi")


def test_https_base_url_selects_tls() -> None:
    c = poc_api.ApiClient("https://example.com/v1")
    assert c.grpc_url == "https://example.com:444"


async def test_a_session_a_full_server_refuses_is_retriable() -> None:
    # RESOURCE_EXHAUSTED to OpenSession: no session was made, so asking again is
    # safe; it said retriable=False, and a retry loop keyed on it gave up.
    async with reference_server(max_sessions=1) as srv, open_client(srv) as c:
        async with c.session():
            with pytest.raises(poc_api.ResourceExhausted) as info:
                async with c.session():
                    pass  # pragma: no cover
            assert info.value.retriable, info.value
            async with c.conversation() as conv:
                with pytest.raises(poc_api.ResourceExhausted) as turn:
                    async with conv.stream([Tokens(HELLO)], SamplingParams(max_tokens=1)) as ev:
                        pass  # pragma: no cover
                assert turn.value.retriable, turn.value
        async with c.conversation() as conv:  # (room again: the retry works)
            async with conv.stream([Tokens(HELLO)], SamplingParams(max_tokens=1)) as ev:
                assert len([x async for x in ev]) == 2
        assert not srv.state().session_ids


async def test_a_closed_client_cannot_be_reopened(server: ReferenceServer) -> None:
    c = poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url)
    async with c:
        pass
    with pytest.raises(RuntimeError, match="reopened"):
        await c.__aenter__()
    with pytest.raises(trio.ClosedResourceError, match="closed"):
        c.session()


# -- sessions ----------------------------------------------------------------------


async def test_session_prefill_generate_and_committed_len(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    with trio.fail_after(10):
        async with client.session() as s:
            assert s.session_id in server.state().session_ids
            assert s.committed_len == 0
            done = await s.prefill(HELLO)
            assert (done.finish_reason, done.total_tokens) == ("prefill", len(HELLO))
            assert s.committed_len == len(HELLO)
            events = []
            async with s.generate([32], sampling=SamplingParams(max_tokens=8)) as ev:
                async for e in ev:
                    events.append(e)
            tokens = [e for e in events if isinstance(e, Token)]
            assert [t.position for t in tokens] == list(range(len(HELLO) + 1, len(HELLO) + 9))
            assert all(not t.is_prefill and t.sampled_logprob <= 0 for t in tokens)
            assert isinstance(events[-1], poc_api.Done)
            assert events[-1].completion_tokens == 8
            assert s.committed_len == len(HELLO) + 1 + 8
        sid = s.session_id
    assert sid not in server.state().session_ids


U32_MAX = 2**32 - 1

# Each field differs from its default and from the other fields' values: a field
# sent as another's, or left out, shows. The second case: each at its range's edge.
WIRE_CASES = [
    (
        SamplingParams(
            max_tokens=3,
            temperature=0.75,
            top_p=0.5,
            top_k=40,
            stop_token_ids=(7, 11),
            logprob_top_k=5,
        ),
        9,
    ),
    (
        SamplingParams(
            max_tokens=U32_MAX,
            temperature=3.4028234663852886e38,  # float32's largest
            top_p=2.0**-149,  # float32's smallest
            top_k=U32_MAX,
            stop_token_ids=(0, U32_MAX),
            logprob_top_k=U32_MAX - 1,
        ),
        -(2**31),
    ),
]


@pytest.mark.parametrize(("sampling", "priority"), WIRE_CASES, ids=["typical", "extremes"])
@pytest.mark.parametrize("via", ["Session.generate", "Conversation.stream"])
async def test_sampling_fields_and_priority_reach_the_wire_as_given(
    via: str, sampling: SamplingParams, priority: int
) -> None:
    # The reference server cannot tell most of them apart (a greedy run ignores
    # top_p, nothing reads priority): the request as a server read it can.
    async with (
        misbehaving_server() as srv,
        poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url) as c,
    ):
        with trio.fail_after(10):
            if via == "Session.generate":
                async with (
                    c.session() as s,
                    s.generate([1, 2], sampling=sampling, priority=priority) as ev,
                ):
                    async for _ in ev:
                        pass
            else:
                async with (
                    c.conversation() as conv,
                    conv.stream([Tokens([1, 2])], sampling, priority=priority) as ev,
                ):
                    async for _ in ev:
                        pass
    [call] = srv.calls_to("Generate")
    req = pb.GenerateRequest.parse(call.request)
    assert req.max_tokens == sampling.max_tokens
    assert req.temperature == sampling.temperature
    assert req.top_p == sampling.top_p
    assert req.top_k == sampling.top_k
    assert req.stop_token_ids == list(sampling.stop_token_ids)
    assert req.logprob_top_k == sampling.logprob_top_k
    assert req.priority == priority


@pytest.mark.parametrize("top_p", [1e-46, 2.0**-151, 5e-324])
async def test_a_top_p_below_float32s_smallest_is_not_sent_as_off(top_p: float) -> None:
    # PROTOCOL.md §3: top_p 0 switches the filter off. A positive top_p below
    # float32's smallest (2**-149) asks for the tightest nucleus (the most likely
    # token only); rounded to 0.0 on the wire it asked for no filter at all.
    async with (
        misbehaving_server() as srv,
        poc_api.ApiClient(DUMMY_BASE_URL, grpc_url=srv.url) as c,
    ):
        sampling = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p)
        with trio.fail_after(10):
            async with c.session() as s, s.generate([1, 2], sampling=sampling) as ev:
                async for _ in ev:
                    pass
    [call] = srv.calls_to("Generate")
    assert pb.GenerateRequest.parse(call.request).top_p > 0


async def test_generate_returns_prefill_logprobs_and_readouts_for_requested_ranges(
    client: poc_api.ApiClient,
) -> None:
    with trio.fail_after(10):
        async with (
            client.session() as s,
            s.generate(
                HELLO,
                sampling=SamplingParams(max_tokens=2, logprob_top_k=3),
                logprobs_ranges=[(1, 4)],
                readout_ranges=[(3, 5)],
            ) as ev,
        ):
            events = [e async for e in ev]
    prefill = [e for e in events if isinstance(e, Token) and e.is_prefill]
    assert [t.position for t in prefill] == [1, 2, 3, 4]
    assert [t.id for t in prefill] == HELLO[1:5]
    assert prefill[3].readout is not None and prefill[0].readout is None
    assert len(prefill[3].readout) == 3 * 8
    decoded = [e for e in events if isinstance(e, Token) and not e.is_prefill]
    assert all(len(t.top_logprobs) == 3 for t in decoded)
    # top_logprobs are sorted, and the greedy choice is the most likely one.
    for t in decoded:
        lps = [x.logprob for x in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert t.top_logprobs[0].id == t.id


async def test_generate_readouts_are_flat_or_shaped_by_readout_shape(
    server: ReferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    # PROTOCOL.md: readouts are exposed 2-D, (n_layers, n_concepts). Session.generate
    # gave them flat only (no readout_shape, as Conversation.stream has): now flat
    # by default (the wire's layout, as Token's docstring says), 2-D on request.
    params = inspect.signature(poc_api.Session.generate).parameters
    named = re.findall(r"``(\w+)`` on\s+``(?:Session\.)?generate``", Token.__doc__ or "")
    assert named and all(name in params for name in named), named
    got: dict[object, list[Token]] = {}

    async def run(client: poc_api.ApiClient, shape: tuple[int, int] | None) -> None:
        async with (
            client.session() as s,
            s.generate(
                HELLO,
                sampling=SamplingParams(max_tokens=2, temperature=0),
                readout_ranges=[(0, len(HELLO) + 2)],
                readout_shape=shape,
            ) as ev,
        ):
            got[shape] = [e async for e in ev if isinstance(e, Token)]

    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as client:
        with trio.fail_after(10):
            # The manifest not fetched yet: a shape of another count is not known
            # to be wrong before the call; its readouts are dropped, with one
            # warning for the stream and a count at its end.
            await run(client, None)
            await run(client, (3, 5))
            manifest = await client.readout_manifest()
            assert manifest is not None
            n_layers, n_concepts = manifest.shape
            await run(client, manifest.shape)
            async with client.session() as s:
                with pytest.raises(ValueError, match="manifest"):  # now known: refused
                    s.generate([1], readout_shape=(n_concepts, n_layers))
                with pytest.raises(ValueError, match="positive"):
                    s.generate([1], readout_shape=(0, 3))
    flat, shaped = got[None], got[manifest.shape]
    assert flat[0].readout is not None and flat[0].readout.ndim == 1
    assert len(flat[0].readout) == n_layers * n_concepts
    assert [t.readout.shape for t in shaped if t.readout is not None] == [manifest.shape] * len(
        flat
    )
    for a, b in zip(flat, shaped, strict=True):
        assert a.readout is not None and b.readout is not None
        assert b.readout.tolist()[1] == a.readout.tolist()[n_concepts : 2 * n_concepts]
    assert [t.readout for t in got[(3, 5)]] == [None] * len(flat)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    where = rf"session sess-\w+ \(on {re.escape(server.grpc_url)}\)"
    assert len(warned) == 2, warned
    assert re.match(
        rf"{where}: readout shape mismatch: expected 3\*5=15, got {n_layers * n_concepts}; "
        r"dropped \(readout=None\)",
        warned[0],
    ), warned
    assert re.fullmatch(
        rf"{where}: {len(flat)} readouts of this stream were dropped \(length\)", warned[1]
    ), warned


async def test_append_image_reports_placeholders_and_moves_committed_len(
    client: poc_api.ApiClient, png_56x28: bytes
) -> None:
    with trio.fail_after(10):
        async with client.session() as s:
            await s.prefill([1, 2])
            img = await s.append_image(png_56x28, "image/png")
            assert img == poc_api.ImageAppend(placeholder_count=2, total_length=4)
            assert s.committed_len == 4


async def test_errors_map_to_typed_exceptions_and_keep_the_session_usable(
    client: poc_api.ApiClient,
) -> None:
    with trio.fail_after(10):
        async with client.session() as s:
            with pytest.raises(poc_api.InvalidRequest) as info:
                await s.append_image(b"definitely not an image", "image/png")
            assert info.value.grpc_status == "INVALID_ARGUMENT"
            with pytest.raises(poc_api.InvalidRequest):
                await s.prefill([100_000])  # outside the vocabulary
            assert not s.lost
            await s.prefill([1])
            assert s.committed_len == 1


async def test_bad_arguments_raise_before_anything_is_sent(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    async with client.session() as s:
        before = server.state().generate_calls
        with pytest.raises(ValueError):
            await s.prefill([-1])
        with pytest.raises(ValueError):
            await s.prefill([2**32])
        with pytest.raises(TypeError):
            await s.prefill("text")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            async with s.generate([1], logprobs_ranges=[(5, 2)]):
                pass
        with pytest.raises(ValueError, match="int32"):
            async with s.generate([1], priority=2**31):
                pass
        with pytest.raises(TypeError, match="priority must be an int"):
            async with s.generate([1], priority=1.5):  # type: ignore[arg-type]
                pass
        with pytest.raises(ValueError, match="int32"):
            await s.prefill([1], priority=-(2**31) - 1)
        with pytest.raises(TypeError, match="priority must be an int"):
            await s.rewind(0, priority="high")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await s.rewind(5)  # past the end
        with pytest.raises(ValueError):
            await s.append_image(b"", "image/png")
        with pytest.raises(ValueError):
            SamplingParams(temperature=-1)
        with pytest.raises(ValueError):
            SamplingParams(top_p=1.5)
        with pytest.raises(ValueError):
            SamplingParams(temperature=float("nan"))
        assert server.state().generate_calls == before
        assert not s.lost


async def test_unknown_session_is_session_not_found(
    client: poc_api.ApiClient,
) -> None:
    async with client.session() as s:
        await s.aclose()  # closed on the server, but we keep the object
        s._closed = False  # reach past the guard to send a call for a dead id
        with pytest.raises(poc_api.SessionNotFound):
            await s.prefill([1])


async def test_a_lost_session_says_what_made_it_lost(client: poc_api.ApiClient) -> None:
    # Every later call said "was interrupted mid-call", also of a session the server
    # had forgotten (a restart): it was never interrupted.
    async def lost_by(what: str) -> str:
        async with client.session() as s:
            await s.prefill(HELLO)
            if what == "not found":
                await s.aclose()
                s._closed = False  # reach past the guard to send a call for a dead id
                with pytest.raises(poc_api.SessionNotFound):
                    await s.prefill([1])
            elif what == "cancel":
                with trio.move_on_after(0.05):
                    async with s.generate(sampling=SamplingParams(max_tokens=10**6)) as ev:
                        async for _ in ev:
                            pass
            elif what == "timeout":
                with pytest.raises(poc_api.PocApiTimeout):
                    async with s.generate(
                        sampling=SamplingParams(max_tokens=10**6), timeout=0.05
                    ) as ev:
                        async for _ in ev:
                            pass
            else:
                with pytest.raises(KeyError):
                    async with s.generate(sampling=SamplingParams(max_tokens=10**6)) as ev:
                        async for _ in ev:
                            raise KeyError(what)
            assert s.lost
            with pytest.raises(poc_api.SessionLost) as info:
                await s.prefill([1])
            await s.aclose()
            return str(info.value)

    msg = await lost_by("not found")
    assert "is lost: the server does not know it (Generate: NOT_FOUND" in msg, msg
    msg = await lost_by("cancel")
    assert "is lost: a call on it was cancelled before it finished;" in msg, msg
    msg = await lost_by("timeout")
    assert "is lost: a call on it did not finish: PocApiTimeout: Generate" in msg, msg
    msg = await lost_by("body")
    assert "is lost: a generate block on it was left by KeyError before its Done" in msg, msg
    assert msg.endswith("its state on the server is unknown: open a new session"), msg


async def test_offset_mismatch_is_typed(client: poc_api.ApiClient) -> None:
    async with client.session() as s:
        await s.prefill([1, 2, 3])
        s._committed_len = 1  # pretend we lost track: the server must refuse
        with pytest.raises(poc_api.OffsetMismatch):
            await s.prefill([4])


async def test_rewind_drops_positions(client: poc_api.ApiClient) -> None:
    async with client.session() as s:
        await s.prefill(HELLO)
        done = await s.rewind(3)
        assert done.total_tokens == 3 and s.committed_len == 3


async def test_context_overflow_is_typed(eos_server: ReferenceServer) -> None:
    async with poc_api.ApiClient(eos_server.base_url, grpc_url=eos_server.grpc_url) as c:
        async with c.session() as s:
            with pytest.raises(poc_api.ContextOverflow):
                await s.prefill([65] * (s.max_length + 1))


async def test_a_call_past_the_context_window_is_refused_before_sending(
    eos_server: ReferenceServer,
) -> None:
    # The session knows its window: the append was sent and refused by the
    # server (OUT_OF_RANGE), where score refused it up front.
    async with poc_api.ApiClient(eos_server.base_url, grpc_url=eos_server.grpc_url) as c:
        async with c.session() as s:
            await s.prefill([65] * 10)
            sent = eos_server.state().rpc_counts["Generate"]
            with pytest.raises(poc_api.ContextOverflow, match="refused before sending") as info:
                await s.prefill([65] * (s.max_length - 9))
            assert info.value.grpc_status is None
            with pytest.raises(poc_api.ContextOverflow):
                async with s.generate([65] * s.max_length, rewind_to=1):
                    pass
            assert eos_server.state().rpc_counts["Generate"] == sent
            # Nothing was sent: the session is as it was, and takes what fits.
            assert not s.lost and s.committed_len == 10
            await s.prefill([65] * (s.max_length - 10))
            prefill = SamplingParams(max_tokens=0)
            async with s.generate([66] * (s.max_length - 5), sampling=prefill, rewind_to=5) as ev:
                async for _ in ev:
                    pass
            assert s.committed_len == s.max_length


async def test_session_block_that_raises_closes_its_session(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    sid = ""
    with pytest.raises(KeyError):
        async with client.session() as s:
            sid = s.session_id
            raise KeyError("boom")
    assert sid and sid not in server.state().session_ids


async def test_cancelled_session_block_closes_its_session(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    ids: list[str] = []
    # Cancelled once the block is in (a timer could fire before OpenSession has
    # answered on a loaded machine: a red CI rehearsal).
    with trio.CancelScope() as scope:
        async with client.session() as s:
            ids.append(s.session_id)
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert ids and ids[0] not in server.state().session_ids


async def test_a_single_failure_is_not_wrapped_in_an_exception_group(
    client: poc_api.ApiClient,
) -> None:
    async with client.session() as s:
        with pytest.raises(ZeroDivisionError):
            async with s.generate(HELLO, sampling=SamplingParams(max_tokens=100)) as ev:
                async for _ in ev:
                    1 / 0  # noqa: B018


async def test_calls_inside_ones_own_generate_block_fail_fast(client: poc_api.ApiClient) -> None:
    async with client.session() as s:
        with pytest.raises(RuntimeError):
            async with s.generate([1], sampling=SamplingParams(max_tokens=1)):
                await s.prefill([2])


# -- streaming and cancellation ------------------------------------------------------


async def test_leaving_a_stream_early_resets_it_with_cancel_and_loses_the_session(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    before = server.state()
    with trio.fail_after(10):
        async with client.session() as s:
            # A decode too long to fit in the flow-control window: the server must
            # still be sending when the reset arrives.
            async with s.generate(HELLO, sampling=SamplingParams(max_tokens=10**6)) as ev:
                async for e in ev:
                    if isinstance(e, Token) and e.position > len(HELLO) + 5:
                        break
            assert s.lost
            with pytest.raises(poc_api.SessionLost, match="block on it was left before its Done"):
                await s.prefill([1])
        await wait_for(lambda: server.state().cancelled_streams > before.cancelled_streams)
    after = server.state()
    new_resets = after.resets[len(before.resets) :]
    assert new_resets and all(code == 8 for _, code in new_resets)  # h2 CANCEL


async def test_cancelling_a_million_token_decode_stops_the_server_promptly(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    with trio.fail_after(20):
        async with client.session() as s:
            await s.prefill(HELLO)
            before = server.state().cancelled_streams
            received = 0
            with trio.move_on_after(0.5):
                async with s.generate(sampling=SamplingParams(max_tokens=1_000_000)) as ev:
                    async for _ in ev:
                        received += 1
            cancelled_at = time.perf_counter()
            while server.state().cancelled_streams == before:  # noqa: ASYNC110 - server thread
                await trio.sleep(0.001)
            seen_after = time.perf_counter() - cancelled_at
            decoded = server.state().tokens_decoded
            await trio.sleep(0.2)
            assert server.state().tokens_decoded - decoded < 100  # it really stopped
        assert received > 100
        assert seen_after < 0.1, f"server saw the cancel after {seen_after * 1e3:.1f} ms"
        # The next RPC on the same client goes through without waiting on the old stream.
        t0 = time.perf_counter()
        async with client.session() as s2:
            await s2.prefill(HELLO)
        assert time.perf_counter() - t0 < 2.0


@pytest.mark.heavy
async def test_two_hundred_abandoned_streams_do_not_starve_the_connection(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    with trio.fail_after(60):
        async with client.session() as s:
            await s.prefill(HELLO)
        for _ in range(200):
            async with client.session() as s:
                async with s.generate(HELLO, sampling=SamplingParams(max_tokens=5000)) as ev:
                    async for _e in ev:
                        break  # abandon with unread data in flight
        # The connection's flow-control window must still be open: a big stream works.
        async with client.session() as s:
            n = 0
            async with s.generate(HELLO, sampling=SamplingParams(max_tokens=20_000)) as ev:
                async for _e in ev:
                    n += 1
            assert n == 20_001
    assert server.state().connections_open >= 1


async def test_entering_the_client_connects_nothing_and_the_first_call_opens_one_connection(
    server: ReferenceServer,
) -> None:
    # §6: the channel opens lazily. A client made at startup for a server that is
    # not up yet must not fail, or hold a connection, before it is used.
    before = server.state().connections_total
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        await trio.sleep(0.2)  # time for a connection the client might open by itself
        assert server.state().connections_total == before
        with trio.fail_after(10):
            await c.readout_manifest()  # HTTP: not the gRPC channel's business
            assert server.state().connections_total == before
            async with c.session() as s:
                await s.prefill([1, 2])
            assert server.state().connections_total - before == 1
            async with c.session() as s:  # and the next calls share it
                await s.prefill([1, 2])
    assert server.state().connections_total - before == 1


async def test_hundred_concurrent_first_calls_share_one_connection(
    server: ReferenceServer,
) -> None:
    before = server.state().connections_total
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:

        async def one() -> None:
            async with c.session() as s:
                await s.prefill([1, 2])

        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                for _ in range(100):
                    n.start_soon(one)
    assert server.state().connections_total - before == 1


async def test_slow_consumer_gets_every_event_through_a_small_buffer(
    server: ReferenceServer,
) -> None:
    async with (
        poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url, max_buffered_events=4) as c,
        c.session() as s,
    ):
        got = []
        with trio.fail_after(20):
            async with s.generate(HELLO, sampling=SamplingParams(max_tokens=300)) as ev:
                async for e in ev:
                    got.append(e)
                    if len(got) % 50 == 0:
                        await trio.sleep(0.01)
    positions = [e.position for e in got if isinstance(e, Token)]
    assert positions == list(range(len(HELLO), len(HELLO) + 300))


async def test_no_tasks_are_left_behind(server: ReferenceServer) -> None:
    root = trio.lowlevel.current_task()

    def task_count() -> int:
        def walk(t: trio.lowlevel.Task) -> int:
            return 1 + sum(walk(c) for n in t.child_nurseries for c in n.child_tasks)

        return walk(root)

    base = task_count()
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        async with c.session() as s:
            with trio.move_on_after(0.1):
                async with s.generate(HELLO, sampling=SamplingParams(max_tokens=10**6)) as ev:
                    async for _ in ev:
                        pass
        await trio.sleep(0.05)
        assert await asyncio_tasks_pending(c) == []
        thread = c._bridge.thread if c._bridge is not None else None
    assert task_count() == base
    # ... and the loop's thread ended with the client.
    assert thread is not None and not thread.is_alive()


async def test_eos_finishes_with_reason_eos(eos_server: ReferenceServer) -> None:
    async with poc_api.ApiClient(eos_server.base_url, grpc_url=eos_server.grpc_url) as c:
        async with c.session() as s:
            async with s.generate(
                HELLO, sampling=SamplingParams(max_tokens=5, stop_token_ids=(EOS, 32))
            ) as ev:
                events = [e async for e in ev]
    done = events[-1]
    assert isinstance(done, poc_api.Done)
    assert done.finish_reason in ("stop", "eos", "length")


async def test_auth_errors_are_typed_and_do_not_leak_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="poc_api")
    secret = "sk-right-key-4242"
    async with ReferenceServer(ServerConfig(api_key=secret)) as srv:
        async with poc_api.ApiClient(srv.base_url, api_key="wrong-key", grpc_url=srv.grpc_url) as c:
            with pytest.raises(poc_api.AuthenticationError) as info:
                async with c.session():
                    pass
            assert info.value.grpc_status == "UNAUTHENTICATED"
            assert "wrong-key" not in str(info.value)
        async with poc_api.ApiClient(srv.base_url, api_key=secret, grpc_url=srv.grpc_url) as c:
            async with c.session() as s:
                await s.prefill([1])
            assert secret not in repr(c)
    assert secret not in caplog.text and "wrong-key" not in caplog.text


async def test_unreachable_server_is_server_unavailable() -> None:
    async with poc_api.ApiClient("http://127.0.0.1:1/v1") as c:
        with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable):
            async with c.session():
                pass


async def test_debug_log_has_the_seed_lines(
    client: poc_api.ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="poc_api")
    async with client.session() as s:
        async with s.generate(HELLO, sampling=SamplingParams(max_tokens=2)) as ev:
            async for _ in ev:
                pass
    text = caplog.text
    for needle in ("opening", "Generate: offset=0", "first decode token", "Done: prompt="):
        assert needle in text, needle
    assert all(r.name.startswith("poc_api") for r in caplog.records if "session" in r.message)


async def test_generate_total_timeout_raises_typed_and_loses_the_session(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    before = server.state().cancelled_streams
    async with client.session() as s:
        with pytest.raises(poc_api.PocApiTimeout, match="total timeout"), trio.fail_after(10):
            async with s.generate(
                HELLO, sampling=SamplingParams(max_tokens=10**6), timeout=0.2
            ) as ev:
                async for _ in ev:
                    pass
        assert s.lost
    await wait_for(lambda: server.state().cancelled_streams > before)


async def test_the_total_timeout_holds_for_a_consumer_slower_than_the_server() -> None:
    # It was checked only while the consumer waited for events: one that always
    # found events buffered (a slow consumer) never timed out, and the stream ran
    # to its end (the flaky "DID NOT RAISE" of the test above under load). The
    # server streams on for 5 s, 1 ms a token; the consumer takes 2 ms an event.
    async with (
        reference_server(token_delay_ms=1) as server,
        open_client(server) as client,
        client.session() as s,
    ):
        with pytest.raises(poc_api.PocApiTimeout, match="total timeout"), trio.fail_after(10):
            async with s.generate(
                HELLO, sampling=SamplingParams(max_tokens=5_000), timeout=0.3
            ) as ev:
                async for _ in ev:
                    time.sleep(0.002)  # noqa: ASYNC251 - CPU work between events


@pytest.mark.parametrize("which", ["timeout", "first_token_timeout", "token_timeout"])
async def test_a_generate_timeout_names_the_bound_set_not_a_late_wake(which: str) -> None:
    # The message gave the time measured when the task woke: a loaded machine (here a
    # consumer that blocks the run) made a 0.2 s timeout say "after 0.5 s" (a CLI test
    # flaky under load, expecting the --timeout it set).
    delay = 2000 if which == "token_timeout" else 1  # ms a token: a stall after the first
    # The first token seconds late (1 s of prefill a prompt token): the call may
    # start before the run blocks (a loop thread awake for something else), and a
    # first token already buffered when the run woke was read, not timed out (the
    # test then ran into its 10 s).
    prefill_us = 1e6 if which == "first_token_timeout" else 0.0
    async with (
        reference_server(token_delay_ms=delay, prefill_delay_us=prefill_us) as server,
        open_client(server) as client,
        client.session() as s,
    ):
        sampling = SamplingParams(max_tokens=10**6 if delay == 1 else 3)
        with pytest.raises(poc_api.PocApiTimeout) as info, trio.fail_after(10):
            async with s.generate(HELLO, sampling=sampling, **{which: 0.2}) as ev:
                if which == "first_token_timeout":
                    await trio.sleep(0.05)  # the call surely under way (prefill)
                    time.sleep(0.5)  # noqa: ASYNC251 - the run blocked before its first read
                async for _ in ev:
                    time.sleep(0.5)  # noqa: ASYNC251 - the run blocked between reads
    kind = {"timeout": "total", "first_token_timeout": "first-token"}.get(which, "between-tokens")
    assert f"Generate: {kind} timeout after 0.2 s" in str(info.value), info.value


async def test_the_total_timeout_spares_a_call_that_finished_in_time() -> None:
    # The server ended the stream within the timeout; a consumer slower than it
    # got PocApiTimeout once the timeout passed, with the rest of the call,
    # Done included, buffered (and a conversation lost its session for it).
    # chat_stream and README say a timeout cuts a read still waiting.
    sampling = SamplingParams(max_tokens=30)  # 4 ms each: ended after about 0.12 s
    async with reference_server(token_delay_ms=4) as server, open_client(server) as client:
        async with client.session() as s:
            async with s.generate([65], sampling=sampling, timeout=1.0) as ev:
                n = 0
                async for _ in ev:
                    n += 1
                    await trio.sleep(0.1)  # the agent's own work: 3 s in all
            assert n == 31 and ev.done is not None and not s.lost
        async with client.conversation() as conv:
            async with conv.stream([Tokens([65])], sampling, timeout=1.0) as cev:
                async for _ in cev:
                    await trio.sleep(0.1)
            assert conv.session is not None and conv.committed_len == 31


@pytest.mark.parametrize("which", ["timeout", "first_token_timeout"])
async def test_a_call_whose_end_came_as_its_timeout_ran_out_returns_it(which: str) -> None:
    # The trio thread busy (another task's synchronous work) past the deadline,
    # while the loop thread took in the whole answer: the read woke cancelled, and
    # prefill raised PocApiTimeout for a call that had taken effect (committed_len
    # moved, the session kept), which a caller retrying on a timeout appends twice.
    async with (
        reference_server(max_context=100_000, prefill_delay_us=1.5) as server,
        open_client(server) as client,
        client.session() as s,
    ):
        await s.prefill([1])
        before = server.state().tokens_appended

        async def busy() -> None:
            await trio.sleep(0.01)
            # Synchronous: past the deadline, and until the server has taken the
            # tokens in (about 30 ms of prefill), its answer then read by the loop
            # thread meanwhile.
            started = time.monotonic()
            while (
                server.state().tokens_appended < before + 20_000 and time.monotonic() < started + 10
            ):
                time.sleep(0.01)  # noqa: ASYNC251 - the trio thread busy on purpose
            time.sleep(max(0.1, started + 0.2 - time.monotonic()))  # noqa: ASYNC251

        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy)
            with trio.fail_after(10):
                if which == "timeout":
                    done = await s.prefill([5] * 20_000, timeout=0.1)
                else:
                    prefill = SamplingParams(max_tokens=0)
                    async with s.generate([5] * 20_000, sampling=prefill, **{which: 0.1}) as ev:
                        async for _ in ev:
                            pass
                    assert ev.done is not None
                    done = ev.done
        assert done.total_tokens == 20_001 == s.committed_len and not s.lost


@pytest.mark.parametrize("which", ["first_token_timeout", "token_timeout"])
async def test_tokens_that_came_in_time_while_trio_was_busy_do_not_time_out(which: str) -> None:
    # The trio thread busy (another task's synchronous work) past the first-token
    # or between-tokens bound, while the loop thread took in tokens that came well
    # within it (every 20 ms, for a 0.3 s bound): the read woke cancelled and
    # raised PocApiTimeout with events buffered (a read that would not wait), a
    # healthy stream cut and its session lost.
    async with (
        reference_server(token_delay_ms=20) as server,
        open_client(server) as client,
        client.session() as s,
    ):
        await s.prefill([1, 2, 3])

        async def busy() -> None:
            await trio.sleep(0.01)
            time.sleep(0.8)  # noqa: ASYNC251 - the trio thread busy on purpose

        events = 0
        with trio.fail_after(10):
            sampling = SamplingParams(max_tokens=100)  # 2 s: alive after the wait
            async with (
                s.generate(sampling=sampling, **{which: 0.3}) as ev,
                trio.open_nursery() as nursery,
            ):
                if which == "first_token_timeout":
                    nursery.start_soon(busy)
                async for _ in ev:
                    events += 1
                    if events == 1 and which == "token_timeout":
                        nursery.start_soon(busy)
        assert ev.done is not None and ev.done.completion_tokens == 100
        assert s.committed_len == 103 and not s.lost


async def test_a_stream_whose_end_came_after_done_while_trio_was_busy_is_not_blamed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # After Done, the wait for the end of the stream parked; the trio thread then
    # busy (another task's synchronous work) past its grace, while the loop
    # thread took in the end: the wait woke cancelled, and a WARNING said the
    # server had sent no end of stream within 0.3 s of Done (and spent the
    # minute's one warning of a really stalled server), for a stream that had
    # ended at once. A stream buffer of one event holds the end back until the
    # reader takes the Done, so the wait parks within a few calls.
    caplog.set_level(logging.DEBUG, logger="poc_api")
    async with (
        reference_server() as server,
        open_client(server, close_timeout=0.3, max_buffered_events=1) as client,
        client.session() as s,
    ):
        parked = False

        async def busy(ev: poc_api.GenerateStream) -> None:
            nonlocal parked
            if ev._rx._waiting and not ev._rx.ended:  # the drain waits for the end
                parked = True
                time.sleep(0.6)  # noqa: ASYNC251 - the trio thread busy on purpose

        with trio.fail_after(30):
            for _ in range(300):
                async with trio.open_nursery() as nursery:
                    async with s.generate([65], sampling=SamplingParams(max_tokens=2)) as ev:
                        async for _ in ev:
                            if ev.done is not None:
                                nursery.start_soon(busy, ev)
                assert ev.done is not None and not s.lost
                if parked:
                    break
        assert parked, "the wait after Done never parked"
        assert ev._finished  # its end was read, not reset
    blamed = [r.getMessage() for r in caplog.records if "no end of stream" in r.getMessage()]
    assert not blamed, blamed


async def test_a_stream_cut_by_its_total_timeout_with_tokens_buffered_names_it() -> None:
    # The trio thread busy past the between-tokens bound and the total one, with
    # tokens that came every 20 ms buffered: the between-tokens bound spares a
    # stream that had events ready, so the total bound cut it, but the error said
    # "between-tokens timeout after 0.3 s" (a stalled server, to its reader).
    async with (
        reference_server(token_delay_ms=20) as server,
        open_client(server) as client,
        client.session() as s,
    ):

        async def busy(ev: poc_api.GenerateStream) -> None:
            while not ev._rx._waiting:  # the reader waits for the next tokens
                await trio.lowlevel.checkpoint()
            time.sleep(1.2)  # noqa: ASYNC251 - the trio thread busy on purpose

        sampling = SamplingParams(max_tokens=10**6)
        async with trio.open_nursery() as nursery:
            with pytest.raises(poc_api.PocApiTimeout) as info, trio.fail_after(10):
                async with s.generate(
                    [65], sampling=sampling, timeout=1.0, token_timeout=0.3
                ) as ev:
                    async for _ in ev:
                        if not nursery.child_tasks:
                            nursery.start_soon(busy, ev)
    assert "Generate: total timeout after 1 s" in str(info.value), info.value


async def test_a_long_healthy_stream_is_not_cut_by_timeouts_not_set(
    client: poc_api.ApiClient,
) -> None:
    async with client.session() as s:
        n = 0
        async with s.generate(
            HELLO, sampling=SamplingParams(max_tokens=30_000), token_timeout=5.0
        ) as ev:
            async for _ in ev:
                n += 1
    assert n == 30_001


async def test_bad_timeouts_are_value_errors(client: poc_api.ApiClient) -> None:
    async with client.session() as s:
        with pytest.raises(ValueError):
            async with s.generate([1], timeout=-1):
                pass
        with pytest.raises(ValueError):
            await s.append_image(b"x", "image/png", timeout=float("nan"))
        assert not s.lost


async def test_calls_beyond_max_concurrent_streams_raise_limit_exceeded(
    server: ReferenceServer,
) -> None:
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, max_concurrent_streams=2
    ) as c:
        async with c.session() as a, c.session() as b:
            async with a.generate(HELLO, sampling=SamplingParams(max_tokens=10**6)) as ea:
                await ea.__anext__()
                async with b.generate(HELLO, sampling=SamplingParams(max_tokens=10**6)) as eb:
                    await eb.__anext__()
                    with pytest.raises(poc_api.LimitExceeded, match="max_concurrent_streams=2"):
                        async with c.session():
                            pass
        # The slots were given back.
        async with c.session() as s:
            await s.prefill([1])


@pytest.mark.heavy
async def test_streams_nobody_reads_do_not_stall_the_others(
    wide_server: ReferenceServer,
) -> None:
    server = wide_server
    # Agents that stop reading their streams must only stop their own streams: the
    # connection's flow-control window is shared by every agent on the client.
    # 20 unread streams hold more than any connection window a client might pick.
    # (A small event buffer: the bytes each unread stream holds are then its window.)
    async with poc_api.ApiClient(
        server.base_url, grpc_url=server.grpc_url, max_buffered_events=64
    ) as c:
        async with contextlib.AsyncExitStack() as stack:
            before = server.state().bytes_streamed
            for _ in range(20):
                idle = await stack.enter_async_context(c.session())
                unread = await stack.enter_async_context(
                    idle.generate(
                        HELLO,
                        sampling=SamplingParams(max_tokens=10**7),
                        readout_ranges=[(0, 10**7)],
                    )
                )
                await unread.__anext__()
            stalled = await wait_until_streaming_stalls(server)
            assert stalled - before > 20 << 19  # every idle stream's window is full
            with trio.fail_after(10):
                async with c.session() as busy:
                    async with busy.generate(HELLO, sampling=SamplingParams(max_tokens=5)) as ev:
                        assert len([e async for e in ev if isinstance(e, Token)]) == 5
                    assert (await busy.prefill(HELLO)).total_tokens == len(HELLO) + 5 + len(HELLO)


async def _stream_forty(c: poc_api.ApiClient) -> None:
    for i in range(40):
        async with c.session() as s:
            sampling = SamplingParams(max_tokens=600)
            async with s.generate(HELLO, sampling=sampling, readout_ranges=[(0, 10**6)]) as ev:
                async for e in ev:
                    if i % 4 == 0 and isinstance(e, Token) and e.position > 100:
                        break  # abandoned with data in flight


@pytest.mark.heavy
async def test_connection_window_accounting_stays_exact(wide_server: ReferenceServer) -> None:
    server = wide_server
    # The connection window is returned on receipt and stream windows on reading;
    # after far more than a connection window of data (streams read to the end and
    # streams abandoned mid-flight) it must be neither inflated nor shrunk.
    from poc_api import _transport

    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        before = server.state().bytes_streamed
        with trio.fail_after(60):
            await _stream_forty(c)
        assert server.state().bytes_streamed - before > 2 * _transport._CONNECTION_WINDOW
        assert c._transport is not None and c._transport._channel is not None
        h2_conn = c._transport._channel._protocol.connection._connection  # type: ignore[union-attr]
        window = h2_conn.inbound_flow_control_window
        assert _transport._CONNECTION_WINDOW // 2 <= window <= _transport._CONNECTION_WINDOW


async def test_the_client_takes_data_frames_up_to_a_mebibyte(server: ReferenceServer) -> None:
    # HTTP/2's default 16 KiB frames cost h2 and grpclib a frame's handling per ~15
    # readout events; the server may send frames up to 1 MiB, and they are read.
    from poc_api import _transport

    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        with trio.fail_after(30):
            async with c.session() as s:
                sampling = SamplingParams(max_tokens=200)
                async with s.generate(HELLO, sampling=sampling, readout_ranges=[(0, 10**6)]) as ev:
                    tokens = [e async for e in ev if isinstance(e, Token)]
        assert len(tokens) > 200 and all(t.readout is not None for t in tokens)
        assert c._transport is not None and c._transport._channel is not None
        h2_conn = c._transport._channel._protocol.connection._connection  # type: ignore[union-attr]
        assert h2_conn.local_settings.max_frame_size == _transport._MAX_FRAME_SIZE == 1 << 20


async def test_tasks_started_before_the_client_opened_can_use_it(
    server: ReferenceServer,
) -> None:
    # Agents often live in a nursery older than the client; their context never saw
    # the client's asyncio loop.
    send, receive = trio.open_memory_channel[poc_api.ApiClient](1)
    results: list[int] = []
    finished = trio.Event()

    async def agent() -> None:
        c = await receive.receive()
        async with c.session() as s:
            async with s.generate(HELLO, sampling=SamplingParams(max_tokens=3)) as ev:
                results.extend([e.id async for e in ev if isinstance(e, Token)])
        finished.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(agent)
            async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
                await send.send(c)
                await finished.wait()
    assert len(results) == 3


async def test_break_with_done_already_buffered_keeps_the_session(
    client: poc_api.ApiClient,
) -> None:
    with trio.fail_after(10):
        async with client.session() as s:
            async with s.generate(HELLO, sampling=SamplingParams(max_tokens=3)) as ev:
                await trio.sleep(0.2)  # everything, Done included, is buffered by now
                async for _ in ev:
                    break
            assert not s.lost
            assert s.committed_len == len(HELLO) + 3
            await s.prefill([1])  # still usable


async def test_a_closed_channel_is_never_connected_again(server: ReferenceServer) -> None:
    # grpclib reconnects a closed channel for a call that comes to it late (one that
    # took the channel just before the client closed), and a connect in flight when
    # the channel closes completes all the same: connections nothing would close.
    import asyncio

    from grpclib.exceptions import StreamTerminatedError

    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        async with c.session():
            pass
        transport, bridge = c._transport, c._bridge
        assert transport is not None and bridge is not None

        async def late_call() -> None:
            channel = transport._channel
            assert channel is not None and channel._protocol is not None
            channel.close()
            with pytest.raises(StreamTerminatedError, match="closed before this call was sent"):
                await channel.__connect__()
            assert channel._protocol is None

        async def closed_while_connecting() -> None:
            channel = transport._new_channel()
            connecting = asyncio.ensure_future(channel.__connect__())
            await asyncio.sleep(0)  # in the middle of the TCP connect
            channel.close()
            with pytest.raises(StreamTerminatedError, match="closed before this call was sent"):
                await connecting
            assert channel._protocol is None

        with trio.fail_after(10):
            await bridge.run(late_call)
            await bridge.run(closed_while_connecting)
            async with c.session() as s:  # a fresh connection serves the next call
                await s.prefill([1, 2])


async def test_a_unary_calls_headers_and_data_leave_in_one_write(
    server: ReferenceServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpclib writes HEADERS and DATA separately; poc_api coalesces what a loop
    iteration wrote into one socket write (one system call here, one read in the
    server)."""
    import asyncio
    import asyncio.selector_events as selector_events

    from hyperframe.frame import Frame

    writes: list[list[str]] = []
    real_write = selector_events._SelectorSocketTransport.write

    grpc_port = int(server.grpc_url.rsplit(":", 1)[1])

    def observe(self: asyncio.WriteTransport, data: bytes) -> None:
        real_write(self, data)  # type: ignore[arg-type]
        if self.get_extra_info("peername")[1] != grpc_port:
            return  # the (embedded) server's own writes
        frames, rest = [], memoryview(bytes(data))
        while len(rest) >= 9:
            frame, length = Frame.parse_frame_header(rest[:9])
            frames.append(type(frame).__name__)
            rest = rest[9 + length :]
        writes.append(frames)

    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        async with c.session():  # the connection is set up
            pass
        monkeypatch.setattr(selector_events._SelectorSocketTransport, "write", observe)
        async with c.session():
            pass
        monkeypatch.undo()
    # OpenSession and CloseSession: one write each, HEADERS and DATA together.
    assert writes == [["HeadersFrame", "DataFrame"]] * 2, writes


async def test_generate_score_and_conversation_make_no_async_generator(
    client: poc_api.ApiClient,
) -> None:
    # trio frees each async generator through a weakref callback, where CPython drops
    # a Ctrl-C (python/cpython#95959), and each costs time: the blocks of a call,
    # from Session.generate down to the bridge, are classes.
    made: list[str] = []
    hooks = sys.get_asyncgen_hooks()

    def firstiter(agen: AsyncGenerator[object, None]) -> None:
        if "poc_api" in agen.ag_code.co_filename:
            made.append(agen.ag_code.co_name)
        if hooks.firstiter is not None:
            hooks.firstiter(agen)

    sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=hooks.finalizer)
    try:
        async with client.session() as s:
            async with s.generate([72, 101], sampling=SamplingParams(max_tokens=4)) as ev:
                async for _ in ev:
                    pass
        await client.score([poc_api.Tokens([72, 101, 108, 108])], [(1, 3)])
        async with client.conversation() as conv:
            for _ in range(2):
                async with conv.stream(
                    [poc_api.Tokens([72, 101])], SamplingParams(max_tokens=3)
                ) as cev:
                    async for _ in cev:
                        pass
    finally:
        sys.set_asyncgen_hooks(*hooks)
    assert made == [], made


async def test_tokens_compare_by_value_so_two_greedy_runs_are_equal(
    client: poc_api.ApiClient,
) -> None:
    # Deterministic decodes are checked by comparing their events; readouts count.
    async def run(**kw: object) -> list[object]:
        async with client.session() as s:
            sampling = SamplingParams(max_tokens=20)
            async with s.generate(HELLO, sampling=sampling, **kw) as ev:  # type: ignore[arg-type]
                return [e async for e in ev]

    with trio.fail_after(10):
        first = await run(readout_ranges=[(0, 10**6)])
        assert first == await run(readout_ranges=[(0, 10**6)])
        assert first != await run()  # the same tokens without readouts
    tokens = [e for e in first if isinstance(e, Token)]
    assert len(set(tokens)) == len(tokens)  # hashable, readouts and all
    turns = []
    for _ in range(2):
        async with client.conversation() as conv:
            async with conv.stream(
                [poc_api.Tokens(HELLO)], SamplingParams(max_tokens=5), readout_shape=(3, 8)
            ) as ev:
                turns.append([e async for e in ev if isinstance(e, poc_api.TokenOut)])
    assert turns[0] == turns[1] and len(turns[0]) == 5
    assert all(t.readout is not None and t.readout.shape == (3, 8) for t in turns[0])


# -- one session, several tasks ------------------------------------------------------


@asynccontextmanager
async def _session_held_by_a_decode(
    tokens: int,
) -> AsyncIterator[tuple[ReferenceServer, poc_api.Session, trio.Event]]:
    """A session on a slow server (20 ms a token) whose ``generate`` of ``tokens``
    runs in a task of its own; the event is set once its first token came."""
    async with ReferenceServer(ServerConfig(token_delay_ms=20, ignore_eos=True)) as srv:
        async with open_client(srv) as client, client.session() as s, trio.open_nursery() as n:
            holding = trio.Event()

            async def decode() -> None:
                async with s.generate(HELLO, sampling=SamplingParams(max_tokens=tokens)) as ev:
                    async for _ in ev:
                        holding.set()  # the server runs it

            n.start_soon(decode)
            await holding.wait()
            yield srv, s, holding


async def test_append_image_waits_for_the_session_and_appends_at_its_new_end(
    png_56x28: bytes,
) -> None:
    # The offset was read before waiting for the session: once the decode had
    # moved the end, the server refused it (OffsetMismatch).
    with trio.fail_after(20):
        async with _session_held_by_a_decode(10) as (_, s, _):
            appended = await s.append_image(png_56x28, "image/png")
            assert appended.total_length == len(HELLO) + 10 + appended.placeholder_count
            assert s.committed_len == appended.total_length and not s.lost


async def test_a_timeout_that_runs_out_waiting_for_the_session_sends_nothing(
    png_56x28: bytes,
) -> None:
    # A call waiting for a session another task's decode holds: its timeout covers
    # the wait, and running out there leaves the session as it was. (Before, the
    # wait was not bounded, the call then timed out on entry, and the session was
    # marked lost for every task although the server never saw the call.)
    with trio.fail_after(20):
        async with _session_held_by_a_decode(100) as (srv, s, _):
            generates = srv.state().rpc_counts.get("Generate", 0)
            t0 = trio.current_time()
            # Each is retriable, as its message says: the server never saw it.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(block_the_run, 0.1, 0.5)  # the timeout wakes late
                with pytest.raises(poc_api.PocApiTimeout, match="nothing was sent") as info:
                    await s.prefill([1, 2], timeout=0.2)
            assert info.value.retriable
            assert "waiting for session" in str(info.value), info.value
            # The bound set, not the time measured as the run woke late.
            assert "timeout after 0.2 s waiting" in str(info.value), info.value
            assert "which another call holds" in str(info.value), info.value
            with pytest.raises(poc_api.PocApiTimeout, match="nothing was sent") as info:
                await s.append_image(png_56x28, "image/png", timeout=0.2)
            assert info.value.retriable
            with pytest.raises(poc_api.PocApiTimeout, match="nothing was sent") as info:
                async with s.generate([1], sampling=SamplingParams(max_tokens=1), timeout=0.2):
                    pass  # pragma: no cover
            assert info.value.retriable
            assert (
                trio.current_time() - t0 < 3
            )  # three waits (one woken late), not the decode's 2 s
            assert not s.lost
            assert srv.state().rpc_counts.get("Generate", 0) == generates
        # The decode's task finished its stream, and the block closed the session.


@pytest.mark.parametrize("call", ["append_image", "prefill", "generate"])
async def test_a_session_handed_over_only_after_the_timeout_sends_nothing(
    server: ReferenceServer, png_56x28: bytes, call: str
) -> None:
    # Another task's call releases the session before this call's deadline, but
    # this task runs only after it (a busy run: the releasing task keeps the CPU).
    # The time ran out waiting for the session: nothing may be sent, as when the
    # wait itself is cut. The call went out instead with no time left (an
    # AppendImage with a timeout of 0), and a race with the loop thread decided
    # whether the server saw it and the session was lost (timeout not retriable).
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        async with c.session() as s:
            await s.prefill(HELLO)
            appends = server.state().rpc_counts.get("AppendImage", 0)
            generates = server.state().rpc_counts.get("Generate", 0)
            holding = trio.Event()

            async def hold() -> None:
                async with s.generate([1], sampling=SamplingParams(max_tokens=2)) as ev:
                    holding.set()
                    await trio.sleep(0.1)
                    async for _ in ev:
                        pass
                time.sleep(0.3)  # noqa: ASYNC251 - the waiter's deadline passes meanwhile

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                await holding.wait()
                with pytest.raises(poc_api.PocApiTimeout, match="nothing was sent") as info:
                    if call == "append_image":
                        await s.append_image(png_56x28, "image/png", timeout=0.2)
                    elif call == "prefill":
                        await s.prefill([1, 2], timeout=0.2)
                    else:
                        async with s.generate(
                            [1], sampling=SamplingParams(max_tokens=1), timeout=0.2
                        ) as ev:
                            async for _ in ev:
                                pass  # pragma: no cover
            assert info.value.retriable and not s.lost, info.value
            assert server.state().rpc_counts.get("AppendImage", 0) == appends
            assert server.state().rpc_counts.get("Generate", 0) == generates + 1  # hold's
            await s.prefill([3])
            assert s.committed_len == len(HELLO) + 1 + 2 + 1


@pytest.mark.parametrize("timeout", [0, 1e-9])
async def test_a_timeout_that_runs_out_before_sending_says_so_not_a_wait(
    server: ReferenceServer, timeout: float
) -> None:
    # No other task held the session: "waiting for session" sent users looking for
    # a concurrency bug that was not there.
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        async with c.session() as s:
            with pytest.raises(poc_api.PocApiTimeout) as info:
                await s.prefill([1, 2], timeout=timeout)
            message = str(info.value)
            assert info.value.retriable and not s.lost
            assert "before its request was sent" in message, message
            assert "waiting for" not in message and "nothing was sent" in message, message
            await s.prefill([1, 2])
            assert s.committed_len == 2


async def test_a_first_token_timeout_of_0_sends_nothing_as_a_timeout_of_0(
    server: ReferenceServer,
) -> None:
    # timeout=0 raises a retriable PocApiTimeout before sending; first_token_timeout=0
    # started the Generate and timed out at its first read: a race with the loop
    # thread then decided whether the request had gone out (session lost, not
    # retriable) or not, for a bound no answer could meet.
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        async with c.session() as s:
            generates = server.state().rpc_counts.get("Generate", 0)
            with pytest.raises(poc_api.PocApiTimeout) as info:
                async with s.generate(
                    [1, 2], sampling=SamplingParams(max_tokens=3), first_token_timeout=0
                ) as events:
                    async for _ in events:
                        pass
            message = str(info.value)
            assert info.value.retriable and not s.lost, message
            assert server.state().rpc_counts.get("Generate", 0) == generates
            assert "first-token" in message and "nothing was sent" in message, message
            await s.prefill([1, 2])
            assert s.committed_len == 2


async def test_a_second_task_reading_a_stream_gets_busy_resource_error() -> None:
    # As trio's own streams. It used to take the first reader's wake-up and
    # leave one of them waiting forever.
    with trio.fail_after(20):
        async with ReferenceServer(ServerConfig(token_delay_ms=10, ignore_eos=True)) as srv:
            async with open_client(srv) as client, client.session() as s:
                async with s.generate(HELLO, sampling=SamplingParams(max_tokens=20)) as ev:
                    got = await read_beside_a_second_reader(ev)
                assert isinstance(got[-1], poc_api.Done) and len(got) == 20 + 1


def test_a_timeout_too_large_for_a_float_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="too large"):  # was OverflowError
        poc_api._types.check_timeout("timeout", 10**400)
    # A negative one is negative first (said "too large" since ed06272).
    with pytest.raises(ValueError, match="non-negative"):
        poc_api._types.check_timeout("timeout", -(10**400))


async def test_a_slow_consumer_of_buffered_events_lets_other_tasks_run(
    client: poc_api.ApiClient,
) -> None:
    # Iterating events already buffered took no trip through trio's scheduler:
    # a consumer slower than the server never waited, so no other task ran (and
    # no deadline fired) until the stream ended, seconds later. Now one trip at
    # least every millisecond.
    with trio.fail_after(20):
        async with client.session() as s, heartbeat() as ticks:
            async with s.generate(HELLO, sampling=SamplingParams(max_tokens=2000)) as ev:
                await ev.__anext__()
                while not ev._rx._buf.finished:  # noqa: ASYNC110 - every event is buffered
                    await trio.sleep(0.01)
                before = ticks()
                busy = await consume_busily(ev, 0.0002)  # some work per token
            during = ticks() - before
    assert busy > 0.3  # 2000 tokens at 0.2 ms: ~80 heartbeats were due
    assert during >= 10, (during, busy)


async def test_api_client_chat_refuses_an_unknown_keyword_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    before = server.state().http_requests.get("/v1/chat/completions", 0)
    with trio.fail_after(10):
        with pytest.raises(TypeError, match=r"'max_new_tokens' \(did you mean 'max_tokens'\?\)"):
            await client.chat(messages, max_new_tokens=2)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match=r"'top_k'.*extra_body=\{'top_k': \.\.\.\}"):
            async with client.chat_stream(messages, top_k=4):  # type: ignore[call-arg]
                pass
        # OpenAI's stream=True is a call of its own here (extra_body refuses it).
        with pytest.raises(TypeError, match=r"takes no 'stream'; use chat_stream\(\)"):
            await client.chat(messages, stream=True)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match=r"^model must be a str"):
            await client.chat(messages, model=5)  # type: ignore[arg-type]
        # The escape hatch still sends a field as it is.
        done = await client.chat(messages, max_tokens=2, extra_body={"top_k": 4})
    assert done.usage is not None and done.usage.completion_tokens == 2
    assert server.state().http_requests.get("/v1/chat/completions", 0) == before + 1


async def test_a_connection_out_of_stream_ids_is_retired_for_a_new_one(
    server: ReferenceServer,
) -> None:
    # HTTP/2 gives a client 2**30 streams per connection (~17 days of 733 calls/s).
    # At the end every call failed with ProtocolViolation("Exhausted allowed stream
    # IDs") and the client never reconnected. Near the end the connection is now
    # retired as after a graceful GOAWAY: what runs on it finishes, new calls go to
    # a new connection.
    async with poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url) as c:
        with trio.fail_after(20):
            async with c.session() as s:
                await s.prefill([1, 2, 3])
                before = server.state().connections_total
                h2_conn = c._transport._channel._protocol._h2  # type: ignore[union-attr]

                async def wear_out() -> None:  # (the client's own loop owns h2's state)
                    assert h2_conn is not None
                    h2_conn.highest_outbound_stream_id = h2_conn.HIGHEST_ALLOWED_STREAM_ID - 6

                await c._bridge.run(wear_out)
                for _ in range(5):
                    async with c.session() as other:
                        await other.prefill([1, 2, 3])
                await s.prefill([4])  # the session opened on the old connection goes on
            assert server.state().connections_total == before + 1


async def test_callers_sharing_one_connection_attempt_each_get_their_own_error() -> None:
    # One exception object raised in every waiting task: one traceback, one
    # context, one list of notes for all of them.
    url = f"http://127.0.0.1:{refusing_port()}"
    errors: list[BaseException] = []
    async with poc_api.ApiClient("http://127.0.0.1:9/v1", grpc_url=url) as client:

        async def one() -> None:
            with pytest.raises(poc_api.ServerUnavailable) as info:
                async with client.session():
                    pass
            errors.append(info.value)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
    assert len({id(e) for e in errors}) == 3
    assert len({str(e) for e in errors}) == 1  # the same failure


async def test_callers_sharing_one_manifest_fetch_each_get_their_own_error() -> None:
    # A caller waiting from inside its own except block made its exception the
    # __context__ of the other caller's error (the same object).
    async def slow_bad_manifest(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await trio.sleep(0.2)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: 6\r\n\r\n[1, 2]"
        )

    got: dict[str, BaseException] = {}
    async with http_server(slow_bad_manifest) as url, poc_api.ApiClient(url, model="m") as client:

        async def first() -> None:
            with pytest.raises(poc_api.PocApiError) as info:
                await client.readout_manifest()
            got["first"] = info.value

        async def second() -> None:
            await trio.sleep(0.05)
            try:
                raise KeyError("the second caller's own business")
            except KeyError:
                with pytest.raises(poc_api.PocApiError) as info:
                    await client.readout_manifest()
                got["second"] = info.value

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)
    assert got["first"] is not got["second"]
    assert not isinstance(got["first"].__context__, KeyError)
    assert type(got["first"]) is type(got["second"]) and str(got["first"]) == str(got["second"])


async def test_a_block_iterated_or_awaited_without_async_with_says_to_use_it(
    client: poc_api.ApiClient,
) -> None:
    # `async for ev in client.chat_stream(...)` (no `async with`) said "'async for'
    # requires an object with __aiter__ method, got _Protected": a private name, and
    # no word of the block it should have been.
    msgs = [{"role": "user", "content": "hi"}]
    sampling = poc_api.SamplingParams(max_tokens=1)
    with pytest.raises(TypeError, match=r"async with client\.chat_stream\(\.\.\.\) as"):
        async for _ in client.chat_stream(msgs, max_tokens=1):  # type: ignore[attr-defined]
            pass
    with pytest.raises(TypeError, match=r"async with client\.chat_stream\(\.\.\.\) as"):
        await client.chat_stream(msgs, max_tokens=1)  # type: ignore[misc]
    async with client.session() as s:
        with pytest.raises(TypeError, match=r"async with session\.generate\(\.\.\.\) as"):
            async for _ in s.generate([1], sampling=sampling):  # type: ignore[attr-defined]
                pass
        with pytest.raises(TypeError, match=r"async with session\.generate\(\.\.\.\) as"):
            await s.generate([1], sampling=sampling)  # type: ignore[misc]
        assert not s.lost
    async with client.conversation() as conv:
        with pytest.raises(TypeError, match=r"async with conversation\.stream\(\.\.\.\) as"):
            async for _ in conv.stream([poc_api.Tokens([1])], sampling):  # type: ignore[attr-defined]
                pass
    with pytest.raises(TypeError, match=r"async with client\.session\(\) as"):
        await client.session()  # type: ignore[misc]
    async with client.session() as s:  # nothing was left half open
        await s.prefill([1])


@pytest.mark.parametrize("value", ["127.0.0.1:8001", "grpc://127.0.0.1:8001"])
def test_a_bad_poc_grpc_url_is_named_as_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # "gRPC URL must look like http://host:port, got '127.0.0.1:8001'" came from
    # ApiClient(base_url) alone: the caller gave no gRPC URL, and nothing said that
    # one was read from the environment.
    monkeypatch.setenv("POC_GRPC_URL", value)
    with pytest.raises(ValueError, match=r"^POC_GRPC_URL .*must look like http://host:port"):
        poc_api.ApiClient("http://127.0.0.1:8000/v1")


async def test_a_block_used_as_its_object_says_async_with(
    client: poc_api.ApiClient,
) -> None:
    # `s = client.session(); await s.prefill(...)` said "'open_session' object has
    # no attribute 'prefill'": a private name, and no word of `async with`.
    # (A plain `with` keeps Python's own error: a block is no context manager to
    # code that dispatches on __enter__.)
    block = client.session()
    assert not isinstance(block, contextlib.AbstractContextManager)
    assert not hasattr(block, "prefill")
    with pytest.raises(AttributeError, match=r"async with client\.session\(\) as"):
        await client.session().prefill([1])  # type: ignore[attr-defined]
    async with client.session() as s:  # nothing was left half open
        await s.prefill([1])


async def test_a_derived_grpc_url_that_worked_is_not_blamed_when_its_server_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Once base_url's port + 1 had answered, a server that went away was reported
    # as "(base_url's port + 1: pass grpc_url if the gRPC server is elsewhere):
    # cannot connect": the URL was right, and passing grpc_url would not help.
    monkeypatch.delenv("POC_GRPC_URL", raising=False)
    async with reference_server() as server:
        async with poc_api.ApiClient(server.base_url) as c:
            await c.score([Tokens([1, 2])], [(1, 2)])
            await kill_for_good(server)
            with trio.fail_after(10), pytest.raises(poc_api.ServerUnavailable) as info:
                # (Sent before the loop saw the connection go, a call's error is
                # "connection lost": the next one connects again.)
                with contextlib.suppress(poc_api.ServerUnavailable):
                    await c.score([Tokens([1, 2])], [(1, 2)])
                await c.score([Tokens([1, 2])], [(1, 2)])
    assert "cannot connect" in str(info.value), info.value
    assert "pass grpc_url" not in str(info.value), info.value


async def test_a_call_may_name_another_model_on_the_shared_connection(
    client: poc_api.ApiClient, server: ReferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The seed's ApiClient is Clone with a public `model`: an agent's clone could
    # name another model and still share the one connection. Here the model was
    # the client's for every session, conversation and score (another model:
    # another client, another connection).
    caplog.set_level(logging.DEBUG, logger="poc_api.server.grpc")
    ids = tokenize("Hello there")
    with trio.fail_after(20):
        await client.score([Tokens(ids)], [(1, 2)])  # (connected)
        caplog.clear()
        before = server.state().connections_total
        async with client.session(model="other-a"):
            pass
        async with client.conversation(model="other-b") as conv:
            async with conv.stream([Tokens(ids)], SamplingParams(max_tokens=1)) as events:
                _ = [e async for e in events]
        await client.score([Tokens(ids)], [(1, len(ids))], model="other-c")
        await client.score_many([([Tokens(ids)], [(1, 2)])], model="other-d")
        await client.score_continuations([Tokens(ids)], [[1]], model="other-e")
    opened = opened_models(caplog.records)
    assert opened == ["other-a", "other-b", "other-c", "other-d", "other-e"], opened
    assert server.state().connections_total == before  # (the one connection)
    with pytest.raises(TypeError, match="model must be a str"):
        client.session(model=3)  # type: ignore[arg-type]

    # train() too (its body names the model).
    bodies: list[bytes] = []

    async def train_server(stream: trio.SocketStream) -> None:
        _, body = await read_request(stream)
        bodies.append(body)
        answer = b'{"accepted": 1, "job_id": "j"}'
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(answer)}\r\n\r\n".encode()
            + answer
        )

    async with http_server(train_server) as url:
        async with poc_api.ApiClient(url, model="mine", grpc_url=server.grpc_url) as c:
            await c.train([poc_api.TrainSample([1], [(0, 1)])], model="other-f")
            await c.train([poc_api.TrainSample([1], [(0, 1)])])
    assert [json.loads(b)["model"] for b in bodies] == ["other-f", "mine"]


async def test_a_derived_grpc_url_on_a_port_that_is_no_grpc_one_says_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # base_url's port + 1 is some HTTP/1.1 service: the likeliest wrong derived URL.
    async def http11(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    monkeypatch.delenv("POC_GRPC_URL", raising=False)
    async with http_server(http11) as url:
        port = int(url.rsplit(":", 1)[1].removesuffix("/v1"))
        with trio.fail_after(10):
            async with poc_api.ApiClient(f"http://127.0.0.1:{port - 1}/v1") as c:
                with pytest.raises(poc_api.ServerUnavailable) as first:
                    await c.score([poc_api.Tokens([1, 2])], [(1, 2)])
                with pytest.raises(poc_api.ServerUnavailable) as again:  # the backoff's
                    await c.score([poc_api.Tokens([1, 2])], [(1, 2)])
    assert "(base_url's port + 1: pass grpc_url" in str(first.value), first.value
    assert "(base_url's port + 1: pass grpc_url" in str(again.value), again.value
    assert "could not be reached" in str(again.value), again.value


async def test_a_model_no_request_can_carry_is_refused_before_sending(
    client: poc_api.ApiClient, server: ReferenceServer
) -> None:
    ids = tokenize("Hello there")
    bad = "a\ud800"
    with pytest.raises(ValueError, match="lone surrogate"):
        client.session(model=bad)
    with pytest.raises(ValueError, match="lone surrogate"):
        client.conversation(model=bad)
    with pytest.raises(ValueError, match="lone surrogate"):
        await client.score([Tokens(ids)], [(1, 2)], model=bad)
    with pytest.raises(ValueError, match="lone surrogate"):
        await client.score_many([([Tokens(ids)], [(1, 2)])], model=bad, share_prefix=True)
    with pytest.raises(ValueError, match="lone surrogate"):
        await client.score_continuations([Tokens(ids)], [[1]], model=bad)
    with pytest.raises(ValueError, match="lone surrogate"):
        await client.train([poc_api.TrainSample([1], [(0, 1)])], model=bad)
    with pytest.raises(ValueError, match="lone surrogate"):  # as chat() already did
        await client.chat([{"role": "user", "content": "x"}], model=bad)
    with pytest.raises(ValueError, match="lone surrogate"):
        poc_api.ApiClient(server.base_url, grpc_url=server.grpc_url, model=bad)


async def test_pool_and_share_prefix_name_the_calls_model(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="poc_api.server.grpc")
    ids = tokenize("Hello there, how are you")
    with trio.fail_after(30):
        async with reference_server() as a, reference_server() as b:
            async with poc_api.ApiClient(
                a.base_url, grpc_url=[a.grpc_url, b.grpc_url], model="mine"
            ) as c:
                prompts = [([Tokens(ids[:k])], [(1, 2)]) for k in (3, 4, 5)]
                await c.score_many(prompts, share_prefix=True, model="other-d")
                await c.score_many(prompts, model="other-e")
                for _ in range(3):
                    async with c.session(model="other-a"):
                        pass
                async with c.conversation(model="other-b") as conv:
                    async with conv.stream([Tokens(ids)], SamplingParams(max_tokens=1)) as ev:
                        _ = [e async for e in ev]
    opened = opened_models(caplog.records)
    assert set(opened) == {"other-d", "other-e", "other-a", "other-b"}, opened
    assert "mine" not in opened


async def test_chat_and_session_read_an_empty_model_alike(
    server: ReferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A call's model="" names the server's default: session() sends "", chat()
    # names the server's only model (GET /models), as ApiClient(model="") does;
    # neither names the client's "mine".
    caplog.set_level(logging.DEBUG, logger="poc_api.server.grpc")
    bodies: list[bytes] = []

    async def chat_server(stream: trio.SocketStream) -> None:
        while True:
            head, body = await read_request(stream)
            if not head:
                return
            kind = b"application/json"
            if head.startswith(b"GET"):
                answer = b'{"object":"list","data":[{"id":"served","object":"model"}]}'
            elif json.loads(body).get("stream"):  # (httpx spaces JSON or not, by version)
                bodies.append(body)
                kind = b"text/event-stream"
                answer = (
                    b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"},'
                    b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
                )
            else:
                bodies.append(body)
                answer = (
                    b'{"id":"x","choices":[{"index":0,"message":{"role":"assistant",'
                    b'"content":"hi"},"finish_reason":"stop"}]}'
                )
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: "
                + kind
                + b"\r\n"
                + f"content-length: {len(answer)}\r\n\r\n".encode()
                + answer
            )

    async with http_server(chat_server) as url:
        async with poc_api.ApiClient(url, model="mine", grpc_url=server.grpc_url) as c:
            await c.chat([{"role": "user", "content": "x"}], model="")
            async with c.chat_stream([{"role": "user", "content": "x"}], model="") as s:
                _ = [e async for e in s]
            async with c.session(model=""):
                pass
    opened = opened_models(caplog.records)
    assert opened == []  # "": the server's default
    assert json.loads(bodies[0])["model"] == "served"
    assert json.loads(bodies[1])["model"] == "served"
