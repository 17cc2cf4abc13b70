"""RabbitMQ adapter on pika: publisher, consumer, topology, error mapping.

- :class:`RabbitMQPublisher` (``_publisher``): pipelined publisher confirms, mandatory returns
  correlated by message id, reconnect with republish of every unconfirmed message.
- :class:`RabbitMQConsumer` (``_consumer``): manual/auto acks, retry by requeue or TTL retry
  queues, dead-lettering, batches; the module docstring documents ``consumer_timeout``.
- :class:`RabbitMQTopology` (``_topology``): exchanges, queues, bindings, DLX/DLQ and retry
  queue helpers, declared idempotently on every (re)connection.
- ``_errors``: the one boundary where pika's exceptions become the library's.
- ``_connection``: the I/O thread that owns each pika connection (pika is not thread-safe).
"""

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
