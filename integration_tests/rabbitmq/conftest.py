"""Fixtures of the RabbitMQ adapter's integration tests: a raw pika admin that cleans up after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reliable_messaging.testing import RabbitMQEndpoint

from ._helpers import Admin


@pytest.fixture
def admin(rabbitmq_endpoint: RabbitMQEndpoint, connection_name: str) -> Iterator[Admin]:
    """Raw pika access to the broker; deletes every queue/exchange registered with ``cleanup`` afterwards."""
    helper = Admin(rabbitmq_endpoint.url, f"{connection_name} (admin)")
    try:
        yield helper
    finally:
        helper.delete_registered()
