"""reliable_messaging: provably reliable delivery over real Kafka and RabbitMQ brokers.

The public names are listed in ``__all__``; everything else lives in private
modules. Broker adapters load lazily, so ``import reliable_messaging`` works with
only one of the client libraries installed; using an adapter whose client is
missing raises ImportError with the pip command that installs it.
"""

from __future__ import annotations

import importlib

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
from ._facade import DEFAULT_DEDUP_PATH, Broker, Consumer, Guarantee, connect
from ._handling import ConsumerStats, Disposition, Outcome
from ._message import Delivery, DeliveryFuture, Message
from ._retry import DEFAULT_RETRY_POLICY, RetryPolicy

__version__ = "0.1.0"

try:
    from ._kafka._names import EXPORTS as _KAFKA_EXPORTS
except ImportError:  # confluent-kafka missing: its names raise the pip hint when used
    _KAFKA_EXPORTS = ()
try:
    from ._rabbitmq._names import EXPORTS as _RABBITMQ_EXPORTS
except ImportError:  # pika missing
    _RABBITMQ_EXPORTS = ()

# Public names that live in optional backends: name -> private module, imported on first use.
_LAZY: dict[str, str] = {
    **{name: "._kafka" for name in _KAFKA_EXPORTS},
    **{name: "._rabbitmq" for name in _RABBITMQ_EXPORTS},
}

__all__ = [
    "DEFAULT_DEDUP_PATH",
    "DEFAULT_RETRY_POLICY",
    "TRANSIENT_ERRORS",
    "Broker",
    "BrokerUnavailable",
    "ClaimResult",
    "ClosedError",
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
    "Guarantee",
    "InvalidMessage",
    "MemoryDedupStore",
    "Message",
    "MessageTooLarge",
    "Nacked",
    "NotEnoughReplicas",
    "Outcome",
    "ProcessingSignal",
    "RedisDedupStore",
    "Reject",
    "ReliableMessagingError",
    "Retry",
    "RetryPolicy",
    "SQLiteDedupStore",
    "StoreUnavailable",
    "TopologyMismatch",
    "Unroutable",
    "__version__",
    "connect",
    "is_transient",
]
__all__ += [*_KAFKA_EXPORTS, *_RABBITMQ_EXPORTS]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'reliable_messaging' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
