"""Deleting what a test created on the brokers, so a long-lived local broker does not fill up.

Every name a test uses contains its ``unique_name`` (``<test name>-<8 hex>``): the fixtures
``topic``/``queue_name``/``group_id`` prefix it, the library suffixes those
(``<topic>.DLT``, ``<q>.retry.<n>``, ...), tests add their own suffixes (``-g``). The random
suffix makes "contains the unique name" safe to delete, even with other test runs on the same broker.

- Kafka can list its topics and consumer groups, so everything containing the name goes.
- RabbitMQ cannot list queues over AMQP (only the management plugin or ``rabbitmqctl`` can, far
  too slowly for a per-test teardown), so the queues and exchanges the fixtures and the library
  derive from the name are deleted by name; deleting one that does not exist is a no-op.

Best effort: a teardown must never fail a test. Every call runs under a short deadline, and
what it could not finish is logged and reported as incomplete, for :func:`retry` at the end of
the session: a broker a fault test killed may be back by then, and a consumer it killed is no
longer a member of its group (a group with members cannot be deleted).

At the end of the session the Kafka names of every test are swept once more: with
``auto.create.topics.enable`` (the local brokers' setting) a client the test left alive
recreates a deleted topic the next time it refreshes its metadata (measured: the cluster
tests' topics came back, empty, once a later test killed brokers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FIXTURE_PREFIXES",
    "RABBITMQ_RETRY_LEVELS",
    "Cleanup",
    "KafkaCleanup",
    "delete_kafka_names",
    "delete_rabbitmq_names",
    "rabbitmq_candidates",
    "retry",
]

logger = logging.getLogger("reliable_messaging.testing.cleanup")

_LIBRDKAFKA_LOGGER = logging.getLogger("reliable_messaging.testing.cleanup.librdkafka")
"""librdkafka logs every refused connection to stderr by default; a cleanup against a broker a fault
test killed expects those, and already logs one warning of its own."""

FIXTURE_PREFIXES = ("", "q.", "t.", "g.")
"""How the name fixtures build on ``unique_name``: itself (facade and example tests), ``q.``, ``t.``, ``g.``."""

RABBITMQ_RETRY_LEVELS = 10
"""``<q>.retry.1`` .. ``<q>.retry.10`` are deleted: enough for ``max_attempts`` up to 11 (the tests use at
most 10). Deleting a missing queue costs the broker ~0.5 ms, so guessing a few too many is cheap."""

KAFKA_TIMEOUT = 3.0
"""Seconds for the whole Kafka cleanup of one test (a reachable local broker needs ~20-100 ms)."""

RABBITMQ_TIMEOUT = 3.0
"""Seconds for the whole RabbitMQ cleanup of one test (a reachable local broker needs ~0.1 s)."""

RETRY_WITHIN = 15.0
"""Seconds :func:`retry` keeps trying at the end of a session: longer than the 6 s session timeout of
the consumers the crash tests kill, short enough not to hold up a run against a broker that stays down."""


def _left(deadline: float, cap: float) -> float:
    """Seconds until ``deadline``, at most ``cap`` and never below a small floor (0 means "no wait" to clients)."""
    return max(0.05, min(cap, deadline - time.monotonic()))


# -- one cleanup, and retrying the incomplete ones ------------------------------------------------


@dataclass(frozen=True)
class Cleanup:
    """Delete what belongs to ``uniques`` on one broker: Kafka at bootstrap servers, or RabbitMQ at a URL."""

    broker: str
    """``"kafka"`` or ``"rabbitmq"``."""
    address: str
    uniques: frozenset[str]

    def run(self, timeout: float | None = None) -> bool:
        """Delete now; True when everything went (False: worth another try later). Never raises."""
        if self.broker == "kafka":
            return delete_kafka_names(self.address, *self.uniques, timeout=timeout or KAFKA_TIMEOUT).complete
        return delete_rabbitmq_names(self.address, *self.uniques, timeout=timeout or RABBITMQ_TIMEOUT)

    def __str__(self) -> str:
        return f"{_describe(self.uniques)} ({self.broker} at {self.address})"


def _describe(uniques: Iterable[str]) -> str:
    """The names for a log line: the first few, then how many more."""
    names = sorted(uniques)
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(repr(n) for n in names[:3]) + more


def retry(cleanups: Iterable[Cleanup], *, within: float = RETRY_WITHIN, interval: float = 0.5) -> set[Cleanup]:
    """Run ``cleanups`` again until all are complete or ``within`` seconds have passed; returns those left.

    Meant for the end of a session, for teardowns that could not finish. Never raises.
    """
    pending = set(cleanups)
    deadline = time.monotonic() + within
    while pending and time.monotonic() < deadline:
        for cleanup in sorted(pending, key=str):
            if time.monotonic() >= deadline:
                break
            if cleanup.run(timeout=_left(deadline, KAFKA_TIMEOUT)):
                pending.discard(cleanup)
        if pending:
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    if pending:
        logger.warning("test names left on the brokers after %.0fs of retries: %s", within,
                       "; ".join(str(c) for c in sorted(pending, key=str)))
    return pending


# -- Kafka --------------------------------------------------------------------------------------


@dataclass
class KafkaCleanup:
    """What one Kafka cleanup did."""

    deleted: list[str] = field(default_factory=list)
    """Topics, and consumer groups as ``group <id>``."""
    failed: list[str] = field(default_factory=list)
    """Names whose deletion failed, e.g. a group a killed consumer is still a member of (until its
    session times out, seconds after the test): the broker refuses with NON_EMPTY_GROUP."""
    listed: bool = True
    """False when the names on the cluster could not all be listed (a broker down): some may be left."""

    @property
    def complete(self) -> bool:
        return self.listed and not self.failed


def delete_kafka_names(bootstrap_servers: str, *uniques: str, timeout: float = KAFKA_TIMEOUT) -> KafkaCleanup:
    """Delete every topic and consumer group whose name contains one of ``uniques``. Never raises.

    A fresh AdminClient per call: it costs ~20 ms, and a cached one would keep reconnecting in
    the background to brokers that fault tests kill.
    """
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError:  # the Kafka extra is not installed: nothing can have been created
        return KafkaCleanup()
    deadline = time.monotonic() + timeout
    conf: dict[str, object] = {"bootstrap.servers": bootstrap_servers, "logger": _LIBRDKAFKA_LOGGER,
                               "socket.connection.setup.timeout.ms": max(1000, int(timeout * 1000))}
    admin = AdminClient(conf)  # type: ignore[arg-type]  # the stubs do not list "logger"
    try:
        topics, groups, all_groups = _kafka_names_containing(admin, uniques, deadline)
        result = _kafka_delete(admin, topics, groups, deadline)
        result.listed = all_groups
        return result
    except Exception as exc:  # noqa: BLE001 - a teardown must not fail the test; the broker may be down
        logger.warning("could not clean up Kafka names containing %s at %s: %s", _describe(uniques),
                       bootstrap_servers, exc)
        return KafkaCleanup(listed=False)
    finally:
        admin.poll(0)  # hands librdkafka's queued log lines to the Python logger


def _kafka_names_containing(admin: Any, uniques: tuple[str, ...], deadline: float,
                            ) -> tuple[list[str], list[str], bool]:
    """``(topics, groups, all_groups)``: the names on the cluster that contain one of ``uniques``.

    ``all_groups`` is False when some broker did not answer the group listing (the topics are
    still worth deleting now). Raises when the topics cannot be listed.
    """
    # Both requests in flight at once: the group listing goes to every broker, the metadata to one.
    groups_future = admin.list_consumer_groups(request_timeout=_left(deadline, 2.0))
    metadata = admin.list_topics(timeout=_left(deadline, 2.0))
    topics = sorted(name for name in metadata.topics if _contains_any(name, uniques))
    try:
        listed = groups_future.result(timeout=_left(deadline, 3.0))
    except Exception as exc:  # noqa: BLE001 - the topics are still worth deleting
        logger.info("could not list Kafka consumer groups: %s", exc)
        return topics, [], False
    if listed.errors:  # e.g. one broker of a cluster down: its groups are missing from the list
        logger.info("listing Kafka consumer groups: %s", ", ".join(str(e) for e in listed.errors))
    groups = sorted(g.group_id for g in listed.valid if _contains_any(g.group_id, uniques))
    return topics, groups, not listed.errors


def _contains_any(name: str, uniques: tuple[str, ...]) -> bool:
    return any(unique in name for unique in uniques)


def _kafka_delete(admin: Any, topics: list[str], groups: list[str], deadline: float) -> KafkaCleanup:
    """Delete ``topics`` and ``groups`` in parallel; a single failure is recorded, not raised."""
    from confluent_kafka import KafkaError

    futures: dict[str, Any] = {}
    if topics:
        # operation_timeout > 0 on purpose: measured on Kafka 4, DeleteTopics with 0 answers success and
        # deletes nothing. With a timeout it answers once the topics are gone (~0.1 s on a local broker).
        futures.update(admin.delete_topics(topics, operation_timeout=_left(deadline, 2.0),
                                           request_timeout=_left(deadline, 2.5)))
    if groups:
        deleting = admin.delete_consumer_groups(groups, request_timeout=_left(deadline, 2.0))
        futures.update({f"group {group}": future for group, future in deleting.items()})
    result = KafkaCleanup()
    for name, future in futures.items():
        try:
            future.result(timeout=_left(deadline, 3.0))
        except Exception as exc:  # noqa: BLE001 - one name failing must not keep the others
            if _kafka_error_code(exc) in (KafkaError.GROUP_ID_NOT_FOUND, KafkaError.UNKNOWN_TOPIC_OR_PART):
                result.deleted.append(name)  # gone meanwhile: what we wanted
            else:
                logger.info("could not delete Kafka %s (retried at the end of the session): %s", name, exc)
                result.failed.append(name)
        else:
            result.deleted.append(name)
    if result.deleted:
        logger.debug("deleted Kafka %s", ", ".join(result.deleted))
    return result


def _kafka_error_code(exc: BaseException) -> int | None:
    """The KafkaError code a KafkaException carries, if any."""
    from confluent_kafka import KafkaError

    err = exc.args[0] if exc.args else None
    return err.code() if isinstance(err, KafkaError) else None


# -- RabbitMQ -----------------------------------------------------------------------------------


def rabbitmq_candidates(unique: str) -> tuple[list[str], list[str]]:
    """``(queues, exchanges)`` that the fixtures and the library's topology helpers derive from ``unique``.

    For each base ``<b>`` in ``unique``, ``q.<unique>``, ``t.<unique>``, ``g.<unique>``: queues
    ``<b>``, ``<b>.dlq``, ``<b>.retry.<n>``; exchanges ``<b>`` and ``<b>.dlx`` (see
    :meth:`~reliable_messaging.RabbitMQTopology.work_queue` and ``retry_queues``).
    """
    from reliable_messaging._rabbitmq._topology import (
        dead_letter_exchange_name,
        dead_letter_queue_name,
        retry_queue_name,
    )

    queues: list[str] = []
    exchanges: list[str] = []
    for base in (f"{prefix}{unique}" for prefix in FIXTURE_PREFIXES):
        queues += [base, dead_letter_queue_name(base)]
        queues += [retry_queue_name(base, n) for n in range(1, RABBITMQ_RETRY_LEVELS + 1)]
        exchanges += [base, dead_letter_exchange_name(base)]
    return queues, exchanges


def delete_rabbitmq_names(url: str, *uniques: str, timeout: float = RABBITMQ_TIMEOUT) -> bool:
    """Delete the :func:`rabbitmq_candidates` of each of ``uniques`` at ``url``; True if all went. Never raises.

    RabbitMQ answers ``delete-ok`` whether or not the queue or exchange existed, so there is
    no list of what was really deleted to return.
    """
    try:
        import pika
    except ImportError:  # the RabbitMQ extra is not installed: nothing can have been created
        return True
    deadline = time.monotonic() + timeout
    queues: list[str] = []
    exchanges: list[str] = []
    for unique in uniques:
        more_queues, more_exchanges = rabbitmq_candidates(unique)
        queues += more_queues
        exchanges += more_exchanges
    try:
        params = pika.URLParameters(url)
        params.connection_attempts = 1
        params.socket_timeout = timeout
        params.stack_timeout = timeout
        params.blocked_connection_timeout = timeout
        params.client_properties = {"connection_name": f"test cleanup {_describe(uniques)}"}
        connection = pika.BlockingConnection(params)
    except Exception as exc:  # noqa: BLE001 - a teardown must not fail the test; the broker may be down
        logger.warning("could not clean up RabbitMQ names of %s at %s: %r", _describe(uniques), url, exc)
        return False
    try:
        items = [("queue", q) for q in queues] + [("exchange", e) for e in exchanges]
        return _rabbitmq_delete(connection, items, deadline)
    except Exception as exc:  # noqa: BLE001 - e.g. the connection dropped: a fault test's broker restart
        logger.warning("RabbitMQ cleanup of %s at %s stopped: %r", _describe(uniques), url, exc)
        return False
    finally:
        _close_quietly(connection)


def _rabbitmq_delete(connection: Any, items: list[tuple[str, str]], deadline: float) -> bool:
    """Delete each ``(kind, name)`` on one channel, opening a new one after the broker closed it; True if all went."""
    import pika.exceptions

    complete = True
    channel = connection.channel()
    for kind, name in items:
        if time.monotonic() > deadline:
            logger.warning("RabbitMQ cleanup ran out of time before %s %r", kind, name)
            return False
        try:
            if kind == "queue":
                channel.queue_delete(name)
            else:
                channel.exchange_delete(name)
        except pika.exceptions.ChannelClosedByBroker as exc:
            # 405 RESOURCE_LOCKED: an exclusive queue of a connection the test left open. The broker
            # closes the channel on any such refusal; the remaining names still deserve a try.
            logger.info("could not delete RabbitMQ %s %r: %s", kind, name, exc)
            complete = False
            channel = connection.channel()
    return complete


def _close_quietly(connection: Any) -> None:
    """Close ``connection`` if it is open; a failure here changes nothing for the test."""
    try:
        if connection.is_open:
            connection.close()
    except Exception as exc:  # noqa: BLE001 - the broker may have gone away meanwhile
        logger.debug("closing the cleanup connection failed: %s", exc)
