"""Messages as a Kafka consumer hands them to handlers, and the headers the library adds.

Headers on retried and dead-lettered messages (values are UTF-8 text):

==========================  ==============================================================
``message-id``              the producer's id, kept unchanged through retries and the DLT
``x-rm-attempt``            retry topics: the attempt the message is waiting for (2, 3, ...);
                            DLT: the number of attempts made
``x-rm-origin-topic``       where the message was first published
``x-rm-origin-partition``   ... its partition there
``x-rm-origin-offset``      ... and its offset there
``x-rm-first-failure``      when the first attempt failed, milliseconds since the epoch
``x-rm-error-type``         the exception class of the last failure (``module.QualName``)
``x-rm-error-message``      its message (at most 4 KiB)
``x-rm-reason``             why it was retried or dead-lettered
``x-rm-due``                retry topics only: not to be processed before this time (ms since the epoch)
==========================  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from .._message import Message

__all__ = [
    "DUE_HEADER",
    "ERROR_MESSAGE_HEADER",
    "ERROR_TYPE_HEADER",
    "FIRST_FAILURE_HEADER",
    "ORIGIN_OFFSET_HEADER",
    "ORIGIN_PARTITION_HEADER",
    "ORIGIN_TOPIC_HEADER",
    "REASON_HEADER",
    "KafkaMessage",
]

ORIGIN_TOPIC_HEADER = "x-rm-origin-topic"
ORIGIN_PARTITION_HEADER = "x-rm-origin-partition"
ORIGIN_OFFSET_HEADER = "x-rm-origin-offset"
FIRST_FAILURE_HEADER = "x-rm-first-failure"
ERROR_TYPE_HEADER = "x-rm-error-type"
ERROR_MESSAGE_HEADER = "x-rm-error-message"
REASON_HEADER = "x-rm-reason"
DUE_HEADER = "x-rm-due"


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
