"""Logging setup: the ``poc_api`` logger tree, and ``POC_DEBUG=1``."""

from __future__ import annotations

import logging
import os
from typing import Final

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


def control_escapes(keep: str = "\t") -> dict[int, str]:
    """A ``str.translate`` table: control characters (C0, DEL, C1) but those in
    ``keep`` as ``\\x..`` escapes. What a server says (a status message, a session
    id, generated text) goes into log lines and onto terminals: its newlines would
    start lines of its choosing, its ESCs would drive the terminal showing them."""
    controls = (*range(0x20), 0x7F, *range(0x80, 0xA0))
    return {c: f"\\x{c:02x}" for c in controls if chr(c) not in keep}


# In a log line, a newline too, and the Unicode line and paragraph separators.
ONE_LINE_ESCAPES: Final = control_escapes() | {0x2028: "\\u2028", 0x2029: "\\u2029"}


class _OneLine(logging.Filter):
    """Escape control characters in each record's message (on poc_api's loggers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = message.translate(ONE_LINE_ESCAPES)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


def escape_controls_in_logs() -> None:
    """Install the escaping on poc_api's loggers (at import; idempotent)."""
    for name in ("poc_api", "poc_api.grpc", "poc_api.http"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLine) for f in logger.filters):
            logger.addFilter(_OneLine())


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
