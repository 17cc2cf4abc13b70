"""SQLite dedup store: the embedded default, a file that outlives the consumer process.

A restarted consumer re-reads Kafka from its last committed offset, and RabbitMQ
redelivers what the dead consumer had not acknowledged: the done records in the
file recognise those duplicates. Several processes on one host may share the file
(SQLite locks it); consumers on several hosts need
:class:`~reliable_messaging._dedup.RedisDedupStore` (SQLite over a network file
system is not safe).

Two ways to use it:

* the synchronous contract (:meth:`SQLiteDedupStore.claim`, ``mark_done``, ``release``): every
  call is one statement committed before it returns;
* the pipelined path the consumers use (``claim_deferred``, ``mark_done_deferred``, ``prefetch``,
  ``flush``): a writer thread group-commits claim and done rows, many messages per transaction,
  and resolves a future per group commit; the consumer acknowledges a message to its broker only
  once that future resolved, as a publisher waits for confirms.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from .._errors import ClosedError, ConfigurationError, InvalidMessage, StoreUnavailable
from ._base import DEFAULT_LEASE, DEFAULT_TTL, ClaimResult, DedupStore
from ._memory import ThreadTokens, check_key

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_GROUP_COMMIT_INTERVAL",
    "DEFAULT_GROUP_COMMIT_SIZE",
    "SQLiteDedupStore",
]

logger = logging.getLogger("reliable_messaging.dedup")

DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds an operation waits for another connection's write lock before
:class:`~reliable_messaging.StoreUnavailable`: far above a dedup write (tens of
microseconds), short enough that a stuck lock holder is reported, not waited on forever."""

DEFAULT_GROUP_COMMIT_INTERVAL = 0.005
"""Seconds the writer thread lets deferred records accumulate before it commits them (unless
``group_commit_size`` of them are queued first, or the consumer said it is idle): the most a
deferred acknowledgement waits for the store. Other processes see a deferred claim within two
intervals: a claim row waits one group commit, by which time most messages are done (see
``_group_commit``)."""

DEFAULT_GROUP_COMMIT_SIZE = 1000
"""Deferred done records that make the writer commit at once, without waiting for the interval."""

_TABLE = "rm_dedup"

