"""End-to-end smoke run against real Kafka and RabbitMQ through reliable_messaging.connect.

For each broker (addresses from KAFKA_BOOTSTRAP_SERVERS / RABBITMQ_URL):

1. at-least-once: publish N messages, every future confirmed; a consumer handles every one;
2. a handler failing on one message: retried, then dead-lettered; a rejected one dead-lettered at once;
3. effectively-once: the same message id published twice is handled once.

Prints one line per check and a summary; exits 1 if any guarantee failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from reliable_messaging import Message, Reject, ReliableMessagingError, RetryPolicy, connect

RETRY = RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=1.0, jitter=0.0)


class Check:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, ok: bool, what: str, detail: str = "") -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}{f' ({detail})' if detail else ''}", flush=True)
        if not ok:
            self.failures.append(what)


def wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def run_broker(label: str, url: str, messages: int, check: Check) -> None:
    print(f"{label}: {url}", flush=True)
    name = f"smoke-{label.lower()}-{uuid.uuid4().hex[:8]}"
    handled: set[str] = set()
    attempts: dict[bytes, list[int]] = {}
    lock = threading.Lock()

    def handler(message: Message) -> None:
        with lock:
            attempts.setdefault(message.body, []).append(message.attempt)
        if message.body == b"fails":
            raise RuntimeError("downstream unavailable")
        if message.body == b"rejected":
            raise Reject("invalid payload")
        with lock:
            handled.add(message.message_id)

    with connect(url, retry=RETRY, name=name) as broker:
        print(f"  {broker!r}", flush=True)
        consumer = broker.consumer(name, handler, group=name)
        consumer.start()
        began = time.monotonic()
        futures = [broker.publish(name, f"message {i}", key=f"k{i % 8}") for i in range(messages)]
        confirmed = sum(1 for f in futures if f.exception(timeout=60) is None)
        publish_s = time.monotonic() - began
        check(confirmed == messages, f"{messages} publishes confirmed", f"{confirmed} in {publish_s:.2f}s")
        ids = {f.message_id for f in futures}
        ok = wait(lambda: ids <= handled, 120)
        took = time.monotonic() - began
        check(ok, f"every one of {messages} messages handled", f"{len(ids & handled)} in {took:.2f}s, "
              f"{messages / took:,.0f} msg/s end to end")

        broker.publish(name, b"fails").result(timeout=30)
        broker.publish(name, b"rejected").result(timeout=30)
        ok = wait(lambda: consumer.stats.dead_lettered == 2, 60)
        check(ok and attempts.get(b"fails") == [1, 2, 3],
              "failing message retried 3 times, then dead-lettered", f"attempts {attempts.get(b'fails')}")
        check(ok and attempts.get(b"rejected") == [1], "rejected message dead-lettered at once",
              f"attempts {attempts.get(b'rejected')}; dead letters in {broker.dead_letter_source(name)}")

    with tempfile.TemporaryDirectory() as tmp:
        seen: list[str] = []
        with connect(url, guarantee="effectively-once", dedup_path=Path(tmp) / "dedup.sqlite3",
                     name=f"{name}-once") as broker:
            consumer = broker.consumer(f"{name}-once", lambda m: seen.append(m.message_id), group=name)
            consumer.start()
            for _ in range(2):  # a producer resending after a lost ack
                broker.publish(f"{name}-once", b"charge 10 EUR", message_id="payment-42").result(timeout=30)
            broker.publish(f"{name}-once", b"end", message_id="end").result(timeout=30)
            ok = wait(lambda: consumer.stats.processed + consumer.stats.deduplicated == 3, 60)
            check(ok and seen == ["payment-42", "end"], "a resent message id handled once (SQLite dedup)",
                  f"handled {seen}, deduplicated {consumer.stats.deduplicated}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    check = Check()
    brokers = [("Kafka", f"kafka://{os.environ.get('KAFKA_BOOTSTRAP_SERVERS', '127.0.0.1:9092')}"),
               ("RabbitMQ", os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))]
    for label, url in brokers:
        try:
            run_broker(label, url, args.messages, check)
        except ReliableMessagingError as exc:
            check(False, f"{label} run", f"{type(exc).__name__}: {exc}")
    if check.failures:
        print(f"FAILED: {len(check.failures)} check(s): {', '.join(check.failures)}")
        return 1
    print("all guarantees held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
