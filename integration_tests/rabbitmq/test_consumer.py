"""RabbitMQConsumer against a real broker: acks, retries, dead-lettering, batches, cancellation, dedup."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from reliable_messaging import (
    ConfigurationError,
    ConsumerCancelled,
    MemoryDedupStore,
    RabbitMQAckMode,
    RabbitMQConsumer,
    RabbitMQConsumerConfig,
    RabbitMQMessage,
    RabbitMQQueueType,
    RabbitMQRetryMode,
    RabbitMQTopology,
    Reject,
    RetryPolicy,
)
from reliable_messaging.testing import RabbitMQEndpoint, wait_for

from ._helpers import Admin

pytestmark = [pytest.mark.rabbitmq]

QUICK_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.1, max_delay=0.5, jitter=0.0)


def _config(url: str, name: str, **overrides: Any) -> RabbitMQConsumerConfig:
    return RabbitMQConsumerConfig(url=url, connection_name=name, **overrides)


def _retry_queues(queue: str, max_attempts: int) -> tuple[str, ...]:
    return tuple(q.name for q in RabbitMQTopology.retry_queues(queue, max_attempts).queues)


@pytest.mark.timeout(60)
def test_every_message_is_handled_once_and_acknowledged(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name)
    admin.declare(topology)
    admin.cleanup(queues=_retry_queues(queue_name, 5))
    admin.publish(queue_name, queue_name, [f"{i}".encode() for i in range(500)],
                  message_ids=[f"id-{i}" for i in range(500)], headers={"kind": "test"})
    seen: list[RabbitMQMessage] = []
    consumer = RabbitMQConsumer(_config(rabbitmq_endpoint.url, connection_name), queue_name, seen.append,
                                topology=topology)
    with consumer:
        wait_for(lambda: consumer.stats.processed == 500, 30, "500 messages handled")
    assert [m.body for m in seen] == [f"{i}".encode() for i in range(500)], "order and exactly once"
    first = seen[0]
    assert (first.message_id, first.queue, first.source, first.exchange, first.routing_key) == (
        "id-0", queue_name, queue_name, queue_name, queue_name)
    assert first.key == queue_name.encode() and first.headers == {"kind": "test"}
    assert first.attempt == 1 and first.redelivered is False and first.delivery_tag == 1
    # Acknowledged: nothing comes back after the consumer closed its channel.
    assert admin.count(queue_name) == 0
    assert consumer.stats.extra["acks"] < 500, "consecutive acks were coalesced with multiple=True"
    assert consumer.stats.extra["multiple_acks"] > 0


@pytest.mark.timeout(60)
def test_poison_message_reaches_the_dlq_after_exactly_n_attempts_and_the_consumer_keeps_running(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name)
    admin.declare(topology)
    admin.cleanup(queues=_retry_queues(queue_name, QUICK_RETRY.max_attempts))
    attempts: list[tuple[int, str | None]] = []
    good: list[bytes] = []

    def handler(message: RabbitMQMessage) -> None:
        if message.body == b"poison":
            attempts.append((message.attempt, message.header("x-rm-attempt")))
            raise ValueError("cannot digest this")
        good.append(message.body)

    consumer = RabbitMQConsumer(_config(rabbitmq_endpoint.url, connection_name), queue_name, handler,
                                retry=QUICK_RETRY, topology=topology)
    with consumer:
        admin.publish(queue_name, queue_name, [b"before", b"poison", b"after"], message_ids=["a", "p", "b"])
        wait_for(lambda: admin.count(f"{queue_name}.dlq") == 1, 30, "the poison message in the DLQ")
        # Delayed retries did not block the queue: the message after the poison was handled at once.
        assert good[:2] == [b"before", b"after"]
        admin.publish(queue_name, queue_name, [b"later"], message_ids=["c"])
        wait_for(lambda: b"later" in good, 10, "a message published after the dead-lettering")
        assert consumer.running
    assert attempts == [(1, None), (2, "2"), (3, "3")], "exactly max_attempts attempts, counted 1..N"
    (dead,) = admin.drain(f"{queue_name}.dlq")
    assert dead.body == b"poison" and dead.message_id == "p"
    # The dead letter is the library's confirmed copy, with the same headers as on Kafka's DLT.
    assert dead.headers["x-rm-origin"] == queue_name
    assert dead.headers["x-rm-attempt"] == 3
    assert dead.headers["x-rm-error-type"] == "builtins.ValueError"
    assert dead.headers["x-rm-error-message"] == "cannot digest this"
    assert dead.headers["x-rm-reason"].startswith("retries exhausted after 3 attempts: ValueError")
    assert int(dead.headers["x-rm-first-failure"]) > 1_700_000_000_000
    assert consumer.stats.dead_lettered == 1 and consumer.stats.retried == 2
    assert consumer.stats.extra["dead_letter_copies"] == 1 and consumer.stats.extra["rejects"] == 0
    assert admin.count(queue_name) == 0


@pytest.mark.timeout(60)
def test_quorum_queue_delivery_limit_dead_letters_on_the_brokers_count(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name, type=RabbitMQQueueType.QUORUM, delivery_limit=2)
    admin.declare(topology)
    attempts: list[tuple[int, bool, Any]] = []
    good: list[bytes] = []

    def handler(message: RabbitMQMessage) -> None:
        if message.body == b"poison":
            attempts.append((message.attempt, message.redelivered, message.headers.get("x-delivery-count")))
            raise RuntimeError("still poison")
        good.append(message.body)

    # The policy would allow 10 attempts: the broker's x-delivery-limit=2 stops it first.
    policy = RetryPolicy(max_attempts=10, initial_delay=0.05, max_delay=0.1, jitter=0.0)
    consumer = RabbitMQConsumer(_config(rabbitmq_endpoint.url, connection_name), queue_name, handler,
                                retry=policy, retry_mode=RabbitMQRetryMode.REQUEUE, topology=topology)
    with consumer:
        admin.publish(queue_name, queue_name, [b"poison", b"fine"], message_ids=["p", "f"])
        wait_for(lambda: admin.count(f"{queue_name}.dlq") == 1, 30, "the broker dead-lettering the poison")
        admin.publish(queue_name, queue_name, [b"later"], message_ids=["l"])
        wait_for(lambda: good == [b"fine", b"later"], 10, "the other messages handled")
        assert consumer.running
    # delivery_limit=2: delivered with x-delivery-count absent/0, 1, 2, then dead-lettered on the next return.
    assert [a for a, _r, _c in attempts] == [1, 2, 3]
    assert [r for _a, r, _c in attempts] == [False, True, True]
    (dead,) = admin.drain(f"{queue_name}.dlq")
    assert dead.message_id == "p"
    assert dead.headers["x-death"][0]["reason"] == "delivery_limit"
    assert dead.headers["x-first-death-queue"] == queue_name


@pytest.mark.timeout(60)
def test_quorum_requeue_counts_attempts_from_x_delivery_count_and_rejects_when_exhausted(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name, type=RabbitMQQueueType.QUORUM)
    admin.declare(topology)
    attempts: list[int] = []

    def handler(message: RabbitMQMessage) -> None:
        attempts.append(message.attempt)
        raise RuntimeError("always fails")

    consumer = RabbitMQConsumer(_config(rabbitmq_endpoint.url, connection_name), queue_name, handler,
                                retry=QUICK_RETRY, retry_mode=RabbitMQRetryMode.REQUEUE, topology=topology)
    with consumer:
        admin.publish(queue_name, queue_name, [b"poison"], message_ids=["p"])
        wait_for(lambda: admin.count(f"{queue_name}.dlq") == 1, 30, "the poison message in the DLQ")
    assert attempts == [1, 2, 3]
    assert consumer.stats.extra["requeues"] == 2 and consumer.stats.extra["dead_letter_copies"] == 1
    (dead,) = admin.drain(f"{queue_name}.dlq")
    assert dead.headers["x-rm-reason"].startswith("retries exhausted after 3 attempts: RuntimeError")
    assert dead.headers["x-rm-error-type"] == "builtins.RuntimeError"


@pytest.mark.timeout(60)
def test_reject_and_undecodable_messages_are_dead_lettered_at_once(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name)
    admin.declare(topology)
    admin.cleanup(queues=_retry_queues(queue_name, 5))
    values: list[Any] = []

    def handler(message: RabbitMQMessage) -> None:
        if message.value == {"reject": True}:
            raise Reject("not for us")
        values.append(message.value)

    consumer = RabbitMQConsumer(_config(rabbitmq_endpoint.url, connection_name), queue_name, handler,
                                decoder=json.loads, topology=topology)
    with consumer:
        admin.publish(queue_name, queue_name, [b'{"n": 1}', b"{not json", b'{"reject": true}', b'{"n": 2}'],
                      message_ids=["1", "bad", "rej", "2"])
        wait_for(lambda: admin.count(f"{queue_name}.dlq") == 2, 20, "two messages in the DLQ")
        wait_for(lambda: len(values) == 2, 10, "the good messages handled")
    assert values == [{"n": 1}, {"n": 2}]
    assert sorted(g.message_id or "" for g in admin.drain(f"{queue_name}.dlq")) == ["bad", "rej"]
    assert consumer.stats.undecodable == 1 and consumer.stats.dead_lettered == 2
    assert consumer.stats.extra["retry_copies"] == 0, "no retry for what no retry can fix"


@pytest.mark.timeout(60)
def test_a_queue_declared_elsewhere_is_dead_lettered_by_the_broker_with_x_death(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    """Without the queue's topology the consumer does not know its dead-letter exchange: it rejects, and the
    broker dead-letters the message (``x-death``, no library headers)."""
    admin.declare(RabbitMQTopology.work_queue(queue_name))
    admin.cleanup(queues=_retry_queues(queue_name, 5))

    def handler(message: RabbitMQMessage) -> None:
        raise Reject("not for us")

    consumer = RabbitMQConsumer(_config(rabbitmq_endpoint.url, connection_name), queue_name, handler)
    with consumer:
        admin.publish(queue_name, queue_name, [b"x"], message_ids=["x"])
        wait_for(lambda: admin.count(f"{queue_name}.dlq") == 1, 20, "the message in the DLQ")
    (dead,) = admin.drain(f"{queue_name}.dlq")
    assert dead.headers["x-death"][0]["reason"] == "rejected" and "x-rm-reason" not in dead.headers
    assert consumer.stats.extra["rejects"] == 1 and consumer.stats.extra["dead_letter_copies"] == 0


@pytest.mark.timeout(60)
def test_batch_handler_acks_with_multiple_and_retries_a_failed_batch(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name)
    admin.declare(topology)
    admin.cleanup(queues=_retry_queues(queue_name, QUICK_RETRY.max_attempts))
    admin.publish(queue_name, queue_name, [f"{i}".encode() for i in range(60)],
                  message_ids=[f"id-{i}" for i in range(60)])
    batches: list[list[tuple[int, int]]] = []
    failed_once = threading.Event()

    def handler(messages: list[RabbitMQMessage]) -> None:
        batches.append([(int(m.body), m.attempt) for m in messages])
        if not failed_once.is_set():
            failed_once.set()
            raise RuntimeError("first batch fails")

    config = _config(rabbitmq_endpoint.url, connection_name, batch_size=10, batch_timeout=0.5, prefetch=20)
    consumer = RabbitMQConsumer(config, queue_name, handler, retry=QUICK_RETRY, topology=topology)
    with consumer:
        wait_for(lambda: consumer.stats.extra.get("messages", 0) == 70, 20, "60 messages + 10 retried")
    first = batches[0]
    assert [a for _n, a in first] == [1] * 10 and len(first) == 10
    succeeded = [n for batch in batches[1:] for n, _a in batch]
    assert sorted(succeeded) == list(range(60)), "every message handled successfully exactly once"
    retried = {n: a for batch in batches[1:] for n, a in batch if n in {m for m, _ in first}}
    assert set(retried.values()) == {2}, "the failed batch's messages came back as attempt 2"
    assert consumer.stats.extra["multiple_acks"] > 0
    assert admin.count(queue_name) == 0


@pytest.mark.timeout(60)
def test_async_handler_and_dedup_store_skip_a_duplicate(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name)
    admin.declare(topology)
    admin.cleanup(queues=_retry_queues(queue_name, 5))
    handled: list[str] = []

    async def handler(message: RabbitMQMessage) -> None:
        handled.append(message.message_id)

    consumer = RabbitMQConsumer(_config(rabbitmq_endpoint.url, connection_name), queue_name, handler,
                                dedup=MemoryDedupStore(), topology=topology)
    with consumer:
        admin.publish(queue_name, queue_name, [b"a", b"a again", b"b"], message_ids=["A", "A", "B"])
        wait_for(lambda: consumer.stats.processed + consumer.stats.deduplicated == 3, 20, "three deliveries")
    assert handled == ["A", "B"]
    assert consumer.stats.deduplicated == 1
    assert admin.count(queue_name) == 0


@pytest.mark.timeout(60)
def test_deleting_the_queue_cancels_the_consumer_with_a_typed_error(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name, dead_letter=False)
    admin.declare(topology)
    admin.cleanup(queues=_retry_queues(queue_name, 5))
    consumer = RabbitMQConsumer(_config(rabbitmq_endpoint.url, connection_name), queue_name, lambda m: None)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            consumer.run()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    wait_for(lambda: consumer.running and consumer.stats.extra.get("acks") is not None, 10, "consuming")
    time.sleep(0.3)
    admin.delete_queue(queue_name)
    started = time.monotonic()
    runner.join(15)
    assert not runner.is_alive(), "run() must return instead of hanging"
    assert time.monotonic() - started < 10
    assert len(outcome) == 1 and isinstance(outcome[0], ConsumerCancelled), outcome
    assert isinstance(consumer.error, ConsumerCancelled)


@pytest.mark.timeout(30)
def test_missing_queue_is_a_configuration_error_at_start(
    rabbitmq_endpoint: RabbitMQEndpoint, queue_name: str, connection_name: str
) -> None:
    consumer = RabbitMQConsumer(_config(rabbitmq_endpoint.url, connection_name), queue_name, lambda m: None,
                                retry_mode=RabbitMQRetryMode.REQUEUE)
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match="NOT_FOUND"):
        consumer.start()
    assert time.monotonic() - started < 10
    assert not consumer.running


@pytest.mark.timeout(60)
def test_auto_ack_consumer_handles_messages_without_acks(
    rabbitmq_endpoint: RabbitMQEndpoint, admin: Admin, queue_name: str, connection_name: str
) -> None:
    topology = RabbitMQTopology.work_queue(queue_name)
    admin.declare(topology)
    admin.publish(queue_name, queue_name, [f"{i}".encode() for i in range(100)])
    seen: list[bytes] = []
    config = _config(rabbitmq_endpoint.url, connection_name, ack_mode=RabbitMQAckMode.AUTO)
    consumer = RabbitMQConsumer(config, queue_name, lambda m: seen.append(m.body), topology=topology)
    with consumer:
        wait_for(lambda: len(seen) == 100, 20, "100 messages")
    assert consumer.stats.extra["acks"] == 0
    assert admin.count(queue_name) == 0