# One row per key. owner: the claiming consumer's token while claimed, NULL once done.
# expires: wall-clock seconds when the claim (now + lease) or done record (now + ttl) lapses.
# WITHOUT ROWID: the key is the only B-tree, so a write touches one tree, not a table plus its
# primary-key index. No index on expires either (it would be a second tree written on every
# claim and mark_done): cleanup walks the keys instead, see _cleanup.
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    key     TEXT PRIMARY KEY NOT NULL,
    owner   TEXT,
    expires REAL NOT NULL
) WITHOUT ROWID
"""

# Atomic claim in one statement: insert, or take over a row whose claim or done record lapsed,
# or renew the caller's own claim. Otherwise nothing changes and the row count is 0.
_CLAIM = f"""
INSERT INTO {_TABLE} (key, owner, expires) VALUES (?1, ?2, ?3)
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires = excluded.expires
WHERE {_TABLE}.expires <= ?4 OR {_TABLE}.owner = excluded.owner
"""
_STATE = f"SELECT owner FROM {_TABLE} WHERE key = ?1"
_MARK_DONE = f"""
INSERT INTO {_TABLE} (key, owner, expires) VALUES (?1, NULL, ?2)
ON CONFLICT (key) DO UPDATE SET owner = NULL, expires = excluded.expires
"""
_RELEASE = f"DELETE FROM {_TABLE} WHERE key = ?1 AND owner = ?2"
_LOOKUP = f"SELECT owner, expires FROM {_TABLE} WHERE key = ?1"

# The group commit's statements take a whole batch as one JSON parameter: one statement (one
# sqlite3_step, so one release and re-acquisition of the GIL) per batch instead of one per row,
# which matters when the consumer thread keeps the GIL busy. "WHERE true" is SQLite's required
# disambiguation of an upsert after INSERT ... SELECT.
_CLAIM_BATCH = f"""
INSERT INTO {_TABLE} (key, owner, expires)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
FROM json_each(?1) WHERE true
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires = excluded.expires
WHERE {_TABLE}.expires <= ?2 OR {_TABLE}.owner = excluded.owner
"""
_MARK_DONE_BATCH = f"""
INSERT INTO {_TABLE} (key, owner, expires) SELECT value, NULL, ?2 FROM json_each(?1) WHERE true
ON CONFLICT (key) DO UPDATE SET owner = NULL, expires = excluded.expires
"""
# A primary-key probe per id, driven by the JSON list (CROSS JOIN: SQLite keeps that order). The form
# "key IN (SELECT value FROM json_each(?1))" first builds a temporary index of the ids: 2.4x as slow for
# absent ids (0.16 vs 0.07 us each, measured on 200,000 rows), and the Kafka consumer waits for it.
_LOOKUP_BATCH = f"SELECT t.key, t.owner, t.expires FROM json_each(?1) AS j CROSS JOIN {_TABLE} AS t ON t.key = j.value"

# Cleanup: find the key LIMIT keys after the cursor, then delete the expired rows in that key range
# (one range scan; a "key IN (subquery)" form costs 2.5 times as much). No row comes to Python.
_SCAN_END = f"SELECT max(key), count(*) FROM (SELECT key FROM {_TABLE} WHERE key > ?1 ORDER BY key LIMIT ?2)"
_DELETE_EXPIRED = f"DELETE FROM {_TABLE} WHERE key > ?1 AND key <= ?2 AND expires <= ?3"

_CLEANUP_EVERY = 128
"""mark_done calls between two cleanup steps."""
_CLEANUP_BATCH = 512
"""Rows looked at per cleanup step of the synchronous path: four per mark_done, so the walk over
all keys outpaces the rate at which rows are added, and an expired row is gone within about a
quarter of ``ttl``."""
_CLEANUP_WALK = 2
"""Rows looked at per done record by the group commits' cleanup: the walk covers the table at
twice the rate rows are added, so an expired row is gone within about half of ``ttl``. (Four, as
the synchronous path does, made the walk cost four times the group commit's own writes.)"""
_CLEANUP_EVERY_GROUP = 2048
"""Done records written by group commits between two cleanup steps: a step of ~4096 keys takes
about a millisecond, and fewer steps mean fewer times the writer thread waits for the GIL."""

_SYNCHRONOUS = ("NORMAL", "FULL")

_WAL_AUTOCHECKPOINT = 10_000
"""Pages in the write-ahead log before a commit copies them into the database (SQLite's default
is 1000). A checkpoint is where synchronous=NORMAL fsyncs; every message writes the same few
B-tree pages again and again, so a larger log means far fewer fsyncs per message (about 20%
cheaper per message measured), at the price of a larger pause (tens of ms) every few thousand
messages and a log file of up to ~40 MB."""
_JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes: the log file is truncated back to this after a checkpoint, so it cannot keep a
one-off peak's size forever."""

_HISTORY = 64
"""Recent commits whose done keys are remembered (see ``_durable_since``)."""

_CLOSE_GRACE = 5.0
"""Seconds close() waits for the writer beyond the busy timeout before giving up on it."""

_WAIT = object()
"""``_local_claim``: the key's done record is queued or being written: wait for it."""
_MISSING = object()

_Row = tuple[str | None, float] | None
"""(owner, expires) of a key's row, None if it has none."""

_EMPTY: frozenset[str] = frozenset()


class SQLiteDedupStore(DedupStore):
    """Claims and done records in a SQLite file (WAL mode), shared by threads and processes.

    A new instance on the same ``path`` — after a restart, or in another process — sees every
    committed claim and done record. Expiry uses wall-clock time (``clock``, default
    :func:`time.time`), since records outlive the process; a clock jump shortens or lengthens
    leases and TTLs by the jump.

    *Cost and durability.* Each synchronous call is one SQL statement in its own transaction,
    committed before the call returns. The journal is a write-ahead log; with
    ``synchronous="NORMAL"`` (the default) a commit is written to the log file but not fsynced —
    the log is fsynced at checkpoints. So:

    * a *process crash* (kill -9, OOM, an exception) loses nothing committed: the operating
      system has the data;
    * a *power loss or OS crash* can lose the transactions committed since the last checkpoint
      (up to a few thousand messages' records; the file stays consistent). A lost done record
      means a duplicate of that message, if one comes, is processed again; a lost claim is
      harmless (its consumer died with the machine).

    Measured (``benchmarks/bench_dedup_stores.py``): about 30 microseconds per message
    (claim + mark_done, two commits) on an ordinary disk; ``synchronous="FULL"``, which fsyncs
    every commit so that done records survive power loss as well, costs ten times that or more,
    depending on the disk's fsync latency.

    *The pipelined path* (what the consumers use, :attr:`pipelined` is True) takes those commits
    off the consumer thread. A writer thread (started on first use) commits the queued claim and
    done rows in one transaction every ``group_commit_interval`` seconds (5 ms), or as soon as
    ``group_commit_size`` done records are queued, or when the consumer calls :meth:`flush`
    because it is idle. :meth:`mark_done_deferred` returns the future of the group commit that
    will hold the record (shared by all its keys); the consumer acknowledges the message to the
    broker only once it resolved, so a crash at any point leaves either no acknowledgement or a
    durable done record. :meth:`claim_deferred` answers from this process's state — its own
    claims, done records queued or being written (it waits for those: ``DONE`` means durable),
    the keys of the last group commits — or from one lookup (:meth:`prefetch` looks up a whole
    fetched batch with one ``SELECT``; :meth:`claim_batch` claims one). What the pipelined path
    gives up: **a claim becomes visible to other processes only with a later group commit**
    (≤ two ``group_commit_interval`` later, sooner when the consumer is idle), so two processes
    sharing the file may both run the handler for a message delivered to both within that window
    (a claim row the writer finds already taken is logged).
    Consumers racing on the same message ids belong on
    :class:`~reliable_messaging._dedup.RedisDedupStore`. Within one process, claims are exact.
    A group commit that fails (locked file, disk full) fails its future with
    :class:`~reliable_messaging.StoreUnavailable`; the consumer then does not acknowledge those
    messages (it rewinds or requeues them), and a later claim of such a key writes its done
    record again before answering ``DONE``. The synchronous methods keep their meaning
    alongside: :meth:`mark_done` still commits before returning, :meth:`claim` still takes the
    key atomically across processes (after waiting for a pending deferred done record).

    *Ownership* is per store instance and thread, as in
    :class:`~reliable_messaging._dedup.MemoryDedupStore`: :meth:`release` frees only a claim
    this instance took on this thread; a thread re-claiming a key it holds gets ``ACQUIRED``.

    *Threads and processes.* One write connection, used under a lock (by the synchronous calls
    and the writer thread), and one read connection for lookups, which WAL mode lets proceed while
    a write is in progress. Other processes on the file wait for its write lock up to ``timeout``
    seconds (SQLite's busy timeout), then the call raises
    :class:`~reliable_messaging.StoreUnavailable`, as does every other sqlite3 error (disk
    full, I/O error, a file that is not a database). The handler runner treats that as
    transient and hands the message back.

    *Cleanup.* Expired rows are deleted a few at a time: every 128th :meth:`mark_done` looks at the
    next 512 keys in key order (group commits of deferred records: a step per 2048 records, two
    keys looked at per record) and deletes those that lapsed, wrapping around at
    the end. An expired row is gone within about half of ``ttl``; no call ever scans the whole
    table, so a week of records costs no latency spike.

    *Schema.* Table ``rm_dedup(key TEXT PRIMARY KEY, owner TEXT, expires REAL) WITHOUT ROWID``;
    a done record is a row with ``owner`` NULL. A handler whose effects live in this same
    database can close the window between its effects and :meth:`mark_done` by inserting
    ``(key, NULL, now + ttl)`` in its own transaction.
    """

    pipelined = True
    batched = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease: float = DEFAULT_LEASE,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_BUSY_TIMEOUT,
        synchronous: str = "NORMAL",
        group_commit_interval: float = DEFAULT_GROUP_COMMIT_INTERVAL,
        group_commit_size: int = DEFAULT_GROUP_COMMIT_SIZE,
    ) -> None:
        super().__init__(lease=lease, ttl=ttl)
        if not isinstance(path, str | os.PathLike) or not os.fspath(path):
            raise ConfigurationError(f"path must be a file path, got {path!r}", field="path")
        if not callable(clock):
            raise ConfigurationError(f"clock must be a callable returning seconds, got {clock!r}", field="clock")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise ConfigurationError(f"timeout must be a number of seconds >= 0, got {timeout!r}", field="timeout")
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}", field="synchronous"
            )
        if isinstance(group_commit_interval, bool) or not isinstance(group_commit_interval, int | float) \
                or not 0 <= group_commit_interval <= 1:
            raise ConfigurationError(f"group_commit_interval must be a number of seconds in [0, 1], got "
                                     f"{group_commit_interval!r}", field="group_commit_interval")
        if isinstance(group_commit_size, bool) or not isinstance(group_commit_size, int) or group_commit_size < 1:
            raise ConfigurationError(f"group_commit_size must be an int >= 1, got {group_commit_size!r}",
                                     field="group_commit_size")
        if sqlite3.sqlite_version_info < (3, 24, 0):  # pragma: no cover - every supported Python ships newer
            raise ConfigurationError(
                f"SQLiteDedupStore needs SQLite >= 3.24 (upsert), this Python has {sqlite3.sqlite_version}"
            )
        self.path = os.fspath(path)
        self.timeout = float(timeout)
        self.synchronous = synchronous.upper()
        self.group_commit_interval = float(group_commit_interval)
        self.group_commit_size = group_commit_size
        self._clock = clock
        self._token = ThreadTokens()
        self._lock = threading.Lock()  # the write connection; taken before _state, never after it
        self._writes = 0
        self._cleanup_after = ""
        self._conn: sqlite3.Connection | None = self._connect()
        self._json = _has_json(self._conn)
        # Lookups run on their own connection: WAL readers do not wait for a group commit.
        # ":memory:" is a new empty database per connection: there, lookups share the writer's.
        self._reader_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        if self.path != ":memory:":
            try:
                self._reader = self._connect()
            except StoreUnavailable:
                self._conn.close()
                raise

        # The pipelined path's in-process state, guarded by _state (a condition the writer waits on).
        self._mutex = threading.Lock()  # hot paths take the lock itself (cheaper than the Condition's wrapper)
        self._state = threading.Condition(self._mutex)
        self._closing = False
        self._claims: dict[str, list[Any]] = {}
        """Claims taken by claim_deferred, not yet done or released: key -> [token, expires, written]
        (written: the writer took its row, so it may be in the file)."""
        self._queued_claims: set[str] = set()  # claims taken since the last group commit ...
        self._aging: set[str] = set()  # ... and those taken before it: their rows go in the next one
        self._queued_done: set[str] = set()  # done rows for the next group commit ...
        self._batch: Future[None] = Future()  # ... and the future they share
        self._queued_at = 0.0  # time.monotonic() of the first record queued since the last commit; 0 if none
        self._flush_requested = False
        self._writing: frozenset[str] | set[str] = _EMPTY  # done rows of the commit in progress ...
        self._writing_future: Future[None] | None = None  # ... and its future
        self._unwritten: set[str] = set()  # done keys whose group commit failed (handler ran, not recorded)
        self._commit_seq = 0  # commits of done records so far (group commits and mark_done calls)
        self._history: deque[tuple[int, frozenset[str] | set[str]]] = deque(maxlen=_HISTORY)
        # prefetch() results of the last two batches: key -> row, with the commit count at the lookup.
        self._ahead: tuple[int, dict[str, _Row]] = (0, {})
        self._ahead_before: tuple[int, dict[str, _Row]] = (0, {})
        self._writer: threading.Thread | None = None
        self._claim_conflicts = 0

    def __repr__(self) -> str:
        return f"SQLiteDedupStore({self.path!r}, lease={self.lease}, ttl={self.ttl}, synchronous={self.synchronous!r})"

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit BEGIN; each statement commits on its own.
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite dedup store {self.path!r}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal" and self.path != ":memory:":
                logger.warning("SQLite dedup store %s: journal mode is %s, not wal", self.path, mode)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT}")
            conn.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT}")
            conn.execute(_SCHEMA)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreUnavailable(f"cannot open SQLite dedup store {self.path!r}: {exc}") from exc
        return conn

    def _connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            raise ClosedError(f"the SQLite dedup store {self.path!r} is closed")
        return conn

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailable:
        return StoreUnavailable(f"SQLite dedup store {self.path!r}: {type(exc).__name__}: {exc}")

    def _check_open(self) -> None:
        """(_state held) ClosedError once close() began."""
        if self._closing:
            raise ClosedError(f"the SQLite dedup store {self.path!r} is closed")

    # -- the synchronous contract -----------------------------------------------------------------------

    def claim(self, key: str) -> ClaimResult:
        """Take ``key`` atomically across threads and processes (one upsert; see :class:`ClaimResult`).

        A key whose deferred done record is still queued or being written is waited for (``DONE``);
        a deferred claim of another thread of this process, not yet in the file, is ``IN_PROGRESS``.
        """
        check_key(key)
        token = self._token()
        with self._lock:
            conn = self._connection()
            with self._mutex:  # held through the statement: no deferred claim slips in between
                now = self._clock()
                local = self._local_claim(key, token, now, renew=False)
                if local is None or local is ClaimResult.ACQUIRED:
                    result = self._claim_sql(conn, key, token)
                    entry = self._claims.get(key)
                    if entry is not None and entry[0] == token and result is ClaimResult.ACQUIRED:
                        entry[1] = now + self.lease
                        entry[2] = True  # our claim row is in the file now
                    self._forget_lookahead(key)
                    return result
        if local is _WAIT:
            return self._await_done(key)
        assert isinstance(local, ClaimResult)
        return local

    def _claim_sql(self, conn: sqlite3.Connection, key: str, token: str) -> ClaimResult:
        try:
            for _ in range(3):
                now = self._clock()
                if conn.execute(_CLAIM, (key, token, now + self.lease, now)).rowcount:
                    return ClaimResult.ACQUIRED
                row = conn.execute(_STATE, (key,)).fetchone()
                if row is not None:
                    return ClaimResult.DONE if row[0] is None else ClaimResult.IN_PROGRESS
                # Deleted between the two statements (released or cleaned up): try again.
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        return ClaimResult.IN_PROGRESS  # pragma: no cover - three lost races in a row: let the runner retry

    def mark_done(self, key: str) -> None:
        """Record ``key`` as done for ``ttl`` seconds, committed before returning."""
        check_key(key)
        with self._lock:
            conn = self._connection()
            now = self._clock()
            try:
                conn.execute(_MARK_DONE, (key, now + self.ttl))
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from exc
            with self._mutex:
                if self._claims.pop(key, None) is not None:
                    self._queued_claims.discard(key)
                self._unwritten.discard(key)
                self._forget_lookahead(key)
                self._commit_seq += 1
                self._history.append((self._commit_seq, {key}))
            self._writes += 1
            if self._writes >= _CLEANUP_EVERY:
                self._writes = 0
                self._cleanup(conn, now)

    def release(self, key: str) -> None:
        """Delete this instance's and thread's claim on ``key``; anyone else's claim or a done record stays.

        A deferred claim whose row never reached the file is dropped in memory only.
        """
        check_key(key)
        token = self._token()
        with self._mutex:
            self._check_open()
            self._forget_lookahead(key)
            entry = self._claims.get(key)
            if entry is not None and entry[0] == token:
                del self._claims[key]
                self._queued_claims.discard(key)
                if not entry[2]:
                    return  # never written (the writer skips it now): nothing in the file to delete
        with self._lock:  # after a group commit in progress, which may be writing our claim row
            conn = self._connection()
            try:
                conn.execute(_RELEASE, (key, token))
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from exc

    def cleanup(self) -> int:
        """Run one cleanup step now (it also runs by itself every 128 ``mark_done``); return rows deleted."""
        with self._lock:
            return self._cleanup(self._connection(), self._clock())

    def _cleanup(self, conn: sqlite3.Connection, now: float, limit: int = _CLEANUP_BATCH) -> int:
        """Delete the expired rows among the next ``limit`` keys after the cursor (_lock held).

        Its failure is not the caller's: the done records are committed, so a locked or failing
        cleanup is logged and left to the next step.
        """
        try:
            last, count = conn.execute(_SCAN_END, (self._cleanup_after, limit)).fetchone()
            # expires is checked in the DELETE: another process may have re-claimed a key meanwhile.
            deleted: int = 0
            if count:
                deleted = conn.execute(_DELETE_EXPIRED, (self._cleanup_after, last, now)).rowcount
            self._cleanup_after = last if count == limit else ""
        except sqlite3.Error as exc:
            logger.warning("SQLite dedup store %s: cleanup of expired records failed (%s); retried later",
                           self.path, exc)
            logger.debug("cleanup failure", exc_info=exc)
            return 0
        return deleted

    # -- the pipelined path -------------------------------------------------------------------------------

    def claim_deferred(self, key: str) -> ClaimResult:
        """Claim ``key`` for this thread; the claim row reaches the file with a later group commit.

        Answered from this process's state when it knows the key, else from :meth:`prefetch`'s
        lookup or one ``SELECT``. ``DONE`` only once the done record is durable (a queued one is
        waited for, at most ``timeout`` seconds, then StoreUnavailable).
        """
        if key.__class__ is not str or not key or not key.isascii():
            _check_deferred_key(key)
        token = self._token()
        now = self._clock()
        with self._mutex:
            self._check_open()
            # The common case inlined (a consumer's hot path): a key this process has no state for,
            # absent from the file at the batch's prefetch, and no group commit since that wrote it.
            if key not in self._claims and key not in self._queued_done and key not in self._writing \
                    and key not in self._unwritten:
                seq, rows = self._ahead
                if rows.get(key, _MISSING) is None and (
                        seq == self._commit_seq or self._durable_since(key, seq) is False):
                    del rows[key]
                    self._claims[key] = [token, now + self.lease, False]
                    self._queued_claims.add(key)
                    if not self._queued_at:
                        self._first_queued()
                    return ClaimResult.ACQUIRED
            result = self._local_claim(key, token, now)
            if result is None:
                seq, row = self._lookahead_pop(key)
                if seq >= 0:
                    result = self._claim_from_row(key, row, seq, token, now)
        while result is None:
            seq = self._commit_seq  # read before the lookup: commits after it are checked in _history
            row = self._lookup(key)
            with self._mutex:
                self._check_open()
                result = self._local_claim(key, token, now)
                if result is None:
                    result = self._claim_from_row(key, row, seq, token, now)
        if result is _WAIT:
            return self._await_done(key)
        assert isinstance(result, ClaimResult)
        return result

    def mark_done_deferred(self, key: str) -> Future[None]:
        """Queue ``key``'s done record for the next group commit; returns that commit's future.

        The future (shared by every key of the commit) resolves once the record is durable, or fails
        with StoreUnavailable (ClosedError if the store closed first). Does not block.
        """
        if key.__class__ is not str or not key or not key.isascii():
            _check_deferred_key(key)
        with self._mutex:
            self._check_open()
            if self._claims.pop(key, None) is not None:
                self._queued_claims.discard(key)  # the done row replaces it
            self._ahead[1].pop(key, None)  # a lookahead answer for it is stale from now on
            self._ahead_before[1].pop(key, None)
            queued = self._queued_done
            if key in queued:
                return self._batch
            writing = self._writing_future
            if writing is not None and key in self._writing:
                return writing
            if self._unwritten:
                self._unwritten.discard(key)
            queued.add(key)
            if not self._queued_at:
                self._first_queued()
            elif len(queued) >= self.group_commit_size:
                self._state.notify()
            return self._batch

    def prefetch(self, keys: Iterable[str]) -> None:
        """Look ``keys`` up with one ``SELECT``; their next :meth:`claim_deferred` uses the answer.

        Claims nothing. A lookup that fails is logged at DEBUG and ignored (the claims then look
        their keys up one by one, and report the failure).
        """
        wanted = [key for key in keys if key.__class__ is str and key]
        if not wanted:
            return
        seq = self._commit_seq
        try:
            found = self._lookup_many(wanted)
        except (StoreUnavailable, ValueError) as exc:  # ValueError: a key SQLite cannot take
            logger.debug("dedup prefetch failed: %s", exc)
            return
        rows: dict[str, _Row] = dict.fromkeys(wanted)
        rows.update(found)
        with self._mutex:
            self._ahead_before = self._ahead
            self._ahead = (seq, rows)

    def claim_batch(self, keys: Iterable[str]) -> dict[str, ClaimResult]:
        """:meth:`claim_deferred` for a fetched batch at once: one ``SELECT``, one pass under the lock.

        The keys absent from the file and unknown to this process (the common case) are claimed with
        set operations, not one by one; keys with a row in the file are decided from it. A key left
        out of the answer — this process holds state for it (a claim, a pending done record), it is
        not ASCII, or a group commit long since the lookup may have written it — is for
        :meth:`claim_deferred` to decide when its message comes. A failed lookup leaves out every key.
        """
        wanted = set(keys)
        if not _plain_keys(wanted):  # rare: keep the keys the fast path can take, leave the rest out
            wanted = {key for key in wanted if key.__class__ is str and key and key.isascii()}
        if not wanted:
            return {}
        token = self._token()
        now = self._clock()
        seq = self._commit_seq  # read before the lookup: commits after it are checked in _history
        try:
            found = self._lookup_many(list(wanted))
        except (StoreUnavailable, ValueError) as exc:
            logger.debug("dedup batch lookup failed: %s", exc)
            return {}
        with self._mutex:
            self._check_open()
            # set.difference(dict) walks the smaller side: not the whole of a large claims dict
            for known in (self._claims, self._queued_done, self._writing, self._unwritten):
                if known:
                    wanted = wanted.difference(known)
            fresh = wanted.difference(found)
            recheck = wanted.intersection(found)
            if seq != self._commit_seq:
                since = self._committed_since(seq)
                if since is None:
                    return {}
                recheck |= fresh & since  # done since the lookup: _claim_from_row answers DONE
                fresh -= since
            results = dict.fromkeys(fresh, ClaimResult.ACQUIRED)
            if fresh:
                # One claim entry shared by the batch's keys (each key's own entry would be a Python
                # loop): renewing one renews all, and once the writer writes one of their rows, a
                # release of any of them also deletes in the file (a no-op where there is no row).
                self._claims.update(dict.fromkeys(fresh, [token, now + self.lease, False]))  # noqa: RUF024 - shared on purpose
                self._queued_claims |= fresh
                if not self._queued_at:
                    self._first_queued()
            for key in recheck:
                result = self._claim_from_row(key, found.get(key), seq, token, now)
                if isinstance(result, ClaimResult):
                    results[key] = result
        return results

    def mark_done_batch(self, keys: Iterable[str]) -> Future[None]:
        """:meth:`mark_done_deferred` for several keys at once: one pass under the lock, one future."""
        keyset = set(keys)
        if not _plain_keys(keyset):
            for key in keyset:
                _check_deferred_key(key)
        with self._mutex:
            self._check_open()
            claims = self._claims
            if claims:  # the done rows replace the claims; map() runs the pops without a Python loop
                deque(map(claims.pop, keyset, itertools.repeat(None)), maxlen=0)
            if self._queued_claims:
                self._queued_claims -= keyset
            for rows in (self._ahead[1], self._ahead_before[1]):  # lookahead answers for them are stale now
                if rows:
                    deque(map(rows.pop, keyset, itertools.repeat(None)), maxlen=0)
            if self._unwritten:
                self._unwritten -= keyset
            queued = self._queued_done
            before = len(queued)
            queued |= keyset  # a key being written now is written again: harmless, and it waits for no one
            if not self._queued_at:
                self._first_queued()
            elif before < self.group_commit_size <= len(queued):
                self._state.notify()
            return self._batch

    def flush(self) -> None:
        """Commit the queued deferred records now (the caller is idle); does not wait."""
        with self._mutex:
            if self._queued_at and not self._flush_requested:
                self._flush_requested = True
                self._state.notify()

    # -- in-process state (all under _state) --------------------------------------------------------------

    def _local_claim(self, key: str, token: str, now: float, *, renew: bool = True) -> object:
        """What this process knows about ``key``: a ClaimResult, _WAIT, or None (ask the file)."""
        if key in self._queued_done or key in self._writing or key in self._unwritten:
            return _WAIT
        entry = self._claims.get(key)
        if entry is None:
            return None
        if entry[0] == token:
            if renew:
                entry[1] = now + self.lease
                if entry[2]:  # its row is in the file: write the renewed lease too
                    self._queued_claims.add(key)
                    if not self._queued_at:
                        self._first_queued()
            return ClaimResult.ACQUIRED
        if entry[1] > now:
            return ClaimResult.IN_PROGRESS
        return None  # another thread's claim lapsed: the file decides, and it may be taken over

    def _claim_from_row(self, key: str, row: _Row, seq: int, token: str, now: float) -> object:
        """Decide from ``row``, read when ``seq`` commits were done; None if it may be stale."""
        since = self._durable_since(key, seq)
        if since is None:
            return None
        if since:
            return ClaimResult.DONE
        if row is not None and row[1] > now:
            if row[0] is None:
                return ClaimResult.DONE
            if row[0] != token:
                return ClaimResult.IN_PROGRESS
        self._claims[key] = [token, now + self.lease, False]
        self._queued_claims.add(key)
        if not self._queued_at:
            self._first_queued()
        return ClaimResult.ACQUIRED

    def _durable_since(self, key: str, seq: int) -> bool | None:
        """Whether a commit after the first ``seq`` wrote ``key``'s done record (None: too long ago to tell).

        A lookup reads the file outside _state: a group commit may complete between the read and
        its use, and the key then has no in-process trace left. The last commits' keys close that gap.
        """
        if self._commit_seq == seq:
            return False
        history = self._history
        for committed, keys in reversed(history):
            if committed <= seq:
                return False
            if key in keys:
                return True
        return False if history and history[0][0] == seq + 1 else None

    def _committed_since(self, seq: int) -> set[str] | None:
        """The keys whose done records commits after the first ``seq`` wrote (None: too long ago to tell)."""
        if self._commit_seq == seq:
            return set()
        history = self._history
        if not history or history[0][0] > seq + 1:
            return None
        keys: set[str] = set()
        for committed, written in history:
            if committed > seq:
                keys |= written
        return keys

    def _lookahead_pop(self, key: str) -> tuple[int, _Row]:
        seq, rows = self._ahead
        row = rows.pop(key, _MISSING)
        if row is _MISSING:
            seq, rows = self._ahead_before
            row = rows.pop(key, _MISSING)
            if row is _MISSING:
                return -1, None
        return seq, row  # type: ignore[return-value]

    def _forget_lookahead(self, key: str) -> None:
        self._ahead[1].pop(key, None)
        self._ahead_before[1].pop(key, None)

    def _first_queued(self) -> None:
        """The first record since the last group commit: start the interval (and the writer)."""
        self._queued_at = time.monotonic()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name=f"rm-sqlite-dedup-writer-{id(self):x}",
                                            daemon=True)
            self._writer.start()
        self._state.notify()

    def _await_done(self, key: str) -> ClaimResult:
        """``key``'s done record is queued, being written, or failed to write: have it written, wait."""
        for attempt in range(2):
            with self._mutex:
                self._check_open()
                if key in self._unwritten:  # its group commit failed: queue it again
                    self._unwritten.discard(key)
                    self._queued_done.add(key)
                    if not self._queued_at:
                        self._first_queued()
                if key in self._queued_done:
                    future = self._batch
                elif key in self._writing and self._writing_future is not None:
                    future = self._writing_future
                else:
                    return ClaimResult.DONE  # written meanwhile
                self._flush_requested = True  # someone waits: no point in lingering
                self._state.notify()
            try:
                future.result(self.timeout + _CLOSE_GRACE)
            except StoreUnavailable:
                if attempt:
                    raise
                continue
            except FutureTimeout as exc:
                raise StoreUnavailable(f"SQLite dedup store {self.path!r}: the done record of {key!r} was not "
                                       f"written within {self.timeout + _CLOSE_GRACE:.1f}s") from exc
            return ClaimResult.DONE
        raise AssertionError("unreachable")  # pragma: no cover

    # -- lookups ------------------------------------------------------------------------------------------

    def _lookup(self, key: str) -> _Row:
        try:
            if self._reader is None:
                with self._lock:
                    row = self._connection().execute(_LOOKUP, (key,)).fetchone()
            else:
                with self._reader_lock:
                    reader = self._reader
                    if reader is None:
                        raise ClosedError(f"the SQLite dedup store {self.path!r} is closed")
                    row = reader.execute(_LOOKUP, (key,)).fetchone()
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        return None if row is None else (row[0], row[1])

    def _lookup_many(self, keys: list[str]) -> dict[str, _Row]:
        if not self._json:
            return {key: row for key in keys if (row := self._lookup(key)) is not None}
        try:
            with self._reader_lock:
                reader = self._reader
                if reader is None:
                    with self._lock:
                        rows = self._connection().execute(_LOOKUP_BATCH, (_dumps_keys(keys),)).fetchall()
                else:
                    rows = reader.execute(_LOOKUP_BATCH, (_dumps_keys(keys),)).fetchall()
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        return {key: (owner, expires) for key, owner, expires in rows}

    # -- the writer thread ----------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        state = self._state
        while True:
            with state:
                while True:
                    queued = len(self._queued_done) + len(self._queued_claims) + len(self._aging)
                    if not queued:
                        if self._closing:
                            return
                        self._queued_at = 0.0
                        state.wait()
                        continue
                    if self._flush_requested or self._closing or len(self._queued_done) >= self.group_commit_size:
                        break
                    remaining = self._queued_at + self.group_commit_interval - time.monotonic()
                    if remaining <= 0:
                        break
                    state.wait(remaining)
            try:
                self._group_commit()
            except Exception as exc:  # a bug must not leave futures hanging forever
                logger.error("SQLite dedup store %s: the writer failed: %s: %s", self.path, type(exc).__name__, exc)
                logger.debug("writer failure", exc_info=exc)

    def _group_commit(self) -> None:
        """Write the queued claim and done rows in one transaction, then resolve their future."""
        with self._lock:  # before _state: a release() either drops its claim first or deletes after us
            conn = self._conn
            with self._mutex:
                done = self._queued_done
                future = self._batch
                flushing = self._flush_requested or self._closing
                self._queued_done, self._batch = set(), Future()
                self._queued_at = 0.0
                self._flush_requested = False
                self._writing, self._writing_future = done, future
                # Claim rows wait one commit: most messages are done before then, and their done row
                # is all that is written (a claim row and then a done row would be two B-tree writes
                # per message). A flush (the consumer is idle or closing) writes them all now.
                claims = []
                claims_claims = self._claims
                for keys in (self._aging, self._queued_claims) if flushing else (self._aging,):
                    for key in keys:
                        entry = claims_claims.get(key)
                        if entry is not None:  # still claimed: not done (that row replaces it) nor released
                            entry[2] = True
                            claims.append((key, entry[0], entry[1]))
                if flushing:
                    self._aging = set()
                else:
                    self._aging = {key for key in self._queued_claims if key in claims_claims}
                    if self._aging:
                        self._queued_at = time.monotonic()  # they are written one interval from now
                self._queued_claims = set()
            error: BaseException | None = None
            if conn is None:
                error = ClosedError(f"the SQLite dedup store {self.path!r} is closed")
            elif claims or done:
                try:
                    self._before_group_commit()
                    self._write(conn, claims, done)
                except sqlite3.Error as exc:
                    error = self._unavailable(exc)
                except Exception as exc:  # noqa: BLE001 - e.g. a key SQLite cannot encode: fail the batch, not the writer
                    error = StoreUnavailable(f"SQLite dedup store {self.path!r}: {type(exc).__name__}: {exc}")
                else:
                    self._after_group_commit(done)
            with self._mutex:
                self._writing, self._writing_future = _EMPTY, None
                if error is None:
                    if done:
                        self._commit_seq += 1
                        self._history.append((self._commit_seq, done))
                else:
                    self._unwritten |= done
            if error is None and done and conn is not None:
                self._writes += len(done)
                if self._writes >= _CLEANUP_EVERY_GROUP:
                    self._cleanup(conn, self._clock(), _CLEANUP_WALK * self._writes)
                    self._writes = 0
        if error is None:
            future.set_result(None)
        else:
            logger.warning("SQLite dedup store %s: could not record %d messages as done (%s); they are not "
                           "acknowledged", self.path, len(done), error)
            future.set_exception(error)

    def _write(self, conn: sqlite3.Connection, claims: list[tuple[str, str, float]], done: set[str]) -> None:
        now = self._clock()
        if not claims and self._json:
            # One statement is its own transaction: one sqlite3 call, so the writer thread waits for
            # the GIL once per group commit rather than three times (BEGIN, the upsert, COMMIT).
            conn.execute(_MARK_DONE_BATCH, (_dumps_keys(list(done)), now + self.ttl))
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            if claims:
                if self._json:
                    changed = conn.execute(_CLAIM_BATCH, (_dumps(claims), now)).rowcount
                else:
                    changed = conn.executemany(_CLAIM, [(k, t, e, now) for k, t, e in claims]).rowcount
                if changed < len(claims):
                    self._claim_conflicts += len(claims) - changed
                    logger.warning("SQLite dedup store %s: %d claims were already taken by another process (claims "
                                   "reach the file with the group commit; use RedisDedupStore for consumers racing "
                                   "on the same ids)", self.path, len(claims) - changed)
            if done:
                expires = now + self.ttl
                if self._json:
                    conn.execute(_MARK_DONE_BATCH, (_dumps_keys(list(done)), expires))
                else:
                    conn.executemany(_MARK_DONE, [(key, expires) for key in done])
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled it back itself
                conn.execute("ROLLBACK")
            raise

    def _before_group_commit(self) -> None:
        """Called by the writer thread before each group commit (_lock held). A seam for tests."""

    def _after_group_commit(self, keys: frozenset[str] | set[str]) -> None:
        """Called by the writer thread once ``keys``' done records are durable, before their future
        resolves (_lock held). A seam for tests (e.g. a crash at exactly that point)."""

    # -- closing --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Commit what is queued, stop the writer, close the connections; later calls raise ClosedError.

        Waits for the writer at most ``timeout`` + 5 seconds; futures still pending after that fail
        with ClosedError.
        """
        with self._mutex:
            self._closing = True
            writer = self._writer
            self._state.notify_all()
        if writer is not None and writer is not threading.current_thread():
            writer.join(self.timeout + _CLOSE_GRACE)
            if writer.is_alive():
                logger.warning("SQLite dedup store %s: the writer did not finish within %.1fs", self.path,
                               self.timeout + _CLOSE_GRACE)
        with self._lock:
            conn, self._conn = self._conn, None
        with self._reader_lock:
            reader, self._reader = self._reader, None
        with self._mutex:
            leftover = self._batch if (self._queued_done or self._queued_claims or self._aging) else None
            self._queued_done, self._queued_claims, self._aging = set(), set(), set()
        if leftover is not None and not leftover.done():
            leftover.set_exception(ClosedError(f"the SQLite dedup store {self.path!r} closed before the write"))
        for connection in (conn, reader):
            if connection is not None:
                connection.close()


def _plain_keys(keys: set[str]) -> bool:
    """Whether every key is a non-empty ASCII ``str`` (checked in C: one join, no Python loop)."""
    try:
        return "".join(keys).isascii() and "" not in keys
    except TypeError:  # not all str
        return False


def _check_deferred_key(key: object) -> None:
    """check_key, plus: a key SQLite can store (a lone surrogate would fail its whole group commit)."""
    check_key(key)
    assert isinstance(key, str)
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidMessage(f"a dedup key must be encodable as UTF-8, got {key!r}") from exc


_NEEDS_ESCAPING = re.compile(r'[\x00-\x1f\\]')


def _dumps_keys(keys: list[str]) -> str:
    """``keys`` as a JSON array: joined as they are when none needs escaping (ten times cheaper
    than json.dumps, which matters for a batch's keys on the consumer thread)."""
    joined = '","'.join(keys)
    if keys and joined.count('"') == 2 * (len(keys) - 1) and _NEEDS_ESCAPING.search(joined) is None:
        return f'["{joined}"]'
    return _dumps(keys)


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _has_json(conn: sqlite3.Connection) -> bool:
    """Whether this SQLite has the JSON functions (built in since 3.38, usually compiled in before)."""
    try:
        conn.execute("SELECT count(*) FROM json_each('[1]')").fetchone()
    except sqlite3.Error:
        return False
    return True
