"""SQLiteDedupStore when a consumer process dies: its journal is replayed, its claims are free at once.

The processes here are real (``subprocess``), killed with SIGKILL; what is mocked is nothing but
an owner record edited to look like another host's.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliable_messaging import ClaimResult, ClosedError
from reliable_messaging._dedup import SQLiteDedupStore, _journal
from reliable_messaging._dedup._journal import DoneJournal, journal_segments, read_segment
from reliable_messaging._dedup._process import ProcessIdentity, process_state, this_process

ACQUIRED, DONE, IN_PROGRESS = ClaimResult.ACQUIRED, ClaimResult.DONE, ClaimResult.IN_PROGRESS

# A consumer process: claims a batch, marks some done, then waits to be killed (or exits at once).
_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from reliable_messaging._dedup import SQLiteDedupStore

    path, spec = sys.argv[1], json.loads(sys.argv[2])
    store = SQLiteDedupStore(path, group_commit_interval=spec.get("interval", 0.005))
    store.claim_batch(spec["claim"])
    for key in spec["done"]:
        store.mark_done(key)
    if spec.get("settle"):
        time.sleep(spec["settle"])  # group commits happen: claim rows and done records reach the file
    print("ready", flush=True)
    time.sleep(120)  # killed by the test
    """
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "dedup.sqlite3"


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


def start_child(children: list[subprocess.Popen[str]], db: Path, **spec: object) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(db), json.dumps(spec)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    children.append(child)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    return child


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(10)


def file_rows(db: Path) -> dict[str, str | None]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT key, owner FROM rm_dedup").fetchall())
    finally:
        conn.close()


KEYS = [f"m-{i}" for i in range(10)]


def test_done_records_of_a_killed_process_are_replayed_before_its_claims_are_taken(
        db: Path, children: list[subprocess.Popen[str]]) -> None:
    """Killed before any group commit: its done records exist only in its journal, and must count."""
    child = start_child(children, db, claim=KEYS, done=KEYS[:6], interval=1.0)  # no group commit for 1 s
    kill(child)
    assert not any(owner is None for owner in file_rows(db).values()), "nothing reached the file before the kill"
    with SQLiteDedupStore(db) as store:  # the restarted consumer
        results = store.claim_batch(KEYS)
    assert results == {**dict.fromkeys(KEYS[:6], DONE), **dict.fromkeys(KEYS[6:], ACQUIRED)}


def test_claims_of_a_killed_process_are_taken_over_at_once_by_a_live_neighbour(
        db: Path, children: list[subprocess.Popen[str]]) -> None:
    """Another process already running on the file (not a restart) frees the dead one's claims too."""
    with SQLiteDedupStore(db) as neighbour:
        child = start_child(children, db, claim=KEYS, done=KEYS[:3], settle=0.3)  # claim rows in the file
        rows = file_rows(db)
        assert sum(owner is not None for owner in rows.values()) == 7 and sum(o is None for o in rows.values()) == 3
        assert neighbour.claim("m-9") is IN_PROGRESS, "a live process's claim holds"
        assert neighbour.claim_batch(["m-8"]) == {"m-8": IN_PROGRESS}
        kill(child)
        started = time.monotonic()
        assert neighbour.claim("m-9") is ACQUIRED
        expected = {**dict.fromkeys(KEYS[:3], DONE), **dict.fromkeys(KEYS[3:9], ACQUIRED)}
        assert neighbour.claim_batch(KEYS[:9]) == expected
        assert time.monotonic() - started < 1, "no lease to wait out"


def test_a_reused_pid_does_not_keep_a_dead_owner_alive(db: Path) -> None:
    """An owner row naming this very pid, but another start time, is a process that is gone."""
    with SQLiteDedupStore(db) as store:
        me = this_process()
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute("INSERT INTO rm_owners VALUES ('0123456789abcdef', ?, ?, ?, '1', ?)",
                         (me.host, me.boot, me.pid, time.time()))
            conn.execute("INSERT INTO rm_dedup VALUES ('held', '0123456789abcdef:1', ?)", (time.time() + 60,))
        finally:
            conn.close()
        assert store.claim("held") is ACQUIRED


def test_an_owner_on_another_host_is_dead_once_its_heartbeat_is_older_than_liveness(db: Path) -> None:
    with SQLiteDedupStore(db, liveness=1.0) as store:
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute("INSERT INTO rm_owners VALUES ('fedcba9876543210', 'elsewhere', 'b', 1, 's', ?)",
                         (time.time(),))
            conn.execute("INSERT INTO rm_dedup VALUES ('held', 'fedcba9876543210:1', ?)", (time.time() + 60,))
            assert store.claim("held") is IN_PROGRESS, "its heartbeat is fresh: it may be running the handler"
            conn.execute("UPDATE rm_owners SET beat = ? WHERE instance = 'fedcba9876543210'", (time.time() - 1.5,))
        finally:
            conn.close()
        assert store.claim("held") is ACQUIRED


