"""RabbitMQ messages: the delivered :class:`RabbitMQMessage`, attempt counting, header checks.

Attempt counting, one number whichever path a message took back to the queue:

- ``x-rm-attempt`` (the library's header): set on the copy the consumer republishes
  to a TTL retry queue; absent means attempt 1.
- ``x-delivery-count`` (quorum queues): how many times the broker got the message
  back (nack/reject with requeue, consumer cancelled, channel closed while unacked).
- ``x-death`` entries for *this* queue with reason ``rejected``: the classic
  "reject to a DLX that routes into a wait queue whose TTL dead-letters back" loop
  some topologies use without the library's header.

Each counts a different event, so they add up without double counting:
``attempt = x-rm-attempt (or 1) + x-delivery-count + rejected-deaths-here``.
(Expiries from the retry queues appear in ``x-death`` with reason ``expired`` and
another queue name; they are not counted, the header already was.)
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pika

from .._errors import InvalidMessage
from .._message import ATTEMPT_HEADER, Message

__all__ = [
    "BROKER_HEADERS",
    "RabbitMQMessage",
    "attempt_of",
    "check_headers",
    "check_short_string",
]

BROKER_HEADERS = ("x-delivery-count",)
"""Headers the broker sets on delivery that must not travel on a republished copy (a stale
``x-delivery-count`` would be counted again)."""

_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class RabbitMQMessage(Message):
    """A delivery from a RabbitMQ queue.

    Adds to :class:`~reliable_messaging.Message`: the ``exchange`` and ``routing_key`` it was
    published with, the ``delivery_tag`` (valid only on the channel that delivered it), the
    ``queue`` it was consumed from, and the AMQP properties applications use most.
    ``key`` is the routing key as bytes; ``redelivered`` is the broker's flag: the message
    may have been delivered before (a consumer died or returned it without an ack).
    """

    exchange: str = ""
    routing_key: str = ""
    delivery_tag: int = 0
    queue: str = ""
    content_type: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    timestamp: int | None = None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, bytes | str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def attempt_of(headers: Mapping[str, Any] | None, queue: str) -> int:
    """The 1-based attempt number of a delivery from ``queue`` (see the module docstring)."""
    if not headers:
        return 1
    own = _int(headers.get(ATTEMPT_HEADER))
    attempt = own if own is not None and own >= 1 else 1
    returns = _int(headers.get("x-delivery-count"))
    if returns is not None and returns > 0:
        attempt += returns
    deaths = headers.get("x-death")
    if isinstance(deaths, list):
        for death in deaths:
            if not isinstance(death, Mapping):
                continue
            name = death.get("queue")
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            reason = death.get("reason")
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            if name == queue and reason == "rejected":
                count = _int(death.get("count"))
                attempt += count if count is not None and count > 0 else 1
    return attempt


def check_short_string(what: str, value: object, *, allow_empty: bool = True) -> str:
    """``value`` as an AMQP short string (at most 255 UTF-8 bytes), or InvalidMessage."""
    if type(value) is not str:
        raise InvalidMessage(f"{what} must be a str, got {type(value).__name__}")
    if not value and not allow_empty:
        raise InvalidMessage(f"{what} must not be empty")
    if len(value) > 63 and len(value.encode("utf-8")) > 255:
        raise InvalidMessage(f"{what} must be at most 255 UTF-8 bytes, got {len(value.encode('utf-8'))}")
    return value


def _check_value(path: str, value: Any, depth: int) -> Any:
    """``value`` as pika can encode it (tuples become lists), or InvalidMessage naming its path."""
    if depth > 32:
        raise InvalidMessage(f"header {path} nests deeper than 32 levels")
    if value is None or isinstance(value, str | bytes | bool | decimal.Decimal | datetime.datetime):
        return value
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise InvalidMessage(f"header {path}={value} does not fit AMQP's signed 64-bit integer")
        return value
    if isinstance(value, float):
        raise InvalidMessage(
            f"header {path}={value!r}: pika cannot encode floats in AMQP field tables; "
            "send a str or a decimal.Decimal instead")
    if isinstance(value, Mapping):
        table: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is not str:
                raise InvalidMessage(f"header {path} has a non-str key {key!r}")
            check_short_string(f"header {path} key {key[:40]!r}", key)
            table[key] = _check_value(f"{path}.{key}", item, depth + 1)
        return table
    if isinstance(value, list | tuple):
        return [_check_value(f"{path}[{index}]", item, depth + 1) for index, item in enumerate(value)]
    raise InvalidMessage(
        f"header {path} has type {type(value).__name__}; AMQP headers carry str, bytes, bool, int, "
        "decimal.Decimal, datetime, None, and lists/dicts of those")


def check_headers(headers: object) -> dict[str, Any]:
    """A copy of ``headers`` that pika can encode, or InvalidMessage naming the bad entry."""
    if not isinstance(headers, Mapping):
        raise InvalidMessage(f"headers must be a mapping of str to values, got {type(headers).__name__}")
    out: dict[str, Any] = {}
    for key, value in headers.items():
        if type(key) is not str:
            raise InvalidMessage(f"header names must be str, got {key!r}")
        check_short_string(f"header name {key[:40]!r}", key)
        out[key] = _check_value(key, value, 0)
    return out


def message_from_delivery(
    method: pika.spec.Basic.Deliver,
    properties: pika.BasicProperties,
    body: bytes,
    *,
    queue: str,
    value: Any,
) -> RabbitMQMessage:
    """Build the handler's view of one ``basic.deliver``."""
    headers = properties.headers or {}
    routing_key = method.routing_key
    return RabbitMQMessage(
        body=body,
        value=value,
        message_id=properties.message_id or "",
        key=routing_key.encode("utf-8") if routing_key else None,
        headers=headers,
        redelivered=bool(method.redelivered),
        attempt=attempt_of(headers, queue),
        source=queue,
        exchange=method.exchange,
        routing_key=routing_key,
        delivery_tag=method.delivery_tag,
        queue=queue,
        content_type=properties.content_type,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        timestamp=properties.timestamp,
    )
