"""KafkaProducer: every publish returns a future resolved by the broker's delivery report.

How librdkafka delivers: ``produce()`` only appends the message to a local
queue; librdkafka's own threads batch it (``linger.ms``), send it to the
partition leader and, when the broker answers (or ``delivery.timeout.ms``
expires), queue a *delivery report*. Reports are handed to Python only by
``poll()``/``flush()``, on the thread that calls them. This producer

- serves reports on the publishing thread, every 64 publishes (no GIL
  hand-over between threads on the hot path), and on a background *poller*
  thread otherwise, so futures resolve even when the application stops
  publishing;
- resolves each :class:`DeliveryFuture` from its report (``Delivery`` with
  topic, partition, offset, timestamp) or fails it with a typed
  :class:`DeliveryError` (mapped in :mod:`._errors`);
- never leaves a future pending on ``close()``: what the brokers did not
  acknowledge in time is purged, and librdkafka reports every purged message;
- fails fast when no broker was ever reached: librdkafka would retry for the whole
  ``delivery_timeout`` (two minutes) and then say the message "may or may not have
  been stored". The poller asks for metadata until a broker answers; after
  ``connect_timeout`` without one, the queued messages are purged and fail with
  :class:`BrokerUnavailable`, and so does every new one until a broker answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import tenacity
from confluent_kafka import KafkaError, KafkaException, Producer

from .._errors import BrokerUnavailable, ClosedError, ConfigurationError, DeliveryTimeout, InvalidMessage
from .._log import limit_repeats
from .._message import MESSAGE_ID_HEADER, DeliveryFuture, coerce_body, new_message_id
from .._stats import FailureCounts, PublisherStats
from ._config import KafkaProducerConfig
from ._errors import delivery_error
from ._future import KafkaDeliveryFuture, future_class

__all__ = ["KafkaProducer"]

logger = limit_repeats(logging.getLogger("reliable_messaging.kafka.producer"))
librdkafka_logger = limit_repeats(logging.getLogger("reliable_messaging.kafka.librdkafka"))

_POLL_INTERVAL = 0.1
"""Seconds the poller thread blocks in ``poll()``: the longest it takes to notice ``close()``."""

_IDLE_CHECK = 0.005
"""Seconds without a publish after which the poller thread takes over serving delivery reports."""

_POLL_EVERY = 64
"""Publishes between two ``poll(0)`` calls on the publishing thread (a power of two: a mask test)."""

_PURGE_GRACE = 10.0
"""Seconds to collect the delivery reports of purged messages on close (librdkafka reports them at once)."""

_QUEUE_FULL_WAIT = 0.01
"""Seconds between attempts to enqueue while librdkafka's queue is full (spent serving delivery reports)."""

_PROBE_TIMEOUT = 1.0
"""Seconds each metadata request of the poller waits while no broker was reached yet."""

HeaderInput = Mapping[str, "str | bytes | bytearray | memoryview | int | float | bool | None"]


