"""Kafka adapter on confluent-kafka (librdkafka): producer, consumer, topology, error mapping."""

try:
    import confluent_kafka  # noqa: F401 - fail here, with the install command, not deep inside a call
except ImportError as exc:  # pragma: no cover - exercised by the extras test in a subprocess
    raise ImportError(
        "the Kafka backend of reliable_messaging needs confluent-kafka: pip install 'reliable-messaging[kafka]'"
    ) from exc

from ._config import Acks, CommitMode, KafkaConsumerConfig, KafkaProducerConfig
from ._consumer import KafkaConsumer
from ._message import KafkaMessage
from ._producer import KafkaProducer

__all__ = [
    "Acks",
    "CommitMode",
    "KafkaConsumer",
    "KafkaConsumerConfig",
    "KafkaMessage",
    "KafkaProducer",
    "KafkaProducerConfig",
]
