"""reliable_messaging: provably reliable delivery over real Kafka and RabbitMQ brokers.

The public names are listed in ``__all__``; everything else lives in private
modules. Broker adapters load lazily, so ``import reliable_messaging`` works with
only one of the client libraries installed; using an adapter whose client is
missing raises ImportError with the pip command that installs it.
"""

from __future__ import annotations

import importlib
import logging
import typing

from ._broker import Broker, Consumer, Guarantee
from ._check import Finding, Severity, check
from ._dedup import ClaimResult, DedupStore, MemoryDedupStore, RedisDedupStore, SQLiteDedupStore
from ._errors import (
    TRANSIENT_ERRORS,
    BrokerUnavailable,
    ClosedError,
    ConfigurationError,
    ConsumerCancelled,
    DeliveryError,
    DeliveryFailed,
    DeliveryTimeout,
    HandlerAborted,
    HandlerTimeout,
    InvalidMessage,
    MessageTooLarge,
    Nacked,
    NotEnoughReplicas,
    ProcessingSignal,
    Reject,
    ReliableMessagingError,
    Retry,
    StoreUnavailable,
    TopologyMismatch,
    Unroutable,
    is_transient,
)
from ._facade import DEFAULT_DEDUP_PATH, connect
from ._handling import ConsumerStats, Disposition, Outcome
from ._health import Health
from ._message import DEFERRALS_HEADER, Delivery, DeliveryFuture, Message
from ._retry import DEFAULT_RETRY_POLICY, RetryPolicy
from ._stats import BrokerStats, PublisherStats
from ._verify import VerifyReport, verify
from ._version import __version__

# A library's loggers stay silent unless the application configures logging (the logging HOWTO's advice for
# libraries): without this, Python's last-resort handler would print WARNINGs to stderr.
logging.getLogger("reliable_messaging").addHandler(logging.NullHandler())

if typing.TYPE_CHECKING:  # the static view of the lazily imported backends
    from ._kafka import (
        Acks,
        CommitMode,
        KafkaConsumer,
        KafkaConsumerConfig,
        KafkaMessage,
        KafkaProducer,
        KafkaProducerConfig,
    )
    from ._rabbitmq import (
        RabbitMQAckMode,
        RabbitMQBinding,
        RabbitMQConsumer,
        RabbitMQConsumerConfig,
        RabbitMQExchange,
        RabbitMQExchangeType,
        RabbitMQMessage,
        RabbitMQPublisher,
        RabbitMQPublisherConfig,
        RabbitMQPublisherStats,
        RabbitMQQueue,
        RabbitMQQueueType,
        RabbitMQRetryMode,
        RabbitMQTopology,
    )

# Public names that live in optional backends: name -> private module, imported on first use, so
# that `import reliable_messaging` works with only one client library installed.
_LAZY: dict[str, str] = {
    "Acks": "._kafka",
    "CommitMode": "._kafka",
    "KafkaConsumer": "._kafka",
    "KafkaConsumerConfig": "._kafka",
    "KafkaMessage": "._kafka",
    "KafkaProducer": "._kafka",
    "KafkaProducerConfig": "._kafka",
    "RabbitMQAckMode": "._rabbitmq",
    "RabbitMQBinding": "._rabbitmq",
    "RabbitMQConsumer": "._rabbitmq",
    "RabbitMQConsumerConfig": "._rabbitmq",
    "RabbitMQExchange": "._rabbitmq",
    "RabbitMQExchangeType": "._rabbitmq",
    "RabbitMQMessage": "._rabbitmq",
    "RabbitMQPublisher": "._rabbitmq",
    "RabbitMQPublisherConfig": "._rabbitmq",
    "RabbitMQPublisherStats": "._rabbitmq",
    "RabbitMQQueue": "._rabbitmq",
    "RabbitMQQueueType": "._rabbitmq",
    "RabbitMQRetryMode": "._rabbitmq",
    "RabbitMQTopology": "._rabbitmq",
}

__all__ = [
    "DEFAULT_DEDUP_PATH",
    "DEFAULT_RETRY_POLICY",
    "DEFERRALS_HEADER",
    "TRANSIENT_ERRORS",
    "Acks",
    "Broker",
    "BrokerStats",
    "BrokerUnavailable",
    "ClaimResult",
    "ClosedError",
    "CommitMode",
    "ConfigurationError",
    "Consumer",
    "ConsumerCancelled",
    "ConsumerStats",
    "DedupStore",
    "Delivery",
    "DeliveryError",
    "DeliveryFailed",
    "DeliveryFuture",
    "DeliveryTimeout",
    "Disposition",
    "Finding",
    "Guarantee",
    "HandlerAborted",
    "HandlerTimeout",
    "Health",
    "InvalidMessage",
    "KafkaConsumer",
    "KafkaConsumerConfig",
    "KafkaMessage",
    "KafkaProducer",
    "KafkaProducerConfig",
    "MemoryDedupStore",
    "Message",
    "MessageTooLarge",
    "Nacked",
    "NotEnoughReplicas",
    "Outcome",
    "ProcessingSignal",
    "PublisherStats",
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
    "RedisDedupStore",
    "Reject",
    "ReliableMessagingError",
    "Retry",
    "RetryPolicy",
    "SQLiteDedupStore",
    "Severity",
    "StoreUnavailable",
    "TopologyMismatch",
    "Unroutable",
    "VerifyReport",
    "__version__",
    "check",
    "connect",
    "is_transient",
    "verify",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'reliable_messaging' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
