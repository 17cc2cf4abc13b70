"""MemoryDedupStore beyond the shared contract: the bound on its size and what it evicts."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from test_dedup_contract import FakeClock, in_thread

from reliable_messaging import ClaimResult, ConfigurationError, StoreUnavailable
from reliable_messaging._dedup import MemoryDedupStore
from reliable_messaging._dedup import _memory as memory_module

ACQUIRED, DONE, IN_PROGRESS = ClaimResult.ACQUIRED, ClaimResult.DONE, ClaimResult.IN_PROGRESS


def done_store(clock: FakeClock, keys: list[str], max_entries: int) -> MemoryDedupStore:
    store = MemoryDedupStore(max_entries=max_entries, lease=10, ttl=1000, clock=clock)
    for key in keys:
        assert store.claim(key) is ACQUIRED
        store.mark_done(key)
    return store


def test_holds_at_most_max_entries() -> None:
    store = MemoryDedupStore(max_entries=100)
    for i in range(1000):
        store.claim(f"m-{i}")
        store.mark_done(f"m-{i}")
    assert len(store) == 100
    assert store.claim("m-999") is DONE
    assert store.claim("m-0") is ACQUIRED, "the oldest done record was evicted"


def test_evicts_the_least_recently_used_done_record() -> None:
    clock = FakeClock()
    store = done_store(clock, ["a", "b", "c"], max_entries=3)
    assert store.claim("a") is DONE  # a duplicate of "a": now the most recently used
    assert store.claim("d") is ACQUIRED  # full: evicts "b", the least recently used
    assert len(store) == 3
    assert store.claim("a") is DONE
    assert store.claim("c") is DONE
    assert store.claim("b") is ACQUIRED, "evicted: a late duplicate of it is processed again"


def test_mark_done_again_makes_a_record_most_recently_used() -> None:
    store = done_store(FakeClock(), ["a", "b"], max_entries=2)
    store.mark_done("a")
    store.mark_done("c")  # evicts "b"
    assert store.claim("a") is DONE
    assert store.claim("b") is ACQUIRED


def test_expired_claim_is_evicted_before_any_done_record() -> None:
    clock = FakeClock()
    store = MemoryDedupStore(max_entries=2, lease=10, ttl=1000, clock=clock)
    in_thread(lambda: store.claim("crashed"))  # never finished
    store.mark_done("done")
    clock.advance(10)
    assert store.claim("new") is ACQUIRED
    assert store.claim("done") is DONE, "the done record survived; the dead claim made room"
    assert len(store) == 2


def test_live_claims_are_never_evicted() -> None:
    clock = FakeClock()
    store = MemoryDedupStore(max_entries=2, lease=10, ttl=1000, clock=clock)
    in_thread(lambda: store.claim("a"))
    in_thread(lambda: store.claim("b"))
    with pytest.raises(StoreUnavailable, match="live claims"):
        store.claim("c")
    assert store.claim("a") is IN_PROGRESS
    assert store.claim("b") is IN_PROGRESS
    clock.advance(10)
    assert store.claim("c") is ACQUIRED, "once a lease ran out, its claim makes room"


def test_a_full_store_of_live_claims_still_answers_for_known_keys() -> None:
    store = MemoryDedupStore(max_entries=1, lease=10, ttl=1000, clock=FakeClock())
    in_thread(lambda: store.claim("a"))
    assert store.claim("a") is IN_PROGRESS
    in_thread(lambda: store.mark_done("a"))
    assert store.claim("a") is DONE
    assert store.claim("b") is ACQUIRED  # evicts the done record of "a"


def test_mark_done_of_a_new_key_in_a_store_full_of_live_claims_records_nothing() -> None:
    store = MemoryDedupStore(max_entries=1, lease=10, ttl=1000, clock=FakeClock())
    in_thread(lambda: store.claim("a"))
    with pytest.raises(StoreUnavailable, match="live claims"):
        store.mark_done("b")
    assert len(store) == 1
    assert store.claim("a") is IN_PROGRESS, "the live claim stayed"


def test_expired_done_records_are_replaced_in_place() -> None:
    clock = FakeClock()
    store = done_store(clock, ["a"], max_entries=1)
    clock.advance(1000)
    assert store.claim("a") is ACQUIRED
    assert len(store) == 1


def test_close_forgets_everything() -> None:
    store = done_store(FakeClock(), ["a", "b"], max_entries=10)
    store.close()
    assert len(store) == 0


def test_repr_shows_bound_and_size() -> None:
    store = done_store(FakeClock(), ["a"], max_entries=10)
    assert repr(store) == "MemoryDedupStore(max_entries=10, lease=10.0, ttl=1000.0, entries=1)"


@pytest.mark.parametrize("max_entries", [0, -1, 1.5, True, "10"])
def test_max_entries_must_be_a_positive_int(max_entries: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        MemoryDedupStore(max_entries=max_entries)  # type: ignore[arg-type]
    assert info.value.field == "max_entries"


def test_a_str_subclass_key_is_the_same_key_as_the_plain_str() -> None:
    class Key(str):
        pass

    store = MemoryDedupStore()
    assert store.claim(Key("m-1")) is ACQUIRED
    store.mark_done("m-1")
    assert store.claim(Key("m-1")) is DONE


# -- races: the lock-free fast paths under contention ------------------------------------------------

@pytest.fixture(params=["lock-free", "locked"])
def racing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Threads switch every microsecond instead of every 5 ms, so the races below interleave densely;
    "locked" runs them as on a free-threaded build, where every operation takes the lock."""
    if request.param == "locked":
        monkeypatch.setattr(memory_module, "_LOCK_FREE", False)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def run_threads(count: int, target: Callable[[int], None]) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(number: int) -> None:
        try:
            barrier.wait()
            target(number)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    if errors:
        raise errors[0]


