"""The partitions a :class:`~._consumer.KafkaConsumer` owns, and which of them are paused and why.

A partition is paused for one of three reasons:

- *deferred*: its next record must be read again later (a retry record not due yet, a retry or
  dead-letter publish that failed, a commit before handling that failed). It is paused, the
  consumer seeks back to the record, and it resumes when its time comes. librdkafka drops what it
  had fetched after the record; nothing from it on counts as processed.
- *throttled*: a concurrent consumer has too many records outstanding; every owned partition is
  paused until handlers catch up (a deferred one stays paused until its own time).

Assignment changes arrive from librdkafka's rebalance callbacks, on the polling thread inside
``consume()``. Records that ``consume()`` returned in the same call may belong to a partition
revoked meanwhile: :meth:`Partitions.owned` drops them (their new owner reads them from the
committed offset).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Collection, Iterable, MutableMapping

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka import Message as RawMessage

from .._errors import BrokerUnavailable, ReliableMessagingError
from .._log import limit_repeats
from .._retry import RetryPolicy
from ._errors import kafka_error_of, operation_error
from ._offsets import OffsetTracker, TopicPartitionKey

__all__ = ["POLL_TIMEOUT", "REPUBLISH_BACKOFF", "Partitions", "read_statistics"]

logger = limit_repeats(logging.getLogger("reliable_messaging.kafka.consumer"))

POLL_TIMEOUT = 0.2
"""Seconds ``consume()`` waits for records: the longest ``stop()`` waits for an idle consumer."""

REPUBLISH_BACKOFF = 1.0
"""Seconds a partition stays paused after its record could not be republished (retry/DLT publish failed)."""

_SEEK_RETRY = RetryPolicy(max_attempts=5, initial_delay=0.05, max_delay=0.5, jitter=0.0)
"""seek() right after a rebalance can fail with _STATE until librdkafka starts fetching the partition."""


class Partitions:
    """Owned partitions (``assigned``; read from any thread under ``lock``), paused ones, and seeking back.

    Everything but :meth:`snapshot` runs on the polling thread.
    """

    def __init__(self, client: Consumer, tracker: OffsetTracker, counters: MutableMapping[str, int]) -> None:
        self.client = client
        self._tracker = tracker
        self._counters = counters  # the consumer's stats.extra: "deferred"
        self.assigned: set[TopicPartitionKey] = set()
        self.lock = threading.Lock()
        self.paused: dict[TopicPartitionKey, float] = {}  # deferred: monotonic time to resume at
        self.throttled: set[TopicPartitionKey] = set()
        self.rebalanced = False  # an assignment changed since owned() last looked

    def snapshot(self) -> set[TopicPartitionKey]:
        with self.lock:
            return set(self.assigned)

    def assign(self, tps: Iterable[TopicPartitionKey]) -> None:
        tps = list(tps)
        for tp in tps:
            self.paused.pop(tp, None)
        with self.lock:
            self.assigned.update(tps)
        self.rebalanced = True

    def drop(self, tps: Iterable[TopicPartitionKey]) -> None:
        tps = list(tps)
        for tp in tps:
            self.paused.pop(tp, None)
        self.throttled.difference_update(tps)
        with self.lock:
            self.assigned.difference_update(tps)
        self.rebalanced = True

    def owned(self, records: list[RawMessage]) -> list[RawMessage]:
        """``records`` less those of partitions revoked during the ``consume()`` that returned them."""
        if not self.rebalanced:
            return records
        self.rebalanced = False
        assigned = self.assigned
        return [r for r in records if (r.topic(), r.partition()) in assigned]

    # -- deferred --------------------------------------------------------------------------------

    def defer(self, tp: TopicPartitionKey, offset: int, seconds: float, why: str) -> None:
        """Pause ``tp``, seek back to ``offset`` and resume after ``seconds``.

        Raises :class:`ReliableMessagingError` if the seek is refused after retries: resuming without it
        would skip the record, so the consumer stops rather than lose it.
        """
        self._tracker.rewind(tp, offset)
        self._counters["deferred"] += 1
        target = TopicPartition(tp[0], tp[1], offset)
        self.client.pause([TopicPartition(tp[0], tp[1])])
        try:
            for attempt in _SEEK_RETRY.retrying(retry_on=(BrokerUnavailable,), what=f"seek {tp[0]}[{tp[1]}]"):
                with attempt:
                    self._seek(target)
        except ReliableMessagingError as exc:
            raise ReliableMessagingError(f"cannot rewind {tp[0]}[{tp[1]}] to offset {offset}: {exc}") from exc
        self.paused[tp] = time.monotonic() + max(0.0, seconds)
        logger.debug("paused %s[%d] at offset %d for %.2fs: %s", tp[0], tp[1], offset, seconds, why)

    def _seek(self, target: TopicPartition) -> None:
        try:
            self.client.seek(target)
        except KafkaException as exc:
            err = kafka_error_of(exc)
            if err is not None and err.code() == KafkaError._STATE:
                raise BrokerUnavailable(f"seek not possible yet: {err.str()}") from exc
            raise operation_error("seek", exc) from exc

    def resume_due(self) -> float:
        """Resume deferred partitions whose time has come; returns how long ``consume()`` may block."""
        if not self.paused:
            return POLL_TIMEOUT
        now = time.monotonic()
        due = [tp for tp, at in self.paused.items() if at <= now]
        if due:
            for tp in due:
                del self.paused[tp]
            self.client.resume([TopicPartition(t, p) for t, p in due])
        if not self.paused:
            return POLL_TIMEOUT
        return max(0.0, min(POLL_TIMEOUT, min(self.paused.values()) - now))

    # -- throttled -------------------------------------------------------------------------------

    def throttle(self) -> None:
        """Pause every owned partition not paused yet: too many records outstanding."""
        with self.lock:
            more = self.assigned - self.throttled
        if more:
            self.client.pause([TopicPartition(t, p) for t, p in more])
            self.throttled |= more

    def unthrottle(self) -> None:
        """Resume the partitions paused by :meth:`throttle` (not the deferred ones: they wait for their time)."""
        with self.lock:
            back = (self.throttled & self.assigned) - set(self.paused)
        self.throttled.clear()
        if back:
            self.client.resume([TopicPartition(t, p) for t, p in back])


def read_statistics(document: str, assigned: Collection[TopicPartitionKey], up: bool | None,
                    lag: int | None) -> tuple[bool | None, int | None]:
    """From librdkafka's statistics JSON (``stats_cb``): whether some broker connection is up, and the summed
    consumer lag of the ``assigned`` partitions; ``(up, lag)`` as they were if the document cannot be read."""
    try:
        stats = json.loads(document)
        brokers = stats.get("brokers", {}).values()
        now_up = any(b.get("state") == "UP" for b in brokers if b.get("nodeid", -1) >= 0)
        total = 0
        for topic, about in stats.get("topics", {}).items():
            for number, partition in about.get("partitions", {}).items():
                if (topic, int(number)) in assigned and partition.get("consumer_lag", -1) >= 0:
                    total += partition["consumer_lag"]
    except (ValueError, TypeError, AttributeError) as exc:  # a statistics format this code does not know
        logger.debug("unreadable librdkafka statistics: %s", exc)
        return up, lag
    return now_up, total
