"""RabbitMQ messages: attempt counting across paths, header checks, the handler's view of a delivery."""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import pika
import pika.spec
import pytest

from reliable_messaging import InvalidMessage, Message, RabbitMQMessage
from reliable_messaging._message import ATTEMPT_HEADER
from reliable_messaging._rabbitmq._consumer_io import _copy_properties
from reliable_messaging._rabbitmq._message import attempt_of, check_headers, check_short_string, message_from_delivery


def _death(queue: str, reason: str, count: int) -> dict[str, Any]:
    return {"queue": queue, "reason": reason, "count": count, "exchange": "", "routing-keys": [queue]}


@pytest.mark.parametrize(("headers", "attempt"), [
    (None, 1),
    ({}, 1),
    ({ATTEMPT_HEADER: 3}, 3),
    ({ATTEMPT_HEADER: b"4"}, 4),
    ({ATTEMPT_HEADER: "nonsense"}, 1),
    ({ATTEMPT_HEADER: 0}, 1),
    ({"x-delivery-count": 0}, 1),
    ({"x-delivery-count": 2}, 3),
    ({ATTEMPT_HEADER: 2, "x-delivery-count": 1}, 3),
    # A DLX-and-wait-queue loop without our header: rejections from *this* queue count.
    ({"x-death": [_death("orders", "rejected", 2), _death("orders.wait", "expired", 2)]}, 3),
    # Our retry queues' expiries are not counted again: the header already was.
    ({ATTEMPT_HEADER: 3, "x-death": [_death("orders.retry.1", "expired", 1), _death("orders.retry.2", "expired", 1)]},
     3),
    ({"x-death": [_death("other", "rejected", 5)]}, 1),
    ({"x-death": [{"queue": b"orders", "reason": b"rejected", "count": 1}]}, 2),
    ({"x-death": "garbage"}, 1),
])
def test_attempt_is_one_count_whichever_path(headers: dict[str, Any] | None, attempt: int) -> None:
    assert attempt_of(headers, "orders") == attempt


def test_headers_pika_can_encode_pass_and_others_fail_at_call_time() -> None:
    good = {"s": "text", "b": b"raw", "i": 2**62, "t": True, "d": decimal.Decimal("1.5"), "n": None,
            "dt": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc), "l": [1, "a"], "m": {"k": [b"v"]},
            "tuple": (1, 2)}
    checked = check_headers({**good, "nested": {"t": (1, (2, 3))}})
    assert checked["tuple"] == [1, 2] and checked["s"] == "text"
    assert checked["nested"] == {"t": [1, [2, 3]]}, "tuples become lists: pika encodes lists only"
    for bad, match in [
        ({"f": 1.5}, "cannot encode floats"),
        ({"big": 2**64}, "signed 64-bit"),
        ({1: "x"}, "header names must be str"),
        ({"k" * 300: "x"}, "255 UTF-8 bytes"),
        ({"m": {1: "x"}}, "non-str key"),
        ({"o": object()}, "has type object"),
        ({"deep": [{"x": [[1.0]]}]}, r"deep\[0\]\.x\[0\]\[0\]=1\.0"),
    ]:
        with pytest.raises(InvalidMessage, match=match):
            check_headers(bad)
    with pytest.raises(InvalidMessage, match="mapping"):
        check_headers(["not", "a", "mapping"])


def test_short_strings() -> None:
    assert check_short_string("x", "é" * 127) == "é" * 127
    with pytest.raises(InvalidMessage, match="at most 255"):
        check_short_string("x", "é" * 128)
    with pytest.raises(InvalidMessage, match="must be a str"):
        check_short_string("x", b"bytes")
    with pytest.raises(InvalidMessage, match="must not be empty"):
        check_short_string("x", "", allow_empty=False)


def test_message_from_delivery() -> None:
    method = pika.spec.Basic.Deliver(consumer_tag="c", delivery_tag=7, redelivered=True, exchange="ex",
                                     routing_key="rk")
    props = pika.BasicProperties(message_id="m1", headers={ATTEMPT_HEADER: 2, "x-delivery-count": 1},
                                 content_type="application/json", correlation_id="c1", reply_to="r", timestamp=5)
    message = message_from_delivery(method, props, b"{}", queue="orders", value={})
    assert isinstance(message, RabbitMQMessage) and isinstance(message, Message)
    assert (message.message_id, message.attempt, message.redelivered, message.delivery_tag) == ("m1", 3, True, 7)
    assert (message.exchange, message.routing_key, message.key, message.queue, message.source) == (
        "ex", "rk", b"rk", "orders", "orders")
    assert (message.content_type, message.correlation_id, message.reply_to, message.timestamp) == (
        "application/json", "c1", "r", 5)
    bare = message_from_delivery(pika.spec.Basic.Deliver(delivery_tag=1, routing_key=""), pika.BasicProperties(),
                                 b"x", queue="q", value=b"x")
    assert (bare.message_id, bare.key, bare.attempt, bare.headers) == ("", None, 1, {})


def test_retry_copy_keeps_the_original_properties_but_not_user_id() -> None:
    original = pika.BasicProperties(content_type="t", content_encoding="gzip", delivery_mode=1, priority=3,
                                    correlation_id="c", reply_to="r", message_id="m", timestamp=9, type="kind",
                                    user_id="someone-else", app_id="app", expiration="60000")
    copy = _copy_properties(original, {ATTEMPT_HEADER: 2}, 1.25)
    assert (copy.content_type, copy.content_encoding, copy.priority, copy.correlation_id, copy.reply_to,
            copy.message_id, copy.timestamp, copy.type, copy.app_id) == ("t", "gzip", 3, "c", "r", "m", 9, "kind",
                                                                         "app")
    assert copy.user_id is None, "the broker refuses a user_id that is not the publishing connection's user"
    assert (copy.delivery_mode, copy.expiration, copy.headers) == (2, "1250", {ATTEMPT_HEADER: 2})
