"""Kafka settings: frozen, keyword-only dataclasses validated at construction.

Every field maps to one librdkafka property (named in its docstring); settings
the library does not model go in ``extra``, which may not override a modelled
one. Incompatible combinations fail here with a :class:`ConfigurationError`
naming the field and the allowed values, never later at the broker.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._errors import ConfigurationError

__all__ = [
    "DEFAULT_COMMIT_EVERY",
    "DEFAULT_COMMIT_INTERVAL",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DELIVERY_TIMEOUT",
    "DEFAULT_LINGER",
    "DEFAULT_QUEUE_FULL_TIMEOUT",
    "DEFAULT_SESSION_TIMEOUT",
    "Acks",
    "CommitMode",
    "KafkaConsumerConfig",
    "KafkaProducerConfig",
]

ConfigValue = str | int | float | bool

DEFAULT_DELIVERY_TIMEOUT = 120.0
"""Seconds librdkafka keeps retrying a message before failing it (``delivery.timeout.ms``).

Kafka's own default: long enough to ride out a leader election (the controller
needs ``broker.session.timeout.ms`` to notice a dead broker, then a new leader
is elected) and a broker restart.
"""

DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds a producer has to reach a broker for the first time before its messages fail with
BrokerUnavailable (a wrong address, a broker not started): a few connection attempts, not the
two minutes of ``delivery_timeout`` meant to ride out a leader election once connected."""

DEFAULT_LINGER = 0.005
"""Seconds the producer waits to fill a batch (``linger.ms``): librdkafka's default of 5 ms.

A few milliseconds of latency buy large batches, which is what makes
``acks=all`` throughput close to ``acks=1``.
"""

DEFAULT_QUEUE_FULL_TIMEOUT = 30.0
"""Seconds :meth:`KafkaProducer.publish` waits for room when librdkafka's local queue is full.

The queue (``queue.buffering.max.messages``, 100 000 by default) fills when the
application produces faster than the brokers acknowledge; waiting applies
back-pressure instead of failing at once.
"""

DEFAULT_COMMIT_EVERY = 10000
"""Messages: the most a crash makes a ``MANUAL_BATCH`` consumer process again.

Commits go out asynchronously, one at a time, as soon as the previous one was
answered and ``commit_every / 4`` messages were processed since; the consumer waits
for a synchronous commit only when ``commit_every`` processed messages are still
unacknowledged. So about ``3/4 commit_every`` should exceed throughput x commit
round trip: measured here, an offset commit takes ~6 ms (p90 ~12 ms) and the
consumer handles up to ~340 000 records/s with a trivial handler, i.e. ~2 000-4 000
records per round trip. With 5 000 the consumer still waited for a synchronous
commit every ~15 000 records (280-320k records/s); 10 000 keeps commits asynchronous
at that rate (~340k/s) and bounds a crash's repeats to a fraction of a second of work.
"""

DEFAULT_COMMIT_INTERVAL = 5.0
"""Seconds between commits when few messages arrive (and ``auto.commit.interval.ms``): Kafka's default."""

DEFAULT_SESSION_TIMEOUT = 45.0
"""Seconds without heartbeats before the coordinator evicts a consumer (``session.timeout.ms``): Kafka's default."""


class Acks(str, enum.Enum):
    """How many replicas must have a message before the broker answers the producer (``acks``).

    - ``ZERO``: the broker sends no answer; the delivery future resolves once the
      message was written to the socket, with ``offset=None``. Messages can be lost silently.
    - ``ONE``: the partition leader answers once it appended the message to its log;
      the message is lost if the leader dies before a follower copied it.
    - ``ALL``: the leader answers once every in-sync replica has it, and refuses
      the write (``NOT_ENOUGH_REPLICAS``) when fewer than ``min.insync.replicas``
      are in sync. The only level that survives losing the leader.
    """

    ZERO = "0"
    ONE = "1"
    ALL = "all"

    @classmethod
    def parse(cls, value: object) -> Acks:
        """Accept ``Acks``, ``0``, ``1``, ``"all"`` and ``-1`` (Kafka's spelling of ``"all"``)."""
        if isinstance(value, Acks):
            return value
        if isinstance(value, bool):  # True == 1 in Python: refuse rather than guess
            raise _acks_error(value)
        if isinstance(value, int | str):
            text = str(value).strip().lower()
            if text in ("all", "-1"):
                return cls.ALL
            if text == "0":
                return cls.ZERO
            if text == "1":
                return cls.ONE
        raise _acks_error(value)


