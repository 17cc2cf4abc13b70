"""SQLiteDedupStore beyond the shared contract: the file, restarts, other processes, failures."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_dedup_contract import FakeClock, in_thread

from reliable_messaging import ClaimResult, ConfigurationError, StoreUnavailable
from reliable_messaging._dedup import SQLiteDedupStore

ACQUIRED, DONE, IN_PROGRESS = ClaimResult.ACQUIRED, ClaimResult.DONE, ClaimResult.IN_PROGRESS
LEASE, TTL = 30.0, 600.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "dedup.sqlite3"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
def stores(db: Path, clock: FakeClock) -> Iterator[list[SQLiteDedupStore]]:
    opened: list[SQLiteDedupStore] = []
    yield opened
    for store in opened:
        store.close()


def open_store(stores: list[SQLiteDedupStore], path: Path, clock: FakeClock, **kwargs: object) -> SQLiteDedupStore:
    options: dict[str, object] = {"lease": LEASE, "ttl": TTL, "clock": clock, **kwargs}
    store = SQLiteDedupStore(path, **options)  # type: ignore[arg-type]
    stores.append(store)
    return store


def rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        count: int = conn.execute("SELECT count(*) FROM rm_dedup").fetchone()[0]
    conn.close()
    return count


# -- the file -----------------------------------------------------------------------------------


def test_file_is_in_wal_mode(stores: list[SQLiteDedupStore], db: Path, clock: FakeClock) -> None:
    open_store(stores, db, clock).mark_done("m-1")
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_done_records_survive_a_restart_and_a_closed_store_gives_up_its_claims(
    stores: list[SQLiteDedupStore], db: Path, clock: FakeClock
) -> None:
    first = open_store(stores, db, clock)
    first.claim("m-1")
    first.mark_done("m-1")
    first.claim("m-2")  # in flight when the consumer stops
    assert first.claim_batch(["m-3"]) == {"m-3": ACQUIRED}  # a batch claim, not in the file yet
    first.close()

    restarted = open_store(stores, db, clock)
    assert restarted.claim("m-1") is DONE
    assert restarted.claim("m-2") is ACQUIRED, "a store that closed holds nothing"
    assert restarted.claim("m-3") is ACQUIRED
    assert not list(Path(f"{db}-rm-done").glob(f"{first.instance}.*")), "its journal was removed on close"


def test_accepts_a_str_path(stores: list[SQLiteDedupStore], db: Path, clock: FakeClock) -> None:
    open_store(stores, db, clock).mark_done("m-1")
    assert open_store(stores, str(db), clock).claim("m-1") is DONE  # type: ignore[arg-type]


def test_two_instances_on_one_file_act_as_two_consumers(
    stores: list[SQLiteDedupStore], db: Path, clock: FakeClock
) -> None:
    first, second = open_store(stores, db, clock), open_store(stores, db, clock)
    assert first.claim("m-1") is ACQUIRED
    assert second.claim("m-1") is IN_PROGRESS
    second.release("m-1")  # not its claim
    assert second.claim("m-1") is IN_PROGRESS
    first.mark_done("m-1")  # journaled at once, in the file with the next group commit (5 ms)
    deadline = time.monotonic() + 2
    while second.claim("m-1") is not DONE:
        assert time.monotonic() < deadline, "the done record never reached the other instance"
        time.sleep(0.005)


def test_a_handler_can_record_done_in_its_own_transaction(
    stores: list[SQLiteDedupStore], db: Path, clock: FakeClock
) -> None:
    store = open_store(stores, db, clock)
    assert store.claim("m-1") is ACQUIRED
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id TEXT)")  # the handler's own effects ...
        conn.execute("INSERT INTO orders VALUES ('o-1')")
        conn.execute(  # ... and the done record, committed together (the documented schema)
            "INSERT INTO rm_dedup (key, owner, expires) VALUES (?, NULL, ?) "
            "ON CONFLICT (key) DO UPDATE SET owner = NULL, expires = excluded.expires",
            ("m-1", clock() + TTL),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    assert open_store(stores, db, clock).claim("m-1") is DONE


def test_threads_with_one_store_each_acquire_each_key_once(db: Path, stores: list[SQLiteDedupStore],
                                                           clock: FakeClock) -> None:
    # Separate connections: exclusion comes from SQLite's file lock and busy timeout, not our lock.
    consumers = [open_store(stores, db, clock) for _ in range(4)]
    keys = [f"m-{i}" for i in range(100)]
    barrier = threading.Barrier(len(consumers))
    acquired: Counter[str] = Counter()
    lock = threading.Lock()

    def consume(store: SQLiteDedupStore) -> None:
        barrier.wait()
        for key in keys:
            if store.claim(key) is ACQUIRED:
                with lock:
                    acquired[key] += 1
                store.mark_done(key)

    threads = [threading.Thread(target=consume, args=(store,)) for store in consumers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert acquired == Counter(dict.fromkeys(keys, 1))


# -- other processes ------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os
    import sys
    import time
    from reliable_messaging._dedup import SQLiteDedupStore

    path, go_file, action, *keys = sys.argv[1:]
    store = SQLiteDedupStore(path, lease=30, ttl=600, timeout=10)
    if go_file != "-":  # a barrier: every child is ready before any starts
        print("ready", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(go_file) and time.monotonic() < deadline:
            time.sleep(0.001)
    results = []
    for key in keys:
        if action == "claim":
            results.append(store.claim(key).value)
        elif action == "claim-and-done":
            result = store.claim(key)
            results.append(result.value)
            if result.value == "acquired":
                store.mark_done(key)
    print(" ".join(results))
    # no close, no release: the process just ends, as a crashed consumer does
    """
)


