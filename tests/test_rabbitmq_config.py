"""RabbitMQ configuration and topology validation: typed errors naming the field, before any network."""

from __future__ import annotations

from typing import Any

import pytest

from reliable_messaging import (
    ClaimResult,
    ConfigurationError,
    DedupStore,
    RabbitMQAckMode,
    RabbitMQBinding,
    RabbitMQConsumer,
    RabbitMQConsumerConfig,
    RabbitMQExchange,
    RabbitMQPublisherConfig,
    RabbitMQQueue,
    RabbitMQQueueType,
    RabbitMQRetryMode,
    RabbitMQTopology,
    RetryPolicy,
)


class _Store(DedupStore):
    def claim(self, key: str) -> ClaimResult:
        return ClaimResult.ACQUIRED

    def mark_done(self, key: str) -> None:
        pass

    def release(self, key: str) -> None:
        pass


@pytest.mark.parametrize(("kwargs", "field", "match"), [
    ({"url": "http://localhost"}, "url", "amqp:// or amqps://"),
    ({"url": ""}, "url", "non-empty"),
    ({"max_in_flight": 0}, "max_in_flight", ">= 1"),
    ({"max_in_flight": True}, "max_in_flight", ">= 1"),
    ({"delivery_timeout": 0}, "delivery_timeout", "> 0"),
    ({"blocked_timeout": -1}, "blocked_timeout", "> 0"),
    ({"max_buffered": 0}, "max_buffered", ">= 1"),
    ({"persistent": "yes"}, "persistent", "True or False"),
    ({"mandatory": 1}, "mandatory", "True or False"),
    ({"confirms": "no"}, "confirms", "True or False"),
    ({"confirms": False}, "mandatory", "mandatory=True needs confirms=True"),
    ({"heartbeat": 70000}, "heartbeat", "0..65535"),
    ({"connect_timeout": 0}, "connect_timeout", "> 0"),
    ({"reconnect": 3}, "reconnect", "RetryPolicy"),
    ({"app_id": "x" * 300}, "app_id", "255 bytes"),
])
def test_publisher_config_names_the_bad_field(kwargs: dict[str, Any], field: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        RabbitMQPublisherConfig(**kwargs)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("kwargs", "field", "match"), [
    ({"prefetch": 0}, "prefetch", ">= 1 and <= 65535"),
    ({"prefetch": 70000}, "prefetch", "<= 65535"),
    ({"ack_mode": "sometimes"}, "ack_mode", "'manual', 'auto'"),
    ({"batch_size": 0}, "batch_size", ">= 1"),
    ({"batch_size": 200, "prefetch": 100}, "batch_size", "must be <= prefetch"),
    ({"batch_timeout": 0}, "batch_timeout", "> 0"),
    ({"consumer_tag": ""}, "consumer_tag", "non-empty"),
    ({"exclusive": "no"}, "exclusive", "True or False"),
])
def test_consumer_config_names_the_bad_field(kwargs: dict[str, Any], field: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match) as info:
        RabbitMQConsumerConfig(**kwargs)
    assert info.value.field == field


def test_configs_are_frozen_keyword_only_and_accept_enum_values_as_strings() -> None:
    config = RabbitMQConsumerConfig(ack_mode="auto")  # type: ignore[arg-type]
    assert config.ack_mode is RabbitMQAckMode.AUTO
    with pytest.raises(AttributeError):
        config.prefetch = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        RabbitMQPublisherConfig("amqp://localhost")  # type: ignore[misc]
    # batch_size > prefetch is fine with automatic acks: basic.qos does not apply to them.
    assert RabbitMQConsumerConfig(ack_mode=RabbitMQAckMode.AUTO, batch_size=500, prefetch=10).batch_size == 500


def _consumer(**kwargs: Any) -> RabbitMQConsumer:
    config = kwargs.pop("config", RabbitMQConsumerConfig())
    return RabbitMQConsumer(config, kwargs.pop("queue", "orders"), kwargs.pop("handler", lambda m: None), **kwargs)


