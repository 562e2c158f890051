"""Simulated GPU time: ``prefill_delay_us`` per position taken in, ``token_delay_ms`` per token."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from poc_api.server import ServerConfig
from poc_api.server.__main__ import parse_args

from .conftest import ServerFactory, SyncSalience
from .test_images import png


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_delays_are_off_by_default_and_validated() -> None:
    cfg = ServerConfig()
    assert cfg.prefill_delay_us == 0 and cfg.token_delay_ms == 0
    with pytest.raises(ValueError):
        ServerConfig(prefill_delay_us=-1)
    with pytest.raises(ValueError):
        ServerConfig(token_delay_ms=float("inf"))
    with pytest.raises(TypeError):
        ServerConfig(prefill_delay_us="5")  # type: ignore[arg-type]


def test_module_cli_flags_set_the_delays() -> None:
    cfg = parse_args(["--prefill-delay-us", "12.5", "--token-delay-ms", "3"])
    assert (cfg.prefill_delay_us, cfg.token_delay_ms) == (12.5, 3.0)
    assert parse_args([]).prefill_delay_us == 0


def test_prefill_delay_is_per_appended_position(
    make_server: ServerFactory, connect: Callable[..., SyncSalience]
) -> None:
    # 5,000 µs per position: 200 positions take >= 1 s; a rewind to 150 and 10 new
    # positions only pay for those 10 (0.05 s; paying for all 160 would be 0.8 s:
    # the bound between has room for a loaded 2-core CI, 0.15 s against 0.16 had not).
    c = connect(make_server(prefill_delay_us=5000))
    sid = c.open()
    assert timed(lambda: c.generate(sid, append_tokens=[65] * 200)) >= 1.0
    short = timed(lambda: c.generate(sid, append_tokens=[66] * 10, offset=150, truncating=True))
    assert 0.05 <= short < 0.5
    # An image pays for its placeholder positions (56x56: 4 positions).
    img = png(56, 56)
    assert timed(lambda: c.append_image(sid, img, "image/png", offset=160)) >= 0.02


def test_token_delay_is_per_decoded_token(
    make_server: ServerFactory, connect: Callable[..., SyncSalience]
) -> None:
    c = connect(make_server(token_delay_ms=20, ignore_eos=True))
    sid = c.open()
    elapsed = timed(lambda: c.generate(sid, append_tokens=[65], max_tokens=10))
    assert elapsed >= 0.2
    # A prefill-only call decodes nothing and pays nothing.
    assert timed(lambda: c.generate(sid, append_tokens=[66], offset=11, max_tokens=0)) < 0.1


@pytest.mark.parametrize("stream", [False, True])
def test_token_delay_applies_to_chat_completions_too(
    make_server: ServerFactory, stream: bool
) -> None:
    # A test of a slow chat stream (a client closed or cancelled mid-stream) needs a
    # server that decodes at a given pace, as Generate does.
    srv = make_server(token_delay_ms=20, ignore_eos=True)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    with httpx.Client(base_url=srv.base_url, timeout=10) as http:
        t0 = time.perf_counter()
        if not stream:
            r = http.post("/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 10
            assert time.perf_counter() - t0 >= 0.2
            return
        arrivals = []
        with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter() - t0)
        # Paced: the deltas arrive as they are decoded, not all at the end.
        assert arrivals[-1] >= 0.2
        assert arrivals[-1] - arrivals[1] >= 0.1, arrivals


@pytest.mark.parametrize("field", ["idle_timeout", "prefill_delay_us", "token_delay_ms"])
def test_an_int_past_floats_range_is_refused_as_inf_is(field: str) -> None:
    # 10**400 < math.inf is True, so it passed the check, and every OpenSession
    # then failed (UNKNOWN "Internal Server Error": OverflowError in the eviction).
    with pytest.raises(ValueError, match=field):
        ServerConfig(**{field: 10**400})  # type: ignore[arg-type]
