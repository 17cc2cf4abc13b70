"""Public names of the Kafka adapter, re-exported lazily by ``reliable_messaging``.

Kept apart from the adapter's modules so the top-level package can list them
without importing confluent-kafka. Keep sorted; every name must be importable
from ``reliable_messaging._kafka``.
"""

EXPORTS: tuple[str, ...] = (
    "Acks",
    "CommitMode",
    "KafkaConsumer",
    "KafkaConsumerConfig",
    "KafkaMessage",
    "KafkaProducer",
    "KafkaProducerConfig",
)
