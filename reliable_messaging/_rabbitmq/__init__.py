"""RabbitMQ adapter on pika: publisher, consumer, topology, error mapping."""

try:
    import pika  # noqa: F401 - fail here, with the install command, not deep inside a call
except ImportError as exc:  # pragma: no cover - exercised by the extras test in a subprocess
    raise ImportError(
        "the RabbitMQ backend of reliable_messaging needs pika: pip install 'reliable-messaging[rabbitmq]'"
    ) from exc

from ._config import RabbitMQAckMode, RabbitMQConsumerConfig, RabbitMQPublisherConfig, RabbitMQRetryMode
from ._consumer import RabbitMQConsumer
from ._message import RabbitMQMessage
from ._publisher import RabbitMQPublisher, RabbitMQPublisherStats
from ._topology import (
    RabbitMQBinding,
    RabbitMQExchange,
    RabbitMQExchangeType,
    RabbitMQQueue,
    RabbitMQQueueType,
    RabbitMQTopology,
)

__all__ = [
    "RabbitMQAckMode",
    "RabbitMQBinding",
    "RabbitMQConsumer",
    "RabbitMQConsumerConfig",
    "RabbitMQExchange",
    "RabbitMQExchangeType",
    "RabbitMQMessage",
    "RabbitMQPublisher",
    "RabbitMQPublisherConfig",
    "RabbitMQPublisherStats",
    "RabbitMQQueue",
    "RabbitMQQueueType",
    "RabbitMQRetryMode",
    "RabbitMQTopology",
]
