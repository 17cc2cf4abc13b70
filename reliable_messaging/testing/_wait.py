"""Waiting for a condition in a test, always under a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_for"]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; after ``timeout`` seconds fail with ``AssertionError`` naming ``what``.

    An ``AssertionError`` (not a timeout exception) so that pytest reports the condition that never
    came true as the test's failure.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
