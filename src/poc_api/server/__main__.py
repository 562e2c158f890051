"""``python -m poc_api.server``: run the reference server until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .._client import check_api_key
from ._app import run_forever
from ._state import ServerConfig

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Build a :class:`ServerConfig` from command-line arguments."""
    p = _parser()
    a = p.parse_args(argv)
    try:
        return _config(a)
    except (TypeError, ValueError) as exc:  # a port out of range, a NaN delay, ...
        p.error(str(exc))


def _parser() -> argparse.ArgumentParser:
    # The options of `poc-api serve` (tests/server/test_cli.py holds them together).
    d = ServerConfig()
    p = argparse.ArgumentParser(
        prog="python -m poc_api.server",
        description="Deterministic salience reference server: HTTP on PORT, gRPC on PORT+1.",
        # Defaults shown, as `poc-api serve --help` shows them.
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default=d.host, help="interface to listen on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0 = pick a free pair)")
    p.add_argument(
        "--api-key",
        default=None,  # then POC_API_KEY (read in _config: --help must not print the key)
        help="require this bearer token [env POC_API_KEY]",
    )
    p.add_argument("--no-readout", action="store_true", help="disable readout (manifest 404)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampler seed")
    p.add_argument(
        "--max-sessions", type=int, default=d.max_sessions, help="most sessions open at once"
    )
    p.add_argument(
        "--idle-timeout", type=float, default=d.idle_timeout, help="seconds (0 = never evict)"
    )
    p.add_argument(
        "--max-context", type=int, default=d.max_context, help="context window, in positions"
    )
    p.add_argument(
        "--max-message-size",
        type=int,
        default=d.max_message_size,
        help="largest gRPC message taken or sent, in bytes",
    )
    p.add_argument("--ignore-eos", action="store_true", help="never stop at EOS")
    p.add_argument("--n-layers", type=int, default=d.n_layers, help="layers of each readout")
    p.add_argument("--model-name", default=d.model_name, help="the model's name")
    p.add_argument(
        "--prefill-delay-us",
        type=float,
        default=d.prefill_delay_us,
        help="simulated GPU time per prefilled position, in microseconds (0 = off)",
    )
    p.add_argument(
        "--token-delay-ms",
        type=float,
        default=d.token_delay_ms,
        help="simulated GPU time per decoded token, in milliseconds (0 = off)",
    )
    p.add_argument(
        "--prefill-slots",
        type=int,
        default=d.prefill_slots,
        help="at most this many simulated prefills at once (0 = unlimited)",
    )
    return p


def _config(a: argparse.Namespace) -> ServerConfig:
    # An explicit --api-key "" means no auth, whatever POC_API_KEY says (as serve).
    api_key = (a.api_key if a.api_key is not None else os.environ.get("POC_API_KEY")) or None
    # As `poc-api serve` refuses it: a key no client's header can carry.
    check_api_key(api_key or "")
    return ServerConfig(
        host=a.host,
        port=a.port,
        api_key=api_key,
        readout=not a.no_readout,
        seed=a.seed,
        max_sessions=a.max_sessions,
        idle_timeout=a.idle_timeout,
        max_context=a.max_context,
        max_message_size=a.max_message_size,
        ignore_eos=a.ignore_eos,
        n_layers=a.n_layers,
        model_name=a.model_name,
        prefill_delay_us=a.prefill_delay_us,
        token_delay_ms=a.token_delay_ms,
        prefill_slots=a.prefill_slots,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse arguments and serve until interrupted."""
    if os.environ.get("POC_DEBUG") == "1":
        logging.basicConfig(level=logging.DEBUG)
    config = parse_args(argv)
    try:
        run_forever(config)
    except OSError as exc:  # a busy port, a host not ours: one line, as poc-api serve says it
        sys.exit(f"error: {exc.strerror or exc}")  # (it names the host and port)


if __name__ == "__main__":
    main()
