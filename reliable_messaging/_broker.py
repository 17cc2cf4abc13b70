"""The backend contract: what every broker behind :func:`reliable_messaging.connect` implements.

A backend is a package with one :class:`Broker` subclass, named in the facade's scheme table
(``reliable_messaging._facade``). The subclass parses its own URL, applies the guarantee presets to
its own settings, validates them (a :class:`~reliable_messaging.ConfigurationError` from its
constructor, before anything connects), and implements the abstract methods below. Everything
else — the consumer bookkeeping, closing in order, the guarantee check, stats — is here, once.

The promises every backend keeps (the contract suite, :mod:`reliable_messaging.testing.contract`,
checks them on each):

- :meth:`Broker.publish` returns a :class:`~reliable_messaging.DeliveryFuture` at once. It raises
  only for what the caller can fix at the call: invalid input
  (:class:`~reliable_messaging.InvalidMessage`), a closed broker (:class:`~reliable_messaging.ClosedError`).
  Broker trouble — unreachable, refused credentials, a nack, no route, a timeout — arrives through
  the future. It never waits on the network.
- :meth:`Broker.flush` returns a bool; :meth:`Broker.close` closes every part even if one fails.
- Consumers end a handled message the same way (ack / retry / dead letter with the same
  ``x-rm-*`` headers, :mod:`reliable_messaging._headers`), report the same
  :class:`~reliable_messaging.ConsumerStats`, and refuse the same misuse with the same errors.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import enum
import logging
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, ClassVar, Protocol

from ._dedup import DedupStore
from ._dispatch import Concurrency, is_async
from ._errors import ClosedError, ConfigurationError
from ._handling import ConsumerStats
from ._health import Health
from ._log import redact
from ._message import DeliveryFuture, OutgoingHeaders
from ._payload import CONTENT_TYPE_HEADER, PayloadDecoder, encode, payload_type, wants_message
from ._retry import RetryPolicy
from ._stats import BrokerStats, PublisherStats

__all__ = ["PRESET", "Broker", "Consumer", "Guarantee", "split_settings"]

logger = logging.getLogger("reliable_messaging")


class Guarantee(str, enum.Enum):
    """Delivery guarantee presets (see :func:`reliable_messaging.connect` for the knobs each one sets)."""

    AT_MOST_ONCE = "at-most-once"
    """Never redelivered, may be lost: no broker acknowledgement is awaited, consumers ack on receipt."""
    AT_LEAST_ONCE = "at-least-once"
    """Never lost once its future resolved; may be delivered more than once (a lost ack, a crash)."""
    EFFECTIVELY_ONCE = "effectively-once"
    """At-least-once delivery, with the handler run once per message id (a dedup store)."""


class Consumer(Protocol):
    """What ``Broker.consumer()`` returns, on every backend."""

    error: Exception | None
    """Why the consumer stopped on its own, if it did."""

    @property
    def stats(self) -> ConsumerStats: ...

    @property
    def running(self) -> bool: ...

    def health(self, *, poll_within: float = 60.0, handler_within: float | None = None) -> Health:
        """For readiness and liveness probes: live (running, its loop turned within ``poll_within`` s, no handler
        running longer than ``handler_within`` s) and ready (live and connected to the broker), with the reasons
        when not. No network call: cheap to call often (:class:`~reliable_messaging.Health`)."""

    def start(self) -> Any:
        """Start consuming in the background; returns the consumer (awaitable inside a running event loop:
        ``await consumer.start()`` waits until it consumes, without blocking the loop)."""

    def stop(self, timeout: float = 30.0) -> Any:
        """Stop: finish the handlers in progress, acknowledge/commit, close; True once closed, False if
        handlers still ran at ``timeout``. Inside a running event loop: an awaitable of that bool."""

    def run(self) -> None: ...


PRESET: Any = object()
"""The default of ``dedup=`` arguments: the broker's (or the preset's) store."""


class Broker(abc.ABC):
    """A connection to one broker, with a guarantee preset. Create it with :func:`reliable_messaging.connect`.

    Thread-safe: publish from any thread. ``close()`` stops the consumers it created, flushes and
    closes the publisher and closes the dedup store it opened.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    """The URL schemes this backend serves (its lines in the facade's scheme table)."""

    def __init__(self, url: str, *, guarantee: Guarantee, retry: RetryPolicy, dedup: DedupStore | None,
                 own_dedup: bool, name: str, settings: Mapping[str, Any], allow_weaker: bool = False) -> None:
        self.url = url
        self.guarantee = guarantee
        self.retry = retry
        self.dedup = dedup
        self.name = name
        self.settings = dict(settings)
        self.allow_weaker = allow_weaker
        self.weakened: tuple[str, ...] = ()
        """What the settings take away from the guarantee preset (empty: the preset holds as documented)."""
        self._own_dedup = own_dedup
        self._lock = threading.Lock()
        self._closed = False
        self._consumers: dict[str, Consumer] = {}
        self._sources: dict[str, tuple[str, str]] = {}
        self._tracing: Any = None  # reliable_messaging.otel.Tracing once instrument() was called

    # -- what a backend implements --------------------------------------------------------------

    @abc.abstractmethod
    def _publish(self, destination: str, body: bytes, *, key: str | bytes | None, headers: OutgoingHeaders | None,
                 message_id: str | None, content_type: str | None) -> DeliveryFuture:
        """Publish one encoded message (see :meth:`publish`)."""

    @abc.abstractmethod
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every publish so far is settled; False if some were still pending at ``timeout``."""

    @abc.abstractmethod
    def _consumer(self, source: str, handler: Callable[[Any], Any], *, group: str | None, retry: RetryPolicy,
                  decoder: Callable[[bytes], Any] | None, dedup: DedupStore | None,
                  dedup_key: Callable[[Any], str] | None, loop: asyncio.AbstractEventLoop | None,
                  concurrency: Concurrency) -> Consumer:
        """Build (not start) a consumer; the arguments are validated."""

    @abc.abstractmethod
    def declare(self, destination: str | None = None, *, source: str | None = None, pattern: str = "#",
                timeout: float = 30.0) -> None:
        """Create what publishing to ``destination`` and consuming ``source`` need, before either starts.

        ``source`` comes with its dead-letter and retry parts and, where the broker routes, is bound to
        ``destination`` (default: the destination of the same name) by ``pattern``. Idempotent; blocks
        up to ``timeout`` (it is an administrative call, not for the publishing path).
        """

    @abc.abstractmethod
    def delete(self, destination: str | None = None, *, source: str | None = None, timeout: float = 30.0) -> None:
        """Delete ``destination`` and/or ``source`` with its dead-letter and retry parts (and their messages).
        Deleting what does not exist is not an error."""

    @abc.abstractmethod
    def dead_letter_source(self, source: str) -> str:
        """Where ``source``'s dead-lettered messages end up (a topic, a queue): a source to consume."""

    @abc.abstractmethod
    def ping(self, timeout: float = 5.0) -> bool:
        """Whether the broker answers within ``timeout`` seconds (for readiness probes)."""

    @abc.abstractmethod
    def _publisher_stats(self) -> PublisherStats:
        """The publisher's counters (zeros before the first publish)."""

    @abc.abstractmethod
    def _close_publisher(self, timeout: float) -> None:
        """Settle pending publishes (up to ``timeout``) and close the publisher, if one was made."""

    def _describe(self) -> str:
        """The knobs that decide the guarantee, for the repr."""
        return ""

    # -- the same for every backend -------------------------------------------------------------

    def publish(self, destination: str, body: object, *, key: str | bytes | None = None,
                headers: OutgoingHeaders | None = None, message_id: str | None = None) -> DeliveryFuture:
        """Publish one message; the future resolves when the broker took responsibility for it (per the
        guarantee: at-most-once futures resolve without a broker acknowledgement). Never blocks on the
        network; raises only for invalid input (:class:`~reliable_messaging.InvalidMessage`) or a closed
        broker.

        ``body``: bytes (or str, sent as UTF-8), or a value sent as JSON with ``content-type:
        application/json`` — a pydantic model, a msgspec Struct, a dataclass, a dict, list or number
        (:mod:`reliable_messaging._payload`).
        """
        if body.__class__ is bytes and self._tracing is None:  # the common case, one call deep
            return self._publish(destination, body, key=key, headers=headers,
                                 message_id=message_id, content_type=None)
        if self._tracing is not None:
            return self._tracing.publish(  # type: ignore[no-any-return]
                destination, headers, message_id,
                lambda traced: self._publish_encoded(destination, body, key, traced, message_id))
        return self._publish_encoded(destination, body, key, headers, message_id)

    def _publish_encoded(self, destination: str, body: object, key: str | bytes | None,
                         headers: OutgoingHeaders | None, message_id: str | None) -> DeliveryFuture:
        if body.__class__ is bytes:
            return self._publish(destination, body, key=key, headers=headers,
                                 message_id=message_id, content_type=None)
        data, content_type = encode(body)
        if content_type is not None:
            headers = {**(headers or {}), CONTENT_TYPE_HEADER: content_type}
        return self._publish(destination, data, key=key, headers=headers, message_id=message_id,
                             content_type=content_type)

    def consumer(
        self,
        source: str,
        handler: Callable[[Any], Any],
        *,
        group: str | None = None,
        retry: RetryPolicy | None = None,
        decoder: Callable[[bytes], Any] | None = None,
        dedup: DedupStore | Any | None = PRESET,
        dedup_key: Callable[[Any], str] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        payload: type | None = None,
        concurrency: int = 1,
        ordering: str | None = None,
        handler_timeout: float | None = None,
        drain_timeout: float = 30.0,
    ) -> Consumer:
        """A consumer of ``source`` running ``handler`` (sync or ``async def``); call ``start()`` or ``run()``.

        ``payload`` (or the annotation of the handler's first parameter: a pydantic model, a msgspec
        Struct, a dataclass): the handler gets the body decoded and validated into that type (and the
        :class:`~reliable_messaging.Message` as a second argument if it takes one); a body that does not
        validate is dead-lettered at once, with the field errors in ``x-rm-error-message``.

        ``concurrency``: handlers running at once (``async def`` handlers as tasks on one event loop, plain
        functions on a pool of threads). ``ordering``: ``"key"`` (the default when ``concurrency > 1``) runs
        the messages of one key one at a time, in arrival order, and different keys side by side (keyless
        messages: by partition on Kafka, in any order on RabbitMQ); ``"partition"`` one partition (queue) at a
        time; ``"none"``: any order. ``handler_timeout``: a handler running longer counts as a failed attempt
        (the retry policy decides); its late result is ignored. ``drain_timeout``: how long stopping (or a
        Kafka rebalance) waits for the handlers in progress.

        ``group``: the Kafka consumer group, required there (a shared default would let two services
        split each other's messages); a RabbitMQ queue is shared by its consumers, which ignore it.
        ``retry``/``dedup`` default to the broker's. The default dedup key is
        ``<group or queue>/<message id>``, so two services sharing one store do not suppress each
        other's messages.
        """
        if not isinstance(source, str) or not source:
            raise ConfigurationError(f"source must be a non-empty topic/queue name, got {source!r}", field="source")
        if group is not None and (not isinstance(group, str) or not group):
            raise ConfigurationError(f"group must be a non-empty str, got {group!r}", field="group")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {type(retry).__name__}", field="retry")
        store = self.dedup if dedup is PRESET else dedup
        if store is not None and not isinstance(store, DedupStore):
            raise ConfigurationError(f"dedup must be a DedupStore or None, got {type(store).__name__}", field="dedup")
        if not callable(handler):
            raise ConfigurationError(f"handler must be callable, got {type(handler).__name__}", field="handler")
        mode = Concurrency.check(concurrency, ordering, handler_timeout, drain_timeout)
        typed = payload if payload is not None else payload_type(handler)
        if typed is not None:
            if decoder is not None:
                raise ConfigurationError("a consumer takes decoder= or a payload type, not both", field="decoder")
            decoder = PayloadDecoder(typed)
            handler = _payload_handler(handler)
        with self._lock:
            if self._closed:
                raise ClosedError("the broker connection is closed")
            if self._tracing is not None:
                handler = self._tracing.wrap(handler, source, retry or self.retry)
            consumer = self._consumer(source, handler, group=group, retry=retry or self.retry, decoder=decoder,
                                      dedup=store, dedup_key=dedup_key, loop=loop, concurrency=mode)
            name = f"{group}/{source}" if group and self._groups_matter() else source
            unique, n = name, 1
            while unique in self._consumers:
                n += 1
                unique = f"{name}#{n}"
            self._consumers[unique] = consumer
            self._sources[unique] = (source, group or "")
        return consumer

    def _groups_matter(self) -> bool:
        """Whether consumers are told apart by group as well as source (Kafka)."""
        return False

    def stats(self) -> BrokerStats:
        """A snapshot of the publisher's and every consumer's counters (the same fields on every backend)."""
        with self._lock:
            consumers = dict(self._consumers)
            sources = {name: self._sources[name] for name in consumers}
        return BrokerStats(publisher=self._publisher_stats(),
                           consumers={name: consumer.stats for name, consumer in consumers.items()}, sources=sources)

    def close(self, timeout: float = 30.0) -> None:
        """Stop this broker's consumers, settle pending publishes, release resources. Idempotent.

        Every part is closed even when one of them fails (the first error is raised at the end).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            consumers, self._consumers = list(self._consumers.values()), {}
        first: BaseException | None = None
        steps: list[tuple[str, Callable[[], object]]] = [
            *((f"stopping a consumer ({consumer!r})", lambda c=consumer: c.stop(timeout)) for consumer in consumers),
            ("closing the publisher", lambda: self._close_publisher(timeout)),
        ]
        if self._own_dedup and self.dedup is not None:
            steps.append(("closing the dedup store", self.dedup.close))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - the next parts are closed all the same
                logger.warning("%r: %s failed: %s: %s", self, what, type(exc).__name__, exc)
                first = first or exc
        if first is not None:
            raise first

    def _check_weakening(self, weakened: list[str]) -> None:
        """Refuse settings that break the preset's promise, unless allow_weaker; remember and log them."""
        if not weakened:
            return
        if not self.allow_weaker:
            raise ConfigurationError(
                f"guarantee={self.guarantee.value!r} does not hold with {'; '.join(weakened)}; pass "
                f"allow_weaker=True if that is meant, or choose the preset that matches", field="guarantee")
        self.weakened = tuple(weakened)
        logger.warning("reliable_messaging: guarantee %s weakened on purpose (allow_weaker=True): %s",
                       self.guarantee.value, "; ".join(weakened))

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        dedup = type(self.dedup).__name__ if self.dedup is not None else "off"
        guarantee = self.guarantee.value
        if self.weakened:
            guarantee += " (weakened: " + "; ".join(self.weakened) + ")"
        return (f"<{type(self).__name__} {redact(self.url)} guarantee={guarantee} "
                f"{self._describe()} dedup={dedup}>")


