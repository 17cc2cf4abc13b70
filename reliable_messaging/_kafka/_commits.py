"""When a Kafka consumer commits its offsets: the commit modes, one place.

The offsets themselves come from :class:`~._offsets.OffsetTracker` (the contiguous processed
prefix per partition); this decides when they go to the broker, per
:class:`~reliable_messaging.CommitMode`:

- ``MANUAL``: a synchronous commit after every record.
- ``MANUAL_BATCH``: asynchronous commits, one in flight at a time, the next going out once the
  previous one was answered and ``commit_every / 4`` records were processed since (or
  ``commit_interval`` passed); a synchronous one rather than hold more than ``commit_every``
  processed records without an acknowledged commit. It used to be every ``commit_every / 2``: then a
  commit round trip (~6 ms against Kafka 4, whose group coordinator lingers up to 5 ms before writing)
  had to fit in half the bound, and at ~300,000 records/s it did not: every 5,000 records ended in a
  synchronous commit, a third of the consumer's time. Several commits in flight measured slower: the
  coordinator answers a group's commits one after another, so the synchronous one waited behind them.
- ``STORE_OFFSETS``: the offset is stored after each record; librdkafka commits stored offsets in
  the background.
- ``AUTO``: librdkafka stores and commits by itself.
- ``BEFORE``: each fetched batch's offsets synchronously before it is handled (:meth:`ahead`); on revoke and close
  the processed prefix, which moves the committed offset back to the first record not handled.

Every mode commits synchronously on revoke and on close. Thread-confined: the consumer thread
(commit callbacks are served inside its ``consume()``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from .._errors import BrokerUnavailable, ReliableMessagingError
from .._log import limit_repeats
from .._retry import RetryPolicy
from ._config import CommitMode, KafkaConsumerConfig
from ._errors import kafka_error_of, operation_error
from ._offsets import OffsetTracker, TopicPartitionKey

__all__ = ["Commits"]

logger = limit_repeats(logging.getLogger("reliable_messaging.kafka.consumer"))

_COMMIT_RETRY = RetryPolicy(max_attempts=4, initial_delay=0.2, max_delay=2.0, jitter=0.1)
"""Synchronous commits retried on transient errors (coordinator moving, request timed out): a few
seconds in all, the time a coordinator failover takes."""


class Commits:
    """The commit decisions of one consumer; ``client`` is its ``confluent_kafka.Consumer``."""

    def __init__(self, config: KafkaConsumerConfig, client: Any, counters: dict[str, int]) -> None:
        self.client = client
        self.mode = config.mode
        self.interval = config.commit_interval
        self.limit = config.commit_every
        self.step = max(1, config.commit_every // 4)
        self.batched = self.mode is CommitMode.MANUAL_BATCH
        self.tracker = OffsetTracker()
        self.counters = counters
        counters.update(commits=0, commit_failures=0)
        self.since = 0  # MANUAL_BATCH: records processed since the last commit went out
        self.in_flight: dict[TopicPartitionKey, int] | None = None  # the unanswered asynchronous commit
        self.in_flight_count = 0
        self.last = time.monotonic()

    # -- per record -----------------------------------------------------------------------------

    def before(self) -> None:
        """Before a record is processed: MANUAL_BATCH never holds more than ``commit_every`` processed records
        without an acknowledged commit (commit synchronously if the asynchronous one is still unanswered)."""
        if self.batched and self.in_flight_count + self.since >= self.limit:
            self.commit_sync(None, "the asynchronous commit is still unanswered")

    def processed(self, tp: TopicPartitionKey, offset: int) -> None:
        """``offset`` of ``tp`` is finished: count it, and commit or store per mode."""
        self.tracker.processed(tp, offset)
        if self.batched:  # the common case
            self.since += 1
            if self.in_flight is None and self.since >= self.step:
                self.commit_async()
        elif self.mode is CommitMode.MANUAL:
            self.commit_sync([tp], "after the record")
        elif self.mode is CommitMode.STORE_OFFSETS:
            position = self.tracker.position(tp)
            if position is not None:
                try:
                    self.client.store_offsets(offsets=[TopicPartition(tp[0], tp[1], position)])
                except KafkaException as exc:  # the partition was revoked meanwhile: its new owner reads it
                    logger.warning("could not store offset %d for %s[%d]: %s", position, tp[0], tp[1], exc)
        # AUTO: librdkafka stored the offset when it handed the record out.

    def on_time(self) -> None:
        """MANUAL_BATCH, between fetches: commit what was processed once ``commit_interval`` passed."""
        if self.since and self.in_flight is None and time.monotonic() - self.last >= self.interval:
            self.commit_async()

    def ahead(self, positions: dict[TopicPartitionKey, int]) -> bool:
        """``BEFORE``: commit ``positions`` (the offsets after a fetched batch) before handling it; False if the
        broker did not take the commit: then the batch must not be handled (a crash would repeat it)."""
        return self._commit_retrying(positions, "commit before handling failed: %s; the batch is read again")

    # -- committing -----------------------------------------------------------------------------

    def commit_async(self) -> None:
        positions = self.tracker.uncommitted()
        self.last = time.monotonic()
        if not positions:
            self.since = 0
            return
        try:
            self.client.commit(offsets=_offsets(positions), asynchronous=True)
        except KafkaException as exc:
            self.counters["commit_failures"] += 1
            logger.warning("asynchronous commit refused: %s", exc)
            return
        self.in_flight = positions
        self.in_flight_count = self.since
        self.since = 0

    def commit_sync(self, tps: Iterable[TopicPartitionKey] | None, why: str) -> bool:
        """Commit the processed prefix of ``tps`` (all partitions if None) and wait for the broker."""
        if self.mode is CommitMode.AUTO:
            return self._commit_stored(why)
        # BEFORE committed past every record fetched: move back to the first one not handled, for the next owner.
        before = self.mode is CommitMode.BEFORE
        positions = self.tracker.unhandled(tps) if before else self.tracker.uncommitted(tps)
        if not positions:
            if tps is None:
                self._reset()
            return True
        if not self._commit_retrying(positions, f"commit ({why}) failed: %s; those records may be processed again"):
            return False
        self.tracker.committed(positions)
        if tps is None:
            self._reset()
        return True

    def _commit_retrying(self, positions: dict[TopicPartitionKey, int], failure: str) -> bool:
        """Commit synchronously, retrying transient errors a few seconds; count it. False (and ``failure`` logged,
        with the error for its ``%s``) if the broker did not take it."""
        try:
            for attempt in _COMMIT_RETRY.retrying(retry_on=(BrokerUnavailable,), what="commit"):
                with attempt:
                    self._commit_offsets(positions)
        except ReliableMessagingError as exc:
            self.counters["commit_failures"] += 1
            logger.warning(failure, exc)
            return False
        self.counters["commits"] += 1
        return True

    def _commit_offsets(self, positions: dict[TopicPartitionKey, int]) -> None:
        try:
            results = self.client.commit(offsets=_offsets(positions), asynchronous=False)
        except KafkaException as exc:
            raise operation_error("commit", exc) from exc
        failed = [r for r in results or () if r.error is not None]
        if failed:
            refused = KafkaException(failed[0].error)
            raise operation_error(f"commit of {failed[0].topic}[{failed[0].partition}]", refused) from refused

    def _commit_stored(self, why: str) -> bool:
        try:
            self.client.commit(asynchronous=False)
        except KafkaException as exc:
            err = kafka_error_of(exc)
            if err is not None and err.code() == KafkaError._NO_OFFSET:
                return True  # nothing stored since the last commit
            logger.warning("commit of stored offsets (%s) failed: %s", why, exc)
            return False
        return True

    def _reset(self) -> None:
        self.since = 0
        self.in_flight = None
        self.in_flight_count = 0
        self.last = time.monotonic()

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's commit callback (served inside consume()): settles the in-flight async commit."""
        in_flight = self.in_flight
        if err is not None:
            if err.code() != KafkaError._NO_OFFSET:
                self.counters["commit_failures"] += 1
                logger.warning("commit failed: %s: %s", err.name(), err.str())
            if in_flight is not None:
                # Its records are still uncommitted: count them toward the next commit.
                self.since += self.in_flight_count
                self.in_flight = None
                self.in_flight_count = 0
            return
        if in_flight is None:
            return
        acked = {(p.topic, p.partition): p.offset for p in partitions if p.error is None}
        if all(acked.get(tp, -1) >= position for tp, position in in_flight.items()):
            self.tracker.committed(in_flight)
            self.counters["commits"] += 1
            self.in_flight = None
            self.in_flight_count = 0

    def forget(self, tps: list[TopicPartitionKey]) -> None:
        """Partitions revoked or lost: their offsets are no longer this consumer's to commit."""
        self.tracker.forget(tps)
        if self.in_flight is not None:
            for tp in tps:
                self.in_flight.pop(tp, None)


def _offsets(positions: Mapping[TopicPartitionKey, int]) -> list[TopicPartition]:
    return [TopicPartition(topic, partition, offset) for (topic, partition), offset in positions.items()]
