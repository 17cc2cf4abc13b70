"""The RabbitMQ consumer's I/O thread: channels, consuming, acks, retry copies and dead letters.

pika is not thread-safe: this thread alone touches the connection. The worker thread
(:mod:`._consumer`) hands it each outcome through ``results`` and wakes it; it carries the outcome
out with the broker's primitives and coalesces consecutive acks into one ``multiple=True``.

- **Retry copies** (``DELAYED`` mode): a copy goes to ``<queue>.retry.<n>`` with the retry delay as
  its ``expiration`` on a second, confirming channel; the original is acked once the broker confirms
  the copy (a copy nacked or returned requeues the original instead).
- **Dead letters**: a copy with the library's headers (:mod:`.._headers`: origin, attempt, reason,
  error type and message, first failure) goes to the queue's dead-letter exchange, confirmed and
  ``mandatory``; the original is acked once the copy is confirmed. If the copy cannot be published, or
  the queue was declared without the library (no known dead-letter exchange), the consumer sends
  ``basic.reject(requeue=False)`` and the broker dead-letters it with its ``x-death`` header only.
  A quorum queue's ``x-delivery-limit`` still dead-letters on the broker's own count (``x-death``
  reason ``delivery_limit``).
"""

from __future__ import annotations

import collections
import logging
import queue as queue_module
import time
from typing import Any

import pika
import pika.channel
import pika.frame
import pika.spec

from .._errors import ConfigurationError, ConsumerCancelled, ReliableMessagingError
from .._handling import Disposition, Outcome
from .._headers import DEFERRALS, failure_headers
from .._log import limit_repeats
from .._message import header_count
from ._config import RabbitMQAckMode, RabbitMQRetryMode, connection_parameters
from ._connection import IOThread
from ._errors import map_pika_error
from ._message import BROKER_HEADERS, RabbitMQMessage
from ._topology import RabbitMQTopology, retry_queue_name

__all__ = ["CLOSE_GRACE", "ConsumerIO", "Delivery", "Result"]

logger = limit_repeats(logging.getLogger("reliable_messaging.rabbitmq.consumer"))

CLOSE_GRACE = 5.0
"""Seconds closing waits for the broker to confirm copies (retry or dead letter) before closing (the
originals of unconfirmed ones are redelivered, so a copy and its original may both arrive: deduplicate
on message id)."""

Delivery = tuple[int, pika.spec.Basic.Deliver, pika.BasicProperties, bytes]
Result = tuple[int, Outcome, tuple[RabbitMQMessage, ...], tuple[pika.BasicProperties, ...]]


