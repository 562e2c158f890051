"""``python -m poc_api``: the ``poc-api`` command (where its script is not on PATH)."""

from __future__ import annotations

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
