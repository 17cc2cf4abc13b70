"""Exchanges, queues and bindings, declared idempotently on every (re)connection.

RabbitMQ's declarations are idempotent: declaring an existing exchange or queue
with the *same* arguments is a no-op, so the publisher and consumer re-declare
their topology after every reconnect (a durable queue declared moments before a
broker crash can be missing after the restart: measured on 3.10, a queue
declared < 1 s before a SIGKILL was lost 1 time in 3, because Mnesia writes the
record lazily). Declaring it with *different* arguments makes the broker close
the channel with ``406 PRECONDITION_FAILED - inequivalent arg 'x-...'``, which
becomes :class:`~reliable_messaging.TopologyMismatch` naming that argument.

Names used by the helpers (``<q>`` is the work queue):

- ``<q>.dlx`` (direct exchange) and ``<q>.dlq`` (queue bound to it with key ``<q>``):
  where ``basic.reject(requeue=False)``, an exceeded ``x-delivery-limit`` or an
  expired TTL sends a message. The broker adds the ``x-death`` header (queue,
  reason ``rejected | expired | maxlen | delivery_limit``, count).
- ``<q>.retry.<n>`` for n = 1 .. max_attempts - 1: a durable classic queue without
  consumers whose dead-letter target is the default exchange with routing key
  ``<q>``. A failed message is republished there with an ``expiration`` (the retry
  delay); when it expires the broker dead-letters it straight back to ``<q>``.
  One queue per attempt keeps the policy's delays within a queue alike: RabbitMQ
  only expires messages at the head of a queue, so a short delay behind a long
  one waits for it. A handler's ``Retry(delay=...)`` goes to the same per-attempt
  queue, so a custom delay shorter than a message ahead of it is stretched to
  that message's expiry (measured: a 0.5 s retry waited ~1 s behind a 1.0 s one);
  a longer one holds back the messages behind it for its own delay.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pika
import pika.exceptions

from .._errors import ConfigurationError
from ._errors import map_pika_error

__all__ = [
    "RabbitMQBinding",
    "RabbitMQExchange",
    "RabbitMQExchangeType",
    "RabbitMQQueue",
    "RabbitMQQueueType",
    "RabbitMQTopology",
    "dead_letter_exchange_name",
    "dead_letter_queue_name",
    "retry_queue_name",
]

logger = logging.getLogger("reliable_messaging.rabbitmq.topology")


def dead_letter_exchange_name(queue: str) -> str:
    """``<queue>.dlx``: the dead-letter exchange of ``queue`` in the helpers' topology."""
    return f"{queue}.dlx"


def dead_letter_queue_name(queue: str) -> str:
    """``<queue>.dlq``: the dead-letter queue of ``queue`` in the helpers' topology."""
    return f"{queue}.dlq"


def retry_queue_name(queue: str, attempt: int) -> str:
    """``<queue>.retry.<attempt>``: where a message waits after failing attempt number ``attempt``."""
    return f"{queue}.retry.{attempt}"


class RabbitMQExchangeType(str, enum.Enum):
    """AMQP exchange types built into RabbitMQ."""

    DIRECT = "direct"
    FANOUT = "fanout"
    TOPIC = "topic"
    HEADERS = "headers"


class RabbitMQQueueType(str, enum.Enum):
    """``x-queue-type``."""

    CLASSIC = "classic"
    """A single-node queue. Durable + persistent messages survive a broker restart."""
    QUORUM = "quorum"
    """A Raft-replicated queue: always durable, confirms once a majority has the message, keeps
    ``x-delivery-count`` and enforces ``x-delivery-limit``."""


def _check_name(kind: str, name: object, *, allow_empty: bool = False) -> str:
    if not isinstance(name, str):
        raise ConfigurationError(f"{kind} name must be a str, got {name!r}", field="name")
    if not name and not allow_empty:
        raise ConfigurationError(f"{kind} name must not be empty", field="name")
    if len(name.encode("utf-8")) > 255:
        raise ConfigurationError(f"{kind} name must be at most 255 bytes, got {len(name.encode())}", field="name")
    if name.startswith("amq."):
        raise ConfigurationError(f"{kind} name {name!r} uses the prefix 'amq.', which RabbitMQ reserves "
                                 "(declaring it is refused with 403 ACCESS_REFUSED)", field="name")
    return name


def _frozen(arguments: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(arguments or {}))


@dataclass(frozen=True, kw_only=True)
class RabbitMQExchange:
    """An exchange to declare (durable by default, so it survives a broker restart)."""

    name: str
    type: RabbitMQExchangeType = RabbitMQExchangeType.DIRECT
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name("exchange", self.name)
        try:
            object.__setattr__(self, "type", RabbitMQExchangeType(self.type))
        except ValueError as exc:
            allowed = ", ".join(repr(t.value) for t in RabbitMQExchangeType)
            raise ConfigurationError(f"exchange type must be one of {allowed}, got {self.type!r}",
                                     field="type") from exc
        object.__setattr__(self, "arguments", _frozen(self.arguments))


