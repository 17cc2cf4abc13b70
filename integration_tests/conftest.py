"""Fixtures shared by the integration tests: the broker URL of a test parametrized with ``broker`` ("kafka" or
"rabbitmq")."""

from __future__ import annotations

import pytest

from reliable_messaging.testing import KafkaEndpoint, RabbitMQEndpoint


@pytest.fixture
def url(broker: str, request: pytest.FixtureRequest) -> str:
    if broker == "kafka":
        kafka: KafkaEndpoint = request.getfixturevalue("kafka_endpoint")
        return f"kafka://{kafka.bootstrap_servers}"
    rabbitmq: RabbitMQEndpoint = request.getfixturevalue("rabbitmq_endpoint")
    return rabbitmq.url
