"""The Kafka backend of :func:`reliable_messaging.connect`: ``kafka://host:port[,host:port]``.

=============  ==========================================================================
destination    a topic
source         the same topic, read in consumer group ``group`` (required)
key            the record key (partitioning: same key, same partition, same order)
dead letters   ``<source>.DLT``; retries wait in ``<source>.retry.<n>``
presets        at-most-once: ``acks=0``, no idempotence, offsets committed before handling;
               at-least-once: ``acks=all`` + idempotence, manual batch commits after processing;
               effectively-once: at-least-once + a dedup store
=============  ==========================================================================
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .._broker import Broker, Consumer, Guarantee, split_settings
from .._dedup import DedupStore
from .._dispatch import Concurrency
from .._errors import ClosedError, ConfigurationError
from .._handling import MessageIdKey
from .._log import redact
from .._message import DeliveryFuture, OutgoingHeaders
from .._retry import RetryPolicy
from .._stats import PublisherStats, failures
from ._config import Acks, CommitMode, KafkaConsumerConfig, KafkaProducerConfig
from ._consumer import KafkaConsumer
from ._producer import KafkaProducer
from ._topology import TopicNames, create_topics, delete_topics, partition_counts, reachable

__all__ = ["KafkaBroker"]

_SECURITY_PREFIXES = ("security.", "sasl.", "ssl.")


class KafkaBroker(Broker):
    """The Kafka side of the facade."""

    schemes = ("kafka",)

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        servers = url.split("://", 1)[1].strip("/")
        if not servers or any(not s.rpartition(":")[2].isdigit() for s in servers.split(",")):
            raise ConfigurationError(f"kafka:// url must list host:port pairs, got {redact(url)!r}", field="url")
        self.bootstrap_servers = servers
        preset: dict[str, dict[str, Any]] = {
            "producer": {"acks": Acks.ALL},
            "consumer": {"commit_mode": CommitMode.MANUAL_BATCH},
        }
        if self.guarantee is Guarantee.AT_MOST_ONCE:
            preset = {"producer": {"acks": Acks.ZERO, "enable_idempotence": False},
                      "consumer": {"commit_mode": CommitMode.BEFORE}}
        routed = split_settings(self.settings, {"producer": KafkaProducerConfig, "consumer": KafkaConsumerConfig},
                                frozenset({"bootstrap_servers", "group_id"}))
        self._producer_settings = {"client_id": self.name, **preset["producer"], **routed["producer"]}
        self._consumer_settings = {"client_id": self.name, **preset["consumer"], **routed["consumer"]}
        # Validate now: an invalid combination is an error of connect(), not of the first publish.
        self._producer_config = KafkaProducerConfig(bootstrap_servers=servers, **self._producer_settings)
        probe = KafkaConsumerConfig(bootstrap_servers=servers, group_id=self.name, **self._consumer_settings)
        if self.dedup is not None and probe.mode in (CommitMode.AUTO, CommitMode.BEFORE):
            raise ConfigurationError(
                f"dedup with commit_mode={probe.mode.value}: the offset may be committed before the handler ran, and "
                "no dedup store can bring back a message that was skipped; use manual commits (at-least-once)",
                field="commit_mode")
        self._consumer_mode = probe.mode
        self._extra = {k: v for k, v in probe.extra.items() if k.startswith(_SECURITY_PREFIXES)}
        weakened: list[str] = []
        if self.guarantee is not Guarantee.AT_MOST_ONCE:
            acks = self._producer_config.acks_level
            if acks is not Acks.ALL:
                weakened.append(f"acks={acks.value} (a message the leader acknowledged can be lost with it)")
            if probe.mode in (CommitMode.AUTO, CommitMode.BEFORE):
                weakened.append(f"commit_mode={probe.mode.value} (offsets can be committed before the handler ran: "
                                "a crash loses those messages)")
        self._check_weakening(weakened)
        self._publisher: KafkaProducer | None = None

    # -- publishing -----------------------------------------------------------------------------

    def _producer(self) -> KafkaProducer:
        producer = self._publisher
        if producer is None:
            with self._lock:
                if self._closed:
                    raise ClosedError("the broker connection is closed")
                if self._publisher is None:
                    self._publisher = KafkaProducer(self._producer_config)
                producer = self._publisher
        return producer

    def _publish(self, destination: str, body: bytes, *, key: str | bytes | None, headers: OutgoingHeaders | None,
                 message_id: str | None, content_type: str | None) -> DeliveryFuture:
        return self._producer().publish(destination, body, key=key, headers=headers, message_id=message_id)

    def flush(self, timeout: float = 30.0) -> bool:
        producer = self._publisher
        return producer is None or producer.flush(timeout)

    def _publisher_stats(self) -> PublisherStats:
        producer = self._publisher
        return producer.stats if producer is not None else PublisherStats(failures=failures())

    def _close_publisher(self, timeout: float) -> None:
        if self._publisher is not None:
            self._publisher.close(timeout)

    # -- consuming ------------------------------------------------------------------------------

    def _consumer(self, source: str, handler: Callable[[Any], Any], *, group: str | None, retry: RetryPolicy,
                  decoder: Callable[[bytes], Any] | None, dedup: DedupStore | None,
                  dedup_key: Callable[[Any], str] | None, loop: asyncio.AbstractEventLoop | None,
                  concurrency: Concurrency) -> Consumer:
        if group is None:
            raise ConfigurationError(
                "a Kafka consumer needs group=<consumer group> (got None): consumers of one group split a "
                "topic's messages, so each service names its own", field="group")
        config = KafkaConsumerConfig(bootstrap_servers=self.bootstrap_servers, group_id=group,
                                     **self._consumer_settings)
        key = dedup_key or MessageIdKey(f"{group}/")
        return KafkaConsumer(config, source, handler, retry=retry, decoder=decoder, dedup=dedup, dedup_key=key,
                             loop=loop, concurrency=concurrency)

    def _groups_matter(self) -> bool:
        return True

    def dead_letter_source(self, source: str) -> str:
        return TopicNames().dead_letter(source)

    # -- topology -------------------------------------------------------------------------------

    def _parts(self, source: str) -> list[str]:
        names = TopicNames()
        return [names.dead_letter(source),
                *(names.retry(source, level) for level in range(1, max(2, self.retry.max_attempts)))]

    def declare(self, destination: str | None = None, *, source: str | None = None, pattern: str = "#",
                timeout: float = 30.0) -> None:
        """Create the topic (broker defaults for partitions and replication) and, for a source, its retry and
        dead-letter topics with the same partition count. Kafka does not route: a source is the topic itself,
        so ``destination`` and ``source`` name the same topic and ``pattern`` must be ``"#"``."""
        topic = _one_topic(destination, source, pattern)
        create_topics(self.bootstrap_servers, {topic: -1}, timeout=timeout, extra=self._extra)
        if source is not None:
            partitions = partition_counts(self.bootstrap_servers, [topic], timeout=timeout, extra=self._extra)
            create_topics(self.bootstrap_servers, dict.fromkeys(self._parts(topic), partitions.get(topic, -1)),
                          timeout=timeout, extra=self._extra)

    def delete(self, destination: str | None = None, *, source: str | None = None, timeout: float = 30.0) -> None:
        topic = _one_topic(destination, source, "#")
        names = [topic, *(self._parts(topic) if source is not None else ())]
        delete_topics(self.bootstrap_servers, names, timeout=timeout, extra=self._extra)

    def ping(self, timeout: float = 5.0) -> bool:
        return reachable(self.bootstrap_servers, timeout=timeout, extra=self._extra)

    def _describe(self) -> str:
        c = self._producer_config
        return (f"acks={c.acks_level.value} idempotence={'on' if c.idempotent else 'off'} "
                f"commit={self._consumer_mode.value}")


def _one_topic(destination: str | None, source: str | None, pattern: str) -> str:
    if pattern != "#":
        raise ConfigurationError(f"Kafka has no routing patterns: a consumer reads a whole topic (got pattern "
                                 f"{pattern!r})", field="pattern")
    if destination is not None and source is not None and destination != source:
        raise ConfigurationError(f"on Kafka a source is the topic it reads: destination {destination!r} and source "
                                 f"{source!r} must be the same topic", field="source")
    topic = source if source is not None else destination
    if not isinstance(topic, str) or not topic:
        raise ConfigurationError(f"name a topic to declare or delete (destination= or source=), got {topic!r}",
                                 field="destination")
    return topic
