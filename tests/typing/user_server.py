"""A user's program configuring the reference server (``poc_api.server``).

Checked by ``mypy --strict tests/typing`` (nox's typecheck session), never run.
"""

from __future__ import annotations

from typing import assert_type

from poc_api.server import ReferenceServer, ServerConfig


def concepts_as_any_sequence() -> None:
    # ``concepts`` takes any iterable of names and stores a tuple.
    from_list = ServerConfig(concepts=["vowel", "digit"])
    from_tuple = ServerConfig(concepts=("vowel", "digit"), n_layers=2)
    assert_type(from_list.concepts, tuple[str, ...])
    assert_type(from_tuple.concepts, tuple[str, ...])
    ServerConfig(concepts=[1, 2])  # type: ignore[list-item]
    ReferenceServer(from_list)
