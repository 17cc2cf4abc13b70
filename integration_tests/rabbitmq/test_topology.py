"""Topology declarations against a real broker: idempotent, and mismatches become typed errors in bounded time."""

from __future__ import annotations

import time

import pika
import pytest

from reliable_messaging import (
    ConfigurationError,
    RabbitMQConsumer,
    RabbitMQConsumerConfig,
    RabbitMQExchange,
    RabbitMQExchangeType,
    RabbitMQPublisher,
    RabbitMQPublisherConfig,
    RabbitMQQueue,
    RabbitMQQueueType,
    RabbitMQTopology,
    TopologyMismatch,
)
from reliable_messaging.testing import RabbitMQEndpoint

from ._helpers import Admin

pytestmark = [pytest.mark.rabbitmq]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("queue_type", [RabbitMQQueueType.CLASSIC, RabbitMQQueueType.QUORUM])
def test_declaring_twice_is_harmless_and_keeps_messages(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str,
    queue_type: RabbitMQQueueType,
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name, type=queue_type,
                                           delivery_limit=3 if queue_type is RabbitMQQueueType.QUORUM else None)
    admin.cleanup(topology)
    topology.declare(rabbitmq_endpoint.url)
    admin.publish(queue_name, queue_name, [b"kept"])
    topology.declare(rabbitmq_endpoint.url)
    config = RabbitMQPublisherConfig(url=rabbitmq_endpoint.url, connection_name=connection_name)
    with RabbitMQPublisher(config, topology=topology) as publisher:  # declares a third time
        publisher.publish(queue_name, queue_name, b"routed").result(timeout=10)
    assert [g.body for g in admin.drain(queue_name)] == [b"kept", b"routed"]
    # The DLX/DLQ pair is wired: a rejected message lands in <queue>.dlq.
    admin.publish(queue_name, queue_name, [b"reject me"])
    conn = admin.connect()
    channel = conn.channel()
    method, _props, _body = channel.basic_get(queue_name)
    assert method is not None
    channel.basic_reject(method.delivery_tag, requeue=False)
    conn.close()
    deadline = time.monotonic() + 10
    while admin.count(f"{queue_name}.dlq") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    (dead,) = admin.drain(f"{queue_name}.dlq")
    assert dead.body == b"reject me" and dead.headers["x-death"][0]["reason"] == "rejected"


@pytest.mark.timeout(60)
def test_queue_argument_mismatch_names_the_argument(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    admin.declare(RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name, max_length=10),)))
    changed = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name, max_length=5),))
    started = time.monotonic()
    with pytest.raises(TopologyMismatch) as info:
        changed.declare(rabbitmq_endpoint.url)
    assert (info.value.name, info.value.argument, info.value.field) == (queue_name, "x-max-length", "x-max-length")
    assert isinstance(info.value, ConfigurationError) and isinstance(info.value, ValueError)
    assert "PRECONDITION_FAILED" in str(info.value)

    with pytest.raises(TopologyMismatch) as info:
        RabbitMQPublisher(RabbitMQPublisherConfig(url=rabbitmq_endpoint.url, connection_name=connection_name),
                          topology=changed)
    assert info.value.argument == "x-max-length"

    consumer = RabbitMQConsumer(RabbitMQConsumerConfig(url=rabbitmq_endpoint.url, connection_name=connection_name),
                                queue_name, lambda m: None, topology=changed)
    with pytest.raises(TopologyMismatch) as info:
        consumer.start()
    assert info.value.argument == "x-max-length"
    assert time.monotonic() - started < 15, "typed errors, not retries until a timeout"


@pytest.mark.timeout(60)
def test_queue_type_and_exchange_type_mismatches(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str
) -> None:
    exchange = f"{queue_name}.x"
    admin.declare(RabbitMQTopology(exchanges=(RabbitMQExchange(name=exchange),),
                                   queues=(RabbitMQQueue(name=queue_name),)))
    with pytest.raises(TopologyMismatch) as info:
        RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name, type=RabbitMQQueueType.QUORUM),)).declare(
            rabbitmq_endpoint.url)
    assert info.value.argument == "x-queue-type"
    with pytest.raises(TopologyMismatch) as info:
        RabbitMQTopology(exchanges=(RabbitMQExchange(name=exchange, type=RabbitMQExchangeType.FANOUT),)).declare(
            rabbitmq_endpoint.url)
    assert (info.value.name, info.value.argument) == (exchange, "type")


@pytest.mark.timeout(30)
def test_reserved_names_and_bindings_to_missing_exchanges_are_configuration_errors(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str
) -> None:
    with pytest.raises(ConfigurationError, match="reserves"):
        RabbitMQQueue(name="amq.mine")
    from reliable_messaging import RabbitMQBinding

    admin.cleanup(queues=(queue_name,))
    topology = RabbitMQTopology(queues=(RabbitMQQueue(name=queue_name),),
                                bindings=(RabbitMQBinding(queue=queue_name, exchange=f"{queue_name}.none"),))
    with pytest.raises(ConfigurationError, match="404") as info:
        topology.declare(rabbitmq_endpoint.url)
    assert not isinstance(info.value, TopologyMismatch)
    assert isinstance(info.value.__cause__, pika.exceptions.ChannelClosedByBroker), "the pika error stays the cause"
