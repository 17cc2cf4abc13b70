"""A consumer process for the dedup crash tests: effectively-once over the facade, with SQLite.

    python _dedup_consumer.py URL SOURCE GROUP DEDUP_PATH LOG_PATH EXPECT [--crash-after N] [--stall-writer]

The handler appends each message id it runs for to LOG_PATH (fsync'd), so the test can count
handler runs across processes.

- ``--crash-after N``: the process SIGKILLs itself inside ``mark_done`` of the N-th message, right
  after its done record was journaled and before the consumer could acknowledge it: the broker
  delivers it again to the next consumer, which must recognise it.
- ``--stall-writer``: the store's writer thread never writes to the database file (as if another
  process held its lock), so done records exist only in the journal: the consumer must not wait
  for the file to acknowledge, and a crash must not lose them.

Without ``--crash-after``, the process stops once LOG_PATH holds EXPECT ids and (unless
``--no-duplicate``) at least one duplicate was recognised, and prints its stats as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from reliable_messaging import Message, RetryPolicy, SQLiteDedupStore, connect


class CrashingStore(SQLiteDedupStore):
    """A real SQLite store whose process dies once the N-th done record is journaled."""

    def __init__(self, path: str, crash_after: int, stall: bool) -> None:
        self.stalled = threading.Event() if stall else None
        super().__init__(path)
        self.crash_after = crash_after
        self.done = 0

    def mark_done(self, key: str) -> None:
        super().mark_done(key)
        self.done += 1
        if self.done == self.crash_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def _before_group_commit(self) -> None:
        if self.stalled is not None:
            self.stalled.wait()  # never set: nothing reaches the file


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("url", "source", "group", "dedup_path", "log_path"):
        parser.add_argument(name)
    parser.add_argument("expect", type=int)
    parser.add_argument("--crash-after", type=int, default=0)
    parser.add_argument("--stall-writer", action="store_true")
    parser.add_argument("--no-duplicate", action="store_true")
    args = parser.parse_args()
    log = Path(args.log_path)
    store = CrashingStore(args.dedup_path, args.crash_after, args.stall_writer)

    def handler(message: Message) -> None:
        with log.open("a") as out:
            out.write(message.message_id + "\n")
            out.flush()
            os.fsync(out.fileno())

    settings: dict[str, object] = {"prefetch": 1}  # RabbitMQ: the next delivery comes only after an ack
    if args.url.startswith("kafka://"):
        # Small fetches: the crash comes inside a batch of several records, with batches after it.
        settings = {"session_timeout": 6.0, "commit_interval": 0.2, "commit_every": 1000, "fetch_batch": 3}
    broker = connect(args.url, guarantee="effectively-once", dedup=store, name=args.group,
                     retry=RetryPolicy(max_attempts=5, initial_delay=0.1, jitter=0.0), **settings)
    consumer = broker.consumer(args.source, handler, group=args.group)
    consumer.start()
    print("started", flush=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        runs = log.read_text().split() if log.exists() else []
        if len(set(runs)) >= args.expect and (args.no_duplicate or consumer.stats.deduplicated >= 1):
            break
        time.sleep(0.05)
    stats = consumer.stats
    broker.close()
    store.close()
    print(json.dumps({"processed": stats.processed, "deduplicated": stats.deduplicated}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