@dataclass(frozen=True, kw_only=True)
class RabbitMQQueue:
    """A queue to declare, with the x-arguments RabbitMQ understands spelled as fields.

    - ``dead_letter_exchange``/``dead_letter_routing_key``: ``x-dead-letter-exchange``/``-routing-key``.
    - ``delivery_limit``: ``x-delivery-limit`` (quorum only): after the message was returned to the
      queue this many times (nack/reject with requeue, consumer cancelled or channel closed while it
      was unacknowledged) the next return dead-letters it with reason ``delivery_limit``; so it is
      delivered at most ``delivery_limit + 1`` times.
    - ``message_ttl`` (seconds): ``x-message-ttl``; expired messages are dead-lettered (``expired``).
    - ``max_length`` + ``overflow``: ``x-max-length`` and ``x-overflow`` (``drop-head`` default,
      ``reject-publish``: the broker nacks publishes to a full queue, ``reject-publish-dlx``).
    - ``arguments``: any other x-argument, passed as is.
    """

    name: str
    type: RabbitMQQueueType = RabbitMQQueueType.CLASSIC
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    delivery_limit: int | None = None
    message_ttl: float | None = None
    max_length: int | None = None
    overflow: str | None = None
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name("queue", self.name)
        try:
            object.__setattr__(self, "type", RabbitMQQueueType(self.type))
        except ValueError as exc:
            allowed = ", ".join(repr(t.value) for t in RabbitMQQueueType)
            raise ConfigurationError(f"queue type must be one of {allowed}, got {self.type!r}",
                                     field="type") from exc
        if self.type is RabbitMQQueueType.QUORUM and (not self.durable or self.exclusive or self.auto_delete):
            raise ConfigurationError(
                f"quorum queue {self.name!r} must be durable, not exclusive and not auto-delete "
                "(RabbitMQ refuses the declaration otherwise)", field="type")
        if self.delivery_limit is not None:
            if not isinstance(self.delivery_limit, int) or isinstance(self.delivery_limit, bool) \
                    or self.delivery_limit < 0:
                raise ConfigurationError(f"delivery_limit must be an int >= 0, got {self.delivery_limit!r}",
                                         field="delivery_limit")
            if self.type is not RabbitMQQueueType.QUORUM:
                raise ConfigurationError(
                    f"delivery_limit needs type=QUORUM: classic queues keep no delivery count and ignore "
                    f"x-delivery-limit (queue {self.name!r})", field="delivery_limit")
        if self.dead_letter_routing_key is not None and self.dead_letter_exchange is None:
            raise ConfigurationError("dead_letter_routing_key needs dead_letter_exchange", field="dead_letter_exchange")
        if self.dead_letter_exchange is not None:
            _check_name("dead-letter exchange", self.dead_letter_exchange, allow_empty=True)
        if self.message_ttl is not None and (not isinstance(self.message_ttl, int | float) or self.message_ttl < 0):
            raise ConfigurationError(f"message_ttl must be a number of seconds >= 0, got {self.message_ttl!r}",
                                     field="message_ttl")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 0):
            raise ConfigurationError(f"max_length must be an int >= 0, got {self.max_length!r}", field="max_length")
        allowed_overflow = ("drop-head", "reject-publish", "reject-publish-dlx")
        if self.overflow is not None and self.overflow not in allowed_overflow:
            raise ConfigurationError(f"overflow must be one of {allowed_overflow}, got {self.overflow!r}",
                                     field="overflow")
        object.__setattr__(self, "arguments", _frozen(self.arguments))

    def declare_arguments(self) -> dict[str, Any]:
        """The ``queue.declare`` arguments table for this queue."""
        args: dict[str, Any] = {}
        if self.type is RabbitMQQueueType.QUORUM:
            args["x-queue-type"] = "quorum"
        if self.dead_letter_exchange is not None:
            args["x-dead-letter-exchange"] = self.dead_letter_exchange
        if self.dead_letter_routing_key is not None:
            args["x-dead-letter-routing-key"] = self.dead_letter_routing_key
        if self.delivery_limit is not None:
            args["x-delivery-limit"] = self.delivery_limit
        if self.message_ttl is not None:
            args["x-message-ttl"] = round(self.message_ttl * 1000)
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
        if self.overflow is not None:
            args["x-overflow"] = self.overflow
        args.update(self.arguments)
        return args


