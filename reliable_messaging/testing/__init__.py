"""Test support for reliable_messaging and the services built on it.

- :mod:`reliable_messaging.testing.plugin`: the pytest plugin (loaded through the
  ``pytest11`` entry point): broker endpoints, per-test names, fault fixtures.
- :mod:`reliable_messaging.testing.brokers`: start real brokers on this machine
  without Docker (``python -m reliable_messaging.testing.brokers up``).
- :class:`TcpProxy`: cut live TCP connections; :func:`wait_for`: poll a condition under a deadline.

Importing this package does not import pytest and starts nothing.
"""

from ._endpoints import (
    BrokerNode,
    BrokersUnavailable,
    FaultsUnsupported,
    KafkaEndpoint,
    RabbitMQEndpoint,
    RedisEndpoint,
    resolve_kafka,
    resolve_kafka_cluster,
    resolve_rabbitmq,
    resolve_redis,
)
from ._local import BrokerSetupError
from ._proxy import TcpProxy
from ._wait import wait_for

__all__ = [
    "BrokerNode",
    "BrokerSetupError",
    "BrokersUnavailable",
    "FaultsUnsupported",
    "KafkaEndpoint",
    "RabbitMQEndpoint",
    "RedisEndpoint",
    "TcpProxy",
    "resolve_kafka",
    "resolve_kafka_cluster",
    "resolve_rabbitmq",
    "resolve_redis",
    "wait_for",
]
