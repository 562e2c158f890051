"""Logging setup: the ``poc_api`` logger tree, and ``POC_DEBUG=1``."""

from __future__ import annotations

import logging
import os

__all__ = ["configure_debug_from_env"]


class _DebugHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, for the records no other handler on their way up will show.

    Added at import, before an application configures logging: one that calls
    ``logging.basicConfig()`` afterwards would otherwise get every poc_api line
    twice. Checked for each record, so the application's handlers (and format) take
    over whenever they are there, and its levels still let the debug lines through.
    """

    # A filter, not in emit(): emit runs under this handler's lock, and the check
    # takes logging's module lock (getLogger), which dictConfig holds while it
    # takes every handler's lock: a deadlock between a logging thread and one
    # configuring logging. Handler.handle runs filters before it takes the lock.
    def filter(self, record: logging.LogRecord) -> bool:
        if self._shown_elsewhere(record):
            return False
        return bool(super().filter(record))

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
