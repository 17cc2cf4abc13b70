"""One stats shape for every backend: what a publisher and a consumer have done, as plain numbers.

:meth:`Broker.stats() <reliable_messaging.Broker.stats>` returns a :class:`BrokerStats`
snapshot with the same field names on Kafka, RabbitMQ and the in-process backend, so a service
can log or export them without knowing which broker it runs on. Consumers keep their counters
in :class:`~reliable_messaging.ConsumerStats` (broker-specific extras under ``extra``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._handling import ConsumerStats

__all__ = ["FAILURE_REASONS", "BrokerStats", "FailureCounts", "PublisherStats", "failures", "reason_of"]

FAILURE_REASONS = ("nacked", "unroutable", "timeout", "too_large", "unavailable", "other")
"""Why a publish failed, as counted in :attr:`PublisherStats.failures`."""


@dataclass(frozen=True)
class PublisherStats:
    """A publisher's counters at one moment (all zero before the first publish)."""

    published: int = 0
    """publish() calls accepted (a future returned)."""
    confirmed: int = 0
    """Futures resolved with a Delivery (at-most-once: sent, without a broker acknowledgement)."""
    failed: int = 0
    """Futures failed, for any reason (the sum of :attr:`failures`)."""
    in_flight: int = 0
    """Published, not resolved yet."""
    republished: int = 0
    """Sent again after a connection was lost before the broker's confirm (RabbitMQ; librdkafka retries
    inside the client, where it cannot be counted)."""
    failures: Mapping[str, int] = field(default_factory=dict)
    """Failed futures by reason: ``nacked``, ``unroutable``, ``timeout``, ``too_large``, ``unavailable``,
    ``other`` (every reason present, zero if none)."""


@dataclass(frozen=True)
class BrokerStats:
    """:meth:`Broker.stats` of one broker connection."""

    publisher: PublisherStats
    consumers: Mapping[str, ConsumerStats]
    """By consumer: ``<source>`` (RabbitMQ, in-process) or ``<group>/<source>`` (Kafka); a second consumer
    of the same name gets ``#2`` appended."""
    sources: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """By the same names: the consumer's ``(source, group)`` (group ``""`` when it has none)."""


def reason_of(error: BaseException) -> str:
    """The :data:`FAILURE_REASONS` entry of a publish's error."""
    from ._errors import BrokerUnavailable, DeliveryTimeout, MessageTooLarge, Nacked, Unroutable

    for kind, reason in ((Nacked, "nacked"), (Unroutable, "unroutable"), (DeliveryTimeout, "timeout"),
                         (MessageTooLarge, "too_large"), (BrokerUnavailable, "unavailable")):
        if isinstance(error, kind):
            return reason
    return "other"


class FailureCounts:
    """Failed publishes by reason, counted from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(FAILURE_REASONS, 0)

    def add(self, error: BaseException) -> None:
        reason = reason_of(error)
        with self._lock:
            self._counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def failures(**counts: int) -> dict[str, int]:
    """Every reason of :data:`FAILURE_REASONS`, zero unless given."""
    return {reason: counts.get(reason, 0) for reason in FAILURE_REASONS}
