"""RedisDedupStore against a real Redis server: the dedup contract, consumers racing, failures.

Expiry here is Redis's own (PX on the keys), so lease and TTL tests use sub-second values and
short real waits. Each test writes under its own key prefix and deletes it afterwards.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis

from reliable_messaging import ClaimResult, ClosedError, StoreUnavailable
from reliable_messaging._dedup import RedisDedupStore
from reliable_messaging.testing import RedisEndpoint

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

ACQUIRED, DONE, IN_PROGRESS = ClaimResult.ACQUIRED, ClaimResult.DONE, ClaimResult.IN_PROGRESS
T = TypeVar("T")


@pytest.fixture
def prefix(redis_endpoint: RedisEndpoint) -> Iterator[str]:
    prefix = f"rm:dedup:test:{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(redis_endpoint.url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def make_store(redis_endpoint: RedisEndpoint, prefix: str) -> Iterator[Callable[..., RedisDedupStore]]:
    """A consumer instance's store: several built here share the server and the prefix."""
    stores: list[RedisDedupStore] = []

    def make(**kwargs: Any) -> RedisDedupStore:
        store = RedisDedupStore(redis_endpoint.url, **{"lease": 30.0, "ttl": 600.0, "prefix": prefix, **kwargs})
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def raw(redis_endpoint: RedisEndpoint) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_endpoint.url, socket_timeout=5, decode_responses=True)
    yield client
    client.close()


def in_thread(fn: Callable[[], T]) -> T:
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(fn()))
    thread.start()
    thread.join(10)
    return results[0]


# -- the contract -----------------------------------------------------------------------------


def test_claim_then_mark_done_then_duplicate_is_done(make_store: Callable[..., RedisDedupStore]) -> None:
    store, other = make_store(), make_store()
    assert store.claim("m-1") is ACQUIRED
    store.mark_done("m-1")
    assert store.claim("m-1") is DONE
    assert other.claim("m-1") is DONE, "another consumer instance sees it done"


def test_release_lets_another_consumer_acquire(make_store: Callable[..., RedisDedupStore]) -> None:
    store, other = make_store(), make_store()
    store.claim("m-1")
    assert other.claim("m-1") is IN_PROGRESS
    store.release("m-1")
    assert other.claim("m-1") is ACQUIRED


def test_live_claim_is_in_progress_for_another_thread_of_the_same_instance(
    make_store: Callable[..., RedisDedupStore],
) -> None:
    store = make_store()
    assert store.claim("m-1") is ACQUIRED
    assert in_thread(lambda: store.claim("m-1")) is IN_PROGRESS
    assert store.claim("m-1") is ACQUIRED, "the owner thread gets its own claim back (lease renewed)"


def test_release_by_a_non_owner_does_not_free_the_claim(make_store: Callable[..., RedisDedupStore]) -> None:
    owner, stranger = make_store(), make_store()
    owner.claim("m-1")
    stranger.release("m-1")
    in_thread(lambda: owner.release("m-1"))  # same instance, another thread: not the owner either
    assert stranger.claim("m-1") is IN_PROGRESS


def test_release_keeps_a_done_record(make_store: Callable[..., RedisDedupStore]) -> None:
    store = make_store()
    store.claim("m-1")
    store.mark_done("m-1")
    store.release("m-1")
    assert store.claim("m-1") is DONE


def test_claim_of_a_crashed_consumer_expires_after_the_lease(make_store: Callable[..., RedisDedupStore]) -> None:
    crashed, survivor = make_store(lease=0.3, ttl=10), make_store(lease=0.3, ttl=10)
    assert crashed.claim("m-1") is ACQUIRED  # and never marks done nor releases
    assert survivor.claim("m-1") is IN_PROGRESS
    time.sleep(0.4)
    assert survivor.claim("m-1") is ACQUIRED


def test_late_release_does_not_free_the_new_owners_claim(make_store: Callable[..., RedisDedupStore]) -> None:
    slow, other, third = (make_store(lease=0.3, ttl=10) for _ in range(3))
    slow.claim("m-1")
    time.sleep(0.4)
    assert other.claim("m-1") is ACQUIRED
    slow.release("m-1")
    assert third.claim("m-1") is IN_PROGRESS


