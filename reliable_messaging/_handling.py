"""What happens to a delivered message: the broker-independent half of every consumer.

A consumer adapter (Kafka, RabbitMQ) receives a message, decodes it, asks a
:class:`HandlerRunner` for an :class:`Outcome`, and carries the outcome out with
its broker's primitives:

=============  =====================================  ===========================================
disposition    Kafka                                  RabbitMQ
=============  =====================================  ===========================================
ACK            mark offset processed, commit per mode basic.ack
RETRY          publish to the retry topic for         delay queue (TTL dead-letters back) or
               ``delay``, mark offset processed       basic.nack(requeue=True)
DEAD_LETTER    publish to the dead-letter topic,      basic.reject(requeue=False) -> DLX
               mark offset processed
=============  =====================================  ===========================================

Handler outcomes: returning normally acknowledges; raising
:class:`~reliable_messaging.Retry` retries (with its delay if given);
raising :class:`~reliable_messaging.Reject` dead-letters at once; any other
exception follows the retry policy, then dead-letters when attempts run out.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ._dedup._base import ClaimResult, DedupStore
from ._errors import HandlerTimeout, Reject, Retry, StoreUnavailable
from ._message import DEFERRALS_HEADER, Message, header_count
from ._retry import RetryPolicy

__all__ = ["ConsumerStats", "Disposition", "HandlerRunner", "MessageIdKey", "Outcome"]

_monotonic = time.monotonic

logger = logging.getLogger("reliable_messaging.consumer")

_ACQUIRED = ClaimResult.ACQUIRED
_DONE = ClaimResult.DONE
_IN_PROGRESS = ClaimResult.IN_PROGRESS

M = TypeVar("M", bound=Message)


class Disposition(enum.Enum):
    """What the consumer does with a message after the handler ran."""

    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision for one message.

    ``delay``: seconds before the retry. ``counts_attempt`` is False when the
    handler did not run (the dedup store was unavailable, or a live consumer holds
    the claim): that bounce does not use up the message's attempts, and the copy
    carries one more ``x-rm-deferrals`` (see :data:`DEFERRALS_HEADER`), so the next
    bounce waits longer.
    """

    disposition: Disposition
    delay: float = 0.0
    reason: str = ""
    error: BaseException | None = None
    deduplicated: bool = False
    counts_attempt: bool = True


ACKED = Outcome(Disposition.ACK)
DEDUPLICATED = Outcome(Disposition.ACK, deduplicated=True)


@dataclass
class ConsumerStats:
    """Counters of one consumer, for logs, tests and benchmarks.

    Updated by the consumer's threads (under a lock when handlers run concurrently); readers see a
    consistent-enough snapshot (each field is a plain int).
    """

    processed: int = 0
    """Handler returned normally."""
    failed: int = 0
    """Handler raised (any exception, including Retry and Reject)."""
    retried: int = 0
    """Messages sent back for another attempt."""
    dead_lettered: int = 0
    """Messages sent to the dead-letter topic/exchange."""
    deduplicated: int = 0
    """Messages acknowledged without calling the handler: already done."""
    bounced: int = 0
    """Messages handed back without calling the handler: a live consumer held their claim, or the
    dedup store was unavailable (also counted in ``retried``)."""
    undecodable: int = 0
    """Messages the decoder could not decode (dead-lettered at once)."""
    extra: dict[str, int] = field(default_factory=dict)


