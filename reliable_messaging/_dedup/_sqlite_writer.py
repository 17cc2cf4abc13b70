"""The SQLite store's writer thread: journaled done records and aged claims into the file, in group commits.

A mixin of :class:`~reliable_messaging._dedup.SQLiteDedupStore` (the state it works on is the store's,
documented there). Every ``group_commit_interval`` (or ``group_commit_size`` records) it takes what
:meth:`mark_done` journaled and the claims taken one commit ago and still held, writes them in one
transaction, renews the instance's heartbeat, deletes a few expired rows, and deletes the journal
segments whose records are all in the file. A commit that fails (the file locked by another process
longer than the busy timeout, a full disk) is retried; the records stay in the journal meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._journal import DoneJournal
from ._process import INSTANCE_ID_LENGTH
from ._sqlite_owners import MARK_DONE_BATCH, OWNERS, TABLE, OwnerRegistry, dumps

__all__ = ["CLEANUP_EVERY", "WRITE_CLAIMS", "SQLiteWriter"]

logger = logging.getLogger("reliable_messaging.dedup")

# Writing claim rows: take a key that is free, whose claim or done record lapsed, that this instance
# holds already (what it decided in memory stands), or whose owner is not registered (reaped).
WRITE_CLAIMS = f"""
INSERT INTO {TABLE} (key, owner, expires)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
FROM json_each(?1) WHERE true
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires = excluded.expires
WHERE {TABLE}.expires <= ?2
   OR substr({TABLE}.owner, 1, {INSTANCE_ID_LENGTH}) = substr(excluded.owner, 1, {INSTANCE_ID_LENGTH})
   OR ({TABLE}.owner IS NOT NULL AND NOT EXISTS (
       SELECT 1 FROM {OWNERS} o WHERE o.instance = substr({TABLE}.owner, 1, {INSTANCE_ID_LENGTH})))
