"""The pika error boundary: every pika exception becomes one of the library's, most specific first."""

from __future__ import annotations

import pika.exceptions
import pytest

from reliable_messaging import (
    BrokerUnavailable,
    ConfigurationError,
    ConsumerCancelled,
    DeliveryFailed,
    InvalidMessage,
    ReliableMessagingError,
    TopologyMismatch,
)
from reliable_messaging._rabbitmq._errors import map_pika_error, parse_precondition_failed

INEQUIVALENT = ("PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'orders' in vhost '/': "
                "received '5' but current is '10'")


def test_precondition_failed_is_parsed_for_name_and_argument() -> None:
    assert parse_precondition_failed(INEQUIVALENT) == ("orders", "x-max-length")
    assert parse_precondition_failed(
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'ex' in vhost '/': received 'fanout' but "
        "current is 'direct'") == ("ex", "type")
    assert parse_precondition_failed("PRECONDITION_FAILED - something else") == (None, None)


@pytest.mark.parametrize(("exc", "expected", "match"), [
    (pika.exceptions.ChannelClosedByBroker(406, INEQUIVALENT), TopologyMismatch, "'x-max-length' differs"),
    (pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED - delivery acknowledgement on channel 1 "
                                                "timed out"), DeliveryFailed, "timed out"),
    (pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no queue 'q' in vhost '/'"), ConfigurationError,
     "404 NOT_FOUND"),
    (pika.exceptions.ChannelClosedByBroker(403, "ACCESS_REFUSED - amq. prefix"), ConfigurationError, "403"),
    (pika.exceptions.ChannelClosedByBroker(541, "INTERNAL_ERROR"), DeliveryFailed, "541"),
    (pika.exceptions.ConsumerCancelled(), ConsumerCancelled, "cancelled the consumer"),
    (pika.exceptions.ProbableAuthenticationError("bad"), ConfigurationError, "refused the credentials"),
    (pika.exceptions.AuthenticationError("PLAIN"), ConfigurationError, "refused the credentials"),
    (pika.exceptions.ProbableAccessDeniedError("vhost"), ConfigurationError, "virtual host"),
    (pika.exceptions.IncompatibleProtocolError("x"), BrokerUnavailable, "AMQP 0-9-1"),
    (pika.exceptions.ConnectionClosedByBroker(320, "CONNECTION_FORCED - shutdown"), BrokerUnavailable, "320"),
    (pika.exceptions.AMQPHeartbeatTimeout("missed"), BrokerUnavailable, "heartbeat"),
    (pika.exceptions.StreamLostError("reset"), BrokerUnavailable, "reset"),
    (pika.exceptions.AMQPConnectionError(), BrokerUnavailable, "AMQPConnectionError"),
    (pika.exceptions.ShortStringTooLong("k"), InvalidMessage, "255 bytes"),
    (pika.exceptions.UnsupportedAMQPFieldException("f"), InvalidMessage, "cannot carry"),
    (pika.exceptions.ChannelWrongStateError("closed"), BrokerUnavailable, "channel failed"),
    (ConnectionRefusedError(111, "refused"), BrokerUnavailable, "refused"),
])
def test_pika_errors_map_to_typed_errors(exc: BaseException, expected: type[ReliableMessagingError],
                                         match: str) -> None:
    mapped = map_pika_error(exc, what="testing", name="orders")
    assert type(mapped) is expected
    assert match in str(mapped)
    assert "testing" in str(mapped)


def test_mismatch_carries_name_and_argument_and_is_a_configuration_error() -> None:
    mapped = map_pika_error(pika.exceptions.ChannelClosedByBroker(406, INEQUIVALENT), what="declaring")
    assert isinstance(mapped, TopologyMismatch) and isinstance(mapped, ConfigurationError)
    assert (mapped.name, mapped.argument, mapped.field) == ("orders", "x-max-length", "x-max-length")
    not_found = map_pika_error(pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND"), what="x", name="q")
    assert isinstance(not_found, ConfigurationError) and not_found.field == "q"
    failed = map_pika_error(pika.exceptions.ChannelClosedByBroker(541, "INTERNAL_ERROR"), what="x")
    assert isinstance(failed, DeliveryFailed) and failed.code == 541


def test_our_own_errors_pass_through_and_foreign_ones_are_refused() -> None:
    own = BrokerUnavailable("already mapped")
    assert map_pika_error(own, what="x") is own
    with pytest.raises(TypeError, match="not a pika or socket error"):
        map_pika_error(ValueError("not ours"), what="x")
