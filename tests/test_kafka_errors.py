"""librdkafka error codes become typed errors at one boundary, most specific class first."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from reliable_messaging import (
    BrokerUnavailable,
    DeliveryError,
    DeliveryFailed,
    DeliveryTimeout,
    MessageTooLarge,
    NotEnoughReplicas,
    ReliableMessagingError,
    is_transient,
)
from reliable_messaging._kafka._errors import delivery_error, operation_error


@pytest.mark.parametrize(("code", "error_type", "transient"), [
    (KafkaError._MSG_TIMED_OUT, DeliveryTimeout, True),
    (KafkaError._PURGE_INFLIGHT, DeliveryTimeout, True),
    (KafkaError.MSG_SIZE_TOO_LARGE, MessageTooLarge, False),
    (KafkaError.RECORD_LIST_TOO_LARGE, MessageTooLarge, False),
    (KafkaError.NOT_ENOUGH_REPLICAS, NotEnoughReplicas, True),
    (KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND, NotEnoughReplicas, True),
    (KafkaError._PURGE_QUEUE, DeliveryFailed, True),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, DeliveryFailed, False),
])
def test_delivery_codes(code: int, error_type: type[DeliveryError], transient: bool) -> None:
    error = delivery_error(KafkaError(code), "mid-1")
    assert type(error) is error_type
    assert error.message_id == "mid-1"
    assert is_transient(error) is transient
    if isinstance(error, DeliveryFailed):
        assert error.code == KafkaError(code).name()


def test_unknown_broker_code_keeps_librdkafkas_retriable_flag() -> None:
    error = delivery_error(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION, retriable=True), None)
    assert type(error) is DeliveryFailed
    assert error.code == "NOT_LEADER_FOR_PARTITION"
    assert error.retriable


def test_operation_errors_split_transient_from_permanent() -> None:
    transient = operation_error("commit", KafkaException(KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE)))
    assert isinstance(transient, BrokerUnavailable)
    assert "COORDINATOR_NOT_AVAILABLE" in str(transient)
    permanent = operation_error("commit", KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION)))
    assert type(permanent) is ReliableMessagingError
    assert "ILLEGAL_GENERATION" in str(permanent)
    assert type(operation_error("seek", KafkaException("text only"))) is ReliableMessagingError
