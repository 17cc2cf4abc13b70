"""Kafka settings: every invalid value or combination fails at construction, naming the field."""

from __future__ import annotations

import dataclasses

import pytest

import reliable_messaging
from reliable_messaging import (
    Acks,
    CommitMode,
    ConfigurationError,
    KafkaConsumerConfig,
    KafkaProducerConfig,
)

BOOTSTRAP = "127.0.0.1:9092"


def producer(**kwargs: object) -> KafkaProducerConfig:
    return KafkaProducerConfig(bootstrap_servers=BOOTSTRAP, **kwargs)  # type: ignore[arg-type]


def consumer(**kwargs: object) -> KafkaConsumerConfig:
    return KafkaConsumerConfig(bootstrap_servers=BOOTSTRAP, group_id="g", **kwargs)  # type: ignore[arg-type]


def test_kafka_names_are_exported_lazily() -> None:
    for name in ("Acks", "CommitMode", "KafkaConsumer", "KafkaConsumerConfig", "KafkaMessage", "KafkaProducer",
                 "KafkaProducerConfig"):
        assert name in reliable_messaging.__all__
        assert getattr(reliable_messaging, name) is getattr(reliable_messaging._kafka, name)
    assert list(reliable_messaging._kafka.__all__) == sorted(reliable_messaging._kafka.__all__)


# -- producer ---------------------------------------------------------------------------------


def test_defaults_are_acks_all_with_idempotence() -> None:
    config = producer()
    assert config.acks is Acks.ALL
    assert config.idempotent
    conf = config.librdkafka()
    assert conf["acks"] == "all"
    assert conf["enable.idempotence"] is True
    assert conf["max.in.flight.requests.per.connection"] == 5
    assert conf["delivery.timeout.ms"] == 120_000


@pytest.mark.parametrize(("given", "expected"), [
    (0, Acks.ZERO), (1, Acks.ONE), ("all", Acks.ALL), (-1, Acks.ALL), ("-1", Acks.ALL), ("ALL", Acks.ALL),
    ("0", Acks.ZERO), (Acks.ONE, Acks.ONE),
])
def test_acks_spellings(given: object, expected: Acks) -> None:
    config = producer(acks=given, enable_idempotence=None)
    assert config.acks is expected
    assert config.librdkafka()["acks"] == expected.value
    # Idempotence follows acks when not given: on only for "all".
    assert config.idempotent is (expected is Acks.ALL)


@pytest.mark.parametrize("bad", [2, "two", None, True, 1.0, -2])
def test_unknown_acks_names_field_and_allowed_values(bad: object) -> None:
    with pytest.raises(ConfigurationError, match=r"acks must be 0, 1 or 'all'") as info:
        producer(acks=bad)
    assert info.value.field == "acks"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("acks", [0, 1])
def test_idempotence_requires_acks_all(acks: int) -> None:
    with pytest.raises(ConfigurationError, match=r"enable_idempotence=True requires acks='all'") as info:
        producer(acks=acks, enable_idempotence=True)
    assert info.value.field == "enable_idempotence"


def test_max_in_flight_above_five_with_idempotence_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"max_in_flight must be between 1 and 5 with idempotence") as info:
        producer(max_in_flight=6)
    assert info.value.field == "max_in_flight"
    # Without idempotence more requests in flight are allowed (ordering is then the caller's problem).
    assert producer(acks=1, max_in_flight=10).max_in_flight == 10
    assert producer(enable_idempotence=False, max_in_flight=10).librdkafka()["enable.idempotence"] is False


@pytest.mark.parametrize(("field", "value", "pattern"), [
    ("max_in_flight", 0, "max_in_flight must be an int >= 1"),
    ("delivery_timeout", 0, "delivery_timeout must be a number of seconds > 0"),
    ("delivery_timeout", float("nan"), "delivery_timeout must be a number of seconds > 0"),
    ("linger", -1, "linger must be a number of seconds >= 0"),
    ("queue_full_timeout", "1", "queue_full_timeout must be a number"),
    ("compression", "brotli", "compression must be one of none, gzip, snappy, lz4, zstd"),
    ("retries", -1, "retries must be None or an int >= 0"),
    ("retries", 0, "retries must be >= 1 with idempotence"),
    ("enable_idempotence", "yes", "enable_idempotence must be True, False or None"),
    ("bootstrap_servers", "", "bootstrap_servers must be a non-empty string"),
    ("client_id", " ", "client_id must be a non-empty string"),
])
def test_producer_field_errors(field: str, value: object, pattern: str) -> None:
    kwargs: dict[str, object] = {field: value}
    if field == "bootstrap_servers":
        with pytest.raises(ConfigurationError, match=pattern) as info:
            KafkaProducerConfig(bootstrap_servers=value)  # type: ignore[arg-type]
    else:
        with pytest.raises(ConfigurationError, match=pattern) as info:
            producer(**kwargs)
    assert info.value.field == field


