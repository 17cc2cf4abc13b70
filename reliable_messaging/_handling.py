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
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ._dedup._base import ClaimResult, DedupStore
from ._errors import Reject, Retry, StoreUnavailable
from ._message import Message
from ._retry import RetryPolicy

__all__ = ["BATCHED", "ConsumerStats", "Disposition", "HandlerRunner", "MessageIdKey", "Outcome"]

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
    handler did not run (the dedup store was unavailable, or another consumer
    holds the claim), so that bounce does not use up the message's attempts.

    ``durable``: with a pipelined dedup store (:attr:`DedupStore.pipelined`), the
    future of the group commit holding this message's done record (shared by the
    messages of one commit). The consumer acknowledges the message (RabbitMQ
    basic.ack, Kafka offset counted as processed) only once it resolved; if it
    failed, the done record is not stored and the message is handed back
    (nack/requeue, or the Kafka partition rewound) instead.
    """

    disposition: Disposition
    delay: float = 0.0
    reason: str = ""
    error: BaseException | None = None
    deduplicated: bool = False
    counts_attempt: bool = True
    durable: Future[None] | None = None


ACKED = Outcome(Disposition.ACK)
DEDUPLICATED = Outcome(Disposition.ACK, deduplicated=True)
BATCHED = Outcome(Disposition.ACK)
"""What :meth:`HandlerRunner.invoke_batched` answers for a message processed whose done record is
collected with its batch's: acknowledge it once the future :meth:`HandlerRunner.flush_done` hands
to the durable sink, with the message's ``ref``, has resolved (compared by identity)."""


