"""The exceptions of reliable_messaging.

Every error the library raises derives from one root, and no client exception
(``confluent_kafka.KafkaException``, ``pika.exceptions.*``) reaches a caller:
each adapter translates its client's errors at one boundary, most specific
first, with ``raise ... from exc`` so the original stays on ``__cause__``.

Tree::

    ReliableMessagingError
    ├── ConfigurationError            (also ValueError) invalid or incompatible settings, at construction
    │   └── TopologyMismatch          an existing queue/exchange was declared with other arguments
    ├── InvalidMessage                (also TypeError/ValueError) a message the library cannot send, at call time
    ├── BrokerUnavailable             transient: cannot connect, connection lost, broker restarting
    ├── StoreUnavailable              transient: the dedup store (SQLite file, Redis) cannot be used right now
    ├── ClosedError                   the publisher/consumer was closed; the call was not attempted
    ├── DeliveryError                 a publish was not confirmed by the broker
    │   ├── DeliveryTimeout           (also TimeoutError) no broker answer within the delivery deadline
    │   ├── Unroutable                RabbitMQ basic.return: no queue bound for a mandatory message
    │   ├── Nacked                    RabbitMQ basic.nack: the broker refused responsibility
    │   └── DeliveryFailed            the broker answered with an error code
    │       ├── MessageTooLarge       larger than the broker/topic accepts
    │       └── NotEnoughReplicas     fewer in-sync replicas than min.insync.replicas (acks=all)
    ├── ConsumerCancelled             the broker cancelled the consumer (e.g. its queue was deleted)
    ├── HandlerAborted                a handler raised SystemExit/KeyboardInterrupt/...: the consumer stopped
    ├── HandlerTimeout                a handler ran longer than handler_timeout: a failed attempt
    └── ProcessingSignal              raised *by handlers* to choose what happens to a message
        ├── Retry                     process it again later (optional delay)
        └── Reject                    dead-letter it now, with a reason

Retryable errors are an explicit short list, :data:`TRANSIENT_ERRORS`: never
``Exception`` or ``RuntimeError``.
"""

from __future__ import annotations

__all__ = [
    "TRANSIENT_ERRORS",
    "BrokerUnavailable",
    "ClosedError",
    "ConfigurationError",
    "ConsumerCancelled",
    "DeliveryError",
    "DeliveryFailed",
    "DeliveryTimeout",
    "HandlerAborted",
    "HandlerTimeout",
    "InvalidMessage",
    "MessageTooLarge",
    "Nacked",
    "NotEnoughReplicas",
    "ProcessingSignal",
    "Reject",
    "ReliableMessagingError",
    "Retry",
    "StoreUnavailable",
    "TopologyMismatch",
    "Unroutable",
    "is_transient",
]


class ReliableMessagingError(Exception):
    """Root of every exception raised by reliable_messaging."""


