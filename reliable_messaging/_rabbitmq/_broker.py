"""The RabbitMQ backend of :func:`reliable_messaging.connect`: ``amqp://`` and ``amqps://``.

=============  ==========================================================================
destination    a durable topic exchange of that name, declared before the first message to it
               (on the publisher's I/O thread: publish() never waits for it)
source         a durable queue of that name, bound to the exchange of that name with ``#`` (or
               what :meth:`RabbitMQBroker.declare` bound it with), dead-lettering to
               ``<source>.dlx`` -> ``<source>.dlq``; retries wait in ``<source>.retry.<n>``
key            the routing key (carried; ``#`` matches all)
presets        at-most-once: no confirms, transient, not mandatory, auto-ack;
               at-least-once: confirms + mandatory + persistent, manual ack after processing;
               effectively-once: at-least-once + a dedup store
=============  ==========================================================================

Facade-only settings: ``queue_type`` (``classic`` or ``quorum``) and ``delivery_limit`` (quorum) shape
the queues a consumer declares.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from .._broker import Broker, Consumer, Guarantee, split_settings
from .._dedup import DedupStore
from .._dispatch import Concurrency
from .._errors import ClosedError, ConfigurationError, InvalidMessage
from .._handling import MessageIdKey
from .._message import DeliveryFuture, OutgoingHeaders
from .._retry import RetryPolicy
from .._stats import PublisherStats, failures
from ._config import DEFAULT_PREFETCH, RabbitMQAckMode, RabbitMQConsumerConfig, RabbitMQPublisherConfig, _check_url
from ._consumer import RabbitMQConsumer
from ._publisher import RabbitMQPublisher
from ._topology import (
    RabbitMQBinding,
    RabbitMQExchange,
    RabbitMQExchangeType,
    RabbitMQQueueType,
    RabbitMQTopology,
    dead_letter_exchange_name,
)

__all__ = ["RabbitMQBroker"]


class RabbitMQBroker(Broker):
    """The RabbitMQ side of the facade."""

    schemes = ("amqp", "amqps")

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        preset: dict[str, dict[str, Any]] = {
            "publisher": {"confirms": True, "mandatory": True, "persistent": True},
            "consumer": {"ack_mode": RabbitMQAckMode.MANUAL},
        }
        if self.guarantee is Guarantee.AT_MOST_ONCE:
            preset = {"publisher": {"confirms": False, "mandatory": False, "persistent": False},
                      "consumer": {"ack_mode": RabbitMQAckMode.AUTO}}
        settings = dict(self.settings)
        try:
            self._queue_type = RabbitMQQueueType(settings.pop("queue_type", RabbitMQQueueType.CLASSIC))
        except ValueError as exc:
            raise ConfigurationError(f"queue_type must be 'classic' or 'quorum': {exc}", field="queue_type") from exc
        self._delivery_limit: int | None = settings.pop("delivery_limit", None)
        routed = split_settings(settings, {"publisher": RabbitMQPublisherConfig,
                                           "consumer": RabbitMQConsumerConfig}, frozenset({"url"}))
        self._publisher_settings = {"connection_name": f"{self.name} publisher", **preset["publisher"],
                                    **routed["publisher"]}
        self._consumer_settings = {**preset["consumer"], **routed["consumer"]}
        self._publisher_config = RabbitMQPublisherConfig(url=url, **self._publisher_settings)
        probe = RabbitMQConsumerConfig(url=url, **self._consumer_settings)
        if self.dedup is not None and probe.ack_mode is RabbitMQAckMode.AUTO:
            raise ConfigurationError(
                "dedup with auto-ack: the broker forgets a message as it delivers it, so no dedup store can "
                "help one the consumer then loses; use manual acks (at-least-once)", field="ack_mode")
        self._ack_mode = probe.ack_mode
        self._bindings: dict[str, tuple[str, str]] = {}  # source -> (destination, pattern) from declare()
        self.topology("queue-settings-check")  # raises ConfigurationError for bad queue_type/delivery_limit now
        weakened: list[str] = []
        if self.guarantee is not Guarantee.AT_MOST_ONCE:
            c = self._publisher_config
            if not c.confirms:
                weakened.append("confirms=False (a publish resolves before the broker took the message)")
            if not c.mandatory:
                weakened.append("mandatory=False (a message no queue is bound for is dropped silently)")
            if not c.persistent:
                weakened.append("persistent=False (a broker restart loses queued messages)")
            if probe.ack_mode is RabbitMQAckMode.AUTO:
                weakened.append("ack_mode=auto (a crashed consumer loses its prefetched messages)")
        self._check_weakening(weakened)
        self._publisher: RabbitMQPublisher | None = None
        self._exchanges: set[str] = set()

    # -- publishing -----------------------------------------------------------------------------

    def _publisher_for(self, destination: str) -> RabbitMQPublisher:
        publisher = self._publisher
        if publisher is None or destination not in self._exchanges:
            with self._lock:
                if self._closed:
                    raise ClosedError("the broker connection is closed")
                if self._publisher is None:
                    # Connects in the background: publish() returns at once; a broker that cannot be
                    # reached fails the futures (BrokerUnavailable after connect_timeout).
                    self._publisher = RabbitMQPublisher(self._publisher_config, wait=False)
                publisher = self._publisher
                if destination not in self._exchanges:
                    publisher.declare_exchange(_exchange(destination))  # declared on the I/O thread, in order
                    self._exchanges.add(destination)
        return publisher

    def _publish(self, destination: str, body: bytes, *, key: str | bytes | None, headers: OutgoingHeaders | None,
                 message_id: str | None, content_type: str | None) -> DeliveryFuture:
        if not isinstance(destination, str) or not destination:
            raise InvalidMessage(f"destination must be a non-empty exchange name, got {destination!r}")
        routing_key = key.decode("utf-8") if isinstance(key, bytes) else (key or "")
        return self._publisher_for(destination).publish(destination, routing_key, body, headers=headers,
                                                        message_id=message_id, content_type=content_type)

    def flush(self, timeout: float = 30.0) -> bool:
        publisher = self._publisher
        return publisher is None or publisher.flush(timeout)

    def _publisher_stats(self) -> PublisherStats:
        publisher = self._publisher
        if publisher is None:
            return PublisherStats(failures=failures())
        s = publisher.stats
        failed = s.nacked + s.returned + s.timed_out + s.failed
        confirmed = s.confirmed + s.unconfirmed
        return PublisherStats(
            published=s.published, confirmed=confirmed, failed=failed,
            in_flight=max(0, s.published - confirmed - failed), republished=s.republished,
            failures=failures(nacked=s.nacked, unroutable=s.returned, timeout=s.timed_out, unavailable=s.unavailable,
                              other=s.failed - s.unavailable),
        )

    def _close_publisher(self, timeout: float) -> None:
        if self._publisher is not None:
            self._publisher.close(timeout)

    # -- consuming ------------------------------------------------------------------------------

    def topology(self, source: str) -> RabbitMQTopology:
        """The queue topology :meth:`consumer` declares for ``source`` (exchange, queue, DLX, DLQ)."""
        destination, pattern = self._bindings.get(source, (source, "#"))
        topology = RabbitMQTopology.work_queue(source, exchange_type=RabbitMQExchangeType.TOPIC, routing_key=pattern,
                                               type=self._queue_type, delivery_limit=self._delivery_limit)
        if destination != source:  # bound to another destination: its exchange, not one named after the queue
            topology = RabbitMQTopology(
                exchanges=(_exchange(destination), *topology.exchanges[1:]),
                queues=topology.queues,
                bindings=(RabbitMQBinding(queue=source, exchange=destination, routing_key=pattern),
                          *topology.bindings[1:]))
        return topology

    def _consumer(self, source: str, handler: Callable[[Any], Any], *, group: str | None, retry: RetryPolicy,
                  decoder: Callable[[bytes], Any] | None, dedup: DedupStore | None,
                  dedup_key: Callable[[Any], str] | None, loop: asyncio.AbstractEventLoop | None,
                  concurrency: Concurrency) -> Consumer:
        settings = {"connection_name": f"{self.name} consumer {source}", **self._consumer_settings}
        if concurrency.handlers > 1 and 2 * concurrency.handlers > settings.get("prefetch", DEFAULT_PREFETCH):
            # N handlers need N deliveries, and messages waiting for their key's lane hold some more
            settings["prefetch"] = min(65535, 2 * concurrency.handlers)
        config = RabbitMQConsumerConfig(url=self.url, **settings)
        key = dedup_key or MessageIdKey(f"{source}/")
        return RabbitMQConsumer(config, source, handler, retry=retry, decoder=decoder, dedup=dedup, dedup_key=key,
                                loop=loop, topology=self.topology(source), concurrency=concurrency)

    def dead_letter_source(self, source: str) -> str:
        return f"{source}.dlq"

    # -- topology -------------------------------------------------------------------------------

    def declare(self, destination: str | None = None, *, source: str | None = None, pattern: str = "#",
                timeout: float = 30.0) -> None:
        """Declare the destination's topic exchange and/or the source's queue (with its DLX, DLQ and retry
        queues), bound to the destination (default: the exchange named like the source) by ``pattern``.
        Consumers this broker makes later for ``source`` keep that binding."""
        if destination is None and source is None:
            raise ConfigurationError("name a destination and/or a source to declare", field="destination")
        topology = RabbitMQTopology()
        if destination is not None:
            topology = topology + RabbitMQTopology(exchanges=(_exchange(destination),))
        if source is not None:
            self._bindings[source] = (destination or source, pattern)
            topology = topology + self.topology(source) + RabbitMQTopology.retry_queues(source, self.retry.max_attempts)
        topology.declare(self.url, timeout=timeout, connection_name=f"{self.name} topology")
        if destination is not None:
            self._exchanges.discard(destination)  # the publisher declares it once more: harmless, kept simple

    def delete(self, destination: str | None = None, *, source: str | None = None, timeout: float = 30.0) -> None:
        """Delete the destination's exchange and/or the source's queue, DLQ, retry queues and DLX."""
        if destination is None and source is None:
            raise ConfigurationError("name a destination and/or a source to delete", field="destination")
        topology = RabbitMQTopology()
        if source is not None:
            self._bindings.pop(source, None)
            parts = self.topology(source) + RabbitMQTopology.retry_queues(source, self.retry.max_attempts)
            topology = topology + RabbitMQTopology(
                exchanges=tuple(e for e in parts.exchanges if e.name == dead_letter_exchange_name(source)),
                queues=parts.queues)
        if destination is not None:
            topology = topology + RabbitMQTopology(exchanges=(_exchange(destination),))
            self._exchanges.discard(destination)
        topology.delete(self.url, timeout=timeout, connection_name=f"{self.name} topology")

    def ping(self, timeout: float = 5.0) -> bool:
        """True if a connection can be opened (or the publisher's is up) within ``timeout`` seconds."""
        publisher = self._publisher
        if publisher is not None and publisher.connected:
            return True
        params = pika.URLParameters(_check_url(self.url))
        params.connection_attempts = 1
        params.socket_timeout = timeout
        params.stack_timeout = timeout
        params.client_properties = {"connection_name": f"{self.name} ping"}
        try:
            connection = pika.BlockingConnection(params)
        except pika.exceptions.AMQPError:
            return False
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()
        return True

    def _describe(self) -> str:
        c = self._publisher_config
        return (f"confirms={'on' if c.confirms else 'off'} mandatory={'on' if c.mandatory else 'off'} "
                f"persistent={'on' if c.persistent else 'off'} ack={self._ack_mode.value}")


def _exchange(name: str) -> RabbitMQExchange:
    """A destination: a durable topic exchange."""
    return RabbitMQExchange(name=name, type=RabbitMQExchangeType.TOPIC)
