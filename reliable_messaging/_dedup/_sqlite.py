"""SQLite dedup store: the embedded default, a file that outlives the consumer process.

A restarted consumer re-reads Kafka from its last committed offset, and RabbitMQ
redelivers what the dead consumer had not acknowledged: the done records in the
file recognise those duplicates. Several processes on one host may share the file
(SQLite locks it); consumers on several hosts need
:class:`~reliable_messaging._dedup.RedisDedupStore` (SQLite over a network file
system is not safe).

How a message goes through it (what the consumers do):

1. the keys of a fetched batch (Kafka) or of the deliveries waiting (RabbitMQ) are claimed at
   once: one ``SELECT`` finds those already done or claimed by a live process; the claims are
   this process's, and reach the file with a later group commit (below);
2. after each handler, :meth:`SQLiteDedupStore.mark_done` appends the key to this instance's done
   journal (:mod:`._journal`, one ``write(2)``) and returns: the record now survives a crash of the
   process, so the consumer acknowledges at once — a crash repeats at most the running handler;
3. a writer thread copies journaled records into the file in group commits (every 5 ms, or 1,000
   records), where other processes see them, and writes the claim rows of messages still being
   handled one commit after they were claimed.

A process that dies leaves claim rows, and perhaps journaled records not yet in the file. The next
store that meets its claims — a restarted consumer opening the file, or another process claiming
one of its keys — finds from the owner records (:mod:`._sqlite_owners`) that the process is gone,
replays its journal into the file and frees its claims, in one transaction: no lease to wait out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .._errors import ClosedError, ConfigurationError, InvalidMessage, StoreUnavailable
from ._base import DEFAULT_LEASE, DEFAULT_TTL, ClaimResult, DedupStore, check_liveness
from ._journal import DoneJournal
from ._memory import ThreadTokens, check_key
from ._process import INSTANCE_ID_LENGTH, this_process
from ._sqlite_owners import MARK_DONE_BATCH, OWNERS_SCHEMA, TABLE, OwnerRegistry, dumps
from ._sqlite_writer import CLEANUP_EVERY, WRITE_CLAIMS, SQLiteWriter

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
"""Seconds the writer lets journaled done records accumulate before it copies them into the file
(unless ``group_commit_size`` are queued first). Crash safety does not depend on it (the journal
gives that); it is how late other processes sharing the file see a message finished, or claimed."""

DEFAULT_GROUP_COMMIT_SIZE = 1000
"""Journaled done records that make the writer commit at once, without waiting for the interval."""

_MAX_QUEUED = 200_000
"""Done records journaled but not yet in the file after which mark_done waits for the writer (the
file is locked by another process for long, or the disk is failing): memory stays bounded."""

# One row per key. owner: the claiming thread's token "<instance>:<n>" while claimed, NULL once done.
# expires: wall-clock seconds when the claim (now + lease) or done record (now + ttl) lapses.
# WITHOUT ROWID: the key is the only B-tree, so a write touches one tree. No index on expires
# (a second tree written per message): cleanup walks the keys instead, see _cleanup.
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY NOT NULL, owner TEXT, expires REAL NOT NULL)"
    " WITHOUT ROWID",
    OWNERS_SCHEMA,
)
# A primary-key probe per id, driven by the JSON list (CROSS JOIN keeps that order; "key IN (SELECT
# value FROM json_each(?1))" builds a temporary index of the ids first, 2.4x as slow).
_LOOKUP_BATCH = f"SELECT t.key, t.owner, t.expires FROM json_each(?1) AS j CROSS JOIN {TABLE} AS t ON t.key = j.value"
_RELEASE = f"DELETE FROM {TABLE} WHERE key IN (SELECT value FROM json_each(?1)) AND substr(owner, 1, ?2) = ?3"

_SYNCHRONOUS = ("NORMAL", "FULL")
_WAL_AUTOCHECKPOINT = 10_000
"""Pages in the write-ahead log before a commit copies them into the database (SQLite's default
is 1000): fewer checkpoints, which is where synchronous=NORMAL fsyncs."""
_JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
_CLOSE_GRACE = 5.0
"""Seconds close() waits for the writer beyond the busy timeout before giving up on it."""
class SQLiteDedupStore(SQLiteWriter, DedupStore):
    """Claims and done records in a SQLite file (WAL mode), shared by threads and processes.

    A new instance on the same ``path`` — after a restart, or in another process — sees every
    committed claim and done record, and every done record a dead instance journaled.

    *Crash safety.* :meth:`mark_done` returns once the record is in this instance's done journal
    (``<path>-rm-done/``, a ``write(2)`` per record, ~2 µs): a crash of the process after that
    loses nothing, so a consumer that acknowledges after ``mark_done`` repeats at most the handler
    that was running when its process died. A *power loss* or OS crash can lose recent records
    (as SQLite's ``synchronous=NORMAL`` can lose recent commits); ``synchronous="FULL"`` fsyncs
    the journal per record and SQLite per commit, so done records survive that too, at a disk
    flush per message.

    *Dead consumers.* Every instance registers an owner row (host, boot id, pid and its start
    time). A claim whose owner process is gone — looked up in ``/proc`` on the same host; on
    another host (a volume shared by containers) once its heartbeat is ``liveness`` seconds old —
    is taken over at once, its journal replayed into the file first. ``lease`` only bounds a claim
    of a *live* process: a handler slower than ``lease`` may see its message run elsewhere.

    *Across processes.* A claim reaches the file one group commit after it was taken, unless its
    message was done by then (then only the done record is written: one B-tree write per message).
    So two processes sharing the file may both run a message delivered to both within about two
    ``group_commit_interval`` (10 ms); a claim row the writer finds taken is logged. Consumers
    racing on the same ids belong on :class:`~reliable_messaging._dedup.RedisDedupStore`. Within
    a process, claims are exact. Done records reach the file within one interval; meanwhile
    another process finds the live claim (or nothing, for a message claimed and done within one
    interval: the window above).

    *Ownership* is per instance and thread: :meth:`release` frees only a claim this instance took
    on this thread; a thread re-claiming a key it holds gets ``ACQUIRED``; a claim of a thread that
    ended is free. Create the store in the process that uses it (after a fork, not before).

    Every sqlite3 error (locked longer than ``timeout``, disk full, a file that is not a database)
    raises :class:`~reliable_messaging.StoreUnavailable`; the handler runner hands the message back.
    Expired rows are deleted a few at a time by the writer, so no call ever scans the whole table.

    *Schema.* ``rm_dedup(key TEXT PRIMARY KEY, owner TEXT, expires REAL) WITHOUT ROWID`` (a done
    record has ``owner`` NULL) and ``rm_owners`` (one row per live instance). A handler whose
    effects live in this same database can close the window between its effects and
    :meth:`mark_done` by inserting ``(key, NULL, now + ttl)`` in its own transaction.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease: float = DEFAULT_LEASE,
        ttl: float = DEFAULT_TTL,
        liveness: float | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_BUSY_TIMEOUT,
        synchronous: str = "NORMAL",
        group_commit_interval: float = DEFAULT_GROUP_COMMIT_INTERVAL,
        group_commit_size: int = DEFAULT_GROUP_COMMIT_SIZE,
    ) -> None:
        super().__init__(lease=lease, ttl=ttl)
        if not isinstance(path, str | os.PathLike) or not os.fspath(path):
            raise ConfigurationError(f"path must be a file path, got {path!r}", field="path")
        self.liveness = check_liveness(liveness, self.lease)
        if not callable(clock):
            raise ConfigurationError(f"clock must be a callable returning seconds, got {clock!r}", field="clock")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise ConfigurationError(f"timeout must be a number of seconds >= 0, got {timeout!r}", field="timeout")
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}", field="synchronous")
        if isinstance(group_commit_interval, bool) or not isinstance(group_commit_interval, int | float) \
                or not 0 <= group_commit_interval <= 1:
            raise ConfigurationError(f"group_commit_interval must be a number of seconds in [0, 1], got "
                                     f"{group_commit_interval!r}", field="group_commit_interval")
        if isinstance(group_commit_size, bool) or not isinstance(group_commit_size, int) or group_commit_size < 1:
            raise ConfigurationError(f"group_commit_size must be an int >= 1, got {group_commit_size!r}",
                                     field="group_commit_size")
        self.path = os.fspath(path)
        self.timeout = float(timeout)
        self.synchronous = synchronous.upper()
        self.group_commit_interval = float(group_commit_interval)
        self.group_commit_size = group_commit_size
        self._clock = clock
        self._token = ThreadTokens()
        self.instance = self._token.instance
        self._identity = this_process()
        self._claim_lock = threading.Lock()  # one claim decision at a time; taken before _lock
        self._lock = threading.Lock()  # the write connection; taken before _mutex, never after it
        self._mutex = threading.Lock()  # the in-process state below
        self._state = threading.Condition(self._mutex)  # the writer waits on it
        self._claimed: dict[str, list[Any]] = {}
        """Claims of this instance: key -> [token, expires, written] (written: its row may be in the file)."""
        self._fresh: set[str] = set()  # claims taken since the last group commit ...
        self._aging: set[str] = set()  # ... and before it: the next commit writes their rows if still claimed
        self._pending: dict[str, float] = {}  # journaled done records not yet in the file (key -> expires) ...
        self._queue: list[str] = []  # ... in journal order, for the writer
        self._queued_at = 0.0  # time.monotonic() of the first record or claim queued since the last commit
        self._retired: list[Path] = []  # journal segments whose keys are all queued or in the file
        self._closing = False
        self._writes = 0
        self._cleanup_after = ""
        self._beat_due = 0.0
        self._writer: threading.Thread | None = None
        directory = None if self.path == ":memory:" else Path(f"{self.path}-rm-done")
        self._owners = OwnerRegistry(instance=self.instance, identity=self._identity, journal_directory=directory,
                                     liveness=self.liveness, ttl=self.ttl, clock=clock, where=self.path)
        self._conn: sqlite3.Connection | None = self._connect()
        # Lookups have their own connection: in WAL mode a read never waits for a write, so claims go on
        # while the writer waits for a lock another process holds. (":memory:" is one database per
        # connection: there, lookups share the writer's.)
        self._reader: sqlite3.Connection | None = None
        self._journal: DoneJournal | None = None
        try:
            if self.path != ":memory:":
                self._reader = self._connect()
            self._open(directory)
        except BaseException:
            self._conn.close()
            self._conn = None
            if self._reader is not None:
                self._reader.close()
            raise

    def __repr__(self) -> str:
        return f"SQLiteDedupStore({self.path!r}, lease={self.lease}, ttl={self.ttl}, synchronous={self.synchronous!r})"

    # -- opening ----------------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit BEGIN; each statement commits on its own.
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite dedup store {self.path!r}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal" and self.path != ":memory:":
                logger.warning("SQLite dedup store %s: journal mode is %s, not wal", self.path, mode)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT}")
            conn.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT}")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("SELECT count(*) FROM json_each('[1]')").fetchone()  # the JSON functions are needed
        except sqlite3.Error as exc:
            conn.close()
            raise StoreUnavailable(f"cannot open SQLite dedup store {self.path!r}: {exc}") from exc
        return conn

    def _open(self, directory: Path | None) -> None:
        """Register this instance, reap dead ones (replaying their journals), open the journal."""
        conn = self._connection()
        owners = self._owners
        with self._lock:
            reaped: list[str] = []
            self._transaction(conn, lambda: reaped.extend(owners.register(conn)))
            owners.remove_journals(reaped)
            try:
                orphans = owners.orphans(conn)
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from exc
            if orphans:
                self._transaction(conn, lambda: owners.replay(conn, orphans))
                owners.remove_journals(orphans)
        if directory is not None:
            try:
                self._journal = DoneJournal(directory, self.instance, fsync=self.synchronous == "FULL")
            except OSError as exc:
                raise StoreUnavailable(f"SQLite dedup store {self.path!r}: cannot create its done journal in "
                                       f"{directory}: {exc}") from exc
        self._beat_due = time.monotonic() + self.liveness / 5
        with self._mutex:  # the writer also renews this instance's heartbeat
            self._writer = threading.Thread(target=self._write_loop, name=f"rm-sqlite-dedup-{self.instance}",
                                            daemon=True)
            self._writer.start()

    # -- claims -------------------------------------------------------------------------------------------

    def claim(self, key: str) -> ClaimResult:
        """Take ``key`` for this thread, atomically across threads and processes (see :class:`ClaimResult`):
        the claim row is committed before this returns."""
        _check_key(key)
        self._check_process()
        token = self._token()
        results: dict[str, ClaimResult] = {}
        with self._claim_lock, self._lock:
            conn = self._connection()
            with self._mutex:
                self._check_open()
                now = self._clock()
                if not self._decide_locally([key], token, now, results):
                    return results[key]
            outcome: list[ClaimResult] = []
            reaped: list[str] = []
            self._transaction(conn, lambda: outcome.append(self._claim_row(conn, key, token, now, reaped)))
            self._owners.remove_journals(reaped)
            if outcome[0] is ClaimResult.ACQUIRED:
                with self._mutex:
                    self._claimed[key] = [token, now + self.lease, True]
            return outcome[0]

    def _claim_row(self, conn: sqlite3.Connection, key: str, token: str, now: float, reaped: list[str]) -> ClaimResult:
        """(In a transaction) write ``key``'s claim row unless a live claim or a done record holds it."""
        claim = json.dumps([[key, token, now + self.lease]], ensure_ascii=False)
        for _ in range(2):
            if conn.execute(WRITE_CLAIMS, (claim, now)).rowcount:
                return ClaimResult.ACQUIRED
            row = conn.execute(_LOOKUP_BATCH, (dumps([key]),)).fetchone()
            if row is None:
                continue  # deleted in between (cannot happen within the transaction; harmless)
            if row[1] is None:
                return ClaimResult.DONE
            dead, _gone = self._owners.dead_among(conn, [row[1][:INSTANCE_ID_LENGTH]])
            if not dead:
                return ClaimResult.IN_PROGRESS
            self._owners.reap(conn, dead)  # then the claim row is free, or the key done
            reaped.extend(dead)
        return ClaimResult.IN_PROGRESS  # pragma: no cover - the second write takes a reaped claim

    def claim_batch(self, keys: Iterable[str]) -> dict[str, ClaimResult]:
        """:meth:`claim` for the keys of a fetched batch, decided with one lookup; decides every key.

        Faster than :meth:`claim` per key, and not atomic across processes: the claim rows reach the
        file with the group commit after the next (see the class docstring)."""
        wanted = list(dict.fromkeys(keys))
        if not _plain_keys(wanted):
            for key in wanted:
                _check_key(key)
        return self._claim(wanted) if wanted else {}

    def _claim(self, keys: list[str]) -> dict[str, ClaimResult]:
        self._check_process()
        token = self._token()
        results: dict[str, ClaimResult] = {}
        # One decision at a time within the process: no other thread claims a key between this one's
        # look at its state and its claim. (The writer may commit meanwhile: a key it writes as done was
        # pending in memory at the look, and it leaves the pending set only once committed.)
        with self._claim_lock:
            with self._mutex:
                self._check_open()
                now = self._clock()
                ask = self._decide_locally(keys, token, now, results)
            if ask:
                self._decide_from_file(ask, now, results)
                fresh = [key for key in ask if results[key] is ClaimResult.ACQUIRED]
                if fresh:
                    with self._mutex:
                        self._check_open()
                        entry = [token, now + self.lease, False]
                        for key in fresh:
                            self._claimed[key] = list(entry)
                        self._fresh.update(fresh)
                        if not self._queued_at:
                            self._queued_at = time.monotonic()
                            self._state.notify()
        return results

    def _decide_locally(self, keys: list[str], token: str, now: float, results: dict[str, ClaimResult]) -> list[str]:
        """(_mutex held) Decide the keys this process knows; return the others."""
        pending, claimed = self._pending, self._claimed
        if not pending and not claimed:
            return keys
        ask = []
        for key in keys:
            done = pending.get(key)
            if done is not None and done > now:
                results[key] = ClaimResult.DONE  # journaled
                continue
            entry = claimed.get(key)
            if entry is None:
                ask.append(key)
            elif entry[0] == token or entry[1] <= now:
                entry[0], entry[1] = token, now + self.lease  # its own, or lapsed
                results[key] = ClaimResult.ACQUIRED
            else:
                results[key] = ClaimResult.IN_PROGRESS  # another thread of this process runs it
        return ask

    def _decide_from_file(self, keys: list[str], now: float, results: dict[str, ClaimResult]) -> None:
        """(_claim_lock held) Decide ``keys`` from their rows, taking over the claims of dead instances."""
        rows = self._lookup(keys)
        held: dict[str, str] = {}  # key -> instance holding a live claim on it
        for key, owner, expires in rows:
            if expires <= now:
                continue  # lapsed: free
            if owner is None:
                results[key] = ClaimResult.DONE
            elif owner[:INSTANCE_ID_LENGTH] != self.instance:
                held[key] = owner[:INSTANCE_ID_LENGTH]
        if held:
            owners = self._owners
            with self._lock:
                conn = self._connection()
                try:
                    reap, gone = owners.dead_among(conn, held.values())
                except sqlite3.Error as exc:
                    raise self._unavailable(exc) from exc
                if reap:
                    self._transaction(conn, lambda: owners.reap(conn, reap))
                    owners.remove_journals(reap)
            dead = gone.union(reap)
            freed = [key for key, instance in held.items() if instance in dead]
            for key in freed:
                del held[key]
            if reap:  # their journals are in the file now: what they finished is done
                for key, owner, expires in self._lookup(freed):
                    if owner is None and expires > now:
                        results[key] = ClaimResult.DONE
            for key in held:
                results[key] = ClaimResult.IN_PROGRESS
        for key in keys:
            results.setdefault(key, ClaimResult.ACQUIRED)  # no row, a lapsed one, or a claim now free

    def _lookup(self, keys: list[str]) -> list[tuple[str, str | None, float]]:
        """The rows of ``keys`` (absent keys have none), read on the reader connection."""
        reader = self._reader
        try:
            if reader is None:  # ":memory:"
                with self._lock:
                    return self._connection().execute(_LOOKUP_BATCH, (dumps(keys),)).fetchall()
            return reader.execute(_LOOKUP_BATCH, (dumps(keys),)).fetchall()
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        except AttributeError as exc:  # pragma: no cover - closed meanwhile
            raise ClosedError(f"the SQLite dedup store {self.path!r} is closed") from exc

    # -- done records -------------------------------------------------------------------------------------

    def mark_done(self, key: str) -> None:
        """Record ``key`` as done: journaled (safe from a process crash) when this returns.

        A key this instance holds no claim on is committed to the file before returning instead, so
        that no other process can claim it in between.
        """
        if key.__class__ is not str or not key or not key.isascii():
            _check_key(key)
        if self._identity.pid != os.getpid():
            self._check_process()
        with self._mutex:
            self._check_open()
            journal = self._journal
            if key in self._pending:
                return
            if journal is not None and key in self._claimed:
                try:
                    journal.append(key)
                except OSError as exc:
                    raise StoreUnavailable(f"SQLite dedup store {self.path!r}: could not journal a done "
                                           f"record: {exc}") from exc
                del self._claimed[key]
                self._pending[key] = self._clock() + self.ttl
                queue = self._queue
                queue.append(key)
                if not self._queued_at:
                    self._queued_at = time.monotonic()
                    self._state.notify()
                elif len(queue) >= self.group_commit_size:
                    if len(queue) == self.group_commit_size:
                        self._state.notify()
                    elif len(queue) >= _MAX_QUEUED:
                        self._wait_for_writer()
                return
        with self._lock:
            conn = self._connection()
            now = self._clock()
            try:
                conn.execute(MARK_DONE_BATCH, (dumps([key]), now + self.ttl))
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from exc
            with self._mutex:
                self._claimed.pop(key, None)
            self._writes += 1
            if self._writes >= CLEANUP_EVERY:
                self._cleanup(conn, now, 2 * self._writes)
                self._writes = 0

    def _wait_for_writer(self) -> None:
        """(_mutex held) Too many records wait for the writer: wait until it catches up, within the timeout."""
        deadline = time.monotonic() + self.timeout + _CLOSE_GRACE
        while len(self._queue) >= _MAX_QUEUED // 2 and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreUnavailable(f"SQLite dedup store {self.path!r}: {len(self._queue)} done records wait "
                                       f"to be written (is the file locked by another process?)")
            self._state.wait(remaining)

    # -- releasing ----------------------------------------------------------------------------------------

    def release(self, key: str) -> None:
        """Drop this instance's and thread's claim on ``key``; anyone else's claim or a done record stays."""
        _check_key(key)
        self.release_many([key])

    def release_many(self, keys: Iterable[str]) -> None:
        self._check_process()
        token = self._token()
        written = []
        with self._mutex:
            self._check_open()
            claimed = self._claimed
            for key in keys:
                entry = claimed.get(key)
                if entry is not None and entry[0] == token:
                    del claimed[key]
                    if entry[2]:
                        written.append(key)
        if not written:
            return  # never written: the writer skips them now
        with self._lock:  # after a group commit in progress, which may be writing those rows
            conn = self._connection()
            try:
                conn.execute(_RELEASE, (dumps(written), INSTANCE_ID_LENGTH, self.instance))
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from exc

    # -- plumbing -----------------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            raise ClosedError(f"the SQLite dedup store {self.path!r} is closed")
        return conn

    def _check_open(self) -> None:
        """(_mutex held)"""
        if self._closing:
            raise ClosedError(f"the SQLite dedup store {self.path!r} is closed")

    def _check_process(self) -> None:
        """Before taking a lock: a forked child may have inherited it held by a thread that is not there."""
        if self._identity.pid != os.getpid():
            raise ClosedError(f"the SQLite dedup store {self.path!r} was opened in another process (pid "
                              f"{self._identity.pid}); open the store after fork, in the process that uses it")

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"SQLite dedup store {self.path!r}: {type(exc).__name__}: {exc}")

    def _transaction(self, conn: sqlite3.Connection, body: Callable[[], object]) -> None:
        """Run ``body`` in one write transaction (_lock held); sqlite3 errors become StoreUnavailable."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                body()
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled it back itself
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc

    # -- closing ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Write what is journaled, give up this instance's claims, close; later calls raise ClosedError.

        Waits for the writer at most ``timeout`` + 5 seconds. If the last records cannot be written,
        the journal stays: the next store to open the file replays it.
        """
        if self._identity.pid != os.getpid():
            return  # a forked child: the parent's store is not its to close
        with self._mutex:
            if self._closing:
                return
            self._closing = True
            writer = self._writer
            self._state.notify_all()
        if writer is not None and writer is not threading.current_thread():
            writer.join(self.timeout + _CLOSE_GRACE)
            if writer.is_alive():
                logger.warning("SQLite dedup store %s: the writer did not finish within %.1fs", self.path,
                               self.timeout + _CLOSE_GRACE)
        with self._claim_lock:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            with self._mutex:
                written = not self._queue
                claimed = [key for key, entry in self._claimed.items() if entry[2]]
                self._claimed.clear()
            journal, self._journal = self._journal, None
            if journal is not None:
                journal.close()
            try:
                if not written:
                    logger.warning("SQLite dedup store %s: closing with done records not yet in the file; they "
                                   "stay in its journal and are replayed by the next store opening it", self.path)
                elif self._identity.pid == os.getpid():
                    def unregister() -> None:
                        if claimed:
                            conn.execute(_RELEASE, (dumps(claimed), INSTANCE_ID_LENGTH, self.instance))
                        self._owners.unregister(conn)

                    self._transaction(conn, unregister)
                    self._owners.remove_journals([self.instance])
            except StoreUnavailable as exc:
                logger.warning("SQLite dedup store %s: could not unregister on close (%s); the next store "
                               "opening the file takes over", self.path, exc)
            finally:
                conn.close()


def _check_key(key: object) -> None:
    """check_key, plus: a key SQLite can store (a lone surrogate cannot be encoded as UTF-8)."""
    check_key(key)
    assert isinstance(key, str)
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidMessage(f"a dedup key must be encodable as UTF-8, got {key!r}") from exc


def _plain_keys(keys: list[str]) -> bool:
    """Whether every key is a non-empty ASCII ``str`` (checked in C: one join, no Python loop)."""
    try:
        return "".join(keys).isascii() and "" not in keys
    except TypeError:  # not all str
        return False
