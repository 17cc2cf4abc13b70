"""The RabbitMQ publisher: pipelined publisher confirms, mandatory returns, reconnect and republish.

What the broker does, and what the publisher does about it:

- **Confirms.** After ``confirm.select`` the broker numbers the channel's publishes
  1, 2, 3, ... and answers each with ``basic.ack`` (it has taken responsibility: for a
  persistent message on a durable queue, after writing it to disk; for a quorum queue,
  once a majority of replicas has it) or ``basic.nack`` (it has not: e.g. a full queue
  with ``x-overflow=reject-publish``). One frame may answer many publishes
  (``multiple=True``: every tag up to this one). The publisher keeps up to
  ``max_in_flight`` publishes unconfirmed on the wire and never waits for one answer
  before sending the next.
- **Returns.** A ``mandatory`` message that no queue is bound for comes back as
  ``basic.return`` (reply 312 ``NO_ROUTE``) and is then *acked*: the broker sends the
  return before the ack, so the publisher marks the message by its id when the return
  arrives and fails exactly that future with :class:`~reliable_messaging.Unroutable`
  when the ack follows. (An alternate exchange that routes it counts as routed.)
- **Connection loss.** Confirms do not survive a connection: every unconfirmed publish
  is republished, in order and with its original message id, on the next connection
  (after the topology is declared again: a queue declared just before a broker crash
  can be missing after the restart), and its future resolves only when *that* publish
  is confirmed. The broker may then hold two copies of a message whose first confirm
  was lost: consumers deduplicate on the message id.
- **Channel errors.** Publishing to an exchange that does not exist makes the broker
  close the channel (404) and drop every later publish on it; the publisher fails the
  messages for that exchange with :class:`~reliable_messaging.DeliveryFailed` (code 404)
  and republishes the others on a new channel.
- **Flow control.** Under a memory or disk alarm the broker sends ``connection.blocked``
  and stops reading from publishing connections. The publisher stops sending; publishes
  still pending ``blocked_timeout`` seconds into the block fail with
  :class:`~reliable_messaging.DeliveryTimeout`.

Threading: ``publish()`` may be called from any thread. It validates the message, puts
it on a queue and wakes the I/O thread once per batch; the I/O thread alone touches
pika. Futures are resolved on the I/O thread: keep their callbacks short.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec

from .._errors import (
    BrokerUnavailable,
    ClosedError,
    ConfigurationError,
    DeliveryError,
    DeliveryFailed,
    DeliveryTimeout,
    InvalidMessage,
    Nacked,
    ReliableMessagingError,
    Unroutable,
)
from .._log import limit_repeats
from .._message import Delivery, DeliveryFuture, coerce_body, new_message_id
from ._config import RabbitMQPublisherConfig, connection_parameters
from ._connection import IOThread
from ._errors import NOT_FOUND, map_pika_error
from ._message import check_headers, check_short_string
from ._topology import RabbitMQTopology

__all__ = ["RabbitMQPublisher", "RabbitMQPublisherStats"]

logger = limit_repeats(logging.getLogger("reliable_messaging.rabbitmq.publisher"))

MAX_CHANNEL_FAILURES = 3
"""A message in flight on this many channels that the broker closed (for a reason the publisher
cannot pin on one exchange) fails with DeliveryFailed instead of being republished again."""

_PERSISTENT, _TRANSIENT = 2, 1


@dataclass
class RabbitMQPublisherStats:
    """Counters of one publisher (updated by its I/O thread; plain ints, read them any time)."""

    published: int = 0
    """publish() calls accepted."""
    confirmed: int = 0
    """Futures resolved by basic.ack."""
    unconfirmed: int = 0
    """Futures resolved without confirms (``confirms=False``): handed to the socket, not acknowledged."""
    nacked: int = 0
    """Futures failed by basic.nack."""
    returned: int = 0
    """Futures failed by basic.return (Unroutable)."""
    timed_out: int = 0
    """Futures failed by the delivery deadline, a long connection.blocked, or close()."""
    failed: int = 0
    """Futures failed otherwise (channel errors, encoding errors, fatal errors)."""
    republished: int = 0
    """Publishes sent again after a connection or channel was lost before their confirm."""
    multiple_acks: int = 0
    """basic.ack/nack frames with multiple=True."""
    max_in_flight: int = 0
    """Highest number of unconfirmed publishes seen on the wire."""
    connections: int = 0
    """Connections set up (1 + reconnects)."""
    channel_failures: int = 0
    """Channels the broker closed under the publisher (e.g. 404 on a missing exchange)."""
    blocked: int = 0
    """connection.blocked notifications received."""


class _Pending:
    """One publish until the broker answers it."""

    __slots__ = ("body", "channel_failures", "deadline", "done", "enqueued", "exchange", "future", "mandatory",
                 "properties", "returned", "routing_key", "sent")

    def __init__(self, future: DeliveryFuture, exchange: str, routing_key: str, body: bytes,
                 properties: pika.BasicProperties, mandatory: bool, enqueued: float, deadline: float) -> None:
        self.future = future
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.properties = properties
        self.mandatory = mandatory
        self.enqueued = enqueued
        self.deadline = deadline
        self.returned: Unroutable | None = None
        self.sent = False
        self.done = False  # resolved; a plain flag, cheaper than Future.done() (which takes a lock)
        self.channel_failures = 0


class _Engine(IOThread):
    """The publisher's I/O thread: channel, confirm window, returns, deadlines."""

    role = "RabbitMQ publisher"

    def __init__(self, config: RabbitMQPublisherConfig, topology: RabbitMQTopology | None) -> None:
        params = connection_parameters(config.url, connection_name=config.connection_name,
                                       heartbeat=config.heartbeat, connect_timeout=config.connect_timeout,
                                       role="publisher")
        super().__init__(params=params, reconnect=config.reconnect, name="rm-rabbitmq-publisher")
        self.config = config
        self.topology = topology
        self.stats = RabbitMQPublisherStats()
        # Shared with publishing threads (deque appends/pops are atomic).
        self.outbox: collections.deque[_Pending] = collections.deque()
        self.space = threading.Condition()
        self.space_waiters = 0
        # I/O thread only.
        self._channel: pika.channel.Channel | None = None
        self._channel_ready = False
        self._connection_ready = False
        self._declaring = False
        self._inflight: dict[int, _Pending] = {}
        self._order: collections.deque[int] = collections.deque()
        self._next_tag = 0
        self._returnable: dict[str, _Pending] = {}
        self._returnable_more: dict[str, collections.deque[_Pending]] = {}
        self._blocked_since: float | None = None
        self._blocked_reason = ""
        self._flush_waiters: list[threading.Event] = []
        self._window = config.max_in_flight
        self._blocked_timeout = config.blocked_timeout
        self._confirms = config.confirms

    # -- connection and channel setup ---------------------------------------------------------------

    def on_connection_open(self, connection: pika.SelectConnection) -> None:
        self._connection_ready = False
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._open_channel(connection)

    def _open_channel(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        self._channel_ready = False
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        steps = self.topology.steps() if self.topology is not None else []
        self._declaring = True
        self._declare(channel, steps, 0)

    def _declare(self, channel: Any, steps: list[Any], index: int) -> None:
        if not channel.is_open or channel is not self._channel:
            return
        if index == len(steps):
            self._declaring = False
            self._confirm_select(channel)
            return
        _kind, _name, start = steps[index]
        start(channel, lambda _frame: self._declare(channel, steps, index + 1))

    def _confirm_select(self, channel: Any) -> None:
        if not self._confirms:
            self._on_confirm_ok(None)
            return
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_ok)

    def _on_confirm_ok(self, _frame: pika.frame.Method | None) -> None:
        self._next_tag = 0
        self._channel_ready = True
        if not self._connection_ready:
            self._connection_ready = True
            self.mark_ready()
            self.stats.connections = self.connections
        self._drain()

    def _on_channel_closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        self._channel_ready = False
        connection = self.connection
        if self.closing or connection is None or not connection.is_open:
            self._declaring = False
            self._requeue_inflight()
            return
        if self._declaring:
            self._declaring = False
            error = map_pika_error(reason, what="declaring the publisher's topology")
            self.fail_setup(error, fatal=isinstance(error, ConfigurationError))
            return
        self.stats.channel_failures += 1
        code = getattr(reason, "reply_code", None)
        text = getattr(reason, "reply_text", str(reason))
        logger.warning("RabbitMQ closed the publishing channel: %s %s; republishing %d unconfirmed message(s) "
                       "on a new channel", code, text, len(self._inflight))
        logger.debug("publishing channel close detail", exc_info=reason)
        self._requeue_inflight(channel_error=(code, text))
        self._open_channel(connection)

    def on_connection_lost(self, error: ReliableMessagingError) -> None:
        self._channel = None
        self._channel_ready = False
        self._declaring = False
        self._blocked_since = None
        if self._inflight:
            logger.warning("%d unconfirmed message(s) will be republished after reconnecting", len(self._inflight))
        self._requeue_inflight()

    def _requeue_inflight(self, channel_error: tuple[Any, str] | None = None) -> None:
        """Put every unconfirmed publish back at the front of the queue, in its original order."""
        items = [p for p in (self._inflight.get(tag) for tag in self._order) if p is not None]
        self._inflight.clear()
        self._order.clear()
        self._returnable.clear()
        self._returnable_more.clear()
        keep: list[_Pending] = []
        missing_exchange = None
        if channel_error is not None and channel_error[0] == NOT_FOUND and "no exchange '" in channel_error[1]:
            missing_exchange = channel_error[1].split("no exchange '", 1)[1].split("'", 1)[0]
        for p in items:
            p.returned = None
            if channel_error is not None:
                code, text = channel_error
                if missing_exchange is not None and p.exchange == missing_exchange:
                    self._fail(p, DeliveryFailed(f"exchange {p.exchange!r} does not exist: {code} {text}",
                                                 message_id=p.future.message_id, code=code))
                    continue
                p.channel_failures += 1
                if missing_exchange is None and p.channel_failures >= MAX_CHANNEL_FAILURES:
                    self._fail(p, DeliveryFailed(
                        f"the broker closed {p.channel_failures} channels while this message was in flight: "
                        f"{code} {text}", message_id=p.future.message_id, code=code))
                    continue
            keep.append(p)
        self.outbox.extendleft(reversed(keep))

    # -- flow control -----------------------------------------------------------------------------------

    def _on_blocked(self, _connection: pika.SelectConnection, frame: pika.frame.Method) -> None:
        self._blocked_since = time.monotonic()
        self._blocked_reason = getattr(frame.method, "reason", "") or "no reason given"
        self.stats.blocked += 1
        logger.warning("RabbitMQ blocked the publisher's connection (%s); pending publishes fail after %.1fs",
                       self._blocked_reason, self._blocked_timeout)

    def _on_unblocked(self, _connection: pika.SelectConnection, _frame: pika.frame.Method) -> None:
        if self._blocked_since is not None:
            logger.warning("RabbitMQ unblocked the publisher's connection after %.1fs",
                           time.monotonic() - self._blocked_since)
        self._blocked_since = None
        self._drain()

    # -- sending ----------------------------------------------------------------------------------------

    def on_wake(self) -> None:
        self._drain()

    def wants_wake(self) -> bool:
        """Whether a publish just queued needs the I/O thread woken (read from publishing threads).

        Not while the window is full (the next confirm drains the queue) nor while no channel is
        ready (setting one up drains it): most wake-ups, each a pipe write plus a GIL hand-over,
        are saved when publishing outruns the broker. The publisher appends before asking and
        the I/O thread updates these before draining, so no publish is left behind; the periodic
        tick drains as a backstop.
        """
        return self._channel_ready and len(self._inflight) < self._window

    def _drain(self) -> None:
        channel = self._channel
        if channel is None or not self._channel_ready or self._blocked_since is not None:
            return
        outbox, inflight, order = self.outbox, self._inflight, self._order
        window = self._window
        publish = channel.basic_publish
        tag = self._next_tag
        returnable = self._returnable
        stats = self.stats
        connection = self.connection
        if connection is None:
            return
        connection.cork()
        try:
            tag = self._publish_batch(publish, tag, outbox, inflight, order, window, returnable, stats)
        finally:
            connection.uncork()
        self._next_tag = tag
        if len(inflight) > stats.max_in_flight:
            stats.max_in_flight = len(inflight)
        if self.space_waiters:
            with self.space:
                self.space.notify_all()

    def _publish_batch(self, publish: Any, tag: int, outbox: collections.deque[_Pending],
                       inflight: dict[int, _Pending], order: collections.deque[int], window: int,
                       returnable: dict[str, _Pending], stats: RabbitMQPublisherStats) -> int:
        while outbox and len(inflight) < window:
            p = outbox.popleft()
            if p.done:  # failed by its deadline while waiting
                continue
            try:
                publish(p.exchange, p.routing_key, p.body, p.properties, p.mandatory)
            except (pika.exceptions.ChannelWrongStateError, pika.exceptions.ConnectionWrongStateError):
                outbox.appendleft(p)  # the channel is going away; its close callback follows
                break
            except (pika.exceptions.AMQPError, ValueError, TypeError, struct.error) as exc:
                # Encoding failed before a byte was sent: the broker never saw it; only this message fails.
                self._fail(p, _as_delivery_error(map_pika_error(exc, what="encoding a publish")
                                                 if isinstance(exc, pika.exceptions.AMQPError)
                                                 else InvalidMessage(f"cannot encode the message: {exc}"), p))
                continue
            if not self._confirms:
                # At-most-once: handed to the socket is all that is known; nothing to wait for.
                p.done = True
                p.sent = True
                stats.unconfirmed += 1
                p.future.set_result(Delivery(p.future.message_id, p.exchange, p.routing_key))
                continue
            tag += 1
            inflight[tag] = p
            order.append(tag)
            if p.sent:
                stats.republished += 1
            p.sent = True
            if p.mandatory:
                mid = p.future.message_id
                if mid in returnable:
                    self._returnable_more.setdefault(mid, collections.deque()).append(p)
                else:
                    returnable[mid] = p
        return tag

    # -- broker answers ---------------------------------------------------------------------------------

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        tag = method.delivery_tag
        ack = isinstance(method, pika.spec.Basic.Ack)
        inflight, order = self._inflight, self._order
        if method.multiple:
            self.stats.multiple_acks += 1
            while order and order[0] <= tag:
                p = inflight.pop(order.popleft(), None)
                if p is not None:
                    self._settle(p, ack)
        else:
            p = inflight.pop(tag, None)
            if p is not None:
                self._settle(p, ack)
            while order and order[0] not in inflight:
                order.popleft()
        self._drain()
        if self._flush_waiters:
            self._check_flushed()

    def _settle(self, p: _Pending, ack: bool) -> None:
        p.done = True
        if p.mandatory:
            self._forget_returnable(p)
        future = p.future
        if not ack:
            self.stats.nacked += 1
            future.set_exception(Nacked(
                f"the broker nacked message {future.message_id} (exchange {p.exchange!r}, routing key "
                f"{p.routing_key!r}): it did not take responsibility for it (e.g. a full queue with "
                "x-overflow=reject-publish)", message_id=future.message_id))
        elif p.returned is not None:
            self.stats.returned += 1
            future.set_exception(p.returned)
        else:
            self.stats.confirmed += 1
            future.set_result(Delivery(future.message_id, p.exchange, p.routing_key))

    def _forget_returnable(self, p: _Pending) -> None:
        mid = p.future.message_id
        if self._returnable.get(mid) is p:
            more = self._returnable_more.get(mid)
            if more:
                self._returnable[mid] = more.popleft()
                if not more:
                    del self._returnable_more[mid]
            else:
                del self._returnable[mid]
        else:
            more = self._returnable_more.get(mid)
            if more is not None and p in more:
                more.remove(p)
                if not more:
                    del self._returnable_more[mid]

    def _on_return(self, _channel: pika.channel.Channel, method: pika.spec.Basic.Return,
                   properties: pika.BasicProperties, _body: bytes) -> None:
        mid = properties.message_id or ""
        candidates = [self._returnable.get(mid), *self._returnable_more.get(mid, ())]
        p = next((c for c in candidates if c is not None and c.returned is None), None)
        if p is None:
            logger.debug("basic.return for message %r that is no longer pending", mid)
            return
        p.returned = Unroutable(
            f"message {mid} was returned by the broker: {method.reply_code} {method.reply_text} "
            f"(exchange {method.exchange!r}, routing key {method.routing_key!r}): no queue is bound for it",
            message_id=mid, reply_code=method.reply_code, reply_text=method.reply_text,
            exchange=method.exchange, routing_key=method.routing_key,
        )

    # -- deadlines, flush, close ------------------------------------------------------------------------

    def on_tick(self) -> None:
        now = time.monotonic()
        blocked_since = self._blocked_since
        blocked_timeout = self._blocked_timeout

        def expired(p: _Pending) -> str | None:
            if p.deadline <= now:
                return f"no confirm from the broker within delivery_timeout={self.config.delivery_timeout}s"
            if blocked_since is not None and now - max(p.enqueued, blocked_since) >= blocked_timeout:
                return (f"the broker blocked the connection ({self._blocked_reason}) for more than "
                        f"blocked_timeout={blocked_timeout}s")
            return None

        order, inflight = self._order, self._inflight
        while order:
            tag = order[0]
            p = inflight.get(tag)
            if p is None:
                order.popleft()
                continue
            why = expired(p)
            if why is None:
                break
            order.popleft()
            del inflight[tag]
            if p.mandatory:
                self._forget_returnable(p)
            self._timeout(p, why)
        outbox = self.outbox
        while outbox:
            p = outbox[0]
            if p.done:
                outbox.popleft()
                continue
            why = expired(p)
            if why is None:
                break
            outbox.popleft()
            self._timeout(p, why)
        if self._flush_waiters:
            self._check_flushed()
        if self.space_waiters:
            with self.space:
                self.space.notify_all()
        if outbox:
            self._drain()

    def _timeout(self, p: _Pending, why: str) -> None:
        p.done = True
        self.stats.timed_out += 1
        p.future.set_exception(DeliveryTimeout(f"message {p.future.message_id}: {why}",
                                               message_id=p.future.message_id))

    def _fail(self, p: _Pending, error: DeliveryError) -> None:
        if not p.done:
            p.done = True
            self.stats.failed += 1
            p.future.set_exception(error)

    def add_flush_waiter(self, event: threading.Event) -> None:
        self._flush_waiters.append(event)
        self._check_flushed()

    def _check_flushed(self) -> None:
        if self._inflight:  # the common case while confirms are still coming: O(1)
            return
        if not any(not p.done for p in self.outbox):
            for event in self._flush_waiters:
                event.set()
            self._flush_waiters.clear()

    def begin_close(self) -> None:
        self._fail_everything(lambda p: DeliveryTimeout(
            f"message {p.future.message_id}: the publisher was closed before the broker confirmed it",
            message_id=p.future.message_id))
        super().begin_close()

    def on_finished(self, error: ReliableMessagingError | None) -> None:
        def failure(p: _Pending) -> DeliveryError:
            mid = p.future.message_id
            if error is None:
                return DeliveryTimeout(f"message {mid}: the publisher was closed before the broker confirmed it",
                                       message_id=mid)
            if isinstance(error, DeliveryError):
                return error
            if isinstance(error, BrokerUnavailable):
                exc: DeliveryError = DeliveryTimeout(f"message {mid} not confirmed: {error}", message_id=mid)
            else:
                exc = DeliveryFailed(f"message {mid} not confirmed: {error}", message_id=mid)
            exc.__cause__ = error
            return exc

        self._fail_everything(failure)
        for event in self._flush_waiters:
            event.set()
        self._flush_waiters.clear()
        with self.space:
            self.space.notify_all()

    def _fail_everything(self, make: Any) -> None:
        pending = [p for p in (self._inflight.get(tag) for tag in self._order) if p is not None]
        self._inflight.clear()
        self._order.clear()
        self._returnable.clear()
        self._returnable_more.clear()
        while self.outbox:
            pending.append(self.outbox.popleft())
        for p in pending:
            if not p.done:
                p.done = True
                error = make(p)
                if isinstance(error, DeliveryTimeout):
                    self.stats.timed_out += 1
                else:
                    self.stats.failed += 1
                p.future.set_exception(error)


