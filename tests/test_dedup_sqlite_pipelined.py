"""SQLiteDedupStore's pipelined path: group commits on a writer thread, futures resolved once durable."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from test_dedup_contract import in_thread

from reliable_messaging import (
    ClaimResult,
    ClosedError,
    ConfigurationError,
    DedupStore,
    Disposition,
    InvalidMessage,
    MemoryDedupStore,
    Message,
    RetryPolicy,
    StoreUnavailable,
)
from reliable_messaging._dedup import SQLiteDedupStore
from reliable_messaging._handling import BATCHED, HandlerRunner, MessageIdKey

ACQUIRED, DONE, IN_PROGRESS = ClaimResult.ACQUIRED, ClaimResult.DONE, ClaimResult.IN_PROGRESS


class PausableStore(SQLiteDedupStore):
    """The writer waits at each group commit until ``resume`` is set; ``commits`` counts them."""

    def __init__(self, path: Path, **kwargs: object) -> None:
        super().__init__(path, **kwargs)  # type: ignore[arg-type]
        self.resume = threading.Event()
        self.resume.set()
        self.waiting = threading.Event()
        self.commits: list[frozenset[str]] = []

    def _before_group_commit(self) -> None:
        self.waiting.set()
        assert self.resume.wait(30)
        self.waiting.clear()

    def _after_group_commit(self, keys: frozenset[str] | set[str]) -> None:
        self.commits.append(frozenset(keys))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "dedup.sqlite3"


@pytest.fixture
def stores() -> Iterator[list[SQLiteDedupStore]]:
    opened: list[SQLiteDedupStore] = []
    yield opened
    for store in opened:
        if isinstance(store, PausableStore):
            store.resume.set()
        store.close()


def open_store(stores: list[SQLiteDedupStore], db: Path, **kwargs: object) -> PausableStore:
    store = PausableStore(db, **kwargs)
    stores.append(store)
    return store


def done_in_file(db: Path, key: str) -> bool:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT owner FROM rm_dedup WHERE key = ?", (key,)).fetchone()
    finally:
        conn.close()
    return row is not None and row[0] is None


def rows_in_file(db: Path) -> dict[str, str | None]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT key, owner FROM rm_dedup").fetchall())
    finally:
        conn.close()


def test_the_future_resolves_only_once_the_record_is_in_the_file(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db)
    store.resume.clear()
    assert store.claim_deferred("m-1") is ACQUIRED
    future = store.mark_done_deferred("m-1")
    assert store.waiting.wait(5), "the writer starts a group commit within the interval"
    time.sleep(0.05)
    assert not future.done()
    assert not done_in_file(db, "m-1")
    store.resume.set()
    future.result(5)
    assert done_in_file(db, "m-1")
    assert store.commits == [frozenset({"m-1"})]


def test_keys_of_one_group_commit_share_its_future(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db, group_commit_interval=0.5)
    futures = [store.mark_done_deferred(f"m-{i}") for i in range(10)]
    assert all(f is futures[0] for f in futures)
    store.flush()
    futures[0].result(5)
    assert store.commits == [frozenset(f"m-{i}" for i in range(10))]


def test_a_full_batch_is_committed_without_waiting_for_the_interval(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db, group_commit_interval=1.0, group_commit_size=100)
    started = time.monotonic()
    futures = {store.mark_done_deferred(f"m-{i}") for i in range(150)}
    for future in futures:
        future.result(5)
    assert time.monotonic() - started < 0.8
    assert all(done_in_file(db, f"m-{i}") for i in range(150))


def test_group_commits_delete_expired_records_as_they_go(stores: list[SQLiteDedupStore], db: Path) -> None:
    now = [1_000.0]
    store = open_store(stores, db, ttl=100.0, clock=lambda: now[0])
    for key in [f"a-{i:04}" for i in range(600)]:
        store.mark_done_deferred(key)
    store.flush()
    store.mark_done_deferred("a-last").result(5)
    now[0] += 100.0  # every a-* record has lapsed
    for batch in range(5):  # a cleanup step per 2048 records written, walking two keys per record
        for i in range(400):
            future = store.mark_done_deferred(f"b-{batch}-{i:03}")
        store.flush()
        future.result(5)
    left = rows_in_file(db)
    assert not [key for key in left if key.startswith("a-")], "expired records deleted by the group commits"
    assert sum(key.startswith("b-") for key in left) == 2000, "records still within ttl stay"


def test_a_reopened_file_sees_every_key_whose_future_resolved(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db, group_commit_size=300)
    keys = [f"m-{i}" for i in range(2000)]
    futures: list[Future[None]] = []
    for key in keys:
        assert store.claim_deferred(key) is ACQUIRED
        future = store.mark_done_deferred(key)
        if not futures or futures[-1] is not future:
            futures.append(future)
    for future in futures:
        future.result(10)
    # No close(): as after a crash, the next process opens the file as it is.
    reopened = SQLiteDedupStore(db)
    stores.append(reopened)
    assert all(reopened.claim(key) is DONE for key in keys)
    assert all(reopened.claim_deferred(key) is DONE for key in keys)


def test_a_failed_group_commit_fails_its_future_and_a_later_claim_writes_the_record(
    stores: list[SQLiteDedupStore], db: Path
) -> None:
    store = open_store(stores, db, timeout=0.2)
    assert store.claim_deferred("m-1") is ACQUIRED
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        future = store.mark_done_deferred("m-1")
        with pytest.raises(StoreUnavailable, match="locked"):
            future.result(10)
        locker.execute("ROLLBACK")
    finally:
        locker.close()
    assert not done_in_file(db, "m-1")
    # The redelivery: the handler ran, so the store writes the done record again and answers DONE.
    assert store.claim_deferred("m-1") is DONE
    assert done_in_file(db, "m-1")


def test_a_claim_waits_for_a_pending_done_record(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db)
    store.resume.clear()
    store.claim_deferred("m-1")
    store.mark_done_deferred("m-1")
    result: list[ClaimResult] = []
    waiter = threading.Thread(target=lambda: result.append(store.claim_deferred("m-1")))
    waiter.start()
    time.sleep(0.1)
    assert not result, "DONE means durable: the duplicate waits for the group commit"
    store.resume.set()
    waiter.join(5)
    assert result == [DONE]
    assert store.claim("m-1") is DONE


def test_deferred_claims_are_exact_within_the_process(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db)
    assert store.claim_deferred("m-1") is ACQUIRED
    assert store.claim_deferred("m-1") is ACQUIRED, "the same thread renews its claim"
    assert in_thread(lambda: store.claim_deferred("m-1")) is IN_PROGRESS
    assert in_thread(lambda: store.claim("m-1")) is IN_PROGRESS, "the synchronous claim sees it too"
    store.release("m-1")
    assert in_thread(lambda: store.claim_deferred("m-1")) is ACQUIRED


def test_a_claim_reaches_other_processes_with_the_group_commit(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db, group_commit_interval=0.01)
    other = SQLiteDedupStore(db)
    stores.append(other)
    assert store.claim_deferred("m-1") is ACQUIRED
    deadline = time.monotonic() + 5
    while "m-1" not in rows_in_file(db):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert other.claim("m-1") is IN_PROGRESS
    assert other.claim_deferred("m-1") is IN_PROGRESS


def test_releasing_an_unwritten_claim_leaves_nothing_in_the_file(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db, group_commit_interval=0.5)
    assert store.claim_deferred("m-1") is ACQUIRED
    store.release("m-1")
    future = store.mark_done_deferred("other")
    store.flush()
    future.result(5)  # a group commit went by
    assert rows_in_file(db) == {"other": None}


def test_releasing_a_written_claim_deletes_its_row(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db, group_commit_interval=0.0)
    assert store.claim_deferred("m-1") is ACQUIRED
    deadline = time.monotonic() + 5
    while "m-1" not in rows_in_file(db):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    store.release("m-1")
    assert "m-1" not in rows_in_file(db)
    assert in_thread(lambda: store.claim_deferred("m-1")) is ACQUIRED


def test_prefetch_answers_the_next_claims_without_a_lookup_each(
    stores: list[SQLiteDedupStore], db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = open_store(stores, db)
    for i in range(5):
        first.mark_done(f"done-{i}")
    store = open_store(stores, db)
    lookups: list[str] = []
    original = store._lookup
    monkeypatch.setattr(store, "_lookup", lambda key: lookups.append(key) or original(key))
    keys = [f"done-{i}" for i in range(5)] + [f"new-{i}" for i in range(5)]
    store.prefetch(keys)
    assert [store.claim_deferred(key) for key in keys] == [DONE] * 5 + [ACQUIRED] * 5
    assert lookups == []
    assert store.claim_deferred("not-prefetched") is ACQUIRED
    assert lookups == ["not-prefetched"]


def test_a_key_done_after_the_prefetch_is_not_acquired_again(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db)
    store.prefetch(["m-1"])  # looked up while absent ...
    in_thread(lambda: store.mark_done_deferred("m-1").result(5))  # ... then done by another thread
    assert store.claim_deferred("m-1") is DONE


def test_close_commits_what_is_queued(db: Path) -> None:
    store = SQLiteDedupStore(db, group_commit_interval=1.0)
    future = store.mark_done_deferred("m-1")
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 0.9, "close does not wait out the interval"
    assert future.done()
    future.result(0)
    assert done_in_file(db, "m-1")
    for operation in (store.claim_deferred, store.mark_done_deferred):
        with pytest.raises(ClosedError):
            operation("m-2")


def test_the_synchronous_methods_keep_their_meaning_alongside(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db)
    store.mark_done("sync")  # committed before returning
    assert done_in_file(db, "sync")
    assert store.claim_deferred("sync") is DONE
    assert store.claim("m-1") is ACQUIRED
    assert store.claim_deferred("m-1") is ACQUIRED, "the same thread holds it"
    assert in_thread(lambda: store.claim_deferred("m-1")) is IN_PROGRESS


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"group_commit_interval": -1}, "group_commit_interval"),
    ({"group_commit_interval": "5"}, "group_commit_interval"),
    ({"group_commit_size": 0}, "group_commit_size"),
    ({"group_commit_size": 1.5}, "group_commit_size"),
])
def test_bad_group_commit_settings_fail_at_construction(db: Path, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        SQLiteDedupStore(db, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_the_handler_runner_acks_with_the_future_of_the_done_record(
    stores: list[SQLiteDedupStore], db: Path
) -> None:
    store = open_store(stores, db)
    store.resume.clear()
    calls: list[str] = []
    runner: HandlerRunner[Message] = HandlerRunner(lambda m: calls.append(m.message_id), retry=RetryPolicy(),
                                                   dedup=store)
    first = runner.invoke(Message(body=b"x", value=b"x", message_id="m-1", key=None))
    second = runner.invoke(Message(body=b"x", value=b"x", message_id="m-2", key=None))
    assert first.disposition is Disposition.ACK and first.durable is not None
    assert second.durable is first.durable, "one group commit, one future"
    assert not first.durable.done()
    store.resume.set()
    first.durable.result(5)
    duplicate = runner.invoke(Message(body=b"x", value=b"x", message_id="m-1", key=None))
    assert duplicate.deduplicated and duplicate.durable is None
    assert calls == ["m-1", "m-2"]
    assert runner.stats.processed == 2 and runner.stats.deduplicated == 1


# -- the batched path (Kafka: a fetched batch's keys claimed, and their done records queued, at once) --


def test_claim_batch_answers_each_key_from_the_file(stores: list[SQLiteDedupStore], db: Path) -> None:
    other = open_store(stores, db)
    other.mark_done("done")
    assert other.claim("held elsewhere") is ACQUIRED  # another instance: another owner, a row in the file
    store = open_store(stores, db)
    results = store.claim_batch(["new-1", "done", "held elsewhere", "new-2"])
    assert results == {"new-1": ACQUIRED, "done": DONE, "held elsewhere": IN_PROGRESS, "new-2": ACQUIRED}
    assert in_thread(lambda: store.claim_deferred("new-1")) is IN_PROGRESS, "claims are exact within the process"
    assert in_thread(lambda: store.claim("new-2")) is IN_PROGRESS


def test_claim_batch_leaves_keys_this_process_holds_state_for_to_claim_deferred(
    stores: list[SQLiteDedupStore], db: Path
) -> None:
    store = open_store(stores, db)
    store.resume.clear()
    assert store.claim_deferred("mine") is ACQUIRED
    store.mark_done_deferred("pending")
    results = store.claim_batch(["mine", "pending", "caf\u00e9", "fresh"])
    assert results == {"fresh": ACQUIRED}, "own claims, pending done records, non-ASCII keys: one by one"
    assert store.claim_deferred("mine") is ACQUIRED
    assert store.claim_deferred("caf\u00e9") is ACQUIRED
    store.resume.set()
    assert store.claim_deferred("pending") is DONE


def test_claim_batch_sees_a_done_record_committed_after_its_lookup(
    stores: list[SQLiteDedupStore], db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(stores, db)
    lookup = store._lookup_many

    def lookup_then_commit(keys: list[str]) -> dict[str, object]:
        rows = lookup(keys)
        store.mark_done("k-2")  # committed between the lookup and the claims
        return rows  # type: ignore[return-value]

    monkeypatch.setattr(store, "_lookup_many", lookup_then_commit)
    assert store.claim_batch(["k-1", "k-2"]) == {"k-1": ACQUIRED, "k-2": DONE}


def test_mark_done_batch_shares_one_future_and_replaces_the_claims(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db)
    store.resume.clear()
    keys = [f"m-{i}" for i in range(50)]
    assert set(store.claim_batch(keys).values()) == {ACQUIRED}
    future = store.mark_done_batch(keys)
    assert store.waiting.wait(5)
    assert not future.done() and not done_in_file(db, "m-0")
    store.resume.set()
    future.result(5)
    assert all(done_in_file(db, key) for key in keys)
    assert in_thread(lambda: store.claim_deferred("m-7")) is DONE
    assert store.claim_batch(keys) == dict.fromkeys(keys, DONE)


def test_mark_done_batch_refuses_a_key_sqlite_cannot_store(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db)
    with pytest.raises(InvalidMessage):
        store.mark_done_batch(["ok", "\ud800"])


class OneByOneStore(MemoryDedupStore):
    """A store with no batch operations of its own: the DedupStore defaults."""

    batched = False
    claim_batch = DedupStore.claim_batch
    mark_done_batch = DedupStore.mark_done_batch


def test_the_default_mark_done_batch_combines_the_futures_of_any_store() -> None:
    store = OneByOneStore()
    future = store.mark_done_batch(["a", "b"])
    assert future.result(1) is None
    assert store.claim("a") is DONE and store.claim("b") is DONE
    assert store.claim_batch(["c"]) == {}, "the default decides nothing in advance"


def batched_runner(
    store: SQLiteDedupStore, handler: Callable[[Message], object]
) -> tuple[HandlerRunner[Message], list[tuple[Future[None], list[object]]]]:
    runner: HandlerRunner[Message] = HandlerRunner(handler, retry=RetryPolicy(max_attempts=3), dedup=store,
                                                   dedup_key=MessageIdKey())
    sink: list[tuple[Future[None], list[object]]] = []
    runner.durable_sink = sink.append
    return runner, sink


def message(message_id: str) -> Message:
    return Message(body=b"x", value=b"x", message_id=message_id, key=None)


def test_the_batched_runner_hands_done_records_over_with_their_refs(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db)
    calls: list[str] = []
    runner, sink = batched_runner(store, lambda m: calls.append(m.message_id))
    runner.begin_batch(["m-1", "m-2", "m-3"])
    outcomes = [runner.invoke_batched(message(f"m-{i}"), ("ref", i)) for i in (1, 2, 3)]
    assert all(outcome is BATCHED for outcome in outcomes)
    assert sink == [], "nothing handed over before the batch ends"
    runner.end_batch()
    [(future, refs)] = sink
    assert refs == [("ref", 1), ("ref", 2), ("ref", 3)]
    future.result(5)
    assert all(done_in_file(db, f"m-{i}") for i in (1, 2, 3))
    assert calls == ["m-1", "m-2", "m-3"]
    assert runner.stats.processed == 3


def test_the_batched_runner_runs_an_id_repeated_within_a_batch_once(
    stores: list[SQLiteDedupStore], db: Path
) -> None:
    store = open_store(stores, db)
    calls: list[str] = []
    runner, sink = batched_runner(store, lambda m: calls.append(m.message_id))
    runner.begin_batch(["m-1", "m-2", "m-1"])
    assert runner.invoke_batched(message("m-1"), 1) is BATCHED
    assert runner.invoke_batched(message("m-2"), 2) is BATCHED
    repeat = runner.invoke_batched(message("m-1"), 3)
    assert repeat.deduplicated, "the repeat waited for the first one's done record, then was skipped"
    runner.end_batch()
    assert calls == ["m-1", "m-2"]
    assert [refs for _, refs in sink] == [[1, 2]]
    assert runner.stats.deduplicated == 1


def test_the_batched_runner_releases_failed_and_unprocessed_claims(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db)

    def handler(m: Message) -> None:
        if m.message_id == "fails":
            raise RuntimeError("boom")

    runner, sink = batched_runner(store, handler)
    runner.begin_batch(["fails", "ok", "never reached"])
    failed = runner.invoke_batched(message("fails"), 1)
    assert failed.disposition is Disposition.RETRY
    assert in_thread(lambda: store.claim_deferred("fails")) is ACQUIRED, "released for the retry"
    assert runner.invoke_batched(message("ok"), 2) is BATCHED
    runner.end_batch()  # cut short: "never reached" was not processed
    assert in_thread(lambda: store.claim_deferred("never reached")) is ACQUIRED
    [(future, refs)] = sink
    assert refs == [2]
    future.result(5)
    assert not done_in_file(db, "never reached")


def test_the_batched_runner_skips_ids_already_done(stores: list[SQLiteDedupStore], db: Path) -> None:
    store = open_store(stores, db)
    store.mark_done("old")
    calls: list[str] = []
    runner, sink = batched_runner(store, lambda m: calls.append(m.message_id))
    runner.begin_batch(["old", "new"])
    assert runner.invoke_batched(message("old"), 1).deduplicated
    assert runner.invoke_batched(message("new"), 2) is BATCHED
    runner.end_batch()
    assert calls == ["new"]
    assert [refs for _, refs in sink] == [[2]]