def test_done_record_expires_after_ttl(make_store: Callable[..., RedisDedupStore], raw: redis.Redis,
                                       prefix: str) -> None:
    store = make_store(lease=0.2, ttl=0.5)
    store.claim("m-1")
    store.mark_done("m-1")
    assert raw.get(f"{prefix}m-1") == "done"
    assert 0 < raw.pttl(f"{prefix}m-1") <= 500, "the server expires it"
    assert store.claim("m-1") is DONE
    time.sleep(0.6)
    assert store.claim("m-1") is ACQUIRED


def test_claims_are_keys_with_the_lease_as_expiry(make_store: Callable[..., RedisDedupStore], raw: redis.Redis,
                                                  prefix: str) -> None:
    store = make_store(lease=30)
    store.claim("m-1")
    assert raw.get(f"{prefix}m-1") not in (None, "done")
    assert 29_000 < raw.pttl(f"{prefix}m-1") <= 30_000


# -- consumers racing -------------------------------------------------------------------------


def test_two_consumers_racing_from_threads_acquire_each_key_once(
    make_store: Callable[..., RedisDedupStore],
) -> None:
    consumers = [make_store(), make_store()]
    keys = [f"m-{i}" for i in range(300)]
    workers = [(store, order) for store in consumers for order in (keys, keys[::-1])]
    barrier = threading.Barrier(len(workers))
    acquired: Counter[str] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def consume(store: RedisDedupStore, order: list[str]) -> None:
        try:
            barrier.wait()
            for key in order:
                if store.claim(key) is ACQUIRED:
                    with lock:
                        acquired[key] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=worker) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert acquired == Counter(dict.fromkeys(keys, 1))


# -- failures ---------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends: nothing listens there


def test_unreachable_redis_is_unavailable_at_once() -> None:
    store = RedisDedupStore(f"redis://127.0.0.1:{_closed_port()}/0", socket_timeout=1.0)
    try:
        for operation in (store.claim, store.mark_done, store.release):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="cannot connect"):
                operation("m-1")
            assert time.monotonic() - started < 1.0
    finally:
        store.close()


def test_a_redis_that_never_answers_is_unavailable_within_the_socket_timeout() -> None:
    # Accepts TCP connections (the kernel completes them from the backlog) and never replies.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        store = RedisDedupStore(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", socket_timeout=0.5)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"no answer within 0\.5s"):
                store.claim("m-1")
            assert time.monotonic() - started < 2.0, "bounded by the socket timeout, no client retries"
        finally:
            store.close()


def test_a_client_passed_in_is_used_and_left_open(redis_endpoint: RedisEndpoint, prefix: str) -> None:
    client = redis.Redis.from_url(redis_endpoint.url, socket_timeout=5)
    try:
        store = RedisDedupStore(client, prefix=prefix)
        assert store.claim("m-1") is ACQUIRED
        store.mark_done("m-1")
        store.close()
        with pytest.raises(ClosedError):
            store.claim("m-1")
        assert client.get(f"{prefix}m-1") == b"done", "the caller's client still works"
    finally:
        client.close()


def test_a_client_with_decoded_responses_works_too(redis_endpoint: RedisEndpoint, prefix: str) -> None:
    client = redis.Redis.from_url(redis_endpoint.url, socket_timeout=5, decode_responses=True)
    try:
        store = RedisDedupStore(client, prefix=prefix)
        assert store.claim("m-1") is ACQUIRED
        store.mark_done("m-1")
        assert store.claim("m-1") is DONE
    finally:
        client.close()


def test_scripts_are_reloaded_after_a_script_flush(make_store: Callable[..., RedisDedupStore],
                                                   raw: redis.Redis) -> None:
    store = make_store()
    assert store.claim("m-1") is ACQUIRED
    raw.script_flush()  # e.g. a Redis restart without persistence of the script cache
    assert make_store().claim("m-1") is IN_PROGRESS
    store.release("m-1")
    assert store.claim("m-1") is ACQUIRED


def test_operations_after_close_raise_closed_error(make_store: Callable[..., RedisDedupStore]) -> None:
    store = make_store()
    store.close()
    store.close()
    for operation in (store.claim, store.mark_done, store.release):
        with pytest.raises(ClosedError):
            operation("m-1")
