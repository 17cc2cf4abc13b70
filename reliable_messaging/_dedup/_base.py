"""The dedup-store contract behind idempotent consumers.

At-least-once delivery means duplicates: a producer resends when an ack is lost,
a broker redelivers what a crashed consumer had not acknowledged. An idempotent
consumer remembers which message ids it has finished, in three steps:

1. ``claim(key)`` before the handler runs. ``ACQUIRED``: this consumer owns the
   key for ``lease`` seconds and runs the handler. ``DONE``: already processed;
   acknowledge without calling the handler. ``IN_PROGRESS``: another consumer
   holds a live lease; hand the message back for later.
2. ``mark_done(key)`` after the handler succeeded, *before* the broker
   acknowledgement, so a crash between the two is deduplicated on redelivery.
3. ``release(key)`` after the handler failed, so the redelivery is processed.

A claim held by a consumer that crashed expires after ``lease`` seconds. Done
records are kept for ``ttl`` seconds: duplicates arriving later than that are
processed again, so ``ttl`` must exceed the longest redelivery horizon
(retention of retry topics/queues, consumer downtime).

What this does *not* make atomic: the handler's own side effects and
``mark_done``. A crash after the handler's effects but before ``mark_done``
runs the handler again on redelivery; handlers whose effects live in the same
database can close that window by writing the key in their own transaction.

*Pipelined stores.* A store whose every write is a durable commit (SQLite) would make
the consumer wait for one commit per message. Such a store sets :attr:`DedupStore.pipelined`
and offers a non-blocking path, which the handler runner then uses instead:
:meth:`~DedupStore.claim_deferred` (answered from in-process state or one lookup; the claim
reaches other processes with a later group commit of the store), :meth:`~DedupStore.mark_done_deferred`
(returns a future resolved once the done record is durable), :meth:`~DedupStore.prefetch`
(look up a fetched batch's keys at once) and :meth:`~DedupStore.flush` (the consumer is idle:
write now). The consumers then acknowledge a message only when its future has resolved, as a
publisher waits for its confirms, so "done record durable before the broker acknowledgement"
still holds. The defaults below make any store usable through that path.
"""

from __future__ import annotations

import abc
import enum
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from typing import ClassVar

from .._errors import ConfigurationError, StoreUnavailable

__all__ = ["DEFAULT_LEASE", "DEFAULT_TTL", "ClaimResult", "DedupStore"]

DEFAULT_LEASE = 60.0
"""Seconds a claim stays valid: longer than a normal handler run, short enough that a crashed
consumer's messages are picked up again within a minute."""

DEFAULT_TTL = 7 * 24 * 3600.0
"""Seconds a finished message id is remembered: a week, Kafka's default log retention,
so a message re-read from the log within retention is still recognised."""


class ClaimResult(enum.Enum):
    """What :meth:`DedupStore.claim` found."""

    ACQUIRED = "acquired"
    """This consumer now owns the key: run the handler."""
    DONE = "done"
    """Already processed: acknowledge without calling the handler."""
    IN_PROGRESS = "in_progress"
    """Another consumer holds a live claim: hand the message back (retry later)."""


class DedupStore(abc.ABC):
    """A record of claimed and finished message ids. Implementations are thread-safe."""

    def __init__(self, *, lease: float = DEFAULT_LEASE, ttl: float = DEFAULT_TTL) -> None:
        if not isinstance(lease, int | float) or lease <= 0:
            raise ConfigurationError(f"lease must be a number of seconds > 0, got {lease!r}", field="lease")
        if not isinstance(ttl, int | float) or ttl < lease:
            raise ConfigurationError(f"ttl must be a number of seconds >= lease ({lease}), got {ttl!r}", field="ttl")
        self.lease = float(lease)
        self.ttl = float(ttl)

    @abc.abstractmethod
    def claim(self, key: str) -> ClaimResult:
        """Try to take ``key`` for processing (see :class:`ClaimResult`)."""

    @abc.abstractmethod
    def mark_done(self, key: str) -> None:
        """Record ``key`` as processed for ``ttl`` seconds."""

    @abc.abstractmethod
    def release(self, key: str) -> None:
        """Give up this consumer's claim on ``key`` so a redelivery is processed."""

    # -- the pipelined path (see the module docstring) ------------------------------------------

    pipelined: ClassVar[bool] = False
    """True if the store implements the deferred methods itself (the handler runner then uses
    them); False: they fall back to the synchronous ones and the runner calls those directly."""

    def claim_deferred(self, key: str) -> ClaimResult:
        """:meth:`claim` for a consumer on the pipelined path.

        A pipelined store may answer from what this process knows and publish the claim to other
        processes later (with its next write). ``DONE`` is returned only for a key whose done record
        is durable (a store waits for a pending one). Default: :meth:`claim`.
        """
        return self.claim(key)

    def mark_done_deferred(self, key: str) -> Future[None]:
        """Queue the done record of ``key``; the future resolves once it is durable.

        The future fails with :class:`~reliable_messaging.StoreUnavailable` if the write failed.
        Several keys may share one future (one group commit). Default: :meth:`mark_done` now, and
        a future that is already resolved (or failed).
        """
        future: Future[None] = Future()
        try:
            self.mark_done(key)
        except StoreUnavailable as exc:
            future.set_exception(exc)
        else:
            future.set_result(None)
        return future

    batched: ClassVar[bool] = False
    """True if the store implements :meth:`claim_batch` and :meth:`mark_done_batch` itself, cheaper
    than one call per key: a consumer that fetches batches (Kafka) then claims and records a whole
    batch at once."""

    def claim_batch(self, keys: Iterable[str]) -> dict[str, ClaimResult]:
        """:meth:`claim_deferred` for a fetched batch's keys at once, as far as the store can.

        Returns the result of each key it decided; the caller claims a key left out with
        :meth:`claim_deferred` when its message comes. A key claimed here and not processed must be
        released (:meth:`release`). Default: decides nothing.
        """
        return {}

    def mark_done_batch(self, keys: Iterable[str]) -> Future[None]:
        """:meth:`mark_done_deferred` for several keys; the future resolves once all are durable.

        Default: :meth:`mark_done_deferred` for each key, their futures combined.
        """
        futures = {id(f): f for f in map(self.mark_done_deferred, keys)}
        if len(futures) == 1:
            return next(iter(futures.values()))
        combined: Future[None] = Future()
        if not futures:
            combined.set_result(None)
            return combined
        left = [len(futures)]
        lock = threading.Lock()  # the callbacks may run on several threads at once

        def settle(future: Future[None]) -> None:
            error = future.exception()
            with lock:
                if combined.done():
                    return
                left[0] -= 1
                if error is not None:
                    combined.set_exception(error)
                elif not left[0]:
                    combined.set_result(None)

        for future in futures.values():
            future.add_done_callback(settle)
        return combined

    def prefetch(self, keys: Iterable[str]) -> None:  # noqa: B027 - optional hook
        """A hint: these keys are about to be claimed (a fetched batch); a store may look them up
        in one round trip. It claims nothing. Default: nothing."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """A hint: the consumer is idle; write queued deferred records now, without waiting.
        Default: nothing (nothing is queued)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most stores have nothing to close
        """Release resources (connections, files)."""

    def __enter__(self) -> DedupStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
