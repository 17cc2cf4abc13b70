"""Configuration of the RabbitMQ publisher and consumer: frozen, keyword-only, validated at construction.

Every default below says why it is what it is. Invalid values and incompatible
combinations raise :class:`~reliable_messaging.ConfigurationError` naming the
field and the allowed values, before anything talks to the broker.
"""

from __future__ import annotations

import enum
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import pika

from .._errors import ConfigurationError
from .._retry import RetryPolicy

__all__ = [
    "DEFAULT_BLOCKED_TIMEOUT",
    "DEFAULT_DELIVERY_TIMEOUT",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_PREFETCH",
    "DEFAULT_RECONNECT_POLICY",
    "DEFAULT_URL",
    "RabbitMQAckMode",
    "RabbitMQConsumerConfig",
    "RabbitMQPublisherConfig",
    "RabbitMQRetryMode",
    "connection_parameters",
]

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
"""RabbitMQ's out-of-the-box address and user (``guest`` may only log in from localhost)."""

DEFAULT_MAX_IN_FLIGHT = 1000
"""Unconfirmed publishes allowed on the wire. The broker confirms persistent messages after its
fsync batch; ~1000 in flight keeps the pipe full at tens of thousands of messages/s on one
connection while bounding what must be republished after a connection loss."""

DEFAULT_DELIVERY_TIMEOUT = 120.0
"""Seconds a publish may wait for its confirm (queued, in flight, or across reconnects) before its
future fails with DeliveryTimeout. The same order as Kafka's ``delivery.timeout.ms`` (120 s): long
enough to ride out a broker restart, short enough that a caller hears about an outage."""

DEFAULT_BLOCKED_TIMEOUT = 60.0
"""Seconds to wait while the broker blocks the connection (``connection.blocked``: a memory or disk
alarm) before pending publishes fail with DeliveryTimeout. Alarms clear when consumers catch up or
an operator frees disk; a minute distinguishes a burst from an outage."""

DEFAULT_HEARTBEAT = 30
"""Seconds between AMQP heartbeats. A silently dead TCP peer is detected after two missed beats
(~60 s) instead of the kernel's keep-alive hours. The broker proposes 60; the lower value wins."""

DEFAULT_PREFETCH = 100
"""Unacknowledged deliveries the broker may push to one consumer (``basic.qos``). RabbitMQ's guidance
is 100-300: enough to hide the round trip, small enough that one slow consumer does not hoard
messages other consumers could process (and that a crash redelivers few)."""

DEFAULT_RECONNECT_POLICY = RetryPolicy(max_attempts=30, initial_delay=0.1, max_delay=3.0, multiplier=2.0,
                                       jitter=0.3)
"""Reconnect attempts per outage: 0.1 s doubling to 3 s with up to 0.3 s of jitter, 30 attempts
(about 80 s). A broker restart takes seconds; a longer outage is reported instead of hidden."""


class RabbitMQAckMode(str, enum.Enum):
    """How the consumer acknowledges deliveries."""

    MANUAL = "manual"
    """``basic.ack`` after the handler succeeded: at-least-once. A crash redelivers every
    unacknowledged message (with ``redelivered=True``)."""
    AUTO = "auto"
    """``auto_ack=True``: the broker forgets a message as soon as it is written to the socket.
    At-most-once: everything prefetched but not yet handled is lost if the process dies, and a
    failing handler cannot retry. ``basic.qos`` does not limit auto-ack consumers."""


class RabbitMQRetryMode(str, enum.Enum):
    """Where a message whose handler failed goes before its next attempt."""

    DELAYED = "delayed"
    """Republish a copy (with confirms) to the per-attempt TTL retry queue ``<queue>.retry.<n>``,
    which dead-letters it back to the work queue when its ``expiration`` passes; then ack the
    original. Non-blocking: the consumer keeps processing other messages meanwhile. Works on
    classic and quorum queues; the attempt travels in the ``x-rm-attempt`` header."""
    REQUEUE = "requeue"
    """``basic.nack(requeue=True)`` after the policy's delay (the message stays unacknowledged,
    holding a prefetch slot, meanwhile). The attempt count comes from ``x-delivery-count``, which
    only quorum queues keep: on a classic queue the attempts of a poison message cannot be counted.
    Every return counts there, including a dedup bounce (another consumer holds the claim)."""