class KafkaProducer:
    """Publishes to Kafka; every :meth:`publish` returns a :class:`DeliveryFuture`.

    Thread-safe: any number of threads may publish. The future is a
    ``concurrent.futures.Future`` (``result(timeout)``, ``wait``, ``as_completed``)
    and awaitable from asyncio. It resolves with a :class:`Delivery` once the
    broker acknowledged the message at the configured ``acks`` level; with
    ``acks=0`` the broker never answers, so it resolves when the message was
    sent, with ``offset=None``.

    It fails with :class:`DeliveryTimeout` (not acknowledged within
    ``delivery_timeout``; it may or may not be stored), :class:`MessageTooLarge`,
    :class:`NotEnoughReplicas` (only with bounded ``retries``: librdkafka retries
    that error otherwise, so it ends as a DeliveryTimeout) or
    :class:`DeliveryFailed` with the broker's error code.

    Every message carries a ``message-id`` header (a fresh 128-bit id unless the
    caller passes ``message_id``): a caller that resends after a DeliveryTimeout
    should pass the same id, so consumers can deduplicate.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, config: KafkaProducerConfig, *,
                 queue_full_sleep: Callable[[float], None] | None = None) -> None:
        """``queue_full_sleep``: how to wait between attempts while the local queue is full.

        The default serves delivery reports for that long (which is what frees
        room); tests inject their own.
        """
        if not isinstance(config, KafkaProducerConfig):
            raise ConfigurationError(f"config must be a KafkaProducerConfig, got {type(config).__name__}",
                                     field="config")
        self.config = config
        conf = config.librdkafka()
        conf["error_cb"] = self._on_client_error
        conf["logger"] = librdkafka_logger
        try:
            self._producer = Producer(conf)
        except KafkaException as exc:
            raise ConfigurationError(f"librdkafka refused the producer configuration: {exc}") from exc
        self._produce = self._producer.produce
        self._poll = self._producer.poll
        self._queue_full_sleep = queue_full_sleep or self._serve_reports_for
        self._closed = False
        self._close_lock = threading.Lock()
        self._reached = False  # a broker answered once
        self._started = time.monotonic()
        self._unreachable: BrokerUnavailable | None = None  # set once connect_timeout passed without a broker
        self._waiting: list[KafkaDeliveryFuture] = []  # published before a broker answered
        self._waiting_lock = threading.Lock()
        self._published = 0
        self._failures = FailureCounts()
        self._future = future_class(self._failures)  # counts failed deliveries, at no cost to the others
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name=f"rm-kafka-poller-{config.client_id}",
                                        daemon=True)
        self._poller.start()

    # -- publishing -----------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        body: bytes | bytearray | memoryview | str,
        *,
        key: bytes | str | None = None,
        headers: HeaderInput | None = None,
        message_id: str | None = None,
        partition: int | None = None,
    ) -> DeliveryFuture:
        """Queue one message and return the future of its delivery report.

        ``body`` is bytes (``str`` is sent as UTF-8). ``key`` chooses the
        partition (same key, same partition, same order) unless ``partition`` is
        given. Header values may be str, bytes, int, float, bool (sent as text)
        or None; ``message-id`` is set by the library (pass ``message_id``).

        Raises at call time, before anything is queued: :class:`InvalidMessage`
        for a bad body, key, header, topic or partition; :class:`ClosedError`
        after :meth:`close`. Every other failure arrives through the future.
        """
        if self._closed:
            raise ClosedError("the producer is closed; publish() was not attempted")
        value = body if body.__class__ is bytes else coerce_body(body)
        if message_id is None:
            message_id = new_message_id()
        elif message_id.__class__ is not str or not message_id:
            raise InvalidMessage(f"message_id must be a non-empty str, got {message_id!r}")
        kafka_headers: list[tuple[str, str | bytes | None]] = (
            [(MESSAGE_ID_HEADER, message_id)] if headers is None else _headers(headers, message_id)
        )
        if key is not None and key.__class__ is not bytes:
            key = _key(key)
        if topic.__class__ is not str or not topic:
            raise InvalidMessage(f"topic must be a non-empty str, got {topic!r}")
        if partition is None:
            partition = -1
        elif partition.__class__ is not int or partition < 0:
            raise InvalidMessage(f"partition must be None or an int >= 0, got {partition!r}")
        future = self._future(message_id, topic)
        if not self._reached:
            with self._waiting_lock:
                if self._unreachable is not None:
                    error = self._unreachable_error(message_id)
                    future.set_exception(error)
                    self._failures.add(error)
                    self._published += 1
                    return future
                if not self._reached:
                    self._waiting.append(future)
        try:
            # Positional on purpose (topic, value, key, partition, on_delivery, its alias, timestamp, headers):
            # confluent-kafka parses keyword arguments slowly, ~0.7 us per call measured here.
            self._produce(topic, value, key, partition, future, None, 0, kafka_headers)
        except BufferError:
            self._produce_when_room(future, topic, value, key, partition, kafka_headers)
        except KafkaException as exc:
            _fail_from(future, exc)
        # Racy across publishing threads (a lost increment only shifts the next poll): no lock on the hot path.
        self._published += 1
        if not self._published & (_POLL_EVERY - 1):
            self._poll(0)
        if self._closed:  # close() ran while this message was being queued: settle it here
            self._settle_after_close(self.config.delivery_timeout)
        return future

    def _produce_when_room(self, future: KafkaDeliveryFuture, topic: str, value: bytes,
                           key: bytes | str | None, partition: int, kafka_headers: list[Any]) -> None:
        """librdkafka's local queue is full: serve reports until there is room, under a deadline."""
        timeout = self.config.queue_full_timeout
        logger.debug("local queue full (%d messages awaiting reports); waiting up to %.1fs",
                     len(self._producer), timeout)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_delay(timeout),
            wait=tenacity.wait_fixed(_QUEUE_FULL_WAIT),
            retry=tenacity.retry_if_exception_type(BufferError),
            sleep=self._queue_full_sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._produce(topic, value, key, partition, future, None, 0, kafka_headers)
        except BufferError as exc:
            logger.warning("local queue still full after %.1fs: failing message %s", timeout, future.message_id)
            error = DeliveryTimeout(
                f"librdkafka's local queue stayed full for {timeout}s (the brokers acknowledge slower than "
                "messages are published); the message was not sent", message_id=future.message_id,
            )
            error.__cause__ = exc
            future.set_exception(error)
            self._failures.add(error)
        except KafkaException as exc:
            _fail_from(future, exc)

    def _serve_reports_for(self, seconds: float) -> None:
        self._poll(seconds)

    def _unreachable_error(self, message_id: str | None) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"no Kafka broker of {self.config.bootstrap_servers} answered within {self.config.connect_timeout:.0f}s "
            f"(connect_timeout); message {message_id} was not sent")

    # -- reaching a broker ----------------------------------------------------------------------

    def _probe(self) -> None:
        """(poller thread) Until a broker answered: ask for metadata; past connect_timeout, fail what waits."""
        try:
            self._producer.list_topics(timeout=_PROBE_TIMEOUT)
        except KafkaException:
            if self._unreachable is None and time.monotonic() - self._started >= self.config.connect_timeout:
                with self._waiting_lock:
                    self._unreachable = self._unreachable_error(None)
                    waiting, self._waiting = self._waiting, []
                logger.error("no Kafka broker of %s answered within %.0fs: failing the %d queued messages and "
                             "every new one until a broker answers", self.config.bootstrap_servers,
                             self.config.connect_timeout, len(waiting))
                for future in waiting:  # their purge reports fail them with this error (see KafkaDeliveryFuture)
                    future.purge_error = self._unreachable_error(future.message_id)
                self._producer.purge(in_queue=True, in_flight=False, blocking=False)
                self._poll(0)
            return
        with self._waiting_lock:
            if self._unreachable is not None:
                logger.warning("a Kafka broker of %s answered: publishing again", self.config.bootstrap_servers)
            self._unreachable = None
            self._reached = True
            self._waiting = []

    # -- draining -------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every publish so far is resolved (delivered or failed), at most ``timeout`` seconds.

        True if all were, as :meth:`RabbitMQPublisher.flush` (one shape for both brokers). ``None`` means
        ``delivery_timeout`` plus a margin: by then librdkafka has reported every message it had. On False,
        ``len(producer)`` says how many still await a report; their futures stay pending and resolve later:
        nothing is dropped.
        """
        if timeout is None:
            timeout = self.config.delivery_timeout + _PURGE_GRACE
        return int(self._producer.flush(max(0.0, timeout))) == 0

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting messages, wait up to ``timeout`` seconds for reports, then fail the rest.

        Messages not acknowledged by then are purged: their futures fail with
        :class:`DeliveryTimeout` when already sent (the broker may have stored
        them) or :class:`DeliveryFailed` (``_PURGE_QUEUE``, never sent). No
        future is left pending. Idempotent.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._settle_after_close(timeout)
            self._stop.set()
        if self._poller is threading.current_thread():
            return  # close() from a done-callback running on the poller: it ends after this callback
        self._poller.join(timeout=_POLL_INTERVAL * 20)
        if self._poller.is_alive():  # pragma: no cover - poll() blocks at most _POLL_INTERVAL
            logger.warning("producer poller thread did not stop within %.1fs", _POLL_INTERVAL * 20)

    def _settle_after_close(self, timeout: float) -> None:
        if not self._reached:  # nothing was ever sent: no broker answer to wait for
            timeout = min(timeout, _PROBE_TIMEOUT)
        remaining = self._producer.flush(max(0.0, timeout))
        if remaining:
            logger.warning("closing with %d messages not acknowledged after %.1fs: failing their futures",
                           remaining, timeout)
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            remaining = self._producer.flush(_PURGE_GRACE)
            if remaining:  # pragma: no cover - librdkafka reports purged messages at once
                logger.error("%d messages still without a delivery report after purge", remaining)

    @property
    def stats(self) -> PublisherStats:
        """Counters in the shape every backend reports (``confirmed`` and ``in_flight`` as librdkafka counts
        them: messages queued, in flight, or with a report not yet served)."""
        failures = self._failures.snapshot()
        failed = sum(failures.values())
        in_flight = len(self._producer) if not self._closed else 0
        published = self._published
        return PublisherStats(published=published, confirmed=max(0, published - failed - in_flight), failed=failed,
                              in_flight=in_flight, failures=failures)

    def __len__(self) -> int:
        """librdkafka's count of messages queued or in flight, plus events (reports, errors) not yet served."""
        return len(self._producer)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> KafkaProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- background -----------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        """Serve delivery reports whenever the publishing threads are not doing it themselves.

        While publishes keep coming, their own ``poll(0)`` calls serve the
        reports; a second thread blocked in ``poll()`` would only fight them for
        the GIL (one hand-over per report). So the poller sleeps while the
        publish counter moves and polls once it has stood still for
        ``_IDLE_CHECK``: the last reports of a burst arrive at most that late.
        """
        poll = self._poll
        seen = -1
        while not self._stop.is_set():
            if not self._reached:
                self._probe()
                poll(0)
                continue
            published = self._published
            if published != seen:
                seen = published
                self._stop.wait(_IDLE_CHECK)
                continue
            try:
                poll(_POLL_INTERVAL)
            except KafkaException as exc:  # a client-level error surfaced by poll: keep serving reports
                logger.warning("producer poll failed: %s", exc)
                logger.debug("producer poll failure", exc_info=exc)

    def _on_client_error(self, err: KafkaError) -> None:
        """librdkafka's ``error_cb``: client-level errors (all brokers down, fatal idempotence errors).

        Messages are not failed here: librdkafka keeps retrying them until
        ``delivery.timeout.ms`` and reports each one.
        """
        if err.fatal():
            logger.error("fatal producer error %s: %s; new messages will fail", err.name(), err.str())
        else:
            logger.warning("producer: %s: %s", err.name(), err.str())


