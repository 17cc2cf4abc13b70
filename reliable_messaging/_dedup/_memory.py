"""In-process dedup store: a bounded LRU of message ids with lease and TTL expiry.

For a single consumer process whose duplicates arrive while it runs (a producer
resend, a RabbitMQ redelivery, a Kafka rebalance within the process). It
forgets everything on restart; use :class:`~reliable_messaging._dedup.SQLiteDedupStore`
when duplicates must be recognised across restarts, and
:class:`~reliable_messaging._dedup.RedisDedupStore` across consumer processes.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TypeAlias, cast

from .._errors import ClosedError, ConfigurationError, InvalidMessage, StoreUnavailable
from ._base import DEFAULT_LEASE, DEFAULT_TTL, ClaimResult, DedupStore

__all__ = ["DEFAULT_MAX_ENTRIES", "MemoryDedupStore"]

DEFAULT_MAX_ENTRIES = 100_000
"""Message ids remembered at most: about 10 MB of keys and bookkeeping for uuid-sized ids,
and a few minutes of traffic at several hundred messages per second."""

_ACQUIRED = ClaimResult.ACQUIRED
_DONE = ClaimResult.DONE
_IN_PROGRESS = ClaimResult.IN_PROGRESS

_LOCK_FREE: bool = bool(getattr(sys, "_is_gil_enabled", lambda: True)())
"""Whether :class:`MemoryDedupStore` may take its lock-free fast paths: only with the GIL, which
makes each single ``OrderedDict`` operation atomic (see the class docstring). A free-threaded
build (PEP 703, ``python3.13t`` with the GIL off) runs every operation under the store's lock.
Checked once, at import: a running interpreter may turn the GIL on, never off."""


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


def _plain_key(key: object) -> str:
    """The slow half of key validation: refuse a bad key, turn a ``str`` subclass into a plain ``str``.

    The lock-free paths need exact ``str`` keys: hashing and comparing them runs no Python code,
    so an ``OrderedDict`` operation on them cannot be interrupted by another thread.
    """
    check_key(key)
    return str.__str__(cast(str, key))


def _exact_keys(keys: list[str]) -> bool:
    """Whether ``keys`` is non-empty and every key a non-empty exact ``str`` (checked without a Python loop):
    what the lock-free batch paths take; anything else goes key by key."""
    return bool(keys) and set(map(type, keys)) == {str} and "" not in keys


_owners = threading.local()
"""This thread's owner token for memory-store claims (``_owners.token``, made on first use)."""

_Entries: TypeAlias = "OrderedDict[str, float | tuple[float, object]]"
"""key -> ttl deadline (a done record) or (lease deadline, owner token) (a claim)."""