def test_a_store_renews_its_own_heartbeat(db: Path) -> None:
    with SQLiteDedupStore(db, liveness=0.5) as store:
        conn = sqlite3.connect(db)
        try:
            first = conn.execute("SELECT beat FROM rm_owners WHERE instance = ?", (store.instance,)).fetchone()[0]
            time.sleep(0.4)
            later = conn.execute("SELECT beat FROM rm_owners WHERE instance = ?", (store.instance,)).fetchone()[0]
        finally:
            conn.close()
        assert later > first


def test_mark_done_returns_while_the_file_is_locked_and_the_record_arrives_later(db: Path) -> None:
    """The journal makes the record safe; the group commit waits for the lock (and logs), then writes it."""
    with SQLiteDedupStore(db, timeout=0.2) as store:
        assert store.claim_batch(["m-1"]) == {"m-1": ACQUIRED}
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            store.mark_done("m-1")
            assert time.monotonic() - started < 0.1
            assert store.claim("m-1") is DONE, "this process knows at once"
            time.sleep(0.5)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        deadline = time.monotonic() + 5
        while file_rows(db).get("m-1", "claimed") is not None:
            assert time.monotonic() < deadline, "the record never reached the file"
            time.sleep(0.05)


def test_journal_segments_rotate_and_are_deleted_once_in_the_file(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_journal, "SEGMENT_BYTES", 128 * 1024)
    monkeypatch.setattr(_journal, "_ROOM", 64 * 1024)
    keys = [f"key-{i:06d}" for i in range(20_000)]  # ~250 KB of journal
    with SQLiteDedupStore(db) as store:
        seen_segments = set()
        for start in range(0, len(keys), 500):
            batch = keys[start:start + 500]
            store.claim_batch(batch)
            for key in batch:
                store.mark_done(key)
            seen_segments.update(p.name for ps in journal_segments(Path(f"{db}-rm-done")).values() for p in ps)
            time.sleep(0.01)
        assert len(seen_segments) >= 3, "the journal rotated"
        time.sleep(0.2)
        assert len(journal_segments(Path(f"{db}-rm-done")).get(store.instance, [])) <= 2, "old segments deleted"
    assert sum(owner is None for owner in file_rows(db).values()) == len(keys)


def test_a_reaped_instance_whose_segments_survived_is_replayed_again_harmlessly(db: Path) -> None:
    directory = Path(f"{db}-rm-done")
    SQLiteDedupStore(db).close()
    journal = DoneJournal(directory, "00000000deadbeef")  # an instance with no owner row: reaped before
    journal.append("orphan-1")
    journal.append("orphan-2")
    journal.close()
    with SQLiteDedupStore(db) as store:
        assert store.claim_batch(["orphan-1", "orphan-2", "other"]) == {
            "orphan-1": DONE, "orphan-2": DONE, "other": ACQUIRED}
    assert "00000000deadbeef" not in journal_segments(directory)


def test_journal_lines_round_trip_odd_keys_and_drop_a_torn_last_line(tmp_path: Path) -> None:
    keys = ["plain", "with\nnewline", 'starts"quote', '"quoted"', "back\\slash", "ünïcödé", "nul\0byte"]
    journal = DoneJournal(tmp_path, "0123456789abcdef")
    for key in keys:
        journal.append(key)
    path = journal.close()
    assert path is not None
    assert read_segment(path) == keys
    with path.open("r+b") as f:  # a record cut short by the crash: no newline after it
        data = f.read().rstrip(b"\0")
        f.seek(len(data))
        f.write(b"torn-rec")
    assert read_segment(path) == keys


def test_a_journal_without_mapping_appends_with_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", refuse)
    journal = DoneJournal(tmp_path, "0123456789abcdef")
    for i in range(100):
        journal.append(f"k-{i}")
    path = journal.close()
    assert path is not None and path.stat().st_size == sum(len(f"k-{i}\n") for i in range(100))
    assert read_segment(path) == [f"k-{i}" for i in range(100)]


def test_a_store_opened_before_fork_refuses_calls_in_the_child(db: Path) -> None:
    store = SQLiteDedupStore(db)
    try:
        store.claim_batch(["k0"])
        store.mark_done("k0")  # the writer thread is busy around now: the child may inherit a held lock
        pid = os.fork()
        if pid == 0:  # the child: must refuse (not hang on a lock, not write with the parent's identity)
            code = 0
            try:
                store.claim("k")
                code = 1
            except ClosedError:
                code = 0
            except BaseException:
                code = 2
            os._exit(code)
        deadline = time.monotonic() + 10
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        store.close()


def test_process_state_reads_the_kernel() -> None:
    me = this_process()
    assert process_state(me) is True
    assert process_state(ProcessIdentity(me.host, me.boot, me.pid, "1")) is False, "same pid, another start"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(10)
    assert process_state(ProcessIdentity(me.host, me.boot, child.pid, "")) is False
    assert process_state(ProcessIdentity("another-host", me.boot, 1, "")) is None
    assert process_state(ProcessIdentity(me.host, "another-boot", me.pid, me.start)) is False
