"""The facade contract on a real Kafka broker."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from reliable_messaging import Broker, KafkaProducer, KafkaProducerConfig
from reliable_messaging.testing import KafkaEndpoint

from .base import FacadeContract

pytestmark = [pytest.mark.kafka]


class TestKafkaFacade(FacadeContract):
    settings = {"session_timeout": 6.0}  # noqa: RUF012

    @pytest.fixture
    def url(self, kafka_endpoint: KafkaEndpoint) -> str:
        return f"kafka://{kafka_endpoint.bootstrap_servers}"

    def _bootstrap(self, url: str) -> str:
        return url.removeprefix("kafka://")

    def read_dead_letters(self, url: str, source: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        consumer = Consumer({"bootstrap.servers": self._bootstrap(url), "group.id": f"{source}.dlt-reader",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False})
        consumer.subscribe([f"{source}.DLT"])
        letters: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        try:
            while len(letters) < count and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                headers = {k: (v.decode(errors="replace") if v is not None else None) for k, v in msg.headers() or []}
                letters.append({"body": msg.value(), "headers": headers, "message_id": headers.get("message-id")})
        finally:
            consumer.close()
        assert len(letters) >= count, f"only {len(letters)} of {count} dead letters in {source}.DLT"
        return letters

    def prepare_two_places(self, url: str, source: str) -> None:
        admin = AdminClient({"bootstrap.servers": self._bootstrap(url)})
        admin.create_topics([NewTopic(source, num_partitions=2, replication_factor=1)])[source].result(30)

    def publish_to_two_places(self, broker: Broker, source: str, message_id: str, body: bytes) -> None:
        producer = self._producer or KafkaProducer(KafkaProducerConfig(bootstrap_servers=self._servers))
        self._producer = producer
        for partition in (0, 1):
            producer.publish(source, body, message_id=message_id, partition=partition).result(timeout=30)

    _producer: KafkaProducer | None = None
    _servers = ""

    @pytest.fixture(autouse=True)
    def _producer_for_copies(self, url: str) -> Any:
        self._servers = self._bootstrap(url)
        yield
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    # -- Kafka only ------------------------------------------------------------------------------------

    def committed(self, url: str, topic: str, group: str) -> int:
        """Records of ``topic`` covered by ``group``'s committed offsets (summed over partitions)."""
        consumer = Consumer({"bootstrap.servers": self._bootstrap(url), "group.id": group,
                             "enable.auto.commit": False})
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
            return sum(max(tp.offset, 0) for tp in offsets)
        finally:
            consumer.close()


class TestKafkaFacadeConcurrent(TestKafkaFacade):
    """The same contract with 16 handlers at once (the crash test's consumer process runs one at a time)."""

    consumer_settings = {"concurrency": 16}  # noqa: RUF012
    test_redelivered_after_a_crash_between_done_and_ack_is_processed_once = None  # type: ignore[assignment]


