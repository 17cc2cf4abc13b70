"""A consumer process for the random-kill tests: the facade as a new user writes it.

    python _consumer.py URL SOURCE GROUP LOG_PATH --store sqlite:PATH | redis:URL | none [--settings JSON]
        [--consumer JSON] [--delay SECONDS] [--async] [--run]

The handler appends each message id it runs for to LOG_PATH and fsyncs it before returning: a side
effect that survives the process, so the test can count handler runs across kills. ``--delay`` makes
it wait first (1 to 5 times that, by message, so that handlers finish out of order; ``time.sleep``, or
``asyncio.sleep`` with ``--async``), so that with ``--consumer
'{"concurrency": 64}'`` 64 handlers are in flight when the process is killed. The process runs until
it is killed (SIGKILL, the test's fault) or stopped with SIGTERM: then it stops the consumer and closes
the broker, or, with ``--run``, ``consumer.run()`` handles the signal itself (as a service's main would).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from reliable_messaging import Message, RedisDedupStore, RetryPolicy, connect


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("url", "source", "group", "log_path"):
        parser.add_argument(name)
    parser.add_argument("--store", required=True)
    parser.add_argument("--settings", default="{}")
    parser.add_argument("--consumer", default="{}")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--async", dest="use_async", action="store_true")
    parser.add_argument("--run", action="store_true")
    args = parser.parse_args()
    kind, _, where = args.store.partition(":")
    options: dict[str, object] = {"retry": RetryPolicy(max_attempts=5, initial_delay=0.1, jitter=0.0)}
    if kind == "sqlite":  # the default store of the preset, at a path of the test's
        options.update(guarantee="effectively-once", dedup_path=where)
    elif kind == "redis":
        options.update(guarantee="effectively-once", dedup=RedisDedupStore(where))
    else:
        options.update(guarantee="at-least-once")
    options.update(json.loads(args.settings))
    out = os.open(args.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    delay = args.delay

    def wait_of(message: Message) -> float:
        """``delay`` times 1 to 5, by message: handlers finish out of order."""
        return delay * (1 + sum(message.message_id.encode()) % 5)

    def record(message: Message) -> None:
        os.write(out, f"{message.message_id} {(message.key or b'').decode()} {message.body.decode()}\n".encode())
        os.fsync(out)

    def handler(message: Message) -> None:
        if delay:
            time.sleep(wait_of(message))
        record(message)

    async def async_handler(message: Message) -> None:
        if delay:
            await asyncio.sleep(wait_of(message))
        record(message)

    broker = connect(args.url, **options)  # type: ignore[arg-type]
    consumer_options: dict[str, Any] = json.loads(args.consumer)
    consumer = broker.consumer(args.source, async_handler if args.use_async else handler, group=args.group,
                               **consumer_options)
    if args.run:  # the library's own SIGTERM handling: finish what runs, commit/ack, close
        print("started", flush=True)
        consumer.run()
        broker.close()
        return 0
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    consumer.start()
    print("started", flush=True)
    while not stopped.wait(0.1):
        if not consumer.running:
            print(f"consumer stopped: {getattr(consumer, 'error', None)!r}", file=sys.stderr, flush=True)
            return 1
    broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