def _as_delivery_error(error: ReliableMessagingError, p: _Pending) -> DeliveryError:
    if isinstance(error, DeliveryError):
        return error
    mapped = DeliveryFailed(f"message {p.future.message_id}: {error}", message_id=p.future.message_id)
    mapped.__cause__ = error
    return mapped


_BasicProperties = pika.BasicProperties


def _check_optional_properties(content_type: str | None, content_encoding: str | None, correlation_id: str | None,
                               reply_to: str | None, expiration: float | None, priority: int | None) -> str | None:
    """Validate the optional AMQP properties of a publish; returns the expiration in milliseconds as text."""
    for name, value in (("content_type", content_type), ("content_encoding", content_encoding),
                        ("correlation_id", correlation_id), ("reply_to", reply_to)):
        if value is not None:
            check_short_string(name, value)
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)
                                 or not 0 <= priority <= 255):
        raise InvalidMessage(f"priority must be an int in 0..255, got {priority!r}")
    if expiration is None:
        return None
    if not isinstance(expiration, int | float) or isinstance(expiration, bool) or expiration < 0:
        raise InvalidMessage(f"expiration must be a number of seconds >= 0, got {expiration!r}")
    return str(int(expiration * 1000))


class RabbitMQPublisher:
    """Publishes to RabbitMQ with publisher confirms; every publish returns a :class:`DeliveryFuture`.

    The constructor connects (declaring ``topology`` if given) and raises
    :class:`~reliable_messaging.BrokerUnavailable`, :class:`~reliable_messaging.TopologyMismatch`
    or :class:`~reliable_messaging.ConfigurationError` (refused credentials) if it cannot, within
    ``config.connect_timeout``. Use it as a context manager, or call :meth:`close`.

    Example::

        with RabbitMQPublisher(RabbitMQPublisherConfig(url=url), topology=topology) as publisher:
            futures = [publisher.publish("orders", "orders", body) for body in bodies]
            for future in futures:
                future.result(timeout=30)  # raises Unroutable, Nacked, DeliveryTimeout, ...
    """

    def __init__(self, config: RabbitMQPublisherConfig | None = None, *,
                 topology: RabbitMQTopology | None = None) -> None:
        config = RabbitMQPublisherConfig() if config is None else config
        if not isinstance(config, RabbitMQPublisherConfig):
            raise ConfigurationError(f"config must be a RabbitMQPublisherConfig, got {type(config).__name__}",
                                     field="config")
        if topology is not None and not isinstance(topology, RabbitMQTopology):
            raise ConfigurationError(f"topology must be a RabbitMQTopology, got {type(topology).__name__}",
                                     field="topology")
        self.config = config
        self._engine = _Engine(config, topology)
        self._outbox = self._engine.outbox
        self._lock = threading.Lock()
        self._closed = False
        self._persistent = _PERSISTENT if config.persistent else _TRANSIENT
        self._mandatory = config.mandatory
        self._delivery_timeout = config.delivery_timeout
        self._max_buffered = config.max_buffered
        self._app_id = config.app_id
        self._engine.start_thread(config.connect_timeout)

    @property
    def stats(self) -> RabbitMQPublisherStats:
        """Counters (confirmed, nacked, returned, republished, ...)."""
        return self._engine.stats

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes | bytearray | memoryview | str,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        persistent: bool | None = None,
        mandatory: bool | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        expiration: float | None = None,
        priority: int | None = None,
    ) -> DeliveryFuture:
        """Publish one message; returns at once with its future (thread-safe).

        ``exchange`` ``""`` is the default exchange (routing key = queue name). ``message_id``
        defaults to a fresh random id, readable as ``future.message_id``. ``persistent`` and
        ``mandatory`` default to the config's. ``expiration`` is a per-message TTL in seconds.

        Raises :class:`~reliable_messaging.InvalidMessage` for a bad argument (nothing is
        queued), :class:`~reliable_messaging.ClosedError` after :meth:`close`. Everything the
        broker does afterwards arrives through the future.
        """
        data = coerce_body(body)
        if type(exchange) is not str or len(exchange) > 63:
            check_short_string("exchange", exchange)
        if type(routing_key) is not str or len(routing_key) > 63:
            check_short_string("routing_key", routing_key)
        if message_id is None:
            message_id = new_message_id()
        else:
            check_short_string("message_id", message_id, allow_empty=False)
        if headers is not None:
            headers = check_headers(headers)
        if persistent is None:
            mode = self._persistent
        elif isinstance(persistent, bool):
            mode = _PERSISTENT if persistent else _TRANSIENT
        else:
            raise InvalidMessage(f"persistent must be True, False or None, got {persistent!r}")
        if mandatory is None:
            mandatory = self._mandatory
        elif not isinstance(mandatory, bool):
            raise InvalidMessage(f"mandatory must be True, False or None, got {mandatory!r}")
        elif mandatory and not self.config.confirms:
            raise InvalidMessage("mandatory=True needs a publisher with confirms=True (a basic.return is "
                                 "reported through the future, which without confirms has already resolved)")
        expiration_ms: str | None = None
        if (content_type is not None or content_encoding is not None or correlation_id is not None
                or reply_to is not None or expiration is not None or priority is not None):
            expiration_ms = _check_optional_properties(content_type, content_encoding, correlation_id, reply_to,
                                                       expiration, priority)
        # Positional: BasicProperties(content_type, content_encoding, headers, delivery_mode, priority,
        # correlation_id, reply_to, expiration, message_id, timestamp, type, user_id, app_id); the
        # keyword form costs noticeably more on this per-message path.
        properties = _BasicProperties(content_type, content_encoding, headers, mode, priority, correlation_id,
                                      reply_to, expiration_ms, message_id, int(time.time()), None, None,
                                      self._app_id)
        future = DeliveryFuture(message_id)
        future.set_running_or_notify_cancel()  # a sent message cannot be un-sent: cancel() returns False
        now = time.monotonic()
        pending = _Pending(future, exchange, routing_key, data, properties, mandatory, now,
                           now + self._delivery_timeout)
        if len(self._outbox) >= self._max_buffered and not self._wait_for_space(now + self._delivery_timeout):
            future.set_exception(DeliveryTimeout(
                f"message {message_id}: {self._max_buffered} publishes were already waiting for the broker "
                f"for delivery_timeout={self._delivery_timeout}s", message_id=message_id))
            return future
        engine = self._engine
        with self._lock:
            if self._closed:
                raise ClosedError("the publisher is closed")
            if engine.fatal is not None:
                self._raise_fatal()
            self._outbox.append(pending)
            engine.stats.published += 1
        if engine.wants_wake():
            engine.wake()
        return future

    def _raise_fatal(self) -> None:
        fatal = self._engine.fatal
        if isinstance(fatal, BrokerUnavailable):
            raise BrokerUnavailable(f"the publisher gave up: {fatal}") from fatal
        raise ClosedError(f"the publisher stopped: {fatal}") from fatal

    def _wait_for_space(self, deadline: float) -> bool:
        engine = self._engine
        with engine.space:
            engine.space_waiters += 1
            try:
                while len(self._outbox) >= self._max_buffered:
                    if self._closed or engine.fatal is not None:
                        return True  # publish() raises the reason below
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    engine.wake()
                    engine.space.wait(min(remaining, 0.5))
                return True
            finally:
                engine.space_waiters -= 1

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every publish so far is resolved (confirmed or failed). True if all were.

        ``None`` waits for as long as the delivery deadline can take.
        """
        if not self._engine.alive:
            return not self._outbox
        event = threading.Event()
        self._engine.call_soon(lambda: self._engine.add_flush_waiter(event))
        limit = self._delivery_timeout + 5.0 if timeout is None else timeout
        return event.wait(limit)

    def close(self, timeout: float = 30.0) -> None:
        """Wait up to ``timeout`` s for pending confirms, then close the connection.

        Every future is resolved when this returns: confirmed ones with their Delivery, the
        others failed (:class:`~reliable_messaging.DeliveryTimeout`: the broker may or may not
        have stored them). Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        engine = self._engine
        if engine.alive:
            if timeout > 0:
                self.flush(timeout)
            engine.request_close()
            if not engine.join(max(10.0, timeout)):
                logger.warning("the publisher's I/O thread did not stop within %.0fs", max(10.0, timeout))
        if engine.join(0.0):  # ended: release the I/O loop, fail anything queued after the thread ended
            engine.on_finished(None)

    def __enter__(self) -> RabbitMQPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<RabbitMQPublisher {state} connections={self._engine.connections}>"
