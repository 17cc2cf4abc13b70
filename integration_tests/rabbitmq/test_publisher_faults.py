"""The publisher under real faults: SIGKILL and restart of the broker, TCP connections cut by a proxy.

The guarantee under test: every message whose future resolved with a Delivery is in the queue
afterwards, and messages that were unconfirmed when the connection died were republished (with
their original message id) and confirmed on a later connection.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from reliable_messaging import (
    DeliveryFuture,
    RabbitMQPublisher,
    RabbitMQPublisherConfig,
    RabbitMQQueue,
    RabbitMQTopology,
    RetryPolicy,
)
from reliable_messaging.testing import RabbitMQEndpoint, wait_for
from reliable_messaging.testing.plugin import BrokerFaults, ProxiedEndpoint

from ._helpers import Admin, Got

pytestmark = [pytest.mark.rabbitmq, pytest.mark.fault]

FAST_RECONNECT = RetryPolicy(max_attempts=100, initial_delay=0.1, max_delay=1.0, jitter=0.1)


class Producer(threading.Thread):
    """Publishes ``total`` messages in small bursts, so faults land in the middle of the stream."""

    def __init__(self, publisher: RabbitMQPublisher, queue: str, total: int, burst: int = 50,
                 pause: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.publisher, self.queue, self.total, self.burst, self.pause = publisher, queue, total, burst, pause
        self.futures: list[DeliveryFuture] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(self.total):
                self.futures.append(self.publisher.publish("", self.queue, f"{i}".encode()))
                if i % self.burst == self.burst - 1:
                    time.sleep(self.pause)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def confirmed(self) -> int:
        return sum(1 for f in list(self.futures) if f.done() and f.exception(timeout=0) is None)


def _assert_all_confirmed_and_stored(producer: Producer, admin: Admin, queue: str) -> list[Got]:
    assert producer.error is None, producer.error
    assert len(producer.futures) == producer.total
    failures = [f.exception(timeout=120) for f in producer.futures]
    assert [e for e in failures if e is not None] == [], "every publish must be confirmed after the fault"
    got = admin.drain(queue)
    stored_ids = {g.message_id for g in got}
    missing = [f.message_id for f in producer.futures if f.message_id not in stored_ids]
    assert missing == [], f"{len(missing)} confirmed messages are not in the queue"
    # At-least-once: a message whose confirm was lost with the connection may be stored twice,
    # under the same message id (the body says which message it was).
    assert {int(g.body) for g in got} == set(range(producer.total))
    assert all(g.message_id == producer.futures[int(g.body)].message_id for g in got)
    return got


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_and_restart_of_the_broker_loses_no_confirmed_message(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, broker_faults: BrokerFaults, queue_name: str,
    connection_name: str,
) -> None:
    node = rabbitmq_endpoint.controllable_node()
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.declare(topology)
    # RabbitMQ 3.10 writes a new durable queue's record lazily: a SIGKILL within ~1 s of the declaration
    # lost the queue (with its messages) 1 time in 3. The publisher re-declares its topology after every
    # reconnect, but a lost queue would take its confirmed messages with it: let the declaration settle.
    time.sleep(2.5)
    config = RabbitMQPublisherConfig(url=rabbitmq_endpoint.url, connection_name=connection_name,
                                     delivery_timeout=120, reconnect=FAST_RECONNECT)
    with RabbitMQPublisher(config, topology=topology) as publisher:
        producer = Producer(publisher, queue_name, total=6000, burst=100, pause=0.01)
        producer.start()
        wait_for(lambda: producer.confirmed() >= 1500, 60, "1500 confirms before the kill")
        confirmed_before_kill = producer.confirmed()
        broker_faults.kill(node)
        published_at_kill = len(producer.futures)
        assert published_at_kill > confirmed_before_kill, "some publishes must be unconfirmed at the kill"
        time.sleep(1.0)  # publishing goes on into the outage: those wait for the reconnect
        broker_faults.start(node)
        producer.join(60)
        assert publisher.flush(timeout=120)
        stats = publisher.stats
    assert stats.connections >= 2
    assert stats.republished > 0, "unconfirmed publishes must have been republished after the restart"
    _assert_all_confirmed_and_stored(producer, admin, queue_name)


@pytest.mark.timeout(120)
def test_tcp_cuts_while_publishing_lose_no_confirmed_message(
    rabbitmq_proxy: ProxiedEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    """Each cut comes after the broker's answers stopped reaching the publisher (a one-way partition):
    the broker has stored publishes whose confirms are lost, so the publisher must republish them, and
    the queue holds those twice (same message id) - at-least-once, never less."""
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    admin.cleanup(topology)
    config = RabbitMQPublisherConfig(url=rabbitmq_proxy.address, connection_name=connection_name,
                                     reconnect=FAST_RECONNECT)
    with RabbitMQPublisher(config, topology=topology) as publisher:
        producer = Producer(publisher, queue_name, total=8000, burst=100, pause=0.01)
        producer.start()
        for threshold in (1500, 4000):
            wait_for(lambda t=threshold: producer.confirmed() >= t, 60, f"{threshold} confirms")
            assert rabbitmq_proxy.proxy.withhold_replies() == 1
            sent = len(producer.futures)
            # Unless all were sent already: on a busy machine the confirms lag and the producer can finish
            # before 4,000 are confirmed (seen once); the unconfirmed rest then meets the partition.
            wait_for(lambda s=sent: len(producer.futures) >= min(s + 50, producer.total), 30,
                     "publishes after the confirms stopped")
            time.sleep(0.3)  # let the broker take them in: their confirms are what gets lost
            assert rabbitmq_proxy.proxy.cut() == 1
        producer.join(60)
        assert publisher.flush(timeout=60)
        stats = publisher.stats
    assert stats.connections == 3
    assert stats.republished >= 100, stats
    got = _assert_all_confirmed_and_stored(producer, admin, queue_name)
    assert len(got) > producer.total, "publishes stored before their confirm was lost are stored twice"


@pytest.mark.timeout(60)
def test_reconnect_attempts_to_a_refusing_broker_are_logged_once_per_interval_not_each_time(
    rabbitmq_proxy: ProxiedEndpoint, queue_name: str, connection_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While the broker refuses connections, pika logs five or six ERROR lines (one with a traceback) per
    attempt; attempts every 0.1-1 s would fill the log. Each kind of line goes through once per 30 s."""
    caplog.set_level(logging.WARNING)
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),))
    config = RabbitMQPublisherConfig(url=rabbitmq_proxy.address, connection_name=connection_name,
                                     reconnect=FAST_RECONNECT)
    with RabbitMQPublisher(config, topology=topology) as publisher:
        publisher.publish("", queue_name, b"before").result(timeout=30)
        caplog.clear()
        rabbitmq_proxy.proxy.refuse()
        rabbitmq_proxy.proxy.cut()
        time.sleep(6)  # about ten reconnect attempts
        attempts = publisher.stats.connections  # unchanged: none got through
        rabbitmq_proxy.proxy.accept()
        publisher.publish("", queue_name, b"after").result(timeout=30)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert attempts == 1
    # About ten attempts: some sixty lines without the filter; each kind once (a few kinds differ in more
    # than numbers: the stack pika prints, a reset during the handshake or before it).
    assert len(lines) <= 25, [r.getMessage()[:120] for r in lines]
    assert sum(1 for r in lines if r.exc_info) <= 2, "a traceback per attempt"
