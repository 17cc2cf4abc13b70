"""Messages and delivery results shared by both brokers.

Outgoing messages are plain arguments to ``publish`` (body, key, headers,
message id); what comes back is a :class:`DeliveryFuture` resolved with a
:class:`Delivery` once the broker has taken responsibility for the message.
Incoming messages are :class:`Message` objects (subclassed per broker with the
positional details of that broker).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Generator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from ._errors import InvalidMessage

__all__ = [
    "ATTEMPT_HEADER",
    "DEFERRALS_HEADER",
    "MESSAGE_ID_HEADER",
    "Delivery",
    "DeliveryFuture",
    "HeaderValue",
    "Message",
    "OutgoingHeaders",
    "coerce_body",
    "new_message_id",
]

MESSAGE_ID_HEADER = "message-id"
"""Header carrying the producer-stamped message id (Kafka; RabbitMQ uses the AMQP ``message_id`` property).

Consumers deduplicate on it: a producer that resends after a lost ack sends the same id again.
"""

ATTEMPT_HEADER = "x-rm-attempt"
"""The library's own attempt counter, carried on messages re-sent through retry topics/queues.

It is 1-based: the first delivery is attempt 1 and carries no header.
"""

DEFERRALS_HEADER = "x-rm-deferrals"
"""How many times the message was handed back without running its handler (a live consumer held its
claim, or the dedup store was unavailable): each time it waits longer (the retry policy's backoff),
and it does not use up an attempt."""

HeaderValue: TypeAlias = "str | bytes | int | float | bool | list[Any] | dict[str, Any] | None"
"""A header value as the broker delivers it: Kafka headers are bytes; AMQP tables also carry numbers,
booleans, nested tables and arrays (RabbitMQ's ``x-death`` is a list of tables)."""

OutgoingHeaders: TypeAlias = "Mapping[str, str | bytes | int | float | bool | None]"
"""Headers a publish accepts on either broker (str values are sent as UTF-8 on Kafka)."""


class _MessageIds:
    """Unique message ids: 64 random bits per process, then a 64-bit counter, as 32 hex characters.

    One ``os.urandom`` per message would cost about as much as the rest of a publish,
    and it releases the GIL on every call, which hurts threaded publishers. A random
    per-process prefix keeps ids unique across processes and restarts (two processes
    share a prefix with probability 2**-64); the prefix is drawn again in a forked
    child, which would otherwise repeat its parent's ids.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.next = itertools.count(1).__next__

    def __call__(self) -> str:
        return f"{self.prefix}{self.next():016x}"


new_message_id = _MessageIds()
"""A fresh message id (32 hex characters); ``itertools.count`` makes it thread-safe under the GIL."""


def header_count(value: object) -> int:
    """A counting header's value (``x-rm-deferrals``...) as an int >= 0: 0 when absent or malformed."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str | int) or isinstance(value, bool):
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 0


def coerce_body(body: object) -> bytes:
    """Return the body as bytes; ``str`` is encoded as UTF-8.

    Raises :class:`InvalidMessage` for anything else, at call time, so a bad
    message never reaches the broker or disturbs messages already in flight.
    """
    if type(body) is bytes:  # the common case first: no copy
        return body
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    raise InvalidMessage(
        f"message body must be bytes, bytearray, memoryview or str, got {type(body).__name__}; "
        "serialize it first (e.g. json.dumps(obj).encode())"
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the broker confirmed for one published message.

    Kafka: ``destination`` is the topic; ``partition``, ``offset`` and
    ``timestamp`` (seconds since the epoch) come from the broker's delivery
    report. With ``acks=0`` the broker sends no answer, so ``offset`` is ``None``.

    RabbitMQ: ``destination`` is the exchange (``""`` for the default exchange)
    and ``routing_key`` the key it was published with; partition/offset are ``None``.
    """

    message_id: str
    destination: str
    routing_key: str | None = None
    partition: int | None = None
    offset: int | None = None
    timestamp: float | None = None


class DeliveryFuture(Future[Delivery]):
    """A :class:`concurrent.futures.Future` for one publish, also awaitable from asyncio.

    It resolves with a :class:`Delivery` when the broker confirms the message
    and fails with a :class:`~reliable_messaging.DeliveryError` subclass
    otherwise. ``message_id`` is known at once, before the broker answers.

    Works with :func:`concurrent.futures.wait` and ``as_completed``; inside a
    coroutine ``await future`` suspends without blocking the event loop.
    """

    def __init__(self, message_id: str) -> None:
        super().__init__()
        self.message_id = message_id

    def __await__(self) -> Generator[Any, None, Delivery]:
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        return f"<DeliveryFuture message_id={self.message_id} state={self._state}>"


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """A message delivered to a handler; the same shape for both brokers.

    - ``body``: the raw bytes as stored by the broker.
    - ``value``: ``body`` passed through the consumer's decoder (``body`` itself without one).
    - ``message_id``: the producer-stamped id (Kafka header ``message-id``, AMQP ``message_id``).
      A message from a producer that does not stamp one gets a position-derived id
      (Kafka ``topic/partition/offset``; RabbitMQ has no stable position, so the id is ``""``).
    - ``redelivered``: the broker says it may have been delivered before (RabbitMQ's
      ``redelivered`` flag; Kafka: attempt > 1).
    - ``attempt``: 1 for the first delivery, counted across requeues and retry queues/topics.
    - ``source``: the topic or queue it was consumed from.

    Broker-specific subclasses add positions (partition/offset, delivery tag, ...).
    """

    body: bytes
    value: Any
    message_id: str
    key: bytes | None
    headers: Mapping[str, HeaderValue] = field(default_factory=dict)
    redelivered: bool = False
    attempt: int = 1
    source: str = ""

    def header(self, name: str) -> str | None:
        """A header as text (bytes decoded as UTF-8), or ``None`` if absent."""
        value = self.headers.get(name)
        if value is None:
            return None
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        return str(value)