def _acks_error(value: object) -> ConfigurationError:
    return ConfigurationError(f"acks must be 0, 1 or 'all' (-1 means 'all'), got {value!r}", field="acks")


class CommitMode(str, enum.Enum):
    """When a consumer commits its offsets, and therefore what a crash costs.

    - ``AUTO``: librdkafka stores each offset when it hands the message to the
      application (before the handler runs) and commits in the background every
      ``commit_interval``. A crash can **lose** messages (committed, never
      processed) and **repeat** messages (processed, not yet committed).
      No dedup store can repair the loss, so ``AUTO`` with dedup is refused.
    - ``BEFORE``: at-most-once. The offsets of each fetched batch are committed
      synchronously before any of its records is handled, so a crash never
      repeats a record: it loses those fetched and not yet handled (at most the
      fetch size). A graceful stop or revoke commits back to the first record
      not handled, which the next owner reads: only a crash loses.
    - ``MANUAL``: a synchronous commit after every message. A crash repeats at
      most one message; throughput is bounded by the commit round trip.
    - ``MANUAL_BATCH``: asynchronous commits of the processed offsets, at most
      ``commit_every`` processed messages apart (or every ``commit_interval``),
      synchronous on revoke and on close. A crash repeats at most
      ``commit_every`` messages.
    - ``STORE_OFFSETS``: ``enable.auto.offset.store=false``: the offset is stored
      after the handler finished and librdkafka commits stored offsets every
      ``commit_interval`` in the background. A crash repeats the messages
      processed since the last background commit; nothing is lost.
    """

    AUTO = "auto"
    BEFORE = "before"
    MANUAL = "manual"
    MANUAL_BATCH = "manual_batch"
    STORE_OFFSETS = "store_offsets"


_SECRET_PARTS = ("password", "secret", "pem", "jaas", "oauthbearer.config", "token", "key.location")


def _repr_hiding_secrets(config: Any) -> str:
    """The dataclass repr with ``extra``'s secret values (SASL/SSL passwords, keys, tokens) as ``***``."""
    shown = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config) if f.repr]
    extra = {key: "***" if any(part in key for part in _SECRET_PARTS) else value
             for key, value in config.extra.items()}
    return f"{type(config).__name__}({', '.join([*shown, f'extra={extra!r}'])})"


def _positive(owner: str, name: str, value: object, *, allow_zero: bool = False) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if number and (value > 0 or (allow_zero and value == 0)):  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    bound = ">= 0" if allow_zero else "> 0"
    raise ConfigurationError(f"{owner}.{name} must be a number of seconds {bound}, got {value!r}", field=name)