@dataclass(frozen=True, kw_only=True)
class RabbitMQBinding:
    """Bind ``queue`` to ``exchange`` with ``routing_key``."""

    queue: str
    exchange: str
    routing_key: str = ""
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name("queue", self.queue)
        _check_name("exchange", self.exchange)
        if not isinstance(self.routing_key, str) or len(self.routing_key.encode()) > 255:
            raise ConfigurationError(f"routing_key must be a str of at most 255 bytes, got {self.routing_key!r}",
                                     field="routing_key")
        object.__setattr__(self, "arguments", _frozen(self.arguments))


@dataclass(frozen=True)
class RabbitMQTopology:
    """Exchanges, queues and bindings declared together, in that order.

    Combine topologies with ``+``. :meth:`work_queue` builds the usual shape (work
    exchange and queue, DLX and DLQ); :meth:`retry_queues` the TTL retry queues of
    the consumer's ``DELAYED`` retry mode (the consumer declares those itself).
    """

    exchanges: tuple[RabbitMQExchange, ...] = ()
    queues: tuple[RabbitMQQueue, ...] = ()
    bindings: tuple[RabbitMQBinding, ...] = ()

    def __post_init__(self) -> None:
        for attr, kind in (("exchanges", RabbitMQExchange), ("queues", RabbitMQQueue), ("bindings", RabbitMQBinding)):
            items = tuple(getattr(self, attr))
            for item in items:
                if not isinstance(item, kind):
                    raise ConfigurationError(f"RabbitMQTopology.{attr} must hold {kind.__name__} objects, got "
                                             f"{item!r}", field=attr)
            object.__setattr__(self, attr, items)

    def __add__(self, other: RabbitMQTopology) -> RabbitMQTopology:
        if not isinstance(other, RabbitMQTopology):
            return NotImplemented
        return RabbitMQTopology(
            exchanges=_unique(self.exchanges + other.exchanges, lambda e: e.name),
            queues=_unique(self.queues + other.queues, lambda q: q.name),
            bindings=_unique(self.bindings + other.bindings, lambda b: (b.queue, b.exchange, b.routing_key)),
        )

    def queue(self, name: str) -> RabbitMQQueue | None:
        """The declaration of queue ``name``, if this topology has one."""
        return next((q for q in self.queues if q.name == name), None)

    @classmethod
    def work_queue(
        cls,
        name: str,
        *,
        exchange: str | None = None,
        exchange_type: RabbitMQExchangeType = RabbitMQExchangeType.DIRECT,
        routing_key: str | None = None,
        type: RabbitMQQueueType = RabbitMQQueueType.CLASSIC,
        delivery_limit: int | None = None,
        dead_letter: bool = True,
        max_length: int | None = None,
        overflow: str | None = None,
        arguments: Mapping[str, Any] | None = None,
    ) -> RabbitMQTopology:
        """A durable work queue ``name`` bound to a durable exchange, with its DLX and DLQ.

        - exchange ``exchange`` (default ``name``), bound with ``routing_key`` (default ``name``);
        - queue ``name`` (classic or quorum) dead-lettering to ``<name>.dlx`` with key ``name``;
        - exchange ``<name>.dlx`` and queue ``<name>.dlq`` bound to it with key ``name``.
        """
        exchange = name if exchange is None else exchange
        key = name if routing_key is None else routing_key
        dlx = dead_letter_exchange_name(name)
        work = RabbitMQQueue(
            name=name, type=type, delivery_limit=delivery_limit, max_length=max_length, overflow=overflow,
            dead_letter_exchange=dlx if dead_letter else None, dead_letter_routing_key=name if dead_letter else None,
            arguments=arguments or {},
        )
        exchanges = [RabbitMQExchange(name=exchange, type=exchange_type)]
        queues = [work]
        bindings = [RabbitMQBinding(queue=name, exchange=exchange, routing_key=key)]
        if dead_letter:
            exchanges.append(RabbitMQExchange(name=dlx, type=RabbitMQExchangeType.DIRECT))
            queues.append(RabbitMQQueue(name=dead_letter_queue_name(name)))
            bindings.append(RabbitMQBinding(queue=dead_letter_queue_name(name), exchange=dlx, routing_key=name))
        return cls(tuple(exchanges), tuple(queues), tuple(bindings))

    @classmethod
    def retry_queues(cls, queue: str, max_attempts: int) -> RabbitMQTopology:
        """``<queue>.retry.1`` .. ``<queue>.retry.<max_attempts - 1>`` (at least one), dead-lettering to ``queue``.

        They carry no ``x-message-ttl``: each retried message carries its own ``expiration``
        (the policy's delay for that attempt), so changing the retry policy never makes the
        re-declaration fail with PRECONDITION_FAILED.
        """
        queues = tuple(
            RabbitMQQueue(name=retry_queue_name(queue, n), dead_letter_exchange="", dead_letter_routing_key=queue)
            for n in range(1, max(2, max_attempts))
        )
        return cls(queues=queues)

    # -- declaring ---------------------------------------------------------------------------------

    def steps(self) -> list[tuple[str, str, Callable[[Any, Callable[[Any], None]], None]]]:
        """The declarations as ``(kind, name, start(channel, on_ok))`` steps for an asynchronous channel."""
        return [(kind, name, functools.partial(_declare_async, item)) for kind, name, item in self._items()]

    def _items(self) -> list[tuple[str, str, RabbitMQExchange | RabbitMQQueue | RabbitMQBinding]]:
        items: list[tuple[str, str, RabbitMQExchange | RabbitMQQueue | RabbitMQBinding]] = []
        items += [("exchange", ex.name, ex) for ex in self.exchanges]
        items += [("queue", q.name, q) for q in self.queues]
        items += [("binding", f"{b.queue}<-{b.exchange}", b) for b in self.bindings]
        return items

    def declare(self, url: str, *, timeout: float = 30.0, connection_name: str | None = None) -> None:
        """Declare everything on the broker at ``url`` (a short-lived blocking connection).

        Raises :class:`~reliable_messaging.TopologyMismatch` when something exists with other
        arguments, :class:`~reliable_messaging.ConfigurationError` for refused names/permissions,
        :class:`~reliable_messaging.BrokerUnavailable` when the broker cannot be reached.
        """
        with _blocking_channel(url, timeout, connection_name, "declare topology") as channel:
            for kind, name, item in self._items():
                try:
                    _declare_blocking(item, channel)
                except pika.exceptions.AMQPError as exc:
                    raise map_pika_error(exc, what=f"declaring {kind} {name!r}", name=name) from exc

    def delete(self, url: str, *, timeout: float = 30.0, connection_name: str | None = None) -> None:
        """Delete this topology's queues (with their messages), then its exchanges; bindings go with them.
        What does not exist is skipped (RabbitMQ answers delete-ok)."""
        with _blocking_channel(url, timeout, connection_name, "delete topology") as channel:
            for kind, items in (("queue", self.queues), ("exchange", self.exchanges)):
                for item in items:
                    try:
                        if kind == "queue":
                            channel.queue_delete(item.name)
                        else:
                            channel.exchange_delete(item.name)
                    except pika.exceptions.AMQPError as exc:
                        raise map_pika_error(exc, what=f"deleting {kind} {item.name!r}", name=item.name) from exc