@dataclass
class ConsumerStats:
    """Counters of one consumer, for logs, tests and benchmarks.

    Updated by the consumer's own thread only; readers see a consistent-enough
    snapshot (each field is a plain int).
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
    undecodable: int = 0
    """Messages the decoder could not decode (dead-lettered at once)."""
    extra: dict[str, int] = field(default_factory=dict)


class HandlerRunner(Generic[M]):
    """Runs a handler on one message and decides its :class:`Outcome`.

    Owns decoding, deduplication (claim, run, mark done / release), sync and
    ``async def`` handlers, and the retry decision. Thread-confined: one
    consumer thread calls it.

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
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        self.handler = handler
        self.retry = retry
        self.decoder = decoder
        self.dedup = dedup
        self.dedup_key: Callable[[M], str] = dedup_key or _message_id_key
        self.stats = ConsumerStats()
        # A pipelined store (SQLite) is used through its non-blocking methods: see Outcome.durable.
        self.pipelined = dedup is not None and dedup.pipelined
        self.key_prefix: str | None = "" if dedup_key is None else (
            dedup_key.prefix if isinstance(dedup_key, MessageIdKey) else None)
        """The dedup key is ``key_prefix + message id`` (None: another key function)."""
        self.batches = dedup is not None and dedup.batched and self.key_prefix is not None
        """Whether a consumer that fetches batches should use :meth:`begin_batch` / :meth:`invoke_batched`:
        a store with batch operations, keyed by the message id (read from raw records before the
        messages are built)."""
        self._unflushed = False
        # The batched path (invoke_batched): claims taken for the current batch, and the done records
        # of its messages processed so far, with their refs, not yet handed to the store.
        self._claimed: dict[str, ClaimResult] = {}
        self._pending_keys: list[str] = []
        self._pending_refs: list[Any] = []
        self.durable_sink: Callable[[tuple[Future[None], list[Any]]], Any] | None = None
        """Where :meth:`flush_done` puts ``(future, refs)``: set by a consumer using invoke_batched."""
        self._last_durable: Future[None] | None = None
        self._last_outcome = ACKED
        self._loop = loop
        self._own_loop_thread: threading.Thread | None = None
        self._warned_no_key = False

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, body: bytes) -> tuple[Any, Outcome | None]:
        """Decode ``body``; on failure return the dead-letter outcome (no retry can fix bad bytes)."""
        if self.decoder is None:
            return body, None
        try:
            return self.decoder(body), None
        except Exception as exc:  # noqa: BLE001 - any decoder failure means the bytes are undecodable
            self.stats.undecodable += 1
            self.stats.dead_lettered += 1
            logger.warning("undecodable message (%s: %s): dead-lettering it", type(exc).__name__, exc)
            return None, Outcome(
                Disposition.DEAD_LETTER, reason=f"undecodable: {type(exc).__name__}: {exc}", error=exc
            )

    # -- running --------------------------------------------------------------------------------

    def invoke(self, message: M) -> Outcome:
        """Run the handler on ``message`` (with deduplication) and decide what to do with it."""
        key = ""
        if self.dedup is not None:
            key = self.dedup_key(message)
            if not key:
                if not self._warned_no_key:
                    logger.warning("message without a message id from %s: processed without deduplication",
                                   message.source)
                    self._warned_no_key = True
            else:
                try:
                    claim = self.dedup.claim_deferred(key) if self.pipelined else self.dedup.claim(key)
                except StoreUnavailable as exc:
                    logger.warning("dedup store unavailable (%s): message %s handed back", exc, key)
                    logger.debug("dedup store failure", exc_info=exc)
                    return self._bounce(message, f"dedup store unavailable: {exc}", exc)
                if claim is ClaimResult.DONE:
                    self.stats.deduplicated += 1
                    return DEDUPLICATED
                if claim is ClaimResult.IN_PROGRESS:
                    return self._bounce(message, "claimed by another consumer", None)
        try:
            self._call(message)
        except Exception as exc:  # noqa: BLE001 - every handler failure is an outcome, decided below
            if key and self.dedup is not None:
                self._release(key)
            return self._failed(message, exc)
        if key and self.dedup is not None:
            if self.pipelined:
                return self._mark_done_deferred(key)
            try:
                self.dedup.mark_done(key)
            except StoreUnavailable as exc:
                # The work is done; acknowledging is right. Only a later duplicate may run again.
                logger.warning("could not record message %s as done (%s); a duplicate would be reprocessed",
                               key, exc)
        self.stats.processed += 1
        return ACKED

    def _mark_done_deferred(self, key: str) -> Outcome:
        """Queue the done record; the ACK outcome carries its future (the consumer waits for it)."""
        assert self.dedup is not None
        try:
            durable = self.dedup.mark_done_deferred(key)
        except StoreUnavailable as exc:
            logger.warning("could not record message %s as done (%s); a duplicate would be reprocessed", key, exc)
            self.stats.processed += 1
            return ACKED
        self.stats.processed += 1
        self._unflushed = True
        if durable is self._last_durable:  # the same group commit as the previous message: one Outcome
            return self._last_outcome
        outcome = Outcome(Disposition.ACK, durable=durable)
        self._last_durable, self._last_outcome = durable, outcome
        return outcome

    # -- the batched path (a store with batch operations, keyed by message id; see ``batches``) -----

    def begin_batch(self, keys: Sequence[str]) -> None:
        """Claim a fetched batch's dedup keys at once (:meth:`DedupStore.claim_batch`).

        Then :meth:`invoke_batched` each of its messages, and :meth:`end_batch` after the last (or
        when the batch is cut short): this costs the consumer thread a fraction of what a claim and
        a done record per message through :meth:`invoke` do.
        """
        if self._claimed:
            self._release_unused()
        if self.batches and self.dedup is not None and keys:
            try:
                self._claimed = self.dedup.claim_batch(keys)
            except StoreUnavailable as exc:  # each message then claims on its own, and reports it
                logger.debug("dedup batch claim failed: %s", exc)

    def invoke_batched(self, message: M, ref: Any) -> Outcome:
        """:meth:`invoke` for a message of the current batch; :data:`BATCHED` means processed, its
        done record pending with the batch's: ``ref`` comes back with their future (see
        :meth:`flush_done`)."""
        message_id = message.message_id
        key = self.key_prefix + message_id if message_id and self.key_prefix is not None else ""
        claim = self._claimed.pop(key, None)
        if claim is not _ACQUIRED:
            if claim is _DONE:
                self.stats.deduplicated += 1
                return DEDUPLICATED
            if claim is _IN_PROGRESS:
                return self._bounce(message, "claimed by another consumer", None)
            # Not decided with the batch (the same id twice in one batch; no batch claimed, for a key
            # function other than the message id): the store must see the done records collected so far
            # before this claim.
            if self._pending_keys:
                self.flush_done()
            return self.invoke(message)
        try:
            self._call(message)
        except Exception as exc:  # noqa: BLE001 - every handler failure is an outcome, decided below
            self._release(key)
            return self._failed(message, exc)
        self._pending_keys.append(key)
        self._pending_refs.append(ref)
        self.stats.processed += 1
        return BATCHED

    def flush_done(self) -> None:
        """Hand the done records :meth:`invoke_batched` collected to the store, and ``(future, refs)``
        to :attr:`durable_sink`. A consumer calls it before it waits for durability."""
        keys = self._pending_keys
        if not keys or self.dedup is None:
            return
        refs = self._pending_refs
        self._pending_keys, self._pending_refs = [], []
        try:
            future = self.dedup.mark_done_batch(keys)
        except StoreUnavailable as exc:
            # The work is done; acknowledging is right. Only a later duplicate may run again.
            logger.warning("could not record %d messages as done (%s); a duplicate would be reprocessed",
                           len(keys), exc)
            future = Future()
            future.set_result(None)
        self._unflushed = True
        assert self.durable_sink is not None, "invoke_batched needs a durable_sink"
        self.durable_sink((future, refs))

    def end_batch(self) -> None:
        """The batch is over (or cut short): flush its done records, release the claims of messages
        not processed (the partition was rewound, the consumer is stopping)."""
        self.flush_done()
        if self._claimed:
            self._release_unused()

    def _release_unused(self) -> None:
        claimed, self._claimed = self._claimed, {}
        for key, claim in claimed.items():
            if claim is _ACQUIRED:
                self._release(key)

    def prefetch(self, messages: Sequence[M]) -> None:
        """A pipelined store looks up the dedup keys of messages about to be invoked in one round trip
        (for a key function other than :class:`MessageIdKey`, where the batched path does not apply)."""
        if self.pipelined and messages and self.dedup is not None:
            self.dedup.prefetch([self.dedup_key(m) for m in messages])

    def flush(self) -> None:
        """The consumer is idle (nothing fetched): ask a pipelined store to commit what is queued now."""
        if self._pending_keys:
            self.flush_done()
        if self._unflushed and self.dedup is not None:
            self._unflushed = False
            self.dedup.flush()

    def _call(self, message: M) -> None:
        result = self.handler(message)
        if result is None:  # the common case for sync handlers: skip the awaitable check
            return
        if inspect.isawaitable(result):
            future = asyncio.run_coroutine_threadsafe(_await(result), self._event_loop())
            future.result()

    def _release(self, key: str) -> None:
        assert self.dedup is not None
        try:
            self.dedup.release(key)
        except StoreUnavailable as exc:
            logger.warning("could not release claim on %s (%s); it expires after the lease", key, exc)

    def _bounce(self, message: M, reason: str, error: BaseException | None) -> Outcome:
        self.stats.retried += 1
        return Outcome(
            Disposition.RETRY,
            delay=self.retry.delay_for(1),
            reason=reason,
            error=error,
            counts_attempt=False,
        )

    def _failed(self, message: M, exc: Exception) -> Outcome:
        self.stats.failed += 1
        attempt = message.attempt
        if isinstance(exc, Reject):
            logger.warning("message %s rejected by handler: %s", message.message_id, exc.reason)
            self.stats.dead_lettered += 1
            return Outcome(Disposition.DEAD_LETTER, reason=exc.reason, error=exc)
        description = f"{type(exc).__name__}: {exc}"
        if self.retry.exhausted(attempt):
            logger.warning(
                "message %s failed attempt %d/%d (%s): dead-lettering it",
                message.message_id, attempt, self.retry.max_attempts, description,
            )
            logger.debug("handler failure", exc_info=exc)
            self.stats.dead_lettered += 1
            return Outcome(
                Disposition.DEAD_LETTER,
                reason=f"retries exhausted after {attempt} attempts: {description}",
                error=exc,
            )
        delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else self.retry.delay_for(attempt)
        logger.warning(
            "message %s failed attempt %d/%d (%s): retrying in %.2fs",
            message.message_id, attempt, self.retry.max_attempts, description, delay,
        )
        logger.debug("handler failure", exc_info=exc)
        self.stats.retried += 1
        return Outcome(Disposition.RETRY, delay=delay, reason=description, error=exc)

    # -- async support --------------------------------------------------------------------------

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="reliable-messaging-handlers", daemon=True)
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

    The runner recognises it, so a consumer can compute the keys of a fetched batch from its raw
    records and claim them at once (:meth:`HandlerRunner.begin_batch`) before building the messages.
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