def _payload_handler(handler: Callable[..., Any]) -> Callable[[Any], Any]:
    """The handler the runner calls with a Message, calling ``handler`` with the decoded payload (and the
    Message, if it takes a second argument); an ``async def`` handler stays one."""
    both = wants_message(handler)
    if is_async(handler):
        async def call_async(message: Any) -> Any:
            return await (handler(message.value, message) if both else handler(message.value))

        return call_async
    if both:
        return lambda message: handler(message.value, message)
    return lambda message: handler(message.value)


def split_settings(settings: Mapping[str, Any], configs: Mapping[str, type[Any]],
                   fixed: frozenset[str]) -> dict[str, dict[str, Any]]:
    """Route each keyword to every config class (a dataclass) that has a field of that name."""
    routed: dict[str, dict[str, Any]] = {name: {} for name in configs}
    allowed: set[str] = set()
    for cls in configs.values():
        allowed |= {f.name for f in dataclasses.fields(cls)} - fixed
    for key, value in settings.items():
        if key not in allowed:
            raise ConfigurationError(
                f"unknown setting {key!r}; allowed: {', '.join(sorted(allowed))}", field=key
            )
        for config_name, cls in configs.items():
            if key in {f.name for f in dataclasses.fields(cls)}:
                routed[config_name][key] = value
    return routed