def _check_url(url: object) -> str:
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"url must be a non-empty amqp:// or amqps:// URL, got {url!r}", field="url")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("amqp", "amqps"):
        raise ConfigurationError(f"url must start with amqp:// or amqps://, got {url!r}", field="url")
    try:
        pika.URLParameters(url)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"url {url!r} is not a valid AMQP URL: {exc}", field="url") from exc
    return url


def _positive_number(owner: str, name: str, value: object, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{owner}.{name} must be a number {bound} (seconds), got {value!r}", field=name)


def _positive_int(owner: str, name: str, value: object, *, maximum: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if ok and maximum is not None:
        ok = value <= maximum  # type: ignore[operator]
    if not ok:
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ConfigurationError(f"{owner}.{name} must be an int >= 1{upper}, got {value!r}", field=name)


def _check_common(owner: str, cfg: Any) -> None:
    _check_url(cfg.url)
    if cfg.connection_name is not None and not isinstance(cfg.connection_name, str):
        raise ConfigurationError(f"{owner}.connection_name must be a str or None, got {cfg.connection_name!r}",
                                 field="connection_name")
    if not isinstance(cfg.heartbeat, int) or isinstance(cfg.heartbeat, bool) or not 0 <= cfg.heartbeat <= 65535:
        raise ConfigurationError(
            f"{owner}.heartbeat must be an int of seconds in 0..65535 (0 disables heartbeats), got {cfg.heartbeat!r}",
            field="heartbeat",
        )
    _positive_number(owner, "connect_timeout", cfg.connect_timeout)
    if not isinstance(cfg.reconnect, RetryPolicy):
        raise ConfigurationError(f"{owner}.reconnect must be a RetryPolicy, got {cfg.reconnect!r}", field="reconnect")


@dataclass(frozen=True, kw_only=True)
class RabbitMQPublisherConfig:
    """Settings of a :class:`~reliable_messaging.RabbitMQPublisher`.

    - ``url``: ``amqp://user:password@host:port/vhost`` (vhost ``/`` is ``%2F``).
    - ``max_in_flight``: unconfirmed publishes on the wire (the confirm window).
    - ``delivery_timeout``: seconds from ``publish()`` to the broker's confirm, across reconnects.
    - ``blocked_timeout``: seconds pending publishes wait while the broker blocks the connection.
    - ``max_buffered``: publishes waiting for a window slot; ``publish()`` blocks (up to
      ``delivery_timeout``) while the buffer is full, so a caller faster than the broker slows down
      instead of exhausting memory.
    - ``persistent``/``mandatory``: defaults for each publish (delivery mode 2; basic.return on no route).
    - ``confirms``: ``confirm.select`` on the channel (default). ``False`` is at-most-once: a future
      resolves once the frame is handed to the socket, and a message the broker drops, or that a
      connection loss swallows, is not reported. ``mandatory`` needs confirms: the broker's
      basic.return is reported through the publish's future, which without confirms has resolved.
    - ``reconnect``: backoff between connection attempts during one outage (tenacity).
    """

    url: str = DEFAULT_URL
    connection_name: str | None = None
    confirms: bool = True
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT
    blocked_timeout: float = DEFAULT_BLOCKED_TIMEOUT
    max_buffered: int = 100_000
    persistent: bool = True
    mandatory: bool = True
    app_id: str | None = None
    heartbeat: int = DEFAULT_HEARTBEAT
    connect_timeout: float = 30.0
    reconnect: RetryPolicy = field(default=DEFAULT_RECONNECT_POLICY)

    def __post_init__(self) -> None:
        owner = "RabbitMQPublisherConfig"
        _check_common(owner, self)
        _positive_int(owner, "max_in_flight", self.max_in_flight, maximum=1_000_000)
        _positive_int(owner, "max_buffered", self.max_buffered)
        _positive_number(owner, "delivery_timeout", self.delivery_timeout)
        _positive_number(owner, "blocked_timeout", self.blocked_timeout)
        for name in ("confirms", "persistent", "mandatory"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"{owner}.{name} must be True or False, got {getattr(self, name)!r}",
                                         field=name)
        if self.mandatory and not self.confirms:
            raise ConfigurationError(
                f"{owner}.mandatory=True needs confirms=True: an unroutable message is reported through its "
                "future, and without confirms the future resolves before the broker could answer",
                field="mandatory")
        if self.app_id is not None and (not isinstance(self.app_id, str) or len(self.app_id.encode()) > 255):
            raise ConfigurationError(f"{owner}.app_id must be a str of at most 255 bytes or None, got "
                                     f"{self.app_id!r}", field="app_id")


@dataclass(frozen=True, kw_only=True)
class RabbitMQConsumerConfig:
    """Settings of a :class:`~reliable_messaging.RabbitMQConsumer`.

    - ``prefetch``: ``basic.qos`` prefetch count (ignored by the broker in ``AUTO`` ack mode).
    - ``ack_mode``: ``MANUAL`` (at-least-once, default) or ``AUTO`` (at-most-once).
    - ``batch_size`` > 1: the handler receives a ``list`` of up to that many messages, collected for
      at most ``batch_timeout`` seconds; a successful batch is acknowledged with one
      ``basic.ack(multiple=True)``.
    - ``consumer_tag``: the broker generates one when ``None``.
    - ``exclusive``: ask for exclusive consumer access to the queue.
    """

    url: str = DEFAULT_URL
    connection_name: str | None = None
    prefetch: int = DEFAULT_PREFETCH
    ack_mode: RabbitMQAckMode = RabbitMQAckMode.MANUAL
    batch_size: int = 1
    batch_timeout: float = 0.2
    consumer_tag: str | None = None
    exclusive: bool = False
    heartbeat: int = DEFAULT_HEARTBEAT
    connect_timeout: float = 30.0
    reconnect: RetryPolicy = field(default=DEFAULT_RECONNECT_POLICY)

    def __post_init__(self) -> None:
        owner = "RabbitMQConsumerConfig"
        _check_common(owner, self)
        _positive_int(owner, "prefetch", self.prefetch, maximum=65535)
        try:
            object.__setattr__(self, "ack_mode", RabbitMQAckMode(self.ack_mode))
        except ValueError as exc:
            allowed = ", ".join(repr(m.value) for m in RabbitMQAckMode)
            raise ConfigurationError(f"{owner}.ack_mode must be one of {allowed}, got {self.ack_mode!r}",
                                     field="ack_mode") from exc
        _positive_int(owner, "batch_size", self.batch_size, maximum=65535)
        _positive_number(owner, "batch_timeout", self.batch_timeout)
        if self.ack_mode is RabbitMQAckMode.MANUAL and self.batch_size > self.prefetch:
            raise ConfigurationError(
                f"{owner}.batch_size ({self.batch_size}) must be <= prefetch ({self.prefetch}): the broker never "
                "has more than prefetch unacknowledged deliveries in flight, so a larger batch could never fill",
                field="batch_size",
            )
        if self.consumer_tag is not None and (not isinstance(self.consumer_tag, str) or not self.consumer_tag):
            raise ConfigurationError(f"{owner}.consumer_tag must be a non-empty str or None, got "
                                     f"{self.consumer_tag!r}", field="consumer_tag")
        if not isinstance(self.exclusive, bool):
            raise ConfigurationError(f"{owner}.exclusive must be True or False, got {self.exclusive!r}",
                                     field="exclusive")


def connection_parameters(url: str, *, connection_name: str | None, heartbeat: int,
                          connect_timeout: float, role: str) -> pika.URLParameters:
    """pika parameters for one connection attempt; our own loop owns retries (``connection_attempts=1``)."""
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.retry_delay = 0
    params.heartbeat = heartbeat
    params.socket_timeout = min(connect_timeout, 10.0)
    params.stack_timeout = connect_timeout
    params.blocked_connection_timeout = None  # we time out blocked publishes ourselves, per message
    params.client_properties = {
        "connection_name": connection_name or f"reliable-messaging {role}",
        "product": "reliable_messaging (pika)",
    }
    return params
