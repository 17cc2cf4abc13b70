"""A consumer process for the dedup crash tests: effectively-once over the facade, with SQLite.

    python _dedup_consumer.py URL SOURCE GROUP DEDUP_PATH LOG_PATH EXPECT [--crash-after N]

The handler appends each message id it runs for to LOG_PATH (fsync'd), so the test can count
handler runs across processes. With ``--crash-after N`` the process SIGKILLs itself right after
the group commit holding the N-th done record (the consumers use the store's pipelined path):
the message is recorded as done in SQLite, but its ack/commit was never sent (it waits for that
commit's future, which never resolves), so the broker delivers it again to the next consumer.
Without it, the process stops once LOG_PATH holds EXPECT ids and at least one duplicate was
recognised, and prints its stats as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

from reliable_messaging import Message, RetryPolicy, SQLiteDedupStore, connect


class CrashingStore(SQLiteDedupStore):
    """A real SQLite store whose process dies once the N-th done record is durable: a crash injected at one point.

    The call that queues the N-th done record (``mark_done_deferred`` for RabbitMQ, one message at a
    time; ``mark_done_batch`` for Kafka, a fetched batch's records at once) then waits for its own
    group commit, so no later message's handler runs before the crash: the log holds the first N
    messages, and on Kafka the rest of their batch. The writer kills the process after that commit,
    before its future resolves, so neither the acks nor the offset commit of those messages can be sent.
    """

    def __init__(self, path: str, crash_after: int) -> None:
        super().__init__(path)
        self.crash_after = crash_after
        self.done = 0
        self.crash_key: str | None = None

    def mark_done_deferred(self, key: str) -> Future[None]:
        self.done += 1
        if self.done == self.crash_after:
            self.crash_key = key
        future = super().mark_done_deferred(key)
        if self.done == self.crash_after:
            self.flush()
            future.result(timeout=30)  # never returns: the writer kills the process first
            raise AssertionError("the process should have been killed")
        return future

    def mark_done_batch(self, keys: Iterable[str]) -> Future[None]:
        keys = list(keys)
        before, self.done = self.done, self.done + len(keys)
        if not before < self.crash_after <= self.done:
            return super().mark_done_batch(keys)
        self.crash_key = keys[-1]
        future = super().mark_done_batch(keys)
        self.flush()
        future.result(timeout=30)  # never returns: the writer kills the process first
        raise AssertionError("the process should have been killed")

    def _after_group_commit(self, keys: frozenset[str] | set[str]) -> None:
        if self.crash_key is not None and self.crash_key in keys:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("url", "source", "group", "dedup_path", "log_path"):
        parser.add_argument(name)
    parser.add_argument("expect", type=int)
    parser.add_argument("--crash-after", type=int, default=0)
    args = parser.parse_args()
    log = Path(args.log_path)
    store = CrashingStore(args.dedup_path, args.crash_after) if args.crash_after else SQLiteDedupStore(args.dedup_path)

    def handler(message: Message) -> None:
        with log.open("a") as out:
            out.write(message.message_id + "\n")
            out.flush()
            os.fsync(out.fileno())

    settings: dict[str, object] = {}
    if args.url.startswith("kafka://"):
        # Small fetches: the crash comes inside a batch of several records, with batches after it.
        settings = {"session_timeout": 6.0, "commit_interval": 30.0, "commit_every": 1000, "fetch_batch": 3}
    broker = connect(args.url, guarantee="effectively-once", dedup=store, name=args.group,
                     retry=RetryPolicy(max_attempts=5, initial_delay=0.1, jitter=0.0), **settings)
    consumer = broker.consumer(args.source, handler, group=args.group)
    consumer.start()
    print("started", flush=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        runs = log.read_text().split() if log.exists() else []
        if len(set(runs)) >= args.expect and consumer.stats.deduplicated >= 1:
            break
        time.sleep(0.05)
    stats = consumer.stats
    broker.close()
    store.close()
    print(json.dumps({"processed": stats.processed, "deduplicated": stats.deduplicated}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