def _text(owner: str, name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{owner}.{name} must be a non-empty string, got {value!r}", field=name)
    return value


def _extra(owner: str, extra: Mapping[str, ConfigValue], managed: Mapping[str, str]) -> Mapping[str, ConfigValue]:
    if not isinstance(extra, Mapping):
        raise ConfigurationError(f"{owner}.extra must be a mapping of librdkafka properties", field="extra")
    for key, value in extra.items():
        if not isinstance(key, str):
            raise ConfigurationError(f"{owner}.extra keys must be librdkafka property names, got {key!r}",
                                     field="extra")
        if key in managed:
            raise ConfigurationError(
                f"{owner}.extra may not set {key!r}: use the {managed[key]!r} field instead", field=managed[key]
            )
        if callable(value) or not isinstance(value, str | int | float | bool):
            raise ConfigurationError(
                f"{owner}.extra[{key!r}] must be a str, int, float or bool, got {type(value).__name__} "
                "(callbacks are owned by the library)", field="extra",
            )
    return types.MappingProxyType(dict(extra))


_CALLBACK_KEYS = ("error_cb", "throttle_cb", "stats_cb", "on_delivery", "on_commit", "logger", "oauth_cb")

_PRODUCER_MANAGED: Mapping[str, str] = {
    "bootstrap.servers": "bootstrap_servers",
    "acks": "acks",
    "request.required.acks": "acks",
    "enable.idempotence": "enable_idempotence",
    "max.in.flight.requests.per.connection": "max_in_flight",
    "max.in.flight": "max_in_flight",
    "delivery.timeout.ms": "delivery_timeout",
    "message.timeout.ms": "delivery_timeout",
    "linger.ms": "linger",
    "queue.buffering.max.ms": "linger",
    "compression.type": "compression",
    "compression.codec": "compression",
    "retries": "retries",
    "message.send.max.retries": "retries",
    "client.id": "client_id",
    **{key: "extra" for key in _CALLBACK_KEYS},
}

COMPRESSION_TYPES = ("none", "gzip", "snappy", "lz4", "zstd")


@dataclass(frozen=True, kw_only=True)
class KafkaProducerConfig:
    """Settings of a :class:`~reliable_messaging.KafkaProducer`.

    Defaults are the safe ones: ``acks="all"`` with idempotence, so a message is
    acknowledged only once every in-sync replica has it, and librdkafka's
    retries after a leader change can neither duplicate nor reorder it.
    """

    bootstrap_servers: str
    """``bootstrap.servers``: ``host:port[,host:port...]``."""
    acks: Acks | int | str = Acks.ALL
    """``acks``: ``0``, ``1`` or ``"all"`` (``-1`` is accepted as ``"all"``); normalized to :class:`Acks`."""
    enable_idempotence: bool | None = None
    """``enable.idempotence``. ``None`` (default): on exactly when ``acks`` is ``"all"``.

    The broker deduplicates the producer's retries by (producer id, sequence
    number), which requires ``acks="all"`` and at most 5 requests in flight.
    """
    max_in_flight: int = 5
    """``max.in.flight.requests.per.connection``: at most 5 with idempotence (the broker tracks 5 batches)."""
    delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT
    """Seconds (``delivery.timeout.ms``) before a message librdkafka could not deliver fails with DeliveryTimeout."""
    linger: float = DEFAULT_LINGER
    """Seconds (``linger.ms``) to wait for more messages to batch together."""
    compression: str = "none"
    """``compression.type``: one of ``none``, ``gzip``, ``snappy``, ``lz4``, ``zstd``."""
    retries: int | None = None
    """``retries``: ``None`` keeps librdkafka's (unbounded within ``delivery_timeout``).

    A bounded count makes a persistent broker error (e.g. ``NOT_ENOUGH_REPLICAS``)
    surface as its own typed error instead of a DeliveryTimeout; idempotence
    needs it >= 1.
    """
    queue_full_timeout: float = DEFAULT_QUEUE_FULL_TIMEOUT
    """Seconds ``publish`` waits for room in librdkafka's local queue before failing the future."""
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    """Seconds to reach a broker the first time. Until then messages wait; after it, those and every new
    one fail with :class:`~reliable_messaging.BrokerUnavailable` (nothing was sent) until a broker
    answers. Once a broker was reached, an outage is ridden out within ``delivery_timeout``."""
    client_id: str = "reliable-messaging"
    """``client.id``: shows up in broker logs and quotas."""
    extra: Mapping[str, ConfigValue] = field(default_factory=dict, repr=False)
    """Further librdkafka properties (e.g. ``security.protocol``); may not override a field above."""

    def __repr__(self) -> str:
        return _repr_hiding_secrets(self)

    def __post_init__(self) -> None:
        owner = "KafkaProducerConfig"
        _text(owner, "bootstrap_servers", self.bootstrap_servers)
        acks = Acks.parse(self.acks)
        object.__setattr__(self, "acks", acks)
        if self.enable_idempotence is not None and not isinstance(self.enable_idempotence, bool):
            raise ConfigurationError(
                f"{owner}.enable_idempotence must be True, False or None (on with acks='all'), "
                f"got {self.enable_idempotence!r}", field="enable_idempotence",
            )
        if self.enable_idempotence and acks is not Acks.ALL:
            raise ConfigurationError(
                f"{owner}: enable_idempotence=True requires acks='all' (got acks={acks.value!r}); "
                "set acks='all' or enable_idempotence=False", field="enable_idempotence",
            )
        if isinstance(self.max_in_flight, bool) or not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ConfigurationError(f"{owner}.max_in_flight must be an int >= 1, got {self.max_in_flight!r}",
                                     field="max_in_flight")
        if self.idempotent and self.max_in_flight > 5:
            raise ConfigurationError(
                f"{owner}.max_in_flight must be between 1 and 5 with idempotence (the broker keeps the "
                f"sequence numbers of 5 batches per producer), got {self.max_in_flight}", field="max_in_flight",
            )
        _positive(owner, "delivery_timeout", self.delivery_timeout)
        _positive(owner, "linger", self.linger, allow_zero=True)
        _positive(owner, "queue_full_timeout", self.queue_full_timeout, allow_zero=True)
        _positive(owner, "connect_timeout", self.connect_timeout)
        if self.compression not in COMPRESSION_TYPES:
            raise ConfigurationError(
                f"{owner}.compression must be one of {', '.join(COMPRESSION_TYPES)}, got {self.compression!r}",
                field="compression",
            )
        if self.retries is not None:
            if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
                raise ConfigurationError(f"{owner}.retries must be None or an int >= 0, got {self.retries!r}",
                                         field="retries")
            if self.idempotent and self.retries < 1:
                raise ConfigurationError(f"{owner}.retries must be >= 1 with idempotence, got {self.retries}",
                                         field="retries")
        _text(owner, "client_id", self.client_id)
        object.__setattr__(self, "extra", _extra(owner, self.extra, _PRODUCER_MANAGED))

    @property
    def acks_level(self) -> Acks:
        """``acks`` as an :class:`Acks` (it is normalized at construction)."""
        return Acks.parse(self.acks)

    @property
    def idempotent(self) -> bool:
        """Whether the producer runs with ``enable.idempotence=true``."""
        if self.enable_idempotence is None:
            return self.acks_level is Acks.ALL
        return self.enable_idempotence

    def librdkafka(self) -> dict[str, Any]:
        """The librdkafka configuration these settings stand for (without callbacks)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "acks": self.acks_level.value,
            "enable.idempotence": self.idempotent,
            "max.in.flight.requests.per.connection": self.max_in_flight,
            "delivery.timeout.ms": _ms(self.delivery_timeout),
            "linger.ms": self.linger * 1000.0,
            "compression.type": self.compression,
            **self.extra,
        }
        if self.retries is not None:
            conf["retries"] = self.retries
        return conf


_CONSUMER_MANAGED: Mapping[str, str] = {
    "bootstrap.servers": "bootstrap_servers",
    "group.id": "group_id",
    "enable.auto.commit": "commit_mode",
    "enable.auto.offset.store": "commit_mode",
    "auto.commit.interval.ms": "commit_interval",
    "auto.offset.reset": "auto_offset_reset",
    "session.timeout.ms": "session_timeout",
    "max.poll.interval.ms": "max_poll_interval",
    "client.id": "client_id",
    **{key: "extra" for key in _CALLBACK_KEYS},
}

OFFSET_RESETS = ("earliest", "latest", "error")

CONSUMER_DEFAULTS: Mapping[str, ConfigValue] = types.MappingProxyType({
    "fetch.queue.backoff.ms": 20,
    "topic.metadata.refresh.interval.ms": 10_000,
})
"""librdkafka settings whose defaults this library changes; ``extra`` may still override them.

``topic.metadata.refresh.interval.ms``: a subscribed topic that the broker did not
report at subscribe time (just created, metadata not yet propagated) is only looked
up again at the next refresh: 5 minutes by default, during which its records wait.
10 s bounds that wait (the consumer also waits for created topics to be visible
before subscribing); the cost is one metadata request per 10 s.

``fetch.queue.backoff.ms``: once librdkafka's prefetch queue holds
``queued.min.messages`` (100 000) records it stops fetching for this long
(default 1000 ms). A consumer that drains the queue faster than that runs dry
and waits: measured here, a plain ``poll()`` loop read 175 000 records/s with the
default and 930 000/s with 20 ms. 20 ms costs one extra check of the queue per
20 ms while it is full.
"""


@dataclass(frozen=True, kw_only=True)
class KafkaConsumerConfig:
    """Settings of a :class:`~reliable_messaging.KafkaConsumer`.

    ``auto_offset_reset="earliest"`` by default: a new group starts at the
    beginning of the log instead of skipping what was published before it joined.
    """

    bootstrap_servers: str
    """``bootstrap.servers``."""
    group_id: str
    """``group.id``: consumers with the same id share the partitions; offsets are committed per group."""
    commit_mode: CommitMode | str = CommitMode.MANUAL_BATCH
    """When offsets are committed; see :class:`CommitMode`."""
    commit_every: int = DEFAULT_COMMIT_EVERY
    """``MANUAL_BATCH``: the most processed-but-uncommitted messages, i.e. the most a crash repeats."""
    commit_interval: float = DEFAULT_COMMIT_INTERVAL
    """Seconds: ``MANUAL_BATCH`` commits at least this often; else ``auto.commit.interval.ms``."""
    auto_offset_reset: str = "earliest"
    """``auto.offset.reset``: where a group without a committed offset starts (earliest, latest, error)."""
    session_timeout: float = DEFAULT_SESSION_TIMEOUT
    """Seconds (``session.timeout.ms``) before a silent consumer's partitions go to others.

    Must lie within the broker's ``group.min/max.session.timeout.ms``.
    """
    max_poll_interval: float = 300.0
    """Seconds (``max.poll.interval.ms``) a handler may take before the consumer is considered stuck and leaves."""
    fetch_batch: int = 500
    """Messages taken from librdkafka's queue per call (``consume(num_messages)``): fewer C calls per message."""
    client_id: str = "reliable-messaging"
    """``client.id``."""
    extra: Mapping[str, ConfigValue] = field(default_factory=dict, repr=False)
    """Further librdkafka properties (e.g. ``group.instance.id``); may not override a field above."""

    def __repr__(self) -> str:
        return _repr_hiding_secrets(self)

    def __post_init__(self) -> None:
        owner = "KafkaConsumerConfig"
        _text(owner, "bootstrap_servers", self.bootstrap_servers)
        _text(owner, "group_id", self.group_id)
        try:
            object.__setattr__(self, "commit_mode", CommitMode(self.commit_mode))
        except ValueError:
            raise ConfigurationError(
                f"{owner}.commit_mode must be one of {', '.join(m.value for m in CommitMode)}, "
                f"got {self.commit_mode!r}", field="commit_mode",
            ) from None
        if isinstance(self.commit_every, bool) or not isinstance(self.commit_every, int) or self.commit_every < 1:
            raise ConfigurationError(f"{owner}.commit_every must be an int >= 1, got {self.commit_every!r}",
                                     field="commit_every")
        _positive(owner, "commit_interval", self.commit_interval)
        if self.auto_offset_reset not in OFFSET_RESETS:
            raise ConfigurationError(
                f"{owner}.auto_offset_reset must be one of {', '.join(OFFSET_RESETS)}, got {self.auto_offset_reset!r}",
                field="auto_offset_reset",
            )
        _positive(owner, "session_timeout", self.session_timeout)
        _positive(owner, "max_poll_interval", self.max_poll_interval)
        if self.max_poll_interval < self.session_timeout:
            raise ConfigurationError(
                f"{owner}.max_poll_interval ({self.max_poll_interval}) must be >= session_timeout "
                f"({self.session_timeout}), as librdkafka requires", field="max_poll_interval",
            )
        if isinstance(self.fetch_batch, bool) or not isinstance(self.fetch_batch, int) or self.fetch_batch < 1:
            raise ConfigurationError(f"{owner}.fetch_batch must be an int >= 1, got {self.fetch_batch!r}",
                                     field="fetch_batch")
        _text(owner, "client_id", self.client_id)
        object.__setattr__(self, "extra", _extra(owner, self.extra, _CONSUMER_MANAGED))

    @property
    def mode(self) -> CommitMode:
        """``commit_mode`` as a :class:`CommitMode` (it is normalized at construction)."""
        return CommitMode(self.commit_mode)

    def librdkafka(self) -> dict[str, Any]:
        """The librdkafka configuration these settings stand for (without callbacks)."""
        mode = self.mode
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group_id,
            "client.id": self.client_id,
            "enable.auto.commit": mode in (CommitMode.AUTO, CommitMode.STORE_OFFSETS),
            "enable.auto.offset.store": mode is CommitMode.AUTO,
            "auto.commit.interval.ms": _ms(self.commit_interval),
            "auto.offset.reset": self.auto_offset_reset,
            "session.timeout.ms": _ms(self.session_timeout),
            "max.poll.interval.ms": _ms(self.max_poll_interval),
            **CONSUMER_DEFAULTS,
            **self.extra,
        }


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
