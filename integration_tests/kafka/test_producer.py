"""KafkaProducer against a real broker: each acks level end to end, ids, typed broker refusals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest

from reliable_messaging import (
    Acks,
    Delivery,
    InvalidMessage,
    KafkaProducer,
    KafkaProducerConfig,
    MessageTooLarge,
)
from reliable_messaging.testing import KafkaEndpoint

from ._helpers import make_topic, read_all

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(90)]


@pytest.mark.parametrize("acks", [Acks.ALL, Acks.ONE, Acks.ZERO])
def test_each_acks_level_end_to_end(kafka_endpoint: KafkaEndpoint, topic: str, acks: Acks) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic, partitions=2)
    config = KafkaProducerConfig(bootstrap_servers=bootstrap, acks=acks, client_id=f"acks-{acks.value}")
    assert config.idempotent is (acks is Acks.ALL)
    with KafkaProducer(config) as producer:
        futures = [producer.publish(topic, f"m{i}".encode(), key=f"k{i % 4}") for i in range(40)]
        _, pending = concurrent.futures.wait(futures, timeout=30)
        assert not pending
        deliveries = [f.result() for f in futures]

    for future, delivery in zip(futures, deliveries, strict=True):
        assert isinstance(delivery, Delivery)
        assert delivery.message_id == future.message_id
        assert delivery.destination == topic
        assert delivery.partition in (0, 1)
        assert delivery.timestamp is not None and abs(delivery.timestamp - time.time()) < 60
        if acks is Acks.ZERO:
            assert delivery.offset is None, "acks=0: the broker never answers, so there is no offset"
        else:
            assert delivery.offset is not None and delivery.offset >= 0

    if acks is not Acks.ZERO:
        # Offsets are unique per partition and dense: the broker assigned each one once.
        by_partition: dict[int, list[int]] = {}
        for d in deliveries:
            assert d.partition is not None and d.offset is not None
            by_partition.setdefault(d.partition, []).append(d.offset)
        for offsets in by_partition.values():
            assert sorted(offsets) == list(range(len(offsets)))

    records = read_all(bootstrap, topic)
    # acks=0 gives no guarantee; on a healthy local broker every message still arrives.
    assert sorted(r.value for r in records) == sorted(f"m{i}".encode() for i in range(40))
    ids = {r.header("message-id") for r in records}
    assert ids == {f.message_id for f in futures}, "every record carries its future's message-id header"
    # Same key, same partition.
    partition_of: dict[bytes | None, set[int]] = {}
    for r in records:
        partition_of.setdefault(r.key, set()).add(r.partition)
    assert all(len(parts) == 1 for parts in partition_of.values())


def test_caller_ids_and_headers_reach_the_broker(kafka_endpoint: KafkaEndpoint, topic: str) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic)
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap)) as producer:
        delivery = producer.publish(topic, "héllo", headers={"trace": "abc", "n": 3, "raw": b"\x00"},
                                    message_id="order-42").result(timeout=30)
    assert delivery.message_id == "order-42" and delivery.offset == 0
    [record] = read_all(bootstrap, topic)
    assert record.value == "héllo".encode()
    assert record.header("message-id") == "order-42"
    assert record.header("trace") == "abc" and record.header("n") == "3" and record.headers["raw"] == b"\x00"


def test_bad_message_at_call_time_leaves_others_alone(kafka_endpoint: KafkaEndpoint, topic: str) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic)
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap)) as producer:
        before = producer.publish(topic, b"before")
        with pytest.raises(InvalidMessage):
            producer.publish(topic, {"not": "bytes"})  # type: ignore[arg-type]
        after = producer.publish(topic, b"after")
        assert before.result(timeout=30).offset == 0
        assert after.result(timeout=30).offset == 1
    assert [r.value for r in read_all(bootstrap, topic)] == [b"before", b"after"]


def test_broker_refusing_a_large_message_is_typed(kafka_endpoint: KafkaEndpoint, topic: str) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic, config={"max.message.bytes": "2000"})
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap)) as producer:
        # The broker checks whole record batches against max.message.bytes: send them apart.
        assert producer.publish(topic, b"x" * 100).result(timeout=30).offset == 0
        big = producer.publish(topic, b"y" * 50_000)
        with pytest.raises(MessageTooLarge) as info:
            big.result(timeout=30)
        assert info.value.code in ("MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE")
        assert info.value.message_id == big.message_id
        assert not info.value.retriable
        assert producer.publish(topic, b"z" * 100).result(timeout=30).offset == 1, "the producer goes on"
    assert [r.value for r in read_all(bootstrap, topic)] == [b"x" * 100, b"z" * 100]


def test_delivery_future_is_awaitable(kafka_endpoint: KafkaEndpoint, topic: str) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic)

    async def main(producer: KafkaProducer) -> list[Delivery]:
        futures = [producer.publish(topic, f"a{i}".encode()) for i in range(10)]
        return list(await asyncio.wait_for(asyncio.gather(*futures), timeout=30))

    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap)) as producer:
        deliveries = asyncio.run(main(producer))
    assert [d.offset for d in deliveries] == list(range(10))


def test_close_resolves_every_future(kafka_endpoint: KafkaEndpoint, topic: str) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic)
    producer = KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap, linger=0.05))
    futures = [producer.publish(topic, b"z" * 100) for _ in range(20_000)]
    producer.close(timeout=30)
    assert all(f.done() for f in futures), "close() returned with pending futures"
    assert all(f.exception() is None for f in futures)
    assert len(read_all(bootstrap, topic)) == 20_000
