"""Reconnect backoff is tenacity's, bounded by the policy, with the sleep injected (no real waiting).

The only socket involved is a refused connection to a closed loopback port: no broker.
"""

from __future__ import annotations

import socket
import time

import pytest

from reliable_messaging import (
    BrokerUnavailable,
    RabbitMQConsumer,
    RabbitMQConsumerConfig,
    RabbitMQPublisher,
    RabbitMQPublisherConfig,
    RetryPolicy,
)


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"amqp://guest:guest@127.0.0.1:{port}/%2F"


def test_publisher_gives_up_after_max_attempts_with_policy_delays(closed_port_url: str) -> None:
    slept: list[float] = []
    policy = RetryPolicy(max_attempts=4, initial_delay=0.5, max_delay=2.0, multiplier=2.0, jitter=0.0,
                         sleep=slept.append)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"refused|Connection|connect"):
        RabbitMQPublisher(RabbitMQPublisherConfig(url=closed_port_url, reconnect=policy, connect_timeout=10))
    assert time.monotonic() - started < 5, "the injected sleep must not wait"
    assert slept == [0.5, 1.0, 2.0], "three waits between four attempts, exponential and capped"


def test_consumer_start_gives_up_the_same_way(closed_port_url: str) -> None:
    slept: list[float] = []
    policy = RetryPolicy(max_attempts=3, initial_delay=0.1, max_delay=0.15, jitter=0.0, sleep=slept.append)
    consumer = RabbitMQConsumer(RabbitMQConsumerConfig(url=closed_port_url, reconnect=policy), "orders",
                                lambda m: None)
    with pytest.raises(BrokerUnavailable):
        consumer.start()
    assert slept == [0.1, 0.15]
    assert not consumer.running
    consumer.stop()  # harmless after a failed start
