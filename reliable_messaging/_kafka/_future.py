"""A delivery future cheap enough to create once per produced message.

On this machine librdkafka's whole produce path costs about 1.3 µs per message
from Python; a plain :class:`concurrent.futures.Future` costs as much again
(``__init__`` builds a ``threading.Condition``; ``set_result`` notifies it), and
building the frozen :class:`Delivery` another 0.5 µs. Yet most delivery futures
are resolved before anyone waits on them, and many are only ever checked in
bulk. So this future

- is its own delivery-report callback (``on_delivery=future``: no closure per message);
- creates its condition only when someone needs one (a blocked ``result()``,
  a done-callback, ``concurrent.futures.wait``/``as_completed``, asyncio);
- keeps the report's partition/offset/timestamp and builds the
  :class:`Delivery` on the first ``result()``.

Correctness rests on one lock shared by these futures, :data:`_LAZY_LOCK`. The
condition is created under it, and the fast resolution checks for the condition
under it: either the fast path ran first (a later waiter creates the condition,
finds the state FINISHED and returns), or the condition exists first and the
report takes Future's ordinary, notifying path. Reading a finished future needs
no lock: the state is written last and is final.

The future starts in the RUNNING state: the message is already in librdkafka's
hands, so ``cancel()`` returns False, as for any running future.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import FINISHED, RUNNING

from confluent_kafka import KafkaError
from confluent_kafka import Message as RawMessage

from .._message import Delivery, DeliveryFuture
from .._stats import FailureCounts
from ._errors import delivery_error

__all__ = ["KafkaDeliveryFuture", "future_class"]

_LAZY_LOCK = threading.Lock()

_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})

_Report = tuple["int | None", "int | None", tuple[int, int]]
"""What a delivery report says: partition, offset, (timestamp type, timestamp in ms)."""


class KafkaDeliveryFuture(DeliveryFuture):
    """A :class:`~reliable_messaging.DeliveryFuture` resolved by librdkafka's delivery report.

    Pass the future itself as ``on_delivery``: librdkafka calls it with
    ``(error, message)`` from whichever thread serves the producer's reports.
    """

    _lazy_condition: threading.Condition | None = None  # class default: no condition yet
    _report: _Report | None = None  # (partition, offset, (timestamp type, timestamp)) until built
    failures: FailureCounts | None = None
    """Where failed deliveries are counted: set on the class a producer makes for its own futures
    (:func:`future_class`), so counting costs the success path nothing."""
    purge_error: BaseException | None = None
    """Set by the producer on a future it purges for a reason of its own (no broker was ever reached):
    the purge report fails the future with this error instead of "closed before it was sent"."""

    def __init__(self, message_id: str, topic: str = "") -> None:
        # Future.__init__ is deliberately not called: it would build the condition eagerly.
        self.message_id = message_id
        self._topic = topic  # known at publish: msg.topic() would allocate a new str per report
        self._state = RUNNING
        self._result = None
        self._exception = None

    # -- the delivery report --------------------------------------------------------------------

    def __call__(self, err: KafkaError | None, msg: RawMessage) -> None:
        if err is not None:
            purged = self.purge_error
            error = purged if purged is not None and err.code() in _PURGED else delivery_error(err, self.message_id)
            self.set_exception(error)
            failures = self.failures
            if failures is not None:
                failures.add(error)
            return
        report = (msg.partition(), msg.offset(), msg.timestamp())
        if self._lazy_condition is None:
            with _LAZY_LOCK:
                if self._lazy_condition is None:  # nobody waits: keep the report, build the Delivery on read
                    if self._state == FINISHED:
                        raise InvalidStateError(f"{self!r} is already resolved")
                    self._report = report
                    self._state = FINISHED
                    return
        self.set_result(_delivery(self.message_id, self._topic, report))

    # -- lazy parts -----------------------------------------------------------------------------

    @property
    def _condition(self) -> threading.Condition:
        cond = self._lazy_condition
        if cond is None:
            with _LAZY_LOCK:
                cond = self._lazy_condition
                if cond is None:
                    self._waiters = []
                    self._done_callbacks: list[Callable[[Future[Delivery]], object]] = []
                    cond = self._lazy_condition = threading.Condition()
        return cond

    @_condition.setter
    def _condition(self, value: threading.Condition) -> None:
        self._lazy_condition = value

    def _delivery(self) -> Delivery:
        result = self._result
        if result is None:
            report = self._report
            assert report is not None, "FINISHED without exception holds a result or a report"
            result = self._result = _delivery(self.message_id, self._topic, report)
            self._report = None
        return result

    # -- reading --------------------------------------------------------------------------------

    def cancel(self) -> bool:
        """Always False: the message is already in librdkafka's hands and cannot be taken back."""
        return False

    def done(self) -> bool:
        return self._state == FINISHED  # never cancelled: RUNNING from the start

    def result(self, timeout: float | None = None) -> Delivery:
        if self._state != FINISHED:
            super().exception(timeout)  # waits on the condition; raises TimeoutError
        exc = self._exception
        if exc is not None:
            raise exc
        return self._delivery()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)


def future_class(failures: FailureCounts) -> type[KafkaDeliveryFuture]:
    """A subclass of :class:`KafkaDeliveryFuture` whose failed deliveries are counted in ``failures``."""
    return type("KafkaDeliveryFuture", (KafkaDeliveryFuture,), {"failures": failures})


def _delivery(message_id: str, topic: str, report: _Report) -> Delivery:
    partition, offset, (ts_type, ts) = report
    return Delivery(
        message_id,
        topic,
        None,
        partition,
        offset if offset is not None and offset >= 0 else None,  # acks=0: OFFSET_INVALID (-1001)
        ts / 1000.0 if ts_type else None,  # TIMESTAMP_NOT_AVAILABLE is 0
    )
