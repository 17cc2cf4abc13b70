"""The SQLite store's owner records: which instances' claims are live, and taking over the dead ones'.

Every :class:`~reliable_messaging._dedup.SQLiteDedupStore` instance registers a row in
``rm_owners`` naming its process (:mod:`._process`). A claim row whose owner instance has no row
is free. Reaping a dead instance — its process is gone (same host), or its heartbeat stopped
(another host) — replays its done journal (:mod:`._journal`) into the file and deletes its row in
one transaction, so its finished messages stay finished and its unfinished ones become free at
the same moment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path

from ._journal import journal_segments, read_segment
from ._process import ProcessIdentity, process_state

__all__ = ["MARK_DONE_BATCH", "OWNERS_SCHEMA", "OwnerRegistry", "dumps"]

logger = logging.getLogger("reliable_messaging.dedup")

TABLE = "rm_dedup"
OWNERS = "rm_owners"

OWNERS_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {OWNERS} (instance TEXT PRIMARY KEY NOT NULL, host TEXT NOT NULL,"
    " boot TEXT NOT NULL, pid INTEGER NOT NULL, start TEXT NOT NULL, beat REAL NOT NULL) WITHOUT ROWID"
)
MARK_DONE_BATCH = f"""
INSERT INTO {TABLE} (key, owner, expires) SELECT value, NULL, ?2 FROM json_each(?1) WHERE true
ON CONFLICT (key) DO UPDATE SET owner = NULL, expires = excluded.expires
"""
_REGISTER = f"INSERT OR REPLACE INTO {OWNERS} (instance, host, boot, pid, start, beat) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
_BEAT = f"UPDATE {OWNERS} SET beat = ?2 WHERE instance = ?1"
_ROWS = f"SELECT instance, host, boot, pid, start, beat FROM {OWNERS}"
_ROWS_OF = _ROWS + " WHERE instance IN (SELECT value FROM json_each(?1))"
_UNREGISTER = f"DELETE FROM {OWNERS} WHERE instance = ?1"

_Row = tuple[str, str, str, int, str, float]


class OwnerRegistry:
    """This instance's view of ``rm_owners``. Every method runs on the caller's connection, with the
    store's connection lock held; the ones that write run inside the caller's transaction."""

    def __init__(self, *, instance: str, identity: ProcessIdentity, journal_directory: Path | None,
                 liveness: float, ttl: float, clock: Callable[[], float], where: str) -> None:
        self.instance = instance
        self.identity = identity
        self.directory = journal_directory
        self.liveness = liveness
        self.ttl = ttl
        self.clock = clock
        self.where = where

    def register(self, conn: sqlite3.Connection) -> list[str]:
        """(In a transaction) add this instance, reap every dead one; returns those reaped."""
        me = self.identity
        conn.execute(_REGISTER, (self.instance, me.host, me.boot, me.pid, me.start, self.clock()))
        dead = [row[0] for row in conn.execute(_ROWS).fetchall() if row[0] != self.instance and self._dead(row)]
        if dead:
            self.reap(conn, dead)
        return dead

    def beat(self, conn: sqlite3.Connection) -> None:
        """(In a transaction) renew this instance's heartbeat; register again if another process reaped it."""
        now = self.clock()
        if not conn.execute(_BEAT, (self.instance, now)).rowcount:
            me = self.identity
            logger.warning("SQLite dedup store %s: another process took this instance for dead (its heartbeat "
                           "was late) and took its claims over; registering again", self.where)
            conn.execute(_REGISTER, (self.instance, me.host, me.boot, me.pid, me.start, now))

    def unregister(self, conn: sqlite3.Connection) -> None:
        conn.execute(_UNREGISTER, (self.instance,))

    def dead_among(self, conn: sqlite3.Connection, owners: Iterable[str]) -> tuple[list[str], set[str]]:
        """Which of these instances (not this one) are dead: ``(to reap, gone)`` — registered ones whose
        process is dead (reap them), and those not registered any more (their claims are free)."""
        unknown = {i for i in owners if i != self.instance}
        if not unknown:
            return [], set()
        dead = []
        # Looked at every time (a read of /proc/<pid>/stat, ~20 µs): only keys claimed by another instance
        # get here, and a verdict kept for later would leave a just-killed owner's claims held.
        for row in conn.execute(_ROWS_OF, (dumps(sorted(unknown)),)).fetchall():
            unknown.discard(row[0])
            if self._dead(row):
                dead.append(row[0])
        return dead, unknown

    def reap(self, conn: sqlite3.Connection, instances: list[str]) -> None:
        """(In a transaction) replay dead instances' journals, then unregister them: their claims are free.

        Call :meth:`remove_journals` for them once the transaction committed."""
        self.replay(conn, instances)
        for instance in instances:
            conn.execute(_UNREGISTER, (instance,))
        logger.info("SQLite dedup store %s: took over the claims of %d dead consumer instance(s)", self.where,
                    len(instances))

    def replay(self, conn: sqlite3.Connection, instances: list[str]) -> None:
        if self.directory is None:
            return
        segments = journal_segments(self.directory)
        keys: list[str] = []
        for instance in instances:
            for segment in segments.get(instance, ()):
                keys.extend(read_segment(segment))
        if keys:
            conn.execute(MARK_DONE_BATCH, (dumps(keys), self.clock() + self.ttl))
            logger.info("SQLite dedup store %s: replayed %d done records journaled by dead instances", self.where,
                        len(keys))

    def orphans(self, conn: sqlite3.Connection) -> list[str]:
        """Instances with journal segments and no row: reaped, but their segments not deleted (a crash
        in between). Replaying them again is harmless."""
        if self.directory is None:
            return []
        segments = journal_segments(self.directory)
        if not segments:
            return []
        registered = {row[0] for row in conn.execute(f"SELECT instance FROM {OWNERS}").fetchall()}
        return [instance for instance in segments if instance not in registered]

    def remove_journals(self, instances: list[str]) -> None:
        if self.directory is None or not instances:
            return
        segments = journal_segments(self.directory)
        for instance in instances:
            for segment in segments.get(instance, ()):
                with contextlib.suppress(FileNotFoundError):
                    segment.unlink()

    def _dead(self, row: _Row) -> bool:
        _instance, host, boot, pid, start, beat = row
        state = process_state(ProcessIdentity(host=host, boot=boot, pid=pid, start=start))
        if state is None:  # another host: only its heartbeat tells
            return beat < self.clock() - self.liveness
        return not state


_NEEDS_ESCAPING = re.compile(r'[\x00-\x1f\\]')


def dumps(keys: list[str]) -> str:
    """``keys`` as a JSON array: joined as they are when none needs escaping (ten times cheaper
    than json.dumps, which matters for a batch's keys on the consumer thread)."""
    joined = '","'.join(keys)
    if keys and joined.count('"') == 2 * (len(keys) - 1) and _NEEDS_ESCAPING.search(joined) is None:
        return f'["{joined}"]'
    return json.dumps(keys, ensure_ascii=False, separators=(",", ":"))
