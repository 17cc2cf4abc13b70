"""The RabbitMQ consumer: manual or automatic acks, retry through requeue or TTL queues, dead-lettering.

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
  ``REQUEUE`` sends ``basic.nack(requeue=True)`` after the delay. When attempts run out (or the
  handler raised :class:`~reliable_messaging.Reject`, or the body could not be decoded) the
  consumer sends ``basic.reject(requeue=False)``: the broker dead-letters the message to the
  queue's ``x-dead-letter-exchange`` with an ``x-death`` entry (reason ``rejected``). A quorum
  queue's ``x-delivery-limit`` dead-letters on the broker's own count (reason ``delivery_limit``).
- **Attempts** are counted from ``x-rm-attempt``, ``x-delivery-count`` and ``x-death``; see
  :mod:`reliable_messaging._rabbitmq._message`. On a quorum queue, every return of an
  unacknowledged message counts, including those caused by stopping or losing a consumer.
- **consumer_timeout.** The seed's claim that RabbitMQ has no acknowledgement timeout is not
  true of current versions: since 3.8.15 the broker closes the *channel* with
  ``406 PRECONDITION_FAILED - delivery acknowledgement on channel N timed out`` when a
  delivery stays unacknowledged longer than ``consumer_timeout`` (default 30 minutes; in 3.10
  a node-wide setting only: the per-queue ``x-consumer-timeout`` argument came in 3.12). The
  broker checks it on the channel's periodic tick (``channel_tick_interval``, 60 s by
  default), so the channel closes between ``consumer_timeout`` and ``consumer_timeout + 60 s``.
  Every unacknowledged message on that channel returns to the queue. This consumer treats it
  like a lost connection: it reconnects, drops the stale acknowledgement of the slow message
  (its delivery tag belonged to the closed channel) and gets the message again with
  ``redelivered=True``. Handlers that may run longer than ``consumer_timeout`` need a larger
  setting on the broker.
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

Threads: an I/O thread owns the connection (heartbeats keep flowing while a handler runs);
one worker thread runs the handler on one message (or batch) at a time, in delivery order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue as queue_module
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.channel
import pika.frame
import pika.spec

from .._dedup._base import DedupStore
from .._errors import ClosedError, ConfigurationError, ConsumerCancelled, HandlerAborted, ReliableMessagingError
from .._handling import ConsumerStats, Disposition, HandlerRunner, Outcome
from .._log import limit_repeats
from .._message import ATTEMPT_HEADER, DEFERRALS_HEADER, Message, header_count
from .._retry import DEFAULT_RETRY_POLICY, RetryPolicy
from ._config import RabbitMQAckMode, RabbitMQConsumerConfig, RabbitMQRetryMode, connection_parameters
from ._connection import IOThread
from ._errors import map_pika_error
from ._message import BROKER_HEADERS, RabbitMQMessage, message_from_delivery
from ._topology import RabbitMQQueueType, RabbitMQTopology, _check_name, retry_queue_name

__all__ = ["RabbitMQConsumer"]

logger = limit_repeats(logging.getLogger("reliable_messaging.rabbitmq.consumer"))

ERROR_HEADER = "x-rm-error"
"""Set on a retried copy: why the previous attempt failed (truncated), for whoever inspects the queue."""

CLOSE_GRACE = 5.0
"""Seconds stop() waits for the broker to confirm retry copies before closing (unconfirmed ones'
originals are redelivered, so a copy and its original may both arrive: deduplicate on message id)."""

_Delivery = tuple[int, pika.spec.Basic.Deliver, pika.BasicProperties, bytes]
_Result = tuple[int, Outcome, tuple[RabbitMQMessage, ...], tuple[pika.BasicProperties, ...]]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Batch(Message):
    """Carries a batch through the shared HandlerRunner (attempt = the highest of its messages)."""

    messages: tuple[RabbitMQMessage, ...] = field(default=())


class _Engine(IOThread):
    """The consumer's I/O thread: channels, consuming, acks, retry copies."""

    role = "RabbitMQ consumer"

    def __init__(self, owner: RabbitMQConsumer) -> None:
        config = owner.config
        params = connection_parameters(config.url, connection_name=config.connection_name,
                                       heartbeat=config.heartbeat, connect_timeout=config.connect_timeout,
                                       role=f"consumer of {owner.queue}")
        super().__init__(params=params, reconnect=config.reconnect, name=f"rm-rabbitmq-consumer-{owner.queue}")
        self.owner = owner
        self.queue = owner.queue
        self.config = config
        self.auto_ack = config.ack_mode is RabbitMQAckMode.AUTO
        self.delayed = owner.retry_mode is RabbitMQRetryMode.DELAYED and not self.auto_ack
        topology = owner.topology or RabbitMQTopology()
        if self.delayed:
            topology = topology + RabbitMQTopology.retry_queues(owner.queue, owner.retry.max_attempts)
        self.topology = topology
        self.max_retry_tier = max(1, owner.retry.max_attempts - 1)
        self.stats: dict[str, int] = owner.runner.stats.extra
        for key in ("acks", "multiple_acks", "rejects", "requeues", "retry_copies", "retry_copy_failures",
                    "stale_results", "channel_failures", "connections"):
            self.stats.setdefault(key, 0)
        # shared with the worker
        self.deliveries: queue_module.SimpleQueue[_Delivery | None] = queue_module.SimpleQueue()
        self.results: collections.deque[_Result] = collections.deque()
        self.generation = 0
        # I/O thread only
        self._channel: pika.channel.Channel | None = None
        self._retry_channel: pika.channel.Channel | None = None
        self._connection_ready = False
        self._consumer_tag: str | None = None
        self._delivered: collections.deque[int] = collections.deque()
        self._settled: set[int] = set()
        self._ack_ready: set[int] = set()
        self._retry_inflight: dict[int, tuple[int, int, str]] = {}
        self._retry_order: collections.deque[int] = collections.deque()
        self._retry_returned: set[int] = set()
        self._retry_tag = 0
        self._delayed_nacks: dict[int, tuple[int, object]] = {}
        self._close_deadline: float | None = None

    # -- setup ------------------------------------------------------------------------------------------

    def on_connection_open(self, connection: pika.SelectConnection) -> None:
        self._connection_ready = False
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self.generation += 1
        self._channel = channel
        self._delivered.clear()
        self._settled.clear()
        self._ack_ready.clear()
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)
        self._declare(channel, self.topology.steps(), 0)

    def _declare(self, channel: Any, steps: list[Any], index: int) -> None:
        if not channel.is_open or channel is not self._channel:
            return
        if index < len(steps):
            _kind, _name, start = steps[index]
            start(channel, lambda _frame: self._declare(channel, steps, index + 1))
        elif self.delayed:
            connection = self.connection
            if connection is not None and connection.is_open:
                connection.channel(on_open_callback=self._on_retry_channel_open)
        else:
            self._qos()

    def _on_retry_channel_open(self, channel: pika.channel.Channel) -> None:
        self._retry_channel = channel
        self._retry_inflight.clear()
        self._retry_order.clear()
        self._retry_returned.clear()
        self._retry_tag = 0
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_retry_return)
        channel.confirm_delivery(ack_nack_callback=self._on_retry_confirm, callback=lambda _frame: self._qos())

    def _qos(self) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        if self.auto_ack:
            self._consume()
        else:
            channel.basic_qos(prefetch_count=self.config.prefetch, callback=lambda _frame: self._consume())

    def _consume(self) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        self._consumer_tag = channel.basic_consume(
            self.queue, self._on_message, auto_ack=self.auto_ack, exclusive=self.config.exclusive,
            consumer_tag=self.config.consumer_tag, callback=self._on_consume_ok)

    def _on_consume_ok(self, _frame: pika.frame.Method) -> None:
        if not self._connection_ready:
            self._connection_ready = True
            self.mark_ready()
            self.stats["connections"] = self.connections

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        if channel is not self._channel and channel is not self._retry_channel:
            return
        consuming = channel is self._channel
        if consuming:
            self._channel = None
        else:
            self._retry_channel = None
        connection = self.connection
        if self.closing or connection is None or not connection.is_open:
            return
        error = map_pika_error(reason, what=f"consuming from {self.queue!r}", name=self.queue)
        if not self._connection_ready:
            self.fail_setup(error, fatal=isinstance(error, ConfigurationError))
            return
        self.stats["channel_failures"] += 1
        # Unacknowledged deliveries of a closed channel went back to the queue; the retry channel's
        # unconfirmed copies have originals that only a new consuming channel can settle. Start over.
        self.close_connection(f"{'consuming' if consuming else 'retry'} channel closed by the broker: {error}")

    def _on_cancelled(self, _frame: pika.frame.Method) -> None:
        self.fail_setup(ConsumerCancelled(
            f"the broker cancelled the consumer of queue {self.queue!r} (the queue was deleted, or its "
            "node went away)"), fatal=True)

    def on_connection_lost(self, error: ReliableMessagingError) -> None:
        self._channel = None
        self._retry_channel = None
        self._retry_inflight.clear()
        self._retry_order.clear()
        self._retry_returned.clear()
        for _gen, handle in self._delayed_nacks.values():
            self.remove_timeout(handle)
        self._delayed_nacks.clear()
        self._delivered.clear()
        self._settled.clear()
        self._ack_ready.clear()
        # Results of this channel's deliveries can no longer be acknowledged: the broker redelivers them.
        self.generation += 1

    # -- deliveries -------------------------------------------------------------------------------------

    def _on_message(self, _channel: pika.channel.Channel, method: pika.spec.Basic.Deliver,
                    properties: pika.BasicProperties, body: bytes) -> None:
        if not self.auto_ack:
            self._delivered.append(method.delivery_tag)
        self.deliveries.put((self.generation, method, properties, body))

    def on_wake(self) -> None:
        results = self.results
        channel = self._channel
        generation = self.generation
        stats = self.stats
        while results:
            gen, outcome, messages, properties = results.popleft()
            if gen != generation or channel is None or not channel.is_open:
                stats["stale_results"] += len(messages)
                continue
            disposition = outcome.disposition
            if disposition is Disposition.ACK:
                for message in messages:
                    self._ack_ready.add(message.delivery_tag)
            elif disposition is Disposition.DEAD_LETTER:
                for message in messages:
                    channel.basic_reject(message.delivery_tag, requeue=False)
                    self._settled.add(message.delivery_tag)
                    stats["rejects"] += 1
            elif self.delayed:
                for message, props in zip(messages, properties, strict=True):
                    self._publish_retry(message, props, outcome, gen)
            else:
                for message in messages:
                    self._requeue_later(message.delivery_tag, outcome.delay, gen)
        self._flush_acks()

    def _flush_acks(self) -> None:
        """Acknowledge what is ready: the settled-or-ready prefix of deliveries with one multiple=True ack."""
        ready = self._ack_ready
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        delivered, settled = self._delivered, self._settled
        highest = 0
        count = 0
        while delivered:
            tag = delivered[0]
            if tag in settled:
                settled.discard(tag)
                delivered.popleft()
            elif tag in ready:
                ready.discard(tag)
                delivered.popleft()
                highest = tag
                count += 1
            else:
                break
        if highest:
            channel.basic_ack(highest, multiple=count > 1)
            self.stats["acks"] += 1
            if count > 1:
                self.stats["multiple_acks"] += 1
        for tag in ready:  # behind an unsettled delivery (a retry waiting for its confirm): one by one
            channel.basic_ack(tag)
            settled.add(tag)
            self.stats["acks"] += 1
        ready.clear()

    def _requeue_later(self, tag: int, delay: float, gen: int) -> None:
        if delay <= 0 or self.closing:
            self._nack_requeue(gen, tag)
            return
        handle = self.call_later(delay, lambda: self._nack_requeue(gen, tag))
        self._delayed_nacks[tag] = (gen, handle)

    def _nack_requeue(self, gen: int, tag: int) -> None:
        self._delayed_nacks.pop(tag, None)
        channel = self._channel
        if gen != self.generation or channel is None or not channel.is_open:
            return
        channel.basic_nack(tag, requeue=True)
        self.stats["requeues"] += 1
        self._settled.add(tag)
        self._flush_acks()

    # -- retry copies (DELAYED mode) --------------------------------------------------------------------

    def _publish_retry(self, message: RabbitMQMessage, original: pika.BasicProperties, outcome: Outcome,
                       gen: int) -> None:
        channel = self._retry_channel
        tag = message.delivery_tag
        if channel is None or not channel.is_open:
            self._retry_failed(gen, tag, message.message_id, "the retry channel is not open")
            return
        attempt = message.attempt + 1 if outcome.counts_attempt else message.attempt
        tier = min(max(1, message.attempt), self.max_retry_tier)
        headers = {k: v for k, v in message.headers.items() if k not in BROKER_HEADERS}
        headers[ATTEMPT_HEADER] = attempt
        headers.pop(DEFERRALS_HEADER, None)
        if not outcome.counts_attempt:  # handed back unrun: the next hand-back waits longer
            headers[DEFERRALS_HEADER] = header_count(message.headers.get(DEFERRALS_HEADER)) + 1
        if outcome.reason:
            headers[ERROR_HEADER] = outcome.reason[:500]
        props = _copy_properties(original, headers, outcome.delay)
        channel.basic_publish("", retry_queue_name(self.queue, tier), message.body, props, mandatory=True)
        self._retry_tag += 1
        self._retry_inflight[self._retry_tag] = (gen, tag, message.message_id)
        self._retry_order.append(self._retry_tag)
        self.stats["retry_copies"] += 1

    def _on_retry_return(self, _channel: pika.channel.Channel, method: pika.spec.Basic.Return,
                         properties: pika.BasicProperties, _body: bytes) -> None:
        mid = properties.message_id or ""
        for rtag in self._retry_order:
            entry = self._retry_inflight.get(rtag)
            if entry is not None and entry[2] == mid and rtag not in self._retry_returned:
                self._retry_returned.add(rtag)
                logger.warning("retry copy of message %s was returned (%s %s): is queue %r missing?", mid,
                               method.reply_code, method.reply_text, method.routing_key)
                return

    def _on_retry_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        ack = isinstance(method, pika.spec.Basic.Ack)
        tags: list[int] = []
        if method.multiple:
            while self._retry_order and self._retry_order[0] <= method.delivery_tag:
                tags.append(self._retry_order.popleft())
        else:
            tags.append(method.delivery_tag)
        for rtag in tags:
            entry = self._retry_inflight.pop(rtag, None)
            if entry is None:
                continue
            gen, tag, mid = entry
            returned = rtag in self._retry_returned
            self._retry_returned.discard(rtag)
            if ack and not returned:
                if gen == self.generation:
                    self._ack_ready.add(tag)
            else:
                why = "the broker nacked the copy" if not ack else "the copy was unroutable"
                self._retry_failed(gen, tag, mid, why)
        while self._retry_order and self._retry_order[0] not in self._retry_inflight:
            self._retry_order.popleft()
        self._flush_acks()

    def _retry_failed(self, gen: int, tag: int, mid: str, why: str) -> None:
        self.stats["retry_copy_failures"] += 1
        logger.warning("could not park message %s in a retry queue (%s): requeueing it instead", mid, why)
        self._nack_requeue(gen, tag)

    # -- stopping ---------------------------------------------------------------------------------------

    def cancel_consumer(self) -> None:
        """Ask the broker to stop sending (basic.cancel); deliveries already sent still arrive."""
        channel = self._channel
        if channel is not None and channel.is_open and self._consumer_tag is not None:
            channel.basic_cancel(self._consumer_tag)

    def begin_close(self) -> None:
        """Settle what the worker finished, send delayed nacks now, let retry copies confirm, then close."""
        self.on_wake()
        for tag, (gen, handle) in list(self._delayed_nacks.items()):
            self.remove_timeout(handle)
            self._nack_requeue(gen, tag)
        if self._retry_inflight and self._close_deadline is None:
            self._close_deadline = time.monotonic() + CLOSE_GRACE
            return  # on_tick closes once copies are confirmed, or the grace period is over
        super().begin_close()

    def on_tick(self) -> None:
        if self._close_deadline is not None and (not self._retry_inflight
                                                 or time.monotonic() >= self._close_deadline):
            self._close_deadline = None
            if self._retry_inflight:
                logger.warning("closing with %d unconfirmed retry copies; their originals will be redelivered",
                               len(self._retry_inflight))
            self.on_wake()
            super().begin_close()

    def on_finished(self, error: ReliableMessagingError | None) -> None:
        self.owner._engine_finished(error)