"""
# Cleanup: find the key LIMIT keys after the cursor, then delete the expired rows in that key range.
_SCAN_END = f"SELECT max(key), count(*) FROM (SELECT key FROM {TABLE} WHERE key > ?1 ORDER BY key LIMIT ?2)"
_DELETE_EXPIRED = f"DELETE FROM {TABLE} WHERE key > ?1 AND key <= ?2 AND expires <= ?3"
CLEANUP_EVERY = 2048
"""Done records written between two cleanup steps (a step looks at two keys per record written: the
walk covers the table at twice the rate rows are added, so an expired row is gone within ~ttl/2)."""

_RETRY_PAUSE = 0.5
"""Seconds the writer waits after a failed group commit before trying again."""



class SQLiteWriter:
    """The writer thread's half of the SQLite store (see the module docstring)."""

    # The store's state (set in SQLiteDedupStore.__init__).
    path: str
    ttl: float
    liveness: float
    group_commit_interval: float
    group_commit_size: int
    _clock: Callable[[], float]
    _lock: threading.Lock
    _mutex: threading.Lock
    _state: threading.Condition
    _claimed: dict[str, list[Any]]
    _fresh: set[str]
    _aging: set[str]
    _pending: dict[str, float]
    _queue: list[str]
    _queued_at: float
    _retired: list[Path]
    _closing: bool
    _writes: int
    _cleanup_after: str
    _beat_due: float
    _journal: DoneJournal | None
    _owners: OwnerRegistry

    def _connection(self) -> sqlite3.Connection:
        raise NotImplementedError

    def _transaction(self, conn: sqlite3.Connection, body: Callable[[], object]) -> None:
        raise NotImplementedError

    # -- the writer thread --------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        state = self._state
        while True:
            with state:
                while True:
                    now = time.monotonic()
                    if self._queue or self._fresh or self._aging:
                        if self._closing or len(self._queue) >= self.group_commit_size:
                            break
                        remaining = self._queued_at + self.group_commit_interval - now
                    elif self._closing:
                        return
                    else:
                        remaining = self._beat_due - now
                    if remaining <= 0:
                        break
                    state.wait(remaining)
            try:
                self._group_commit()
            except Exception as exc:  # noqa: BLE001 - a failing disk or a locked file: keep the records, retry
                logger.warning("SQLite dedup store %s: could not write done records (%s: %s); they stay in the "
                               "journal and are written later", self.path, type(exc).__name__, exc)
                with state:
                    if self._closing:
                        return
                time.sleep(_RETRY_PAUSE)

    def _group_commit(self) -> None:
        with self._lock:  # before the snapshot: a release() either drops its claim first or deletes after us
            conn = self._connection()
            with self._mutex:
                keys, self._queue = self._queue, []
                claimed = self._claimed
                claims = []
                for key in self._aging:
                    entry = claimed.get(key)
                    if entry is not None and not entry[2]:  # still claimed, not done nor released
                        entry[2] = True
                        claims.append([*entry[:2], key])
                self._aging = {key for key in self._fresh if key in claimed}
                self._fresh = set()
                self._queued_at = time.monotonic() if (self._aging or self._queue) else 0.0
                journal = self._journal
                if journal is not None and journal.full:
                    # Every key of the old segment is in `keys` or in the file: delete it after this commit.
                    self._retired.append(journal.rotate())
            now = self._clock()
            beat = time.monotonic() >= self._beat_due

            def write() -> None:
                self._before_group_commit()
                if claims:
                    changed = conn.execute(WRITE_CLAIMS, (_claims_json(claims), now)).rowcount
                    if changed < len(claims):
                        logger.warning("SQLite dedup store %s: %d claims were already taken by another process "
                                       "(claims reach the file with the group commit; use RedisDedupStore for "
                                       "consumers racing on the same ids)", self.path, len(claims) - changed)
                if keys:
                    conn.execute(MARK_DONE_BATCH, (dumps(keys), now + self.ttl))
                if beat:
                    self._owners.beat(conn)

            try:
                self._transaction(conn, write)
            except BaseException:
                with self._mutex:
                    self._queue[:0] = keys  # written later; they stay in the journal meanwhile
                    if keys and not self._queued_at:
                        self._queued_at = time.monotonic()
                raise
            if beat:
                self._beat_due = time.monotonic() + self.liveness / 5
            self._writes += len(keys)
            if self._writes >= CLEANUP_EVERY:
                self._cleanup(conn, now, 2 * self._writes)
                self._writes = 0
            with self._mutex:
                pending = self._pending
                for key in keys:
                    pending.pop(key, None)
                retired, self._retired = self._retired, []
                self._state.notify_all()  # a mark_done waiting for room
        for segment in retired:
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()

    def _before_group_commit(self) -> None:
        """Called by the writer at the start of each group commit's transaction. A seam for tests."""

    # -- cleanup ------------------------------------------------------------------------------------------

    def cleanup(self) -> int:
        """Run one cleanup step now (the writer runs them by itself); return rows deleted."""
        with self._lock:
            return self._cleanup(self._connection(), self._clock(), 512)

    def _cleanup(self, conn: sqlite3.Connection, now: float, limit: int) -> int:
        """Delete the expired rows among the next ``limit`` keys after the cursor (_lock held); a failure
        is logged and left to the next step."""
        try:
            last, count = conn.execute(_SCAN_END, (self._cleanup_after, limit)).fetchone()
            deleted: int = 0
            if count:
                deleted = conn.execute(_DELETE_EXPIRED, (self._cleanup_after, last, now)).rowcount
            self._cleanup_after = last if count == limit else ""
        except sqlite3.Error as exc:
            logger.warning("SQLite dedup store %s: cleanup of expired records failed (%s); retried later",
                           self.path, exc)
            return 0
        return deleted


def _claims_json(claims: list[list[Any]]) -> str:
    """[[key, token, expires], ...] for WRITE_CLAIMS (entries are [token, expires, key])."""
    rows = [[key, token, expires] for token, expires, key in claims]
    return json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
