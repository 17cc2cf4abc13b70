"""The one place where confluent-kafka's errors become reliable_messaging's.

librdkafka reports a failure as a :class:`confluent_kafka.KafkaError` (in a
delivery report, a commit callback, or inside a ``KafkaException``). Its code is
either a broker error (``NOT_ENOUGH_REPLICAS`` = 19, ...) or a local one (negative,
``_MSG_TIMED_OUT`` = -192, ...). The mapping below goes from the most specific
class to the most general, and every raise keeps the original as ``__cause__``.

What librdkafka does before a report reaches us matters for which class a
caller sees: a retriable broker error (``NOT_ENOUGH_REPLICAS``, ``NOT_LEADER``,
``REQUEST_TIMED_OUT``...) is retried until ``delivery.timeout.ms`` runs out, and
then reported as ``_MSG_TIMED_OUT``. So an idempotent producer (unbounded
retries) facing too few in-sync replicas fails with :class:`DeliveryTimeout`;
with a bounded ``retries`` the broker's own code comes through as
:class:`NotEnoughReplicas`.
"""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException

from .._errors import (
    BrokerUnavailable,
    DeliveryError,
    DeliveryFailed,
    DeliveryTimeout,
    MessageTooLarge,
    NotEnoughReplicas,
    ReliableMessagingError,
)

__all__ = [
    "TRANSIENT_CODES",
    "delivery_error",
    "kafka_error_of",
    "operation_error",
]

_TIMEOUT_CODES = frozenset({KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT_QUEUE})
_TOO_LARGE_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE,
                              KafkaError.INVALID_MSG_SIZE})
_REPLICA_CODES = frozenset({KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND})

TRANSIENT_CODES = frozenset({
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError._WAIT_COORD,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.NOT_COORDINATOR,
    KafkaError.BROKER_NOT_AVAILABLE,
})
"""Codes an operation (commit, metadata, topic creation) may simply be retried on: a broker or the
group coordinator is unreachable or moving."""


def _describe(err: KafkaError) -> str:
    return f"{err.name()}: {err.str()}"


def delivery_error(err: KafkaError, message_id: str | None) -> DeliveryError:
    """The typed error for a failed delivery report (or a refused ``produce`` call)."""
    code = err.code()
    text = _describe(err)
    if code in _TIMEOUT_CODES:
        return DeliveryTimeout(
            f"not acknowledged within delivery.timeout.ms ({text}); it may or may not have been stored: "
            "resend it, consumers deduplicate on the message id", message_id=message_id,
        )
    if code == KafkaError._PURGE_INFLIGHT:
        return DeliveryTimeout(
            f"the producer was closed while the broker had not answered ({text}); it may or may not have "
            "been stored", message_id=message_id,
        )
    if code in _TOO_LARGE_CODES:
        return MessageTooLarge(
            f"message larger than the broker or topic accepts (message.max.bytes / max.message.bytes): {text}",
            message_id=message_id, code=err.name(), retriable=False,
        )
    if code in _REPLICA_CODES:
        return NotEnoughReplicas(
            f"fewer in-sync replicas than min.insync.replicas: {text}",
            message_id=message_id, code=err.name(), retriable=True,
        )
    if code == KafkaError._PURGE_QUEUE:
        return DeliveryFailed(
            f"the producer was closed before the message was sent ({text}); it was not stored",
            message_id=message_id, code=err.name(), retriable=True,
        )
    return DeliveryFailed(f"the broker refused the message: {text}", message_id=message_id,
                          code=err.name(), retriable=bool(err.retriable()))


def kafka_error_of(exc: KafkaException) -> KafkaError | None:
    """The :class:`KafkaError` a ``KafkaException`` carries, if any."""
    if exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def operation_error(what: str, exc: KafkaException) -> ReliableMessagingError:
    """The typed error for a failed client operation (commit, metadata, admin call).

    Transient codes become :class:`BrokerUnavailable` (worth retrying as is);
    anything else a plain :class:`ReliableMessagingError` naming the code.
    """
    err = kafka_error_of(exc)
    if err is None:
        return ReliableMessagingError(f"{what} failed: {exc}")
    if err.code() in TRANSIENT_CODES or err.retriable():
        return BrokerUnavailable(f"{what} failed: {_describe(err)}")
    return ReliableMessagingError(f"{what} failed: {_describe(err)}")