def test_bounded_retries_without_idempotence_are_passed_through() -> None:
    conf = producer(enable_idempotence=False, retries=0).librdkafka()
    assert conf["retries"] == 0
    assert "retries" not in producer().librdkafka()


@pytest.mark.parametrize(("key", "field"), [
    ("acks", "acks"), ("enable.idempotence", "enable_idempotence"), ("message.timeout.ms", "delivery_timeout"),
    ("bootstrap.servers", "bootstrap_servers"), ("on_delivery", "extra"), ("error_cb", "extra"),
])
def test_extra_may_not_override_a_modelled_setting(key: str, field: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"extra may not set '{key}'") as info:
        producer(extra={key: "1"})
    assert info.value.field == field


def test_extra_values_must_be_plain() -> None:
    with pytest.raises(ConfigurationError, match=r"extra\['socket.timeout.ms'\] must be a str, int, float or bool"):
        producer(extra={"socket.timeout.ms": [1]})
    config = producer(extra={"socket.timeout.ms": 5000})
    assert config.librdkafka()["socket.timeout.ms"] == 5000
    with pytest.raises(TypeError):
        config.extra["x"] = 1  # type: ignore[index]  # a read-only copy: the frozen config stays frozen


def test_configs_are_frozen_and_keyword_only() -> None:
    config = producer()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.acks = Acks.ONE  # type: ignore[misc]
    with pytest.raises(TypeError):
        KafkaProducerConfig(BOOTSTRAP)  # type: ignore[misc]
    with pytest.raises(TypeError):
        KafkaConsumerConfig(BOOTSTRAP, "g")  # type: ignore[misc]


# -- consumer ---------------------------------------------------------------------------------


def test_consumer_defaults() -> None:
    config = consumer()
    assert config.commit_mode is CommitMode.MANUAL_BATCH
    conf = config.librdkafka()
    assert conf["enable.auto.commit"] is False
    assert conf["enable.auto.offset.store"] is False
    assert conf["auto.offset.reset"] == "earliest"
    assert conf["session.timeout.ms"] == 45_000


@pytest.mark.parametrize(("mode", "auto_commit", "auto_store"), [
    ("auto", True, True),
    ("manual", False, False),
    ("manual_batch", False, False),
    ("store_offsets", True, False),
    (CommitMode.STORE_OFFSETS, True, False),
])
def test_commit_modes_map_to_librdkafka(mode: str, auto_commit: bool, auto_store: bool) -> None:
    conf = consumer(commit_mode=mode, commit_interval=0.5).librdkafka()
    assert conf["enable.auto.commit"] is auto_commit
    assert conf["enable.auto.offset.store"] is auto_store
    assert conf["auto.commit.interval.ms"] == 500


@pytest.mark.parametrize(("field", "value", "pattern"), [
    ("commit_mode", "sometimes", "commit_mode must be one of auto, before, manual, manual_batch, store_offsets"),
    ("commit_every", 0, "commit_every must be an int >= 1"),
    ("commit_every", True, "commit_every must be an int >= 1"),
    ("commit_interval", -1, "commit_interval must be a number of seconds > 0"),
    ("auto_offset_reset", "smallest", "auto_offset_reset must be one of earliest, latest, error"),
    ("session_timeout", 0, "session_timeout must be a number of seconds > 0"),
    ("max_poll_interval", 5, r"max_poll_interval \(5\) must be >= session_timeout"),
    ("fetch_batch", 0, "fetch_batch must be an int >= 1"),
    ("extra", {"enable.auto.commit": True}, "extra may not set 'enable.auto.commit'"),
])
def test_consumer_field_errors(field: str, value: object, pattern: str) -> None:
    with pytest.raises(ConfigurationError, match=pattern) as info:
        consumer(**{field: value})
    expected = "commit_mode" if field == "extra" else field
    assert info.value.field == expected


def test_group_id_is_required() -> None:
    with pytest.raises(ConfigurationError, match="group_id must be a non-empty string"):
        KafkaConsumerConfig(bootstrap_servers=BOOTSTRAP, group_id="")
