"""Helpers for the Kafka integration tests: topics, reading a topic back, waiting with deadlines.

Reading back uses a raw confluent-kafka consumer with manual assignment (no group,
no commits), so what it sees is what the broker stored, independent of the
library under test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from reliable_messaging._kafka._topology import create_topics
from reliable_messaging.testing import wait_for


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode()


def make_topic(bootstrap: str, topic: str, partitions: int = 1, *, replication_factor: int = -1,
               config: dict[str, str] | None = None) -> str:
    create_topics(bootstrap, {topic: partitions}, replication_factor=replication_factor, config=config)
    wait_for(lambda: _has_leaders(bootstrap, topic, partitions), 30, f"leaders for {topic}")
    return topic


def _has_leaders(bootstrap: str, topic: str, partitions: int) -> bool:
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=5)
    info = metadata.topics.get(topic)
    return bool(info and info.error is None and len(info.partitions) == partitions
                and all(p.leader >= 0 for p in info.partitions.values()))


def read_all(bootstrap: str, topic: str, *, timeout: float = 60.0) -> list[Record]:
    """Every record currently in ``topic`` (all partitions, from the start to the high watermark)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "read-all", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "enable.partition.eof": False})
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        info = metadata.topics[topic]
        ends: dict[int, int] = {}
        parts = []
        for pid in info.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, pid), timeout=10)
            if high > low:
                ends[pid] = high
                parts.append(TopicPartition(topic, pid, low))
        consumer.assign(parts)
        records: list[Record] = []
        positions = {pid: -1 for pid in ends}
        deadline = time.monotonic() + timeout
        while any(positions[p] < ends[p] - 1 for p in ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {len(records)} records of {topic} in {timeout}s; positions {positions}, "
                                   f"ends {ends}")
            for msg in consumer.consume(1000, 0.5):
                if msg.error():
                    continue
                pid, offset = msg.partition() or 0, msg.offset() or 0
                positions[pid] = max(positions[pid], offset)
                records.append(Record(topic, pid, offset, msg.key(), msg.value() or b"",
                                      {k: v for k, v in (msg.headers() or []) if v is not None}))
        return records
    finally:
        consumer.close()


