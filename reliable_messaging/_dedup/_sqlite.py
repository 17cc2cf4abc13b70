"""SQLite dedup store: the embedded default, a file that outlives the consumer process.

A restarted consumer re-reads Kafka from its last committed offset, and RabbitMQ
redelivers what the dead consumer had not acknowledged: the done records in the
file recognise those duplicates. Several processes on one host may share the file
(SQLite locks it); consumers on several hosts need
:class:`~reliable_messaging._dedup.RedisDedupStore` (SQLite over a network file
system is not safe).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable

from .._errors import ClosedError, ConfigurationError, StoreUnavailable
from ._base import DEFAULT_LEASE, DEFAULT_TTL, ClaimResult, DedupStore
from ._memory import ThreadTokens, check_key

__all__ = ["DEFAULT_BUSY_TIMEOUT", "SQLiteDedupStore"]

logger = logging.getLogger("reliable_messaging.dedup")

DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds an operation waits for another connection's write lock before
:class:`~reliable_messaging.StoreUnavailable`: far above a dedup write (tens of
microseconds), short enough that a stuck lock holder is reported, not waited on forever."""

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
_SCAN = f"SELECT key, expires FROM {_TABLE} WHERE key > ?1 ORDER BY key LIMIT ?2"
_DELETE_EXPIRED = f"DELETE FROM {_TABLE} WHERE key = ?1 AND expires <= ?2"

_CLEANUP_EVERY = 128
"""mark_done calls between two cleanup steps."""
_CLEANUP_BATCH = 512
"""Rows looked at per cleanup step: four per mark_done, so the walk over all keys outpaces the
rate at which rows are added, and an expired row is gone within about a quarter of ``ttl``."""

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


class SQLiteDedupStore(DedupStore):
    """Claims and done records in a SQLite file (WAL mode), shared by threads and processes.

    A new instance on the same ``path`` — after a restart, or in another process — sees every
    committed claim and done record. Expiry uses wall-clock time (``clock``, default
    :func:`time.time`), since records outlive the process; a clock jump shortens or lengthens
    leases and TTLs by the jump.

    *Cost and durability.* Each call is one SQL statement in its own transaction, committed
    before the call returns: a claim must be visible to other processes at once, and a done
    record must be stored before the broker acknowledgement (the whole point of recording it).
    The journal is a write-ahead log; with ``synchronous="NORMAL"`` (the default) a commit is
    written to the log file but not fsynced — the log is fsynced at checkpoints. So:

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

    *Ownership* is per store instance and thread, as in
    :class:`~reliable_messaging._dedup.MemoryDedupStore`: :meth:`release` frees only a claim
    this instance took on this thread; a thread re-claiming a key it holds gets ``ACQUIRED``.

    *Threads and processes.* One connection, used under a lock: SQLite serialises writers
    anyway, and a Python lock hands over in microseconds where SQLite's busy handler sleeps
    in milliseconds. Other processes on the file wait for its write lock up to ``timeout``
    seconds (SQLite's busy timeout), then the call raises
    :class:`~reliable_messaging.StoreUnavailable`, as does every other sqlite3 error (disk
    full, I/O error, a file that is not a database). The handler runner treats that as
    transient and hands the message back.

    *Cleanup.* Expired rows are deleted a few at a time: every 128th :meth:`mark_done` looks at
    the next 512 keys in key order and deletes those that lapsed, wrapping around at the end.
    No call ever scans the whole table, so a week of records costs no latency spike.

    *Schema.* Table ``rm_dedup(key TEXT PRIMARY KEY, owner TEXT, expires REAL) WITHOUT ROWID``;
    a done record is a row with ``owner`` NULL. A handler whose effects live in this same
    database can close the window between its effects and :meth:`mark_done` by inserting
    ``(key, NULL, now + ttl)`` in its own transaction.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease: float = DEFAULT_LEASE,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_BUSY_TIMEOUT,
        synchronous: str = "NORMAL",
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
        if sqlite3.sqlite_version_info < (3, 24, 0):  # pragma: no cover - every supported Python ships newer
            raise ConfigurationError(
                f"SQLiteDedupStore needs SQLite >= 3.24 (upsert), this Python has {sqlite3.sqlite_version}"
            )
        self.path = os.fspath(path)
        self.timeout = float(timeout)
        self.synchronous = synchronous.upper()
        self._clock = clock
        self._token = ThreadTokens()
        self._lock = threading.Lock()
        self._writes = 0
        self._cleanup_after = ""
        self._conn: sqlite3.Connection | None = self._connect()

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

    def claim(self, key: str) -> ClaimResult:
        """Take ``key`` atomically across threads and processes (one upsert; see :class:`ClaimResult`)."""
        check_key(key)
        token = self._token()
        with self._lock:
            conn = self._connection()
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
            self._writes += 1
            if self._writes >= _CLEANUP_EVERY:
                self._writes = 0
                self._cleanup(conn, now)

    def release(self, key: str) -> None:
        """Delete this instance's and thread's claim on ``key``; anyone else's claim or a done record stays."""
        check_key(key)
        token = self._token()
        with self._lock:
            conn = self._connection()
            try:
                conn.execute(_RELEASE, (key, token))
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from exc

    def cleanup(self) -> int:
        """Run one cleanup step now (it also runs by itself every 128 ``mark_done``); return rows deleted."""
        with self._lock:
            return self._cleanup(self._connection(), self._clock())

    def _cleanup(self, conn: sqlite3.Connection, now: float) -> int:
        """Delete the expired rows among the next keys after the cursor (lock held).

        Its failure is not the caller's: the done record is committed, so a locked or failing
        cleanup is logged and left to the next step.
        """
        try:
            rows = conn.execute(_SCAN, (self._cleanup_after, _CLEANUP_BATCH)).fetchall()
            self._cleanup_after = rows[-1][0] if len(rows) == _CLEANUP_BATCH else ""
            expired = [(key, now) for key, expires in rows if expires <= now]
            if not expired:
                return 0
            conn.execute("BEGIN IMMEDIATE")
            try:
                # expires is checked again: another process may have re-claimed the key meanwhile.
                deleted = conn.executemany(_DELETE_EXPIRED, expired).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            logger.warning("SQLite dedup store %s: cleanup of expired records failed (%s); retried later",
                           self.path, exc)
            logger.debug("cleanup failure", exc_info=exc)
            return 0
        return deleted

    def close(self) -> None:
        """Close the connection; later calls raise :class:`~reliable_messaging.ClosedError`."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
