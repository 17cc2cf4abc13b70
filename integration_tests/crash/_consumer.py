"""A consumer process for the random-kill tests: the facade as a new user writes it.

    python _consumer.py URL SOURCE GROUP LOG_PATH --store sqlite:PATH | redis:URL | none [--settings JSON]

The handler appends each message id it runs for to LOG_PATH and fsyncs it before returning: a side
effect that survives the process, so the test can count handler runs across kills. The process runs
until it is killed (SIGKILL, the test's fault) or stopped with SIGTERM (then it stops the consumer
and closes the broker).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from reliable_messaging import Message, RedisDedupStore, RetryPolicy, connect


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("url", "source", "group", "log_path"):
        parser.add_argument(name)
    parser.add_argument("--store", required=True)
    parser.add_argument("--settings", default="{}")
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

    def handler(message: Message) -> None:
        os.write(out, f"{message.message_id}\n".encode())
        os.fsync(out)

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    broker = connect(args.url, **options)  # type: ignore[arg-type]
    consumer = broker.consumer(args.source, handler, group=args.group)
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
