"""Producer and consumer behaviour that needs no broker: bad input, closing, full queues, timeouts.

The "broker" is 127.0.0.1:1, where nothing listens: librdkafka queues messages
and keeps trying to connect, which is exactly the state in which futures must
still resolve, in bounded time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from reliable_messaging import (
    BrokerUnavailable,
    ClosedError,
    CommitMode,
    ConfigurationError,
    DeliveryFailed,
    DeliveryTimeout,
    InvalidMessage,
    KafkaConsumer,
    KafkaConsumerConfig,
    KafkaProducer,
    KafkaProducerConfig,
    MemoryDedupStore,
    MessageTooLarge,
    RetryPolicy,
)
from reliable_messaging._log import RepeatFilter, forget_repeats

NOWHERE = "127.0.0.1:1"


@pytest.fixture(autouse=True)
def _quiet_librdkafka() -> Iterator[None]:
    # Connection-refused chatter from librdkafka is expected here.
    logging.getLogger("reliable_messaging.kafka").setLevel(logging.CRITICAL)
    yield
    logging.getLogger("reliable_messaging.kafka").setLevel(logging.NOTSET)


@pytest.fixture
def producer() -> Iterator[KafkaProducer]:
    p = KafkaProducer(KafkaProducerConfig(bootstrap_servers=NOWHERE, delivery_timeout=60))
    yield p
    p.close(timeout=0)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"body": {"a": 1}}, "message body must be bytes, bytearray, memoryview or str, got dict"),
    ({"body": None}, "message body must be bytes"),
    ({"key": 42}, "key must be bytes, str or None, got int"),
    ({"headers": {"x": object()}}, "header 'x' must be str, bytes, int, float, bool or None, got object"),
    ({"headers": {"x": [1]}}, "header 'x' must be"),
    ({"headers": {1: "x"}}, "header names must be non-empty str"),
    ({"headers": [("x", "y")]}, "headers must be a mapping"),
    ({"headers": {"message-id": "x"}}, "the 'message-id' header is set by the library: pass message_id"),
    ({"message_id": ""}, "message_id must be a non-empty str"),
    ({"message_id": 7}, "message_id must be a non-empty str"),
    ({"partition": -2}, "partition must be None or an int >= 0"),
    ({"partition": True}, "partition must be None or an int >= 0"),
    ({"topic": ""}, "topic must be a non-empty str"),
])
def test_bad_input_raises_at_call_time_and_disturbs_nothing(producer: KafkaProducer, kwargs: dict[str, object],
                                                          pattern: str) -> None:
    good = producer.publish("t", b"fine")
    args: dict[str, object] = {"topic": "t", "body": b"x", **kwargs}
    topic, body = args.pop("topic"), args.pop("body")
    began = time.monotonic()
    with pytest.raises(InvalidMessage, match=pattern) as info:
        producer.publish(topic, body, **args)  # type: ignore[arg-type]
    assert time.monotonic() - began < 1
    assert isinstance(info.value, TypeError | ValueError)
    assert not good.done(), "a bad message does not disturb one in flight"
    assert producer.flush(0) is False and len(producer) >= 1
    producer.close(timeout=0)
    assert isinstance(good.exception(), DeliveryFailed), "the good message was queued, then purged on close"


def test_accepted_inputs_are_normalized(producer: KafkaProducer) -> None:
    future = producer.publish("t", "text", key=bytearray(b"k"), headers={
        "s": "v", "b": b"v", "i": 1, "f": 1.5, "yes": True, "none": None, "mv": memoryview(b"m"),
    }, message_id="my-id", partition=0)
    assert future.message_id == "my-id"
    generated = [producer.publish("t", b"x").message_id for _ in range(3)]
    assert len(set(generated)) == 3 and all(len(m) == 32 for m in generated)
    assert all(int(m, 16) >= 0 for m in generated), "ids are hex, like new_message_id()"


def test_close_fails_every_pending_future_in_bounded_time() -> None:
    producer = KafkaProducer(KafkaProducerConfig(bootstrap_servers=NOWHERE, delivery_timeout=300))
    futures = [producer.publish("t", b"never sent") for _ in range(50)]
    began = time.monotonic()
    producer.close(timeout=0.2)
    assert time.monotonic() - began < 10
    assert all(f.done() for f in futures), "close() left futures pending"
    for future in futures:
        error = future.exception()
        assert isinstance(error, DeliveryFailed), error
        assert error.code == "_PURGE_QUEUE" and error.retriable
        assert error.message_id == future.message_id
    with pytest.raises(ClosedError):
        producer.publish("t", b"after close")
    producer.close()  # idempotent


def test_undeliverable_message_fails_with_delivery_timeout() -> None:
    with KafkaProducer(KafkaProducerConfig(bootstrap_servers=NOWHERE, delivery_timeout=0.5)) as producer:
        future = producer.publish("t", b"x")
        began = time.monotonic()
        with pytest.raises(DeliveryTimeout, match=r"delivery\.timeout\.ms") as info:
            future.result(timeout=15)
        assert time.monotonic() - began < 15
        assert info.value.message_id == future.message_id
        assert isinstance(info.value, TimeoutError)


def test_flush_returns_what_is_still_pending(producer: KafkaProducer) -> None:
    producer.publish("t", b"x")
    began = time.monotonic()
    assert producer.flush(0.2) is False and len(producer) == 1
    assert time.monotonic() - began < 5


def test_full_local_queue_waits_then_fails_the_future() -> None:
    sleeps: list[float] = []
    config = KafkaProducerConfig(bootstrap_servers=NOWHERE, queue_full_timeout=0.3,
                                 extra={"queue.buffering.max.messages": 1})
    producer = KafkaProducer(config, queue_full_sleep=sleeps.append)
    first = producer.publish("t", b"fills the queue")
    began = time.monotonic()
    second = producer.publish("t", b"no room")
    assert time.monotonic() - began < 5
    assert sleeps, "the injected sleep was used between attempts"
    with pytest.raises(DeliveryTimeout, match=r"local queue stayed full for 0\.3s"):
        second.result(timeout=0)
    assert not first.done()
    producer.close(timeout=0)
    assert isinstance(first.exception(), DeliveryFailed)


def test_message_over_local_size_limit_fails_future_with_message_too_large() -> None:
    config = KafkaProducerConfig(bootstrap_servers=NOWHERE, extra={"message.max.bytes": 1000})
    producer = KafkaProducer(config)
    future = producer.publish("t", b"x" * 5000)
    with pytest.raises(MessageTooLarge):
        future.result(timeout=1)
    producer.close(timeout=0)


def test_librdkafka_rejecting_the_configuration_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="librdkafka refused the producer configuration"):
        KafkaProducer(KafkaProducerConfig(bootstrap_servers=NOWHERE, extra={"no.such.property": 1}))
    with pytest.raises(ConfigurationError, match="config must be a KafkaProducerConfig"):
        KafkaProducer({"bootstrap.servers": NOWHERE})  # type: ignore[arg-type]


# -- consumer ---------------------------------------------------------------------------------


def consumer_config(**kwargs: object) -> KafkaConsumerConfig:
    return KafkaConsumerConfig(bootstrap_servers=NOWHERE, group_id="g", **kwargs)  # type: ignore[arg-type]


def test_auto_commit_with_dedup_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="commit_mode='auto' cannot be combined with a dedup store") as info:
        KafkaConsumer(consumer_config(commit_mode="auto"), "t", lambda m: None, dedup=MemoryDedupStore())
    assert info.value.field == "dedup"
    consumer = KafkaConsumer(consumer_config(commit_mode=CommitMode.MANUAL), "t", lambda m: None,
                             dedup=MemoryDedupStore())
    consumer.stop()


@pytest.mark.parametrize(("args", "kwargs", "field"), [
    (("t",), {"retry": 3}, "retry"),
    (([],), {}, "topics"),
    ((["t", ""],), {}, "topics"),
    (("t",), {"dedup": object()}, "dedup"),
    (("t",), {"dead_letter_suffix": ""}, "dead_letter_suffix"),
    (("t",), {"retry_suffix": "/x"}, "retry_suffix"),
    (("t",), {"retry_suffix": ".DLT"}, "retry_suffix"),
])
def test_consumer_argument_errors(args: tuple[object, ...], kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        KafkaConsumer(consumer_config(), args[0], lambda m: None, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_consumer_refused_by_librdkafka_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="librdkafka refused the consumer configuration"):
        KafkaConsumer(consumer_config(extra={"no.such.property": 1}), "t", lambda m: None)


def test_unstarted_consumer_stops_at_once_and_cannot_start_afterwards() -> None:
    consumer = KafkaConsumer(consumer_config(), "t", lambda m: None, retry=RetryPolicy(max_attempts=2))
    began = time.monotonic()
    consumer.stop()
    consumer.stop()
    assert time.monotonic() - began < 5
    with pytest.raises(ClosedError):
        consumer.start()


def test_handler_must_be_callable() -> None:
    with pytest.raises(ConfigurationError, match="handler must be callable") as info:
        KafkaConsumer(consumer_config(), "t", "not a function")  # type: ignore[arg-type]
    assert info.value.field == "handler"


# -- a broker that was never reached ----------------------------------------------------------------


def test_a_broker_never_reached_fails_publishes_fast_with_broker_unavailable(
        caplog: pytest.LogCaptureFixture) -> None:
    """Not after delivery_timeout (two minutes) with "may or may not have been stored": nothing was sent."""
    logging.getLogger("reliable_messaging.kafka").setLevel(logging.NOTSET)
    caplog.set_level(logging.INFO, logger="reliable_messaging")
    forget_repeats()  # another test may have logged the same warning moments ago
    producer = KafkaProducer(KafkaProducerConfig(bootstrap_servers=NOWHERE, connect_timeout=2.0))
    began = time.monotonic()
    first = producer.publish("t", b"x")
    with pytest.raises(BrokerUnavailable, match=r"no Kafka broker of 127\.0\.0\.1:1 answered within 2s.*not sent"):
        first.result(timeout=15)
    assert 1.5 < time.monotonic() - began < 5
    later = producer.publish("t", b"y")
    assert isinstance(later.exception(timeout=0), BrokerUnavailable), "fails at once while no broker answers"
    time.sleep(3)  # librdkafka goes on trying to connect in the background, and on reporting it
    began = time.monotonic()
    producer.close(timeout=30)
    assert time.monotonic() - began < 3, "close does not wait for a broker that never answered"
    kafka_lines = [r for r in caplog.records if r.name.startswith("reliable_messaging.kafka")]
    assert 1 <= len(kafka_lines) <= 10, [r.getMessage() for r in kafka_lines]


def test_the_connect_timeout_is_ten_seconds_and_must_be_positive() -> None:
    assert KafkaProducerConfig(bootstrap_servers=NOWHERE).connect_timeout == 10.0
    with pytest.raises(ConfigurationError) as info:
        KafkaProducerConfig(bootstrap_servers=NOWHERE, connect_timeout=0)
    assert info.value.field == "connect_timeout"


def test_repeated_log_lines_are_let_through_once_per_interval() -> None:
    log = logging.getLogger("reliable_messaging.test.repeats")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    log.addHandler(handler)
    limiter = RepeatFilter(interval=0.3)
    log.addFilter(limiter)
    try:
        for attempt in range(50):
            log.warning("connect to %s failed after %dms", "127.0.0.1:1", attempt)
        log.warning("something else")
        log.info("info lines are never dropped")
        log.info("info lines are never dropped")
        time.sleep(0.35)
        log.warning("connect to %s failed after %dms", "127.0.0.1:1", 99)
    finally:
        log.removeFilter(limiter)
        log.removeHandler(handler)
    assert seen == [
        "connect to 127.0.0.1:1 failed after 0ms",
        "something else",
        "info lines are never dropped",
        "info lines are never dropped",
        "connect to 127.0.0.1:1 failed after 99ms (49 similar messages suppressed in the last 0.3s)",
    ]
