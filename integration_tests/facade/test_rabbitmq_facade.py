"""The facade contract on a real RabbitMQ broker."""

from __future__ import annotations

import time
from typing import Any

import pika
import pytest

from reliable_messaging import Broker
from reliable_messaging.testing import RabbitMQEndpoint

from .base import FacadeContract

pytestmark = [pytest.mark.rabbitmq]


class TestRabbitMQFacade(FacadeContract):
    # prefetch 1: each of two consumer instances holds one copy at a time, so copies spread over both.
    two_instance_settings = {"prefetch": 1}  # noqa: RUF012

    @pytest.fixture
    def url(self, rabbitmq_endpoint: RabbitMQEndpoint) -> str:
        return rabbitmq_endpoint.url

    def read_dead_letters(self, url: str, source: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        letters: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        try:
            channel = connection.channel()
            while len(letters) < count and time.monotonic() < deadline:
                method, properties, body = channel.basic_get(f"{source}.dlq", auto_ack=True)
                if method is None:
                    time.sleep(0.1)
                    continue
                headers = dict(properties.headers or {})
                letters.append({"body": body, "headers": headers, "message_id": properties.message_id})
        finally:
            connection.close()
        assert len(letters) >= count, f"only {len(letters)} of {count} dead letters in {source}.dlq"
        return letters

    def prepare_two_places(self, url: str, source: str) -> None:
        """Nothing to do: one queue, two consumers; prefetch 1 spreads the copies."""

    def publish_to_two_places(self, broker: Broker, source: str, message_id: str, body: bytes) -> None:
        for _ in range(2):
            broker.publish(source, body, message_id=message_id).result(timeout=30)
