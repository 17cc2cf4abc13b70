"""The facade contract on a real RabbitMQ broker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pika
import pytest

from reliable_messaging import Broker, connect
from reliable_messaging.testing import RabbitMQEndpoint, wait_for

from .base import FacadeContract, PausedWriterStore, Recorder

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
                headers["message_id"] = properties.message_id
                letters.append({"body": body, "headers": headers})
        finally:
            connection.close()
        assert len(letters) >= count, f"only {len(letters)} of {count} dead letters in {source}.dlq"
        return letters

    def prepare_two_places(self, url: str, source: str) -> None:
        """Nothing to do: one queue, two consumers; prefetch 1 spreads the copies."""

    def publish_to_two_places(self, broker: Broker, source: str, message_id: str, body: bytes) -> None:
        for _ in range(2):
            broker.publish(source, body, message_id=message_id).result(timeout=30)

    # -- RabbitMQ only ---------------------------------------------------------------------------------

    @pytest.mark.timeout(120)
    def test_a_message_is_acked_only_once_its_done_record_is_durable(
        self, url: str, unique_name: str, tmp_path: Path
    ) -> None:
        store = PausedWriterStore(tmp_path / "dedup.sqlite3")
        recorder = Recorder()
        try:
            # prefetch 1: the broker delivers the second message only after the first one's basic.ack.
            with connect(url, guarantee="effectively-once", dedup=store, name=unique_name, prefetch=1) as broker:
                consumer = self.started(broker, unique_name, recorder)
                for body in (b"first", b"second"):
                    broker.publish(unique_name, body).result(timeout=30)
                wait_for(lambda: len(recorder.seen) == 1, 60, "the first message")
                time.sleep(1.5)
                assert consumer.stats.processed == 1
                assert recorder.bodies() == [b"first"], "acked before its done record was durable"
                store.resume.set()
                wait_for(lambda: len(recorder.seen) == 2, 30, "the second message, once the first is acked")
                assert recorder.bodies() == [b"first", b"second"]
        finally:
            store.resume.set()
            store.close()