def _fail_from(future: KafkaDeliveryFuture, exc: KafkaException) -> None:
    """A ``produce()`` call refused by librdkafka itself (too large, unknown partition, fatal state)."""
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    if err is None:  # pragma: no cover - librdkafka always attaches a KafkaError
        raise exc
    error = delivery_error(err, future.message_id)
    error.__cause__ = exc
    future.set_exception(error)
    if future.failures is not None:
        future.failures.add(error)


def _headers(headers: HeaderInput, message_id: str) -> list[tuple[str, str | bytes | None]]:
    if not isinstance(headers, Mapping):
        raise InvalidMessage(f"headers must be a mapping of str to str/bytes, got {type(headers).__name__}")
    out: list[tuple[str, str | bytes | None]] = [(MESSAGE_ID_HEADER, message_id)]
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise InvalidMessage(f"header names must be non-empty str, got {name!r}")
        if name == MESSAGE_ID_HEADER:
            raise InvalidMessage(f"the {MESSAGE_ID_HEADER!r} header is set by the library: pass message_id=...")
        if value is None or isinstance(value, str | bytes):
            out.append((name, value))
        elif isinstance(value, bytearray | memoryview):
            out.append((name, bytes(value)))
        elif isinstance(value, bool):
            out.append((name, "true" if value else "false"))
        elif isinstance(value, int | float):
            out.append((name, str(value)))
        else:
            raise InvalidMessage(
                f"header {name!r} must be str, bytes, int, float, bool or None, got {type(value).__name__}"
            )
    return out


def _key(key: object) -> bytes | str:
    if isinstance(key, str | bytes):
        return key
    if isinstance(key, bytearray | memoryview):
        return bytes(key)
    raise InvalidMessage(f"key must be bytes, str or None, got {type(key).__name__}")
