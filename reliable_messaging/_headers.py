"""The headers the library writes on retried and dead-lettered messages: one set for every broker.

Values are text (UTF-8 on Kafka; AMQP strings on RabbitMQ, except ``x-rm-attempt`` and
``x-rm-deferrals``, written as integers there):

==========================  ==============================================================
``x-rm-origin``             the source the message failed on (Kafka topic, RabbitMQ queue)
``x-rm-origin-partition``   Kafka: its partition there
``x-rm-origin-offset``      Kafka: its offset there
``x-rm-attempt``            on a retry copy: the attempt it is waiting for (2, 3, ...);
                            on a dead letter: the number of attempts made
``x-rm-deferrals``          times it was handed back unrun (a live consumer held its claim,
                            the dedup store was unavailable): each waits longer
``x-rm-first-failure``      when the first attempt failed, milliseconds since the epoch
``x-rm-reason``             why it was retried or dead-lettered
``x-rm-error-type``         the exception class of the last failure (``module.QualName``)
``x-rm-error-message``      its message (at most 4 KiB)
``x-rm-due``                Kafka retry topics: not to be processed before this time (ms since the epoch)
==========================  ==============================================================

The message id travels unchanged: Kafka's ``message-id`` header, the AMQP ``message_id`` property.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ATTEMPT",
    "DEFERRALS",
    "DUE",
    "ERROR_MESSAGE",
    "ERROR_TYPE",
    "FIRST_FAILURE",
    "LIBRARY_HEADERS",
    "ORIGIN",
    "ORIGIN_OFFSET",
    "ORIGIN_PARTITION",
    "REASON",
    "failure_headers",
]

ORIGIN = "x-rm-origin"
ORIGIN_PARTITION = "x-rm-origin-partition"
ORIGIN_OFFSET = "x-rm-origin-offset"
ATTEMPT = "x-rm-attempt"
DEFERRALS = "x-rm-deferrals"
FIRST_FAILURE = "x-rm-first-failure"
REASON = "x-rm-reason"
ERROR_TYPE = "x-rm-error-type"
ERROR_MESSAGE = "x-rm-error-message"
DUE = "x-rm-due"

REWRITTEN = frozenset({ATTEMPT, DEFERRALS, REASON, ERROR_TYPE, ERROR_MESSAGE, DUE})
"""Written anew on every copy; the origin and first-failure headers are kept once set."""

LIBRARY_HEADERS = REWRITTEN | {ORIGIN, ORIGIN_PARTITION, ORIGIN_OFFSET, FIRST_FAILURE}

MAX_ERROR_TEXT = 4096
"""Characters of a reason or error message kept in the headers."""


def failure_headers(headers: Mapping[str, Any], *, origin: str, reason: str, error: BaseException | None,
                    attempt: int, deferrals: int | None = None) -> dict[str, Any]:
    """The headers of a retry copy or dead letter: the message's own (less the ones rewritten here) plus
    the library's. ``deferrals`` is set on a hand-back (the handler did not run), dropped otherwise."""
    out = {name: value for name, value in headers.items() if name not in REWRITTEN}
    out.setdefault(ORIGIN, origin)
    out.setdefault(FIRST_FAILURE, str(int(time.time() * 1000)))
    out[ATTEMPT] = attempt
    out[REASON] = reason[:MAX_ERROR_TEXT]
    if error is not None:
        error_type = type(error)
        out[ERROR_TYPE] = f"{error_type.__module__}.{error_type.__qualname__}"
        out[ERROR_MESSAGE] = str(error)[:MAX_ERROR_TEXT]
    if deferrals is not None:
        out[DEFERRALS] = deferrals
    return out
