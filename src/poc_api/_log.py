"""Logging setup: the ``poc_api`` logger tree, and ``POC_DEBUG=1``."""

from __future__ import annotations

import logging
import os

__all__ = ["configure_debug_from_env"]


class _DebugHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, for the records no other handler on their way up will show.

    Added at import, before an application configures logging: one that calls
    ``logging.basicConfig()`` afterwards would otherwise get every poc_api line
    twice. Checked at emit time, so the application's handlers (and format) take
    over whenever they are there, and its levels still let the debug lines through.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if not self._shown_elsewhere(record):
            super().emit(record)

    def _shown_elsewhere(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            for handler in logger.handlers:
                if handler is not self and record.levelno >= handler.level:
                    return True
            if not logger.propagate:
                return False
            logger = logger.parent
        return False


def configure_debug_from_env() -> None:
    """With ``POC_DEBUG=1``, send ``poc_api`` debug output to stderr.

    Only when the application has not configured a handler of its own on the
    ``poc_api`` logger; and a record that one of the application's handlers shows
    (on ``poc_api``'s loggers or the root, set up before or after the import) is
    not printed again by this one.
    """
    if os.environ.get("POC_DEBUG", "") not in ("1", "true", "yes"):
        return
    logger = logging.getLogger("poc_api")
    logger.setLevel(logging.DEBUG)
    if not logger.handlers:
        handler = _DebugHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