@pytest.mark.usefixtures("racing")
def test_racing_consumers_process_each_message_once_and_skip_only_finished_ones() -> None:
    # Every thread delivers every key, in the same order, as consumers sharing a store see
    # redeliveries. The first acquisition of each key fails (release), the second succeeds
    # (mark_done). Processing is recorded before mark_done, so a thread told DONE must find the
    # key already processed.
    store = MemoryDedupStore()
    keys = [f"m-{i}" for i in range(2000)]
    lock = threading.Lock()
    acquired: Counter[str] = Counter()
    processed: Counter[str] = Counter()
    wrong_done: list[str] = []

    def consumer(number: int) -> None:
        for key in keys:
            while True:
                result = store.claim(key)
                if result is DONE:
                    with lock:
                        if processed[key] != 1:
                            wrong_done.append(key)
                    break
                if result is IN_PROGRESS:
                    continue
                with lock:
                    acquired[key] += 1
                    fail = acquired[key] == 1
                    if not fail:
                        processed[key] += 1
                if fail:
                    store.release(key)
                    continue
                store.mark_done(key)
                break

    run_threads(8, consumer)
    assert not wrong_done, f"DONE before the key was processed: {wrong_done[:5]}"
    assert {key: n for key, n in processed.items() if n != 1} == {}
    assert set(processed) == set(keys)
    assert {key: n for key, n in acquired.items() if n != 2} == {}, "one failed and one successful run per key"


@pytest.mark.usefixtures("racing")
def test_racing_takeovers_of_expired_claims_acquire_each_key_once() -> None:
    clock = FakeClock()
    store = MemoryDedupStore(lease=10, ttl=1000, clock=clock)
    keys = [f"m-{i}" for i in range(3000)]
    in_thread(lambda: [store.claim(key) for key in keys])  # a consumer that then crashed
    clock.advance(10)
    lock = threading.Lock()
    acquired: Counter[str] = Counter()

    def consumer(number: int) -> None:
        for key in keys:
            if store.claim(key) is ACQUIRED:
                with lock:
                    acquired[key] += 1

    run_threads(8, consumer)
    assert {key: n for key, n in acquired.items() if n != 1} == {}
    assert set(acquired) == set(keys)


@pytest.mark.usefixtures("racing")
def test_eviction_under_contention_keeps_the_bound_and_every_live_claim() -> None:
    clock = FakeClock()
    store = MemoryDedupStore(max_entries=32, lease=10, ttl=1000, clock=clock)
    pinned = [f"pinned-{i}" for i in range(8)]
    in_thread(lambda: [store.claim(key) for key in pinned])  # live claims of a slow consumer
    sizes: list[int] = []

    def consumer(number: int) -> None:
        for i in range(2000):
            key = f"{number}-{i}"
            assert store.claim(key) is ACQUIRED
            if i % 3:
                store.mark_done(key)
            else:
                store.release(key)
            sizes.append(len(store))

    run_threads(4, consumer)
    assert len(store) <= 32
    assert max(sizes) <= 32 + 4, "over the bound by at most one racing insert per thread"
    assert all(store.claim(key) is IN_PROGRESS for key in pinned), "a live claim was evicted"


# -- batch operations (a Kafka consumer claims a fetched batch's ids at once) ---------------------


def test_claim_batch_claims_new_keys_and_leaves_known_ones_to_claim() -> None:
    store = MemoryDedupStore()
    store.mark_done("done")
    assert in_thread(lambda: store.claim("held")) is ClaimResult.ACQUIRED
    results = store.claim_batch(["new-1", "done", "held", "new-2", "new-1"])
    assert results == {"new-1": ClaimResult.ACQUIRED, "new-2": ClaimResult.ACQUIRED}
    assert store.claim("done") is ClaimResult.DONE
    assert store.claim("held") is ClaimResult.IN_PROGRESS
    assert in_thread(lambda: store.claim("new-1")) is ClaimResult.IN_PROGRESS, "the batch's claims are real claims"


def test_claim_batch_leaves_everything_to_claim_when_the_batch_could_overfill_the_store() -> None:
    store = MemoryDedupStore(max_entries=5)
    assert store.claim_batch([f"m-{i}" for i in range(6)]) == {}
    assert len(store) == 0


def test_claim_batch_leaves_a_batch_with_a_bad_key_to_claim() -> None:
    store = MemoryDedupStore()
    assert store.claim_batch(["ok", ""]) == {}, "left to claim(), which refuses the bad key"
    with pytest.raises(ValueError):
        store.claim("")