def test_consumer_refuses_incompatible_combinations_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="AUTO cannot be combined with dedup") as info:
        _consumer(config=RabbitMQConsumerConfig(ack_mode=RabbitMQAckMode.AUTO), dedup=_Store())
    assert info.value.field == "dedup"
    with pytest.raises(ConfigurationError, match="batch handlers") as info:
        _consumer(config=RabbitMQConsumerConfig(batch_size=10), dedup=_Store())
    assert info.value.field == "dedup"
    classic = RabbitMQTopology.work_queue("orders")
    with pytest.raises(ConfigurationError, match="REQUEUE needs a quorum queue") as info:
        _consumer(retry_mode=RabbitMQRetryMode.REQUEUE, topology=classic)
    assert info.value.field == "retry_mode"
    quorum = RabbitMQTopology.work_queue("orders", type=RabbitMQQueueType.QUORUM)
    assert _consumer(retry_mode="requeue", topology=quorum).retry_mode is RabbitMQRetryMode.REQUEUE
    with pytest.raises(ConfigurationError, match="retry_mode must be one of") as info:
        _consumer(retry_mode="later")
    with pytest.raises(ConfigurationError, match="handler must be callable"):
        _consumer(handler=42)
    with pytest.raises(ConfigurationError, match="reserves"):
        _consumer(queue="amq.orders")
    with pytest.raises(ConfigurationError, match="RetryPolicy"):
        _consumer(retry=5)
    with pytest.raises(ConfigurationError, match="RabbitMQConsumerConfig"):
        RabbitMQConsumer(RabbitMQPublisherConfig(), "orders", lambda m: None)  # type: ignore[arg-type]


def test_queue_validation() -> None:
    with pytest.raises(ConfigurationError, match="must be durable") as info:
        RabbitMQQueue(name="q", type=RabbitMQQueueType.QUORUM, exclusive=True)
    assert info.value.field == "type"
    with pytest.raises(ConfigurationError, match="needs type=QUORUM") as info:
        RabbitMQQueue(name="q", delivery_limit=3)
    assert info.value.field == "delivery_limit"
    with pytest.raises(ConfigurationError, match="overflow must be one of"):
        RabbitMQQueue(name="q", overflow="explode")
    with pytest.raises(ConfigurationError, match="255 bytes"):
        RabbitMQQueue(name="é" * 200)
    with pytest.raises(ConfigurationError, match="needs dead_letter_exchange"):
        RabbitMQQueue(name="q", dead_letter_routing_key="k")
    with pytest.raises(ConfigurationError, match="queue type must be one of"):
        RabbitMQQueue(name="q", type="stream")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="exchange type must be one of"):
        RabbitMQExchange(name="x", type="x-delayed-message")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="must hold RabbitMQQueue"):
        RabbitMQTopology(queues=("q",))  # type: ignore[arg-type]


def test_queue_declare_arguments() -> None:
    queue = RabbitMQQueue(name="q", type=RabbitMQQueueType.QUORUM, dead_letter_exchange="q.dlx",
                          dead_letter_routing_key="q", delivery_limit=4, message_ttl=1.5, max_length=10,
                          overflow="reject-publish", arguments={"x-custom": "v"})
    assert queue.declare_arguments() == {
        "x-queue-type": "quorum", "x-dead-letter-exchange": "q.dlx", "x-dead-letter-routing-key": "q",
        "x-delivery-limit": 4, "x-message-ttl": 1500, "x-max-length": 10, "x-overflow": "reject-publish",
        "x-custom": "v",
    }
    assert RabbitMQQueue(name="plain").declare_arguments() == {}


def test_work_queue_and_retry_queue_helpers() -> None:
    topology = RabbitMQTopology.work_queue("orders", type=RabbitMQQueueType.QUORUM, delivery_limit=5)
    assert [e.name for e in topology.exchanges] == ["orders", "orders.dlx"]
    assert [q.name for q in topology.queues] == ["orders", "orders.dlq"]
    work = topology.queue("orders")
    assert work is not None and work.declare_arguments() == {
        "x-queue-type": "quorum", "x-dead-letter-exchange": "orders.dlx", "x-dead-letter-routing-key": "orders",
        "x-delivery-limit": 5}
    assert [(b.queue, b.exchange, b.routing_key) for b in topology.bindings] == [
        ("orders", "orders", "orders"), ("orders.dlq", "orders.dlx", "orders")]
    retry = RabbitMQTopology.retry_queues("orders", 4)
    assert [q.name for q in retry.queues] == ["orders.retry.1", "orders.retry.2", "orders.retry.3"]
    assert all(q.declare_arguments() == {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "orders"}
               for q in retry.queues)
    assert [q.name for q in RabbitMQTopology.retry_queues("orders", 1).queues] == ["orders.retry.1"]
    combined = topology + retry + topology
    assert len(combined.queues) == 5 and len(combined.exchanges) == 2
    assert len(topology.steps()) == 2 + 2 + 2


def test_conflicting_declarations_cannot_be_combined() -> None:
    one = RabbitMQTopology(queues=(RabbitMQQueue(name="q", max_length=1),))
    two = RabbitMQTopology(queues=(RabbitMQQueue(name="q", max_length=2),))
    with pytest.raises(ConfigurationError, match="conflicting declarations for 'q'"):
        _ = one + two
    binding = RabbitMQBinding(queue="q", exchange="x", routing_key="k")
    assert binding.arguments == {}


def test_retry_policy_is_shared_with_the_consumer() -> None:
    policy = RetryPolicy(max_attempts=2)
    assert _consumer(retry=policy).retry is policy
