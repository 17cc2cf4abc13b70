"""KafkaConsumer: at-least-once processing with explicit commits, retry topics and a dead-letter topic.

What the broker does, and what this consumer does about it:

- Kafka keeps one committed offset per partition and group, meaning "every
  record before this one is done". After a crash or a rebalance the next owner
  of the partition starts there. So the consumer commits, per partition, only
  the *contiguous processed prefix* (:mod:`._offsets`): a record is never
  covered by a commit before its handler finished and its outcome (retry or
  dead-letter publish) was acknowledged.
- When the group coordinator takes partitions away (another member joined or
  left), librdkafka calls ``on_revoke`` from inside ``consume()``, before the
  partitions go to their new owner: the consumer commits its processed offsets
  there, synchronously, so the new owner starts right after them.
- A failed record is not retried in place (that would stall its partition): it
  is republished to ``<topic>.retry.<n>`` with a due time and the attempt
  number in its headers, and its offset counts as processed. The consumer also
  reads the retry topics; a record whose due time has not come yet makes the
  consumer pause that retry partition and seek back to it until then. When the
  attempts are used up (or the handler raised Reject, or the record could not
  be decoded) it goes to ``<topic>.DLT`` with headers naming its origin and the
  error (see :mod:`._message`).
- With a dedup store, the message ids of a fetched batch are claimed at once
  before its records are handled; a record's done record is stored (safe from a
  crash of this process) before the record counts as processed, so a crash
  repeats at most the record being handled. Claims of records not reached (the
  consumer stopped, a partition was rewound or revoked) are released.
- A handler that raises a ``BaseException`` (``SystemExit``, ``KeyboardInterrupt``
  from a library it calls) stops the consumer: the record is not committed,
  ``error`` says why (:class:`~reliable_messaging.HandlerAborted`), and ``run()``
  re-raises the original exception. ``run()`` treats ``KeyboardInterrupt`` as
  Ctrl-C: it stops gracefully and returns.

Threading: one thread (``start()``'s, or ``run()``'s caller) owns the
librdkafka consumer and runs the handler, so records of a partition are handled
in order. ``stop()`` may be called from any thread.

With ``concurrency=N`` (> 1) that thread only polls and settles, and handlers run on a
dispatcher: see :mod:`._concurrent`. Pausing and seeking back: :mod:`._partitions`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka import Message as RawMessage

from .. import _headers as h
from .._dedup._base import DedupStore
from .._dispatch import Concurrency
from .._errors import (
    ClosedError,
    ConfigurationError,
    HandlerAborted,
    ReliableMessagingError,
)
from .._handling import ConsumerStats, Disposition, HandlerRunner, Outcome
from .._health import Health, assess, check_limits
from .._lifecycle import LoopFriendly, graceful_signals
from .._log import limit_repeats
from .._message import MESSAGE_ID_HEADER, header_count
from .._retry import DEFAULT_RETRY_POLICY, RetryPolicy
from ._commits import Commits
from ._concurrent import ConcurrentLoop
from ._config import CommitMode, KafkaConsumerConfig
from ._message import KafkaMessage, new_kafka_message
from ._offsets import TopicPartitionKey
from ._partitions import REPUBLISH_BACKOFF, Partitions, read_statistics
from ._producer import KafkaProducer
from ._republish import Republisher
from ._topology import TopicNames, prepare_consumer_topics

__all__ = ["KafkaConsumer"]

logger = limit_repeats(logging.getLogger("reliable_messaging.kafka.consumer"))

_DUE_TOLERANCE_MS = 5
"""A retry record due within this many milliseconds is processed now rather than paused for."""

_STATISTICS_INTERVAL_MS = 5000
"""How often librdkafka reports its statistics to :meth:`KafkaConsumer.health` (broker states, lag)."""

_PRODUCER_SECURITY_PREFIXES = ("security.", "sasl.", "ssl.")

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})

Handler = Callable[[KafkaMessage], Any]


class KafkaConsumer(LoopFriendly):
    """Consumes ``topics`` in group ``config.group_id`` and runs ``handler`` on every record.

    The handler gets a :class:`KafkaMessage`. Returning normally acknowledges
    the record; raising :class:`~reliable_messaging.Retry` or any exception
    retries it per ``retry`` (through the retry topics, or in place with
    ``retry_topics=False``), then dead-letters it; raising
    :class:`~reliable_messaging.Reject` dead-letters it at once. ``async def``
    handlers run on ``loop`` (or a private one).

    Offsets are committed per ``config.commit_mode`` (:class:`CommitMode`), and
    never past a record whose outcome is not settled.

    Options:

    - ``retry``: a :class:`RetryPolicy`; ``max_attempts`` counts every attempt.
    - ``decoder``: bytes -> value for ``message.value``; a decoder error
      dead-letters the record at once (no retry makes bad bytes good).
    - ``dedup``/``dedup_key``: an idempotent consumer (skip ids already done).
      Refused with ``CommitMode.AUTO``: auto-commit can mark a record done
      before it was processed, and no dedup store can bring it back.
    - ``retry_topics``: True (default) republishes failed records to
      ``<topic>.retry.<n>``; False retries in place, holding the partition
      (and every partition of this consumer) for the backoff delay.
    - ``dead_letter_suffix``/``retry_suffix``: topic naming, see :mod:`._topology`.
    - ``create_topics``: create missing topics at start: the retry and dead-letter
      topics (with the source's partition count), and a source topic that does
      not exist yet (broker defaults), since librdkafka would only notice it at
      its next metadata refresh, minutes later.
    - ``producer``: the :class:`KafkaProducer` for retry/dead-letter records
      (default: one of its own, ``acks=all`` with idempotence).

    ``start()`` runs it on a background thread; ``run()`` on the caller's;
    ``stop()`` finishes the current record, commits and leaves the group.
    """

    def __init__(
        self,
        config: KafkaConsumerConfig,
        topics: str | Sequence[str],
        handler: Handler,
        *,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        decoder: Callable[[bytes], Any] | None = None,
        dedup: DedupStore | None = None,
        dedup_key: Callable[[KafkaMessage], str] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        retry_topics: bool = True,
        dead_letter_suffix: str = ".DLT",
        retry_suffix: str = ".retry",
        create_topics: bool = True,
        producer: KafkaProducer | None = None,
        concurrency: Concurrency | None = None,
    ) -> None:
        if not isinstance(config, KafkaConsumerConfig):
            raise ConfigurationError(f"config must be a KafkaConsumerConfig, got {type(config).__name__}",
                                     field="config")
        names = (topics,) if isinstance(topics, str) else tuple(topics)
        if not names or not all(isinstance(t, str) and t for t in names):
            raise ConfigurationError(f"topics must be a topic name or a non-empty list of them, got {topics!r}",
                                     field="topics")
        if not callable(handler):
            raise ConfigurationError(f"handler must be callable, got {type(handler).__name__}", field="handler")
        if not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {type(retry).__name__}", field="retry")
        if dedup is not None and not isinstance(dedup, DedupStore):
            raise ConfigurationError(f"dedup must be a DedupStore or None, got {type(dedup).__name__}",
                                     field="dedup")
        self.config = config
        self._mode = config.mode
        if self._mode in (CommitMode.AUTO, CommitMode.BEFORE) and dedup is not None:
            raise ConfigurationError(
                f"commit_mode={self._mode.value!r} cannot be combined with a dedup store: it commits a record "
                "before its handler ran, and deduplication cannot bring a skipped record back; use "
                "'manual', 'manual_batch' or 'store_offsets'", field="dedup",
            )
        parallel = concurrency or Concurrency()
        if not isinstance(parallel, Concurrency):
            raise ConfigurationError(f"concurrency must be a Concurrency, got {type(concurrency).__name__}",
                                     field="concurrency")
        if parallel.handlers > 1 and not retry_topics:
            raise ConfigurationError("concurrency > 1 needs retry_topics=True: an in-place retry would hold its "
                                     "record's partition on the polling thread", field="concurrency")
        self._names = TopicNames(dead_letter_suffix=dead_letter_suffix, retry_suffix=retry_suffix)
        self._retry_topics = bool(retry_topics)
        self._create_topics = bool(create_topics)
        self.mode = parallel
        self._runner: HandlerRunner[KafkaMessage] = HandlerRunner(
            handler, retry=retry, decoder=decoder, dedup=dedup, dedup_key=dedup_key, loop=loop,
            concurrent=parallel.handlers > 1, handler_timeout=parallel.handler_timeout,
        )
        self._decoding = decoder is not None
        self._runner.stats.extra.update({"deferred": 0, "republish_failures": 0})
        self._dedup = dedup is not None
        self._levels = max(1, retry.max_attempts - 1)
        self._topics = names
        self._origin: dict[str, str] = {t: t for t in names}
        if self._retry_topics:
            for topic in names:
                for level in range(1, self._levels + 1):
                    self._origin[self._names.retry(topic, level)] = topic
        self._subscription = list(self._origin)

        conf = config.librdkafka()
        conf["on_commit"] = self._on_commit_cb
        conf["error_cb"] = self._on_client_error
        # librdkafka's statistics (brokers' connection states, partitions' lag) feed health(); every 5 s unless
        # the settings say otherwise (statistics.interval.ms=0 turns them off: connected then means assigned).
        conf.setdefault("statistics.interval.ms", _STATISTICS_INTERVAL_MS)
        conf["stats_cb"] = self._on_statistics
        conf["logger"] = limit_repeats(logging.getLogger("reliable_messaging.kafka.librdkafka"))
        try:
            self._consumer = Consumer(conf)
        except KafkaException as exc:
            raise ConfigurationError(f"librdkafka refused the consumer configuration: {exc}") from exc
        self._commits = Commits(config, self._consumer, self._runner.stats.extra)
        self._fetch = config.fetch_batch
        if self._commits.batched:  # back in consume() (which serves commit callbacks) at least every commit step
            self._fetch = min(self._fetch, self._commits.step)
        self._republisher = Republisher(config, self._names, self._levels, producer)
        self._received = self._commits.tracker.received
        self._partitions = Partitions(self._consumer, self._commits.tracker, self._runner.stats.extra)
        self._concurrent: ConcurrentLoop | None = None
        if parallel.handlers > 1:
            self._concurrent = ConcurrentLoop(
                self._runner, handler, parallel, group=config.group_id, partitions=self._partitions,
                commits=self._commits, republisher=self._republisher, counters=self._runner.stats.extra,
                batch=self._batch, abort=self._abort, fetch=self._fetch,
            )
        self._skip: set[TopicPartitionKey] = set()  # partitions rewound during the current batch

        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None
        self._running = False
        self._closed = False
        self.error: Exception | None = None
        """Why the consumer stopped on its own, if it did (also logged; ``run()`` raises it)."""
        self._aborted: BaseException | None = None  # a handler's BaseException, re-raised by run()
        self._last_turn: float | None = None  # time.monotonic() of the loop's last round (health())
        self._brokers_up: bool | None = None  # from the last statistics: some broker connection is up
        self._lag: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> KafkaConsumer:
        """Run the consumer on a background thread; returns self (awaitable inside a running event loop)."""
        return self._start_or_schedule()  # type: ignore[no-any-return]

    def stop(self, timeout: float = 30.0) -> Any:
        """Stop fetching, let the records in progress finish, commit, leave the group; True once closed.

        Inside a running event loop: an awaitable of that bool (the loop is not blocked). See
        :meth:`_stop_now`.
        """
        return self._stop_or_schedule(timeout)

    def _start_now(self) -> KafkaConsumer:
        self._claim_run()
        self._thread = threading.Thread(target=self._run_safely, name=f"rm-kafka-consumer-{self.config.group_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the consumer on the calling thread until :meth:`stop`, SIGTERM/SIGINT or KeyboardInterrupt.

        Either way it finishes the records in progress (up to ``drain_timeout`` with concurrent handlers),
        commits and leaves the group before returning (a KeyboardInterrupt raised inside the handler leaves
        that record uncommitted: it is read again). Re-raises the error that ended the loop, if any, and a
        handler's other ``BaseException`` (``SystemExit``) as is.
        """
        self._claim_run()
        try:
            with graceful_signals(self._stop.set, f"consumer {self.config.group_id}"):
                self._loop()
        except KeyboardInterrupt:
            logger.info("consumer %s interrupted: committing and leaving the group", self.config.group_id)
            self._stop.set()
            self.error = self._aborted = None
        finally:
            self._shutdown()
        if self._aborted is not None:
            raise self._aborted
        if self.error is not None:
            raise self.error

    def _stop_now(self, timeout: float) -> bool:
        """Stop fetching, let the record in progress finish, commit, leave the group; True once closed.

        Waits at most ``timeout`` seconds. A handler still running then is not interrupted and its
        record is not given away: the consumer stays in the group, and commits and closes by
        itself when the handler returns; ``stop()`` returns False (a WARNING says so) and
        :attr:`running` stays True until then. Records fetched but not started are not committed:
        the partition's next owner reads them. Idempotent; callable from any thread, including
        the handler (then it returns False: the loop stops after this record).
        """
        self._stop.set()
        if not self._running and not self._closed:  # never started: just release the client
            self._shutdown()
            return True
        if self._loop_thread is threading.current_thread() or (
                self._concurrent is not None and self._concurrent.dispatcher.on_handler_thread()):
            return False  # called from the handler: the loop stops after this record
        if not self._finished.wait(max(0.0, timeout)):
            logger.warning("consumer %s still busy %.1fs after stop(): its handler is still running; it commits "
                           "and closes when the handler returns", self.config.group_id, timeout)
            return False
        return True

    def __enter__(self) -> KafkaConsumer:
        return self._start_now()

    def __exit__(self, *exc_info: object) -> None:
        self._stop_now(30.0)

    @property
    def stats(self) -> ConsumerStats:
        """Counters. ``extra`` holds the Kafka ones: commits, commit_failures, deferred (partition
        rewinds: retry records not yet due, failed republishes), republish_failures."""
        return self._runner.stats

    @property
    def running(self) -> bool:
        return self._running and not self._finished.is_set()

    def health(self, *, poll_within: float = 60.0, handler_within: float | None = None) -> Health:
        """Live (running, its loop turned within ``poll_within`` s, no handler over ``handler_within`` s) and
        ready (live and connected: a broker connection up in librdkafka's last statistics, or partitions
        assigned); with the partitions' total lag. See :mod:`.._health`; no network call."""
        check_limits(poll_within, handler_within)
        if self._concurrent is not None:
            turn = self._concurrent.last_turn
        else:  # one thread polls and handles: a handler starting in a long batch is progress too
            turn = max((t for t in (self._last_turn, self._runner.last_progress()) if t is not None), default=None)
        in_flight, oldest = self._runner.in_flight()
        up = self._brokers_up
        connected = bool(self._partitions.assigned) if up is None else up
        return assess(running=self.running, error=self.error, connected=connected, last_turn=turn,
                      in_flight=in_flight, oldest_start=oldest, poll_within=poll_within,
                      handler_within=handler_within, lag=self._lag)

    def assignment(self) -> set[TopicPartitionKey]:
        """The (topic, partition) pairs this consumer owns right now (retry topics included)."""
        return self._partitions.snapshot()

    def _claim_run(self) -> None:
        if self._closed:
            raise ClosedError("the consumer was stopped; create a new one")
        if self._running:
            raise ConfigurationError("the consumer is already running")
        self._running = True

    def _run_safely(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a handler's SystemExit/KeyboardInterrupt: in self.error, logged
            logger.debug("consumer %s thread ended by %s", self.config.group_id, type(exc).__name__)
        finally:
            self._shutdown()

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        self._loop_thread = threading.current_thread()
        try:
            self._prepare_topics()
            self._consumer.subscribe(self._subscription, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                     on_lost=self._on_lost)
            if self._concurrent is not None:
                self._concurrent.run(self._stop)
                return
            consume = self._consumer.consume
            partitions = self._partitions
            stop = self._stop
            while not stop.is_set():
                self._last_turn = time.monotonic()
                timeout = partitions.resume_due()
                if self._commits.batched:
                    self._commits.on_time()
                # consume(n, timeout) waits until it has n records or the timeout passed: take what
                # is there, and block only for the first record of an idle stream.
                records = consume(self._fetch, 0)
                if not records:
                    records = consume(1, timeout)
                records = partitions.owned(records)  # less those of partitions revoked inside consume()
                if records:
                    self._handle_batch(records)
        except Exception as exc:  # anything ending the loop is recorded, logged, and re-raised by run()
            self.error = exc
            logger.error("consumer %s stopped by %s: %s", self.config.group_id, type(exc).__name__, exc)
            logger.debug("consumer failure", exc_info=exc)
        except BaseException as exc:  # the handler raised SystemExit, KeyboardInterrupt, ...
            self._aborted = exc
            self.error = HandlerAborted(f"the handler raised {type(exc).__name__}({exc}): the consumer stopped; "
                                        "the record is not committed and will be read again")
            self.error.__cause__ = exc
            logger.error("consumer %s stopped: %s", self.config.group_id, self.error)
            raise

    def _commit_ahead(self, records: list[tuple[TopicPartitionKey, int]]) -> bool:
        """``CommitMode.BEFORE``: commit past ``records`` before any is handled. If the broker does not take the
        commit, rewind their partitions to them and handle none (read again, committed first next time)."""
        first: dict[TopicPartitionKey, int] = {}
        after: dict[TopicPartitionKey, int] = {}
        for tp, offset in records:
            first.setdefault(tp, offset)
            after[tp] = max(after.get(tp, 0), offset + 1)
        if self._commits.ahead(after):
            return True
        for tp, offset in first.items():
            self._partitions.defer(tp, offset, REPUBLISH_BACKOFF, "its commit before handling failed")
        return False

    def _abort(self, error: BaseException) -> None:
        """A handler raised a BaseException: stop (its record is not committed); run() re-raises it."""
        if self._aborted is None:
            self._aborted = error
            self.error = HandlerAborted(f"the handler raised {type(error).__name__}({error}): the consumer "
                                        "stopped; the record is not committed and will be read again")
            self.error.__cause__ = error
            logger.error("consumer %s stopped: %s", self.config.group_id, self.error)
        self._stop.set()

    def _prepare_topics(self) -> None:
        if self._create_topics:
            levels = self._levels if self._retry_topics else 0
            prepare_consumer_topics(self.config.bootstrap_servers, self._topics, self._names, levels,
                                    {k: v for k, v in self.config.extra.items()
                                     if k.startswith(_PRODUCER_SECURITY_PREFIXES)})

    def _batch(self, records: list[RawMessage]) -> list[tuple[TopicPartitionKey, int, KafkaMessage, Outcome | None]]:
        """The fetched records as messages, less those of a partition rewound meanwhile (``self._skip``: they come
        again); with ``CommitMode.BEFORE``, committed past before any is handled (none if that commit failed)."""
        deferred = self._skip
        deferred.clear()
        batch: list[tuple[TopicPartitionKey, int, KafkaMessage, Outcome | None]] = []
        for raw in records:
            err = raw.error()
            if err is not None:
                self._on_fetch_error(err)
                continue
            tp = (raw.topic() or "", raw.partition() or 0)
            if deferred and tp in deferred:
                continue  # its partition was rewound: these records come again
            item = self._message(raw, tp)
            if item is None:
                deferred.add(tp)
            else:
                batch.append(item)
        if batch and self._mode is CommitMode.BEFORE \
                and not self._commit_ahead([(tp, offset) for tp, offset, *_ in batch]):
            return []
        return batch

    def _handle_batch(self, records: list[RawMessage]) -> None:
        batch = self._batch(records)
        if not batch:
            return
        deferred = self._skip
        runner = self._runner
        if self._dedup:  # claim the batch's message ids at once
            runner.claim([message for _tp, _offset, message, bad in batch if bad is None])
        stop = self._stop
        try:
            for tp, offset, message, outcome in batch:
                if stop.is_set():
                    return  # the rest is neither processed nor committed: the next owner reads it again
                if deferred and tp in deferred:
                    continue
                if not self._handle(tp, offset, message, outcome):
                    deferred.add(tp)
        finally:
            if self._dedup:
                runner.release_unclaimed()  # claims of records not reached

    def _message(self, raw: RawMessage, tp: TopicPartitionKey
                 ) -> tuple[TopicPartitionKey, int, KafkaMessage, Outcome | None] | None:
        """The record as a message (with its decoding outcome if it could not be decoded); None if its
        partition was rewound to it (a retry record not due yet)."""
        topic, partition = tp
        offset = raw.offset() or 0
        self._received(tp, offset)
        raw_headers = raw.headers()
        headers: Mapping[str, Any] = dict(raw_headers) if raw_headers else _EMPTY
        origin = self._origin.get(topic, topic)
        attempt = 1
        if origin != topic:  # a retry topic
            attempt = max(1, header_count(headers.get(h.ATTEMPT)))
            due = header_count(headers.get(h.DUE))
            if due - time.time() * 1000 > _DUE_TOLERANCE_MS:
                self._partitions.defer(tp, offset, due / 1000 - time.time(), "not due yet")
                return None
        mid = headers.get(MESSAGE_ID_HEADER)
        if mid is None:
            message_id = f"{topic}/{partition}/{offset}"
        else:
            message_id = mid.decode("utf-8", "replace") if isinstance(mid, bytes) else str(mid)
        body = raw.value() or b""
        if self._decoding:
            value, outcome = self._runner.decode(body)
        else:
            value, outcome = body, None
        ts_type, ts = raw.timestamp()
        message = new_kafka_message(body, value, message_id, raw.key(), headers, attempt, origin, topic, partition,
                                    offset, ts / 1000.0 if ts_type else None)
        return tp, offset, message, outcome

    def _handle(self, tp: TopicPartitionKey, offset: int, message: KafkaMessage, outcome: Outcome | None) -> bool:
        """Process one record; False if its partition was rewound to it (it will be read again)."""
        self._commits.before()
        if outcome is None:
            outcome = self._runner.invoke(message)
            if outcome.disposition is Disposition.RETRY and not self._retry_topics:
                outcome, message = self._retry_in_place(message, outcome)
                if outcome is None:
                    self._partitions.defer(tp, offset, 0.0, "stopping during an in-place retry")
                    return False
        if outcome.disposition is not Disposition.ACK and not self._republisher.settle(message, outcome):
            self.stats.extra["republish_failures"] += 1
            self._partitions.defer(tp, offset, REPUBLISH_BACKOFF, "its retry/dead-letter publish failed")
            return False
        self._commits.processed(tp, offset)
        return True

    def _retry_in_place(self, message: KafkaMessage, outcome: Outcome) -> tuple[Outcome | None, KafkaMessage]:
        """``retry_topics=False``: wait the backoff on this thread and run the handler again."""
        first_failure = int(time.time() * 1000)
        sleep = self._runner.retry.sleep
        while outcome.disposition is Disposition.RETRY:
            if sleep is time.sleep:  # the default: wait interruptibly, so stop() need not wait it out
                if self._stop.wait(outcome.delay):
                    return None, message
            else:
                sleep(outcome.delay)  # an injected sleep (tests)
                if self._stop.is_set():
                    return None, message
            attempt = message.attempt + 1 if outcome.counts_attempt else message.attempt
            headers = dict(message.headers)
            headers.setdefault(h.FIRST_FAILURE, str(first_failure).encode())
            message = dataclasses.replace(message, attempt=attempt, redelivered=True, headers=headers)
            outcome = self._runner.invoke(message)
        return outcome, message

    def _on_statistics(self, document: str) -> None:
        """(the polling thread, inside consume()) librdkafka's statistics JSON: broker states and lag."""
        self._brokers_up, self._lag = read_statistics(document, self._partitions.assigned, self._brokers_up,
                                                      self._lag)

    def _on_commit_cb(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self._commits.on_commit(err, partitions)

    _on_commit = _on_commit_cb  # the name the tests drive

    # -- rebalancing ----------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._commits.forget(tps)
        self._partitions.assign(tps)
        logger.info("consumer %s assigned %s", self.config.group_id, _describe(tps))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions are taken away: commit what was processed before the new owner starts reading."""
        tps = [(p.topic, p.partition) for p in partitions]
        if self._concurrent is not None:
            self._concurrent.drain(frozenset(tps), "a rebalance revoked their partitions")
        self._commits.commit_sync(None, "partitions revoked")
        self._drop(tps)
        logger.info("consumer %s revoked %s", self.config.group_id, _describe(tps))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions were lost (session timed out): they may already have a new owner, so no commit."""
        tps = [(p.topic, p.partition) for p in partitions]
        if self._concurrent is not None:
            self._concurrent.lose(tps)
        self._drop(tps)
        logger.warning("consumer %s lost %s (session timeout or fenced): uncommitted records will be "
                       "processed again by their new owner", self.config.group_id, _describe(tps))

    def _drop(self, tps: list[TopicPartitionKey]) -> None:
        self._commits.forget(tps)
        self._partitions.drop(tps)

    # -- errors ---------------------------------------------------------------------------------

    def _on_fetch_error(self, err: KafkaError) -> None:
        if err.fatal():
            raise ReliableMessagingError(f"fatal consumer error {err.name()}: {err.str()}")
        if err.code() == KafkaError._PARTITION_EOF:
            return
        logger.warning("consumer %s: %s: %s", self.config.group_id, err.name(), err.str())

    def _on_client_error(self, err: KafkaError) -> None:
        logger.warning("consumer %s: %s: %s", self.config.group_id, err.name(), err.str())

    # -- shutdown -------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._running:
                if self._concurrent is not None:
                    self._concurrent.drain(None, "stopping")
                self._commits.commit_sync(None, "closing")
            self._consumer.close()  # leaves the group; librdkafka runs on_revoke (nothing left to commit)
        except KafkaException as exc:
            logger.warning("closing consumer %s: %s", self.config.group_id, exc)
            logger.debug("close failure", exc_info=exc)
        finally:
            if self._concurrent is not None:
                self._concurrent.dispatcher.close()
            self._republisher.close()
            self._runner.close()
            self._finished.set()
            logger.info("consumer %s closed (%s)", self.config.group_id, self.stats)

    def __repr__(self) -> str:
        state = "running" if self.running else ("closed" if self._closed else "new")
        return (f"<KafkaConsumer group={self.config.group_id!r} topics={list(self._topics)!r} "
                f"mode={self._mode.value} {state}>")


def _describe(tps: Sequence[TopicPartitionKey]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in tps) or "nothing"
