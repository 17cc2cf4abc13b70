"""The dedup-store contract behind idempotent consumers.

At-least-once delivery means duplicates: a producer resends when an ack is lost,
a broker redelivers what a crashed consumer had not acknowledged. An idempotent
consumer remembers which message ids it has finished, in three steps:

1. ``claim(key)`` before the handler runs. ``ACQUIRED``: this consumer owns the
   key and runs the handler. ``DONE``: already processed; acknowledge without
   calling the handler. ``IN_PROGRESS``: a live consumer holds the claim; hand
   the message back for later.
2. ``mark_done(key)`` after the handler succeeded, *before* the broker
   acknowledgement, so a crash between the two is deduplicated on redelivery.
   When it returns, the record survives a crash of this process: a consumer
   acknowledges right after it, and a crash repeats at most the handlers that
   were running (one per handler thread).
3. ``release(key)`` after the handler failed, so the redelivery is processed.

*Who holds a claim.* A claim belongs to a store instance (and the thread that took
it) and lives only as long as that instance's process: a store that finds a key
claimed by a process that died takes the claim over at once, without waiting out
the lease (see :mod:`._process`; across hosts, the owner's heartbeat must have
stopped for ``liveness`` seconds). ``lease`` bounds a claim of a live process: a
handler still running after ``lease`` seconds may see its message run elsewhere.

Done records are kept for ``ttl`` seconds: duplicates arriving later than that are
processed again, so ``ttl`` must exceed the longest redelivery horizon (retention
of retry topics/queues, consumer downtime).

What this does *not* make atomic: the handler's own side effects and
``mark_done``. A crash after the handler's effects but before ``mark_done``
returned runs the handler again on redelivery; handlers whose effects live in the
same database can close that window by writing the key in their own transaction.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable

from .._errors import ConfigurationError

__all__ = ["DEFAULT_LEASE", "DEFAULT_LIVENESS", "DEFAULT_TTL", "ClaimResult", "DedupStore"]

DEFAULT_LEASE = 60.0
"""Seconds a claim of a *live* consumer stays valid: longer than a normal handler run. A dead
consumer's claims are taken over as soon as its death is known, not after the lease."""

DEFAULT_LIVENESS = 5.0
"""Seconds without a heartbeat after which a store instance on another host counts as dead and
its claims are taken over (a heartbeat goes out every ``liveness / 5`` seconds)."""

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
    """A live consumer holds the claim: hand the message back (retry later)."""


def check_liveness(liveness: object, lease: float) -> float:
    """``liveness`` validated; None means the default, or ``lease`` if that is shorter."""
    if liveness is None:
        return min(DEFAULT_LIVENESS, lease)
    if isinstance(liveness, bool) or not isinstance(liveness, int | float) or not 0.1 <= liveness <= lease:
        raise ConfigurationError(f"liveness must be a number of seconds in [0.1, lease={lease}], got {liveness!r}",
                                 field="liveness")
    return float(liveness)


class DedupStore(abc.ABC):
    """A record of claimed and finished message ids. Implementations are thread-safe."""

    def __init__(self, *, lease: float = DEFAULT_LEASE, ttl: float = DEFAULT_TTL) -> None:
        if isinstance(lease, bool) or not isinstance(lease, int | float) or lease <= 0:
            raise ConfigurationError(f"lease must be a number of seconds > 0, got {lease!r}", field="lease")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < lease:
            raise ConfigurationError(f"ttl must be a number of seconds >= lease ({lease}), got {ttl!r}", field="ttl")
        self.lease = float(lease)
        self.ttl = float(ttl)

    @abc.abstractmethod
    def claim(self, key: str) -> ClaimResult:
        """Try to take ``key`` for processing (see :class:`ClaimResult`)."""

    def claim_batch(self, keys: Iterable[str]) -> dict[str, ClaimResult]:
        """:meth:`claim` for the keys of messages about to be handled (a fetched batch), at once.

        Returns the result of each key the store decided; the caller claims a key left out with
        :meth:`claim` when its message comes. A key claimed here and not processed must be
        released (:meth:`release_many`). Default: decides nothing.
        """
        return {}

    @abc.abstractmethod
    def mark_done(self, key: str) -> None:
        """Record ``key`` as processed for ``ttl`` seconds; the record survives a crash of this
        process once this returned."""

    @abc.abstractmethod
    def release(self, key: str) -> None:
        """Give up this consumer's claim on ``key`` so a redelivery is processed."""

    def release_many(self, keys: Iterable[str]) -> None:
        """:meth:`release` for several keys (claims of a batch that was cut short)."""
        for key in keys:
            self.release(key)

    def close(self) -> None:  # noqa: B027 - optional hook, most stores have nothing to close
        """Release resources (connections, files) and this instance's claims."""

    def __enter__(self) -> DedupStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
