"""Messages as a Kafka consumer hands them to handlers.

The headers the library writes on retried and dead-lettered records are the same on every broker:
see :mod:`reliable_messaging._headers` (``x-rm-origin``, ``x-rm-attempt``, ``x-rm-reason``, ...; on
Kafka also ``x-rm-origin-partition``, ``x-rm-origin-offset`` and, on retry topics, ``x-rm-due``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .._message import HeaderValue, Message

__all__ = [
    "KafkaMessage",
    "new_kafka_message",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaMessage(Message):
    """A consumed Kafka record.

    ``topic``/``partition``/``offset`` say where *this delivery* was read (a
    retry topic for a retried message); ``source`` is the topic the message was
    originally published to, the same on every attempt. ``timestamp`` is the
    record's timestamp in seconds since the epoch (``None`` if the broker has none).
    ``message_id`` is the ``message-id`` header, or ``topic/partition/offset``
    for records published without one.
    """

    topic: str
    partition: int
    offset: int
    timestamp: float | None = None


_FIELDS = ("body", "value", "message_id", "key", "headers", "redelivered", "attempt", "source",
           "topic", "partition", "offset", "timestamp")


def _slow_new(body: bytes, value: Any, message_id: str, key: bytes | None, headers: Mapping[str, HeaderValue],
              attempt: int, source: str, topic: str, partition: int, offset: int,
              timestamp: float | None) -> KafkaMessage:
    return KafkaMessage(body=body, value=value, message_id=message_id, key=key, headers=headers,
                        redelivered=attempt > 1, attempt=attempt, source=source, topic=topic, partition=partition,
                        offset=offset, timestamp=timestamp)


def _fast_constructor() -> Any:
    """Build KafkaMessage instances by writing their slots directly: 0.5 µs instead of 2.2 µs.

    A frozen dataclass's ``__init__`` sets every field through
    ``object.__setattr__`` (its own ``__setattr__`` refuses), which costs about
    0.15 µs per field; the consumer builds one message per record. The slot
    descriptors store the same values without that detour. If the dataclass ever
    gains a field this does not know, the ordinary constructor is used instead.
    """
    if tuple(f.name for f in fields(KafkaMessage)) != _FIELDS:
        return _slow_new
    new = object.__new__
    (s_body, s_value, s_id, s_key, s_headers, s_redelivered, s_attempt, s_source, s_topic, s_partition, s_offset,
     s_timestamp) = (getattr(KafkaMessage, name).__set__ for name in _FIELDS)

    def fast_new(body: bytes, value: Any, message_id: str, key: bytes | None, headers: Mapping[str, HeaderValue],
                 attempt: int, source: str, topic: str, partition: int, offset: int,
                 timestamp: float | None) -> KafkaMessage:
        message: KafkaMessage = new(KafkaMessage)
        s_body(message, body)
        s_value(message, value)
        s_id(message, message_id)
        s_key(message, key)
        s_headers(message, headers)
        s_redelivered(message, attempt > 1)
        s_attempt(message, attempt)
        s_source(message, source)
        s_topic(message, topic)
        s_partition(message, partition)
        s_offset(message, offset)
        s_timestamp(message, timestamp)
        return message

    return fast_new


new_kafka_message = _fast_constructor()
"""``new_kafka_message(body, value, message_id, key, headers, attempt, source, topic, partition, offset,
timestamp)``: a :class:`KafkaMessage`, ``redelivered`` derived from ``attempt``."""
