"""Dead letters back to where they failed: ``reliable-messaging redrive`` and :func:`redrive`.

Each dead letter of ``source`` (Kafka ``<source>.DLT``, RabbitMQ ``<source>.dlq``) is republished to its origin (the
``x-rm-origin`` header; RabbitMQ also ``x-death``) with its body, key, message id and own headers, and only once the
broker confirmed the copy (Kafka ``acks=all``, RabbitMQ a publisher confirm) is the dead letter acknowledged
(RabbitMQ ack) or passed (Kafka: the offset of the group ``rm-redrive.<source>`` committed). A crash between the two
leaves the dead letter in place and its copy at the origin: the next run moves it again, with the same message id,
which an effectively-once consumer handles once. The library's failure headers (attempt, reason, error) are dropped
from the copy, which starts again at attempt 1; ``x-rm-redriven`` counts the moves.

Each backend does the moving its own way (``_kafka._redrive``, ``_rabbitmq._redrive``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ._errors import ConfigurationError
from ._headers import ERROR_TYPE, LIBRARY_HEADERS, ORIGIN, REASON

__all__ = ["REDRIVEN", "DeadLetter", "RedriveReport", "redrive"]

REDRIVEN = "x-rm-redriven"
"""How many times a message was moved back from its dead letters."""


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A dead letter as listed (``dry_run``) or moved: where it came from and why it failed."""

    message_id: str | None
    origin: str
    error_type: str | None
    reason: str | None


@dataclasses.dataclass
class RedriveReport:
    """What a redrive did."""

    source: str
    dead_letters: str
    moved: int = 0
    """Republished to their origin, confirmed, and then removed from the dead letters."""
    skipped: int = 0
    """Not matching ``error_type`` / ``reason``: left as dead letters (Kafka: passed by the redrive group)."""
    listed: list[DeadLetter] = dataclasses.field(default_factory=list)
    """With ``dry_run``: the dead letters that would move (at most ``limit``)."""
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def matches(headers: Mapping[str, Any], error_type: str | None, reason: str | None) -> bool:
    """Whether a dead letter's headers pass the filters: ``error_type`` matches the exception class's name or its
    dotted path's end; ``reason`` is a substring of the reason."""
    if error_type is not None:
        found = _text(headers.get(ERROR_TYPE)) or ""
        if found != error_type and not found.endswith(f".{error_type}"):
            return False
    return reason is None or reason in (_text(headers.get(REASON)) or "")


def copy_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers of the copy sent back: the message's own, without the library's failure headers, plus the count
    of moves."""
    out = {name: value for name, value in headers.items() if name not in LIBRARY_HEADERS and name != REDRIVEN}
    out[REDRIVEN] = str(int(_text(headers.get(REDRIVEN)) or 0) + 1)
    return out


def origin_of(headers: Mapping[str, Any], source: str) -> str:
    return _text(headers.get(ORIGIN)) or source


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def redrive(
    url: str,
    source: str,
    *,
    limit: int | None = None,
    rate: float | None = None,
    error_type: str | None = None,
    reason: str | None = None,
    dry_run: bool = False,
    timeout: float = 30.0,
    progress: Callable[[int], None] | None = None,
) -> RedriveReport:
    """Move the dead letters of ``source`` back to their origin (see the module docstring).

    ``limit``: at most this many moved (or listed); ``rate``: at most this many per second; ``error_type`` /
    ``reason``: only those whose last error's class (name or dotted path) / reason matches; ``dry_run``: list, move
    nothing. Stops at the end of the dead letters as they were when it started. ``progress(moved)`` after each move.
    Raises :class:`ConfigurationError` for invalid arguments and a
    :class:`~reliable_messaging.ReliableMessagingError` (with the dead letter left in place) when a copy is not
    confirmed within ``timeout`` or the broker cannot be reached.
    """
    if not isinstance(source, str) or not source:
        raise ConfigurationError(f"source must be a non-empty str, got {source!r}", field="source")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigurationError(f"limit must be an int >= 1 or None, got {limit!r}", field="limit")
    if rate is not None and (not isinstance(rate, int | float) or rate <= 0):
        raise ConfigurationError(f"rate must be a number > 0 (messages per second) or None, got {rate!r}",
                                 field="rate")
    scheme = url.split("://", 1)[0].lower() if isinstance(url, str) and "://" in url else ""
    if scheme == "kafka":
        from ._kafka._redrive import redrive_topic

        return redrive_topic(url.split("://", 1)[1].strip("/"), source, limit=limit, rate=rate,
                             error_type=error_type, reason=reason, dry_run=dry_run, timeout=timeout,
                             progress=progress)
    if scheme in ("amqp", "amqps"):
        from ._rabbitmq._redrive import redrive_queue

        return redrive_queue(url, source, limit=limit, rate=rate, error_type=error_type, reason=reason,
                             dry_run=dry_run, timeout=timeout, progress=progress)
    raise ConfigurationError("redrive needs a kafka://, amqp:// or amqps:// URL", field="url")
