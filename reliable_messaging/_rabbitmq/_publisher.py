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

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import pika

from .._errors import (
    BrokerUnavailable,
    ClosedError,
    ConfigurationError,
    DeliveryError,
    DeliveryFailed,
    DeliveryTimeout,
    InvalidMessage,
    ReliableMessagingError,
)
from .._log import limit_repeats
from .._message import DeliveryFuture, coerce_body, new_message_id
from ._config import RabbitMQPublisherConfig
from ._message import check_headers, check_short_string
from ._publisher_io import Pending, PublisherIO, RabbitMQPublisherStats
from ._topology import RabbitMQExchange, RabbitMQTopology

__all__ = ["RabbitMQPublisher", "RabbitMQPublisherStats"]

logger = limit_repeats(logging.getLogger("reliable_messaging.rabbitmq.publisher"))

_PERSISTENT, _TRANSIENT = 2, 1

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
    ``config.connect_timeout``; with ``wait=False`` it returns at once and connects in the background:
    publishes wait for the connection, and fail with :class:`~reliable_messaging.BrokerUnavailable`
    if there is none within ``connect_timeout`` (so does every publish until it connects). Broker
    trouble never raises from :meth:`publish`: it arrives through the future.
    Use it as a context manager, or call :meth:`close`.

    Example::

        with RabbitMQPublisher(RabbitMQPublisherConfig(url=url), topology=topology) as publisher:
            futures = [publisher.publish("orders", "orders", body) for body in bodies]
            for future in futures:
                future.result(timeout=30)  # raises Unroutable, Nacked, DeliveryTimeout, ...
    """

    def __init__(self, config: RabbitMQPublisherConfig | None = None, *,
                 topology: RabbitMQTopology | None = None, wait: bool = True) -> None:
        config = RabbitMQPublisherConfig() if config is None else config
        if not isinstance(config, RabbitMQPublisherConfig):
            raise ConfigurationError(f"config must be a RabbitMQPublisherConfig, got {type(config).__name__}",
                                     field="config")
        if topology is not None and not isinstance(topology, RabbitMQTopology):
            raise ConfigurationError(f"topology must be a RabbitMQTopology, got {type(topology).__name__}",
                                     field="topology")
        self.config = config
        self._engine = PublisherIO(config, topology)
        self._outbox = self._engine.outbox
        self._lock = threading.Lock()
        self._closed = False
        self._persistent = _PERSISTENT if config.persistent else _TRANSIENT
        self._mandatory = config.mandatory
        self._delivery_timeout = config.delivery_timeout
        self._max_buffered = config.max_buffered
        self._app_id = config.app_id
        self._engine.start_thread(config.connect_timeout, wait=wait)

    @property
    def connected(self) -> bool:
        """Whether the publisher has a connection set up right now."""
        connection = self._engine.connection
        return connection is not None and connection.is_open and self._engine.fatal is None

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
        broker does, and a broker that cannot be reached, arrives through the future.
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
        pending = Pending(future, exchange, routing_key, data, properties, mandatory, now,
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
            trouble = engine.fatal or engine.unreachable
            if trouble is None and engine.refused and exchange in engine.refused:
                trouble = engine.refusal(exchange, message_id)
            if trouble is None:
                self._outbox.append(pending)
            engine.stats.published += 1
        if trouble is not None:
            error = self._trouble(trouble, message_id)
            engine.stats.failed += 1
            if isinstance(error, BrokerUnavailable):
                engine.stats.unavailable += 1
            future.set_exception(error)
            return future
        if engine.wants_wake():
            engine.wake()
        return future

    def declare_exchange(self, exchange: RabbitMQExchange) -> None:
        """Have ``exchange`` declared before the first message published to it (and after every reconnect).

        Does not wait: the declaration goes out on the publishing channel just before that message, so
        the broker has the exchange when the message arrives. A broker that refuses it (an existing
        exchange of another type) fails the messages to it through their futures.
        """
        if not isinstance(exchange, RabbitMQExchange):
            raise ConfigurationError(f"exchange must be a RabbitMQExchange, got {exchange!r}", field="exchange")
        engine = self._engine
        with self._lock:
            if exchange.name not in engine.exchanges:
                engine.exchanges[exchange.name] = exchange
                engine.undeclared.add(exchange.name)

    @staticmethod
    def _trouble(error: ReliableMessagingError, message_id: str) -> ReliableMessagingError:
        """The error of a publish the engine cannot take: it stopped for good, or no broker answers."""
        if isinstance(error, BrokerUnavailable):
            failure: ReliableMessagingError = BrokerUnavailable(f"{error}; message {message_id} was not sent")
        elif isinstance(error, DeliveryError):
            return error
        else:
            failure = DeliveryFailed(f"the publisher stopped ({error}); message {message_id} was not sent",
                                     message_id=message_id)
        failure.__cause__ = error
        return failure

    def _wait_for_space(self, deadline: float) -> bool:
        engine = self._engine
        with engine.space:
            engine.space_waiters += 1
            try:
                while len(self._outbox) >= self._max_buffered:
                    if self._closed or engine.fatal is not None or engine.unreachable is not None:
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