class HandlerRunner(Generic[M]):
    """Runs a handler on one message and decides its :class:`Outcome`.

    Owns decoding, deduplication (claim, run, mark done / release), sync and
    ``async def`` handlers, and the retry decision. One consumer thread calls it, or, made with
    ``concurrent=True``, the threads and tasks of a :mod:`.._dispatch` dispatcher (:meth:`invoke`,
    :meth:`ainvoke` and the counters are then safe to call at once; the batch :meth:`claim` is not used).

    With a dedup store, a consumer that receives messages in batches (a Kafka fetch,
    the RabbitMQ deliveries waiting) calls :meth:`claim` with the batch first (one
    round trip to the store), then :meth:`invoke` per message, then
    :meth:`release_unclaimed` for the messages it did not get to. A message whose
    handler returned is recorded as done (:meth:`DedupStore.mark_done`, which
    survives a crash of the process) before :meth:`invoke` returns, so the consumer
    may acknowledge it at once: a crash repeats at most the message being handled.

    ``async def`` handlers run on ``loop`` (e.g. the service's own event loop)
    or, when none is given, on a private loop in a daemon thread; the consumer
    thread waits for the coroutine, so per-partition/queue order is kept.
    """

    def __init__(
        self,
        handler: Callable[[M], Any],
        *,
        retry: RetryPolicy,
        decoder: Callable[[bytes], Any] | None = None,
        dedup: DedupStore | None = None,
        dedup_key: Callable[[M], str] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        concurrent: bool = False,
        handler_timeout: float | None = None,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        self.handler_timeout = handler_timeout
        self._stats_lock: threading.Lock | None = threading.Lock() if concurrent else None
        self.handler = handler
        self.retry = retry
        self.decoder = decoder
        self.dedup = dedup
        self.dedup_key: Callable[[M], str] = dedup_key or _message_id_key
        self.stats = ConsumerStats()
        self._claimed: dict[str, ClaimResult] = {}  # claims of the current batch, not yet invoked
        self._loop = loop
        self._own_loop_thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._warned_no_key = False
        # Handlers running now, for health(). One consumer thread only counts: _ticks goes up as a handler starts
        # and as it ends (odd: one is running), and health() notes when it first saw each value; a clock read
        # per message cost ~100 ns, 3% of the Kafka consumer's time per message. Concurrent handlers keep their
        # start times in _running (dict operations are atomic; no lock on the handling path).
        self._ticks = 0
        self._seen_ticks = -1
        self._seen_at = 0.0
        self._running: dict[int, float] = {}
        self._tokens = itertools.count()

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, body: bytes) -> tuple[Any, Outcome | None]:
        """Decode ``body``; on failure return the dead-letter outcome (no retry can fix bad bytes)."""
        if self.decoder is None:
            return body, None
        try:
            return self.decoder(body), None
        except Exception as exc:  # noqa: BLE001 - any decoder failure means the bytes are undecodable
            self._count("undecodable")
            self._count("dead_lettered")
            logger.warning("undecodable message (%s: %s): dead-lettering it", type(exc).__name__, exc)
            return None, Outcome(
                Disposition.DEAD_LETTER, reason=f"undecodable: {type(exc).__name__}: {exc}", error=exc
            )

    # -- running --------------------------------------------------------------------------------

    def claim(self, messages: Sequence[M]) -> None:
        """Claim the dedup keys of messages about to be invoked, at once (:meth:`DedupStore.claim_batch`).

        Claims of an earlier batch not invoked yet are released first. A store that cannot answer is
        left for :meth:`invoke` to ask per message (which hands the message back if it still cannot).
        """
        if self._claimed:
            self.release_unclaimed()
        dedup = self.dedup
        if dedup is None or not messages:
            return
        key_of = self.dedup_key
        keys = [key for key in map(key_of, messages) if key]
        if not keys:
            return
        try:
            self._claimed = dedup.claim_batch(keys)
        except StoreUnavailable as exc:
            logger.debug("dedup batch claim failed: %s", exc)

    def release_unclaimed(self) -> None:
        """Release the claims :meth:`claim` took for messages that were not invoked (the batch was cut
        short: the consumer is stopping, a partition was rewound, a channel was lost)."""
        claimed, self._claimed = self._claimed, {}
        keys = [key for key, result in claimed.items() if result is _ACQUIRED]
        if keys and self.dedup is not None:
            try:
                self.dedup.release_many(keys)
            except StoreUnavailable as exc:
                logger.warning("could not release %d claims (%s); they lapse after the lease, or when this "
                               "process ends", len(keys), exc)

    def invoke(self, message: M) -> Outcome:
        """Run the handler on ``message`` (with deduplication) and decide what to do with it.

        A ``BaseException`` from the handler (``SystemExit``, ``KeyboardInterrupt``) releases the
        message's claim and propagates: the consumer stops without acknowledging the message.
        Thread-safe when the runner was made for concurrent use (``concurrent=True``).
        """
        key, early = self._begin(message)
        if early is not None:
            return early
        # Inlined for one consumer thread (no method call, no clock): this runs once per message.
        one = self._stats_lock is None
        token = 0
        if one:
            self._ticks += 1
        else:
            token = self._enter()
        try:
            self._call(message)
        except Exception as exc:  # noqa: BLE001 - every handler failure is an outcome, decided below
            return self._end_failed(key, message, exc)
        except BaseException:
            if key:
                self._release(key)
            raise
        finally:
            if one:
                self._ticks += 1
            else:
                self._running.pop(token, None)
        return self._end_ok(key)

    def in_flight(self) -> tuple[int, float | None]:
        """Handlers running now, and the :func:`time.monotonic` start of the longest-running one (one consumer
        thread: when this was first asked while that handler ran, so at most one probe interval late)."""
        if self._stats_lock is None:
            return (1, self._observe()) if self._ticks % 2 else (0, None)
        starts = self._running.copy().values()
        return len(starts), min(starts, default=None)

    def last_progress(self) -> float:
        """(one consumer thread) When a handler was last seen starting or ending (first seen by this call or
        :meth:`in_flight`): a consumer busy with a batch makes progress without polling."""
        return self._observe()

    def _observe(self) -> float:
        ticks = self._ticks
        if ticks != self._seen_ticks:
            self._seen_ticks, self._seen_at = ticks, _monotonic()
        return self._seen_at

    def _enter(self) -> int:
        if self._stats_lock is None:
            self._ticks += 1
            return 0
        token = next(self._tokens)
        self._running[token] = _monotonic()
        return token

    def _leave(self, token: int) -> None:
        if self._stats_lock is None:
            self._ticks += 1
        else:
            self._running.pop(token, None)

    async def ainvoke(self, message: M) -> Outcome:
        """:meth:`invoke` on the event loop (an ``async def`` handler awaited here, within ``handler_timeout``).

        The dedup store's calls are quick and run inline."""
        key, early = self._begin(message)
        if early is not None:
            return early
        token = self._enter()
        try:
            result = self.handler(message)
            if inspect.isawaitable(result):
                if self.handler_timeout is None:
                    await result
                else:
                    try:
                        await asyncio.wait_for(_await(result), self.handler_timeout)
                    except asyncio.TimeoutError:
                        raise HandlerTimeout(f"the handler ran longer than handler_timeout="
                                             f"{self.handler_timeout}s; it was cancelled") from None
        except Exception as exc:  # noqa: BLE001 - every handler failure is an outcome, decided below
            return self._end_failed(key, message, exc)
        except BaseException:
            if key:
                self._release(key)
            raise
        finally:
            self._leave(token)
        return self._end_ok(key)

    def _begin(self, message: M) -> tuple[str, Outcome | None]:
        """Claim ``message``'s dedup key: ``(key, None)`` to run the handler, or the outcome without it."""
        dedup = self.dedup
        if dedup is None:
            return "", None
        key = self.dedup_key(message)
        if not key:
            if not self._warned_no_key:
                logger.warning("message without a message id from %s: processed without deduplication",
                               message.source)
                self._warned_no_key = True
            return "", None
        claim = self._claimed.pop(key, None)
        if claim is None:
            try:
                claim = dedup.claim(key)
            except StoreUnavailable as exc:
                logger.warning("dedup store unavailable (%s): message %s handed back", exc, key)
                logger.debug("dedup store failure", exc_info=exc)
                return key, self._bounce(message, f"dedup store unavailable: {exc}", exc)
        if claim is _DONE:
            self._count("deduplicated")
            return key, DEDUPLICATED
        if claim is _IN_PROGRESS:
            return key, self._bounce(message, "claimed by another consumer", None)
        return key, None

    def _end_ok(self, key: str) -> Outcome:
        if key:
            try:
                self.dedup.mark_done(key)  # type: ignore[union-attr]
            except StoreUnavailable as exc:
                # The work is done; acknowledging is right. Only a later duplicate may run again.
                logger.warning("could not record message %s as done (%s); a duplicate would be reprocessed",
                               key, exc)
        lock = self._stats_lock
        if lock is None:
            self.stats.processed += 1
        else:
            with lock:
                self.stats.processed += 1
        return ACKED

    def _end_failed(self, key: str, message: M, exc: Exception) -> Outcome:
        if key:
            self._release(key)
        return self._failed(message, exc)

    def _count(self, name: str, by: int = 1) -> None:
        """Add to a stats counter (under a lock when handlers run concurrently)."""
        lock = self._stats_lock
        if lock is None:
            setattr(self.stats, name, getattr(self.stats, name) + by)
        else:
            with lock:
                setattr(self.stats, name, getattr(self.stats, name) + by)

    def _call(self, message: M) -> None:
        if self.handler_timeout is not None:
            self._call_within(message, self.handler_timeout)
            return
        result = self.handler(message)
        if result is None:  # the common case for sync handlers: skip the awaitable check
            return
        if inspect.isawaitable(result):
            future = asyncio.run_coroutine_threadsafe(_await(result), self.event_loop())
            future.result()

    def _call_within(self, message: M, timeout: float) -> None:
        """Run the handler on a thread of its own and wait at most ``timeout`` seconds for it.

        A plain function cannot be stopped from outside: past the timeout it is left running on its thread
        (a WARNING says so) and counts as a failed attempt; what it does afterwards is ignored. A coroutine
        is cancelled.
        """
        outcome: Future[Any] = Future()

        def call() -> None:
            try:
                result = self.handler(message)
                if inspect.isawaitable(result):
                    result = asyncio.run_coroutine_threadsafe(_await(result), self.event_loop())
                    try:
                        result = result.result(timeout)
                    except FutureTimeout:
                        result.cancel()
                        raise
                outcome.set_result(result)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                outcome.set_exception(exc)

        threading.Thread(target=call, name="rm-handler", daemon=True).start()
        try:
            outcome.result(timeout)
        except FutureTimeout:
            logger.warning("message %s: the handler ran longer than handler_timeout=%ss; counted as a failed "
                           "attempt (the handler goes on running, and its result is ignored)",
                           message.message_id, timeout)
            raise HandlerTimeout(f"the handler ran longer than handler_timeout={timeout}s") from None

    def _release(self, key: str) -> None:
        assert self.dedup is not None
        try:
            self.dedup.release(key)
        except StoreUnavailable as exc:
            logger.warning("could not release claim on %s (%s); it expires after the lease", key, exc)

    def _bounce(self, message: M, reason: str, error: BaseException | None) -> Outcome:
        """Hand the message back without running it: each deferral waits longer (the retry policy's
        backoff by the number of deferrals so far), so a message held by a slow live consumer is
        copied a handful of times over its lease, not hundreds."""
        self._count("retried")
        self._count("bounced")
        deferrals = header_count(message.headers.get(DEFERRALS_HEADER))
        return Outcome(
            Disposition.RETRY,
            delay=self.retry.delay_for(deferrals + 1),
            reason=reason,
            error=error,
            counts_attempt=False,
        )

    def _failed(self, message: M, exc: Exception) -> Outcome:
        self._count("failed")
        attempt = message.attempt
        if isinstance(exc, Reject):
            logger.warning("message %s rejected by handler: %s", message.message_id, exc.reason)
            self._count("dead_lettered")
            return Outcome(Disposition.DEAD_LETTER, reason=exc.reason, error=exc)
        description = f"{type(exc).__name__}: {exc}"
        explicit = isinstance(exc, Retry)
        if not explicit and not self.retry.retryable(exc):
            logger.warning("message %s failed (%s), an error not retryable: dead-lettering it",
                           message.message_id, description)
            logger.debug("handler failure", exc_info=exc)
            self._count("dead_lettered")
            return Outcome(Disposition.DEAD_LETTER, reason=f"not retryable: {description}", error=exc)
        policy = self.retry if explicit else self.retry.for_error(exc)
        if policy.exhausted(attempt):
            logger.warning(
                "message %s failed attempt %d/%d (%s): dead-lettering it",
                message.message_id, attempt, policy.max_attempts, description,
            )
            logger.debug("handler failure", exc_info=exc)
            self._count("dead_lettered")
            return Outcome(
                Disposition.DEAD_LETTER,
                reason=f"retries exhausted after {attempt} attempts: {description}",
                error=exc,
            )
        delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else policy.delay_for(attempt)
        logger.warning(
            "message %s failed attempt %d/%d (%s): retrying in %.2fs",
            message.message_id, attempt, policy.max_attempts, description, delay,
        )
        logger.debug("handler failure", exc_info=exc)
        self._count("retried")
        return Outcome(Disposition.RETRY, delay=delay, reason=description, error=exc)

    # -- async support --------------------------------------------------------------------------

    def event_loop(self) -> asyncio.AbstractEventLoop:
        """The loop ``async def`` handlers run on: the one given, or a private one started on first use."""
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="reliable-messaging-handlers",
                                          daemon=True)
                thread.start()
                self._loop, self._own_loop_thread = loop, thread
            return self._loop

    def close(self) -> None:
        """Stop the private event loop, if one was started."""
        if self._own_loop_thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._own_loop_thread.join(timeout=5)
            self._loop.close()
            self._own_loop_thread = None
            self._loop = None


class MessageIdKey:
    """A dedup key function: ``prefix`` + the message id ("" for a message without one: no dedup).

    The facade's default: ``<group or queue>/<message id>``, so two services sharing one store do
    not suppress each other's messages.
    """

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def __call__(self, message: Message) -> str:
        message_id = message.message_id
        return self.prefix + message_id if message_id else ""

    def __repr__(self) -> str:
        return f"MessageIdKey({self.prefix!r})"


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _message_id_key(message: Message) -> str:
    return message.message_id
