"""The facade contract on a real RabbitMQ broker."""

from __future__ import annotations

import time
from typing import Any

import pika
import pytest

import reliable_messaging as rm
from reliable_messaging import Broker
from reliable_messaging.testing import RabbitMQEndpoint

from .base import FacadeContract

pytestmark = [pytest.mark.rabbitmq]


class TestRabbitMQFacade(FacadeContract):
    # prefetch 1: each of two consumer instances holds one copy at a time, so copies spread over both.
    two_instance_settings = {"prefetch": 1}  # noqa: RUF012

    @pytest.fixture
    def url(self, rabbitmq_endpoint: RabbitMQEndpoint) -> str:
        return rabbitmq_endpoint.url

    def read_dead_letters(self, url: str, source: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        letters: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        try:
            channel = connection.channel()
            while len(letters) < count and time.monotonic() < deadline:
                method, properties, body = channel.basic_get(f"{source}.dlq", auto_ack=True)
                if method is None:
                    time.sleep(0.1)
                    continue
                headers = dict(properties.headers or {})
                letters.append({"body": body, "headers": headers, "message_id": properties.message_id})
        finally:
            connection.close()
        assert len(letters) >= count, f"only {len(letters)} of {count} dead letters in {source}.dlq"
        return letters

    def prepare_two_places(self, url: str, source: str) -> None:
        """Nothing to do: one queue, two consumers; prefetch 1 spreads the copies."""

    def publish_to_two_places(self, broker: Broker, source: str, message_id: str, body: bytes) -> None:
        for _ in range(2):
            broker.publish(source, body, message_id=message_id).result(timeout=30)


# -- publish() never raises for broker trouble, and never waits on the network ------------------------------


class TestRabbitMQFacadeConcurrent(TestRabbitMQFacade):
    """The same contract with 16 handlers at once (the crash test's consumer process runs one at a time)."""

    consumer_settings = {"concurrency": 16}  # noqa: RUF012
    test_redelivered_after_a_crash_between_done_and_ack_is_processed_once = None  # type: ignore[assignment]


@pytest.mark.timeout(60)
def test_an_unreachable_broker_fails_the_futures_not_the_call() -> None:
    with rm.connect("amqp://guest:guest@127.0.0.1:1/%2F", connect_timeout=2.0) as broker:
        began = time.monotonic()
        future = broker.publish("orders", b"x")
        assert time.monotonic() - began < 0.5, "publish() waited for the connection"
        with pytest.raises(rm.BrokerUnavailable, match=r"127\.0\.0\.1:1 within connect_timeout=2\.0s.*not sent"):
            future.result(timeout=15)
        assert 1.5 < time.monotonic() - began < 10
        began = time.monotonic()
        later = broker.publish("orders", b"y")
        assert isinstance(later.exception(timeout=1), rm.BrokerUnavailable), "fails at once while unreachable"
        assert broker.stats().publisher.failures["unavailable"] == 2
        assert broker.ping(2) is False


@pytest.mark.timeout(60)
def test_refused_credentials_fail_the_futures_without_the_password(rabbitmq_endpoint: RabbitMQEndpoint) -> None:
    url = rabbitmq_endpoint.url.replace("guest:guest@", "guest:wrong-secret@")
    with rm.connect(url, connect_timeout=5.0) as broker:
        future = broker.publish("orders", b"x")
        error = future.exception(timeout=30)
        assert isinstance(error, rm.ReliableMessagingError), error
        assert "wrong-secret" not in str(error) and "wrong-secret" not in repr(broker)


@pytest.mark.timeout(60)
def test_a_destination_existing_as_another_exchange_type_fails_its_futures_only(
        rabbitmq_endpoint: RabbitMQEndpoint, unique_name: str) -> None:
    clash, fine = f"{unique_name}-direct", f"{unique_name}-fine"
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_endpoint.url))
    connection.channel().exchange_declare(clash, "direct", durable=True)
    connection.close()
    with rm.connect(rabbitmq_endpoint.url) as broker:
        broker.declare(fine, source=fine)
        failed = broker.publish(clash, b"x").exception(timeout=30)
        assert isinstance(failed, rm.DeliveryFailed) and "inequivalent" in str(failed), failed
        assert isinstance(broker.publish(clash, b"y").exception(timeout=30), rm.DeliveryFailed), "and from now on"
        assert broker.publish(fine, b"z").result(timeout=30).destination == fine, "other destinations go on"
        broker.delete(fine, source=fine)
        broker.delete(clash)


@pytest.mark.timeout(60)
def test_publishing_first_then_consuming_through_a_declared_binding(
        rabbitmq_endpoint: RabbitMQEndpoint, unique_name: str) -> None:
    """declare(): a source bound to a destination by a pattern, before anyone publishes or consumes."""
    source = f"{unique_name}-eu"
    with rm.connect(rabbitmq_endpoint.url) as broker:
        broker.declare(unique_name, source=source, pattern="eu.#")
        with pytest.raises(rm.Unroutable):  # mandatory: nothing is bound for this key
            broker.publish(unique_name, b"us order", key="us.ny").result(timeout=30)
        broker.publish(unique_name, b"eu order", key="eu.fr.paris").result(timeout=30)
        got: list[bytes] = []
        consumer = broker.consumer(source, lambda m: got.append(m.body))
        consumer.start()
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [b"eu order"]
        consumer.stop()
        broker.delete(unique_name, source=source)