class RabbitMQConsumer:
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
        self.runner: HandlerRunner[Any] = HandlerRunner(runner_handler, retry=retry, decoder=decoder, dedup=dedup,
                                                        dedup_key=dedup_key, loop=loop)
        self._engine: _Engine | None = None
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False
        self._warned_uncountable = False
        self.error: ReliableMessagingError | None = None
        """Why the consumer stopped on its own (ConsumerCancelled, BrokerUnavailable, TopologyMismatch,
        HandlerAborted...)."""
        self._aborted: BaseException | None = None  # a handler's BaseException, re-raised by run()

    @property
    def stats(self) -> ConsumerStats:
        """Counters. ``extra`` holds the RabbitMQ ones (acks, multiple_acks, rejects, requeues, retry_copies...).

        With a batch handler, processed/failed count batches and ``extra['messages']`` counts messages.
        """
        return self.runner.stats

    @property
    def running(self) -> bool:
        return self._engine is not None and not self._done.is_set()

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> RabbitMQConsumer:
        """Connect, declare, start consuming in the background; returns self.

        Raises (within ``config.connect_timeout``) BrokerUnavailable, TopologyMismatch, or
        ConfigurationError (refused credentials, missing queue) if consuming cannot start.
        """
        with self._lock:
            if self._engine is not None:
                raise ClosedError("the consumer was already started (a consumer starts once)")
            self._engine = _Engine(self)
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

    def stop(self, timeout: float = 30.0) -> bool:
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
            if worker is threading.current_thread():
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
            self.start()
        try:
            while not self._done.wait(0.5):
                pass
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping the consumer of %r", self.queue)
            self.stop()
            return
        if self.error is not None:
            self.stop()
            if self._aborted is not None:
                raise self._aborted
            raise self.error

    def __enter__(self) -> RabbitMQConsumer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

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

    def _message(self, engine: _Engine, item: _Delivery) -> tuple[RabbitMQMessage, Outcome | None]:
        _gen, method, properties, body = item
        value, bad = self.runner.decode(body)
        message = message_from_delivery(method, properties, body, queue=self.queue, value=value)
        if (message.redelivered and not self._warned_uncountable and self.retry_mode is RabbitMQRetryMode.REQUEUE
                and not engine.auto_ack and "x-delivery-count" not in message.headers):
            self._warned_uncountable = True
            logger.warning("queue %r redelivered a message without x-delivery-count: it is not a quorum queue, so "
                           "retry_mode=REQUEUE cannot count attempts there; use retry_mode=DELAYED", self.queue)
        return message, bad

    def _work_single(self, engine: _Engine) -> None:
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
            batch: list[tuple[_Delivery, RabbitMQMessage, Outcome | None]] = []
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

    def _work_batches(self, engine: _Engine) -> None:
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


def _copy_properties(original: pika.BasicProperties, headers: dict[str, Any], delay: float) -> pika.BasicProperties:
    """The properties of a retry copy: the original's, with new headers and the retry delay as expiration.

    ``user_id`` is dropped: the broker refuses (406) a user_id that is not the publishing
    connection's user, and the copy is published by this consumer's user. The copy is persistent
    so a broker restart does not lose a message parked for retry.
    """
    return pika.BasicProperties(
        content_type=original.content_type, content_encoding=original.content_encoding, headers=headers,
        delivery_mode=2, priority=original.priority, correlation_id=original.correlation_id,
        reply_to=original.reply_to, expiration=str(max(0, int(delay * 1000))), message_id=original.message_id,
        timestamp=original.timestamp, type=original.type, app_id=original.app_id, cluster_id=original.cluster_id,
    )