class ConsumerIO(IOThread):
    """The consumer's I/O thread: channels, consuming, acks, retry copies and dead letters."""

    role = "RabbitMQ consumer"

    def __init__(self, owner: Any) -> None:
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
        declared = owner.topology.queue(owner.queue) if owner.topology is not None else None
        self.dead_letter: tuple[str, str] | None = None
        """Where dead letters are published (the queue's x-dead-letter-exchange and routing key), if known."""
        if declared is not None and declared.dead_letter_exchange is not None:
            self.dead_letter = (declared.dead_letter_exchange, declared.dead_letter_routing_key or owner.queue)
        topology = owner.topology or RabbitMQTopology()
        if self.delayed:
            topology = topology + RabbitMQTopology.retry_queues(owner.queue, owner.retry.max_attempts)
        self.topology = topology
        self.max_retry_tier = max(1, owner.retry.max_attempts - 1)
        self.stats: dict[str, int] = owner.runner.stats.extra
        for key in ("acks", "multiple_acks", "rejects", "requeues", "retry_copies", "retry_copy_failures",
                    "dead_letter_copies", "dead_letter_copy_failures", "stale_results", "channel_failures",
                    "connections"):
            self.stats.setdefault(key, 0)
        # shared with the worker
        self.deliveries: queue_module.SimpleQueue[Delivery | None] = queue_module.SimpleQueue()
        self.results: collections.deque[Result] = collections.deque()
        self.generation = 0
        # I/O thread only
        self._channel: pika.channel.Channel | None = None
        self._copy_channel: pika.channel.Channel | None = None  # publishes retry copies and dead letters
        self._connection_ready = False
        self._consumer_tag: str | None = None
        self._delivered: collections.deque[int] = collections.deque()
        self._settled: set[int] = set()
        self._ack_ready: set[int] = set()
        self._copies: dict[int, tuple[int, int, str, bool]] = {}  # copy tag -> (gen, tag, message id, dead letter)
        self._copy_order: collections.deque[int] = collections.deque()
        self._copy_returned: set[int] = set()
        self._copy_tag = 0
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
        elif not self.auto_ack:  # a confirming channel for retry copies and dead letters
            connection = self.connection
            if connection is not None and connection.is_open:
                connection.channel(on_open_callback=self._on_copy_channel_open)
        else:
            self._qos()

    def _on_copy_channel_open(self, channel: pika.channel.Channel) -> None:
        self._copy_channel = channel
        self._copies.clear()
        self._copy_order.clear()
        self._copy_returned.clear()
        self._copy_tag = 0
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_copy_return)
        channel.confirm_delivery(ack_nack_callback=self._on_copy_confirm, callback=lambda _frame: self._qos())

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

    @property
    def consuming(self) -> bool:
        """(any thread, for health()) The queue is being consumed on an open channel of a live connection."""
        return self._connection_ready and self._channel is not None

    def _on_consume_ok(self, _frame: pika.frame.Method) -> None:
        if not self._connection_ready:
            self._connection_ready = True
            self.mark_ready()
            self.stats["connections"] = self.connections

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        if channel is not self._channel and channel is not self._copy_channel:
            return
        consuming = channel is self._channel
        if consuming:
            self._channel = None
            # Its unacknowledged deliveries went back to the queue as it closed: the worker must not start
            # one now (the broker redelivers it, maybe elsewhere), nor wait for the connection to close.
            self.generation += 1
        else:
            self._copy_channel = None
        connection = self.connection
        if self.closing or connection is None or not connection.is_open:
            return
        error = map_pika_error(reason, what=f"consuming from {self.queue!r}", name=self.queue)
        if not self._connection_ready:
            self.fail_setup(error, fatal=isinstance(error, ConfigurationError))
            return
        self.stats["channel_failures"] += 1
        # Unacknowledged deliveries of a closed channel went back to the queue; the copy channel's
        # unconfirmed copies have originals that only a new consuming channel can settle. Start over.
        self.close_connection(f"{'consuming' if consuming else 'copy'} channel closed by the broker: {error}")

    def _on_cancelled(self, _frame: pika.frame.Method) -> None:
        self.fail_setup(ConsumerCancelled(
            f"the broker cancelled the consumer of queue {self.queue!r} (the queue was deleted, or its "
            "node went away)"), fatal=True)

    def on_connection_lost(self, error: ReliableMessagingError) -> None:
        self._channel = None
        self._copy_channel = None
        self._copies.clear()
        self._copy_order.clear()
        self._copy_returned.clear()
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
                for message, props in zip(messages, properties, strict=True):
                    self._dead_letter(message, props, outcome, gen)
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

    def _reject(self, gen: int, tag: int) -> None:
        """basic.reject(requeue=False): the broker dead-letters the message itself (with ``x-death``)."""
        channel = self._channel
        if gen != self.generation or channel is None or not channel.is_open:
            return
        channel.basic_reject(tag, requeue=False)
        self.stats["rejects"] += 1
        self._settled.add(tag)
        self._flush_acks()

    # -- copies: retry (DELAYED mode) and dead letters ------------------------------------------------

    def _dead_letter(self, message: RabbitMQMessage, original: pika.BasicProperties, outcome: Outcome,
                     gen: int) -> None:
        """A copy with the library's headers to the queue's dead-letter exchange; the original is acked once
        the broker confirms the copy. Without a known dead-letter exchange (the queue was declared elsewhere)
        or a copy channel, basic.reject lets the broker dead-letter it (``x-death`` only)."""
        if self.dead_letter is None or self._copy_channel is None or not self._copy_channel.is_open:
            self._reject(gen, message.delivery_tag)
            return
        headers = failure_headers(_own_headers(message), origin=self.queue, reason=outcome.reason,
                                  error=outcome.error, attempt=message.attempt)
        exchange, routing_key = self.dead_letter
        self._publish_copy(message, _copy_properties(original, headers, None), exchange, routing_key, gen,
                           dead=True)
        self.stats["dead_letter_copies"] += 1

    def _publish_retry(self, message: RabbitMQMessage, original: pika.BasicProperties, outcome: Outcome,
                       gen: int) -> None:
        if self._copy_channel is None or not self._copy_channel.is_open:
            self._copy_failed(gen, message.delivery_tag, message.message_id, "the copy channel is not open", False)
            return
        attempt = message.attempt + 1 if outcome.counts_attempt else message.attempt
        deferrals = None if outcome.counts_attempt else header_count(message.headers.get(DEFERRALS)) + 1
        headers = failure_headers(_own_headers(message), origin=self.queue, reason=outcome.reason,
                                  error=outcome.error, attempt=attempt, deferrals=deferrals)
        tier = min(max(1, message.attempt), self.max_retry_tier)
        self._publish_copy(message, _copy_properties(original, headers, outcome.delay), "",
                           retry_queue_name(self.queue, tier), gen, dead=False)
        self.stats["retry_copies"] += 1

    def _publish_copy(self, message: RabbitMQMessage, props: pika.BasicProperties, exchange: str, routing_key: str,
                      gen: int, *, dead: bool) -> None:
        channel = self._copy_channel
        assert channel is not None
        channel.basic_publish(exchange, routing_key, message.body, props, mandatory=True)
        self._copy_tag += 1
        self._copies[self._copy_tag] = (gen, message.delivery_tag, message.message_id, dead)
        self._copy_order.append(self._copy_tag)

    def _on_copy_return(self, _channel: pika.channel.Channel, method: pika.spec.Basic.Return,
                        properties: pika.BasicProperties, _body: bytes) -> None:
        mid = properties.message_id or ""
        for ctag in self._copy_order:
            entry = self._copies.get(ctag)
            if entry is not None and entry[2] == mid and ctag not in self._copy_returned:
                self._copy_returned.add(ctag)
                logger.warning("%s of message %s was returned (%s %s): is queue %r missing?",
                               "dead letter" if entry[3] else "retry copy", mid, method.reply_code,
                               method.reply_text, method.routing_key)
                return

    def _on_copy_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        ack = isinstance(method, pika.spec.Basic.Ack)
        tags: list[int] = []
        if method.multiple:
            while self._copy_order and self._copy_order[0] <= method.delivery_tag:
                tags.append(self._copy_order.popleft())
        else:
            tags.append(method.delivery_tag)
        for ctag in tags:
            entry = self._copies.pop(ctag, None)
            if entry is None:
                continue
            gen, tag, mid, dead = entry
            returned = ctag in self._copy_returned
            self._copy_returned.discard(ctag)
            if ack and not returned:
                if gen == self.generation:
                    self._ack_ready.add(tag)
            else:
                why = "the broker nacked the copy" if not ack else "the copy was unroutable"
                self._copy_failed(gen, tag, mid, why, dead)
        while self._copy_order and self._copy_order[0] not in self._copies:
            self._copy_order.popleft()
        self._flush_acks()

    def _copy_failed(self, gen: int, tag: int, mid: str, why: str, dead: bool) -> None:
        if dead:
            self.stats["dead_letter_copy_failures"] += 1
            logger.warning("could not publish the dead letter of message %s (%s): rejecting it instead (the "
                           "broker dead-letters it without the library's headers)", mid, why)
            self._reject(gen, tag)
            return
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
        if self._copies and self._close_deadline is None:
            self._close_deadline = time.monotonic() + CLOSE_GRACE
            return  # on_tick closes once copies are confirmed, or the grace period is over
        super().begin_close()

    def on_tick(self) -> None:
        if self._close_deadline is not None and (not self._copies or time.monotonic() >= self._close_deadline):
            self._close_deadline = None
            if self._copies:
                logger.warning("closing with %d unconfirmed copies (retry or dead letter); their originals will "
                               "be redelivered", len(self._copies))
            self.on_wake()
            super().begin_close()

    def on_finished(self, error: ReliableMessagingError | None) -> None:
        self.owner._engine_finished(error)


def _own_headers(message: RabbitMQMessage) -> dict[str, Any]:
    """The message's headers without the ones the broker sets (and would refuse, or count twice, on a copy)."""
    return {k: v for k, v in message.headers.items() if k not in BROKER_HEADERS}


def _copy_properties(original: pika.BasicProperties, headers: dict[str, Any],
                     delay: float | None) -> pika.BasicProperties:
    """The properties of a copy: the original's, with new headers (and the retry delay as expiration).

    ``user_id`` is dropped: the broker refuses (406) a user_id that is not the publishing
    connection's user, and the copy is published by this consumer's user. The copy is persistent
    so a broker restart does not lose a message parked for retry.
    """
    return pika.BasicProperties(
        content_type=original.content_type, content_encoding=original.content_encoding, headers=headers,
        delivery_mode=2, priority=original.priority, correlation_id=original.correlation_id,
        reply_to=original.reply_to, expiration=None if delay is None else str(max(0, int(delay * 1000))),
        message_id=original.message_id,
        timestamp=original.timestamp, type=original.type, app_id=original.app_id, cluster_id=original.cluster_id,
    )
