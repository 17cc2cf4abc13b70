"""Logging helpers: repeated connection errors once per interval, not twice a second.

A broker that is down makes librdkafka report a failed connection on every reconnect attempt
(backoff 0.1-10 s) and pika retry on its own schedule: hundreds of identical lines an hour that
bury everything else. :class:`RepeatFilter` lets the first of a kind through, drops the repeats for
``interval`` seconds, and then notes how many it dropped.

Why by hand: the standard library has no rate limiting, and the log-dedup packages on PyPI are
unmaintained or drag a logging framework along; this is twenty lines.
"""

from __future__ import annotations

import logging
import re
import threading
import time

__all__ = ["RepeatFilter", "limit_repeats", "redact"]

REPEAT_INTERVAL = 30.0
"""Seconds during which a message of the same kind is logged once."""

_VARYING = re.compile(r"\d+")


class RepeatFilter(logging.Filter):
    """Drops records whose (logger, level, message with digits masked) was logged within ``interval``."""

    def __init__(self, interval: float = REPEAT_INTERVAL) -> None:
        super().__init__()
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        kind = (record.name, record.levelno, _VARYING.sub("#", text)[:200])
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last[0] < self.interval:
                self._last[kind] = (last[0], last[1] + 1)
                return False
            self._last[kind] = (now, 0)
            if len(self._last) > 1000:  # a bound, whatever the messages
                self._last.clear()
        if last is not None and last[1]:
            record.msg = f"{text} ({last[1]} similar messages suppressed in the last {self.interval:g}s)"
            record.args = None
        return True


_installed: dict[str, RepeatFilter] = {}
_install_lock = threading.Lock()


def forget_repeats() -> None:
    """Forget what every :class:`RepeatFilter` saw (tests that count log lines start from here)."""
    with _install_lock:
        filters = list(_installed.values())
    for repeat_filter in filters:
        with repeat_filter._lock:
            repeat_filter._last.clear()


def limit_repeats(logger: logging.Logger) -> logging.Logger:
    """Add one :class:`RepeatFilter` to ``logger`` (idempotent); returns the logger."""
    with _install_lock:
        if logger.name not in _installed:
            _installed[logger.name] = RepeatFilter()
            logger.addFilter(_installed[logger.name])
    return logger


def redact(url: str) -> str:
    """``url`` without its password (``scheme://user:***@host...``), for errors, reprs and logs.

    Works on text that is not a valid URL too: whatever sits between ``://`` and the last ``@`` is
    taken for credentials (a password may hold ``/`` or ``@``).
    """
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")  # the last "@": a password may hold "/" or "@"
    if not sep or not at:
        return url
    user = credentials.split(":", 1)[0].split("/", 1)[0]
    hidden = f"{user}:***" if user else "***"
    return f"{scheme}://{hidden}@{location}"
