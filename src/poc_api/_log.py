"""Logging setup: the ``poc_api`` logger tree, and ``POC_DEBUG=1``."""

from __future__ import annotations

import logging
import os

__all__ = ["configure_debug_from_env"]


def configure_debug_from_env() -> None:
    """With ``POC_DEBUG=1``, send ``poc_api`` debug output to stderr.

    Only when the application has not configured a handler of its own.
    """
    if os.environ.get("POC_DEBUG", "") not in ("1", "true", "yes"):
        return
    logger = logging.getLogger("poc_api")
    logger.setLevel(logging.DEBUG)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
