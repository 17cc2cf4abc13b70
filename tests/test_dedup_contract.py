"""The DedupStore contract, run against every store that can take an injected clock.

MemoryDedupStore and SQLiteDedupStore share these tests; the Redis store runs the
same scenarios against a real server in ``integration_tests/dedup`` (its expiry is
Redis's own clock, so it cannot take a fake one). Store-specific behaviour lives in
``test_dedup_memory.py`` and ``test_dedup_sqlite.py``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from reliable_messaging import (
    ClaimResult,
    ClosedError,
    ConfigurationError,
    DedupStore,
    Disposition,
    InvalidMessage,
    Message,
    RetryPolicy,
)
from reliable_messaging._dedup import MemoryDedupStore, SQLiteDedupStore
from reliable_messaging._handling import HandlerRunner

ACQUIRED, DONE, IN_PROGRESS = ClaimResult.ACQUIRED, ClaimResult.DONE, ClaimResult.IN_PROGRESS
LEASE, TTL = 30.0, 600.0
T = TypeVar("T")


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StoreFactory(Protocol):
    def __call__(self, **kwargs: Any) -> DedupStore: ...


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a new thread: another lease holder, as a second consumer thread is."""
    results: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    if errors:
        raise errors[0]
    return results[0]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path) -> Iterator[StoreFactory]:
    """Builds stores of one kind sharing ``clock``; SQLite ones share one file, like consumers on one host."""
    stores: list[DedupStore] = []

    def make(**kwargs: Any) -> DedupStore:
        kwargs = {"lease": LEASE, "ttl": TTL, "clock": clock, **kwargs}
        store: DedupStore
        if request.param == "memory":
            store = MemoryDedupStore(**kwargs)
        else:
            store = SQLiteDedupStore(tmp_path / "dedup.sqlite3", **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> DedupStore:
    return make_store()


class TestClaimCycle:
    def test_first_claim_acquires(self, store: DedupStore) -> None:
        assert store.claim("m-1") is ACQUIRED

    def test_claim_after_mark_done_is_done(self, store: DedupStore) -> None:
        store.claim("m-1")
        store.mark_done("m-1")
        assert store.claim("m-1") is DONE
        assert store.claim("m-1") is DONE, "a duplicate does not consume the done record"
        assert in_thread(lambda: store.claim("m-1")) is DONE

    def test_release_lets_the_redelivery_acquire(self, store: DedupStore) -> None:
        store.claim("m-1")
        store.release("m-1")
        assert in_thread(lambda: store.claim("m-1")) is ACQUIRED

    def test_keys_are_independent(self, store: DedupStore) -> None:
        store.claim("m-1")
        store.mark_done("m-1")
        assert store.claim("m-2") is ACQUIRED
        assert store.claim("m-1") is DONE

    def test_mark_done_without_a_claim_records_done(self, store: DedupStore) -> None:
        store.mark_done("m-1")
        assert store.claim("m-1") is DONE

    def test_mark_done_twice_is_harmless(self, store: DedupStore) -> None:
        store.claim("m-1")
        store.mark_done("m-1")
        store.mark_done("m-1")
        assert store.claim("m-1") is DONE

    def test_release_of_an_unknown_key_is_a_no_op(self, store: DedupStore) -> None:
        store.release("never-claimed")
        assert store.claim("never-claimed") is ACQUIRED

    def test_release_after_mark_done_keeps_the_done_record(self, store: DedupStore) -> None:
        store.claim("m-1")
        store.mark_done("m-1")
        store.release("m-1")
        assert store.claim("m-1") is DONE


class TestLeases:
    def test_live_claim_of_another_thread_is_in_progress(self, store: DedupStore) -> None:
        assert in_thread(lambda: store.claim("m-1")) is ACQUIRED
        assert store.claim("m-1") is IN_PROGRESS

    def test_same_thread_claiming_again_renews_its_own_claim(self, store: DedupStore, clock: FakeClock) -> None:
        # A thread cannot be running the handler twice: its earlier claim was never released
        # (e.g. the release hit an unavailable store). Waiting out its own lease would only delay.
        assert store.claim("m-1") is ACQUIRED
        clock.advance(LEASE - 1)
        assert store.claim("m-1") is ACQUIRED
        clock.advance(LEASE - 1)
        assert in_thread(lambda: store.claim("m-1")) is IN_PROGRESS, "the lease was renewed"

    def test_claim_stays_in_progress_until_the_lease_ends(self, store: DedupStore, clock: FakeClock) -> None:
        in_thread(lambda: store.claim("m-1"))
        clock.advance(LEASE - 0.001)
        assert store.claim("m-1") is IN_PROGRESS

    def test_claim_of_a_crashed_consumer_expires_after_the_lease(self, store: DedupStore, clock: FakeClock) -> None:
        in_thread(lambda: store.claim("m-1"))  # that thread never marks done nor releases: it crashed
        clock.advance(LEASE)
        assert store.claim("m-1") is ACQUIRED
        store.mark_done("m-1")
        assert in_thread(lambda: store.claim("m-1")) is DONE

    def test_release_by_another_thread_does_not_free_the_claim(self, store: DedupStore) -> None:
        store.claim("m-1")
        in_thread(lambda: store.release("m-1"))
        assert in_thread(lambda: store.claim("m-1")) is IN_PROGRESS

    def test_late_release_does_not_free_the_new_owners_claim(self, store: DedupStore, clock: FakeClock) -> None:
        store.claim("m-1")  # slow consumer: its lease runs out while the handler runs
        clock.advance(LEASE + 1)
        assert in_thread(lambda: store.claim("m-1")) is ACQUIRED  # another consumer takes over
        store.release("m-1")  # the slow consumer's handler fails at last
        assert in_thread(lambda: store.claim("m-1")) is IN_PROGRESS, "the new owner still holds it"

    def test_late_mark_done_records_done(self, store: DedupStore, clock: FakeClock) -> None:
        store.claim("m-1")
        clock.advance(LEASE + 1)
        in_thread(lambda: store.claim("m-1"))
        store.mark_done("m-1")  # the slow consumer did finish the work
        assert in_thread(lambda: store.claim("m-1")) is DONE


class TestTtl:
    def test_done_record_lasts_until_ttl(self, store: DedupStore, clock: FakeClock) -> None:
        store.claim("m-1")
        store.mark_done("m-1")
        clock.advance(TTL - 0.001)
        assert store.claim("m-1") is DONE

    def test_done_record_expires_after_ttl(self, store: DedupStore, clock: FakeClock) -> None:
        store.claim("m-1")
        store.mark_done("m-1")
        clock.advance(TTL)
        assert store.claim("m-1") is ACQUIRED, "a duplicate later than ttl is processed again"

    def test_finding_a_duplicate_does_not_extend_the_ttl(self, store: DedupStore, clock: FakeClock) -> None:
        store.mark_done("m-1")
        clock.advance(TTL / 2)
        assert store.claim("m-1") is DONE
        clock.advance(TTL / 2)
        assert store.claim("m-1") is ACQUIRED


class TestConcurrency:
    def test_threads_racing_on_the_same_keys_acquire_each_key_once(self, make_store: StoreFactory) -> None:
        store = make_store()
        keys = [f"m-{i}" for i in range(200)]
        barrier = threading.Barrier(8)
        acquired: Counter[str] = Counter()
        lock = threading.Lock()

        def consumer() -> None:
            barrier.wait()
            for key in keys:
                if store.claim(key) is ACQUIRED:
                    with lock:
                        acquired[key] += 1

        threads = [threading.Thread(target=consumer) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert all(acquired[key] == 1 for key in keys), {k: n for k, n in acquired.items() if n != 1}
        assert set(acquired) == set(keys)


class TestValidation:
    @pytest.mark.parametrize("key", ["", None, b"m-1", 1])
    def test_keys_must_be_non_empty_strings(self, store: DedupStore, key: Any) -> None:
        for operation in (store.claim, store.mark_done, store.release):
            with pytest.raises(InvalidMessage, match="non-empty str"):
                operation(key)

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"lease": 0}, "lease"),
            ({"lease": -1}, "lease"),
            ({"lease": "60"}, "lease"),
            ({"lease": 60, "ttl": 30}, "ttl"),
            ({"clock": "time"}, "clock"),
        ],
    )
    def test_bad_parameters_fail_at_construction(self, make_store: StoreFactory, kwargs: dict[str, Any],
                                                 field: str) -> None:
        with pytest.raises(ConfigurationError) as info:
            make_store(**kwargs)
        assert info.value.field == field

    def test_calls_after_close_raise_closed_error(self, store: DedupStore) -> None:
        store.close()
        store.close()  # idempotent
        for operation in (store.claim, store.mark_done, store.release):
            with pytest.raises(ClosedError):
                operation("m-1")

    def test_context_manager_closes(self, make_store: StoreFactory) -> None:
        with make_store() as store:
            assert store.claim("m-1") is ACQUIRED
        with pytest.raises(ClosedError):
            store.claim("m-1")


class TestWithHandlerRunner:
    """The stores as the consumer uses them: claim, run, mark done / release, through HandlerRunner."""

    def test_duplicates_are_acknowledged_without_the_handler(self, store: DedupStore) -> None:
        calls: list[str] = []
        fail_once = {"m-2"}

        def handler(message: Message) -> None:
            if message.message_id in fail_once:
                fail_once.discard(message.message_id)
                raise RuntimeError("transient failure")
            calls.append(message.message_id)

        runner: HandlerRunner[Message] = HandlerRunner(handler, retry=RetryPolicy(), dedup=store)

        def deliver(message_id: str) -> Disposition:
            message = Message(body=b"x", value=b"x", message_id=message_id, key=None)
            return runner.invoke(message).disposition

        assert deliver("m-1") is Disposition.ACK
        assert deliver("m-1") is Disposition.ACK  # a republished duplicate
        assert deliver("m-2") is Disposition.RETRY  # failed: the claim is released ...
        assert deliver("m-2") is Disposition.ACK  # ... so the redelivery is processed
        assert calls == ["m-1", "m-2"]
        assert runner.stats.deduplicated == 1
        assert runner.stats.processed == 2
