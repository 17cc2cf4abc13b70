"""The service's tests: one on the in-process broker (fast, no broker), the same on real Kafka and RabbitMQ."""

from __future__ import annotations

import pytest
from orders_service import Orders, consume

import reliable_messaging as rm
from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint, wait_for


def run_orders(url: str, source: str, group: str) -> tuple[Orders, rm.ConsumerStats]:
    orders = Orders()
    with rm.connect(url) as broker:
        broker.declare(source, source=source)
        consumer = consume(broker, source, orders, group)
        for body in (b"o-1:120", b"o-2:80", b"o-3:lots"):
            broker.publish(source, body).result(timeout=30)
        assert orders.wait_for(2, timeout=30)
        wait_for(lambda: consumer.stats.dead_lettered == 1, 30, "the invalid order to be dead-lettered")
        consumer.stop()
        return orders, consumer.stats


def test_orders_on_the_in_process_broker() -> None:
    orders, stats = run_orders("memory://", "orders", "orders-service")
    assert orders.amounts == {"o-1": 120, "o-2": 80}
    assert (stats.processed, stats.dead_lettered) == (2, 1)  # "o-3:lots" rejected: dead-lettered, not retried


@pytest.mark.kafka
def test_orders_on_kafka(kafka_endpoint: KafkaEndpoint, topic: str, group_id: str) -> None:
    orders, stats = run_orders(f"kafka://{kafka_endpoint.bootstrap_servers}", topic, group_id)
    assert orders.amounts == {"o-1": 120, "o-2": 80}
    assert (stats.processed, stats.dead_lettered) == (2, 1)  # "o-3:lots" rejected: dead-lettered, not retried


@pytest.mark.rabbitmq
def test_orders_on_rabbitmq(rabbitmq_endpoint: RabbitMQEndpoint, queue_name: str) -> None:
    orders, stats = run_orders(rabbitmq_endpoint.url, queue_name, "unused")
    assert orders.amounts == {"o-1": 120, "o-2": 80}
    assert (stats.processed, stats.dead_lettered) == (2, 1)  # "o-3:lots" rejected: dead-lettered, not retried
