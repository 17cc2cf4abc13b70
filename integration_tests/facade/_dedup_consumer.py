"""A consumer process for the dedup crash tests: effectively-once over the facade, with SQLite.

    python _dedup_consumer.py URL SOURCE GROUP DEDUP_PATH LOG_PATH EXPECT [--crash-after N]

The handler appends each message id it runs for to LOG_PATH (fsync'd), so the test can count
handler runs across processes. With ``--crash-after N`` the process SIGKILLs itself right after
the N-th ``mark_done`` returned: the message is recorded as done in SQLite, but its ack/commit was
never sent, so the broker delivers it again to the next consumer. Without it, the process stops
once LOG_PATH holds EXPECT ids and at least one duplicate was recognised, and prints its stats as
JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from reliable_messaging import Message, RetryPolicy, SQLiteDedupStore, connect


class CrashingStore(SQLiteDedupStore):
    """A real SQLite store whose process dies right after the N-th mark_done: a crash injected at one point."""

    def __init__(self, path: str, crash_after: int) -> None:
        super().__init__(path)
        self.crash_after = crash_after
        self.done = 0

    def mark_done(self, key: str) -> None:
        super().mark_done(key)
        self.done += 1
        if self.done == self.crash_after:
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
        settings = {"session_timeout": 6.0, "commit_interval": 30.0, "commit_every": 1000}
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
