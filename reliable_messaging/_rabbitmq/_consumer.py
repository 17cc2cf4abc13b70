"""The RabbitMQ consumer: manual or automatic acks, retry through TTL queues or requeue, dead letters.

What the broker does, and what the consumer does about it:

- **Prefetch.** ``basic.qos(prefetch)`` caps the unacknowledged deliveries the broker
  pushes to this consumer. In ``AUTO`` ack mode there is no cap: the broker forgets each
  message as soon as it is written to the socket, so whatever sits in this process's
  memory is lost if it dies (at-most-once; the integration tests show it).
- **Acks.** In ``MANUAL`` mode a message is acknowledged only after its handler returned.
  Consecutive acknowledgements are coalesced into one ``basic.ack(multiple=True)``; a
  batch handler's batch is always acknowledged that way. A process that dies with
  unacknowledged messages gets them redelivered, to itself or another consumer, with
  ``redelivered=True``.
- **Retry.** A failed handler's message goes back for another attempt, by the retry policy:
  ``DELAYED`` republishes a copy to ``<queue>.retry.<attempt>`` (per-message
  ``expiration`` = the policy's delay; the queue dead-letters it back to ``<queue>`` when it
  expires), waits for the broker's confirm of the copy, then acks the original;
  ``REQUEUE`` sends ``basic.nack(requeue=True)`` after the delay.
- **Dead letters.** When attempts run out (or the handler raised
  :class:`~reliable_messaging.Reject`, or the body could not be decoded) a copy carrying the
  library's headers (:mod:`.._headers`) goes to the queue's dead-letter exchange, and the original
  is acked once the broker confirmed the copy (see :mod:`._consumer_io`). A quorum queue's
  ``x-delivery-limit`` dead-letters on the broker's own count (``x-death`` reason ``delivery_limit``).
- **Attempts** are counted from ``x-rm-attempt``, ``x-delivery-count`` and ``x-death``; see
  :mod:`reliable_messaging._rabbitmq._message`. On a quorum queue, every return of an
  unacknowledged message counts, including those caused by stopping or losing a consumer.
- **consumer_timeout.** RabbitMQ does have an acknowledgement timeout (the seed documents say it
  has none): since 3.8.15 the broker closes the *channel* with ``406 PRECONDITION_FAILED -
  delivery acknowledgement on channel N timed out`` when a delivery stays unacknowledged longer
  than ``consumer_timeout`` (default 30 minutes; in 3.10 a node-wide setting only: the per-queue
  ``x-consumer-timeout`` argument came in 3.12), checked on the channel's periodic tick (60 s by
  default). Every unacknowledged message on that channel returns to the queue. This consumer
  treats it like a lost connection: it reconnects, drops the stale acknowledgement of the slow
  message and gets the message again with ``redelivered=True``. Handlers that may run longer than
  ``consumer_timeout`` need a larger setting on the broker.
- **Dedup.** With a dedup store, the worker takes every delivery already waiting (up to
  ``prefetch``), claims their message ids at once, then handles them in order; a handled
  message's done record is stored (safe from a crash of this process) before its ack is
  posted, so a crash repeats at most the message being handled. Claims of deliveries not
  reached (stopping, a lost channel) are released.
- **Stopping.** :meth:`RabbitMQConsumer.stop` cancels the consumer first (``basic.cancel``: no
  new deliveries), lets the handler in progress finish, acknowledges what finished, and only
  then closes the channel, whose unstarted deliveries go back to the queue. A handler still
  running at the timeout keeps the channel open (its message is not redelivered elsewhere
  while it runs); the consumer acks and closes when it returns.
- **A handler's BaseException** (``SystemExit``, ``KeyboardInterrupt`` from a library it calls)
  stops the consumer: its message is not acknowledged (the channel closes and the broker
  delivers it again), ``error`` is a :class:`~reliable_messaging.HandlerAborted` and ``run()``
  re-raises the original exception.
- **Cancellation.** When the queue is deleted the broker sends ``basic.cancel``; the consumer
  stops and :meth:`RabbitMQConsumer.run` raises :class:`~reliable_messaging.ConsumerCancelled`.

Threads: an I/O thread owns the connection (:mod:`._consumer_io`; heartbeats keep flowing while a
handler runs); one worker thread runs the handler on one message (or batch) at a time, in delivery
order. With ``concurrency=N`` (> 1) the worker hands deliveries to a :mod:`.._dispatch` dispatcher
instead (``prefetch`` >= N: the broker's bound on deliveries in flight is the backpressure): messages of
one routing key one at a time in delivery order, those without one in any order; each is acknowledged
as it finishes (one ``multiple=True`` ack over a finished run). Stopping cancels, then waits up to
``drain_timeout`` for the handlers running; the deliveries not started go back to the queue when the
channel closes.
"""