class ConfigurationError(ReliableMessagingError, ValueError):
    """Invalid or incompatible configuration, raised at construction.

    Also a :class:`ValueError`, so code that validates input generically keeps working.
    ``field`` names the offending setting when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TopologyMismatch(ConfigurationError):
    """A queue or exchange already exists with different arguments.

    RabbitMQ answers such a redeclaration with ``PRECONDITION_FAILED`` (406) and
    closes the channel; ``argument`` names the argument that differs when the
    broker's reply text says so.
    """

    def __init__(self, message: str, *, name: str, argument: str | None = None) -> None:
        super().__init__(message, field=argument)
        self.name = name
        self.argument = argument


class InvalidMessage(ReliableMessagingError, TypeError, ValueError):
    """A message the library refuses to send: wrong body type, bad header, bad key.

    Raised at call time, before anything reaches the broker; nothing already
    queued is affected.
    """


class BrokerUnavailable(ReliableMessagingError):
    """The broker cannot be reached or the connection was lost. Transient."""


class StoreUnavailable(ReliableMessagingError):
    """The dedup store cannot be reached or is locked. Transient: the message is retried, not processed blind."""


class ClosedError(ReliableMessagingError):
    """The publisher or consumer is closed; the operation was not attempted."""


class DeliveryError(ReliableMessagingError):
    """A published message was not confirmed by the broker.

    ``message_id`` is the id stamped on the message, so the caller can correlate
    the failure with what it sent.
    """

    def __init__(self, message: str, *, message_id: str | None = None) -> None:
        super().__init__(message)
        self.message_id = message_id


class DeliveryTimeout(DeliveryError, TimeoutError):
    """The broker did not confirm the message before the delivery deadline.

    The message may or may not have been stored: at-least-once callers resend,
    and consumers deduplicate on the message id.
    """


class Unroutable(DeliveryError):
    """RabbitMQ returned a ``mandatory`` message (``basic.return``): no queue was bound for it."""

    def __init__(
        self,
        message: str,
        *,
        message_id: str | None = None,
        reply_code: int,
        reply_text: str,
        exchange: str,
        routing_key: str,
    ) -> None:
        super().__init__(message, message_id=message_id)
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.exchange = exchange
        self.routing_key = routing_key


class Nacked(DeliveryError):
    """RabbitMQ answered ``basic.nack``: it did not take responsibility for the message.

    Happens e.g. when a queue with ``x-overflow=reject-publish`` is full, or on an
    internal error in the queue process.
    """


class DeliveryFailed(DeliveryError):
    """The broker answered the publish with an error.

    ``code`` is the broker's error name/code (Kafka: e.g. ``NOT_ENOUGH_REPLICAS``),
    ``retriable`` whether the client considers it transient.
    """

    def __init__(
        self,
        message: str,
        *,
        message_id: str | None = None,
        code: str | int | None = None,
        retriable: bool = False,
    ) -> None:
        super().__init__(message, message_id=message_id)
        self.code = code
        self.retriable = retriable


class MessageTooLarge(DeliveryFailed):
    """The message exceeds the broker's or topic's size limit."""


class NotEnoughReplicas(DeliveryFailed):
    """Fewer in-sync replicas than ``min.insync.replicas``: an ``acks=all`` write was refused."""


class ConsumerCancelled(ReliableMessagingError):
    """The broker cancelled the consumer (RabbitMQ ``basic.cancel``), e.g. the queue was deleted."""


class HandlerAborted(ReliableMessagingError):
    """A handler raised a ``BaseException`` that is not an ``Exception`` (``SystemExit``,
    ``KeyboardInterrupt``, ``GeneratorExit``): the consumer stopped without acknowledging that
    message, which the broker delivers again. The original exception is ``__cause__``."""


class HandlerTimeout(ReliableMessagingError):
    """A handler ran longer than the consumer's ``handler_timeout``: counted as a failed attempt (the retry
    policy decides), its late result ignored."""


class ProcessingSignal(ReliableMessagingError):
    """Base of the signals a handler raises to choose a message's outcome."""


class Retry(ProcessingSignal):
    """Raised by a handler: process this message again later.

    ``delay`` (seconds) overrides the retry policy's backoff for this attempt.
    The attempt still counts toward the policy's ``max_attempts``.
    """

    def __init__(self, reason: str = "retry requested", *, delay: float | None = None) -> None:
        if delay is not None and delay < 0:
            raise ValueError(f"Retry delay must be >= 0 seconds, got {delay!r}")
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class Reject(ProcessingSignal):
    """Raised by a handler: dead-letter this message now, without further attempts."""

    def __init__(self, reason: str = "rejected by handler") -> None:
        super().__init__(reason)
        self.reason = reason


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (BrokerUnavailable, DeliveryTimeout, StoreUnavailable)
"""Errors worth retrying as they are: the broker was unreachable or slow.

``DeliveryFailed`` with ``retriable=True`` is also transient; use :func:`is_transient`.
"""


def is_transient(exc: BaseException) -> bool:
    """True for errors that a retry may cure (the short explicit list, plus retriable broker codes)."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return isinstance(exc, DeliveryFailed) and exc.retriable
