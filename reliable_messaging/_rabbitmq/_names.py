"""Public names of the RabbitMQ adapter, re-exported lazily by ``reliable_messaging``.

Kept apart from the adapter's modules so the top-level package can list them
without importing pika. Keep sorted; every name must be importable from
``reliable_messaging._rabbitmq``.
"""

EXPORTS: tuple[str, ...] = (
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
)
