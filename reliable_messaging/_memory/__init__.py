"""An in-process broker, ``memory://[name]``: a test double for services' unit tests.

It keeps the facade's contract — publish futures, handler outcomes (ack, ``Retry`` with its delay,
``Reject``, the retry policy, dead letters on ``<source>.dlq`` with the same ``x-rm-*`` headers),
deduplication, topology, stats, stop and ``BaseException`` semantics — and passes the same
backend contract suite as Kafka and RabbitMQ, with no broker and no network, so a service's unit
tests can run its real consumers in milliseconds::

    with reliable_messaging.connect("memory://") as broker:
        broker.consumer("orders", handle).start()
        broker.publish("orders", b'{"order": 1}').result()

What it is not: durable (a process that dies loses everything) or a model of any broker's failure
modes — partitions, redeliveries after a crash, consumer groups (consumers of a source share its
messages, as RabbitMQ's do; ``group`` is accepted and ignored). The library's own integration tests
use real brokers only.

Brokers connected to the same ``memory://<name>`` in one process share the messages (two services
in one test); different names are separate.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .._broker import Broker, Consumer, Guarantee
from .._dedup import DedupStore
from .._dispatch import Concurrency
from .._errors import ClosedError, ConfigurationError, InvalidMessage, Unroutable
from .._handling import MessageIdKey
from .._message import Delivery, DeliveryFuture, OutgoingHeaders, new_message_id
from .._retry import RetryPolicy
from .._stats import FailureCounts, PublisherStats
from ._consumer import MemoryConsumer, dead_letter_queue
from ._server import MemoryServer, Stored, server

__all__ = ["MemoryBroker", "MemoryConsumer", "MemoryServer"]


class MemoryBroker(Broker):
    """The in-process backend (``memory://[name]``). It takes no settings."""

    schemes = ("memory",)

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        if self.settings:
            raise ConfigurationError(f"unknown setting {next(iter(self.settings))!r}: the memory backend takes "
                                     f"none", field=next(iter(self.settings)))
        rest = url.split("://", 1)[1]
        if "/" in rest.strip("/") or "@" in rest:
            raise ConfigurationError(f"a memory URL is memory://[name], got {url!r}", field="url")
        self.server = server(rest.strip("/") or "default")
        self._auto_ack = self.guarantee is Guarantee.AT_MOST_ONCE
        if self.dedup is not None and self._auto_ack:
            raise ConfigurationError("dedup with at-most-once: messages are gone before the handler runs",
                                     field="dedup")
        self._published = 0
        self._confirmed = 0
        self._failures = FailureCounts()
        self._count_lock = threading.Lock()

    def _publish(self, destination: str, body: bytes, *, key: str | bytes | None, headers: OutgoingHeaders | None,
                 message_id: str | None, content_type: str | None) -> DeliveryFuture:
        data = body
        if not isinstance(destination, str) or not destination:
            raise InvalidMessage(f"destination must be a non-empty name, got {destination!r}")
        if key is not None and not isinstance(key, str | bytes):
            raise InvalidMessage(f"key must be bytes, str or None, got {type(key).__name__}")
        if message_id is None:
            message_id = new_message_id()
        elif not isinstance(message_id, str) or not message_id:
            raise InvalidMessage(f"message_id must be a non-empty str, got {message_id!r}")
        stored_headers = _headers(headers)
        if self._closed:
            raise ClosedError("the broker connection is closed")
        raw_key = key.encode("utf-8") if isinstance(key, str) else key
        future = DeliveryFuture(message_id)
        future.set_running_or_notify_cancel()
        routed = self.server.route(destination, Stored(data, raw_key, message_id, stored_headers))
        with self._count_lock:
            self._published += 1
            if routed or self._auto_ack:
                self._confirmed += 1
        if routed or self._auto_ack:  # at-most-once is not told about a message no source takes
            future.set_result(Delivery(message_id, destination, key.decode() if isinstance(key, bytes) else key))
        else:
            error = Unroutable(f"message {message_id}: no source is bound to {destination!r} for key {key!r}",
                               message_id=message_id, reply_code=312, reply_text="NO_ROUTE", exchange=destination,
                               routing_key=key.decode() if isinstance(key, bytes) else (key or ""))
            self._failures.add(error)
            future.set_exception(error)
        return future

    def flush(self, timeout: float = 30.0) -> bool:
        return True  # every future is resolved before publish() returns

    def _publisher_stats(self) -> PublisherStats:
        failures = self._failures.snapshot()
        with self._count_lock:
            return PublisherStats(published=self._published, confirmed=self._confirmed,
                                  failed=sum(failures.values()), failures=failures)

    def _close_publisher(self, timeout: float) -> None:
        """Nothing to settle."""

    def _consumer(self, source: str, handler: Callable[[Any], Any], *, group: str | None, retry: RetryPolicy,
                  decoder: Callable[[bytes], Any] | None, dedup: DedupStore | None,
                  dedup_key: Callable[[Any], str] | None, loop: asyncio.AbstractEventLoop | None,
                  concurrency: Concurrency) -> Consumer:
        if dedup is not None and self._auto_ack:
            raise ConfigurationError("dedup with at-most-once: messages are gone before the handler runs",
                                     field="dedup")
        return MemoryConsumer(self.server, source, handler, retry=retry, decoder=decoder, dedup=dedup,
                              dedup_key=dedup_key or MessageIdKey(f"{source}/"), loop=loop, auto_ack=self._auto_ack,
                              concurrency=concurrency)

    def dead_letter_source(self, source: str) -> str:
        return dead_letter_queue(source)

    def declare(self, destination: str | None = None, *, source: str | None = None, pattern: str = "#",
                timeout: float = 30.0) -> None:
        if destination is None and source is None:
            raise ConfigurationError("name a destination and/or a source to declare", field="destination")
        if destination is not None:
            self.server.declare_destination(destination)
        if source is not None:
            self.server.declare_source(source, destination or source, pattern)
            self.server.declare_source(dead_letter_queue(source))

    def delete(self, destination: str | None = None, *, source: str | None = None, timeout: float = 30.0) -> None:
        if destination is None and source is None:
            raise ConfigurationError("name a destination and/or a source to delete", field="destination")
        if source is not None:
            self.server.delete_source(source)
            self.server.delete_source(dead_letter_queue(source))
        if destination is not None:
            self.server.delete_destination(destination)

    def ping(self, timeout: float = 5.0) -> bool:
        return not self._closed

    def _describe(self) -> str:
        return f"server={self.server.name!r} ack={'auto' if self._auto_ack else 'manual'}"


def _headers(headers: OutgoingHeaders | None) -> dict[str, Any]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidMessage(f"headers must be a mapping of str to str/bytes, got {type(headers).__name__}")
    out: dict[str, Any] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise InvalidMessage(f"header names must be non-empty str, got {name!r}")
        if value is not None and not isinstance(value, str | bytes | int | float | bool):
            raise InvalidMessage(f"header {name!r} must be str, bytes, int, float, bool or None, got "
                                 f"{type(value).__name__}")
        out[name] = value
    return out