def run_child(db: Path, action: str, *keys: str, go_file: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(db), str(go_file or "-"), action, *keys],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def child_results(child: subprocess.Popen[str]) -> list[str]:
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    return out.split()[1:] if out.startswith("ready") else out.split()


def test_claims_and_done_records_are_shared_with_another_process(
    stores: list[SQLiteDedupStore], db: Path
) -> None:
    here = SQLiteDedupStore(db, lease=LEASE, ttl=TTL)
    stores.append(here)
    here.claim("ours")
    here.claim("done-here")
    here.mark_done("done-here")
    time.sleep(0.1)  # the group commit
    assert child_results(run_child(db, "claim", "ours", "done-here", "crashed-child")) == [
        "in_progress", "done", "acquired"
    ]
    # The child exited holding "crashed-child" without closing its store: its process is gone, so the
    # claim is free at once (no lease to wait out).
    assert here.claim("crashed-child") is ACQUIRED


def test_processes_racing_on_the_same_keys_acquire_each_key_once(db: Path) -> None:
    SQLiteDedupStore(db).close()  # create the file before the race
    # Enough keys that the race outlasts SQLite's busy-handler sleeps (up to 100 ms each), during
    # which one child could otherwise finish every key alone.
    keys = [f"m-{i}" for i in range(8000)]
    orders = [keys, keys, keys[::-1], keys[::-1]]  # two pairs contending key by key, meeting in the middle
    go = db.parent / "go"
    children = [run_child(db, "claim-and-done", *order, go_file=go) for order in orders]
    for child in children:  # every child has imported the library and opened the file
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
    go.touch()
    outcomes = [child_results(child) for child in children]
    acquired = Counter(
        key
        for order, results in zip(orders, outcomes, strict=True)
        for key, result in zip(order, results, strict=True)
        if result == "acquired"
    )
    assert acquired == Counter(dict.fromkeys(keys, 1))
    assert sum(1 for results in outcomes if "acquired" in results) > 1, "the children did race"
    assert all(result in ("acquired", "done", "in_progress") for results in outcomes for result in results)


# -- failures -------------------------------------------------------------------------------------


def test_a_file_that_is_not_a_database_is_unavailable(db: Path) -> None:
    db.write_bytes(b"this is not a SQLite database, just text " * 200)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="not a database"):
        SQLiteDedupStore(db, timeout=0.2)
    assert time.monotonic() - started < 2


