"""In-process dedup store: a bounded LRU of message ids with lease and TTL expiry.

For a single consumer process whose duplicates arrive while it runs (a producer
resend, a RabbitMQ redelivery, a Kafka rebalance within the process). It
forgets everything on restart; use :class:`~reliable_messaging._dedup.SQLiteDedupStore`
when duplicates must be recognised across restarts, and
:class:`~reliable_messaging._dedup.RedisDedupStore` across consumer processes.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

from .._errors import ClosedError, ConfigurationError, InvalidMessage, StoreUnavailable
from ._base import DEFAULT_LEASE, DEFAULT_TTL, ClaimResult, DedupStore

__all__ = ["DEFAULT_MAX_ENTRIES", "MemoryDedupStore"]

DEFAULT_MAX_ENTRIES = 100_000
"""Message ids remembered at most: about 10 MB of keys and bookkeeping for uuid-sized ids,
and a few minutes of traffic at several hundred messages per second."""

_ACQUIRED = ClaimResult.ACQUIRED
_DONE = ClaimResult.DONE
_IN_PROGRESS = ClaimResult.IN_PROGRESS


def check_key(key: object) -> None:
    """Refuse what cannot be a message id: the stores key on non-empty strings only.

    Raises :class:`~reliable_messaging.InvalidMessage` (also ``TypeError``/``ValueError``):
    a message without a usable id is a property of the message, and the handler runner never
    asks (it processes a message without an id without deduplication).
    """
    if not isinstance(key, str) or not key:
        raise InvalidMessage(f"a dedup key must be a non-empty str, got {key!r}")


class ThreadTokens:
    """Owner tokens ``<store instance>:<thread number>``: one per (store, thread), never reused.

    A claim belongs to the thread that took it, since the handler runner claims, runs and marks
    done or releases on one consumer thread. Thread ids are reused once a thread ends, so the
    token is numbered per thread by the store instead.
    """

    def __init__(self) -> None:
        self.instance = uuid.uuid4().hex[:16]
        self._local = threading.local()
        self._numbers = itertools.count(1)

    def __call__(self) -> str:
        try:
            token: str = self._local.token
        except AttributeError:
            token = self._local.token = f"{self.instance}:{next(self._numbers):x}"
        return token


class MemoryDedupStore(DedupStore):
    """Claims and done records in a dict, bounded to ``max_entries`` keys, guarded by one lock.

    Every operation is O(1) and takes a couple of microseconds: the cost of deduplication is
    negligible next to a broker round trip.

    *Ownership.* A claim belongs to the thread that took it: the handler runner claims, runs
    the handler and marks done or releases on one consumer thread. So two consumer threads
    sharing one store exclude each other; :meth:`release` from any other thread leaves the claim
    alone; and a thread claiming a key it already holds (its earlier ``release`` never happened)
    gets it again (``ACQUIRED``, lease renewed) instead of waiting out its own lease.

    *Expiry.* Times come from ``clock`` (monotonic seconds, injectable for tests). A claim not
    released or marked done within ``lease`` seconds is free again. A done record lasts ``ttl``
    seconds from :meth:`mark_done`; finding it again (a duplicate) makes it the most recently
    used entry but does not extend its life.

    *Eviction.* Adding a key to a full store drops, in this order: the oldest claim if its lease
    has run out (a consumer that crashed or lost track of it), else the least recently used done
    record, even one whose ``ttl`` has not run out (a duplicate of it arriving later is processed
    again: size ``max_entries`` for the redelivery horizon). A live claim is never evicted, since
    that would let a second consumer run the same message concurrently: when every entry is a live
    claim, :meth:`claim` raises :class:`~reliable_messaging.StoreUnavailable` and the runner hands
    the message back for later, as for any unavailable store. In practice live claims number the
    messages being processed at once, far below ``max_entries``.
    """

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        lease: float = DEFAULT_LEASE,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(lease=lease, ttl=ttl)
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError(f"max_entries must be an int >= 1, got {max_entries!r}", field="max_entries")
        if not callable(clock):
            raise ConfigurationError(f"clock must be a callable returning seconds, got {clock!r}", field="clock")
        self.max_entries = max_entries
        self._clock = clock
        self._token = ThreadTokens()
        self._lock = threading.Lock()
        # key -> (lease deadline, owner token). Insertion order is lease order: every
        # (re)claim is appended with now + lease, and the clock does not go back.
        self._claims: OrderedDict[str, tuple[float, str]] = OrderedDict()
        # key -> ttl deadline, least recently used first.
        self._done: OrderedDict[str, float] = OrderedDict()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"MemoryDedupStore(max_entries={self.max_entries}, lease={self.lease}, ttl={self.ttl}, "
            f"entries={len(self)})"
        )

    def __len__(self) -> int:
        """Keys held now: claims plus done records, including expired ones not yet dropped."""
        with self._lock:
            return len(self._claims) + len(self._done)

    def claim(self, key: str) -> ClaimResult:
        """Take ``key``: ``DONE`` if recorded as done within ``ttl``, ``IN_PROGRESS`` if another
        thread holds a live claim, else ``ACQUIRED`` for ``lease`` seconds."""
        if not isinstance(key, str) or not key:
            check_key(key)
        owner = self._token()
        with self._lock:
            if self._closed:
                raise ClosedError("the dedup store is closed")
            now = self._clock()
            done = self._done
            deadline = done.get(key)
            if deadline is not None:
                if deadline > now:
                    done.move_to_end(key)
                    return _DONE
                del done[key]
            claims = self._claims
            held = claims.get(key)
            if held is not None:
                if held[0] > now and held[1] != owner:
                    return _IN_PROGRESS
                del claims[key]  # expired, or this thread's own: taken again below, at the end of the order
            elif len(claims) + len(done) >= self.max_entries:
                self._make_room(now)
            claims[key] = (now + self.lease, owner)
            return _ACQUIRED

    def mark_done(self, key: str) -> None:
        """Record ``key`` as done for ``ttl`` seconds (whoever holds the claim: the work is done)."""
        if not isinstance(key, str) or not key:
            check_key(key)
        with self._lock:
            if self._closed:
                raise ClosedError("the dedup store is closed")
            now = self._clock()
            done = self._done
            if (
                self._claims.pop(key, None) is None
                and key not in done
                and len(self._claims) + len(done) >= self.max_entries
            ):
                self._make_room(now)
            done[key] = now + self.ttl
            done.move_to_end(key)

    def release(self, key: str) -> None:
        """Drop this thread's claim on ``key``; a claim another thread holds, or a done record, stays."""
        if not isinstance(key, str) or not key:
            check_key(key)
        owner = self._token()
        with self._lock:
            if self._closed:
                raise ClosedError("the dedup store is closed")
            held = self._claims.get(key)
            if held is not None and held[1] == owner:
                del self._claims[key]

    def close(self) -> None:
        """Forget every entry; later calls raise :class:`~reliable_messaging.ClosedError`."""
        with self._lock:
            self._closed = True
            self._claims.clear()
            self._done.clear()

    def _make_room(self, now: float) -> None:
        """Drop one entry (called with the lock held, when the store is full); see the class docstring."""
        claims = self._claims
        if claims:
            oldest_key, (deadline, _) = next(iter(claims.items()))
            if deadline <= now:
                del claims[oldest_key]
                return
        if self._done:
            self._done.popitem(last=False)
            return
        raise StoreUnavailable(
            f"memory dedup store is full: all {self.max_entries} entries are live claims; "
            f"raise max_entries above the number of messages processed at once"
        )
