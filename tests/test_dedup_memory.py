"""MemoryDedupStore beyond the shared contract: the bound on its size and what it evicts."""

from __future__ import annotations

import pytest
from test_dedup_contract import FakeClock, in_thread

from reliable_messaging import ClaimResult, ConfigurationError, StoreUnavailable
from reliable_messaging._dedup import MemoryDedupStore

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