def test_a_path_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where a directory should be")
    with pytest.raises(StoreUnavailable, match="cannot open"):
        SQLiteDedupStore(tmp_path / "file" / "dedup.sqlite3")


def test_a_file_locked_by_another_process_is_unavailable_after_the_timeout(
    stores: list[SQLiteDedupStore], db: Path, clock: FakeClock
) -> None:
    store = open_store(stores, db, clock, timeout=0.3)
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # e.g. a stuck writer in another process
        for operation in (store.claim, store.mark_done):  # (release of a claim it does not hold: nothing to do)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="locked"):
                operation("m-1")
            assert 0.25 < time.monotonic() - started < 2, "waits the busy timeout, not forever"
        locker.execute("ROLLBACK")
    finally:
        locker.close()
    assert store.claim("m-1") is ACQUIRED, "usable again once the lock is gone"


def test_a_database_replaced_by_garbage_is_unavailable(
    stores: list[SQLiteDedupStore], db: Path, clock: FakeClock
) -> None:
    store = open_store(stores, db, clock)
    store.mark_done("m-1")
    store.close()
    Path(f"{db}-wal").unlink(missing_ok=True)
    Path(f"{db}-shm").unlink(missing_ok=True)
    with db.open("r+b") as file:
        file.write(b"\xff" * 100)  # the header is gone
    with pytest.raises(StoreUnavailable):
        open_store(stores, db, clock)


# -- cleanup --------------------------------------------------------------------------------------


def test_cleanup_deletes_expired_rows_only(stores: list[SQLiteDedupStore], db: Path, clock: FakeClock) -> None:
    store = open_store(stores, db, clock)
    for i in range(1000):
        store.mark_done(f"old-{i:04}")
    clock.advance(TTL)
    for i in range(10):
        store.mark_done(f"new-{i}")
    store.claim("claimed")
    deleted = 0
    for _ in range(3):  # 512 rows looked at per step
        deleted += store.cleanup()
    assert deleted == 1000
    assert rows(db) == 11
    assert store.claim("new-0") is DONE
    assert store.claim("claimed") is ACQUIRED


def test_cleanup_runs_by_itself_as_records_are_added(
    stores: list[SQLiteDedupStore], db: Path, clock: FakeClock
) -> None:
    store = open_store(stores, db, clock)
    for i in range(500):
        store.mark_done(f"a-{i:04}")
    clock.advance(TTL)
    for i in range(2048 - 500):  # the 2048th record written runs a step over the next 4096 keys
        store.mark_done(f"b-{i:04}")
    assert rows(db) == 2048 - 500, "every expired row was deleted without calling cleanup()"


def test_cleanup_keeps_a_row_reclaimed_meanwhile(stores: list[SQLiteDedupStore], db: Path, clock: FakeClock) -> None:
    store = open_store(stores, db, clock)
    store.mark_done("m-1")
    clock.advance(TTL)
    assert store.claim("m-1") is ACQUIRED
    assert store.cleanup() == 0
    assert in_thread(lambda: store.claim("m-1")) is IN_PROGRESS


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"timeout": -1}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"synchronous": "OFF"}, "synchronous"),
        ({"synchronous": 1}, "synchronous"),
    ],
)
def test_bad_parameters_fail_at_construction(db: Path, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        SQLiteDedupStore(db, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


@pytest.mark.parametrize("path", ["", None, 3])
def test_path_must_be_a_path(path: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        SQLiteDedupStore(path)  # type: ignore[arg-type]
    assert info.value.field == "path"


def test_synchronous_full_is_accepted(stores: list[SQLiteDedupStore], db: Path, clock: FakeClock) -> None:
    store = open_store(stores, db, clock, synchronous="full")
    assert store.synchronous == "FULL"
    assert store.claim("m-1") is ACQUIRED


def test_repr_names_the_file(stores: list[SQLiteDedupStore], db: Path, clock: FakeClock) -> None:
    store = open_store(stores, db, clock)
    assert repr(store) == f"SQLiteDedupStore({str(db)!r}, lease=30.0, ttl=600.0, synchronous='NORMAL')"