class MemoryDedupStore(DedupStore):
    """Claims and done records in one ordered dict, bounded to ``max_entries`` keys.

    Built for the consumer's hot path: a new message costs a lock-free ``claim`` (one dict insert)
    and a ``mark_done`` (one short critical section), well under a microsecond together.

    *Ownership.* A claim belongs to the thread that took it: the handler runner claims, runs
    the handler and marks done or releases on one consumer thread. So two consumer threads
    sharing one store exclude each other; :meth:`release` from any other thread leaves the claim
    alone; and a thread claiming a key it already holds (its earlier ``release`` never happened)
    gets it again (``ACQUIRED``, lease renewed) instead of waiting out its own lease.

    *Expiry.* Times come from ``clock`` (monotonic seconds, injectable for tests). A claim not
    released or marked done within ``lease`` seconds is free again. A done record lasts ``ttl``
    seconds from :meth:`mark_done`; finding it again (a duplicate) makes it the most recently
    used entry but does not extend its life.

    *Eviction.* Adding a key to a full store drops the least recently used entry that is not a
    live claim: a done record, even one whose ``ttl`` has not run out (a duplicate of it arriving
    later is processed again: size ``max_entries`` for the redelivery horizon), or a claim whose
    lease has run out (a consumer that crashed or lost track of it). A live claim is never evicted,
    since that would let a second consumer run the same message concurrently: when every entry is
    a live claim, :meth:`claim` raises :class:`~reliable_messaging.StoreUnavailable` and the runner
    hands the message back for later, as for any unavailable store. In practice live claims number
    the messages being processed at once, far below ``max_entries``.

    *Thread safety.* One ``OrderedDict`` maps each key to its done record (the ttl deadline, a
    ``float``) or its claim (a ``(lease deadline, owner token)`` tuple), least recently used first;
    entries are replaced whole, never mutated. One rule makes the lock-free paths safe: **only a
    lock holder changes or removes a key that is present.** Without the lock a thread only adds an
    absent key (``setdefault``: of threads racing for a free key, exactly one gets its own claim
    back, the others see it), reorders (``move_to_end`` on a duplicate, which changes no entry)
    and reads (``claim`` answers ``DONE`` and ``IN_PROGRESS`` from one lookup). So what a lock
    holder checked stays as it was until it acts: a takeover of an expired claim, a release or an
    eviction cannot lose a done record written meanwhile, which is why :meth:`mark_done` takes the
    lock too, briefly. The common claim, of a new message, takes no lock; expired entries, a
    thread's own claim, eviction and :meth:`close` do.

    This relies on each single ``OrderedDict`` operation on an exact ``str`` key being atomic,
    which CPython's GIL guarantees (hashing and comparing exact ``str`` keys runs no Python code;
    a ``str`` subclass key is copied to a plain ``str``). A free-threaded build (GIL off) does not
    guarantee it, so there every operation takes the lock.
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
        self._lock = threading.Lock()
        # Least recently used first. Owner tokens are per-thread objects compared by identity: a
        # token is kept alive by the claims holding it, so no other thread's token shares its id.
        self._entries: _Entries = OrderedDict()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"MemoryDedupStore(max_entries={self.max_entries}, lease={self.lease}, ttl={self.ttl}, "
            f"entries={len(self)})"
        )

    def __len__(self) -> int:
        """Keys held now: claims plus done records, including expired ones not yet dropped."""
        return len(self._entries)

    def claim(self, key: str) -> ClaimResult:
        """Take ``key``: ``DONE`` if recorded as done within ``ttl``, ``IN_PROGRESS`` if another
        thread holds a live claim, else ``ACQUIRED`` for ``lease`` seconds."""
        if type(key) is not str or not key:
            key = _plain_key(key)
        entries = self._entries  # read before _closed: close() sets _closed, then swaps the dict
        if self._closed:
            raise ClosedError("the dedup store is closed")
        try:
            owner = _owners.token
        except AttributeError:
            owner = _owners.token = object()
        if not _LOCK_FREE:
            return self._claim_locked(key, owner)
        now = self._clock()
        mine = (now + self.lease, owner)
        # Lock-free: setdefault adds the key only if it is absent, atomically, so of threads racing
        # for a free key exactly one gets its own tuple back. (A claim racing close() may land in
        # the dict close() discarded: as if it had come just before.)
        held = entries.setdefault(key, mine)
        if held is mine:
            if len(entries) > self.max_entries:
                self._make_room_after_claim(entries, key, mine, now)
            return _ACQUIRED
        # Answers that only read: the entry is one a claim or mark_done wrote, whole.
        if isinstance(held, float):
            if held > now:
                try:
                    entries.move_to_end(key)  # reordering only: changes no entry
                except KeyError:
                    return _DONE  # evicted meanwhile: this duplicate came just before that
                return _DONE
        elif held[0] > now and held[1] is not owner:
            return _IN_PROGRESS
        # An expired entry, or this thread's own claim: replacing it needs the lock.
        return self._claim_locked(key, owner)

    def claim_batch(self, keys: Iterable[str]) -> dict[str, ClaimResult]:
        """Claim a fetched batch's new keys at once: a lock-free ``setdefault`` each, run by ``map``.

        A key already present (done, claimed, expired) is left out for :meth:`claim` to decide when
        its message comes; so is every key if the batch could overfill the store or one is not a
        plain non-empty ``str``, and on a free-threaded build (no GIL).
        """
        wanted = list(keys)
        if not _LOCK_FREE or not _exact_keys(wanted):
            return {}
        entries = self._entries  # read before _closed, as in claim()
        if self._closed:
            raise ClosedError("the dedup store is closed")
        if len(entries) + len(wanted) > self.max_entries:
            return {}  # claim() makes room key by key
        try:
            owner = _owners.token
        except AttributeError:
            owner = _owners.token = object()
        mine = (self._clock() + self.lease, owner)
        # Each setdefault adds the key only if absent, atomically (see the class docstring).
        held = map(entries.setdefault, wanted, itertools.repeat(mine))
        return {key: _ACQUIRED for key, value in zip(wanted, held, strict=True) if value is mine}

    def _claim_locked(self, key: str, owner: object) -> ClaimResult:
        """:meth:`claim` under the lock: look again, then add, take over or answer."""
        with self._lock:
            if self._closed:
                raise ClosedError("the dedup store is closed")
            now = self._clock()
            entries = self._entries
            mine = (now + self.lease, owner)
            held = entries.setdefault(key, mine)  # not `in` then set: lock-free claims add keys meanwhile
            if held is mine:
                if len(entries) > self.max_entries and not self._evict(entries, now, self.max_entries):
                    del entries[key]
                    raise self._full()
                return _ACQUIRED
            if isinstance(held, float):
                if held > now:
                    entries.move_to_end(key)
                    return _DONE
            elif held[0] > now and held[1] is not owner:
                return _IN_PROGRESS
            # An expired done record or claim, or this thread's own claim (renewed). The key is
            # present, so only a lock holder could change it between the look above and this write.
            entries[key] = mine
            entries.move_to_end(key)
            return _ACQUIRED

    def _make_room_after_claim(self, entries: _Entries, key: str, mine: tuple[float, object], now: float) -> None:
        """After a lock-free claim overfilled the store: evict, or withdraw the claim and raise.

        ``now`` is the claim's: an older time only makes a claim look live a little longer.
        """
        lock = self._lock
        lock.acquire()  # not `with`: this runs once per message when the store is full
        try:
            if self._evict(entries, now, self.max_entries):
                return
            # Only live claims are left. Other threads may have seen this claim meanwhile and
            # answered IN_PROGRESS: they hand their message back for later, right for a full store.
            if entries.get(key) is mine:
                del entries[key]
            raise self._full()
        finally:
            lock.release()

    def mark_done(self, key: str) -> None:
        """Record ``key`` as done for ``ttl`` seconds (whoever holds the claim: the work is done)."""
        if type(key) is not str or not key:
            key = _plain_key(key)
        now = self._clock()
        deadline = now + self.ttl
        # Under the lock although the write is unconditional: it changes a present key (usually
        # this thread's claim), and only lock holders may, or the check-then-act of a takeover,
        # a release or an eviction could lose this done record between its check and its act.
        lock = self._lock
        lock.acquire()  # not `with`, which costs twice as much on this per-message path
        try:
            if self._closed:
                raise ClosedError("the dedup store is closed")
            entries = self._entries
            entries[key] = deadline
            entries.move_to_end(key)
            # Over the bound if the key is new, or lock-free claims added keys meanwhile. The new
            # record, most recently used, is evicted only if every other entry is a live claim.
            if len(entries) > self.max_entries:
                self._evict(entries, now, self.max_entries)
                if key not in entries:
                    raise self._full()
        finally:
            lock.release()

    def release(self, key: str) -> None:
        """Drop this thread's claim on ``key``; a claim another thread holds, or a done record, stays."""
        if type(key) is not str or not key:
            key = _plain_key(key)
        owner = getattr(_owners, "token", None)
        with self._lock:
            if self._closed:
                raise ClosedError("the dedup store is closed")
            entries = self._entries
            held = entries.get(key)
            if held is not None and not isinstance(held, float) and held[1] is owner:
                del entries[key]

    def close(self) -> None:
        """Forget every entry; later calls raise :class:`~reliable_messaging.ClosedError`."""
        with self._lock:
            self._closed = True
            # A new dict rather than clear(): a lock-free claim racing close() writes to the old one.
            self._entries = OrderedDict()

    def _evict(self, entries: _Entries, now: float, bound: int) -> bool:
        """Drop the least recently used entries that are not live claims until at most ``bound`` are
        left (lock held); False if only live claims are left."""
        while len(entries) > bound:
            # The first key, through a fresh iterator each time: lock-free claims may add keys
            # while the lock is held, and an OrderedDict iterator refuses to go on after that.
            for key in entries:  # noqa: B007 - only the first key is wanted
                break
            held = entries[key]
            if isinstance(held, float) or held[0] <= now:
                del entries[key]
            elif not self._evict_past_live_claims(entries, now):
                return False
        return True

    def _evict_past_live_claims(self, entries: _Entries, now: float) -> bool:
        """:meth:`_evict` when the least recently used entry is a live claim (lock held).

        Live claims are moved to the end until an entry that is not one comes first, so later
        evictions do not walk past them again: they are messages in flight, whose recency matters
        to no one. False if every entry is a live claim.
        """
        for _ in range(len(entries)):
            for key in entries:  # noqa: B007 - only the first key is wanted
                break
            held = entries[key]
            if isinstance(held, float) or held[0] <= now:
                del entries[key]
                return True
            entries.move_to_end(key)
        return False

    def _full(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"memory dedup store is full: all {self.max_entries} entries are live claims; "
            f"raise max_entries above the number of messages processed at once"
        )
