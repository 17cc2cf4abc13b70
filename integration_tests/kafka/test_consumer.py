"""KafkaConsumer against a real broker: retry topics, dead-letter headers, rebalancing, commits."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from reliable_messaging import (
    CommitMode,
    KafkaConsumer,
    KafkaConsumerConfig,
    KafkaMessage,
    KafkaProducer,
    KafkaProducerConfig,
    MemoryDedupStore,
    Reject,
    RetryPolicy,
)
from reliable_messaging.testing import KafkaEndpoint, wait_for

from ._helpers import make_topic, read_all

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def publish(bootstrap: str, topic: str, values: list[bytes], **kwargs: Any) -> list[str]:
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap)) as producer:
        futures = [producer.publish(topic, v, **kwargs) for v in values]
        return [f.result(timeout=30).message_id for f in futures]


def config(bootstrap: str, group: str, **kwargs: Any) -> KafkaConsumerConfig:
    return KafkaConsumerConfig(bootstrap_servers=bootstrap, group_id=group, session_timeout=6.0, **kwargs)


def committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [tp.offset for tp in tps]
    finally:
        consumer.close()


@pytest.mark.slow
def test_failed_message_goes_through_retry_topics_to_the_dlt_without_blocking(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str
) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic)
    ids = publish(bootstrap, topic, [b"poison", b"fine-1", b"fine-2"], key=b"same-partition")
    seen: list[tuple[bytes, int, str, float]] = []

    def handler(message: KafkaMessage) -> None:
        seen.append((message.body, message.attempt, message.topic, time.monotonic()))
        if message.body == b"poison":
            raise ValueError(f"cannot handle attempt {message.attempt}")

    policy = RetryPolicy(max_attempts=3, initial_delay=1.0, max_delay=5.0, multiplier=2.0, jitter=0.0)
    began = time.time()
    consumer = KafkaConsumer(config(bootstrap, group_id), topic, handler, retry=policy)
    with consumer:
        wait_for(lambda: consumer.stats.dead_lettered == 1 and consumer.stats.processed == 2, 45, "the DLT")
    assert consumer.error is None

    poison = [(attempt, where, at) for body, attempt, where, at in seen if body == b"poison"]
    assert [(a, w) for a, w, _ in poison] == [(1, topic), (2, f"{topic}.retry.1"), (3, f"{topic}.retry.2")]
    first_fine = min(at for body, _, _, at in seen if body == b"fine-1")
    assert first_fine < poison[1][2], "the partition went on while the poison message waited for its retry"
    assert poison[1][2] - poison[0][2] >= 0.9, "attempt 2 waited the policy's 1 s"
    assert poison[2][2] - poison[1][2] >= 1.9, "attempt 3 waited the policy's 2 s"
    assert [b for b, *_ in seen].count(b"fine-1") == 1

    [dead] = read_all(bootstrap, f"{topic}.DLT")
    assert dead.value == b"poison" and dead.key == b"same-partition"
    assert dead.header("message-id") == ids[0], "the id survives retries and dead-lettering"
    assert dead.header("x-rm-origin") == topic
    assert dead.header("x-rm-origin-partition") == "0"
    assert dead.header("x-rm-origin-offset") == "0"
    assert dead.header("x-rm-error-type") == "builtins.ValueError"
    assert dead.header("x-rm-error-message") == "cannot handle attempt 3"
    assert dead.header("x-rm-attempt") == "3"
    first_failure = int(dead.header("x-rm-first-failure") or 0) / 1000
    assert began - 1 <= first_failure <= poison[0][2] - time.monotonic() + time.time() + 1
    assert "retries exhausted after 3 attempts" in (dead.header("x-rm-reason") or "")
    assert [r.header("x-rm-attempt") for r in read_all(bootstrap, f"{topic}.retry.1")] == ["2"]
    # Everything was settled, so everything is committed: a restart would start after it.
    assert committed(bootstrap, group_id, topic) == [3]


def test_undecodable_and_rejected_messages_go_to_the_dlt_at_once(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str
) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic)
    publish(bootstrap, topic, [b'{"n": 1}', b"not json", b'{"n": "reject"}', b'{"n": 2}'])
    values: list[Any] = []

    def handler(message: KafkaMessage) -> None:
        if message.value["n"] == "reject":
            raise Reject("order cancelled")
        values.append(message.value)

    consumer = KafkaConsumer(config(bootstrap, group_id), topic, handler, decoder=json.loads)
    with consumer:
        wait_for(lambda: consumer.stats.processed == 2 and consumer.stats.dead_lettered == 2, 30, "all four")
    assert values == [{"n": 1}, {"n": 2}], "the handler never saw the undecodable message"
    assert consumer.stats.undecodable == 1 and consumer.stats.retried == 0
    dead = {r.value: r for r in read_all(bootstrap, f"{topic}.DLT")}
    assert set(dead) == {b"not json", b'{"n": "reject"}'}
    assert dead[b"not json"].header("x-rm-error-type") == "json.decoder.JSONDecodeError"
    assert dead[b"not json"].header("x-rm-attempt") == "1"
    assert (dead[b"not json"].header("x-rm-reason") or "").startswith("undecodable")
    assert dead[b'{"n": "reject"}'].header("x-rm-reason") == "order cancelled"
    assert dead[b'{"n": "reject"}'].header("x-rm-origin-offset") == "2"
    assert committed(bootstrap, group_id, topic) == [4]


def test_in_place_retry_counts_attempts_and_dead_letters(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str
) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic)
    publish(bootstrap, topic, [b"flaky", b"poison"])
    attempts: Counter[bytes] = Counter()
    sleeps: list[float] = []

    def handler(message: KafkaMessage) -> None:
        attempts[message.body] += 1
        assert message.attempt == attempts[message.body]
        if message.body == b"poison" or message.attempt < 2:
            raise ConnectionError("downstream unavailable")

    policy = RetryPolicy(max_attempts=3, initial_delay=0.5, jitter=0.0, sleep=sleeps.append)
    consumer = KafkaConsumer(config(bootstrap, group_id), topic, handler, retry=policy, retry_topics=False)
    with consumer:
        wait_for(lambda: consumer.stats.processed == 1 and consumer.stats.dead_lettered == 1, 30, "both")
    assert attempts == {b"flaky": 2, b"poison": 3}
    assert sleeps == [0.5, 0.5, 1.0], "the policy's backoff, through the injected sleep"
    [dead] = read_all(bootstrap, f"{topic}.DLT")
    assert dead.value == b"poison" and dead.header("x-rm-attempt") == "3"
    assert dead.header("x-rm-error-type") == "builtins.ConnectionError"
    assert dead.header("x-rm-first-failure") is not None


def test_async_handler_and_position_ids_for_foreign_records(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str
) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic)
    raw = Producer({"bootstrap.servers": bootstrap})
    raw.produce(topic, b"from a producer without ids")
    assert raw.flush(30) == 0
    seen: list[KafkaMessage] = []

    async def handler(message: KafkaMessage) -> None:
        await asyncio.sleep(0.01)
        seen.append(message)

    consumer = KafkaConsumer(config(bootstrap, group_id), topic, handler)
    with consumer:
        wait_for(lambda: len(seen) == 1, 30, "the record")
    [message] = seen
    assert message.message_id == f"{topic}/0/0"
    assert (message.topic, message.partition, message.offset, message.source) == (topic, 0, 0, topic)
    assert message.attempt == 1 and not message.redelivered
    assert message.timestamp is not None and abs(message.timestamp - time.time()) < 60


def test_dedup_skips_a_resent_message_id(kafka_endpoint: KafkaEndpoint, topic: str, group_id: str) -> None:
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic)
    # A producer that resends after a lost acknowledgement sends the same id again.
    publish(bootstrap, topic, [b"pay 10"], message_id="payment-1")
    publish(bootstrap, topic, [b"pay 10"], message_id="payment-1")
    publish(bootstrap, topic, [b"pay 20"], message_id="payment-2")
    handled: list[str] = []
    consumer = KafkaConsumer(config(bootstrap, group_id, commit_mode=CommitMode.MANUAL), topic,
                             lambda m: handled.append(m.message_id), dedup=MemoryDedupStore())
    with consumer:
        wait_for(lambda: consumer.stats.processed + consumer.stats.deduplicated == 3, 30, "three records")
    assert handled == ["payment-1", "payment-2"]
    assert consumer.stats.deduplicated == 1
    assert committed(bootstrap, group_id, topic) == [3]


@pytest.mark.slow
def test_second_consumer_joining_loses_nothing_and_repeats_nothing(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str
) -> None:
    """The first consumer commits on revoke, so the newcomer starts exactly where it stopped.

    Commits are otherwise disabled (huge batch, long interval): every record the
    newcomer does not repeat proves the synchronous commit in on_revoke.
    """
    bootstrap = kafka_endpoint.bootstrap_servers
    make_topic(bootstrap, topic, partitions=4)
    total = 400
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=bootstrap)) as producer:
        futures = [producer.publish(topic, f"r{i}".encode(), partition=i % 4) for i in range(total)]
        assert all(f.result(timeout=30) for f in futures)
    processed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def handler_for(name: str) -> Any:
        def handler(message: KafkaMessage) -> None:
            time.sleep(0.02)  # slow enough that the newcomer joins with most records still to do
            with lock:
                processed.append((name, message.message_id))
        return handler

    settings = {"commit_mode": CommitMode.MANUAL_BATCH, "commit_every": 100_000, "commit_interval": 600.0,
                "fetch_batch": 10}
    first = KafkaConsumer(config(bootstrap, group_id, **settings), topic, handler_for("first"), retry_topics=False)
    second = KafkaConsumer(config(bootstrap, group_id, **settings), topic, handler_for("second"),
                           retry_topics=False)
    with first:
        wait_for(lambda: len(processed) >= 40, 30, "the first consumer to get going")
        with second:
            wait_for(lambda: len({mid for _, mid in processed}) >= total, 60, "every record")
            assert second.assignment(), "the second consumer got partitions"
            assert len(first.assignment()) < 4, "the first consumer gave partitions up"
    counts = Counter(mid for _, mid in processed)
    assert len(counts) == total, "every record processed"
    assert [mid for mid, n in counts.items() if n > 1] == [], "no record processed twice"
    assert {name for name, _ in processed} == {"first", "second"}
    assert first.stats.extra["commits"] >= 1, "the revoke committed"
    assert sum(committed(bootstrap, group_id, topic, 4)) == total


def test_consumer_started_before_its_topic_exists_gets_the_first_message_promptly(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str
) -> None:
    """librdkafka would only notice a missing subscribed topic at its next metadata refresh (5 minutes)."""
    bootstrap = kafka_endpoint.bootstrap_servers
    seen: list[bytes] = []
    consumer = KafkaConsumer(config(bootstrap, group_id), topic, lambda m: seen.append(m.body))
    with consumer:
        wait_for(lambda: bool(consumer.assignment()), 30, "the consumer to own partitions")
        began = time.monotonic()
        publish(bootstrap, topic, [b"first"])
        wait_for(lambda: seen == [b"first"], 15, "the first message")
    assert time.monotonic() - began < 15


def test_created_topics_are_visible_when_create_topics_returns(kafka_endpoint: KafkaEndpoint, topic: str) -> None:
    """CreateTopics answers before the brokers serve the new topic; create_topics waits for that."""
    from confluent_kafka.admin import AdminClient

    from reliable_messaging._kafka._topology import create_topics

    names = {f"{topic}.{i}": 3 for i in range(5)}
    assert sorted(create_topics(kafka_endpoint.bootstrap_servers, names)) == sorted(names)
    metadata = AdminClient({"bootstrap.servers": kafka_endpoint.bootstrap_servers}).list_topics(timeout=10)
    for name in names:
        partitions = metadata.topics[name].partitions
        assert len(partitions) == 3 and all(p.leader >= 0 for p in partitions.values()), name


def test_a_new_consumer_owns_its_retry_topics_at_once(
    kafka_endpoint: KafkaEndpoint, topic: str, group_id: str
) -> None:
    """Retry topics created at start must be part of the first assignment, not of one 10 s (or 5 min) later."""
    bootstrap = kafka_endpoint.bootstrap_servers
    consumer = KafkaConsumer(config(bootstrap, group_id), topic, lambda m: None,
                             retry=RetryPolicy(max_attempts=4, initial_delay=0.1, jitter=0.0))
    wanted = {topic, f"{topic}.retry.1", f"{topic}.retry.2", f"{topic}.retry.3"}
    with consumer:
        wait_for(lambda: {tp[0] for tp in consumer.assignment()} >= wanted, 8, "the source and retry topics")