from __future__ import annotations

import asyncio
import logging
import queue as queue_module
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika

from .._dedup._base import DedupStore
from .._dispatch import Concurrency, Dispatcher, Job, dispatcher_for
from .._errors import ClosedError, ConfigurationError, HandlerAborted, ReliableMessagingError
from .._handling import ConsumerStats, HandlerRunner, Outcome
from .._health import Health, assess, check_limits
from .._lifecycle import LoopFriendly, graceful_signals
from .._log import limit_repeats
from .._message import Message
from .._retry import DEFAULT_RETRY_POLICY, RetryPolicy
from ._config import RabbitMQAckMode, RabbitMQConsumerConfig, RabbitMQRetryMode
from ._consumer_io import CLOSE_GRACE, ConsumerIO, Delivery
from ._message import RabbitMQMessage, message_from_delivery
from ._topology import RabbitMQQueueType, RabbitMQTopology, _check_name

__all__ = ["RabbitMQConsumer"]

logger = limit_repeats(logging.getLogger("reliable_messaging.rabbitmq.consumer"))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Batch(Message):
    """Carries a batch through the shared HandlerRunner (attempt = the highest of its messages)."""

    messages: tuple[RabbitMQMessage, ...] = field(default=())


class RabbitMQConsumer(LoopFriendly):
    """Consumes one queue and runs ``handler`` on each message (or batch), acking per the outcome.

    ``handler(message)`` receives a :class:`~reliable_messaging.RabbitMQMessage` (with
    ``config.batch_size > 1``: a ``list`` of them). Returning acknowledges; raising
    :class:`~reliable_messaging.Retry` retries, :class:`~reliable_messaging.Reject`
    dead-letters, anything else follows ``retry`` (a :class:`RetryPolicy`), then dead-letters.
    ``async def`` handlers run on ``loop`` (or a private loop).

    ``topology`` is declared on every (re)connection; in ``DELAYED`` retry mode the consumer
    also declares its retry queues ``<queue>.retry.<n>``. ``dedup`` makes the consumer
    idempotent (see :class:`~reliable_messaging.DedupStore`); it cannot be combined with
    ``AUTO`` acks (a message acked before processing has nothing to deduplicate against a retry).

    Use :meth:`start`/:meth:`stop` (or ``with``), or :meth:`run` to block.
    """

    def __init__(
        self,
        config: RabbitMQConsumerConfig,
        queue: str,
        handler: Callable[[Any], Any],
        *,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        retry_mode: RabbitMQRetryMode | str = RabbitMQRetryMode.DELAYED,
        decoder: Callable[[bytes], Any] | None = None,
        dedup: DedupStore | None = None,
        dedup_key: Callable[[RabbitMQMessage], str] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        topology: RabbitMQTopology | None = None,
        concurrency: Concurrency | None = None,
    ) -> None:
        if not isinstance(config, RabbitMQConsumerConfig):
            raise ConfigurationError(f"config must be a RabbitMQConsumerConfig, got {type(config).__name__}",
                                     field="config")
        _check_name("queue", queue)
        if not callable(handler):
            raise ConfigurationError(f"handler must be callable, got {type(handler).__name__}", field="handler")
        if not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}", field="retry")
        try:
            mode = RabbitMQRetryMode(retry_mode)
        except ValueError as exc:
            allowed = ", ".join(repr(m.value) for m in RabbitMQRetryMode)
            raise ConfigurationError(f"retry_mode must be one of {allowed}, got {retry_mode!r}",
                                     field="retry_mode") from exc
        if dedup is not None and not isinstance(dedup, DedupStore):
            raise ConfigurationError(f"dedup must be a DedupStore, got {type(dedup).__name__}", field="dedup")
        if topology is not None and not isinstance(topology, RabbitMQTopology):
            raise ConfigurationError(f"topology must be a RabbitMQTopology, got {type(topology).__name__}",
                                     field="topology")
        auto = config.ack_mode is RabbitMQAckMode.AUTO
        if auto and dedup is not None:
            raise ConfigurationError(
                "ack_mode=AUTO cannot be combined with dedup: with automatic acks the broker forgets a message "
                "before the handler runs, so there is no redelivery to deduplicate and a failure loses it; use "
                "ack_mode=MANUAL", field="dedup")
        if config.batch_size > 1 and dedup is not None:
            raise ConfigurationError("dedup is not supported with batch handlers (batch_size > 1): deduplicate "
                                     "inside the batch handler, or use batch_size=1", field="dedup")
        parallel = concurrency or Concurrency()
        if not isinstance(parallel, Concurrency):
            raise ConfigurationError(f"concurrency must be a Concurrency, got {type(concurrency).__name__}",
                                     field="concurrency")
        if parallel.handlers > 1:
            if config.batch_size > 1:
                raise ConfigurationError("concurrency > 1 is not supported with batch handlers (batch_size > 1)",
                                         field="concurrency")
            if auto:
                raise ConfigurationError("concurrency > 1 needs ack_mode=MANUAL: with automatic acks nothing "
                                         "bounds the deliveries in memory", field="concurrency")
            if config.prefetch < parallel.handlers:
                raise ConfigurationError(f"prefetch ({config.prefetch}) must be >= concurrency "
                                         f"({parallel.handlers}): the broker sends no more than prefetch "
                                         "unacknowledged deliveries", field="prefetch")
        declared = topology.queue(queue) if topology is not None else None
        if mode is RabbitMQRetryMode.REQUEUE and not auto and declared is not None \
                and declared.type is not RabbitMQQueueType.QUORUM:
            raise ConfigurationError(
                f"retry_mode=REQUEUE needs a quorum queue: it counts attempts with x-delivery-count, which classic "
                f"queue {queue!r} does not keep (a poison message would loop forever); use retry_mode=DELAYED",
                field="retry_mode")
        if declared is not None and declared.dead_letter_exchange is None and not auto:
            logger.warning("queue %r is declared without a dead-letter exchange: messages this consumer dead-letters "
                           "(basic.reject requeue=False) are discarded by the broker", queue)
        self.config = config
        self.queue = queue
        self.retry = retry
        self.retry_mode = mode
        self.topology = topology
        self._batch = config.batch_size > 1
        self._user_handler = handler
        runner_handler: Callable[[Any], Any] = _call_batch(handler) if self._batch else handler
        self.mode = parallel
        concurrent = parallel.handlers > 1
        self.runner: HandlerRunner[Any] = HandlerRunner(runner_handler, retry=retry, decoder=decoder, dedup=dedup,
                                                        dedup_key=dedup_key, loop=loop, concurrent=concurrent,
                                                        handler_timeout=parallel.handler_timeout)
        self._dispatcher: Dispatcher | None = None
        if concurrent:
            self._dispatcher = dispatcher_for(self.runner, handler, parallel, self._job_done,
                                              f"rm-rabbitmq-handler-{queue}", wanted=self._still_wanted)
        self._engine: ConsumerIO | None = None
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False
        self._warned_uncountable = False
        self.error: Exception | None = None
        """Why the consumer stopped on its own (ConsumerCancelled, BrokerUnavailable, TopologyMismatch,
        HandlerAborted...)."""
        self._aborted: BaseException | None = None  # a handler's BaseException, re-raised by run()
        self._handler_aborted: BaseException | None = None  # ... raised on a dispatcher's thread or task

    @property
    def stats(self) -> ConsumerStats:
        """Counters. ``extra`` holds the RabbitMQ ones (acks, multiple_acks, rejects, requeues, retry_copies...).

        With a batch handler, processed/failed count batches and ``extra['messages']`` counts messages.
        """
        return self.runner.stats

    @property
    def running(self) -> bool:
        return self._engine is not None and not self._done.is_set()

    def health(self, *, poll_within: float = 60.0, handler_within: float | None = None) -> Health:
        """Live (running, its I/O thread turned within ``poll_within`` s, no handler over ``handler_within`` s)
        and ready (live and consuming the queue on an open channel). See :mod:`.._health`; no network call."""
        check_limits(poll_within, handler_within)
        engine = self._engine
        in_flight, oldest = self.runner.in_flight()
        return assess(running=self.running, error=self.error, connected=engine is not None and engine.consuming,
                      last_turn=None if engine is None else engine.last_tick, in_flight=in_flight,
                      oldest_start=oldest, poll_within=poll_within, handler_within=handler_within)

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> RabbitMQConsumer:
        """Connect, declare, start consuming in the background; returns self.

        Raises (within ``config.connect_timeout``) BrokerUnavailable, TopologyMismatch, or
        ConfigurationError (refused credentials, missing queue) if consuming cannot start. Inside a
        running event loop it connects on an executor thread: ``await consumer.start()`` waits (and
        raises those) without blocking the loop.
        """
        return self._start_or_schedule()  # type: ignore[no-any-return]

    def stop(self, timeout: float = 30.0) -> Any:
        """Stop consuming, let the handlers in progress finish, acknowledge, close; True once closed.

        Inside a running event loop: an awaitable of that bool (the loop is not blocked). See
        :meth:`_stop_now`.
        """
        return self._stop_or_schedule(timeout)

    def _start_now(self) -> RabbitMQConsumer:
        with self._lock:
            if self._engine is not None:
                if self._done.is_set():
                    raise ClosedError("the consumer was stopped; create a new one")
                raise ConfigurationError("the consumer is already running")
            self._engine = ConsumerIO(self)
        engine = self._engine
        self._worker = threading.Thread(target=self._work, name=f"rm-rabbitmq-worker-{self.queue}", daemon=True)
        self._worker.start()
        try:
            engine.start_thread(self.config.connect_timeout)
        except ReliableMessagingError:
            self._stopping.set()
            engine.deliveries.put(None)
            self._worker.join(5.0)
            self.runner.close()
            self._done.set()
            raise
        return self

    def _stop_now(self, timeout: float) -> bool:
        """Stop consuming, let the handler in progress finish, acknowledge, close; True once closed.

        ``basic.cancel`` goes out first, so no new delivery starts; the message in progress is
        acknowledged (or retried) when its handler returns, then the channel closes and the
        deliveries prefetched but not started go back to the queue (on a quorum queue that return
        counts toward ``x-delivery-count``). Waits at most ``timeout`` seconds: a handler still
        running then keeps the channel open, so its message is not redelivered elsewhere while it
        runs; stop() returns False (a WARNING says so), :attr:`running` stays True, and the
        consumer acknowledges and closes when the handler returns. Idempotent; callable from the
        handler (it returns False: the consumer closes after that handler).
        """
        engine = self._engine
        if engine is None:
            return True
        deadline = time.monotonic() + timeout
        if not self._stopping.is_set():
            self._stopping.set()
            if engine.alive:
                engine.call_soon(engine.cancel_consumer)
        engine.deliveries.put(None)
        worker = self._worker
        if worker is not None:
            if worker is threading.current_thread() or (self._dispatcher and self._dispatcher.on_handler_thread()):
                return False
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                logger.warning("the handler of queue %r is still running %.1fs after stop(): the channel stays open "
                               "until it returns, then its message is acknowledged and the consumer closes",
                               self.queue, timeout)
                return False
        self._close(max(1.0, deadline - time.monotonic()))
        return True

    def _close(self, wait: float) -> None:
        """Settle what finished, close the channel and connection; once (the worker or stop(), whichever first)."""
        with self._close_lock:
            if self._closed:
                return
            engine = self._engine
            if engine is not None:
                if engine.alive:
                    engine.request_close()
                engine.join(wait + CLOSE_GRACE)  # also releases the I/O loop
            self.runner.close()
            self._closed = True
            self._done.set()

    def run(self) -> None:
        """Start (if needed) and block until :meth:`stop` or Ctrl-C (then stops gracefully).

        Raises the reason if the consumer stopped on its own: ConsumerCancelled when the queue
        was deleted, BrokerUnavailable when reconnecting gave up, TopologyMismatch, ...; a
        handler's ``BaseException`` (``SystemExit``...) is re-raised as it was.
        """
        if self._engine is None:
            self._start_now()
        signalled = threading.Event()
        try:
            with graceful_signals(signalled.set, f"the consumer of {self.queue!r}"):
                # Wait on the signal, not on _done: a stop starts the moment SIGTERM arrives (waiting on _done
                # with a timeout let handlers go on starting deliveries for up to that timeout after it).
                while not self._done.is_set():
                    if signalled.wait(0.5):
                        self._stop_now(self.mode.drain_timeout + CLOSE_GRACE)
                        signalled.clear()
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping the consumer of %r", self.queue)
            self._stop_now(30.0)
            return
        if self.error is not None:
            self._stop_now(30.0)
            if self._aborted is not None:
                raise self._aborted
            raise self.error

    def __enter__(self) -> RabbitMQConsumer:
        return self._start_now()

    def __exit__(self, *exc_info: object) -> None:
        self._stop_now(30.0)

    def __repr__(self) -> str:
        return f"<RabbitMQConsumer queue={self.queue!r} running={self.running}>"

    # -- internals ---------------------------------------------------------------------------------------

    def _engine_finished(self, error: ReliableMessagingError | None) -> None:
        """Called on the I/O thread when it ends."""
        if error is not None:
            self.error = error
        self._stopping.set()
        engine = self._engine
        if engine is not None:
            engine.deliveries.put(None)
        if error is not None:
            self._done.set()

    def _work(self) -> None:
        """The worker thread: run the handler on deliveries, in order, until stopped."""
        engine = self._engine
        assert engine is not None
        try:
            if self._batch:
                self._work_batches(engine)
            elif self._dispatcher is not None:
                self._work_concurrent(engine, self._dispatcher)
            else:
                self._work_single(engine)
        except Exception as exc:  # a bug here must stop the consumer visibly, not hang it
            logger.error("the consumer's worker failed: %s: %s", type(exc).__name__, exc)
            logger.debug("worker failure", exc_info=exc)
            self.error = ClosedError(f"the consumer's worker failed: {type(exc).__name__}: {exc}")
            self._stopping.set()
        except BaseException as exc:  # noqa: BLE001 - the handler raised SystemExit, KeyboardInterrupt...
            self._aborted = exc
            self.error = HandlerAborted(f"the handler raised {type(exc).__name__}({exc}): the consumer of "
                                        f"{self.queue!r} stopped; the message is not acknowledged and comes again")
            self.error.__cause__ = exc
            logger.error("%s", self.error)
            self._stopping.set()
        finally:
            if self._stopping.is_set():
                self._close(CLOSE_GRACE)  # stop() may have returned already, its handler still running

    def _message(self, engine: ConsumerIO, item: Delivery) -> tuple[RabbitMQMessage, Outcome | None]:
        _gen, method, properties, body = item
        value, bad = self.runner.decode(body)
        message = message_from_delivery(method, properties, body, queue=self.queue, value=value)
        if (message.redelivered and not self._warned_uncountable and self.retry_mode is RabbitMQRetryMode.REQUEUE
                and not engine.auto_ack and "x-delivery-count" not in message.headers):
            self._warned_uncountable = True
            logger.warning("queue %r redelivered a message without x-delivery-count: it is not a quorum queue, so "
                           "retry_mode=REQUEUE cannot count attempts there; use retry_mode=DELAYED", self.queue)
        return message, bad

    def _work_single(self, engine: ConsumerIO) -> None:
        """Run the handler on each delivery, in order. With a dedup store, every delivery already waiting
        (up to ``prefetch``) is taken at once and their ids claimed with one call to the store."""
        deliveries, results, runner = engine.deliveries, engine.results, self.runner
        auto_ack = engine.auto_ack
        stopping = self._stopping
        dedup = runner.dedup is not None
        most = max(1, self.config.prefetch)
        while not stopping.is_set():
            items = [deliveries.get()]
            while dedup and len(items) < most:
                try:
                    items.append(deliveries.get_nowait())
                except queue_module.Empty:
                    break
            batch: list[tuple[Delivery, RabbitMQMessage, Outcome | None]] = []
            ended = False
            for item in items:
                if item is None:
                    ended = True
                    break
                if item[0] == engine.generation:  # else its channel is gone; the broker redelivers it
                    batch.append((item, *self._message(engine, item)))
            if dedup and batch:
                runner.claim([message for _item, message, bad in batch if bad is None])
            try:
                for item, message, outcome in batch:
                    if stopping.is_set():
                        return  # the rest go back to the queue when the channel closes
                    if item[0] != engine.generation:
                        continue
                    if outcome is None:
                        outcome = runner.invoke(message)
                    if auto_ack:
                        continue
                    results.append((item[0], outcome, (message,), (item[2],)))
                    engine.wake()
            finally:
                if dedup:
                    runner.release_unclaimed()
            if ended:
                return

    def _work_concurrent(self, engine: ConsumerIO, dispatcher: Dispatcher) -> None:
        """Hand each delivery to the dispatcher (its lane: the message's key) until stopped; then drop the
        jobs not started (their deliveries return when the channel closes) and wait for those running."""
        deliveries, results = engine.deliveries, engine.results
        stopping = self._stopping
        mode = self.mode
        try:
            while not stopping.is_set():
                item = deliveries.get()
                if item is None or stopping.is_set():
                    return
                if item[0] != engine.generation:
                    continue  # its channel is gone; the broker redelivers it
                message, bad = self._message(engine, item)
                if bad is not None:
                    results.append((item[0], bad, (message,), (item[2],)))
                    engine.wake()
                    continue
                key = message.key
                dispatcher.submit(Job(mode.lane(key.encode() if isinstance(key, str) else key, None),
                                      message, item))
        finally:
            dispatcher.drop(lambda job: True)
            if not dispatcher.wait(lambda job: True, mode.drain_timeout):
                logger.warning("%d handlers of queue %r still running %.1fs after stopping: the channel closes, "
                               "their messages are redelivered", dispatcher.outstanding(), self.queue,
                               mode.drain_timeout)
            dispatcher.close()
            self._abort_if_a_handler_did()

    def _still_wanted(self, job: Job) -> bool:
        """Whether a job about to start still has its channel and the consumer is not stopping (else the broker
        redelivers its message: a stop lets the handlers running finish, and starts no other)."""
        engine = self._engine
        return (engine is not None and job.ref[0] == engine.generation and self._handler_aborted is None
                and not self._stopping.is_set())

    def _job_done(self, job: Job, error: BaseException | None) -> None:
        """A handler finished (on its thread or task): post its outcome to the I/O thread."""
        engine = self._engine
        if error is not None:
            if self._handler_aborted is None:
                self._handler_aborted = error
            self._stopping.set()
            if engine is not None:
                engine.deliveries.put(None)
                if engine.alive:
                    engine.call_soon(engine.cancel_consumer)
            return
        if job.outcome is None or engine is None:
            return
        item: Delivery = job.ref
        engine.results.append((item[0], job.outcome, (job.message,), (item[2],)))
        engine.wake()

    def _abort_if_a_handler_did(self) -> None:
        """After the dispatcher drained: a handler's BaseException ends the worker as in the one-at-a-time path."""
        error = self._handler_aborted
        if error is not None:
            raise error

    def _work_batches(self, engine: ConsumerIO) -> None:
        deliveries, results, runner = engine.deliveries, engine.results, self.runner
        size, wait = self.config.batch_size, self.config.batch_timeout
        auto_ack = engine.auto_ack
        stopping = self._stopping
        extra = runner.stats.extra
        extra.setdefault("messages", 0)
        while not stopping.is_set():
            first = deliveries.get()
            if first is None or stopping.is_set():
                return
            items = [first]
            until = time.monotonic() + wait
            ended = False
            while len(items) < size:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = deliveries.get(timeout=remaining)
                except queue_module.Empty:
                    break
                if nxt is None:
                    ended = True
                    break
                items.append(nxt)
            generation = engine.generation
            members: list[RabbitMQMessage] = []
            member_props: list[pika.BasicProperties] = []
            for item in items:
                if item[0] != generation:
                    continue
                message, bad = self._message(engine, item)
                if bad is not None:
                    if not auto_ack:
                        results.append((item[0], bad, (message,), (item[2],)))
                    continue
                members.append(message)
                member_props.append(item[2])
            if members:
                batch = _Batch(body=b"", value=None, key=None, message_id=f"batch of {len(members)} from "
                               f"{members[0].message_id or '?'}", attempt=max(m.attempt for m in members),
                               source=self.queue, messages=tuple(members))
                outcome = runner.invoke(batch)
                extra["messages"] += len(members)
                if not auto_ack:
                    results.append((generation, outcome, tuple(members), tuple(member_props)))
            if not auto_ack:
                engine.wake()
            if ended:
                return


def _call_batch(handler: Callable[[list[RabbitMQMessage]], Any]) -> Callable[[_Batch], Any]:
    def call(batch: _Batch) -> Any:
        return handler(list(batch.messages))

    return call
