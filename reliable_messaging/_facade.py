"""One facade over both brokers: ``reliable_messaging.connect(url)``.

The broker object it returns has the same methods for Kafka and RabbitMQ:

- ``publish(destination, body, *, key=None, headers=None, message_id=None)`` returns a
  :class:`~reliable_messaging.DeliveryFuture` (``concurrent.futures`` and ``await``).
- ``consumer(source, handler, ...)`` returns a consumer (``start()``, ``stop()``, ``run()``,
  ``stats``) whose handler gets a :class:`~reliable_messaging.Message` and decides by how it
  ends: return -> ack/commit; raise :class:`~reliable_messaging.Retry` -> retry (optional delay);
  raise :class:`~reliable_messaging.Reject` -> dead-letter now; any other exception -> retry
  policy, then dead-letter.

What ``destination``/``source``/``key`` mean on each broker:

=============  ==========================================  ==============================================
               Kafka                                       RabbitMQ
=============  ==========================================  ==============================================
destination    the topic                                   a durable topic exchange of that name
                                                           (declared on first publish)
source         the topic (group: ``group``)                a durable queue of that name, bound to the
                                                           exchange of that name with ``#``, dead-lettering
                                                           to ``<source>.dlx`` -> ``<source>.dlq``
key            the record key (partitioning, ordering)     the routing key (carried, ``#`` matches all)
dead letters   ``<source>.DLT``                            ``<source>.dlq``
=============  ==========================================  ==============================================

Guarantee presets set every knob at once; each stays overridable by keyword (any field of the
broker's producer/publisher and consumer configs). An override that breaks the preset's promise
(``acks=0`` under at-least-once, ``confirms=False``, auto-commit, ...) is refused unless
``allow_weaker=True`` says it is meant; the broker's repr and a WARNING then name what no longer holds:

================  =====================================  ============================================
preset            Kafka                                  RabbitMQ
================  =====================================  ============================================
at-most-once      acks=0, no idempotence; auto-commit     no confirms, transient, not mandatory;
                                                         auto-ack
at-least-once     acks=all + idempotence; manual batch   confirms + mandatory + persistent;
                  commit after processing                manual ack after processing
effectively-once  at-least-once + dedup (SQLite)         at-least-once + dedup (SQLite)
================  =====================================  ============================================
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import enum
import logging
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from ._dedup import DedupStore, SQLiteDedupStore
from ._errors import ClosedError, ConfigurationError
from ._handling import ConsumerStats, MessageIdKey
from ._message import DeliveryFuture, OutgoingHeaders
from ._retry import DEFAULT_RETRY_POLICY, RetryPolicy

if TYPE_CHECKING:
    from ._kafka import KafkaProducer
    from ._rabbitmq import RabbitMQPublisher

__all__ = ["DEFAULT_DEDUP_PATH", "Broker", "Consumer", "Guarantee", "connect"]

logger = logging.getLogger("reliable_messaging")

DEFAULT_DEDUP_PATH = "reliable_messaging_dedup.sqlite3"
"""The effectively-once preset's SQLite file, relative to the working directory: next to the
consumer, so a restarted consumer finds the ids it already processed."""

DEFAULT_NAME = "reliable-messaging"
"""Default ``name``: Kafka's client id, RabbitMQ's connection name prefix. (Never a consumer group: a
Kafka consumer names its group, so two services cannot split each other's messages by default.)"""


class Guarantee(str, enum.Enum):
    """Delivery guarantee presets (see the module docstring for the knobs each one sets)."""

    AT_MOST_ONCE = "at-most-once"
    """Never redelivered, may be lost: no broker acknowledgement is awaited, consumers ack on receipt."""
    AT_LEAST_ONCE = "at-least-once"
    """Never lost once its future resolved; may be delivered more than once (a lost ack, a crash)."""
    EFFECTIVELY_ONCE = "effectively-once"
    """At-least-once delivery, with the handler run once per message id (a dedup store)."""


class Consumer(Protocol):
    """What ``Broker.consumer()`` returns (a KafkaConsumer or a RabbitMQConsumer)."""

    @property
    def stats(self) -> ConsumerStats: ...

    @property
    def running(self) -> bool: ...

    def start(self) -> Any: ...

    def stop(self, timeout: float = 30.0) -> bool: ...

    def run(self) -> None: ...


_PRESET = object()


class Broker(abc.ABC):
    """A connection to one broker, with a guarantee preset. Create it with :func:`connect`.

    Thread-safe: publish from any thread. ``close()`` stops the consumers it created, flushes
    and closes the publisher and closes the dedup store it opened.
    """

    scheme: str = ""

    def __init__(self, url: str, *, guarantee: Guarantee, retry: RetryPolicy, dedup: DedupStore | None,
                 own_dedup: bool, name: str, settings: Mapping[str, Any], allow_weaker: bool = False) -> None:
        self.url = url
        self.guarantee = guarantee
        self.allow_weaker = allow_weaker
        self.weakened: tuple[str, ...] = ()
        """What the settings take away from the guarantee preset (empty: the preset holds as documented)."""
        self.retry = retry
        self.dedup = dedup
        self.name = name
        self.settings = dict(settings)
        self._own_dedup = own_dedup
        self._lock = threading.Lock()
        self._closed = False
        self._consumers: list[Consumer] = []

    # -- publishing -----------------------------------------------------------------------------

    @abc.abstractmethod
    def publish(self, destination: str, body: bytes | bytearray | memoryview | str, *,
                key: str | bytes | None = None, headers: OutgoingHeaders | None = None,
                message_id: str | None = None) -> DeliveryFuture:
        """Publish one message; the future resolves when the broker took responsibility for it
        (per the guarantee: at-most-once futures resolve without a broker acknowledgement)."""

    @abc.abstractmethod
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every publish so far is settled; False if some were still pending at ``timeout``."""

    # -- consuming ------------------------------------------------------------------------------

    def consumer(
        self,
        source: str,
        handler: Callable[[Any], Any],
        *,
        group: str | None = None,
        retry: RetryPolicy | None = None,
        decoder: Callable[[bytes], Any] | None = None,
        dedup: DedupStore | object | None = _PRESET,
        dedup_key: Callable[[Any], str] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Consumer:
        """A consumer of ``source`` running ``handler`` (sync or ``async def``); call ``start()`` or ``run()``.

        ``group``: the Kafka consumer group, required there (a shared default would let two
        services split each other's messages); RabbitMQ shares a queue among its consumers and
        ignores it. ``retry``/``dedup`` default to the broker's. The default dedup key is
        ``<group or queue>/<message id>``, so two services sharing one store do not suppress each
        other's messages.
        """
        if not isinstance(source, str) or not source:
            raise ConfigurationError(f"source must be a non-empty topic/queue name, got {source!r}", field="source")
        store = self.dedup if dedup is _PRESET else dedup
        if store is not None and not isinstance(store, DedupStore):
            raise ConfigurationError(f"dedup must be a DedupStore or None, got {type(store).__name__}", field="dedup")
        with self._lock:
            if self._closed:
                raise ClosedError("the broker connection is closed")
            consumer = self._consumer(source, handler, group=group, retry=retry or self.retry,
                                      decoder=decoder, dedup=store, dedup_key=dedup_key, loop=loop)
            self._consumers.append(consumer)
        return consumer

    @abc.abstractmethod
    def _consumer(self, source: str, handler: Callable[[Any], Any], *, group: str | None, retry: RetryPolicy,
                  decoder: Callable[[bytes], Any] | None, dedup: DedupStore | None,
                  dedup_key: Callable[[Any], str] | None, loop: asyncio.AbstractEventLoop | None) -> Consumer: ...

    @abc.abstractmethod
    def dead_letter_source(self, source: str) -> str:
        """Where ``source``'s dead-lettered messages end up (a topic, or a queue)."""

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> None:
        """Stop this broker's consumers, settle pending publishes, release resources. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            consumer.stop(timeout)
        self._close_publisher(timeout)
        if self._own_dedup and self.dedup is not None:
            self.dedup.close()

    @abc.abstractmethod
    def _close_publisher(self, timeout: float) -> None: ...

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.close)

    def _describe(self) -> str:
        return ""

    def _check_weakening(self, weakened: list[str]) -> None:
        """Refuse settings that break the preset's promise, unless allow_weaker; remember and log them."""
        if not weakened:
            return
        if not self.allow_weaker:
            raise ConfigurationError(
                f"guarantee={self.guarantee.value!r} does not hold with {'; '.join(weakened)}; pass "
                f"allow_weaker=True if that is meant, or choose the preset that matches", field="guarantee")
        self.weakened = tuple(weakened)
        logger.warning("reliable_messaging: guarantee %s weakened on purpose (allow_weaker=True): %s",
                       self.guarantee.value, "; ".join(weakened))

    def __repr__(self) -> str:
        dedup = type(self.dedup).__name__ if self.dedup is not None else "off"
        guarantee = self.guarantee.value
        if self.weakened:
            guarantee += " (weakened: " + "; ".join(self.weakened) + ")"
        return (f"<{type(self).__name__} {_redact(self.url)} guarantee={guarantee} "
                f"{self._describe()} dedup={dedup}>")


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _split_settings(settings: Mapping[str, Any], configs: Mapping[str, type[Any]],
                    fixed: frozenset[str]) -> dict[str, dict[str, Any]]:
    """Route each keyword to every config class that has a field of that name."""
    routed: dict[str, dict[str, Any]] = {name: {} for name in configs}
    allowed: set[str] = set()
    for cls in configs.values():
        allowed |= {f.name for f in dataclasses.fields(cls)} - fixed
    for key, value in settings.items():
        if key not in allowed:
            raise ConfigurationError(
                f"unknown setting {key!r}; allowed: {', '.join(sorted(allowed))}", field=key
            )
        for config_name, cls in configs.items():
            if key in {f.name for f in dataclasses.fields(cls)}:
                routed[config_name][key] = value
    return routed


# ---------------------------------------------------------------------------------------------
# Kafka
# ---------------------------------------------------------------------------------------------


class KafkaBroker(Broker):
    """The Kafka side of the facade (``kafka://host:port[,host:port]``)."""

    scheme = "kafka"

    def __init__(self, url: str, bootstrap_servers: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        from ._kafka import Acks, CommitMode, KafkaConsumerConfig, KafkaProducerConfig

        self.bootstrap_servers = bootstrap_servers
        preset: dict[str, dict[str, Any]] = {
            "producer": {"acks": Acks.ALL},
            "consumer": {"commit_mode": CommitMode.MANUAL_BATCH},
        }
        if self.guarantee is Guarantee.AT_MOST_ONCE:
            preset = {"producer": {"acks": Acks.ZERO, "enable_idempotence": False},
                      "consumer": {"commit_mode": CommitMode.AUTO}}
        routed = _split_settings(self.settings, {"producer": KafkaProducerConfig, "consumer": KafkaConsumerConfig},
                                 frozenset({"bootstrap_servers", "group_id"}))
        self._producer_settings = {"client_id": self.name, **preset["producer"], **routed["producer"]}
        self._consumer_settings = {"client_id": self.name, **preset["consumer"], **routed["consumer"]}
        # Validate now: an invalid combination is an error of connect(), not of the first publish.
        self._producer_config = KafkaProducerConfig(bootstrap_servers=bootstrap_servers, **self._producer_settings)
        probe = KafkaConsumerConfig(bootstrap_servers=bootstrap_servers, group_id=self.name,
                                    **self._consumer_settings)
        if self.dedup is not None and probe.mode is CommitMode.AUTO:
            raise ConfigurationError(
                "dedup with auto-commit: the offset may be committed before the handler ran, and no dedup "
                "store can bring back a message that was skipped; use manual commits (at-least-once)",
                field="commit_mode")
        self._consumer_mode = probe.mode
        weakened: list[str] = []
        if self.guarantee is not Guarantee.AT_MOST_ONCE:
            acks = self._producer_config.acks_level
            if acks is not Acks.ALL:
                weakened.append(f"acks={acks.value} (a message the leader acknowledged can be lost with it)")
            if probe.mode is CommitMode.AUTO:
                weakened.append("commit_mode=auto (offsets can be committed before the handler ran: a crash "
                                "loses those messages)")
        self._check_weakening(weakened)
        self._publisher: KafkaProducer | None = None

    def _producer(self) -> KafkaProducer:
        producer = self._publisher
        if producer is None:
            with self._lock:
                if self._closed:
                    raise ClosedError("the broker connection is closed")
                if self._publisher is None:
                    from ._kafka import KafkaProducer

                    self._publisher = KafkaProducer(self._producer_config)
                producer = self._publisher
        return producer

    def publish(self, destination: str, body: bytes | bytearray | memoryview | str, *,
                key: str | bytes | None = None, headers: OutgoingHeaders | None = None,
                message_id: str | None = None) -> DeliveryFuture:
        return self._producer().publish(destination, body, key=key, headers=headers, message_id=message_id)

    def flush(self, timeout: float = 30.0) -> bool:
        producer = self._publisher
        return producer is None or producer.flush(timeout) == 0

    def _consumer(self, source: str, handler: Callable[[Any], Any], *, group: str | None, retry: RetryPolicy,
                  decoder: Callable[[bytes], Any] | None, dedup: DedupStore | None,
                  dedup_key: Callable[[Any], str] | None, loop: asyncio.AbstractEventLoop | None) -> Consumer:
        from ._kafka import KafkaConsumer, KafkaConsumerConfig

        if not isinstance(group, str) or not group:
            raise ConfigurationError(
                f"a Kafka consumer needs group=<consumer group> (got {group!r}): consumers of one group split a "
                "topic's messages, so each service names its own", field="group")
        config = KafkaConsumerConfig(bootstrap_servers=self.bootstrap_servers, group_id=group,
                                     **self._consumer_settings)
        key = dedup_key or MessageIdKey(f"{group}/")  # recognised by the consumer: ids prefetched per batch
        return KafkaConsumer(config, source, handler, retry=retry, decoder=decoder, dedup=dedup, dedup_key=key,
                             loop=loop)

    def dead_letter_source(self, source: str) -> str:
        return f"{source}.DLT"

    def _close_publisher(self, timeout: float) -> None:
        if self._publisher is not None:
            self._publisher.close(timeout)

    def _describe(self) -> str:
        c = self._producer_config
        return (f"acks={c.acks_level.value} idempotence={'on' if c.idempotent else 'off'} "
                f"commit={self._consumer_mode.value}")


# ---------------------------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------------------------


class RabbitMQBroker(Broker):
    """The RabbitMQ side of the facade (``amqp://`` / ``amqps://``)."""

    scheme = "amqp"

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        from ._rabbitmq import RabbitMQAckMode, RabbitMQConsumerConfig, RabbitMQPublisherConfig, RabbitMQQueueType

        preset: dict[str, dict[str, Any]] = {
            "publisher": {"confirms": True, "mandatory": True, "persistent": True},
            "consumer": {"ack_mode": RabbitMQAckMode.MANUAL},
        }
        if self.guarantee is Guarantee.AT_MOST_ONCE:
            preset = {"publisher": {"confirms": False, "mandatory": False, "persistent": False},
                      "consumer": {"ack_mode": RabbitMQAckMode.AUTO}}
        settings = dict(self.settings)
        # Facade-only knobs: the shape of the queues consumer() declares.
        self._queue_type = RabbitMQQueueType(settings.pop("queue_type", RabbitMQQueueType.CLASSIC))
        self._delivery_limit: int | None = settings.pop("delivery_limit", None)
        routed = _split_settings(settings, {"publisher": RabbitMQPublisherConfig,
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

    def _exchange_topology(self, name: str) -> Any:
        from ._rabbitmq import RabbitMQExchange, RabbitMQExchangeType, RabbitMQTopology

        return RabbitMQTopology(exchanges=(RabbitMQExchange(name=name, type=RabbitMQExchangeType.TOPIC),))

    def _publisher_for(self, destination: str) -> RabbitMQPublisher:
        publisher = self._publisher
        if publisher is None or destination not in self._exchanges:
            with self._lock:
                if self._closed:
                    raise ClosedError("the broker connection is closed")
                if destination not in self._exchanges:
                    # Once per destination: a blocking exchange.declare (idempotent on the broker).
                    self._exchange_topology(destination).declare(
                        self.url, connection_name=f"{self.name} topology")
                    self._exchanges.add(destination)
                if self._publisher is None:
                    from ._rabbitmq import RabbitMQPublisher

                    self._publisher = RabbitMQPublisher(self._publisher_config)
                publisher = self._publisher
        return publisher

    def publish(self, destination: str, body: bytes | bytearray | memoryview | str, *,
                key: str | bytes | None = None, headers: OutgoingHeaders | None = None,
                message_id: str | None = None) -> DeliveryFuture:
        routing_key = key.decode("utf-8") if isinstance(key, bytes) else (key or "")
        return self._publisher_for(destination).publish(destination, routing_key, body, headers=headers,
                                                        message_id=message_id)

    def flush(self, timeout: float = 30.0) -> bool:
        publisher = self._publisher
        return publisher is None or publisher.flush(timeout)

    def topology(self, source: str) -> Any:
        """The queue topology :meth:`consumer` declares for ``source`` (exchange, queue, DLX, DLQ)."""
        from ._rabbitmq import RabbitMQExchangeType, RabbitMQTopology

        return RabbitMQTopology.work_queue(source, exchange_type=RabbitMQExchangeType.TOPIC, routing_key="#",
                                           type=self._queue_type, delivery_limit=self._delivery_limit)

    def _consumer(self, source: str, handler: Callable[[Any], Any], *, group: str | None, retry: RetryPolicy,
                  decoder: Callable[[bytes], Any] | None, dedup: DedupStore | None,
                  dedup_key: Callable[[Any], str] | None, loop: asyncio.AbstractEventLoop | None) -> Consumer:
        from ._rabbitmq import RabbitMQConsumer, RabbitMQConsumerConfig

        settings = {"connection_name": f"{self.name} consumer {source}", **self._consumer_settings}
        config = RabbitMQConsumerConfig(url=self.url, **settings)
        key = dedup_key or MessageIdKey(f"{source}/")
        return RabbitMQConsumer(config, source, handler, retry=retry, decoder=decoder, dedup=dedup, dedup_key=key,
                                loop=loop, topology=self.topology(source))

    def dead_letter_source(self, source: str) -> str:
        return f"{source}.dlq"

    def _close_publisher(self, timeout: float) -> None:
        if self._publisher is not None:
            self._publisher.close(timeout)

    def _describe(self) -> str:
        c = self._publisher_config
        return (f"confirms={'on' if c.confirms else 'off'} mandatory={'on' if c.mandatory else 'off'} "
                f"persistent={'on' if c.persistent else 'off'} ack={self._ack_mode.value}")


# ---------------------------------------------------------------------------------------------
# connect
# ---------------------------------------------------------------------------------------------


def connect(
    url: str,
    *,
    guarantee: Guarantee | str = Guarantee.AT_LEAST_ONCE,
    retry: RetryPolicy = DEFAULT_RETRY_POLICY,
    dedup: DedupStore | object | None = _PRESET,
    dedup_path: str | Path = DEFAULT_DEDUP_PATH,
    name: str = DEFAULT_NAME,
    allow_weaker: bool = False,
    **settings: Any,
) -> Broker:
    """Connect to the broker at ``url`` with a delivery guarantee preset.

    - ``url``: ``kafka://host:port[,host:port]``, ``amqp://user:pass@host:port/vhost`` or ``amqps://...``.
    - ``guarantee``: :class:`Guarantee` or its value (``"at-least-once"``, default).
    - ``retry``: the handler retry policy of consumers made by this broker.
    - ``dedup``: the dedup store; the effectively-once preset opens a :class:`SQLiteDedupStore`
      at ``dedup_path`` (closed with the broker); pass a store (e.g. Redis) to share it.
    - ``name``: Kafka client id; RabbitMQ connection names.
    - ``allow_weaker``: accept settings that break the preset's promise (``acks=0`` or ``1``,
      ``commit_mode="auto"``, ``confirms=False``, ``mandatory=False``, ``persistent=False``,
      ``ack_mode="auto"`` under at-least-once or effectively-once); without it they raise
      :class:`ConfigurationError`. ``broker.weakened`` and the repr say what no longer holds.
    - ``settings``: overrides, by field name, of the producer/publisher and consumer configs
      (e.g. ``acks=1``, ``commit_mode="manual"``, ``prefetch=50``; RabbitMQ also ``queue_type``,
      ``delivery_limit``). An unknown name or an incompatible combination raises
      :class:`ConfigurationError` here, before anything connects.

    Connections are made lazily: the publisher on the first publish, consumers on ``start()``.
    """
    try:
        preset = Guarantee(guarantee)
    except ValueError:
        raise ConfigurationError(
            f"guarantee must be one of {', '.join(g.value for g in Guarantee)}, got {guarantee!r}",
            field="guarantee") from None
    if not isinstance(retry, RetryPolicy):
        raise ConfigurationError(f"retry must be a RetryPolicy, got {type(retry).__name__}", field="retry")
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"name must be a non-empty str, got {name!r}", field="name")
    if not isinstance(url, str):
        raise ConfigurationError(f"url must be a str, got {type(url).__name__}", field="url")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("kafka", "amqp", "amqps"):
        raise ConfigurationError(
            f"url must start with kafka://, amqp:// or amqps://, got {_redact(url)!r}", field="url")

    own = False
    if dedup is _PRESET:
        if preset is Guarantee.EFFECTIVELY_ONCE:
            store: DedupStore | None = SQLiteDedupStore(dedup_path)
            own = True
        else:
            store = None
    elif dedup is None or isinstance(dedup, DedupStore):
        store = dedup
    else:
        raise ConfigurationError(f"dedup must be a DedupStore or None, got {type(dedup).__name__}", field="dedup")
    if preset is Guarantee.EFFECTIVELY_ONCE and store is None:
        raise ConfigurationError("effectively-once needs a dedup store (dedup=None given); "
                                 "use guarantee='at-least-once' for no deduplication", field="dedup")

    if not isinstance(allow_weaker, bool):
        raise ConfigurationError(f"allow_weaker must be a bool, got {allow_weaker!r}", field="allow_weaker")
    common: dict[str, Any] = {"guarantee": preset, "retry": retry, "dedup": store, "own_dedup": own, "name": name,
                              "settings": settings, "allow_weaker": allow_weaker}
    try:
        broker: Broker
        if scheme == "kafka":
            servers = url.split("://", 1)[1].strip("/")
            if not servers or any(not s.rpartition(":")[2].isdigit() for s in servers.split(",")):
                raise ConfigurationError(f"kafka:// url must list host:port pairs, got {url!r}", field="url")
            broker = KafkaBroker(url, servers, **common)
        else:
            broker = RabbitMQBroker(url, **common)
    except BaseException:
        if own and store is not None:
            store.close()
        raise
    logger.info("reliable_messaging: %r", broker)
    return broker
