"""The RabbitMQ publisher's I/O thread: channel, confirm window, returns, deadlines, reconnects.

See :mod:`._publisher` for what the broker does and what the publisher does about it. Everything here
runs on the I/O thread, except the few attributes publishing threads touch (``outbox``, ``space``,
``exchanges``/``undeclared``, ``unreachable``), documented where they are defined.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec

from .._errors import (
    BrokerUnavailable,
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
from .._message import Delivery, DeliveryFuture
from ._config import RabbitMQPublisherConfig, connection_parameters
from ._connection import IOThread
from ._errors import NOT_FOUND, PRECONDITION_FAILED, map_pika_error
from ._topology import RabbitMQExchange, RabbitMQTopology

__all__ = ["MAX_CHANNEL_FAILURES", "Pending", "PublisherIO", "RabbitMQPublisherStats"]

logger = limit_repeats(logging.getLogger("reliable_messaging.rabbitmq.publisher"))

MAX_CHANNEL_FAILURES = 3
"""A message in flight on this many channels that the broker closed (for a reason the publisher
cannot pin on one exchange) fails with DeliveryFailed instead of being republished again."""



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
    """Futures failed otherwise (channel errors, encoding errors, fatal errors, no connection)."""
    unavailable: int = 0
    """Of ``failed``: no connection to the broker (none within ``connect_timeout``, or it gave up)."""
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


class Pending:
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


class PublisherIO(IOThread):
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
        self.outbox: collections.deque[Pending] = collections.deque()
        self.space = threading.Condition()
        self.space_waiters = 0
        # I/O thread only.
        self._channel: pika.channel.Channel | None = None
        self._channel_ready = False
        self._connection_ready = False
        self._declaring = False
        self._inflight: dict[int, Pending] = {}
        self._order: collections.deque[int] = collections.deque()
        self._next_tag = 0
        self._returnable: dict[str, Pending] = {}
        self._returnable_more: dict[str, collections.deque[Pending]] = {}
        self._blocked_since: float | None = None
        self._blocked_reason = ""
        self._flush_waiters: list[threading.Event] = []
        self._window = config.max_in_flight
        self._blocked_timeout = config.blocked_timeout
        self._confirms = config.confirms
        # Exchanges registered at run time (declare_exchange): declared on the publishing channel right
        # before the first message to them on each channel (the broker handles a channel's frames in order).
        self.exchanges: dict[str, RabbitMQExchange] = {}
        self.undeclared: set[str] = set()
        self.refused: dict[str, str] = {}
        """Registered exchanges the broker refused to declare (exist with other arguments): name -> why."""
        self._started_at = time.monotonic()
        self.unreachable: BrokerUnavailable | None = None
        """Set once ``connect_timeout`` passed without a first connection: publishes fail at once until one."""

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
        # Exchanges registered at run time are declared again just before their next message on this channel,
        # not with the set-up topology: a refusal then fails their messages only, not the whole publisher.
        self.undeclared.update(self.exchanges)
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
            if self.unreachable is not None:
                logger.warning("RabbitMQ publisher connected: publishing again")
            self.unreachable = None
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
        keep: list[Pending] = []
        missing_exchange = None
        if channel_error is not None and channel_error[0] == NOT_FOUND and "no exchange '" in channel_error[1]:
            missing_exchange = channel_error[1].split("no exchange '", 1)[1].split("'", 1)[0]
        if channel_error is not None and channel_error[0] == PRECONDITION_FAILED \
                and "for exchange '" in channel_error[1]:
            # A destination registered with declare_exchange exists with other arguments (another type):
            # its messages fail, now and from now on; the other destinations go on.
            refused = channel_error[1].split("for exchange '", 1)[1].split("'", 1)[0]
            if refused in self.exchanges:
                missing_exchange = refused
                self.refused[refused] = f"{channel_error[0]} {channel_error[1]}"
                self.exchanges.pop(refused)
                self.undeclared.discard(refused)
                for p in [p for p in self.outbox if p.exchange == refused]:
                    self._fail(p, self.refusal(refused, p.future.message_id))
        for p in items:
            p.returned = None
            if channel_error is not None:
                code, text = channel_error
                if missing_exchange is not None and p.exchange == missing_exchange:
                    self._fail(p, self.refusal(p.exchange, p.future.message_id) if p.exchange in self.refused else
                               DeliveryFailed(f"exchange {p.exchange!r} does not exist: {code} {text}",
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

    def _publish_batch(self, publish: Any, tag: int, outbox: collections.deque[Pending],
                       inflight: dict[int, Pending], order: collections.deque[int], window: int,
                       returnable: dict[str, Pending], stats: RabbitMQPublisherStats) -> int:
        undeclared = self.undeclared
        while outbox and len(inflight) < window:
            p = outbox.popleft()
            if p.done:  # failed by its deadline while waiting
                continue
            try:
                if undeclared and p.exchange in undeclared:
                    self._declare_exchange(p.exchange)
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

    def _declare_exchange(self, name: str) -> None:
        """exchange.declare on the publishing channel, not waiting for its -ok: the publishes after it on the
        channel see the exchange. If the broker refuses it (another type), it closes the channel and the
        messages to that exchange fail through their futures."""
        exchange = self.exchanges[name]
        channel = self._channel
        assert channel is not None
        channel.exchange_declare(exchange.name, exchange.type.value, durable=exchange.durable,
                                 auto_delete=exchange.auto_delete, internal=exchange.internal,
                                 arguments=dict(exchange.arguments) or None, callback=lambda _frame: None)
        self.undeclared.discard(name)

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

    def _settle(self, p: Pending, ack: bool) -> None:
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

    def _forget_returnable(self, p: Pending) -> None:
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
        if not self._connection_ready and self.unreachable is None and self.connections == 0 \
                and now - self._started_at >= self.config.connect_timeout:
            self._give_up_waiting()
        blocked_since = self._blocked_since
        blocked_timeout = self._blocked_timeout

        def expired(p: Pending) -> str | None:
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

    def _give_up_waiting(self) -> None:
        """No first connection within connect_timeout: fail what waits, and every publish until one comes
        (the I/O thread goes on trying to connect)."""
        error = BrokerUnavailable(f"no connection to RabbitMQ at {self.address} within "
                                  f"connect_timeout={self.config.connect_timeout}s"
                                  + (f" ({self.last_open_error})" if self.last_open_error else ""))
        self.unreachable = error
        logger.error("%s; failing %d waiting publishes and every new one until it connects", error, len(self.outbox))
        while self.outbox:
            p = self.outbox.popleft()
            if not p.done:
                p.done = True
                self.stats.failed += 1
                self.stats.unavailable += 1
                p.future.set_exception(unreachable_error(error, p.future.message_id))

    def refusal(self, exchange: str, message_id: str) -> DeliveryFailed:
        """The error of a message to an exchange the broker refused to declare."""
        return DeliveryFailed(f"message {message_id}: exchange {exchange!r} cannot be declared as a destination "
                              f"({self.refused[exchange]}); it exists with other arguments", message_id=message_id,
                              code=PRECONDITION_FAILED)

    def _timeout(self, p: Pending, why: str) -> None:
        p.done = True
        self.stats.timed_out += 1
        p.future.set_exception(DeliveryTimeout(f"message {p.future.message_id}: {why}",
                                               message_id=p.future.message_id))

    def _fail(self, p: Pending, error: DeliveryError) -> None:
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
        def failure(p: Pending) -> DeliveryError:
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


def unreachable_error(error: BrokerUnavailable, message_id: str) -> BrokerUnavailable:
    return BrokerUnavailable(f"{error}; message {message_id} was not sent")


def _as_delivery_error(error: ReliableMessagingError, p: Pending) -> DeliveryError:
    if isinstance(error, DeliveryError):
        return error
    mapped = DeliveryFailed(f"message {p.future.message_id}: {error}", message_id=p.future.message_id)
    mapped.__cause__ = error
    return mapped