@contextlib.contextmanager
def _blocking_channel(url: str, timeout: float, connection_name: str | None, what: str) -> Iterator[Any]:
    """A channel on a short-lived BlockingConnection, every wait bounded by ``timeout``."""
    from ._config import _check_url

    params = pika.URLParameters(_check_url(url))
    params.connection_attempts = 1
    params.socket_timeout = min(timeout, 10.0)
    params.stack_timeout = timeout
    params.blocked_connection_timeout = timeout
    params.client_properties = {"connection_name": connection_name or "reliable-messaging topology"}
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as exc:
        raise map_pika_error(exc, what=f"connecting to {what}") from exc
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            try:
                connection.close()
            except pika.exceptions.AMQPError as exc:
                logger.debug("closing the topology connection failed: %s", exc, exc_info=True)


def _declare_async(item: RabbitMQExchange | RabbitMQQueue | RabbitMQBinding, channel: Any,
                   on_ok: Callable[[Any], None]) -> None:
    """Start one declaration on an asynchronous (SelectConnection) channel; ``on_ok`` gets the -ok frame."""
    _declare_blocking(item, channel, callback=on_ok)


def _declare_blocking(item: RabbitMQExchange | RabbitMQQueue | RabbitMQBinding, channel: Any,
                      **callback: Any) -> None:
    """One declaration; on a BlockingChannel it returns after the -ok (or raises ChannelClosedByBroker)."""
    if isinstance(item, RabbitMQExchange):
        channel.exchange_declare(item.name, item.type.value, durable=item.durable, auto_delete=item.auto_delete,
                                 internal=item.internal, arguments=dict(item.arguments) or None, **callback)
    elif isinstance(item, RabbitMQQueue):
        channel.queue_declare(item.name, durable=item.durable, exclusive=item.exclusive,
                              auto_delete=item.auto_delete, arguments=item.declare_arguments() or None, **callback)
    else:
        channel.queue_bind(item.queue, item.exchange, routing_key=item.routing_key,
                           arguments=dict(item.arguments) or None, **callback)


def _unique(items: tuple[Any, ...], key: Callable[[Any], Any]) -> tuple[Any, ...]:
    seen: dict[Any, Any] = {}
    for item in items:
        existing = seen.setdefault(key(item), item)
        if existing != item:
            raise ConfigurationError(f"conflicting declarations for {key(item)!r}: {existing!r} and {item!r}",
                                     field="topology")
    return tuple(seen.values())
