"""Reconnect backoff is tenacity's, bounded by the policy, with the sleep injected (no real waiting).

The only socket involved is a refused connection to a closed loopback port: no broker.
"""

from __future__ import annotations

import socket
import struct
import threading
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


def test_a_connection_reset_as_it_is_accepted_is_retried_not_fatal() -> None:
    """A peer that accepts and at once resets (a proxy refusing, a broker at its socket limit) can make
    pika fail inside its connect callback with ValueError ("getpeername() failed"): one more failed
    attempt, not the end of the I/O thread."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    port = server.getsockname()[1]
    stop = threading.Event()

    def reset_everyone() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST right away

    thread = threading.Thread(target=reset_everyone, daemon=True)
    thread.start()
    slept: list[float] = []
    policy = RetryPolicy(max_attempts=100, initial_delay=0.001, max_delay=0.001, jitter=0.0, sleep=slept.append)
    try:
        with pytest.raises(BrokerUnavailable) as info:
            RabbitMQPublisher(RabbitMQPublisherConfig(url=f"amqp://guest:guest@127.0.0.1:{port}/%2F",
                                                      reconnect=policy, connect_timeout=5))
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert "I/O thread failed" not in str(info.value)
    assert len(slept) == 99, "every attempt failed as a connection failure, and was retried"
