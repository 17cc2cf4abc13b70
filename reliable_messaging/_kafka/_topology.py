"""Kafka topology: the retry and dead-letter topics a consumer needs, and creating topics.

Naming (``<topic>`` is the topic the application publishes to):

- ``<topic>.retry.<n>`` for ``n = 1 .. max_attempts - 1``: messages waiting for
  attempt ``n + 1``. One topic per level, because every message of a level
  waits the same policy delay: due times then grow along each partition, so
  pausing a partition until its head is due never holds back a message that is
  due earlier (a ``Retry(delay=...)`` override can break that order; it then
  waits at most for the head of its level).
- ``<topic>.DLT``: messages that exhausted their attempts, were rejected, or
  could not be decoded.

Retry and dead-letter topics get the source topic's partition count (a keyed
message keeps its partition) and the broker's default replication factor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import tenacity
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from .._errors import BrokerUnavailable, ConfigurationError
from ._errors import kafka_error_of, operation_error

__all__ = ["TopicNames", "create_topics", "delete_topics", "partition_counts", "prepare_consumer_topics", "reachable"]

logger = logging.getLogger("reliable_messaging.kafka.topology")

DEAD_LETTER_SUFFIX = ".DLT"
RETRY_SUFFIX = ".retry"


@dataclass(frozen=True)
class TopicNames:
    """How retry and dead-letter topics are named after their source topic."""

    dead_letter_suffix: str = DEAD_LETTER_SUFFIX
    retry_suffix: str = RETRY_SUFFIX

    def __post_init__(self) -> None:
        for name in ("dead_letter_suffix", "retry_suffix"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or not all(c.isalnum() or c in "._-" for c in value):
                raise ConfigurationError(
                    f"{name} must be a non-empty string of letters, digits, '.', '_' or '-', got {value!r}",
                    field=name,
                )
        if self.dead_letter_suffix == self.retry_suffix:
            raise ConfigurationError("dead_letter_suffix and retry_suffix must differ", field="retry_suffix")

    def dead_letter(self, topic: str) -> str:
        return f"{topic}{self.dead_letter_suffix}"

    def retry(self, topic: str, level: int) -> str:
        return f"{topic}{self.retry_suffix}.{level}"


def _admin(bootstrap_servers: str, extra: Mapping[str, object]) -> AdminClient:
    conf: dict[str, object] = {"bootstrap.servers": bootstrap_servers}
    # Security settings apply to the admin client too; consumer-only properties would be rejected.
    conf.update({k: v for k, v in extra.items() if k.startswith(("security.", "sasl.", "ssl."))})
    conf["logger"] = logging.getLogger("reliable_messaging.kafka.librdkafka")
    return AdminClient(conf)  # type: ignore[arg-type]


def partition_counts(bootstrap_servers: str, topics: Iterable[str], *, timeout: float = 10.0,
                     extra: Mapping[str, object] | None = None) -> dict[str, int]:
    """Partition count of each existing topic among ``topics`` (missing topics are left out)."""
    admin = _admin(bootstrap_servers, extra or {})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise operation_error("reading cluster metadata", exc) from exc
    out: dict[str, int] = {}
    for topic in topics:
        info = metadata.topics.get(topic)
        if info is not None and info.error is None and info.partitions:
            out[topic] = len(info.partitions)
    return out


def create_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = -1,
    config: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    extra: Mapping[str, object] | None = None,
) -> list[str]:
    """Create each topic (name -> partitions) that does not exist yet; returns the ones created.

    ``partitions=-1`` and ``replication_factor=-1`` take the broker's defaults
    (``num.partitions``, ``default.replication.factor``). A topic that already
    exists is left as it is. Raises :class:`BrokerUnavailable` when the cluster
    cannot be reached within ``timeout`` seconds.
    """
    if not topics:
        return []
    admin = _admin(bootstrap_servers, extra or {})
    new = [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor,
                    config=dict(config or {}))
           for name, partitions in topics.items()]
    try:
        futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    except KafkaException as exc:
        raise operation_error("creating topics", exc) from exc
    created: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout + 5)
        except KafkaException as exc:
            err = kafka_error_of(exc)
            if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise operation_error(f"creating topic {name!r}", exc) from exc
        except TimeoutError as exc:
            raise BrokerUnavailable(f"creating topic {name!r}: no answer within {timeout + 5:.0f}s") from exc
        created.append(name)
    if created:
        logger.info("created topics %s", ", ".join(created))
        _wait_visible(admin, created, timeout)
    return created


class _NotVisibleYet(Exception):
    """A created topic is not yet in the metadata the broker serves (internal: drives the retry)."""


def _wait_visible(admin: AdminClient, names: list[str], timeout: float) -> None:
    """Wait until every topic in ``names`` is in the broker's metadata with a leader for each partition.

    CreateTopics answers once the controller has created a topic; the brokers learn of it
    a moment later. A consumer subscribing in between is told the topic does not exist,
    and librdkafka only asks again at its next metadata refresh.
    """
    pending = set(names)

    def check() -> None:
        try:
            metadata = admin.list_topics(timeout=min(5.0, timeout))
        except KafkaException as exc:
            raise _NotVisibleYet(str(exc)) from exc
        for name in list(pending):
            topic = metadata.topics.get(name)
            if topic is not None and topic.error is None and topic.partitions and all(
                p.leader >= 0 for p in topic.partitions.values()
            ):
                pending.discard(name)
        if pending:
            raise _NotVisibleYet(", ".join(sorted(pending)))

    retrying = tenacity.Retrying(stop=tenacity.stop_after_delay(timeout), wait=tenacity.wait_fixed(0.05),
                                 retry=tenacity.retry_if_exception_type(_NotVisibleYet), reraise=True)
    try:
        retrying(check)
    except _NotVisibleYet as exc:
        raise BrokerUnavailable(f"created topics not visible in metadata within {timeout:.0f}s: {exc}") from exc



def delete_topics(bootstrap_servers: str, topics: Iterable[str], *, timeout: float = 30.0,
                  extra: Mapping[str, object] | None = None) -> list[str]:
    """Delete each of ``topics`` that exists (with its messages); returns the ones deleted."""
    admin = _admin(bootstrap_servers, extra or {})
    try:
        existing = admin.list_topics(timeout=min(timeout, 10.0)).topics
    except KafkaException as exc:
        raise operation_error("reading cluster metadata", exc) from exc
    names = [topic for topic in dict.fromkeys(topics) if topic in existing]
    if not names:
        return []
    try:
        futures = admin.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
    except KafkaException as exc:
        raise operation_error("deleting topics", exc) from exc
    deleted: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout + 5)
        except KafkaException as exc:
            err = kafka_error_of(exc)
            if err is not None and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue
            raise operation_error(f"deleting topic {name!r}", exc) from exc
        except TimeoutError as exc:
            raise BrokerUnavailable(f"deleting topic {name!r}: no answer within {timeout + 5:.0f}s") from exc
        deleted.append(name)
    if deleted:
        logger.info("deleted topics %s", ", ".join(deleted))
    return deleted


def reachable(bootstrap_servers: str, *, timeout: float, extra: Mapping[str, object] | None = None) -> bool:
    """Whether a broker of the cluster answers a metadata request within ``timeout`` seconds."""
    admin = _admin(bootstrap_servers, extra or {})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException:
        return False
    return True


def prepare_consumer_topics(bootstrap_servers: str, topics: Iterable[str], names: TopicNames, levels: int,
                            extra: Mapping[str, object]) -> None:
    """Create what a consumer of ``topics`` needs and is missing: each topic's dead-letter topic and ``levels``
    retry topics (with its partition count), and a source topic that does not exist yet (broker defaults).

    A failure is logged, not raised: the consumer then relies on the broker's auto-creation.
    """
    from .._errors import ReliableMessagingError

    topics = list(topics)
    try:
        counts = partition_counts(bootstrap_servers, topics, extra=extra)
        # A source topic that does not exist yet is created too: librdkafka only looks again for a subscribed
        # topic it did not find at the next metadata refresh (topic.metadata.refresh.interval.ms, 5 minutes),
        # so records published meanwhile would wait.
        wanted: dict[str, int] = {topic: -1 for topic in topics if topic not in counts}
        for topic in topics:
            partitions = counts.get(topic, -1)
            wanted[names.dead_letter(topic)] = partitions
            for level in range(1, levels + 1):
                wanted[names.retry(topic, level)] = partitions
        create_topics(bootstrap_servers, wanted, extra=extra)
    except ReliableMessagingError as exc:
        logger.warning("could not create retry/dead-letter topics (%s); relying on broker auto-creation", exc)
        logger.debug("topic creation failure", exc_info=exc)
