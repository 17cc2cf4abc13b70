"""One facade over every broker: ``reliable_messaging.connect(url)``.

The URL's scheme picks the backend (:data:`BACKENDS`); the broker object it returns has the same
methods on each (:class:`~reliable_messaging.Broker`, the contract in :mod:`._broker`):

- ``publish(destination, body, *, key=None, headers=None, message_id=None)`` returns a
  :class:`~reliable_messaging.DeliveryFuture` (``concurrent.futures`` and ``await``);
- ``consumer(source, handler, ...)`` returns a consumer (``start()``, ``stop()``, ``run()``,
  ``stats``) whose handler gets a :class:`~reliable_messaging.Message` and decides by how it
  ends: return -> ack/commit; raise :class:`~reliable_messaging.Retry` -> retry (optional delay);
  raise :class:`~reliable_messaging.Reject` -> dead-letter now; any other exception -> retry
  policy, then dead-letter;
- ``declare()`` / ``delete()`` (topology), ``dead_letter_source()``, ``stats()``, ``ping()``,
  ``flush()``, ``close()``.

Guarantee presets set every knob at once; each stays overridable by keyword (any field of the
broker's producer/publisher and consumer configs). An override that breaks the preset's promise
(``acks=0`` under at-least-once, ``confirms=False``, auto-commit, ...) is refused unless
``allow_weaker=True`` says it is meant; the broker's repr and a WARNING then name what no longer holds.
What each preset sets on each broker is in the backend modules (``_kafka._broker``,
``_rabbitmq._broker``, ``_memory``).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from ._broker import PRESET, Broker, Guarantee
from ._dedup import DedupStore, SQLiteDedupStore
from ._errors import ConfigurationError
from ._log import redact
from ._retry import DEFAULT_RETRY_POLICY, RetryPolicy

__all__ = ["BACKENDS", "DEFAULT_DEDUP_PATH", "connect"]

logger = logging.getLogger("reliable_messaging")

BACKENDS: dict[str, str] = {
    "kafka": "reliable_messaging._kafka._broker:KafkaBroker",
    "amqp": "reliable_messaging._rabbitmq._broker:RabbitMQBroker",
    "amqps": "reliable_messaging._rabbitmq._broker:RabbitMQBroker",
    "memory": "reliable_messaging._memory:MemoryBroker",
}
"""URL scheme -> the :class:`~reliable_messaging.Broker` subclass serving it (imported on first use, so a
missing client library only matters for its own scheme). Adding a backend is a package and a line here."""

DEFAULT_DEDUP_PATH = "reliable_messaging_dedup.sqlite3"
"""The effectively-once preset's SQLite file, relative to the working directory: next to the
consumer, so a restarted consumer finds the ids it already processed."""

DEFAULT_NAME = "reliable-messaging"
"""Default ``name``: Kafka's client id, RabbitMQ's connection name prefix. (Never a consumer group: a
Kafka consumer names its group, so two services cannot split each other's messages by default.)"""


def backend(scheme: str) -> type[Broker]:
    """The broker class serving ``scheme`` (ImportError with the pip command if its client is missing)."""
    module, _, cls = BACKENDS[scheme].partition(":")
    found: type[Broker] = getattr(importlib.import_module(module), cls)
    return found


def connect(
    url: str,
    *,
    guarantee: Guarantee | str = Guarantee.AT_LEAST_ONCE,
    retry: RetryPolicy = DEFAULT_RETRY_POLICY,
    dedup: DedupStore | Any | None = PRESET,
    dedup_path: str | Path = DEFAULT_DEDUP_PATH,
    name: str = DEFAULT_NAME,
    allow_weaker: bool = False,
    **settings: Any,
) -> Broker:
    """Connect to the broker at ``url`` with a delivery guarantee preset.

    - ``url``: ``kafka://host:port[,host:port]``, ``amqp://user:pass@host:port/vhost``, ``amqps://...``,
      or ``memory://[name]`` (an in-process broker for services' unit tests).
    - ``guarantee``: :class:`Guarantee` or its value (``"at-least-once"``, default).
    - ``retry``: the handler retry policy of consumers made by this broker.
    - ``dedup``: the dedup store; the effectively-once preset opens a :class:`SQLiteDedupStore`
      at ``dedup_path`` (closed with the broker); pass a store (e.g. Redis) to share it.
    - ``name``: Kafka client id; RabbitMQ connection names.
    - ``allow_weaker``: accept settings that break the preset's promise (``acks=0`` or ``1``,
      ``commit_mode="auto"``, ``confirms=False``, ``mandatory=False``, ``persistent=False``,
      ``ack_mode="auto"`` under at-least-once or effectively-once); without it they raise
      :class:`ConfigurationError`. ``broker.weakened`` and the repr say what no longer holds.
    - ``settings``: overrides, by field name, of the producer/publisher and consumer configs
      (e.g. ``acks=1``, ``commit_mode="manual"``, ``prefetch=50``; RabbitMQ also ``queue_type``,
      ``delivery_limit``). An unknown name or an incompatible combination raises
      :class:`ConfigurationError` here, before anything connects.

    Nothing connects here: the publisher connects in the background on the first publish, consumers on
    ``start()``.
    """
    try:
        preset = Guarantee(guarantee)
    except ValueError:
        raise ConfigurationError(
            f"guarantee must be one of {', '.join(g.value for g in Guarantee)}, got {guarantee!r}",
            field="guarantee") from None
    if not isinstance(retry, RetryPolicy):
        raise ConfigurationError(f"retry must be a RetryPolicy, got {type(retry).__name__}", field="retry")
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"name must be a non-empty str, got {name!r}", field="name")
    if not isinstance(allow_weaker, bool):
        raise ConfigurationError(f"allow_weaker must be a bool, got {allow_weaker!r}", field="allow_weaker")
    if not isinstance(url, str):
        raise ConfigurationError(f"url must be a str, got {type(url).__name__}", field="url")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in BACKENDS:
        raise ConfigurationError(
            f"url must start with {', '.join(f'{s}://' for s in BACKENDS)}, got {redact(url)!r}", field="url")
    broker_class = backend(scheme)

    own = False
    if dedup is PRESET:
        if preset is Guarantee.EFFECTIVELY_ONCE:
            store: DedupStore | None = SQLiteDedupStore(dedup_path)
            own = True
        else:
            store = None
    elif dedup is None or isinstance(dedup, DedupStore):
        store = dedup
    else:
        raise ConfigurationError(f"dedup must be a DedupStore or None, got {type(dedup).__name__}", field="dedup")
    if preset is Guarantee.EFFECTIVELY_ONCE and store is None:
        raise ConfigurationError("effectively-once needs a dedup store (dedup=None given); "
                                 "use guarantee='at-least-once' for no deduplication", field="dedup")
    try:
        broker = broker_class(url, guarantee=preset, retry=retry, dedup=store, own_dedup=own, name=name,
                              settings=settings, allow_weaker=allow_weaker)
    except BaseException:
        if own and store is not None:
            store.close()
        raise
    logger.info("reliable_messaging: %r", broker)
    return broker
