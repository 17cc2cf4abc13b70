"""Raw cost of the dedup stores: what deduplication adds to each message, without a broker.

For every store, on one thread:

* ``claim+mark_done`` — a new message: the path every message takes once;
* ``claim (duplicate)`` — a message already done: acknowledged without the handler;
* ``claim+release`` — a handler failure.

Run: ``.venv/bin/python benchmarks/bench_dedup_stores.py [--messages N] [--dir DIR] [--redis-url URL]``.
SQLite runs on a file in ``--dir`` (default: the temp directory; use the disk the consumer will
use, since the commit cost is the disk's). Redis is skipped when no server answers.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from collections.abc import Callable

from reliable_messaging import DedupStore, StoreUnavailable
from reliable_messaging._dedup import MemoryDedupStore, RedisDedupStore, SQLiteDedupStore


def timed(operation: Callable[[str], object], keys: list[str]) -> float:
    """Seconds per call of ``operation`` over ``keys``."""
    started = time.perf_counter()
    for key in keys:
        operation(key)
    return (time.perf_counter() - started) / len(keys)


def measure(name: str, store: DedupStore, messages: int, prefill: int = 0) -> None:
    if prefill:
        for _ in range(prefill):
            store.mark_done(str(uuid.uuid4()))
    # Producer-stamped message ids are random uuids: each lands on a random page of a B-tree.
    fresh = [str(uuid.uuid4()) for _ in range(messages)]
    failing = [str(uuid.uuid4()) for _ in range(messages)]

    def claim_and_mark_done(key: str) -> None:
        store.claim(key)
        store.mark_done(key)

    def claim_and_release(key: str) -> None:
        store.claim(key)
        store.release(key)

    per_message = timed(claim_and_mark_done, fresh)
    # Duplicates of recent messages: still remembered even by a full, evicting memory store.
    recent = fresh[-500:]
    duplicate = timed(store.claim, recent * max(1, messages // len(recent)))
    failure = timed(claim_and_release, failing)
    label = f"{name} ({prefill} rows before)" if prefill else name
    print(
        f"{label:44s} {per_message * 1e6:9.1f} us {1 / per_message:11,.0f}/s"
        f" {duplicate * 1e6:9.1f} us {failure * 1e6:10.1f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20_000, help="messages per measurement (default 20000)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="directory for the SQLite file")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    messages: int = args.messages

    print(f"{'store':44s} {'claim+mark_done':>25s} {'dup claim':>12s} {'claim+release':>13s}")

    measure("memory", MemoryDedupStore(), messages * 10)
    measure("memory (full: evicting)", MemoryDedupStore(max_entries=1000), messages * 10)

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for synchronous in ("NORMAL", "FULL"):
            path = os.path.join(directory, f"dedup-{synchronous}.sqlite3")
            with SQLiteDedupStore(path, synchronous=synchronous) as store:
                count = messages if synchronous == "NORMAL" else max(100, messages // 20)
                measure(f"sqlite synchronous={synchronous}", store, count)
        with SQLiteDedupStore(os.path.join(directory, "dedup-big.sqlite3")) as store:
            measure("sqlite synchronous=NORMAL", store, messages, prefill=200_000)

    store = RedisDedupStore(args.redis_url, prefix=f"rm:dedup:bench:{uuid.uuid4().hex[:8]}:", ttl=300)
    try:
        store.claim("probe")
    except StoreUnavailable as exc:
        print(f"redis: skipped ({exc})")
    else:
        measure(f"redis {args.redis_url}", store, max(100, messages // 4))
    finally:
        store.close()


if __name__ == "__main__":
    main()
