"""The polling loop of a :class:`~._consumer.KafkaConsumer` with ``concurrency=N`` (> 1).

The polling thread only polls and settles: it hands records to a :mod:`.._dispatch` dispatcher
(records of one key, or of one partition, one at a time in offset order; up to ``N`` at once), takes
back what finished (republishing failed records to their retry or dead-letter topic), and commits per
partition the finished prefix, never past an unfinished record. Polling goes on while handlers run,
so a slow handler never trips ``max.poll.interval.ms``: with ``4 N`` records outstanding it stops
taking records, and pauses fetching (pause/resume) if that lasts a second.

On revoke the revoked partitions' records not started are dropped, those running get up to
``drain_timeout`` to finish, and the finished prefix is committed before the partitions go;
stopping does the same for every partition (:meth:`ConcurrentLoop.drain`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, MutableMapping

from confluent_kafka import Message as RawMessage

from .._dispatch import Concurrency, Job, dispatcher_for
from .._handling import Disposition, HandlerRunner, Outcome
from .._log import limit_repeats
from ._commits import Commits
from ._message import KafkaMessage
from ._offsets import TopicPartitionKey
from ._partitions import REPUBLISH_BACKOFF, Partitions
from ._republish import Republisher

__all__ = ["ConcurrentLoop"]

logger = limit_repeats(logging.getLogger("reliable_messaging.kafka.consumer"))

_PAUSE_WHEN_FULL_FOR = 1.0
"""Seconds the consumer stays full (``4 N`` records outstanding) before it pauses fetching."""

Batch = Callable[[list[RawMessage]], list[tuple[TopicPartitionKey, int, KafkaMessage, Outcome | None]]]


class ConcurrentLoop:
    """Owns the dispatcher and the queue of finished jobs; everything but :meth:`_done` runs on the polling thread.

    ``batch`` turns fetched records into messages (the consumer's record parsing, shared with the
    one-at-a-time loop); ``abort`` stops the consumer when a handler raised a ``BaseException``.
    """

    def __init__(self, runner: HandlerRunner[KafkaMessage], handler: Callable[..., object], parallel: Concurrency,
                 *, group: str, partitions: Partitions, commits: Commits, republisher: Republisher,
                 counters: MutableMapping[str, int], batch: Batch, abort: Callable[[BaseException], None],
                 fetch: int) -> None:
        self.dispatcher = dispatcher_for(runner, handler, parallel, self._done, f"rm-kafka-handler-{group}")
        self._group = group
        self._lane = parallel.lane
        self._drain_timeout = parallel.drain_timeout
        self._bound = 4 * parallel.handlers
        self._partitions = partitions
        self._commits = commits
        self._republisher = republisher
        self._counters = counters  # the consumer's stats.extra: "republish_failures"
        self._batch = batch
        self._abort = abort
        self._fetch = fetch
        self._completions: collections.deque[tuple[Job, BaseException | None]] = collections.deque()
        self._completed = threading.Event()
        self.last_turn: float | None = None  # time.monotonic() of the loop's last round (health())

    def run(self, stop: threading.Event) -> None:
        """Poll, hand records to the dispatcher, settle what finished, commit; pause fetching when full."""
        partitions = self._partitions
        dispatcher = self.dispatcher
        consume = partitions.client.consume
        bound = self._bound
        full_since: float | None = None
        while not stop.is_set():
            self.last_turn = time.monotonic()
            self.settle()
            timeout = partitions.resume_due()
            if self._commits.batched:
                self._commits.on_time()
            room = bound - dispatcher.outstanding()
            if room <= 0:
                # Full: wait for a handler to finish. Pausing the partitions costs a fetch round trip (up to
                # fetch.wait.max.ms) on resume, so only handlers slow enough to keep it full for a while get
                # them paused, and consume() called (it serves rebalances and commit callbacks meanwhile).
                now = time.monotonic()
                if full_since is None:
                    full_since = now
                records = []
                if now - full_since >= _PAUSE_WHEN_FULL_FOR:
                    partitions.throttle()
                    records = consume(self._fetch, 0)
                if not records:  # until a quarter of the bound is free: fewer, larger rounds of this loop
                    dispatcher.wait_below(bound - max(1, bound // 4) + 1, min(timeout, 0.05))
            else:
                full_since = None
                if partitions.throttled and room >= bound // 2:
                    partitions.unthrottle()
                records = consume(min(self._fetch, room), 0)
                if not records and not self._completions:
                    records = consume(1, min(timeout, 0.05))
            records = partitions.owned(records)
            if records:
                self._submit(records)

    def _submit(self, records: list[RawMessage]) -> None:
        lane = self._lane
        for tp, offset, message, outcome in self._batch(records):
            job = Job(lane(message.key, tp), message, (tp, offset))
            if outcome is not None:  # undecodable: straight to its dead-letter topic
                job.outcome = outcome
                self._completions.append((job, None))
            else:
                self.dispatcher.submit(job)

    def _done(self, job: Job, error: BaseException | None) -> None:
        """(a handler's thread or task) Hand the finished job to the polling thread."""
        self._completions.append((job, error))
        self._completed.set()

    def settle(self, revoking: frozenset[TopicPartitionKey] = frozenset()) -> None:
        """Count finished records as processed; republish failed ones first (a record whose copy the broker did
        not take rewinds its partition to it, unless the partition is being revoked: then its next owner
        reads it)."""
        completions = self._completions
        failed: list[Job] = []
        commits = self._commits
        while completions:
            job, error = completions.popleft()
            if error is not None:
                self._abort(error)
                continue
            outcome = job.outcome
            if outcome is None:
                continue
            tp, offset = job.ref
            if outcome.disposition is Disposition.ACK:
                commits.before()
                commits.processed(tp, offset)
            else:
                failed.append(job)
        if not failed:
            return
        failed.sort(key=lambda job: job.ref)
        rewound: dict[TopicPartitionKey, int] = {}
        for job, ok in zip(failed, self._republisher.settle_many([(j.message, j.outcome) for j in failed]),
                           strict=True):
            tp, offset = job.ref
            if tp in rewound and offset >= rewound[tp]:
                continue  # read again after the rewind below
            if ok:
                commits.before()
                commits.processed(tp, offset)
                continue
            self._counters["republish_failures"] += 1
            if tp in revoking or tp not in self._partitions.assigned:
                continue
            rewound[tp] = offset
            self.dispatcher.drop(_from(tp, offset))
            self._partitions.defer(tp, offset, REPUBLISH_BACKOFF, "its retry/dead-letter publish failed")

    def drain(self, tps: frozenset[TopicPartitionKey] | None, why: str) -> None:
        """Finish the records of ``tps`` (None: all) that the commit needs, drop the rest, settle, within
        ``drain_timeout``.

        A partition's commit covers its finished prefix only. So a record not started yet is dropped (its
        partition's next owner reads it) only when no later record of its partition has started or
        finished: dropping one behind a finished record would leave a gap, and the finished record would be
        handled again by the next owner. Those records run now, and the commit covers them all.
        """
        dispatcher = self.dispatcher
        tracker = self._commits.tracker

        def ours(job: Job) -> bool:
            return tps is None or job.ref[0] in tps

        revoking = tps if tps is not None else frozenset(self._partitions.assigned)
        self.settle(revoking)
        high: dict[TopicPartitionKey, int] = {}
        for job in dispatcher.running(ours):
            tp, offset = job.ref
            high[tp] = max(offset, high.get(tp, -1))
        for tp in tracker.partitions():
            if tps is None or tp in tps:
                done = tracker.highest_done(tp)
                if done is not None:
                    high[tp] = max(done, high.get(tp, -1))
        dispatcher.drop(lambda job: ours(job) and job.ref[1] > high.get(job.ref[0], -1))
        deadline = time.monotonic() + self._drain_timeout
        while True:
            self.settle(revoking)
            if dispatcher.wait(ours, 0):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logger.warning("consumer %s: handlers still running %.1fs after %s: their records are not committed "
                               "(read again by the partition's next owner)", self._group, self._drain_timeout, why)
                break
            self._completed.wait(min(remaining, 0.1))
            self._completed.clear()
        self.settle(revoking)

    def lose(self, tps: list[TopicPartitionKey]) -> None:
        """Partitions lost without a revoke: drop their jobs not started (their new owner reads them)."""
        lost = frozenset(tps)
        self.dispatcher.drop(lambda job: job.ref[0] in lost)


def _from(tp: TopicPartitionKey, offset: int) -> Callable[[Job], bool]:
    """Matches the jobs of ``tp`` at ``offset`` or later."""
    return lambda job: bool(job.ref[0] == tp and job.ref[1] >= offset)
